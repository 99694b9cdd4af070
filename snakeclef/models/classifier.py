"""The trained linear classifier on the inference side: label map, model folder, log-probabilities.

This module imports only torch, numpy, safetensors and the standard library
(no Lightning, no pyspark), because the offline predictor runs where those may
be missing. Loading never executes code: the weights are safetensors and
everything else is JSON.

Model folder layout::

    classifier.safetensors   "weight" (n_classes, feature_dim), "bias" (n_classes,)
    label_map.json           {"class_ids": [...]}: output index -> class_id
    model.json               backbone reference, feature, standardisation, class counts, options
    metrics.json             validation metrics
    _SUCCESS                 written last; the folder is complete only when it exists
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from snakeclef import storage

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "classifier.safetensors"
LABEL_MAP_FILE = "label_map.json"
MODEL_INFO_FILE = "model.json"
METRICS_FILE = "metrics.json"
SUCCESS_FILE = "_SUCCESS"
FEATURES = ("cls", "cls_last4", "dct")


class LabelMap:
    """Ordered ``class_id``s: output index ``i`` of the classifier means ``class_ids[i]``."""

    def __init__(self, class_ids: Iterable[int]) -> None:
        self.class_ids: tuple[int, ...] = tuple(int(class_id) for class_id in class_ids)
        self._index_of = {class_id: index for index, class_id in enumerate(self.class_ids)}
        if len(self._index_of) != len(self.class_ids):
            duplicates = sorted({c for c in self.class_ids if self.class_ids.count(c) > 1})
            raise ValueError(f"Label map has duplicate class_ids {duplicates[:10]}; each class_id must appear once.")

    @classmethod
    def from_labels(cls, class_ids: Iterable[int] | np.ndarray) -> "LabelMap":
        """Build the map from training labels: the sorted distinct class_ids."""
        return cls(sorted({int(class_id) for class_id in np.asarray(class_ids).ravel()}))

    def __len__(self) -> int:
        return len(self.class_ids)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and self.class_ids == other.class_ids

    def __repr__(self) -> str:
        return f"LabelMap({len(self)} classes)"

    def __contains__(self, class_id: object) -> bool:
        return class_id in self._index_of

    def to_indices(self, class_ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Map class_ids to output indices (int64); an unknown class_id raises KeyError."""
        class_ids = np.asarray(class_ids).ravel()
        unknown = sorted({int(c) for c in class_ids if int(c) not in self._index_of})
        if unknown:
            raise KeyError(f"class_ids {unknown[:10]} are not in the label map ({len(self)} classes).")
        return np.fromiter((self._index_of[int(c)] for c in class_ids), dtype=np.int64, count=len(class_ids))

    def to_class_ids(self, indices: Iterable[int] | np.ndarray) -> np.ndarray:
        """Map output indices back to class_ids (int64)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"Output index out of range [0, {len(self)}): got min {indices.min()}, max {indices.max()}.")
        return np.asarray(self.class_ids, dtype=np.int64)[indices]

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"class_ids": list(self.class_ids)}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LabelMap":
        """Load a label map written by :meth:`save` (JSON, a list of integer class_ids)."""
        data = json.loads(Path(path).read_text())
        class_ids = data.get("class_ids") if isinstance(data, dict) else None
        if not isinstance(class_ids, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in class_ids):
            raise ValueError(f"Invalid label map {path}: expected JSON {{\"class_ids\": [int, ...]}}.")
        return cls(class_ids)


@dataclass
class Classifier:
    """A linear classifier over backbone features, as loaded from a model folder.

    ``log_probs`` standardises the features when training did, applies the
    linear layer and returns ``log_softmax`` of the logits. When training used
    logit adjustment, those logits are prior-free (balanced) scores.
    ``calibrated_log_probs`` then adds ``tau * log(class_prior)`` back, which
    gives probabilities calibrated to the training class frequencies. Without
    logit adjustment both methods return the same values.
    """

    weight: np.ndarray  # (n_classes, feature_dim), float32
    bias: np.ndarray  # (n_classes,), float32
    label_map: LabelMap
    info: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def feature(self) -> str:
        return self.info["feature"]

    @property
    def backbone(self) -> str:
        return self.info["backbone"]

    @property
    def feature_dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def class_counts(self) -> np.ndarray:
        return np.asarray(self.info["class_counts"], dtype=np.int64)

    @property
    def class_prior(self) -> np.ndarray:
        """Training class frequencies in label-map order, (n_classes,), summing to 1."""
        counts = self.class_counts.astype(np.float64)
        return counts / counts.sum()

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Linear scores for ``features`` (n, feature_dim) -> (n, n_classes), float32."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"Features have shape {features.shape}, but this classifier expects (n, {self.feature_dim}) "
                f"{self.feature!r} features from backbone {self.backbone!r}."
            )
        standardization = self.info.get("standardization")
        if standardization:
            mean = np.asarray(standardization["mean"], dtype=np.float32)
            std = np.asarray(standardization["std"], dtype=np.float32)
            features = (features - mean) / std
        return features @ self.weight.T + self.bias

    def log_probs(self, features: np.ndarray) -> np.ndarray:
        """Log-probabilities (n, n_classes) the classifier decides with (balanced under logit adjustment)."""
        return _log_softmax(self.logits(features))

    def calibrated_log_probs(self, features: np.ndarray) -> np.ndarray:
        """Log-probabilities (n, n_classes) calibrated to the training class frequencies."""
        logits = self.logits(features)
        tau = float(self.info.get("options", {}).get("logit_adjustment_tau") or 0.0)
        if self.info.get("options", {}).get("imbalance") == "logit_adjustment" and tau:
            logits = logits + np.float32(tau) * np.log(self.class_prior).astype(np.float32)
        return _log_softmax(logits)

    def predict_class_ids(self, features: np.ndarray) -> np.ndarray:
        """Predict one class_id per row (n,): the argmax of :meth:`log_probs` mapped through the label map."""
        return self.label_map.to_class_ids(self.log_probs(features).argmax(axis=1))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def save_model_folder(
    model_dir: str | os.PathLike,
    *,
    weight: np.ndarray | torch.Tensor,
    bias: np.ndarray | torch.Tensor,
    label_map: LabelMap,
    info: dict[str, Any],
    metrics: dict[str, Any],
    extra_files: dict[str, str | os.PathLike] | None = None,
) -> None:
    """Write a complete model folder atomically (a temporary folder renamed into place, ``_SUCCESS`` last).

    ``info`` becomes model.json. It must contain ``feature`` and ``backbone``,
    and should contain ``class_counts`` (training rows per class, in label-map
    order). ``extra_files`` maps a name inside the folder to a local file or
    folder that is moved there.
    """
    weight = torch.as_tensor(np.asarray(weight, dtype=np.float32)).contiguous()
    bias = torch.as_tensor(np.asarray(bias, dtype=np.float32)).contiguous()
    info = {**info, "n_classes": len(label_map), "feature_dim": int(weight.shape[1]) if weight.ndim == 2 else None}
    _check_model(weight.numpy(), bias.numpy(), label_map, info, source=str(model_dir))

    with storage.atomic_path(model_dir) as tmp:
        tmp.mkdir(parents=True)
        save_file({"weight": weight, "bias": bias}, str(tmp / WEIGHTS_FILE))
        label_map.save(tmp / LABEL_MAP_FILE)
        (tmp / MODEL_INFO_FILE).write_text(json.dumps(info, indent=1))
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
        for name, source in (extra_files or {}).items():
            os.replace(source, tmp / name)
        (tmp / SUCCESS_FILE).write_text("")
    logger.info("Wrote model folder %s (%d classes, %d features)", model_dir, len(label_map), weight.shape[1])


def is_complete(model_dir: str | os.PathLike) -> bool:
    return (Path(model_dir) / SUCCESS_FILE).exists()


def load_classifier(model_dir: str | os.PathLike) -> Classifier:
    """Load a model folder written by :func:`save_model_folder`, checking that its parts agree."""
    model_dir = Path(storage.strip_file_scheme(model_dir))
    if not is_complete(model_dir):
        raise FileNotFoundError(
            f"Model folder {model_dir} is missing or incomplete (no {SUCCESS_FILE}); run the Train stage to completion first."
        )
    tensors = load_file(str(model_dir / WEIGHTS_FILE))
    missing = {"weight", "bias"} - set(tensors)
    if missing:
        raise ValueError(f"{model_dir / WEIGHTS_FILE} lacks tensors {sorted(missing)}; expected 'weight' and 'bias'.")
    weight = tensors["weight"].float().numpy()
    bias = tensors["bias"].float().numpy()
    label_map = LabelMap.load(model_dir / LABEL_MAP_FILE)
    info = json.loads((model_dir / MODEL_INFO_FILE).read_text())
    metrics_path = model_dir / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}

    _check_model(weight, bias, label_map, info, source=str(model_dir))
    return Classifier(weight=weight, bias=bias, label_map=label_map, info=info, metrics=metrics)


def _check_model(weight: np.ndarray, bias: np.ndarray, label_map: LabelMap, info: dict, *, source: str) -> None:
    """Raise ValueError unless the weights, label map and model.json describe the same classifier."""
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise ValueError(
            f"Classifier in {source} has weight shape {tuple(weight.shape)} and bias shape {tuple(bias.shape)}; "
            "expected (n_classes, feature_dim) and (n_classes,)."
        )
    n_classes, feature_dim = weight.shape

    if n_classes != len(label_map):
        raise ValueError(
            f"Classifier in {source} has {n_classes} outputs but its label map has {len(label_map)} class_ids; "
            "the label map does not belong to these weights. Retrain or restore the matching label_map.json."
        )
    if not info.get("backbone"):
        raise ValueError(f"model.json in {source} has no 'backbone'; the predictor needs it to compute matching features.")
    if info.get("feature") not in FEATURES:
        raise ValueError(f"model.json in {source} has feature={info.get('feature')!r}; expected one of {FEATURES}.")
    expected_dim = info.get("feature_dim")
    if expected_dim is not None and int(expected_dim) != feature_dim:
        raise ValueError(
            f"Classifier in {source} takes {feature_dim} features but model.json says feature_dim={expected_dim} "
            f"({info.get('feature')!r} features of backbone {info.get('backbone')!r}); the files do not match."
        )
    expected_dim = _feature_dim_from_backbone(info)
    if expected_dim is not None and expected_dim != feature_dim:
        raise ValueError(
            f"Classifier in {source} takes {feature_dim} features, but {info['feature']!r} features of backbone "
            f"{info.get('backbone')!r} (hidden_size={info.get('hidden_size')}, last_blocks={info.get('last_blocks')}, "
            f"dct_k={info.get('dct_k')}) "
            f"have {expected_dim}. Retrain on embeddings from this backbone."
        )

    counts = info.get("class_counts")
    if counts is not None and len(counts) != n_classes:
        raise ValueError(f"model.json in {source} has {len(counts)} class_counts for {n_classes} classes.")
    standardization = info.get("standardization")
    if standardization:
        for key in ("mean", "std"):
            if len(standardization.get(key, ())) != feature_dim:
                raise ValueError(f"model.json in {source}: standardization {key} must have {feature_dim} values.")
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise ValueError(f"Classifier in {source} has non-finite weights; training diverged. Retrain with a lower learning rate.")


def _feature_dim_from_backbone(info: dict) -> int | None:
    """Return the feature width implied by the backbone reference, or None when model.json lacks it."""
    if info.get("feature") == "cls" and info.get("hidden_size"):
        return int(info["hidden_size"])
    if info.get("feature") == "cls_last4" and info.get("hidden_size") and info.get("last_blocks"):
        return int(info["hidden_size"]) * int(info["last_blocks"])
    if info.get("feature") == "dct" and info.get("dct_k"):
        return int(info["dct_k"]) ** 2
    return None

