"""Load a DINOv2 backbone for inference and turn its output tokens into [CLS] and DCT features.

One forward pass gives all features: ``cls`` is ``last_hidden_state[:, 0]``;
``cls_last4`` is the [CLS] token after each of the last four blocks, each
through the model's final layer norm, concatenated from the earliest to the
last block (the features of DINOv2's own linear evaluation; a model with
fewer blocks gives all of them); ``dct`` is the top-left ``k x k`` block of
the orthonormal 2-D DCT-II of the patch-token matrix (every token except
[CLS]). The token tensors stay on the device; only the small feature arrays
leave it. No pyspark here.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAST_BLOCKS = 4


def last_blocks(num_hidden_layers: int) -> int:
    """Return how many blocks' [CLS] tokens make up ``cls_last4`` for a model with ``num_hidden_layers`` blocks."""
    return min(LAST_BLOCKS, int(num_hidden_layers))


def cpu_has_native_bf16() -> bool:
    """Return True when the CPU computes bf16 in hardware (x86 AMX or AVX512-BF16, Arm BF16)."""
    # NOTE: reads Linux's /proc/cpuinfo, so other systems always get False (and fp32 for "auto").
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(cpuinfo.split())
    return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def resolve_device(device: str = "auto") -> torch.device:
    """Map ``auto``/``cpu``/``cuda``/``cuda:N`` to a torch device; ``auto`` is CUDA when available, else CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        logger.warning("No CUDA device found; the backbone runs on the CPU")
        return torch.device("cpu")
    if not (device in DEVICES or device.startswith("cuda:")):
        raise ValueError(f"device={device!r} is not supported; use one of {DEVICES} or 'cuda:N'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but torch finds no CUDA device; use device='cpu' or 'auto'")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map ``auto``/``fp32``/``bf16`` to ``fp32`` or ``bf16``; ``auto`` picks bf16 where the hardware computes it natively."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; use one of {PRECISIONS}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16"
        logger.warning("CUDA device %s has no bf16 support; the backbone runs in fp32", torch.cuda.get_device_name(device))
        return "fp32"
    if cpu_has_native_bf16():
        return "bf16"
    logger.warning("This CPU has no native bf16 (no AMX or AVX512-BF16); the backbone runs in fp32, about 3x slower")
    return "fp32"


@functools.lru_cache(maxsize=16)
def dct_matrix(n: int, k: int, device: str = "cpu") -> torch.Tensor:
    """Return the first ``k`` rows of the orthonormal DCT-II matrix of size ``n``, shape ``(k, n)``, float32."""
    positions = torch.arange(n, dtype=torch.float64)
    frequencies = torch.arange(k, dtype=torch.float64)[:, None]
    basis = torch.cos(math.pi * (2 * positions + 1) * frequencies / (2 * n)) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis.to(device=device, dtype=torch.float32)


def dct_features(patch_tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Return the top-left ``k x k`` orthonormal 2-D DCT-II coefficients of each token matrix, flattened.

    ``patch_tokens``: ``(batch, tokens, hidden)`` or ``(tokens, hidden)``; the
    result is float32 ``(batch, k * k)`` or ``(k * k,)``, row-major over
    (token frequency, hidden frequency). Equal to
    ``scipy.fft.dctn(x, type=2, norm="ortho")[:k, :k].ravel()`` per matrix.
    """
    if patch_tokens.ndim not in (2, 3):
        raise ValueError(f"patch_tokens must have shape (batch, tokens, hidden) or (tokens, hidden), got {tuple(patch_tokens.shape)}")
    tokens, hidden = patch_tokens.shape[-2:]
    if not 1 <= k <= min(tokens, hidden):
        raise ValueError(f"dct_k={k} is out of range for {tokens} tokens x {hidden} hidden; use 1 <= dct_k <= {min(tokens, hidden)}")

    device = str(patch_tokens.device)
    token_basis = dct_matrix(tokens, k, device)
    hidden_basis = dct_matrix(hidden, k, device)
    coefficients = token_basis @ patch_tokens.float() @ hidden_basis.T
    return coefficients.flatten(start_dim=-2)


@dataclasses.dataclass
class Backbone:
    """A loaded backbone in eval mode with its device and precision."""

    model: torch.nn.Module
    name_or_path: str
    device: torch.device
    precision: str
    hidden_size: int
    num_layers: int

    @property
    def last_blocks(self) -> int:
        return last_blocks(self.num_layers)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    @torch.inference_mode()
    def features(self, pixel_values: torch.Tensor | np.ndarray, *, dct_k: int) -> dict[str, np.ndarray]:
        """Return float32 ``cls`` ``(batch, hidden)``, ``cls_last4`` ``(batch, hidden * last_blocks)`` and ``dct`` ``(batch, dct_k**2)``.

        All three come from one forward pass.
        """
        pixel_values = torch.as_tensor(pixel_values).to(self.device, dtype=self.dtype, non_blocking=True)
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=True)
        tokens = outputs.last_hidden_state
        # hidden_states holds the embeddings, then each block's output before the final layer norm,
        # which last_hidden_state has already been through.
        earlier = [self.model.layernorm(state[:, 0]) for state in outputs.hidden_states[-self.last_blocks:-1]]
        cls_last = torch.cat([*earlier, tokens[:, 0]], dim=1)
        return {
            "cls": tokens[:, 0].float().cpu().numpy(),
            "cls_last4": cls_last.float().cpu().numpy(),
            "dct": dct_features(tokens[:, 1:], dct_k).cpu().numpy(),
        }


def load_backbone(name_or_path: str | os.PathLike, *, device: str = "auto", precision: str = "auto") -> Backbone:
    """Load a Hugging Face backbone (local folder, or hub name already in the cache) for inference.

    Nothing is downloaded. ``precision="bf16"`` casts the weights to bf16,
    which is faster than autocast on CPUs with AMX or AVX512-BF16.
    """
    from transformers import AutoConfig, AutoModel

    name_or_path = str(name_or_path)
    resolved_device = resolve_device(device)
    resolved_precision = resolve_precision(precision, resolved_device)
    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        model = AutoModel.from_pretrained(name_or_path, local_files_only=True)
    except OSError as error:
        raise FileNotFoundError(
            f"backbone {name_or_path!r} is neither a local model folder nor in the Hugging Face cache "
            f"(downloads are disabled); pass a local folder such as one saved with save_pretrained ({error})"
        ) from error

    hidden_size = int(config.hidden_size)
    if not hasattr(model, "layernorm"):
        raise ValueError(
            f"backbone {name_or_path!r} ({type(model).__name__}) has no final 'layernorm'; the features need a "
            "DINOv2-style model (Dinov2Model or Dinov2WithRegistersModel)"
        )
    model = model.to(device=resolved_device, dtype=_DTYPES[resolved_precision]).eval()
    logger.info(
        "Loaded backbone %s: hidden_size=%d, device=%s, precision=%s, torch threads=%d",
        name_or_path, hidden_size, resolved_device, resolved_precision, torch.get_num_threads(),
    )
    return Backbone(model, name_or_path, resolved_device, resolved_precision, hidden_size, int(config.num_hidden_layers))

