"""SnakeCLEF 2023/2024 scores: macro-F1, accuracy, venom error rates, Track 1 and Track 2.

Scoring is per observation. Among wrong predictions only, an error is counted by
whether the true and the predicted species are venomous (in the venomous status
list, ``MIVS == 1``):

- ``e00``: harmless species predicted as another harmless species,
- ``e01``: harmless species predicted as a venomous species,
- ``e10``: venomous species predicted as a harmless species,
- ``e11``: venomous species predicted as another venomous species.

A predicted class id that is not in the venomous list counts as harmless.
``p00``/``p01`` are percentages of the observations with a harmless true class,
``p10``/``p11`` percentages of those with a venomous true class.

Track 1 (higher is better, 100 at best) and Track 2 (lower is better, 0 at best)
follow the organisers' ``evaluate.py`` for SnakeCLEF 2023 (BohemianVRA,
FGVC-Competitions), including its rounding to 2 decimals. This module imports
no other project module, so anyone can score a submission with it alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score

logger = logging.getLogger(__name__)

# Class id of an observation whose species is unknown; left out of the rate denominators.
UNKNOWN_CLASS_ID = -1

# Weights of macro-F1 and of (100 - p00), (100 - p01), (100 - p10), (100 - p11) in Track 1.
TRACK1_WEIGHTS = (1, 1, 2, 5, 2)
# Weights of e00, e01, e10, e11 in Track 2.
TRACK2_WEIGHTS = (1, 2, 5, 2)

REQUIRED_COLUMNS = ("observation_id", "class_id")
MAX_LISTED_IDS = 10


class SubmissionError(ValueError):
    """A submission or ground truth that cannot be scored: missing columns, invalid or mismatched ids."""


def read_venomous_class_ids(path: str | os.PathLike) -> set[int]:
    """Read the class ids of venomous species from a CSV with ``class_id`` and ``MIVS`` or ``venomous`` (0/1)."""
    table = pd.read_csv(path, encoding="utf-8-sig")
    flag_column = next((name for name in ("MIVS", "venomous") if name in table.columns), None)
    if "class_id" not in table.columns or flag_column is None:
        raise ValueError(
            f"Venomous status list {str(path)!r} has columns {list(table.columns)}; expected `class_id` and one of "
            "`MIVS` or `venomous` (1 = venomous, 0 = harmless). Pass the SnakeCLEF venomous_status_list.csv "
            "or a CSV with those columns."
        )

    class_ids = _integer_column(table["class_id"], label=f"`class_id` in {str(path)!r}")
    flags = pd.to_numeric(table[flag_column], errors="coerce")
    invalid = ~flags.isin([0, 1])
    if invalid.any():
        rows = _format_ids(np.flatnonzero(invalid.to_numpy()) + 2)
        raise ValueError(
            f"Venomous status list {str(path)!r} has `{flag_column}` values other than 0 or 1 on CSV line(s) "
            f"{rows}. Fix those rows so that each is 0 (harmless) or 1 (venomous)."
        )

    venomous = set(class_ids[flags.to_numpy() == 1].tolist())
    logger.info("Read %d venomous of %d classes from %s (column %s)", len(venomous), len(table), path, flag_column)
    return venomous


def track1_score(f1: float, p00: float, p01: float, p10: float, p11: float) -> float:
    """Combine macro-F1 and the four error rates (all in percent) into Track 1, rounded to 2 decimals."""
    weights = TRACK1_WEIGHTS
    weighted = (
        weights[0] * f1
        + weights[1] * (100 - p00)
        + weights[2] * (100 - p01)
        + weights[3] * (100 - p10)
        + weights[4] * (100 - p11)
    )
    return _round2(weighted / sum(weights))


def track2_cost(e00: int, e01: int, e10: int, e11: int) -> int:
    """Combine the four error counts into the Track 2 cost."""
    weights = TRACK2_WEIGHTS
    return int(weights[0] * e00 + weights[1] * e01 + weights[2] * e10 + weights[3] * e11)


def count_venom_errors(true_class_ids: np.ndarray, predicted_class_ids: np.ndarray, venomous_class_ids: Iterable[int]) -> dict[str, int]:
    """Count the wrong predictions by venomous status of the true and predicted class: ``e00, e01, e10, e11``."""
    venomous_ids = np.fromiter(venomous_class_ids, dtype=np.int64)
    true_venomous = np.isin(true_class_ids, venomous_ids)
    predicted_venomous = np.isin(predicted_class_ids, venomous_ids)
    wrong = true_class_ids != predicted_class_ids

    # NOTE: like the organisers' code, a wrong prediction for an unknown (-1) true class
    # counts in e00 or e01 although -1 is left out of the harmless denominator.
    return {
        "e00": int(np.sum(wrong & ~true_venomous & ~predicted_venomous)),
        "e01": int(np.sum(wrong & ~true_venomous & predicted_venomous)),
        "e10": int(np.sum(wrong & true_venomous & ~predicted_venomous)),
        "e11": int(np.sum(wrong & true_venomous & predicted_venomous)),
    }


def venom_confusion(true_class_ids: np.ndarray, predicted_class_ids: np.ndarray, venomous_class_ids: Iterable[int]) -> dict[str, dict[str, int]]:
    """Count all observations, right and wrong, by venomous status of the true (outer key) and predicted class."""
    venomous_ids = np.fromiter(venomous_class_ids, dtype=np.int64)
    true_venomous = np.isin(true_class_ids, venomous_ids)
    predicted_venomous = np.isin(predicted_class_ids, venomous_ids)
    known = true_class_ids != UNKNOWN_CLASS_ID

    confusion = {}
    for true_name, true_mask in (("harmless", known & ~true_venomous), ("venomous", true_venomous)):
        confusion[f"true_{true_name}"] = {
            "predicted_harmless": int(np.sum(true_mask & ~predicted_venomous)),
            "predicted_venomous": int(np.sum(true_mask & predicted_venomous)),
        }
    return confusion


def score_predictions(true_class_ids: np.ndarray, predicted_class_ids: np.ndarray, venomous_class_ids: Iterable[int]) -> dict:
    """Score aligned arrays of true and predicted class ids, one entry per observation."""
    true_class_ids = np.asarray(true_class_ids, dtype=np.int64)
    predicted_class_ids = np.asarray(predicted_class_ids, dtype=np.int64)
    if true_class_ids.shape != predicted_class_ids.shape or true_class_ids.ndim != 1:
        raise ValueError(
            f"Expected two 1-D arrays of equal length, got shapes {true_class_ids.shape} and {predicted_class_ids.shape}."
        )
    if true_class_ids.size == 0:
        raise SubmissionError("Nothing to score: there are no observations. Check that the ground truth has rows.")
    venomous_class_ids = set(venomous_class_ids)

    venomous_ids = np.fromiter(venomous_class_ids, dtype=np.int64)
    is_venomous = np.isin(true_class_ids, venomous_ids)
    n_unknown = int(np.sum(true_class_ids == UNKNOWN_CLASS_ID))
    n_venomous = int(np.sum(is_venomous))
    n_harmless = int(true_class_ids.size - n_venomous - n_unknown)

    errors = count_venom_errors(true_class_ids, predicted_class_ids, venomous_class_ids)
    rates = {
        "p00": _percent(errors["e00"], n_harmless),
        "p01": _percent(errors["e01"], n_harmless),
        "p10": _percent(errors["e10"], n_venomous),
        "p11": _percent(errors["e11"], n_venomous),
    }
    f1 = _round2(f1_score(true_class_ids, predicted_class_ids, average="macro", zero_division=0) * 100)
    accuracy = _round2(accuracy_score(true_class_ids, predicted_class_ids) * 100)

    return {
        "f1": f1,
        "accuracy": accuracy,
        "track1": track1_score(f1, **rates),
        "track2": track2_cost(**errors),
        **errors,
        **rates,
        "n_observations": int(true_class_ids.size),
        "n_correct": int(np.sum(true_class_ids == predicted_class_ids)),
        "n_harmless": n_harmless,
        "n_venomous": n_venomous,
        "n_unknown": n_unknown,
        "n_true_classes": int(np.unique(true_class_ids).size),
        "venom_confusion": venom_confusion(true_class_ids, predicted_class_ids, venomous_class_ids),
    }


def score_submission(submission: pd.DataFrame, ground_truth: pd.DataFrame, venomous_class_ids: set[int]) -> dict:
    """Score a submission (one row per observation) against the ground truth with the SnakeCLEF metrics.

    Both frames have ``observation_id`` and ``class_id``. The ground truth may
    have one row per image: rows of one observation must agree on the class and
    are reduced to one. Raises :class:`SubmissionError` when the submission's
    observation ids are missing, extra or duplicated.
    """
    truth = reduce_ground_truth(ground_truth)
    predictions = check_submission(submission, truth)
    merged = truth.merge(predictions, on="observation_id", how="left", suffixes=("_true", "_predicted"), validate="one_to_one")
    return score_predictions(merged["class_id_true"].to_numpy(), merged["class_id_predicted"].to_numpy(), venomous_class_ids)


def reduce_ground_truth(ground_truth: pd.DataFrame) -> pd.DataFrame:
    """Reduce ground truth to one ``observation_id, class_id`` row per observation (int64 columns)."""
    _require_columns(ground_truth, "Ground truth")
    if ground_truth.empty:
        raise SubmissionError("Ground truth has no rows: nothing to score. Check the ground-truth file and its split.")

    truth = pd.DataFrame(
        {
            "observation_id": _integer_column(ground_truth["observation_id"], label="ground-truth `observation_id`"),
            "class_id": _integer_column(ground_truth["class_id"], label="ground-truth `class_id`"),
        }
    ).drop_duplicates()

    conflicting = truth.loc[truth["observation_id"].duplicated(), "observation_id"].unique()
    if conflicting.size:
        raise SubmissionError(
            f"Ground truth gives more than one class_id for {conflicting.size} observation(s): "
            f"{_format_ids(conflicting)}. Each observation must have one species; fix those rows."
        )
    return truth.reset_index(drop=True)


def check_submission(submission: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Validate a submission against reduced ground truth; return its ``observation_id, class_id`` as int64."""
    _require_columns(submission, "Submission")
    predictions = pd.DataFrame(
        {
            "observation_id": _integer_column(submission["observation_id"], label="submission `observation_id`"),
            "class_id": _integer_column(submission["class_id"], label="submission `class_id`"),
        }
    )

    submitted = predictions["observation_id"]
    duplicated = submitted[submitted.duplicated()].unique()
    missing = truth.loc[~truth["observation_id"].isin(submitted), "observation_id"].to_numpy()
    extra = submitted[~submitted.isin(truth["observation_id"])].unique()

    problems = []
    if missing.size:
        problems.append(f"{missing.size} observation(s) of the ground truth are missing: {_format_ids(missing)}")
    if extra.size:
        problems.append(f"{extra.size} observation id(s) are not in the ground truth: {_format_ids(extra)}")
    if duplicated.size:
        problems.append(f"{duplicated.size} observation id(s) appear more than once: {_format_ids(duplicated)}")
    if problems:
        raise SubmissionError(
            f"Submission has {len(submission)} rows for {len(truth)} ground-truth observations, and "
            + "; ".join(problems)
            + ". A submission needs exactly one row per ground-truth observation."
        )
    return predictions


def _require_columns(table: pd.DataFrame, name: str) -> None:
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise SubmissionError(
            f"{name} is missing column(s) {missing}; it has {list(table.columns)}. "
            f"Expected at least {list(REQUIRED_COLUMNS)}."
        )


def _integer_column(values: pd.Series, *, label: str) -> np.ndarray:
    """Convert a column to int64, raising with the offending row numbers when a value is null or not an integer."""
    numbers = pd.to_numeric(values, errors="coerce")
    invalid = numbers.isna() | (numbers.notna() & (numbers != np.round(numbers)))
    if invalid.any():
        positions = np.flatnonzero(invalid.to_numpy())
        examples = values.iloc[positions[:MAX_LISTED_IDS]].tolist()
        raise SubmissionError(
            f"{label} has {positions.size} value(s) that are missing or not integers, at row(s) "
            f"{_format_ids(positions)} (0-based): {examples}. Every row needs an integer id."
        )
    return numbers.to_numpy().astype(np.int64)


def _format_ids(ids: Iterable) -> str:
    ids = list(ids)
    listed = ", ".join(str(value) for value in ids[:MAX_LISTED_IDS])
    return listed + (f", ... ({len(ids) - MAX_LISTED_IDS} more)" if len(ids) > MAX_LISTED_IDS else "")


def _percent(count: int, total: int) -> float:
    # NOTE: the organisers' code divides by zero when a set has no harmless or no
    # venomous observation. Here the rate is 0 instead. Only wrong predictions for
    # unknown (-1) true classes can then still add to e00 or e01.
    if total == 0:
        return 0.0
    return _round2(count / total * 100)


def _round2(value: float) -> float:
    # np.round, not round(): the organisers' code uses it, and the two differ on some halves.
    return float(np.round(value, 2))
