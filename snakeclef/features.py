"""Image bytes -> [CLS] and DCT features, shared by the Spark embedding stage and the offline predictor.

Both callers build one :class:`FeatureExtractor` per process and call
:meth:`FeatureExtractor.embed` on lists of file bytes, so they decode,
preprocess and run the backbone identically. No pyspark here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

from snakeclef.data.images import ImageDecodeError, PreprocessConfig, load_pixel_values, load_preprocess_config
from snakeclef.models.backbone import Backbone, load_backbone

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EmbeddingBatch:
    """Features of ``n`` images, in input order.

    ``cls``: float32 ``(n, hidden_size)``; ``cls_last4``: float32
    ``(n, hidden_size * last_blocks)``; ``dct``: float32 ``(n, dct_k**2)``;
    ``errors[i]`` is None when image ``i`` was embedded, else the reason it
    was not, and then row ``i`` of every feature is NaN. The ``*_flipped``
    fields hold the same features of the horizontally mirrored images when
    :meth:`FeatureExtractor.embed` was asked for them, else None.
    """

    cls: np.ndarray
    cls_last4: np.ndarray
    dct: np.ndarray
    errors: list[str | None]
    cls_flipped: np.ndarray | None = None
    cls_last4_flipped: np.ndarray | None = None
    dct_flipped: np.ndarray | None = None

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask ``(n,)`` of the rows that have features."""
        return np.array([error is None for error in self.errors], dtype=bool)

    def __len__(self) -> int:
        return len(self.errors)


class FeatureExtractor:
    """Load a backbone and its preprocessing once, then embed batches of image bytes."""

    def __init__(
        self,
        backbone: str | os.PathLike,
        *,
        device: str = "auto",
        precision: str = "auto",
        dct_k: int = 8,
        batch_size: int = 32,
        num_threads: int | None = None,
        prefetch: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dct_k < 1:
            raise ValueError(f"dct_k must be >= 1, got {dct_k}")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        started = time.perf_counter()
        self.preprocess_config: PreprocessConfig = load_preprocess_config(backbone)
        self.backbone: Backbone = load_backbone(backbone, device=device, precision=precision)
        self.dct_k = dct_k
        self.batch_size = batch_size
        # Decoding the next batch in a thread overlaps PIL (which releases the GIL) with the forward pass.
        # Off by default: on a 2-core machine with 2 torch threads it made embedding slower, not faster.
        self.prefetch = prefetch
        # Cumulative seconds spent loading, decoding + preprocessing, and in the forward pass (with the DCT).
        self.timings = {"load_s": time.perf_counter() - started, "decode_s": 0.0, "forward_s": 0.0, "images": 0}

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    def embed(self, images: Sequence[bytes], *, flipped: bool = False) -> EmbeddingBatch:
        """Embed encoded images (file bytes); undecodable ones become NaN rows with an error message.

        With ``flipped``, each image is also embedded mirrored left to right
        (same decoding and preprocessing, then the pixels flipped), in the
        same forward pass, for test-time augmentation.
        """
        n = len(images)
        views = 2 if flipped else 1
        widths = {"cls": self.hidden_size, "cls_last4": self.hidden_size * self.backbone.last_blocks, "dct": self.dct_k**2}
        features = {name: np.full((views, n, width), np.nan, dtype=np.float32) for name, width in widths.items()}
        errors: list[str | None] = [None] * n

        for start, pixel_values, ok_rows in self._decoded_batches(images, errors):
            if len(ok_rows) == 0:
                continue
            started = time.perf_counter()
            if flipped:
                pixel_values = np.concatenate([pixel_values, pixel_values[..., ::-1]])
            batch = self.backbone.features(pixel_values, dct_k=self.dct_k)
            self.timings["forward_s"] += time.perf_counter() - started
            rows = start + ok_rows
            for name, values in features.items():
                values[:, rows] = batch[name].reshape(views, len(ok_rows), -1)
        self.timings["images"] += n
        flipped_views = {f"{name}_flipped": values[1] for name, values in features.items()} if flipped else {}
        return EmbeddingBatch(**{name: values[0] for name, values in features.items()}, errors=errors, **flipped_views)

    def _decoded_batches(self, images: Sequence[bytes], errors: list[str | None]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(start, pixel_values (m, 3, H, W), ok_rows)`` per batch, recording decode errors in ``errors``."""
        starts = range(0, len(images), self.batch_size)
        if not self.prefetch or len(starts) <= 1:
            for start in starts:
                yield (start, *self._decode_batch(images, start, errors))
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
            pending = pool.submit(self._decode_batch, images, starts[0], errors)
            for index, start in enumerate(starts):
                pixel_values, ok_rows = pending.result()
                if index + 1 < len(starts):
                    pending = pool.submit(self._decode_batch, images, starts[index + 1], errors)
                yield start, pixel_values, ok_rows

    def _decode_batch(self, images: Sequence[bytes], start: int, errors: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
        started = time.perf_counter()
        arrays, ok_rows = [], []
        for offset, data in enumerate(images[start : start + self.batch_size]):
            try:
                arrays.append(load_pixel_values(data, self.preprocess_config))
                ok_rows.append(offset)
            except ImageDecodeError as error:
                errors[start + offset] = f"{type(error).__name__}: {error}"
        pixel_values = np.stack(arrays) if arrays else np.zeros((0, *self.preprocess_config.output_shape), np.float32)
        self.timings["decode_s"] += time.perf_counter() - started
        return pixel_values, np.asarray(ok_rows, dtype=np.int64)
