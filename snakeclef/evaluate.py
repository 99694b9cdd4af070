"""Evaluation report of a submission: SnakeCLEF metrics, per-species scores, venom confusion, a confusion-matrix plot.

Command line::

    python -m snakeclef.evaluate --submission submission.csv --ground-truth val.csv \\
        --venomous-list venomous_status_list.csv [--output metrics.json] [--output-dir report/]

prints the metrics as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_fscore_support

from snakeclef.metrics import (
    SubmissionError,
    check_submission,
    read_venomous_class_ids,
    reduce_ground_truth,
    score_predictions,
    score_submission,
)
from snakeclef.storage import atomic_path

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PER_SPECIES_FILE = "per_species.csv"
VENOM_CONFUSION_FILE = "venom_confusion.csv"
CONFUSION_MATRIX_PLOT = "confusion_matrix.png"


def write_evaluation(
    submission_csv: str | os.PathLike,
    ground_truth_csv: str | os.PathLike,
    venomous_list_csv: str | os.PathLike,
    *,
    output_dir: str | os.PathLike,
    plots_dir: str | os.PathLike | None = None,
    top_species: int = 20,
) -> dict:
    """Score a submission and write the evaluation report into ``output_dir``; return the metrics.

    Writes ``per_species.csv``, ``venom_confusion.csv``, ``plots_dir/confusion_matrix.png``
    (``plots_dir`` defaults to ``output_dir/plots``) and finally ``metrics.json``, so a
    report with ``metrics.json`` is complete.
    """
    if top_species < 1:
        raise ValueError(f"top_species must be at least 1, got {top_species}.")
    started = time.perf_counter()
    output_dir = Path(output_dir)
    plots_dir = output_dir / "plots" if plots_dir is None else Path(plots_dir)

    submission = read_table(submission_csv, label="Submission")
    ground_truth = read_table(ground_truth_csv, label="Ground truth")
    venomous_class_ids = read_venomous_class_ids(_require_file(venomous_list_csv, label="Venomous status list"))

    truth = reduce_ground_truth(ground_truth)
    predictions = check_submission(submission, truth)
    merged = truth.merge(predictions, on="observation_id", suffixes=("_true", "_predicted"), validate="one_to_one")
    true_class_ids = merged["class_id_true"].to_numpy()
    predicted_class_ids = merged["class_id_predicted"].to_numpy()
    metrics = score_predictions(true_class_ids, predicted_class_ids, venomous_class_ids)

    species_names = collect_species_names(ground_truth, read_table(venomous_list_csv, label="Venomous status list"))
    per_species = per_species_scores(true_class_ids, predicted_class_ids, venomous_class_ids, species_names)
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(output_dir / PER_SPECIES_FILE) as tmp:
        per_species.to_csv(tmp, index=False)
    with atomic_path(output_dir / VENOM_CONFUSION_FILE) as tmp:
        venom_confusion_table(metrics["venom_confusion"]).to_csv(tmp)

    plot_path = plots_dir / CONFUSION_MATRIX_PLOT
    figure = plot_confusion_matrix(true_class_ids, predicted_class_ids, species_names, venomous_class_ids, top_species=top_species)
    _save_png(figure, plot_path, title=_metrics_title(metrics))

    report = {
        **metrics,
        "submission": str(submission_csv),
        "ground_truth": str(ground_truth_csv),
        "venomous_list": str(venomous_list_csv),
        "per_species": PER_SPECIES_FILE,
        "venom_confusion_table": VENOM_CONFUSION_FILE,
        # Relative to output_dir when inside it, so the report stays valid after the folder is moved.
        "confusion_matrix_plot": _relative_to(plot_path, output_dir),
    }
    with atomic_path(output_dir / METRICS_FILE) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    logger.info(
        "Evaluated %d observations in %.1f s: track1=%.2f track2=%d f1=%.2f; report in %s",
        metrics["n_observations"], time.perf_counter() - started, metrics["track1"], metrics["track2"], metrics["f1"], output_dir,
    )
    return report


def read_table(path: str | os.PathLike, *, label: str) -> pd.DataFrame:
    """Read a CSV (or a ``.tsv``) with an optional UTF-8 byte order mark."""
    path = _require_file(path, label=label)
    separator = "\t" if str(path).endswith(".tsv") else ","
    try:
        return pd.read_csv(path, sep=separator, encoding="utf-8-sig")
    except pd.errors.EmptyDataError as error:
        raise SubmissionError(f"{label} file {str(path)!r} is empty; expected a header with observation_id,class_id.") from error


def collect_species_names(*tables: pd.DataFrame) -> dict[int, str]:
    """Map class_id to binomial_name from every table that has both columns; earlier tables win."""
    names: dict[int, str] = {}
    for table in tables:
        if not {"class_id", "binomial_name"} <= set(table.columns):
            continue
        pairs = table[["class_id", "binomial_name"]].dropna().drop_duplicates("class_id")
        for class_id, name in zip(pairs["class_id"], pairs["binomial_name"]):
            names.setdefault(int(class_id), str(name))
    return names


def per_species_scores(
    true_class_ids: np.ndarray,
    predicted_class_ids: np.ndarray,
    venomous_class_ids: set[int],
    species_names: dict[int, str],
) -> pd.DataFrame:
    """Precision, recall and F1 per class over true and predicted classes, most frequent true class first.

    A class that is only predicted has support 0 and F1 0, as in the macro-F1.
    """
    labels = np.union1d(true_class_ids, predicted_class_ids)
    precision, recall, f1, support = precision_recall_fscore_support(
        true_class_ids, predicted_class_ids, labels=labels, zero_division=0
    )
    predicted_counts = pd.Series(predicted_class_ids).value_counts()
    table = pd.DataFrame(
        {
            "class_id": labels,
            "binomial_name": [species_names.get(int(class_id)) for class_id in labels],
            "venomous": [int(class_id) in venomous_class_ids for class_id in labels],
            "support": support,
            "predicted": predicted_counts.reindex(labels, fill_value=0).to_numpy(),
            "precision": precision.round(4),
            "recall": recall.round(4),
            "f1": f1.round(4),
        }
    )
    if not species_names:
        table = table.drop(columns="binomial_name")
    return table.sort_values(["support", "class_id"], ascending=[False, True], ignore_index=True)


def venom_confusion_table(confusion: dict[str, dict[str, int]]) -> pd.DataFrame:
    """Arrange the 2x2 venom confusion counts as a table: rows are true status, columns predicted status."""
    return pd.DataFrame.from_dict(confusion, orient="index").rename_axis("true_status")


def plot_confusion_matrix(
    true_class_ids: np.ndarray,
    predicted_class_ids: np.ndarray,
    species_names: dict[int, str],
    venomous_class_ids: set[int],
    *,
    top_species: int = 20,
) -> Figure:
    """Plot the row-normalised confusion matrix of the ``top_species`` most frequent true classes.

    Columns are the same classes plus "other" for predictions outside them; cells show counts.
    """
    top, counts = top_species_confusion(true_class_ids, predicted_class_ids, top_species=top_species)
    recall_share = counts / counts.sum(axis=1, keepdims=True)

    labels = [_species_label(int(class_id), species_names, venomous_class_ids) for class_id in top]
    size = 3 + 0.45 * len(top)
    figure = Figure(figsize=(size + 2, size))
    axes = figure.add_subplot()
    image = axes.imshow(recall_share, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.04, label="share of the true class")
    axes.set_xticks(range(len(top) + 1), labels + ["other"], rotation=90, fontsize=8)
    axes.set_yticks(range(len(top)), labels, fontsize=8)
    axes.set_xlabel("predicted species")
    axes.set_ylabel("true species ([V] = venomous)")
    for (row, column), count in np.ndenumerate(counts):
        if count:
            color = "white" if recall_share[row, column] > 0.5 else "black"
            axes.text(column, row, str(count), ha="center", va="center", fontsize=7, color=color)
    axes.set_title(f"{len(top)} most frequent species, {int(counts.sum())} of {len(true_class_ids)} observations", fontsize=10)
    return figure


def top_species_confusion(true_class_ids: np.ndarray, predicted_class_ids: np.ndarray, *, top_species: int) -> tuple[np.ndarray, np.ndarray]:
    """Count (true, predicted) pairs among the ``top_species`` most frequent true classes.

    Returns the class ids, most frequent first (ties by class id), and counts of shape
    ``(n, n + 1)``: rows are true classes, the last column counts predictions outside them.
    """
    frequency = pd.Series(true_class_ids).value_counts().sort_index()
    top = frequency.sort_values(ascending=False, kind="stable").index[:top_species].to_numpy()

    rows = np.isin(true_class_ids, top)
    row_index = pd.Index(top).get_indexer(true_class_ids[rows])
    column_index = pd.Index(top).get_indexer(predicted_class_ids[rows])
    column_index[column_index < 0] = len(top)

    counts = np.zeros((len(top), len(top) + 1), dtype=np.int64)
    np.add.at(counts, (row_index, column_index), 1)
    return top, counts


def _species_label(class_id: int, species_names: dict[int, str], venomous_class_ids: set[int]) -> str:
    name = species_names.get(class_id, "class")
    return f"{name} ({class_id})" + (" [V]" if class_id in venomous_class_ids else "")


def _metrics_title(metrics: dict) -> str:
    return f"F1 {metrics['f1']:.2f}   accuracy {metrics['accuracy']:.2f}   Track 1 {metrics['track1']:.2f}   Track 2 {metrics['track2']}"


def _save_png(figure: Figure, path: Path, *, title: str) -> None:
    axes = figure.axes[0]
    axes.set_title(f"{title}\n{axes.get_title()}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def _relative_to(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def _require_file(path: str | os.PathLike, *, label: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{label} file not found: {str(path)!r}. Check the path.")
    return path


def main(argv: list[str] | None = None) -> int:
    """Score a submission CSV from the command line and print the metrics as JSON."""
    parser = argparse.ArgumentParser(prog="python -m snakeclef.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--submission", required=True, help="CSV with observation_id,class_id, one row per observation.")
    parser.add_argument("--ground-truth", required=True, help="CSV with observation_id,class_id (one row per image is fine).")
    parser.add_argument("--venomous-list", required=True, help="CSV with class_id and MIVS or venomous (1 = venomous).")
    parser.add_argument("--output", help="Also write the metrics JSON to this file.")
    parser.add_argument("--output-dir", help="Write the full report (metrics, per-species CSV, plots) into this folder.")
    parser.add_argument("--top-species", type=int, default=20, help="Species shown in the confusion-matrix plot (default 20).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        if args.output_dir:
            metrics = write_evaluation(
                args.submission, args.ground_truth, args.venomous_list, output_dir=args.output_dir, top_species=args.top_species
            )
        else:
            metrics = score_files(args.submission, args.ground_truth, args.venomous_list)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")

    text = json.dumps(metrics, indent=2)
    if args.output:
        with atomic_path(args.output) as tmp:
            tmp.write_text(text + "\n")
    print(text)
    return 0


def score_files(submission_csv: str | os.PathLike, ground_truth_csv: str | os.PathLike, venomous_list_csv: str | os.PathLike) -> dict:
    """Score a submission CSV against a ground-truth CSV; write nothing."""
    venomous_class_ids = read_venomous_class_ids(_require_file(venomous_list_csv, label="Venomous status list"))
    return score_submission(
        read_table(submission_csv, label="Submission"), read_table(ground_truth_csv, label="Ground truth"), venomous_class_ids
    )


if __name__ == "__main__":
    sys.exit(main())
