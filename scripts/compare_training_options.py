"""Compare the Train stage's feature and imbalance options on real embeddings.

Runs ``train_classifier`` for every combination of feature (cls_last4, cls, dct),
standardisation (on, off) and imbalance handling (none, logit adjustment,
class-balanced weights), on two datasets built from one embeddings Parquet
that has a train/val ``split`` column:

- ``full``: the train split as given, scored on the val split;
- ``long_tailed``: the train split capped per class to a long-tailed profile
  (the largest class keeps all its rows, the smallest ``1 / imbalance_ratio``
  of that, in a geometric progression over a random class order), scored on
  the same, unchanged val split.

Each combination runs with several seeds. The script prints a Markdown
table of mean validation accuracy and macro-F1, then one JSON line.

    python scripts/compare_training_options.py EMBEDDINGS [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from snakeclef.train import IMBALANCE_OPTIONS, train_classifier


def long_tailed_caps(class_counts: dict[int, int], *, imbalance_ratio: float, seed: int) -> dict[int, int]:
    """Per-class row caps falling geometrically from the largest count to ``largest / imbalance_ratio`` (at least 2)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(sorted(class_counts))
    largest = max(class_counts.values())
    steps = max(1, len(order) - 1)
    return {
        int(class_id): max(2, int(round(largest * imbalance_ratio ** (-rank / steps))))
        for rank, class_id in enumerate(order)
    }


def write_long_tailed(source: Path, target: Path, *, imbalance_ratio: float, seed: int) -> dict[int, int]:
    """Copy ``source`` to ``target`` with its train rows capped per class; return the kept train rows per class."""
    table = ds.dataset(source, format="parquet").to_table()
    is_train = pc.equal(table["split"], "train").to_numpy(zero_copy_only=False)
    class_ids = table["class_id"].to_numpy(zero_copy_only=False)
    counts = {int(c): int(n) for c, n in zip(*np.unique(class_ids[is_train], return_counts=True))}
    caps = long_tailed_caps(counts, imbalance_ratio=imbalance_ratio, seed=seed)

    rng = np.random.default_rng(seed)
    keep = ~is_train
    for class_id, cap in caps.items():
        rows = np.flatnonzero(is_train & (class_ids == class_id))
        keep[rng.permutation(rows)[:cap]] = True
    target.mkdir(parents=True)
    pq.write_table(table.filter(keep), target / "part-00000.parquet")
    shutil.copy(source / "_embed_report.json", target / "_embed_report.json")
    return {class_id: min(cap, counts[class_id]) for class_id, cap in caps.items()}


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds, one row per dataset and option combination."""
    rows = []
    keys = ("dataset", "feature", "standardize", "imbalance")
    for combination, group in itertools.groupby(sorted(runs, key=lambda r: [str(r[k]) for k in keys]), key=lambda r: [r[k] for k in keys]):
        group = list(group)
        accuracy = np.array([r["val_accuracy"] for r in group])
        macro_f1 = np.array([r["val_macro_f1"] for r in group])
        rows.append({
            **dict(zip(keys, combination)), "seeds": len(group),
            "val_accuracy": round(float(accuracy.mean()), 4), "val_accuracy_std": round(float(accuracy.std()), 4),
            "val_macro_f1": round(float(macro_f1.mean()), 4), "val_macro_f1_std": round(float(macro_f1.std()), 4),
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| dataset | feature | standardize | imbalance | val accuracy | val macro-F1 |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['dataset']} | {row['feature']} | {'on' if row['standardize'] else 'off'} | {row['imbalance']} "
            f"| {row['val_accuracy']:.3f} ± {row['val_accuracy_std']:.3f} | {row['val_macro_f1']:.3f} ± {row['val_macro_f1_std']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("embeddings", type=Path, help="embeddings Parquet folder with a train/val split column")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--features", nargs="+", default=["cls_last4", "cls", "dct"])
    parser.add_argument("--standardize", nargs="+", choices=["on", "off"], default=["on", "off"], help="standardisation settings to try")
    parser.add_argument("--imbalance-ratio", type=float, default=20.0, help="largest / smallest class cap of the long-tailed subsample")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=None, help="also write every run's figures to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    runs = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compare-train-") as tmp:
        tmp = Path(tmp)
        kept_rows = write_long_tailed(args.embeddings, tmp / "long_tailed", imbalance_ratio=args.imbalance_ratio, seed=0)
        print(f"long_tailed train rows per class: {sorted(kept_rows.values(), reverse=True)}", flush=True)
        datasets = {"full": args.embeddings, "long_tailed": tmp / "long_tailed"}
        standardize_options = [choice == "on" for choice in args.standardize]
        combinations = itertools.product(datasets, args.features, standardize_options, IMBALANCE_OPTIONS, args.seeds)
        for dataset, feature, standardize, imbalance, seed in combinations:
            metrics = train_classifier(
                datasets[dataset], tmp / "model", feature=feature, standardize=standardize, imbalance=imbalance,
                seed=seed, overwrite=True,
            )
            run = {"dataset": dataset, "feature": feature, "standardize": standardize, "imbalance": imbalance, "seed": seed,
                   **{k: metrics[k] for k in ("val_accuracy", "val_macro_f1", "learning_rate", "best_epoch", "train_rows")}}
            runs.append(run)
            print(json.dumps(run), flush=True)

    rows = summarise(runs)
    print(markdown_table(rows))
    if args.output:
        args.output.write_text(json.dumps({"runs": runs, "summary": rows}, indent=1))
    print(json.dumps({"summary": rows, "seconds": round(time.perf_counter() - started)}))


if __name__ == "__main__":
    main()
