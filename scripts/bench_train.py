"""Benchmark the Train stage at SnakeCLEF scale on synthetic embeddings.

Writes a synthetic embeddings Parquet (default 182,261 rows x 768 features,
1,784 classes with long-tailed counts), then measures in this one process:

1. one training epoch with the Lightning module and Trainer the stage uses,
   and the same epoch as a plain PyTorch loop over the same tensors, batches
   and optimizer (the ratio of the two is Lightning's overhead);
2. a full ``train_classifier`` run with its defaults (Parquet read, LR finder,
   early stopping, model folder), its seconds and this process's peak RSS.

The last output line is one JSON object.

    python scripts/bench_train.py                      # full size
    python scripts/bench_train.py --rows 20000 --classes 200
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from snakeclef import train


def long_tailed_counts(n_rows: int, n_classes: int, *, exponent: float = 1.0, min_count: int = 2) -> np.ndarray:
    """Per-class row counts proportional to ``1 / rank ** exponent``, at least ``min_count``, summing to ``n_rows``."""
    weights = 1.0 / np.arange(1, n_classes + 1) ** exponent
    counts = np.maximum(min_count, np.floor(weights / weights.sum() * n_rows)).astype(np.int64)
    counts[0] += n_rows - counts.sum()
    return counts


def write_synthetic_embeddings(path: Path, *, n_rows: int, n_features: int, n_classes: int, seed: int = 0) -> None:
    """Write Gaussian class clusters as an embeddings Parquet folder with ``_embed_report.json``."""
    rng = np.random.default_rng(seed)
    counts = long_tailed_counts(n_rows, n_classes)
    class_ids = np.repeat(np.arange(n_classes, dtype=np.int32), counts)
    rng.shuffle(class_ids)
    centres = rng.normal(size=(n_classes, n_features)).astype(np.float32)
    path.mkdir(parents=True)
    for part, rows in enumerate(np.array_split(np.arange(n_rows), 8)):
        features = centres[class_ids[rows]] + rng.normal(scale=12.0, size=(len(rows), n_features)).astype(np.float32)
        offsets = pa.array(np.arange(len(rows) + 1, dtype=np.int32) * n_features)
        table = pa.table({
            "image_path": pa.array([f"img_{i}.jpg" for i in rows]),
            "observation_id": pa.array(rows, pa.int64()),
            "class_id": pa.array(class_ids[rows]),
            "cls": pa.ListArray.from_arrays(offsets, pa.array(features.ravel())),
            "error": pa.nulls(len(rows), pa.string()),
        })
        pq.write_table(table, path / f"part-{part:05d}.parquet")
    report = {"backbone": "synthetic", "hidden_size": n_features, "dct_k": 8, "precision": "fp32", "rows": n_rows}
    (path / "_embed_report.json").write_text(json.dumps(report))


class EpochTimer(L.Callback):
    """Seconds of each training epoch, validation excluded."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def time_epochs(train_x, train_y, val_x, val_y, *, n_classes: int, batch_size: int, epochs: int, work_dir: Path) -> tuple[float, float]:
    """Return (Lightning seconds, plain loop seconds): the fastest of ``epochs`` training epochs each, run alternately.

    Alternating the two keeps a change in the machine's load from favouring one of them.
    """
    learning_rate = 1e-3
    L.seed_everything(0, verbose=False)
    module = train.LinearClassifierModule(train_x.shape[1], n_classes, learning_rate)
    train_loader = train.make_loader(train_x, train_y, batch_size=batch_size, shuffle=True)
    val_loader = train.make_loader(val_x, val_y, batch_size=8192, shuffle=False)

    torch.manual_seed(0)
    linear = torch.nn.Linear(train_x.shape[1], n_classes)
    optimizer = torch.optim.Adam(linear.parameters(), lr=learning_rate)
    batches = train.ShuffledBatches(train_x, train_y, batch_size=batch_size, shuffle=True)

    lightning_seconds, plain_seconds = [], []
    for epoch in range(epochs):
        timer = EpochTimer()
        trainer = train.make_trainer(work_dir / f"epoch-{epoch}", max_epochs=1, patience=1, callbacks=[timer])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, train_loader, val_loader)
        lightning_seconds += timer.seconds

        start = time.perf_counter()
        for features, target in batches:
            loss = F.nll_loss(F.log_softmax(linear(features), dim=1), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        plain_seconds.append(time.perf_counter() - start)
        print(f"epoch {epoch}: Lightning {lightning_seconds[-1]:.2f} s, plain loop {plain_seconds[-1]:.2f} s", flush=True)
    return min(lightning_seconds), min(plain_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=182_261)
    parser.add_argument("--features", type=int, default=768)
    parser.add_argument("--classes", type=int, default=1_784)
    parser.add_argument("--batch-size", type=int, default=None, help="default: train_classifier's default")
    parser.add_argument("--timing-epochs", type=int, default=2, help="epochs timed in each of Lightning and the plain loop")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap of the full run; default: train_classifier's default")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        write_synthetic_embeddings(tmp / "embeddings", n_rows=args.rows, n_features=args.features, n_classes=args.classes)
        write_s = time.perf_counter() - start

        max_epochs = {"max_epochs": args.max_epochs} if args.max_epochs else {}
        start = time.perf_counter()
        metrics = train.train_classifier(tmp / "embeddings", tmp / "model", feature="cls", batch_size=args.batch_size, **max_epochs)
        total_train_s = time.perf_counter() - start
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        data = train.read_embeddings(tmp / "embeddings", feature="cls")
        train_rows, val_rows, _ = train.split_train_val(data.class_ids, data.split)
        batch_size = args.batch_size or train.default_batch_size(len(train_rows))
        label_map = train.LabelMap.from_labels(data.class_ids[train_rows])
        tensors = [torch.from_numpy(data.features[train_rows]), torch.from_numpy(label_map.to_indices(data.class_ids[train_rows]))]
        known = np.isin(data.class_ids[val_rows], label_map.class_ids)
        tensors += [torch.from_numpy(data.features[val_rows[known]]), torch.from_numpy(label_map.to_indices(data.class_ids[val_rows[known]]))]
        del data
        lightning_epoch_s, plain_epoch_s = time_epochs(
            *tensors, n_classes=len(label_map), batch_size=batch_size, epochs=args.timing_epochs, work_dir=tmp / "timing"
        )

    result = {
        "rows": args.rows, "features": args.features, "classes": args.classes, "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(), "write_parquet_s": round(write_s, 1),
        "lightning_epoch_s": round(lightning_epoch_s, 2), "plain_epoch_s": round(plain_epoch_s, 2),
        "ratio": round(lightning_epoch_s / plain_epoch_s, 3), "total_train_s": round(total_train_s, 1),
        "epochs": metrics["epochs"], "best_epoch": metrics["best_epoch"], "learning_rate": metrics["learning_rate"],
        "val_accuracy": round(metrics["val_accuracy"], 4), "val_macro_f1": round(metrics["val_macro_f1"], 4),
        "peak_rss_mb": round(peak_rss_mb),
    }
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
