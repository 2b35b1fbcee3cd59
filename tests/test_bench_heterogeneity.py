"""bench/heterogeneity.py helpers (the bench itself runs real federations and is not a test)."""
import importlib.util

from conftest import REPO

_spec = importlib.util.spec_from_file_location("heterogeneity", REPO / "bench" / "heterogeneity.py")
heterogeneity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(heterogeneity)


def test_spec_file_name_stays_short_when_the_task_changes():
    # Regression: FedBN's run changes the whole task mapping, which became a 300-character file name
    # ("File name too long") and stopped the ixi-brain bench after five runs.
    task = {"model": {"name": "unet3d", "channels": [8, 16, 32, 64], "norm": "instance_affine"}, "input_size": [64] * 3}
    name = heterogeneity.spec_file_name({"algorithm": "fedbn", "seed": 0, "task": task})
    assert name == "fedbn-0-task"
    assert heterogeneity.spec_file_name({"task": task, "algorithm": "fedavg", "seed": 2}) == "task-fedavg-2"
