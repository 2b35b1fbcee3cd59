"""One interface over the task kinds a federation can train, so the training loop, the OpenFL
task runner, the baselines and the evaluation never branch on the kind of data.

- ``segmentation``: 3D brain-mask segmentation on NIfTI volumes (:mod:`sitekit.data`), MONAI UNet, Dice.
- ``tabular``: a site's table (e.g. UCI heart disease, :mod:`sitekit.tabular`), logistic regression, accuracy.

Every method runs inside a site's process and reads only that site's data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sitekit.spec import TaskSpec


@dataclass(frozen=True)
class Task:
    spec: TaskSpec

    @property
    def metric(self) -> str:
        return self.spec.metric

    def inspect(self, site: str, path: Path) -> dict:
        """Aggregate counts only (train_cases, test_cases, ...); raises DataError on the first problem."""
        if self.spec.kind == "tabular":
            from sitekit import tabular

            return tabular.inspect_site(site, Path(path))
        from dataclasses import asdict

        from sitekit.data import inspect_site

        return asdict(inspect_site(site, Path(path)))

    def dataset(self, site: str, path: Path, split: str) -> torch.utils.data.Dataset:
        if self.spec.kind == "tabular":
            from sitekit import tabular

            return tabular.TabularSet(site, Path(path), split, standardise=self._tabular_scale())
        from sitekit.data import SiteVolumes

        return SiteVolumes(site, Path(path), split, tuple(self.spec.input_size))

    def _tabular_scale(self):
        if self.spec.standardise == "site":
            return "site"
        if self.spec.feature_stats is None:
            raise RuntimeError("task.standardise is federated but no federated statistics were computed; "
                               "the federated-training flow computes them from the sites' feature sums before the plan")
        return self.spec.feature_stats

    def feature_sums(self, site: str, path: Path) -> dict:
        """Tabular, federated standardisation: this site's count, sums and sums of squares (aggregates only)."""
        from sitekit import tabular

        return tabular.feature_sums(site, Path(path))

    def build_model(self, seed: int | None = None) -> torch.nn.Module:
        if self.spec.kind == "tabular":
            from sitekit import tabular

            return tabular.build_logreg(seed)
        from sitekit.model import build_model

        return build_model(self.spec, seed)

    def loss(self) -> torch.nn.Module:
        if self.spec.kind == "tabular":
            from sitekit import tabular

            return tabular.bce_loss()
        from sitekit.model import build_loss

        return build_loss(self.spec)

    def score(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample metric, shape (B,): Dice per volume or correctness per patient."""
        if self.spec.kind == "tabular":
            from sitekit import tabular

            return tabular.accuracy(logits, target)
        from sitekit.model import dice_score

        return dice_score(logits, target)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, dataset, batch_size: int = 2) -> float:
        """Mean per-sample metric over a dataset (Dice per case, or accuracy)."""
        model.eval()
        scores = [self.score(model(x), y) for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size)]
        # float64: a mean of float32 scores drifts by ~1e-7, enough to break a tie between two models
        return float(torch.cat(scores).double().mean())


def get_task(spec: TaskSpec) -> Task:
    return Task(spec)
