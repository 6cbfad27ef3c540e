"""The swap-success model: a ridge regression from a swap's measurements to its measured VQA change.

The calibration table (``calibration.csv``) holds one row per tuned swap: the measurements of
:mod:`mllm_swap.measure` and ``encoder, mode, seed, measured_change, measured_se`` (the swap's VQA accuracy
after a fixed tuning budget minus its control's, tuned the same way from the same seed). The model is ridge
regression on the standardized :data:`FEATURES`, its penalty the one of ``ALPHAS`` with the least
leave-one-swap-out error (a swap's seeds share its measurements: leaving out one row would keep its twin in).
Its honesty check is leave-one-encoder-out (LOEO): every encoder's rows are predicted by a model fitted without
that encoder (penalty chosen inside the fold); the Spearman rank correlation (with a permutation p-value: the
same LOEO on shuffled changes) and mean absolute error of those predictions are reported, beside the error of
predicting the mean and how many changes exceed 2 SE. The interval is a split-conformal one
from the LOEO residuals: ``prediction +- q``, ``q`` the ``ceil((n + 1) * LEVEL)``-th smallest absolute
residual (the largest when ``n`` is too small for that rank, said in ``interval_note``). Calibrated on the
shapes world with tiny models: the numbers say how well measurements rank swaps there, nowhere else.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from align.errors import UserError

FEATURES = ("token_cka", "token_mknn", "llm_input_cosine", "llm_input_cka", "llm_input_mknn",
            "llm_vocab_cosine", "probe_old", "probe_new")  # fmt: skip
KEYS = ("encoder", "mode", "seed", "measured_change", "measured_se")
ALPHAS = tuple(float(a) for a in np.logspace(-2, 3, 11))
LEVEL = 0.9  # the interval's nominal coverage
MIN_ROWS, MIN_ENCODERS = 6, 3
PERMUTATIONS = 100  # shuffles behind the LOEO Spearman's p-value


@dataclass
class Table:
    """A calibration table: ``x [n, len(FEATURES)]``, ``y [n]`` and each row's encoder, mode, seed and SE."""

    x: np.ndarray
    y: np.ndarray
    se: np.ndarray
    encoders: list[str]
    modes: list[str]
    seeds: list[int]
    source: str


def read_table(path: str | os.PathLike) -> Table:
    """Read and check ``calibration.csv``: every key and feature column present, numbers finite, enough rows."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--calibration {path}: no such file (expected a calibration.csv from `mllm-swap calibrate`)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        rows = list(reader)
    missing = [c for c in (*KEYS, *FEATURES) if c not in columns]
    if missing:
        raise UserError(f"--calibration {path}: missing column(s) {missing}; expected {list(KEYS)} and the "
                        f"measurements {list(FEATURES)}; found {columns}")  # fmt: skip

    def number(row: dict, i: int, column: str) -> float:
        try:
            value = float(row[column])
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise UserError(f"--calibration {path}: row {i + 2}, column {column!r}: expected a finite number, "
                            f"found {row[column]!r}")  # fmt: skip
        return value

    x = np.array([[number(r, i, c) for c in FEATURES] for i, r in enumerate(rows)]).reshape(len(rows), len(FEATURES))
    table = Table(x, np.array([number(r, i, "measured_change") for i, r in enumerate(rows)]),
                  np.array([number(r, i, "measured_se") for i, r in enumerate(rows)]),
                  [r["encoder"] for r in rows], [r["mode"] for r in rows],
                  [int(number(r, i, "seed")) for i, r in enumerate(rows)], str(path))  # fmt: skip
    encoders = sorted(set(table.encoders))
    if len(rows) < MIN_ROWS or len(encoders) < MIN_ENCODERS:
        raise UserError(f"--calibration {path}: {len(rows)} row(s) over {len(encoders)} encoder(s); the model needs "
                        f"at least {MIN_ROWS} rows and {MIN_ENCODERS} encoders (leave-one-encoder-out)")  # fmt: skip
    return table


@dataclass
class Ridge:
    """Ridge regression on standardized features (population std; a constant feature is left unscaled)."""

    mean: np.ndarray
    std: np.ndarray
    coef_: np.ndarray
    intercept_: float
    alpha: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, alpha: float) -> Ridge:
        """The closed form ``(ZᵀZ + alpha I)⁻¹ Zᵀ(y - ȳ)`` on ``Z``, the standardized ``x``."""
        mean, std = x.mean(0), x.std(0)
        std = np.where(std > 0, std, 1.0)
        z = (x - mean) / std
        coef = np.linalg.solve(z.T @ z + alpha * np.eye(x.shape[1]), z.T @ (y - y.mean()))
        return cls(mean, std, coef, float(y.mean()), alpha)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predictions for the rows of ``x``."""
        return (x - self.mean) / self.std @ self.coef_ + self.intercept_


def regressor(x: np.ndarray, y: np.ndarray, swaps: np.ndarray) -> Ridge:
    """Ridge with the penalty of :data:`ALPHAS` whose leave-one-swap-out squared error (averaged over swaps) is
    least, the first on a tie. Leave-one-row-out would leave a swap's other seeds, which share its measurements,
    in the fit, and so favour no penalty."""
    groups = sorted(set(swaps))
    best: tuple[float, float] | None = None
    for alpha in ALPHAS:
        errors = [np.mean((Ridge.fit(x[swaps != g], y[swaps != g], alpha).predict(x[swaps == g]) - y[swaps == g]) ** 2)
                  for g in groups]  # fmt: skip
        if best is None or np.mean(errors) < best[0] - 1e-15:
            best = (float(np.mean(errors)), alpha)
    return Ridge.fit(x, y, best[1] if len(groups) > 1 else ALPHAS[0])


def swaps_of(table: Table) -> np.ndarray:
    """Each row's swap (encoder and mode): the rows that share measurements."""
    return np.array([f"{e}\t{m}" for e, m in zip(table.encoders, table.modes, strict=True)])


def leave_one_encoder_out(table: Table, y: np.ndarray | None = None) -> np.ndarray:
    """Each row predicted by a model fitted on the rows of the other encoders (targets ``y``, default the table's)."""
    y = table.y if y is None else y
    groups, swaps = np.array(table.encoders), swaps_of(table)
    out = np.empty_like(y)
    for encoder in sorted(set(table.encoders)):
        held = groups == encoder
        out[held] = regressor(table.x[~held], y[~held], swaps[~held]).predict(table.x[held])
    return out


def permutation_p(table: Table, observed: float | None, permutations: int = PERMUTATIONS, seed: int = 0) -> float | None:
    """How often the LOEO Spearman reaches ``observed`` when the measured changes are shuffled over the rows
    (the whole LOEO refitted each time): ``(1 + hits) / (1 + permutations)``; ``None`` without a correlation."""
    if observed is None:
        return None
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(permutations):
        y = rng.permutation(table.y)
        rho = spearman(leave_one_encoder_out(table, y), y)
        hits += rho is not None and rho >= observed
    return (1 + hits) / (1 + permutations)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (scipy; ties get average ranks); ``None`` when either side is constant."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def conformal_halfwidth(residuals: np.ndarray, level: float = LEVEL) -> tuple[float, str]:
    """Split-conformal half-width from absolute residuals, and a note when ``n`` is too small for ``level``."""
    scores = np.sort(np.abs(residuals))
    rank = math.ceil((len(scores) + 1) * level)
    if rank > len(scores):
        return float(scores[-1]), f"{len(scores)} residuals are too few for {level:.0%} coverage: the largest is used"
    return float(scores[rank - 1]), ""


@dataclass
class Fitted:
    """The model fitted on a whole table, with its LOEO honesty numbers."""

    model: Any
    halfwidth: float
    record: dict[str, Any]

    def predict(self, measurements: dict[str, float | None], where: str) -> tuple[float, list[float]]:
        """(predicted change, ``[lo, hi]``) for one swap's measurements; ``where`` names it in an error."""
        missing = [f for f in FEATURES if measurements.get(f) is None]
        if missing:
            raise UserError(f"{where}: measurement(s) {missing} unavailable; the model needs {list(FEATURES)}")
        value = float(self.model.predict(np.array([[float(measurements[f]) for f in FEATURES]]))[0])
        return value, [value - self.halfwidth, value + self.halfwidth]


def fit(table: Table) -> Fitted:
    """Fit on every row; LOEO predictions give the reported rank correlation, MAE and the interval."""
    model = regressor(table.x, table.y, swaps_of(table))
    loeo = leave_one_encoder_out(table)
    halfwidth, note = conformal_halfwidth(table.y - loeo)
    rho = spearman(loeo, table.y)
    record = {
        "source": table.source,
        "rows": len(table.y),
        "encoders": sorted(set(table.encoders)),
        "modes": sorted(set(table.modes)),
        "seeds": sorted(set(table.seeds)),
        "fit": {
            "model": "ridge on standardized measurements, penalty by leave-one-swap-out error",
            "features": list(FEATURES),
            "alpha": model.alpha,
            "coefficients": {f: float(c) for f, c in zip(FEATURES, model.coef_, strict=True)},
            "intercept": model.intercept_,
        },
        "leave_one_encoder_out": {
            "spearman": rho,
            "spearman_permutation_p": permutation_p(table, rho),
            "mae": float(np.mean(np.abs(loeo - table.y))),
            "mae_predicting_the_mean": float(np.mean(np.abs(table.y - table.y.mean()))),
            "rows_beyond_2se": int(np.sum(np.abs(table.y) > 2 * table.se)),
            "predictions": [float(v) for v in loeo],
        },
        "interval": {"level": LEVEL, "halfwidth": halfwidth, "from": "leave-one-encoder-out residuals "
                     "(split conformal)", **({"note": note} if note else {})},  # fmt: skip
        "range": "calibrated on the shapes world with tiny models and small tuning budgets; not evidence for "
        "real encoders or MLLMs",
    }
    return Fitted(model, halfwidth, record)


def write_table(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``rows`` (each with :data:`KEYS`, the measurements and, when known, both VQA accuracies and the
    change per question kind: ``change_<kind>``) as ``calibration.csv``, atomically."""
    from align.io import atomic_path
    from mllm_swap.measure import NAMES

    path = Path(path)
    kinds = sorted({c for r in rows for c in r if c.startswith("change_")})
    columns = [*KEYS, "vqa", "control_vqa", *kinds, *NAMES]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({c: ("" if r.get(c) is None else r[c]) for c in columns} for r in rows)
    return path
