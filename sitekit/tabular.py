"""A site's tabular data (Fed-Heart-Disease), checked and turned into tensors, and its model.

Each hospital holds one file in the layout of the UCI Heart Disease ``processed.*.data``
files: comma separated, no header, 14 columns, ``?`` for a missing value::

    age, sex, cp, trestbps, chol, fbs, restecg, thalach, exang, oldpeak, slope, ca, thal, num

The split follows FLamby's Fed-Heart-Disease protocol (owkin/FLamby,
``flamby/datasets/fed_heart_disease/dataset.py``) site by site:

* columns 10-12 (slope, ca, thal) are dropped, then every row with a ``?`` left is dropped;
* the target is ``num > 0`` (any disease) as 1.0, else 0.0;
* 66 % train / 34 % test with ``sklearn.model_selection.train_test_split(..., random_state=43,
  shuffle=True)``, stratified on the target when both classes have more than 2 cases.
  On the four UCI files this gives 199 + 172 + 30 + 85 = 486 training cases, as in FLamby.

Where this differs from FLamby:

* FLamby one-hot encodes cp and restecg with ``pd.get_dummies`` on the pooled table. Here every
  value is parsed as a float and a fixed codebook is used at every site, so nothing is pooled:
  cp -> cp_2, cp_3, cp_4 and restecg -> restecg_1, restecg_2, the same 13 features
  (:data:`FEATURE_NAMES`) as FLamby's current code.
* Standardisation, ``standardise=``:
  - ``"site"`` (FLamby's federated protocol): each site uses its OWN training-set mean and
    standard deviation (population std; a constant column keeps std 1 where FLamby divides by
    1e-9), applied to its train and test sets;
  - ``(mean, std)``: one scale for every site, e.g. from :func:`federated_standardisation`
    over the sites' :func:`feature_sums` (a federated statistic: each site shares only its
    count, per-feature sum and sum of squares). FLamby trains its pooled baseline this way but
    tests it on per-site standardised data;
  - ``False``: the raw features.

Everything here runs inside the site's own process; only aggregates (:func:`inspect_site`,
:func:`feature_sums`) are meant to leave it. Error messages name line numbers and column
names, never a patient's values.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sitekit.data import DataError

COLUMNS = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak",
           "slope", "ca", "thal", "num")
N_COLUMNS = len(COLUMNS)  # 14
DROPPED = (10, 11, 12)  # slope, ca, thal: mostly missing outside Cleveland; FLamby drops them
USED = tuple(i for i in range(N_COLUMNS) if i not in DROPPED)
NUMERIC = (0, 1, 3, 4, 5, 7, 8, 9)  # used as they are
CP, RESTECG, TARGET = 2, 6, 13
CP_CODES = (2, 3, 4)  # cp = 1 (typical angina) is the reference category
RESTECG_CODES = (1, 2)  # restecg = 0 (normal) is the reference category
FEATURE_NAMES: tuple[str, ...] = (
    tuple(COLUMNS[i] for i in NUMERIC)
    + tuple(f"cp_{c}" for c in CP_CODES)
    + tuple(f"restecg_{c}" for c in RESTECG_CODES)
)
N_FEATURES = len(FEATURE_NAMES)  # 13
TRAIN_FRACTION = 0.66
MIN_ROWS = 4

assert N_FEATURES == 13


@dataclass
class TabularSplit:
    """One site's train and test arrays.

    ``x = (raw - mean) / std`` column-wise; ``mean``/``std`` are the site's own training-set
    statistics (std 1 for a constant column), or 0 and 1 when ``standardise=False``.
    """

    x_train: np.ndarray  # float32 [n_train, 13]
    y_train: np.ndarray  # float32 [n_train], 1.0 = disease (num > 0)
    x_test: np.ndarray  # float32 [n_test, 13]
    y_test: np.ndarray  # float32 [n_test]
    mean: np.ndarray  # float32 [13]
    std: np.ndarray  # float32 [13]


# --------------------------------------------------------------------------- reading

def _data_file(site: str, path: Path) -> Path:
    """The site's .data file: ``path`` itself, or the only ``*.data`` file in the folder ``path``."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.glob("*.data") if p.is_file())
        if not found:
            raise DataError(f"site '{site}': data folder {path} holds no *.data file; put the site's table there "
                            "(comma separated, 14 columns, '?' for missing) or point the site's 'data' at the file.")
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DataError(f"site '{site}': data folder {path} holds {len(found)} *.data files ({names}) but must "
                            "hold exactly one; point the site's 'data' at the file itself or leave one file there.")
        return found[0]
    if not path.exists():
        raise DataError(f"site '{site}': data file {path} does not exist; fix the site's 'data' path "
                        "in the federation spec.")
    return path


def _read_table(site: str, file: Path) -> tuple[np.ndarray, np.ndarray]:
    """All data rows as float64 [n, 14] (NaN for '?' and for the unused columns), and their line numbers."""
    rows: list[list[float]] = []
    lines: list[int] = []
    try:
        with open(file, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) != N_COLUMNS:
                    raise DataError(
                        f"site '{site}': file {file} line {line} has {len(row)} comma-separated fields but the "
                        f"row must have {N_COLUMNS} columns ({', '.join(COLUMNS)}); re-export the file with all "
                        f"{N_COLUMNS} columns, writing '?' for a missing value."
                    )
                values = [math.nan] * N_COLUMNS
                for col in USED:
                    values[col] = _parse(site, file, line, col, row[col])
                rows.append(values)
                lines.append(line)
    except OSError as exc:
        raise DataError(f"site '{site}': data file {file} cannot be read ({exc.strerror or type(exc).__name__}); "
                        "check the path and the file's permissions.") from None
    except UnicodeDecodeError:
        raise DataError(f"site '{site}': data file {file} is not UTF-8 or ASCII text; re-export it as plain "
                        "comma-separated text.") from None
    except csv.Error:
        raise DataError(f"site '{site}': data file {file} is not valid comma-separated text (line "
                        f"{reader.line_num}); re-export it as plain comma-separated text.") from None
    table = np.asarray(rows, dtype=np.float64).reshape(len(rows), N_COLUMNS)
    return table, np.asarray(lines, dtype=np.int64)


def _parse(site: str, file: Path, line: int, col: int, text: str) -> float:
    """One used cell as a float, NaN for '?'; the value itself never appears in an error."""
    text = text.strip()
    name = COLUMNS[col]
    where = f"site '{site}': file {file} line {line}, column '{name}'"
    if text == "?":
        return math.nan
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # also catches 'nan', 'inf' and the empty string
        raise DataError(f"{where} is not a number; write a number there, or '?' if the value is missing.")
    if col == TARGET and not (value.is_integer() and 0 <= value <= 4):
        raise DataError(f"{where} (the diagnosis) must be an integer 0-4; correct it, or write '?' to leave "
                        "the row out.")
    if col == CP and value not in (1, 2, 3, 4):
        raise DataError(f"{where} (chest-pain type) must be 1, 2, 3 or 4; correct it, or write '?' to leave "
                        "the row out.")
    if col == RESTECG and value not in (0, 1, 2):
        raise DataError(f"{where} (resting ECG) must be 0, 1 or 2; correct it, or write '?' to leave the row out.")
    return value


def _encode(table: np.ndarray) -> np.ndarray:
    """The 13 features of :data:`FEATURE_NAMES` from usable rows of the 14-column table."""
    parts = [table[:, list(NUMERIC)]]
    parts += [(table[:, [CP]] == c) for c in CP_CODES]
    parts += [(table[:, [RESTECG]] == c) for c in RESTECG_CODES]
    return np.concatenate([p.astype(np.float64) for p in parts], axis=1)


@dataclass
class _Site:
    file: Path
    x: np.ndarray  # float64 [n_usable, 13], raw
    y: np.ndarray  # float32 [n_usable]
    train: np.ndarray  # indices into x, file order
    test: np.ndarray
    dropped: int


def _load(site: str, path: Path, seed_split: int) -> _Site:
    from sklearn.model_selection import train_test_split

    file = _data_file(site, path)
    table, _ = _read_table(site, file)
    usable = ~np.isnan(table[:, list(USED)]).any(axis=1)
    n, dropped = int(usable.sum()), int((~usable).sum())
    if n < MIN_ROWS:
        raise DataError(
            f"site '{site}': file {file} has {n} usable rows (rows with no '?' in the columns "
            f"{', '.join(COLUMNS[i] for i in USED)}) but at least {MIN_ROWS} are needed; fill in missing values "
            "or add cases."
        )
    table = table[usable]
    labels = (table[:, TARGET] > 0).astype(np.int64)
    levels = np.unique(labels)
    if len(levels) < 2:
        kind = "diseased (num > 0)" if levels[0] == 1 else "healthy (num = 0)"
        raise DataError(
            f"site '{site}': file {file} column 'num' marks all {n} usable rows as {kind}, but a site needs cases "
            "of both diagnoses; add cases of the other diagnosis or leave the site out of the federation."
        )
    # FLamby's split, verbatim: stratify only when each class has more than 2 cases.
    stratify = labels if all((labels == lev).sum() > 2 for lev in levels) else None
    try:
        train, test = train_test_split(np.arange(n), test_size=1.0 - TRAIN_FRACTION, train_size=TRAIN_FRACTION,
                                       random_state=seed_split, shuffle=True, stratify=stratify)
    except ValueError:
        raise DataError(f"site '{site}': file {file} with {n} usable rows cannot be split "
                        f"{TRAIN_FRACTION:.0%}/{1 - TRAIN_FRACTION:.0%} into train and test; add cases.") from None
    return _Site(file, _encode(table), labels.astype(np.float32), np.sort(train), np.sort(test), dropped)


def _site_scale(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    constant = x_train.max(axis=0) == x_train.min(axis=0)
    return mean, np.where(constant, 1.0, std)


def read_site(site: str, path: Path, seed_split: int = 43, standardise=True) -> TabularSplit:
    """The site's train/test arrays under the FLamby protocol (see the module docstring).

    ``path`` is the site's ``.data`` file or a folder holding exactly one ``*.data`` file.
    ``standardise``: ``True`` or ``"site"`` (the site's own training statistics), a
    ``(mean, std)`` pair of 13 values each (one scale for the federation), or ``False`` (raw).
    Raises :class:`DataError` (one sentence: site, file, field, what to do) on unusable input.
    Note: a site can end up with a single class in its training set (the UCI Switzerland file
    does: all 30 training cases are diseased); that is FLamby's protocol and is not an error.
    """
    s = _load(site, path, seed_split)
    x_train, x_test = s.x[s.train], s.x[s.test]
    if standardise is True or standardise == "site":
        mean, std = _site_scale(x_train)
    elif standardise is False or standardise is None:
        mean, std = np.zeros(N_FEATURES), np.ones(N_FEATURES)
    else:
        mean, std = (np.asarray(v, dtype=np.float64).reshape(-1) for v in standardise)
        if mean.shape != (N_FEATURES,) or std.shape != (N_FEATURES,) or not (std > 0).all():
            raise ValueError(f"standardise must give {N_FEATURES} means and {N_FEATURES} positive stds")
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return TabularSplit(
        x_train=f32((x_train - mean) / std),
        y_train=f32(s.y[s.train]),
        x_test=f32((x_test - mean) / std),
        y_test=f32(s.y[s.test]),
        mean=f32(mean),
        std=f32(std),
    )


MIN_CASES_FOR_SUMS = 10  # a sum over fewer patients says too much about each of them


def feature_sums(site: str, path: Path) -> dict:
    """The site's share of a federated standardisation: count, per-feature sum and sum of squares
    of its raw training features. Aggregates only; refused below :data:`MIN_CASES_FOR_SUMS` cases."""
    s = _load(site, path, 43)
    x = s.x[s.train]
    if len(x) < MIN_CASES_FOR_SUMS:
        raise DataError(f"site '{site}': file {s.file} has {len(x)} training cases, too few to share feature sums "
                        f"(at least {MIN_CASES_FOR_SUMS}); set task.standardise to site for this federation or add cases.")
    return {"n": int(len(x)), "sum": [float(v) for v in x.sum(axis=0)],
            "sum_sq": [float(v) for v in (x * x).sum(axis=0)]}


def federated_standardisation(shares: list[dict]) -> tuple[list[float], list[float]]:
    """One mean and (population) std per feature from the sites' :func:`feature_sums`.

    Equal to the statistics of the pooled training data, computed without pooling any row.
    A feature constant across the federation keeps std 1."""
    if not shares:
        raise ValueError("no site shares to combine")
    n = sum(int(s["n"]) for s in shares)
    total = np.sum([np.asarray(s["sum"], dtype=np.float64) for s in shares], axis=0)
    total_sq = np.sum([np.asarray(s["sum_sq"], dtype=np.float64) for s in shares], axis=0)
    mean = total / n
    var = np.maximum(total_sq / n - mean * mean, 0.0)
    std = np.sqrt(var)
    std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return [float(v) for v in mean], [float(v) for v in std]


def inspect_site(site: str, path: Path) -> dict:
    """Check the site's file and return aggregate counts only (safe to leave the site).

    ``positive_fraction`` is the fraction of training cases with disease (num > 0);
    ``dropped_rows`` counts rows left out for a '?' in a used column.
    """
    s = _load(site, path, 43)
    return {
        "train_cases": int(len(s.train)),
        "test_cases": int(len(s.test)),
        "positive_fraction": float(s.y[s.train].astype(np.float64).mean()),
        "dropped_rows": s.dropped,
    }


class TabularSet(torch.utils.data.Dataset):
    """One split of a site, standardised as ``standardise`` says (see :func:`read_site`).

    Items are ``(x, y)``: x float32 [13], y float32 [1].
    """

    def __init__(self, site: str, path: Path, split: str, standardise="site"):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        self.site, self.split = site, split
        data = read_site(site, path, standardise=standardise)
        x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
        self.x = torch.from_numpy(x)
        self.y = torch.from_numpy(y).reshape(-1, 1)
        self.mean, self.std = data.mean, data.std

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[idx], self.y[idx]


# --------------------------------------------------------------------------- model

class LogReg(torch.nn.Module):
    """Logistic regression (FLamby's Fed-Heart-Disease baseline) returning logits [B, 1].

    State-dict keys: ``linear.weight`` [1, 13] and ``linear.bias`` [1].
    """

    def __init__(self, n_features: int = N_FEATURES):
        super().__init__()
        self.linear = torch.nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def build_logreg(seed: int | None = None) -> torch.nn.Module:
    """A fresh :class:`LogReg`; with ``seed`` its initial weights are reproducible (the global RNG is untouched)."""
    if seed is None:
        return LogReg()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LogReg()


def bce_loss() -> torch.nn.Module:
    """Binary cross-entropy on logits (FLamby uses sigmoid + BCELoss; this is the same, numerically safer)."""
    return torch.nn.BCEWithLogitsLoss()


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample correctness, shape (B,): 1.0 where (logit > 0) agrees with (y > 0.5)."""
    logits, y = logits.reshape(-1), y.reshape(-1)
    if logits.shape != y.shape:
        raise ValueError(f"logits ({logits.numel()} values) and targets ({y.numel()} values) differ in size")
    return ((logits > 0) == (y > 0.5)).float()
