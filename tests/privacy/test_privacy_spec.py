"""The spec's privacy section and the classification task: one sentence naming the file and the field."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sitekit.spec import PrivacySpec, SpecError, load_spec

REPO = Path(__file__).resolve().parents[2]


def base(tmp_path, privacy=None, **top) -> dict:
    for s in ("a", "b"):
        (tmp_path / s).mkdir(exist_ok=True)
    spec = {"name": "xray", "task": {"kind": "classification", "model": {"name": "cnn2d"}, "input_size": [28, 28]},
            "sites": [{"name": "site-a", "data": "a"}, {"name": "site-b", "data": "b"}],
            "rounds": 3, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.001, **top}
    if privacy is not None:
        spec["privacy"] = privacy
    return spec


def write(tmp_path, spec) -> Path:
    p = tmp_path / "fed.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_dp_sgd_defaults_and_the_classification_task(tmp_path):
    spec = load_spec(write(tmp_path, base(tmp_path, {"mode": "dp-sgd", "noise_multiplier": 1.1})))
    assert spec.privacy == PrivacySpec(mode="dp-sgd", clip=1.0, noise_multiplier=1.1, target_epsilon=None, delta=None,
                                       noise_at="site", accountant="rdp")
    assert spec.task.kind == "classification" and spec.task.metric == "auc" and spec.task.loss == "bce"
    assert spec.task.model.channels == (16, 32, 32) and spec.task.input_size == (28, 28)
    assert load_spec(write(tmp_path, base(tmp_path))).privacy is None


def test_client_dp_and_a_derived_noise_multiplier(tmp_path):
    spec = load_spec(write(tmp_path, base(tmp_path, {"mode": "client-dp", "clip_norm": 0.5, "target_epsilon": 6,
                                                     "delta": 1.0e-5, "accountant": "prv"})))
    p = spec.privacy
    assert (p.mode, p.clip, p.noise_multiplier, p.target_epsilon, p.delta, p.noise_at, p.accountant) == \
        ("client-dp", 0.5, None, 6.0, 1e-5, "server", "prv")


def test_example_specs_are_valid():
    pneumonia = load_spec(REPO / "federations" / "pneumonia-dp.yaml")
    assert pneumonia.privacy.mode == "dp-sgd" and pneumonia.privacy.target_epsilon == 8 and pneumonia.privacy.delta == 1e-5
    ixi = load_spec(REPO / "federations" / "ixi-brain-dp.yaml")
    assert ixi.privacy.mode == "dp-sgd" and ixi.task.kind == "segmentation"


@pytest.mark.parametrize("privacy, field, words", [
    ({"noise_multiplier": 1.0}, "privacy.mode", "is missing"),
    ({"mode": "dp", "noise_multiplier": 1.0}, "privacy.mode", "dp-sgd, client-dp"),
    ({"mode": "dp-sgd"}, "privacy.noise_multiplier", "privacy.target_epsilon for fedward to derive it"),
    ({"mode": "dp-sgd", "noise_multiplier": 0}, "privacy.noise_multiplier", "remove the privacy section"),
    ({"mode": "dp-sgd", "noise_multiplier": "1"}, "privacy.noise_multiplier", "must be a number"),
    ({"mode": "dp-sgd", "noise_multiplier": 1, "delta": "1e-5"}, "privacy.delta", "write 0.001 or 1.0e-3"),
    ({"mode": "dp-sgd", "noise_multiplier": 1, "delta": 1.5}, "privacy.delta", "between 0 and 1"),
    ({"mode": "dp-sgd", "noise_multiplier": 1, "target_epsilon": -2}, "privacy.target_epsilon", "greater than 0"),
    ({"mode": "dp-sgd", "noise_multiplier": 1, "max_grad_norm": 0}, "privacy.max_grad_norm", "greater than 0"),
    ({"mode": "dp-sgd", "noise_multiplier": 1, "clip_norm": 1}, "privacy.clip_norm", "client-dp only"),
    ({"mode": "dp-sgd", "noise_multiplier": 1, "noise_at": "server"}, "privacy.noise_at", "must be site"),
    ({"mode": "dp-sgd", "noise_multiplier": 1, "accountant": "gdp"}, "privacy.accountant", "rdp, prv"),
    ({"mode": "dp-sgd", "noise_multipler": 1}, "privacy.noise_multipler", "did you mean 'noise_multiplier'"),
    ({"mode": "client-dp", "noise_multiplier": 1, "delta": 1.0e-5}, "privacy.clip_norm", "is missing"),
    ({"mode": "client-dp", "noise_multiplier": 1, "clip_norm": 1}, "privacy.delta", "protects whole sites"),
    ({"mode": "client-dp", "noise_multiplier": 1, "clip_norm": 1, "delta": 1.0e-5, "max_grad_norm": 1},
     "privacy.max_grad_norm", "dp-sgd only"),
    ({"mode": "client-dp", "noise_multiplier": 1, "clip_norm": 1, "delta": 1.0e-5, "noise_at": "cloud"},
     "privacy.noise_at", "server, site"),
    ("dp-sgd", "privacy", "must be a mapping"),
])
def test_bad_privacy_field_names_file_and_field(tmp_path, privacy, field, words):
    path = write(tmp_path, base(tmp_path, privacy))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    msg = str(err.value)
    assert str(path) in msg and f"field '{field}'" in msg and words in msg
    assert msg.count(". ") <= 1 and "\n" not in msg  # one sentence


def test_privacy_rules_that_depend_on_the_rest_of_the_spec(tmp_path):
    client = {"mode": "client-dp", "noise_multiplier": 1, "clip_norm": 1, "delta": 1.0e-5}
    with pytest.raises(SpecError, match="field 'algorithm'.*control variate"):
        load_spec(write(tmp_path, base(tmp_path, client, algorithm="scaffold")))
    seg = base(tmp_path, {"mode": "dp-sgd", "noise_multiplier": 1})
    seg["task"] = {"model": {"name": "unet3d", "norm": "batch"}}
    with pytest.raises(SpecError, match="field 'task.model.norm'.*per-example gradients"):
        load_spec(write(tmp_path, seg))


@pytest.mark.parametrize("task, field, words", [
    ({"kind": "classification", "model": {"name": "unet3d"}}, "task.model.name", "must be cnn2d"),
    ({"kind": "classification", "model": {"name": "cnn2d", "channels": [8, 16]}}, "task.model.channels", "3 entries"),
    ({"kind": "classification", "model": {"name": "cnn2d"}, "input_size": [30, 28]}, "task.input_size[0]", "multiple of 4"),
    ({"kind": "classification", "model": {"name": "cnn2d"}, "input_size": [28, 28, 28]}, "task.input_size", "2 entries"),
    ({"kind": "classification", "model": {"name": "cnn2d"}, "metric": "dice"}, "task.metric", "auc"),
    ({"kind": "classification", "model": {"name": "cnn2d"}, "dataset": "heart-disease"}, "task.dataset", "train.npz"),
])
def test_bad_classification_task(tmp_path, task, field, words):
    spec = base(tmp_path)
    spec["task"] = task
    path = write(tmp_path, spec)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(path) in str(err.value) and f"field '{field}'" in str(err.value) and words in str(err.value)


def test_sweep_levels_keep_local_models_at_home_even_without_dp(tmp_path):
    # the sweep's level without DP once fell back to cross_site and shipped every site's local model
    from flows.privacy_sweep import level_spec

    path = write(tmp_path, base(tmp_path, {"mode": "dp-sgd", "noise_multiplier": 1.0, "target_epsilon": 8}))
    spec, raw = load_spec(path), yaml.safe_load(path.read_text())
    plain = load_spec(level_spec(spec, raw, 0, tmp_path / "levels"))
    noisy = load_spec(level_spec(spec, raw, 2.0, tmp_path / "levels"))
    assert plain.privacy is None and plain.local_baselines == "own_site"
    assert noisy.privacy.noise_multiplier == 2.0 and noisy.privacy.target_epsilon is None and noisy.local_baselines == "own_site"
