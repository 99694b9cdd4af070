"""Measure the Train stage's held-out accuracy over seeds, with and without the mirror-image pass.

Uses a pipeline run's ``images/`` and ``embeddings/`` folders (an embeddings
Parquet with a ``split`` column). Two measurements:

- ``heldout``: for each seed and label-smoothing value, ``train_classifier``
  runs with the evaluation split held out, as the Train task runs it. The
  script scores the evaluation split from the stored features (one view)
  and from the mean probabilities of each image and its mirror image (flip
  TTA), and records the finder's learning rate and the best epoch.
- ``cv`` (``--folds K``): K-fold cross-validation over every labelled image,
  train and evaluation splits together, so that the flip TTA gain is
  measured on all images rather than the evaluation split alone.

The mirrored features come from the same ``FeatureExtractor`` as the
Predict stage. The script prints one line per run, a summary per setting,
then one JSON object.

    python scripts/measure_heldout.py runs/ph-snakes --backbone ../shared/models/dinov2-small --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from snakeclef.features import FeatureExtractor
from snakeclef.models.classifier import FEATURES, load_classifier
from snakeclef.train import train_classifier


def read_labelled(embeddings: Path, feature: str) -> pa.Table:
    """Rows with features and a label, sorted by image_path."""
    table = ds.dataset(embeddings, format="parquet").to_table(columns=["image_path", "class_id", "split", feature, "error"])
    table = table.filter(pc.and_(pc.is_null(table["error"]), pc.is_valid(table["class_id"])))
    return table.sort_by("image_path")


def mirrored_features(images: Path, image_paths: list[str], *, feature: str, backbone: str, batch_size: int) -> np.ndarray:
    """``feature`` of the mirrored images, (n, width), in ``image_paths`` order."""
    table = ds.dataset(images, format="parquet").to_table(
        columns=["image_path", "data"], filter=ds.field("image_path").isin(image_paths)
    )
    data = dict(zip(table["image_path"].to_pylist(), table["data"].to_pylist()))
    extractor = FeatureExtractor(backbone, batch_size=batch_size)
    batch = extractor.embed([data[path] for path in image_paths], flipped=True)
    if not batch.ok.all():
        raise ValueError(
            f"Failed to embed {int((~batch.ok).sum())} mirrored images whose stored features exist; "
            "check that --backbone is the backbone the embeddings came from."
        )
    return getattr(batch, f"{feature}_flipped")


def score(model_dir: Path, features: np.ndarray, flipped: np.ndarray, class_ids: np.ndarray) -> tuple[float, float]:
    """Return (accuracy from one view, accuracy with flip TTA)."""
    classifier = load_classifier(model_dir)
    single_view = classifier.log_probs(features)
    both_views = np.logaddexp(single_view, classifier.log_probs(flipped))
    to_ids = classifier.label_map.to_class_ids
    return float((to_ids(single_view.argmax(1)) == class_ids).mean()), float((to_ids(both_views.argmax(1)) == class_ids).mean())


def write_embeddings(table: pa.Table, split: np.ndarray, folder: Path, report: str) -> Path:
    folder.mkdir(parents=True)
    pq.write_table(table.set_column(table.schema.get_field_index("split"), "split", pa.array(split)), folder / "part-00000.parquet")
    (folder / "_embed_report.json").write_text(report)
    return folder


def summarise(name: str, runs: list[dict]) -> dict:
    single_view = np.array([run["accuracy"] for run in runs])
    tta = np.array([run["accuracy_flip_tta"] for run in runs])
    rates = [run["learning_rate"] for run in runs]
    summary = {
        "setting": name, "runs": len(runs), "accuracy_mean": round(float(single_view.mean()), 4), "accuracy_std": round(float(single_view.std()), 4),
        "flip_tta_mean": round(float(tta.mean()), 4), "flip_tta_std": round(float(tta.std()), 4),
        "flip_tta_gain": round(float((tta - single_view).mean()), 4), "learning_rate_min": min(rates), "learning_rate_max": max(rates),
    }
    print("SUMMARY " + json.dumps(summary), flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_root", type=Path, help="pipeline output root with images/ and embeddings/")
    parser.add_argument("--backbone", required=True, help="backbone the embeddings came from")
    parser.add_argument("--feature", choices=FEATURES, default="cls_last4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--label-smoothing", type=float, nargs="+", default=[0.1])
    parser.add_argument("--eval-split", default="val")
    parser.add_argument("--folds", type=int, default=0, help="also run K-fold cross-validation over all images (0 skips it)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    embeddings = args.run_root / "embeddings"
    report = (embeddings / "_embed_report.json").read_text()
    table = read_labelled(embeddings, args.feature)
    paths = table["image_path"].to_pylist()
    class_ids = table["class_id"].to_numpy()
    split = table["split"].to_numpy(zero_copy_only=False)
    features = np.stack(table[args.feature].to_numpy(zero_copy_only=False)).astype(np.float32)
    started = time.perf_counter()
    flipped = mirrored_features(args.run_root / "images", paths, feature=args.feature, backbone=args.backbone, batch_size=args.batch_size)
    print(f"mirrored features of {len(paths)} images in {time.perf_counter() - started:.0f} s", flush=True)

    summaries = []
    with tempfile.TemporaryDirectory(prefix="measure-heldout-") as tmp:
        tmp = Path(tmp)
        held_out = split == args.eval_split
        for smoothing in args.label_smoothing:
            runs = []
            for seed in args.seeds:
                model_dir = tmp / f"heldout-{smoothing}-{seed}"
                metrics = train_classifier(
                    embeddings, model_dir, feature=args.feature, seed=seed, label_smoothing=smoothing, holdout_split=args.eval_split
                )
                single_view, tta = score(model_dir, features[held_out], flipped[held_out], class_ids[held_out])
                runs.append({"seed": seed, "learning_rate": metrics["learning_rate"], "best_epoch": metrics["best_epoch"],
                             "accuracy": single_view, "accuracy_flip_tta": tta})
                print(f"heldout label_smoothing={smoothing} " + json.dumps(runs[-1]), flush=True)
            summaries.append(summarise(f"heldout, label_smoothing={smoothing}", runs))

        if args.folds:
            for smoothing in args.label_smoothing:
                runs = []
                for seed in args.seeds:
                    rng = np.random.default_rng(seed)
                    fold = np.zeros(len(paths), dtype=np.int64)
                    for class_id in np.unique(class_ids):
                        rows = rng.permutation(np.flatnonzero(class_ids == class_id))
                        fold[rows] = np.arange(len(rows)) % args.folds
                    correct = {"accuracy": 0.0, "accuracy_flip_tta": 0.0}
                    rates, epochs = [], []
                    for k in range(args.folds):
                        test = fold == k
                        folder = write_embeddings(table, np.where(test, "test", "train"), tmp / f"cv-{smoothing}-{seed}-{k}", report)
                        metrics = train_classifier(folder, tmp / f"cv-model-{smoothing}-{seed}-{k}", feature=args.feature, seed=seed,
                                                   label_smoothing=smoothing, holdout_split="test")
                        single_view, tta = score(tmp / f"cv-model-{smoothing}-{seed}-{k}", features[test], flipped[test], class_ids[test])
                        correct["accuracy"] += single_view * test.sum()
                        correct["accuracy_flip_tta"] += tta * test.sum()
                        rates.append(metrics["learning_rate"])
                        epochs.append(metrics["best_epoch"])
                    runs.append({"seed": seed, "learning_rate": float(np.median(rates)), "best_epoch": epochs,
                                 **{key: value / len(paths) for key, value in correct.items()}})
                    print(f"cv label_smoothing={smoothing} " + json.dumps(runs[-1]), flush=True)
                summaries.append(summarise(f"{args.folds}-fold cv, label_smoothing={smoothing}", runs))

    print(json.dumps({"images": len(paths), "held_out_images": int(held_out.sum()), "summaries": summaries}))


if __name__ == "__main__":
    main()
