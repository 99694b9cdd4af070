"""Offline prediction: one ``class_id`` per observation, from image files through the classifier.

This is what a competitor runs on the hidden test set, so it works in one
process with no network: no Spark, no DataLoader worker processes and no
hub calls. Images go through the same decode, preprocess and feature
extraction as the embedding stage (:class:`snakeclef.features.FeatureExtractor`),
so training and prediction see identical pixels.

Per image the classifier gives log-probabilities over the label map. Per
observation the images are combined by ``aggregate``:

- ``mode``: each image gets a class by ``decision``, and the most frequent
  class wins. A tie goes to the class of the first image (metadata order)
  among the tied classes.
- ``mean``: the class probabilities are averaged over the images, and
  ``decision`` picks the class from the mean.

``decision`` is ``argmax`` (the most probable class) or ``min-cost``: the
class with the lowest expected SnakeCLEF cost given the class probabilities
and which classes are venomous.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

AGGREGATES = ("mode", "mean")
DECISIONS = ("argmax", "min-cost")

# SnakeCLEF cost of a wrong prediction, keyed by (true class is venomous, predicted class is venomous).
# A correct prediction costs 0.
MISTAKE_COSTS = {
    (False, False): 1.0,
    (False, True): 2.0,
    (True, False): 5.0,
    (True, True): 2.0,
}

SUBMISSION_COLUMNS = ("observation_id", "class_id")
# Failed images and observations listed one by one in the log before the rest are only counted.
MAX_LOGGED = 20
# Batches handed to the feature extractor per call: it decodes the next batch while the backbone runs.
CHUNK_BATCHES = 8


def check_choice(option: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"Invalid {option}={value!r}: expected one of {', '.join(map(repr, allowed))}.")


def make_cost_matrix(venomous: Sequence[bool] | np.ndarray) -> np.ndarray:
    """Build the SnakeCLEF cost matrix ``cost[true, predicted]``, shape (n_classes, n_classes).

    ``venomous`` is one flag per class in label-map order.
    """
    venomous = np.asarray(venomous, dtype=bool)
    true_venomous = venomous[:, None]
    predicted_venomous = venomous[None, :]
    cost = np.where(
        true_venomous,
        np.where(predicted_venomous, MISTAKE_COSTS[True, True], MISTAKE_COSTS[True, False]),
        np.where(predicted_venomous, MISTAKE_COSTS[False, True], MISTAKE_COSTS[False, False]),
    ).astype(np.float64)
    np.fill_diagonal(cost, 0.0)
    return cost


def expected_costs(probs: np.ndarray, venomous: Sequence[bool] | np.ndarray) -> np.ndarray:
    """Return the expected SnakeCLEF cost of predicting each class, shape (n, n_classes).

    Equals ``probs @ make_cost_matrix(venomous)`` in O(n_classes) per row instead
    of O(n_classes**2): a mistake's cost depends only on whether the true and the
    predicted class are venomous, so for a prediction c the sum over true
    classes reduces to the harmless and venomous probability masses, minus the
    term for t == c, which costs nothing.
    """
    venomous = np.asarray(venomous, dtype=bool)
    if venomous.shape != (probs.shape[1],):
        raise ValueError(
            f"{venomous.size} venomous flags do not match {probs.shape[1]} classes: "
            "take the flags for the classifier's own label map."
        )
    costs = np.array([[MISTAKE_COSTS[t, c] for c in (False, True)] for t in (False, True)], dtype=np.float64)
    mass = np.stack([probs[:, ~venomous].sum(axis=1), probs[:, venomous].sum(axis=1)], axis=1)
    v = venomous.astype(int)
    return mass @ costs[:, v] - probs * costs[v, v]


def decide(probs: np.ndarray, *, decision: str = "argmax", venomous: Sequence[bool] | np.ndarray | None = None) -> np.ndarray:
    """Pick one class index per row of ``probs`` (n, n_classes); returns (n,) int64.

    ``min-cost`` picks ``argmin_c sum_t probs[t] * cost[t, c]`` with the
    SnakeCLEF costs of :func:`make_cost_matrix`; ``venomous`` gives one flag
    per class in label-map order. Ties go to the lower class index, as with
    ``argmax``.
    """
    check_choice("decision", decision, DECISIONS)
    probs = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    if decision == "argmax":
        return probs.argmax(axis=1)

    if venomous is None:
        raise ValueError("decision='min-cost' needs the venomous flags of the classes: pass a venomous status list (--venomous-list).")
    return expected_costs(probs, venomous).argmin(axis=1)


def mode_first_tiebreak(class_indices: Sequence[int]) -> int:
    """Return the most frequent value; among tied values, the one that occurs first."""
    if len(class_indices) == 0:
        raise ValueError("Cannot take the mode of an empty list of predictions.")
    counts: dict[int, int] = {}
    for index in class_indices:
        counts[int(index)] = counts.get(int(index), 0) + 1
    top = max(counts.values())
    # dicts keep insertion order, so the first key with the top count is the earliest image's class.
    return next(index for index, count in counts.items() if count == top)


def aggregate_observation(
    log_probs: np.ndarray,
    *,
    aggregate: str = "mode",
    decision: str = "argmax",
    venomous: Sequence[bool] | np.ndarray | None = None,
) -> int:
    """Pick one class index for an observation from its images' log-probabilities (n_images, n_classes)."""
    check_choice("aggregate", aggregate, AGGREGATES)
    probs = np.exp(np.asarray(log_probs, dtype=np.float64))
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"Expected log-probabilities of shape (n_images >= 1, n_classes), got {probs.shape}.")

    if aggregate == "mode":
        per_image = decide(probs, decision=decision, venomous=venomous)
        return mode_first_tiebreak(per_image.tolist())
    mean_probs = probs.mean(axis=0, keepdims=True)
    return int(decide(mean_probs, decision=decision, venomous=venomous)[0])


def normalise_prior(class_prior: Sequence[float] | np.ndarray | None, n_classes: int) -> np.ndarray:
    """Turn class counts or frequencies into probabilities, shape (n_classes,); uniform when missing."""
    if class_prior is None:
        logger.warning("The model folder has no class prior: observations without a readable image get a uniform prior.")
        return np.full(n_classes, 1.0 / n_classes)
    prior = np.asarray(class_prior, dtype=np.float64)
    if prior.shape != (n_classes,) or (prior < 0).any() or prior.sum() <= 0:
        raise ValueError(
            f"Invalid class prior of shape {prior.shape} (sum {prior.sum():.3g}): expected {n_classes} "
            "non-negative counts or frequencies in label-map order."
        )
    return prior / prior.sum()


def read_venomous_flags(path: str | os.PathLike, class_ids: Sequence[int]) -> np.ndarray:
    """Read a venomous status CSV and return one flag per class in ``class_ids`` order.

    The CSV has a ``class_id`` column and either ``MIVS`` (the official SnakeCLEF
    list, 1 = medically important venomous species) or ``venomous`` (0/1).
    """
    table = pd.read_csv(path, encoding="utf-8-sig")
    flag_column = next((name for name in ("MIVS", "venomous") if name in table.columns), None)
    if "class_id" not in table.columns or flag_column is None:
        raise ValueError(
            f"Venomous status list {str(path)!r} has columns {list(table.columns)}: expected 'class_id' and "
            "either 'MIVS' or 'venomous' (0/1)."
        )

    flags = dict(zip(table["class_id"].astype(int), table[flag_column].astype(int) != 0))
    missing = [class_id for class_id in class_ids if int(class_id) not in flags]
    if missing:
        raise ValueError(
            f"Venomous status list {str(path)!r} has no entry for {len(missing)} class_id(s) of the model, "
            f"e.g. {missing[:5]}: use a list that covers every class in the model's label map."
        )
    return np.array([flags[int(class_id)] for class_id in class_ids], dtype=bool)


def read_prediction_metadata(path: str | os.PathLike, *, split: str | None = None) -> pd.DataFrame:
    """Read a test metadata CSV into ``observation_id`` (int64) and ``image_path`` rows, in file order.

    Without an ``observation_id`` column (a folder index such as ph-snakes),
    each row is its own observation, numbered by its 0-based position in the
    file as the ingest stage numbers it. ``split`` keeps only rows of that
    split and is applied after the numbering.
    """
    table = pd.read_csv(path, encoding="utf-8-sig", dtype={"image_path": str}, keep_default_na=False)
    if "image_path" not in table.columns:
        raise ValueError(
            f"Metadata {str(path)!r} has no 'image_path' column (columns: {list(table.columns)}): "
            "expected 'observation_id' and 'image_path', relative to the images root."
        )
    if "observation_id" not in table.columns:
        logger.info("Metadata %s has no observation_id column: each row is its own observation, numbered by row.", path)
        table["observation_id"] = np.arange(len(table), dtype=np.int64)

    observation_ids = pd.to_numeric(table["observation_id"], errors="coerce")
    bad_rows = table.index[observation_ids.isna() | (observation_ids % 1 != 0)].tolist()
    if bad_rows:
        raise ValueError(
            f"Metadata {str(path)!r} has a non-integer observation_id in {len(bad_rows)} row(s), first at data row "
            f"{bad_rows[0] + 1}: {table['observation_id'].iloc[bad_rows[0]]!r}. Fix those rows."
        )
    table["observation_id"] = observation_ids.astype(np.int64)

    if split is not None:
        if "split" not in table.columns:
            raise ValueError(f"split={split!r} was given but metadata {str(path)!r} has no 'split' column.")
        table = table[table["split"] == split]
        if table.empty:
            raise ValueError(f"Metadata {str(path)!r} has no rows with split={split!r}.")
    return table[["observation_id", "image_path"]].reset_index(drop=True)


def group_observations(observation_ids: Sequence[int]) -> dict[int, list[int]]:
    """Map each observation_id to its row positions; keys in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for position, observation_id in enumerate(observation_ids):
        groups.setdefault(int(observation_id), []).append(position)
    return groups


def decide_observations(
    observation_ids: Sequence[int],
    log_probs: np.ndarray,
    failed: Sequence[bool],
    *,
    class_ids: Sequence[int],
    class_prior: np.ndarray,
    aggregate: str = "mode",
    decision: str = "argmax",
    venomous: Sequence[bool] | np.ndarray | None = None,
) -> pd.DataFrame:
    """Return one ``observation_id, class_id`` row per observation, in order of first appearance.

    ``log_probs`` is (n_images, n_classes) in row order; rows flagged in
    ``failed`` are ignored. An observation with no usable image gets the
    class that ``decision`` picks from ``class_prior``.
    """
    check_choice("aggregate", aggregate, AGGREGATES)
    check_choice("decision", decision, DECISIONS)
    failed = np.asarray(failed, dtype=bool)
    prior_choice = int(decide(class_prior[None, :], decision=decision, venomous=venomous)[0])

    rows = []
    unreadable = []
    for observation_id, positions in group_observations(observation_ids).items():
        usable = [position for position in positions if not failed[position]]
        if usable:
            index = aggregate_observation(log_probs[usable], aggregate=aggregate, decision=decision, venomous=venomous)
        else:
            unreadable.append(observation_id)
            index = prior_choice
        rows.append((observation_id, int(class_ids[index])))

    if unreadable:
        logger.warning(
            "%d observation(s) have no readable image and get class_id %d from the class prior: observation_id %s%s",
            len(unreadable), class_ids[prior_choice], unreadable[:MAX_LOGGED], " ..." if len(unreadable) > MAX_LOGGED else "",
        )
    return pd.DataFrame(rows, columns=list(SUBMISSION_COLUMNS)).astype({"observation_id": np.int64, "class_id": np.int64})


def write_submission(submission: pd.DataFrame, output_csv: str | os.PathLike) -> None:
    """Write ``observation_id,class_id`` rows so that the file appears whole or not at all."""
    from snakeclef.storage import atomic_path

    with atomic_path(output_csv) as tmp:
        submission.to_csv(tmp, columns=list(SUBMISSION_COLUMNS), index=False)


def log_failures(image_paths: Sequence[str], errors: Sequence[str | None]) -> None:
    """Log the first failed images one per line, then the count of the rest."""
    failures = [(path, error) for path, error in zip(image_paths, errors) if error is not None]
    for image_path, error in failures[:MAX_LOGGED]:
        logger.warning("Image %s failed: %s", image_path, error)
    if len(failures) > MAX_LOGGED:
        logger.warning("%d more images failed (not listed).", len(failures) - MAX_LOGGED)


def read_image_file(images_root: Path, image_path: str) -> tuple[bytes | None, str | None]:
    """Return the file's bytes, or None and the reason it could not be read."""
    try:
        return (images_root / image_path).read_bytes(), None
    except OSError as error:
        return None, f"cannot read image file: {type(error).__name__}: {error.strerror or error}"


def resolve_backbone(model_dir: str | os.PathLike, recorded_backbone: str | None, backbone: str | os.PathLike | None) -> str:
    """Choose the backbone: the explicit one, else a ``backbone/`` folder inside the model folder, else the recorded one."""
    if backbone is not None:
        return str(backbone)
    bundled = Path(model_dir) / "backbone"
    if (bundled / "config.json").is_file():
        return str(bundled)
    if not recorded_backbone:
        raise ValueError(f"Model folder {str(model_dir)!r} records no backbone: pass backbone= (--backbone) explicitly.")
    return str(recorded_backbone)


def read_image_batch(images_root: Path, image_paths: Sequence[str]) -> list[tuple[bytes | None, str | None]]:
    return [read_image_file(images_root, image_path) for image_path in image_paths]


def predict_log_probs(
    image_paths: Sequence[str],
    images_root: str | os.PathLike,
    *,
    extractor,
    classifier,
    batch_size: int = 32,
    calibrated: bool = False,
    flip_tta: bool = False,
    progress=None,
) -> tuple[np.ndarray, list[str | None]]:
    """Run image files through the backbone and classifier, a chunk of files in memory at a time.

    Returns log-probabilities (n_images, n_classes) float32, with rows of
    failed images left as NaN, and one error message (or None) per image.
    ``calibrated`` selects the classifier's probabilities calibrated to the
    training class frequencies instead of its default scores. ``flip_tta``
    averages each image's probabilities with those of its mirror image.
    A background thread reads the next chunk's files while the current one
    is embedded; everything stays in this process.
    """
    # NOTE: the result contains every image's log-probabilities: about 1.3 GB for 182,261 images x 1,784 classes.
    images_root = Path(images_root)
    n_classes = len(class_ids_of(classifier))
    log_probs = np.full((len(image_paths), n_classes), np.nan, dtype=np.float32)
    errors: list[str | None] = [None] * len(image_paths)
    # Several batches per call let the extractor decode the next batch while the backbone runs.
    chunk_size = batch_size * CHUNK_BATCHES
    starts = list(range(0, len(image_paths), chunk_size))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-images") as reader:
        pending = reader.submit(read_image_batch, images_root, image_paths[:chunk_size]) if starts else None
        for start in starts:
            files = pending.result()
            next_start = start + chunk_size
            if next_start < len(image_paths):
                pending = reader.submit(read_image_batch, images_root, image_paths[next_start:next_start + chunk_size])

            for offset, (_, error) in enumerate(files):
                errors[start + offset] = error
            positions = [start + offset for offset, (data, _) in enumerate(files) if data is not None]
            if positions:
                chunk_log_probs, chunk_errors = classify_images(
                    [files[p - start][0] for p in positions], extractor=extractor, classifier=classifier,
                    calibrated=calibrated, flip_tta=flip_tta,
                )
                log_probs[positions] = chunk_log_probs
                for position, error in zip(positions, chunk_errors):
                    errors[position] = error
            if progress is not None:
                progress.update(len(files))
    return log_probs, errors


def classify_images(
    images: Sequence[bytes], *, extractor, classifier, calibrated: bool = False, flip_tta: bool = False
) -> tuple[np.ndarray, list[str | None]]:
    """Embed encoded images and classify them: log-probabilities (n, n_classes), NaN rows where an image failed.

    With ``flip_tta`` the probabilities are the mean of the image's and its
    mirror image's (test-time augmentation).
    """
    batch = extractor.embed(list(images), flipped=flip_tta)
    log_probs = np.full((len(images), len(class_ids_of(classifier))), np.nan, dtype=np.float32)
    ok = [i for i, error in enumerate(batch.errors) if error is None]
    if ok:
        scores = classifier.calibrated_log_probs if calibrated else classifier.log_probs
        log_probs[ok] = scores(np.asarray(getattr(batch, classifier.feature), dtype=np.float32)[ok])
        if flip_tta:
            flipped = scores(np.asarray(getattr(batch, f"{classifier.feature}_flipped"), dtype=np.float32)[ok])
            log_probs[ok] = np.logaddexp(log_probs[ok], flipped) - np.float32(np.log(2.0))
    return log_probs, list(batch.errors)


def class_ids_of(classifier) -> list[int]:
    label_map = classifier.label_map
    class_ids = getattr(label_map, "class_ids", label_map)
    return [int(class_id) for class_id in class_ids]


def predict_submission(
    metadata_csv: str | os.PathLike,
    images_root: str | os.PathLike,
    model_dir: str | os.PathLike,
    output_csv: str | os.PathLike,
    *,
    aggregate: str = "mode",
    decision: str = "argmax",
    venomous_list: str | os.PathLike | None = None,
    backbone: str | os.PathLike | None = None,
    split: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    flip_tta: bool = True,
    progress: bool = True,
) -> dict:
    """Predict one ``class_id`` per observation of ``metadata_csv`` and write ``output_csv``.

    ``model_dir`` is a model folder from the training stage or an exported
    submission folder. ``backbone=None`` uses the folder's bundled
    ``backbone/`` when present, else the backbone recorded at training.
    ``flip_tta`` classifies each image from the mean of its own and its
    mirror image's probabilities: two backbone passes per image, and
    0.6 to 1.4 points of accuracy on ph-snakes (see docs/benchmarks.md).
    Returns a summary: observations, images, failures, seconds, images_per_s.
    """
    check_choice("aggregate", aggregate, AGGREGATES)
    check_choice("decision", decision, DECISIONS)
    if decision == "min-cost" and venomous_list is None:
        raise ValueError("decision='min-cost' needs venomous_list= (--venomous-list): a CSV of class_id and MIVS or venomous.")
    # The competition sandbox has no network: never let transformers or the hub client try.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    from tqdm.auto import tqdm

    from snakeclef.features import FeatureExtractor
    from snakeclef.models.classifier import load_classifier

    if not Path(images_root).is_dir():
        raise FileNotFoundError(f"Images root {str(images_root)!r} is not a folder: pass the folder that image_path values are relative to.")

    started = time.perf_counter()
    metadata = read_prediction_metadata(metadata_csv, split=split)
    classifier = load_classifier(model_dir)
    class_ids = class_ids_of(classifier)
    venomous = read_venomous_flags(venomous_list, class_ids) if venomous_list is not None else None
    # model.json may lack class_counts (a hand-made model folder); normalise_prior then falls back to uniform.
    class_prior = normalise_prior(classifier.info.get("class_counts"), len(class_ids))

    backbone = resolve_backbone(model_dir, getattr(classifier, "backbone", None), backbone)
    dct_k = int(getattr(classifier, "info", {}).get("dct_k", 8))
    extractor = FeatureExtractor(backbone, device=device, precision=precision, dct_k=dct_k, batch_size=batch_size)
    logger.info(
        "Predicting %d images of %d observations with backbone %s, feature %s, aggregate=%s, decision=%s, flip_tta=%s.",
        len(metadata), metadata["observation_id"].nunique(), backbone, classifier.feature, aggregate, decision, flip_tta,
    )

    forward_started = time.perf_counter()
    with tqdm(total=len(metadata), unit="img", desc="predict", disable=not progress) as bar:
        log_probs, errors = predict_log_probs(
            metadata["image_path"].tolist(), images_root,
            extractor=extractor, classifier=classifier, batch_size=batch_size, progress=bar,
            # An expected cost needs probabilities of the classes as they occur, not the
            # prior-free scores that logit adjustment gives for argmax and macro-F1.
            calibrated=decision == "min-cost", flip_tta=flip_tta,
        )
    forward_seconds = time.perf_counter() - forward_started
    log_failures(metadata["image_path"].tolist(), errors)

    submission = decide_observations(
        metadata["observation_id"].tolist(), log_probs, [error is not None for error in errors],
        class_ids=class_ids, class_prior=class_prior, aggregate=aggregate, decision=decision, venomous=venomous,
    )
    write_submission(submission, output_csv)

    failed = np.array([error is not None for error in errors], dtype=bool)
    failed_observations = int(
        pd.Series(failed).groupby(metadata["observation_id"].to_numpy()).all().sum()
    ) if len(metadata) else 0
    seconds = time.perf_counter() - started
    summary = {
        "observations": len(submission),
        "images": len(metadata),
        "failures": int(failed.sum()),
        "failed_observations": failed_observations,
        "seconds": round(seconds, 3),
        "images_per_s": round(len(metadata) / forward_seconds, 2) if forward_seconds > 0 else None,
        "aggregate": aggregate,
        "decision": decision,
        "flip_tta": flip_tta,
        "backbone": backbone,
        "output": str(output_csv),
    }
    logger.info("Prediction summary: %s", summary)
    return summary


# Written by the export command into a submission folder; its values become the CLI defaults there.
EXPORT_SETTINGS = "export.json"


def read_export_settings(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / EXPORT_SETTINGS
    return json.loads(path.read_text()) if path.is_file() else {}


def make_parser(default_model_dir: str | os.PathLike | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write submission.csv (observation_id,class_id) offline, one row per observation.")
    parser.add_argument("--metadata", required=True, help="test metadata CSV with observation_id and image_path columns")
    parser.add_argument("--images-root", required=True, help="folder that image_path values are relative to")
    parser.add_argument(
        "--model-dir", default=default_model_dir, required=default_model_dir is None,
        help="model folder from training, or an exported submission folder" + (f" (default: {default_model_dir})" if default_model_dir else ""),
    )
    parser.add_argument("--output", default="submission.csv", help="CSV to write (default: submission.csv)")
    parser.add_argument("--aggregate", choices=AGGREGATES, default=None, help="how an observation's images are combined (default: mode)")
    parser.add_argument("--decision", choices=DECISIONS, default=None, help="argmax, or the venom-aware min-cost that needs --venomous-list (default: argmax)")
    parser.add_argument("--venomous-list", default=None, help="CSV of class_id and MIVS or venomous (0/1)")
    parser.add_argument("--backbone", default=None, help="backbone folder or name (default: the model folder's backbone/, else the one recorded at training)")
    parser.add_argument("--split", default=None, help="keep only metadata rows of this split")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--precision", default="auto", help="fp32, bf16 or auto (default: auto, bf16 where the hardware supports it)")
    parser.add_argument(
        "--no-flip-tta", dest="flip_tta", action="store_false", default=None,
        help="classify each image once, without its mirror image (half the backbone time; default: the export's choice, else flip)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None, *, default_model_dir: str | os.PathLike | None = None) -> dict:
    """Run the submission command line; prints the summary as one JSON line."""
    args = make_parser(default_model_dir).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Options not given on the command line fall back to the choices saved by the export command.
    settings = read_export_settings(args.model_dir)
    venomous_list = args.venomous_list
    if venomous_list is None and settings.get("venomous_list"):
        venomous_list = str(Path(args.model_dir) / settings["venomous_list"])

    summary = predict_submission(
        args.metadata, args.images_root, args.model_dir, args.output,
        aggregate=args.aggregate or settings.get("aggregate", "mode"),
        decision=args.decision or settings.get("decision", "argmax"),
        venomous_list=venomous_list, backbone=args.backbone, split=args.split,
        batch_size=args.batch_size, device=args.device, precision=args.precision,
        flip_tta=args.flip_tta if args.flip_tta is not None else settings.get("flip_tta", True), progress=not args.no_progress,
    )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
