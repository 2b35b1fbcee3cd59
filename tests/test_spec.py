"""The federation spec: every wrong or missing field is one sentence naming the file and the field."""
from pathlib import Path

import pytest
import yaml

from sitekit.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parents[1]


def base(tmp_path) -> dict:
    for s in ("a", "b"):
        (tmp_path / s).mkdir(exist_ok=True)
    return {
        "name": "demo", "task": {"model": {"name": "unet3d"}},
        "sites": [{"name": "site-a", "data": "a"}, {"name": "site-b", "data": "b"}],
        "rounds": 2, "local_epochs": 1, "batch_size": 2, "learning_rate": 0.01,
    }


def write(tmp_path, spec) -> Path:
    p = tmp_path / "fed.yaml"
    p.write_text(yaml.safe_dump(spec) if not isinstance(spec, str) else spec)
    return p


def test_demo_spec_is_valid_and_defaults_apply():
    spec = load_spec(REPO / "federations" / "ixi-brain.yaml")
    assert spec.name == "ixi-brain"
    assert spec.site_names == ["hospital-a", "hospital-b", "hospital-c"]
    assert spec.tls is True and spec.algorithm == "fedavg"
    assert spec.rounds >= 3
    # relative data paths resolve against the spec file's folder, not the cwd
    assert spec.sites[0].data == (REPO / ".fedward" / "sites" / "hospital-a").resolve()


def test_minimal_spec_gets_tls_on_by_default(tmp_path):
    spec = load_spec(write(tmp_path, base(tmp_path)))
    assert spec.tls is True
    assert spec.aggregator.port == 50051
    assert spec.sites[1].data == (tmp_path / "b").resolve()


@pytest.mark.parametrize("mutate, field, words", [
    (lambda s: s.update(roundz=3), "roundz", "did you mean 'rounds'"),
    (lambda s: s.pop("rounds"), "rounds", "is missing"),
    (lambda s: s.update(rounds="three"), "rounds", "must be an integer"),
    (lambda s: s.update(rounds=0), "rounds", "at least 1"),
    (lambda s: s.update(learning_rate=-1), "learning_rate", "greater than 0"),
    (lambda s: s.update(algorithm="fedsgd"), "algorithm", "fedavg"),
    (lambda s: s.update(tls="yes please"), "tls", "true or false"),
    (lambda s: s["task"]["model"].update(chanels=[8, 16]), "task.model.chanels", "did you mean 'channels'"),
    (lambda s: s["task"].update(input_size=[60, 64, 64]), "task.input_size[0]", "divisible by 8"),
    (lambda s: s["task"].pop("model"), "task.model", "is missing"),
    (lambda s: s["sites"][1].update(name="site-a"), "sites[1].name", "repeats site 'site-a'"),
    (lambda s: s["sites"][1].update(name="Site B"), "sites[1].name", "lowercase"),
    (lambda s: s["sites"][1].update(data="a"), "sites[1].data", "overlaps the data folder of site 'site-a'"),
    (lambda s: s["sites"][1].update(data="a/sub"), "sites[1].data", "overlaps"),
    (lambda s: s["sites"][0].pop("data"), "sites[0].data", "is missing"),
    (lambda s: s.update(sites=[]), "sites", "non-empty list"),
    (lambda s: s.update(aggregator={"port": 80}), "aggregator.port", "at least 1024"),
    (lambda s: s.update(aggregator={"hostname": "x"}), "aggregator.hostname", "did you mean 'host'"),
    (lambda s: s.update(learning_rate=float("inf")), "learning_rate", "finite"),
    (lambda s: s.update(learning_rate="1e-3"), "learning_rate", "write 0.001"),
    (lambda s: s.update(timeouts={"round_seconds": 1e300}), "timeouts.round_seconds", "finite"),
    (lambda s: s.update(seed=2**64), "seed", "at most 2147483647"),
    (lambda s: s.update(aggregator={"host": "127.0.0.1"}), "aggregator.host", "not an IP address"),
    (lambda s: s["task"].update(input_size=[8, 8, 8]), "task.input_size[0]", "between 16"),
])
def test_bad_field_names_file_and_field(tmp_path, mutate, field, words):
    spec = base(tmp_path)
    mutate(spec)
    path = write(tmp_path, spec)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    msg = str(err.value)
    assert str(path) in msg
    assert f"field '{field}'" in msg
    assert words in msg
    assert "\n" not in msg  # one sentence


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: demo\nrounds: [1, 2\nsites: x\n")
    with pytest.raises(SpecError, match=r"fed.yaml: not valid YAML at line \d"):
        load_spec(path)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_binary_file_is_refused_without_echoing_it(tmp_path):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(b"\x1f\x8b\xff\xfe" + bytes(range(256)) * 4)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "not UTF-8" in str(err.value) and len(str(err.value)) < 300


def test_empty_spec(tmp_path):
    with pytest.raises(SpecError, match="is empty"):
        load_spec(write(tmp_path, ""))


# --------------------------------------------------------------------------- algorithms, gate, tabular tasks

def test_algorithm_settings_default_and_override(tmp_path):
    spec = base(tmp_path)
    spec["algorithm"] = "fedprox"
    assert load_spec(write(tmp_path, spec)).algorithm_params == {"mu": 0.01}
    spec["algorithm"] = {"name": "fedyogi", "server_lr": 0.05}
    s = load_spec(write(tmp_path, spec))
    assert s.algorithm == "fedyogi" and s.algorithm_params["server_lr"] == 0.05 and s.algorithm_params["beta1"] == 0.9


@pytest.mark.parametrize("mutate, field, words", [
    (lambda s: s.update(algorithm={"name": "fedprox", "mu": -1}), "algorithm.mu", "at least 0"),
    (lambda s: s.update(algorithm={"name": "fedprox", "eta": 1}), "algorithm.eta", "not a known field"),
    (lambda s: s.update(algorithm={"name": "fedadam", "beta2": 1.0}), "algorithm.beta2", "below 1"),
    (lambda s: s.update(algorithm="fedbn"), "algorithm", "no learnable normalisation layers"),
    (lambda s: s.update(gate="best_of"), "gate", "every_site, weighted_mean"),
    (lambda s: s.update(personalise={"epoch": 2}), "personalise.epoch", "did you mean 'epochs'"),
    (lambda s: s["task"].update(standardise="federated"), "task.standardise", "tabular tasks only"),
    (lambda s: s.update(task={"kind": "tabular", "dataset": "heart-disease", "model": {"name": "logreg"},
                              "standardise": "global"}), "task.standardise", "site, federated"),
    (lambda s: s.update(task={"kind": "tabular", "dataset": "heart-disease", "model": {"name": "unet3d"}}),
     "task.model.name", "logreg"),
    (lambda s: s.update(task={"kind": "tabular", "dataset": "diabetes", "model": {"name": "logreg"}}),
     "task.dataset", "heart-disease"),
])
def test_bad_algorithm_gate_and_tabular_fields(tmp_path, mutate, field, words):
    spec = base(tmp_path)
    mutate(spec)
    path = write(tmp_path, spec)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert f"field '{field}'" in str(err.value) and words in str(err.value) and str(path) in str(err.value)


def test_heart_disease_spec_is_valid(monkeypatch):
    monkeypatch.setenv("FEDWARD_DATA", "/data")
    spec = load_spec(REPO / "federations" / "heart-disease.yaml")
    assert spec.task.kind == "tabular" and spec.task.standardise == "federated" and spec.simulation
    assert [s.data for s in spec.sites][0] == Path("/data/heart-disease/processed.cleveland.data")


def test_local_baselines_are_shared_without_dp_and_stay_home_with_it(tmp_path):
    spec = base(tmp_path)
    assert load_spec(write(tmp_path, spec)).local_baselines == "cross_site"
    spec["local_baselines"] = "own_site"
    assert load_spec(write(tmp_path, spec)).local_baselines == "own_site"
    spec.pop("local_baselines")
    spec["task"]["model"]["norm"] = "instance"
    spec["privacy"] = {"mode": "dp-sgd", "noise_multiplier": 1.0}
    assert load_spec(write(tmp_path, spec)).local_baselines == "own_site"  # the default under DP
    spec["local_baselines"] = None  # 'local_baselines:' left empty: the default, not "got None"
    assert load_spec(write(tmp_path, spec)).local_baselines == "own_site"
    spec["local_baselines"] = "cross_site"
    path = write(tmp_path, spec)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: field 'local_baselines' is cross_site")
    assert "without differential privacy" in str(err.value) and "use own_site" in str(err.value)
    spec["local_baselines"] = "everywhere"
    with pytest.raises(SpecError, match="field 'local_baselines'.*cross_site, own_site"):
        load_spec(write(tmp_path, spec))


def test_an_empty_privacy_key_is_refused_not_read_as_no_privacy(tmp_path):
    # once: every line under privacy: commented out gave privacy=None, i.e. a run without DP
    path = write(tmp_path, "\n".join(yaml.safe_dump(base(tmp_path)).splitlines() + ["privacy:", "#  mode: dp-sgd"]) + "\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: field 'privacy' is empty") and "remove the privacy key" in str(err.value)


def test_a_key_given_twice_is_refused_at_its_line(tmp_path):
    # once: the last 'rounds' silently won
    text = yaml.safe_dump(base(tmp_path), sort_keys=False) + "rounds: 7\n"
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    line = text.splitlines().index("rounds: 7") + 1
    assert f"not valid YAML at line {line}" in str(err.value) and "key 'rounds' is given twice" in str(err.value)


@pytest.mark.parametrize("date", ["2026-02-30", "2026-13-01"])
def test_an_impossible_unquoted_date_names_its_field(tmp_path, date):
    # once: PyYAML turned it into a ValueError while parsing and the CLI printed a traceback
    from conftest import site_governance

    spec = base(tmp_path)
    for s in spec["sites"]:
        s["governance"] = site_governance(s["name"])
    text = yaml.safe_dump(spec, sort_keys=False).replace("date: '2026-01-15'", f"date: {date}", 1)
    text = text.replace("date: 2026-01-15", f"date: {date}", 1)
    assert f"date: {date}" in text
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert f"field 'sites[0].governance.dpa.date' must be a date written YYYY-MM-DD, got '{date}'" in str(err.value)


@pytest.mark.parametrize("where", ["name", "site"])
def test_a_name_with_a_trailing_newline_is_refused(tmp_path, where):
    # once: '$' matched before the newline and the annex was written to a file named 'demo\n-annex.md'
    spec = base(tmp_path)
    if where == "name":
        spec["name"] = "demo\n"
    else:
        spec["sites"][0]["name"] = "site-a\n"
    with pytest.raises(SpecError, match="field '(name|sites\\[0\\].name)'"):
        load_spec(write(tmp_path, spec))


def test_unet_channels_have_an_upper_bound(tmp_path):
    spec = base(tmp_path)
    spec["task"]["model"]["channels"] = [100000, 200000, 300000, 400000]
    with pytest.raises(SpecError, match=r"field 'task.model.channels' must be at most 512 per level"):
        load_spec(write(tmp_path, spec))
