"""The DPIA technical annex: participants, what leaves each site (computed from the model), DP, security,
retention; Markdown and PDF. (Its bytes are checked against a real federation in test_operations.py.)"""
from __future__ import annotations


import dataclasses

import pytest
import torch

from conftest import DATA, REPO
from flows import dpia
from sitekit.spec import load_spec
from sitekit.tasks import get_task


@pytest.fixture
def ixi_spec(monkeypatch):
    return load_spec(REPO / "federations" / "ixi-brain.yaml")


@pytest.fixture
def heart_spec(monkeypatch):
    monkeypatch.setenv("FEDWARD_DATA", str(DATA))
    return load_spec(REPO / "federations" / "heart-disease.yaml")


def test_tensor_table_is_the_unet_itself(ixi_spec):
    table = dpia.tensor_table(ixi_spec)
    model = get_task(ixi_spec.task).build_model(seed=0)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    assert [t["name"] for t in table] == list(state)
    for t in table:
        assert t["shape"] == list(state[t["name"]].shape) and t["dtype"] == "float32"
        assert t["bytes"] == state[t["name"]].numel() * 4
    assert sum(t["bytes"] for t in table) == sum(p.numel() for p in state.values()) * 4
    assert dpia.train_update_bytes(ixi_spec) == sum(t["bytes"] for t in table) + 8


def test_fedbn_layers_stay_at_the_site_and_scaffold_sends_its_variate(ixi_spec):
    import dataclasses

    fedbn = dataclasses.replace(ixi_spec, algorithm="fedbn",
                                task=dataclasses.replace(ixi_spec.task, model=dataclasses.replace(ixi_spec.task.model, norm="batch")))
    names = [t["name"] for t in dpia.tensor_table(fedbn)]
    assert names and not any(".adn.N." in n for n in names)  # normalisation layers never leave the site
    scaffold = dataclasses.replace(ixi_spec, algorithm="scaffold", algorithm_params={"server_lr": 1.0, "local_lr": 0.01})
    t = dpia.tensor_table(scaffold)
    model = [x for x in t if x["name"].startswith("model.")]
    variate = [x for x in t if x["name"].startswith("scaffold_c.")]
    assert len(variate) > 0 and sum(x["bytes"] for x in variate) <= sum(x["bytes"] for x in model)


def test_annex_sections_and_facts(heart_spec):
    text = dpia.annex_markdown(heart_spec)
    for heading in ("## 1. Participants and roles", "## 2. What is processed where", "## 3. Exactly what leaves each site",
                    "## 4. Differential privacy and inversion audit", "## 5. Security measures", "## 6. Retention"):
        assert heading in text
    for s in heart_spec.sites:
        g = s.governance
        assert f"| {s.name} | {g.controller} | joint controller | (e) a task carried out in the public interest" in text
        assert f"{g.dpa.reference} of 2026-01-15, valid until 2030-12-31" in text and f"{g.dpia.reference} of 2026-01-08" in text
    assert "| `model.linear.weight` | 1 x 13 | float32 | 52 |" in text and "| **model** | | | **56** |" in text
    assert "64 bytes in all" in text and "Per site: 72 bytes per round, 1,080 bytes over 15 rounds" in text
    assert "per-feature count, sum and sum of squares" in text  # federated standardisation shares aggregates: say so
    assert "Differential privacy: **none**" in text and "Inversion audit: none run" in text
    assert "mutual TLS" in text and "no approval recorded for this run" in text
    assert text.count("*to be completed by the controller(s)*") >= 4


def test_annex_reports_the_dp_a_run_spent_and_the_inversion_audit(heart_spec):
    dp = load_spec(REPO / "federations" / "pneumonia-dp.yaml").privacy  # issue 4's privacy section, as parsed
    spec = dataclasses.replace(heart_spec, privacy=dp)
    spent = {"epsilon": 3.2107, "delta": 1e-5, "noise_multiplier": {"cleveland": 1.0, "hungary": 1.0}}
    text = dpia.annex_markdown(spec, privacy=spent,
                               inversion_audit={"attack": "gradient inversion", "best PSNR": "11.2 dB"})
    assert "ε = 3.211 (spent in this run (worst site)), δ = 1e-05" in text and "max_grad_norm 1.0" in text
    assert "Inversion audit: attack: gradient inversion; best PSNR: 11.2 dB." in text


def test_annex_marks_missing_governance(tmp_path, heart_spec):
    import dataclasses

    spec = dataclasses.replace(heart_spec, sites=(dataclasses.replace(heart_spec.sites[0], governance=None), *heart_spec.sites[1:]))
    assert "| cleveland | **missing** |" in dpia.annex_markdown(spec)


def test_cli_writes_markdown_and_pdf(tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "annex.md"
    assert main(["dpia-annex", str(REPO / "federations" / "ixi-brain.yaml"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out), str(out.with_suffix(".pdf"))]
    text = out.read_text()
    assert "# DPIA technical annex: federation `ixi-brain`" in text and "DEMO-DPA-IXI-B" in text
    assert "**602,532**" in text  # the demo UNet: 150,633 float32 parameters
    pdf = out.with_suffix(".pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and pdf.count(b"/Type /Page") >= 2


def test_annex_of_a_dp_federation_states_the_enforced_target_before_any_run():
    spec = load_spec(REPO / "federations" / "pneumonia-dp.yaml")
    text = dpia.annex_markdown(spec)
    section = text[text.index("## 4."):text.index("## 5.")]
    assert "Differential privacy (dp-sgd): (ε, δ)-DP for each site's training records" in section
    assert "ε = 8 (at most the enforced target), δ = 1e-05" in section and "max_grad_norm 1.0" in section
    assert "**none**" not in section
    # a DP site sends its accounting with every update: 6 float32 more than without DP
    plain = dataclasses.replace(spec, privacy=None)
    assert dpia.train_update_bytes(spec) - dpia.train_update_bytes(plain) == 6 * 4


def test_annex_without_dp_says_none_and_names_the_residual_risk(heart_spec):
    section = dpia.annex_markdown(heart_spec).split("## 4.")[1].split("## 5.")[0]
    assert "Differential privacy: **none**" in section and "residual risk" in section


def test_annex_says_where_the_local_only_models_go(heart_spec, ixi_spec):
    import dataclasses

    shared = dpia.annex_markdown(heart_spec)  # local_baselines: cross_site, the default without DP
    assert heart_spec.local_baselines == "cross_site"
    assert "each site's local-only model (trained on that site's data alone, 56 bytes" in shared  # logreg: 13 + 1 float32
    assert "is sent to each other site" in shared and "its local-only and personalised models" not in shared
    home = dpia.annex_markdown(dataclasses.replace(heart_spec, local_baselines="own_site"))
    assert "is sent to each other site" not in home and "its local-only and personalised models" in home
    unet = get_task(ixi_spec.task).build_model(seed=0)
    assert dpia.local_model_bytes(ixi_spec) == sum(v.numel() * v.element_size() for v in unet.state_dict().values())


def test_annex_flags_an_expired_or_post_dated_agreement(heart_spec):
    import datetime as dt

    g = heart_spec.sites[0].governance
    expired = dataclasses.replace(g, dpa=dataclasses.replace(g.dpa, valid_until=dt.date(2021, 1, 1), date=dt.date(2020, 1, 1)))
    future = dataclasses.replace(g, dpia=dataclasses.replace(g.dpia, date=dt.date(2031, 1, 1)))
    spec = dataclasses.replace(heart_spec, sites=(dataclasses.replace(heart_spec.sites[0], governance=expired),
                                                  dataclasses.replace(heart_spec.sites[1], governance=future),
                                                  *heart_spec.sites[2:]))
    text = dpia.annex_markdown(spec, today=dt.date(2026, 12, 4))
    row = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "valid until 2021-01-01 (**expired**)" in row["cleveland"]
    assert f"{g.dpia.reference.replace('cleveland', 'hungary')} of 2031-01-01 (**dated in the future**)" in row["hungary"]
    assert "**expired**" not in row["switzerland"] and "**dated in the future**" not in row["switzerland"]


@pytest.mark.parametrize("out, words", [
    ("annex.pdf", "must be a Markdown file ending in .md"),
    ("folder", "is a folder; give the Markdown file to write"),
    ("afile/annex.md", "cannot be written: "),
])
def test_cli_refuses_an_out_path_it_cannot_write(tmp_path, capsys, out, words):
    # once: a .pdf --out was overwritten by the PDF; a folder left 'folder.tmp' behind after a traceback
    from flows.cli import main

    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("keep me")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["dpia-annex", str(REPO / "federations" / "ixi-brain.yaml"), "--out", str(tmp_path / out)]) == 2
    assert words in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before and (tmp_path / "afile").read_text() == "keep me"
