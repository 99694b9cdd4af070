"""Train stage: a linear classifier on DINOv2 embeddings with Lightning, written as a model folder.

The features and labels are read from the embeddings Parquet with pyarrow into
in-memory tensors, and batches are sliced from those tensors in the training
process (no DataLoader workers). The model is one ``nn.Linear`` with
log-softmax and negative log-likelihood, trained with Adam. Its learning rate
comes from Lightning's learning-rate finder unless given. Training stops early
on validation loss, and the weights of the best epoch are kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.tuner import Tuner
from torch import nn

from snakeclef import storage
from snakeclef.models.classifier import FEATURES, METRICS_FILE, LabelMap, is_complete, save_model_folder

logger = logging.getLogger(__name__)

EMBED_REPORT_FILE = "_embed_report.json"
TRAIN_REPORT_FILE = "_train_report.json"
IMBALANCE_OPTIONS = ("none", "logit_adjustment", "class_weights")
DEFAULT_LEARNING_RATE = 1e-3  # used only when the learning-rate finder cannot suggest one
# The finder's curve is flat and noisy around its minimum, so the training rate is taken from the
# middle of the band of rates whose loss is within LR_FINDER_BAND of the lowest, divided by
# LR_FINDER_DIVISOR. Measured on ph-snakes with dinov2-small cls features over 5 seeds: with 300
# steps the band's middle sat at 0.04-0.08, while the lowest point alone moved over 0.03-0.10
# (0.06-0.19 with 100 steps), and fixed rates of 1.5e-3 to 3e-3 trained best. On cls_last4 the
# chosen rates spanned 5e-4 to 9e-4 (scripts/measure_heldout.py, docs/benchmarks.md).
LR_FINDER_STEPS = 300
LR_FINDER_BAND = 0.05
LR_FINDER_DIVISOR = 30.0
Imbalance = Literal["none", "logit_adjustment", "class_weights"]


@dataclass
class EmbeddingData:
    """Labelled feature rows read from an embeddings Parquet folder."""

    features: np.ndarray  # (n, feature_dim), float32
    class_ids: np.ndarray  # (n,), int64
    split: np.ndarray | None  # (n,), object: "train"/"val"/other/None, or None without a split column
    counts: dict[str, int]  # rows read, rejected and kept, by reason


def read_embeddings(embeddings_path: str | os.PathLike, *, feature: str = "cls_last4") -> EmbeddingData:
    """Read one feature column and the labels; rows with an ``error``, no label or non-finite features are excluded and counted."""
    if feature not in FEATURES:
        raise ValueError(f"feature={feature!r} is not supported; use one of {FEATURES}.")
    path = storage.strip_file_scheme(embeddings_path)
    if not Path(path).exists():
        raise FileNotFoundError(f"Embeddings Parquet {path} not found; run the Embed stage first.")

    dataset = ds.dataset(path, format="parquet")
    missing = {feature, "class_id"} - set(dataset.schema.names)
    if missing:
        raise ValueError(
            f"Embeddings Parquet {path} lacks columns {sorted(missing)}; it has {dataset.schema.names}. "
            "Delete that folder and run the Embed stage again (runs from before cls_last4 existed lack it), "
            "or choose a feature it has, such as --feature cls."
        )
    order_keys = [name for name in ("image_path", "observation_id") if name in dataset.schema.names]
    columns = [name for name in (feature, "class_id", "error", "split", *order_keys) if name in dataset.schema.names]
    table = dataset.to_table(columns=columns)
    # Spark writes rows in an order that changes from run to run, so the rows
    # are put in a fixed order before the seeded split and shuffles see them.
    if order_keys:
        table = table.sort_by([(name, "ascending") for name in order_keys])
    counts = {"rows_read": table.num_rows}

    keep = pc.is_valid(table[feature])
    if "error" in columns:
        has_error = pc.is_valid(table["error"])
        counts["rows_with_error"] = int(pc.sum(has_error).as_py() or 0)
        keep = pc.and_(keep, pc.invert(has_error))
    counts["rows_unlabeled"] = int(pc.sum(pc.and_(keep, pc.is_null(table["class_id"]))).as_py() or 0)
    keep = pc.and_(keep, pc.is_valid(table["class_id"]))
    table = table.filter(keep)

    features = _list_column_to_matrix(table[feature], name=feature, source=path)
    finite = np.isfinite(features).all(axis=1)
    counts["rows_nonfinite"] = int((~finite).sum())
    features = np.ascontiguousarray(features[finite])
    class_ids = table["class_id"].to_numpy().astype(np.int64)[finite]
    split = table["split"].to_numpy(zero_copy_only=False)[finite] if "split" in columns else None
    counts["rows_used"] = len(class_ids)

    logger.info("Read %s from %s: %s", feature, path, counts)
    return EmbeddingData(features=features, class_ids=class_ids, split=split, counts=counts)


def _list_column_to_matrix(column: pa.ChunkedArray, *, name: str, source: str) -> np.ndarray:
    """Turn a list<float> column of equal-length lists into an (n, width) float32 matrix."""
    array = column.combine_chunks()
    n = len(array)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    if lengths.min() != lengths.max():
        raise ValueError(f"Column {name!r} in {source} has lists of lengths {lengths.min()} to {lengths.max()}; all must be equal.")
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(n, int(lengths[0]))


def split_train_val(
    class_ids: np.ndarray, split: np.ndarray | None, *, seed: int = 0, val_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray, str]:
    """Return (train_rows, val_rows, how) as sorted row-index arrays.

    When ``split`` has both "train" and "val" values, those rows are used as
    given (rows with other values are left out). Otherwise each class is split
    at random (``seed``) into ``1 - val_fraction`` / ``val_fraction``, at least
    one validation row for a class with two or more rows, and a class with a
    single row is kept in training.
    """
    if split is not None:
        values = set(split.tolist())
        if {"train", "val"} <= values:
            train_rows = np.flatnonzero(split == "train")
            val_rows = np.flatnonzero(split == "val")
            left_out = len(class_ids) - len(train_rows) - len(val_rows)
            if left_out:
                logger.info("Left out %d rows whose split is neither train nor val", left_out)
            return train_rows, val_rows, "split column"

    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    order = np.argsort(class_ids, kind="stable")
    boundaries = np.flatnonzero(np.diff(class_ids[order])) + 1
    for rows in np.split(order, boundaries):
        rows = rng.permutation(rows)
        n_val = 0 if len(rows) < 2 else max(1, round(val_fraction * len(rows)))
        val_parts.append(rows[:n_val])
        train_parts.append(rows[n_val:])
    train_rows = np.sort(np.concatenate(train_parts)) if train_parts else np.zeros(0, np.int64)
    val_rows = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, np.int64)
    return train_rows, val_rows, f"stratified {1 - val_fraction:.0%}/{val_fraction:.0%}, seed {seed}"


def class_balanced_weights(class_counts: np.ndarray, *, beta: float = 0.999) -> np.ndarray:
    """Per-class loss weights ``(1 - beta) / (1 - beta ** n_c)`` (the effective number of samples), mean 1 over classes."""
    counts = np.asarray(class_counts, dtype=np.float64)
    weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
    return (weights * len(counts) / weights.sum()).astype(np.float32)


def macro_f1(predicted: torch.Tensor, target: torch.Tensor, n_classes: int) -> float:
    """Mean F1 over the classes that occur in ``target`` or ``predicted`` (sklearn's ``average="macro"``)."""
    true_positive = torch.bincount(target[predicted == target], minlength=n_classes).double()
    support = torch.bincount(target, minlength=n_classes).double() + torch.bincount(predicted, minlength=n_classes).double()
    present = support > 0
    if not present.any():
        return float("nan")
    return float((2 * true_positive[present] / support[present]).mean())


class ShuffledBatches(torch.utils.data.IterableDataset):
    """Batches sliced from in-memory tensors; shuffled with a seeded generator that advances each pass."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, *, batch_size: int, shuffle: bool, seed: int = 0) -> None:
        self.features, self.targets = features, targets
        self.batch_size, self.shuffle = batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.targets)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                yield self.features[start:start + self.batch_size], self.targets[start:start + self.batch_size]
            else:
                rows = order[start:start + self.batch_size]
                yield self.features[rows], self.targets[rows]


def make_loader(features: torch.Tensor, targets: torch.Tensor, *, batch_size: int, shuffle: bool, seed: int = 0):
    batches = ShuffledBatches(features, targets, batch_size=batch_size, shuffle=shuffle, seed=seed)
    return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=0)


class LinearClassifierModule(L.LightningModule):
    """One ``nn.Linear`` with log-softmax + NLL, optionally label-smoothed, logit-adjusted or class-weighted.

    With ``logit_offsets`` (``tau * log(class_prior)``) the loss is computed on
    ``logits + logit_offsets`` while accuracy and F1 use the plain logits (the
    logit-adjusted loss). ``class_weights`` weight the NLL per class.
    ``label_smoothing`` (epsilon) mixes the one-hot target with a uniform one:
    the loss is ``(1 - epsilon) * NLL + epsilon * mean over classes of -log p``;
    0 gives the plain NLL.
    """

    def __init__(
        self,
        feature_dim: int,
        n_classes: int,
        learning_rate: float = DEFAULT_LEARNING_RATE,
        *,
        weight_decay: float = 0.0,
        label_smoothing: float = 0.0,
        class_weights: torch.Tensor | None = None,
        logit_offsets: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["class_weights", "logit_offsets"])
        self.learning_rate = learning_rate
        self.n_classes = n_classes
        self.linear = nn.Linear(feature_dim, n_classes)
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.register_buffer("logit_offsets", logit_offsets, persistent=False)
        self._val_predicted: list[torch.Tensor] = []
        self._val_target: list[torch.Tensor] = []

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.linear(features), dim=1)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
        if self.logit_offsets is not None:
            logits = logits + self.logit_offsets
        # cross_entropy is log-softmax + NLL in one call, and applies the label smoothing.
        return F.cross_entropy(logits, target, weight=self.class_weights, label_smoothing=label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        features, target = batch
        logits = self.linear(features)
        loss = self._loss(logits, target, label_smoothing=self.hparams.label_smoothing)
        accuracy = (logits.argmax(dim=1) == target).float().mean()
        self.log_dict({"train_loss": loss, "train_accuracy": accuracy}, on_step=False, on_epoch=True, batch_size=len(target))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        features, target = batch
        logits = self.linear(features)
        # Validation scores the plain NLL, so early stopping follows the fit to the labels themselves.
        self.log("val_loss", self._loss(logits, target), on_epoch=True, batch_size=len(target))
        self._val_predicted.append(logits.argmax(dim=1))
        self._val_target.append(target)

    def on_validation_epoch_end(self) -> None:
        predicted, target = torch.cat(self._val_predicted), torch.cat(self._val_target)
        self._val_predicted.clear()
        self._val_target.clear()
        self.log("val_accuracy", (predicted == target).float().mean())
        self.log("val_macro_f1", macro_f1(predicted, target, self.n_classes))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.learning_rate, weight_decay=self.hparams.weight_decay)


def train_classifier(
    embeddings_path: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    feature: str = "cls_last4",
    learning_rate: float | None = None,
    max_epochs: int = 100,
    batch_size: int | None = None,
    patience: int = 10,
    seed: int = 0,
    standardize: bool = True,
    imbalance: Imbalance = "logit_adjustment",
    logit_adjustment_tau: float = 1.0,
    class_weight_beta: float = 0.999,
    weight_decay: float = 0.0,
    label_smoothing: float = 0.1,
    val_fraction: float = 0.2,
    holdout_split: str | None = None,
    refit: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train the linear classifier on ``embeddings_path`` and write the model folder ``model_dir``; return its metrics.

    ``learning_rate=None`` runs Lightning's learning-rate finder and trains
    with its suggestion. ``batch_size=None`` takes an eighth of the training
    rows, clipped to [32, 1024], so that a small dataset still gets several
    optimizer steps per epoch and a large one few, cheap steps. ``standardize`` scales each feature to zero mean and
    unit variance over the training rows. ``imbalance`` is "none",
    "logit_adjustment" (the loss is computed on ``logits + tau * log(class_prior)``) or
    "class_weights" (class-balanced NLL weights, effective number with
    ``class_weight_beta``). ``label_smoothing`` is the training loss's
    epsilon (validation scores the plain NLL). Standardisation with logit
    adjustment gave the best validation macro-F1 in
    scripts/compare_training_options.py on ph-snakes dinov2-small embeddings
    and on a long-tailed subsample of their train split. Label smoothing 0.1
    added about 2 points of accuracy on ph-snakes cls_last4 features, held
    out and in cross-validation (scripts/measure_heldout.py, docs/benchmarks.md). A finished ``model_dir`` is left as it is and its
    metrics returned unless ``overwrite``. The same seed and data give the
    same weights and validation figures. Rows whose split is
    ``holdout_split`` (the pipeline's evaluation split) are left out of
    training, validation and the learning-rate search, so the evaluation
    scores stay held out. With ``refit``, the saved model is trained again
    from scratch on the training and validation rows together, for the best
    epoch count and at the learning rate that validation chose. The reported
    validation figures are those of the selection run.
    """
    _check_options(
        feature=feature, imbalance=imbalance, batch_size=batch_size, max_epochs=max_epochs, learning_rate=learning_rate,
        label_smoothing=label_smoothing,
    )
    model_dir = Path(storage.strip_file_scheme(model_dir))
    if is_complete(model_dir) and not overwrite:
        logger.info("Model folder %s is complete; not training again", model_dir)
        return json.loads((model_dir / METRICS_FILE).read_text())
    _remove_stale_work(model_dir)
    started = time.perf_counter()

    embed_report = _read_embed_report(embeddings_path)
    data = read_embeddings(embeddings_path, feature=feature)
    if holdout_split is not None:
        data = _drop_split(data, holdout_split)
    _check_feature_width(data.features.shape[1], embed_report, feature=feature, source=str(embeddings_path))
    train_rows, val_rows, split_source = split_train_val(data.class_ids, data.split, seed=seed, val_fraction=val_fraction)
    if len(train_rows) == 0:
        raise ValueError(f"No training rows in {embeddings_path} (counts: {data.counts}); check the split column and errors.")

    label_map = LabelMap.from_labels(data.class_ids[train_rows])
    class_counts = np.bincount(label_map.to_indices(data.class_ids[train_rows]), minlength=len(label_map))
    known = np.isin(data.class_ids[val_rows], label_map.class_ids)
    if not known.all():
        logger.warning("Left %d validation rows out: their classes have no training rows", int((~known).sum()))
    val_rows = val_rows[known]
    logger.info("Split (%s): %d training rows, %d validation rows, %d classes", split_source, len(train_rows), len(val_rows), len(label_map))

    train_x, val_x, standardization = _prepare_features(data.features, train_rows, val_rows, standardize=standardize)
    train_y = torch.from_numpy(label_map.to_indices(data.class_ids[train_rows]))
    val_y = torch.from_numpy(label_map.to_indices(data.class_ids[val_rows]))
    read_counts = data.counts
    del data

    L.seed_everything(seed, workers=False, verbose=False)
    def make_module() -> LinearClassifierModule:
        return LinearClassifierModule(
            train_x.shape[1],
            len(label_map),
            learning_rate or DEFAULT_LEARNING_RATE,
            weight_decay=weight_decay,
            label_smoothing=label_smoothing,
            **_imbalance_tensors(class_counts, imbalance=imbalance, tau=logit_adjustment_tau, beta=class_weight_beta),
        )

    module = make_module()
    batch_size = batch_size or default_batch_size(len(train_y))
    train_loader = make_loader(train_x, train_y, batch_size=batch_size, shuffle=True, seed=seed)
    val_loader = make_loader(val_x, val_y, batch_size=max(batch_size, 8192), shuffle=False) if len(val_y) else None

    # The work folder sits beside model_dir, so its log moves into the model folder with a rename.
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.work-", dir=model_dir.parent))
    try:
        fit = _fit(module, train_loader, val_loader, work_dir=work_dir, learning_rate=learning_rate, max_epochs=max_epochs, patience=patience)
        if refit and len(val_y):
            L.seed_everything(seed, workers=False, verbose=False)
            module = make_module()
            module.learning_rate = fit["learning_rate"]
            all_loader = make_loader(torch.cat([train_x, val_x]), torch.cat([train_y, val_y]), batch_size=batch_size, shuffle=True, seed=seed)
            _refit(module, all_loader, epochs=fit["best_epoch"] + 1, work_dir=work_dir)
        metrics = {
            **fit,
            "split": split_source,
            "train_rows": len(train_rows),
            "val_rows": len(val_rows),
            "n_classes": len(label_map),
            **read_counts,
            "train_seconds": round(time.perf_counter() - started, 2),
        }
        options = {
            "learning_rate": fit["learning_rate"], "learning_rate_from_finder": fit["learning_rate_from_finder"], "max_epochs": max_epochs,
            "batch_size": batch_size, "patience": patience, "seed": seed, "standardize": standardize, "imbalance": imbalance,
            "logit_adjustment_tau": logit_adjustment_tau if imbalance == "logit_adjustment" else None,
            "class_weight_beta": class_weight_beta if imbalance == "class_weights" else None,
            "weight_decay": weight_decay, "label_smoothing": label_smoothing, "val_fraction": val_fraction, "holdout_split": holdout_split,
            "refit_on_train_and_val": bool(refit and len(val_y)),
        }
        info = {
            "backbone": embed_report.get("backbone"), "hidden_size": embed_report.get("hidden_size"),
            "dct_k": embed_report.get("dct_k"), "last_blocks": embed_report.get("last_blocks"), "precision": embed_report.get("precision"), "feature": feature,
            "standardization": standardization, "class_counts": class_counts.tolist(), "options": options,
            "log_probs": "balanced (prior-free) scores" if imbalance == "logit_adjustment" else "calibrated to the training class frequencies",
        }
        (work_dir / TRAIN_REPORT_FILE).write_text(json.dumps({**metrics, "options": options}, indent=1))
        state = module.state_dict()
        save_model_folder(
            model_dir, weight=state["linear.weight"], bias=state["linear.bias"], label_map=label_map, info=info, metrics=metrics,
            extra_files={"training_log": work_dir / "training_log", TRAIN_REPORT_FILE: work_dir / TRAIN_REPORT_FILE},
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    logger.info("Trained %s classifier in %.1f s: %s", feature, metrics["train_seconds"], {k: metrics[k] for k in ("val_accuracy", "val_macro_f1")})
    return metrics


def _refit(module, loader, *, epochs: int, work_dir: Path) -> None:
    """Train ``module`` for a fixed number of epochs on ``loader``, with no validation, checkpoint or log."""
    trainer = L.Trainer(
        accelerator="auto", devices=1, max_epochs=epochs, default_root_dir=work_dir / "refit", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, deterministic="warn",
    )
    logger.info("Refitting on the training and validation rows for %d epochs (the selection run's best epoch + 1)", epochs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
        # The refit has no validation rows left by design.
        warnings.filterwarnings("ignore", message=".*validation_step. but have no .val_dataloader.*")
        trainer.fit(module, loader)


def default_batch_size(n_train_rows: int) -> int:
    """Return the default batch size: an eighth of the training rows, clipped to [32, 1024]."""
    return int(min(1024, max(32, n_train_rows // 8)))


def make_trainer(work_dir: Path, *, max_epochs: int, patience: int, monitor: str = "val_loss", callbacks: list | None = None) -> L.Trainer:
    """Build the Trainer the Train stage uses: early stopping and the best checkpoint on ``monitor``, a CSV log."""
    checkpoint = ModelCheckpoint(dirpath=work_dir / "checkpoints", monitor=monitor, save_top_k=1, save_weights_only=True)
    return L.Trainer(
        accelerator="auto", devices=1, max_epochs=max_epochs, default_root_dir=work_dir,
        logger=CSVLogger(work_dir, name="training_log", version=""),
        callbacks=[EarlyStopping(monitor=monitor, patience=patience), checkpoint, *(callbacks or [])],
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=50, deterministic="warn",
        num_sanity_val_steps=0,
    )


def _fit(module, train_loader, val_loader, *, work_dir: Path, learning_rate: float | None, max_epochs: int, patience: int) -> dict[str, Any]:
    """Run the LR finder (when ``learning_rate`` is None) and the training; load the best epoch's weights into ``module``."""
    monitor = "val_loss" if val_loader is not None else "train_loss"
    trainer = make_trainer(work_dir, max_epochs=max_epochs, patience=patience, monitor=monitor)
    checkpoint = trainer.checkpoint_callback
    with warnings.catch_warnings():
        # Batches come from in-memory tensors on purpose: worker processes would only copy them.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        if learning_rate is None and max_epochs * len(train_loader) < LR_FINDER_STEPS:
            # The finder runs inside the training loop, so max_epochs caps its steps too, and a
            # cut-short search picks a meaningless rate.
            logger.warning(
                "Skipped the learning-rate finder: it needs %d steps, but max_epochs=%d x %d batches allows %d; "
                "training with learning_rate=%g. Raise max_epochs or pass a learning rate.",
                LR_FINDER_STEPS, max_epochs, len(train_loader), max_epochs * len(train_loader), DEFAULT_LEARNING_RATE,
            )
            learning_rate = DEFAULT_LEARNING_RATE
        from_finder = learning_rate is None
        if from_finder:
            learning_rate = _find_learning_rate(trainer, module, train_loader, val_loader)
        module.learning_rate = learning_rate
        trainer.fit(module, train_loader, val_loader)

    best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
    module.load_state_dict(best["state_dict"])
    logged = {key: float(value) for key, value in trainer.callback_metrics.items()}
    best_epoch = int(best["epoch"])
    metrics = {"learning_rate": learning_rate, "learning_rate_from_finder": from_finder, "epochs": trainer.current_epoch, "best_epoch": best_epoch}
    metrics.update(_epoch_metrics(work_dir / "training_log" / "metrics.csv", best_epoch) or logged)
    return metrics


def _find_learning_rate(trainer: L.Trainer, module, train_loader, val_loader) -> float:
    """Run Lightning's learning-rate finder and return the middle of its near-lowest-loss band over ``LR_FINDER_DIVISOR``.

    The band is the rates whose smoothed loss is within ``LR_FINDER_BAND``
    of the lowest; its middle is the geometric mean of its ends. Lightning's
    own suggestion (the steepest descent of the loss curve) lands on the flat
    start of the curve for a linear model, whose loss keeps falling up to
    large rates.
    """
    finder = Tuner(trainer).lr_find(
        module, train_dataloaders=train_loader, val_dataloaders=val_loader, min_lr=1e-6, max_lr=1.0,
        num_training=LR_FINDER_STEPS, update_attr=False,
    )
    rates = np.asarray(finder.results.get("lr", []) if finder is not None else [], dtype=np.float64)
    losses = np.asarray(finder.results.get("loss", []) if finder is not None else [], dtype=np.float64)
    losses = np.where(np.isfinite(losses), losses, np.inf)
    if len(losses) < 10 or not np.isfinite(losses).any():
        logger.warning("Learning-rate finder gave no usable losses; training with learning_rate=%g", DEFAULT_LEARNING_RATE)
        return DEFAULT_LEARNING_RATE

    # The smoothed losses of the first few dozen steps sit below the true loss and rise while the
    # running average warms up (Lightning 2.6), so the search for the minimum starts after that peak.
    warm_up = losses[: int(len(losses) * 0.6)]
    peak = int(np.argmax(np.where(np.isfinite(warm_up), warm_up, -np.inf)))
    best = peak + int(np.argmin(losses[peak:]))
    band = rates[peak:][losses[peak:] <= losses[best] + LR_FINDER_BAND * abs(losses[best])]
    middle = float(np.sqrt(band.min() * band.max()))
    # NOTE: the choice still moves with the data order: over 5 seeds on ph-snakes it spanned a
    # factor of 1.8 to 1.9. Pass learning_rate= for runs that must be comparable.
    learning_rate = middle / LR_FINDER_DIVISOR
    logger.info(
        "Learning-rate finder: lowest loss %.3f at %.3g, band within %.0f%% of it %.3g-%.3g, training with %.3g "
        "(the band's geometric middle / %g)",
        losses[best], rates[best], 100 * LR_FINDER_BAND, band.min(), band.max(), learning_rate, LR_FINDER_DIVISOR,
    )
    return learning_rate


def _epoch_metrics(csv_path: Path, epoch: int) -> dict[str, float]:
    """Collect the figures the CSVLogger wrote for ``epoch`` in metrics.csv (empty when the file is missing)."""
    import csv

    if not csv_path.exists():
        return {}
    merged: dict[str, float] = {}
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("epoch") and int(row["epoch"]) == epoch:
                merged.update({key: float(value) for key, value in row.items() if value and key not in ("epoch", "step")})
    return merged


def _drop_split(data: EmbeddingData, holdout_split: str) -> EmbeddingData:
    """Remove the rows of ``holdout_split``; they are counted as ``rows_held_out``."""
    if data.split is None:
        return data
    keep = data.split != holdout_split
    counts = {**data.counts, "rows_held_out": int((~keep).sum()), "rows_used": int(keep.sum())}
    logger.info("Held out %d rows of split %r from training and validation", counts["rows_held_out"], holdout_split)
    return EmbeddingData(features=data.features[keep], class_ids=data.class_ids[keep], split=data.split[keep], counts=counts)


def _prepare_features(features: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray, *, standardize: bool):
    """Return (train, val) float32 tensors and the standardisation dict for model.json (None when off)."""
    train_x = torch.from_numpy(features[train_rows])
    val_x = torch.from_numpy(features[val_rows])
    if not standardize:
        return train_x, val_x, None
    mean = train_x.mean(dim=0, dtype=torch.float64).float()
    std = train_x.double().std(dim=0, correction=0).float() if len(train_x) > 1 else torch.ones_like(mean)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    train_x.sub_(mean).div_(std)
    val_x.sub_(mean).div_(std)
    return train_x, val_x, {"mean": mean.tolist(), "std": std.tolist()}


def _imbalance_tensors(class_counts: np.ndarray, *, imbalance: str, tau: float, beta: float) -> dict[str, torch.Tensor | None]:
    if imbalance == "logit_adjustment":
        prior = class_counts / class_counts.sum()
        return {"logit_offsets": torch.from_numpy((tau * np.log(prior)).astype(np.float32)), "class_weights": None}
    if imbalance == "class_weights":
        return {"class_weights": torch.from_numpy(class_balanced_weights(class_counts, beta=beta)), "logit_offsets": None}
    return {"class_weights": None, "logit_offsets": None}


def _check_options(
    *, feature: str, imbalance: str, batch_size: int, max_epochs: int, learning_rate: float | None, label_smoothing: float = 0.0
) -> None:
    if feature not in FEATURES:
        raise ValueError(f"feature={feature!r} is not supported; use one of {FEATURES}.")
    if imbalance not in IMBALANCE_OPTIONS:
        raise ValueError(f"imbalance={imbalance!r} is not supported; use one of {IMBALANCE_OPTIONS}.")
    if (batch_size is not None and batch_size < 1) or max_epochs < 1:
        raise ValueError(f"batch_size={batch_size} and max_epochs={max_epochs} must both be at least 1.")
    if learning_rate is not None and not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate} must be positive, or None to use the learning-rate finder.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1); 0 trains on the plain NLL.")


def _read_embed_report(embeddings_path: str | os.PathLike) -> dict[str, Any]:
    path = Path(storage.strip_file_scheme(embeddings_path)) / EMBED_REPORT_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the model folder needs the backbone reference (backbone, hidden_size, dct_k) that the "
            "Embed stage writes there. Run the Embed stage, or write that JSON beside the Parquet files."
        )
    report = json.loads(path.read_text())
    if not report.get("backbone"):
        raise ValueError(f"{path} has no 'backbone' entry; the model folder must name the backbone its features came from.")
    return report


def _check_feature_width(width: int, report: dict[str, Any], *, feature: str, source: str) -> None:
    if feature == "cls":
        expected = report.get("hidden_size")
    elif feature == "cls_last4":
        expected = report["hidden_size"] * report["last_blocks"] if report.get("hidden_size") and report.get("last_blocks") else None
    else:
        expected = report["dct_k"] ** 2 if report.get("dct_k") else None
    if width and expected and width != expected:
        raise ValueError(
            f"Column {feature!r} in {source} has {width} values per row, but {EMBED_REPORT_FILE} (backbone "
            f"{report.get('backbone')!r}) implies {expected}; the Parquet and its report do not match."
        )


def _remove_stale_work(model_dir: Path) -> None:
    """Delete temporary folders that an interrupted run left beside ``model_dir``."""
    if not model_dir.parent.exists():
        return
    for stale in model_dir.parent.glob(f".{model_dir.name}.*"):
        if stale.is_dir() and (".tmp-" in stale.name or ".work-" in stale.name):
            logger.info("Removing %s left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the linear classifier on an embeddings Parquet folder.")
    parser.add_argument("embeddings", help="embeddings Parquet folder (with _embed_report.json)")
    parser.add_argument("model_dir", help="model folder to write")
    parser.add_argument("--feature", choices=FEATURES, default="cls_last4")
    parser.add_argument("--learning-rate", type=float, default=None, help="fixed Adam learning rate; default: the LR finder's suggestion")
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per optimizer step; default: an eighth of the training rows, within [32, 1024]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-standardize", dest="standardize", action="store_false")
    parser.add_argument("--imbalance", choices=IMBALANCE_OPTIONS, default="logit_adjustment")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="epsilon of the training loss; 0 for the plain NLL")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    metrics = train_classifier(
        args.embeddings, args.model_dir, feature=args.feature, learning_rate=args.learning_rate, max_epochs=args.max_epochs,
        batch_size=args.batch_size, seed=args.seed, standardize=args.standardize, imbalance=args.imbalance,
        label_smoothing=args.label_smoothing, overwrite=args.overwrite,
    )
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
