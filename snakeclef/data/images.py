"""Decode image bytes and preprocess them exactly as the backbone's Hugging Face image processor does.

This is the only module that turns file bytes into model input. The Spark
embedding stage and the offline predictor both call it, so both see the same
pixels. It imports neither pyspark nor torch.

Steps, following ``preprocessor_config.json`` (DINOv2: shortest edge 256
bicubic, center crop 224, rescale by 1/255, ImageNet mean/std):

1. :func:`decode_image`: bytes -> 8-bit RGB ``PIL.Image`` (EXIF orientation
   applied, transparency composited onto white, 16-bit scaled to 8-bit).
2. :func:`preprocess`: RGB image -> float32 array ``(3, crop_height, crop_width)``.
   Pixel values are rescaled once, here, from uint8.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
_TRANSPARENT_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}


class ImageDecodeError(ValueError):
    """Raised when bytes cannot be decoded into an image that the backbone can use."""


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Image processor settings, with the meaning of Hugging Face's ``BitImageProcessor`` fields."""

    do_resize: bool = True
    shortest_edge: int | None = 256
    # Fixed output size (height, width), used when ``shortest_edge`` is None.
    resize_height: int | None = None
    resize_width: int | None = None
    resample: int = Image.Resampling.BICUBIC
    do_center_crop: bool = True
    crop_height: int = 224
    crop_width: int = 224
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """Shape of :func:`preprocess` output, ``(3, height, width)``, when it does not depend on the image."""
        if self.do_center_crop:
            return (3, self.crop_height, self.crop_width)
        if self.do_resize and self.shortest_edge is None:
            return (3, int(self.resize_height), int(self.resize_width))
        raise ValueError("output shape depends on the image: the config neither crops nor resizes to a fixed size")


def preprocess_config_from_dict(settings: dict, *, source: str = "<dict>") -> PreprocessConfig:
    """Build a :class:`PreprocessConfig` from the fields of a ``preprocessor_config.json``."""
    size = settings.get("size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    shortest_edge = size.get("shortest_edge")
    resize_height, resize_width = size.get("height"), size.get("width")
    do_resize = bool(settings.get("do_resize", True))
    if do_resize and shortest_edge is None and (resize_height is None or resize_width is None):
        raise ValueError(
            f"{source}: unsupported 'size' {size!r}; expected {{'shortest_edge': N}} or {{'height': H, 'width': W}}"
        )
    if size.get("longest_edge") is not None:
        raise ValueError(f"{source}: 'size.longest_edge' is not supported (got {size!r}); remove it or use 'shortest_edge' alone")

    crop = settings.get("crop_size") or {"height": 224, "width": 224}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    mean = settings.get("image_mean", PreprocessConfig.image_mean)
    std = settings.get("image_std", PreprocessConfig.image_std)
    return PreprocessConfig(
        do_resize=do_resize,
        shortest_edge=None if shortest_edge is None else int(shortest_edge),
        resize_height=None if resize_height is None else int(resize_height),
        resize_width=None if resize_width is None else int(resize_width),
        resample=int(settings.get("resample", Image.Resampling.BICUBIC)),
        do_center_crop=bool(settings.get("do_center_crop", True)),
        crop_height=int(crop["height"]),
        crop_width=int(crop["width"]),
        do_rescale=bool(settings.get("do_rescale", True)),
        rescale_factor=float(settings.get("rescale_factor", 1 / 255)),
        do_normalize=bool(settings.get("do_normalize", True)),
        image_mean=tuple(float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean] * 3)),
        image_std=tuple(float(v) for v in (std if isinstance(std, (list, tuple)) else [std] * 3)),
    )


def find_preprocessor_config(name_or_path: str | os.PathLike) -> Path:
    """Locate ``preprocessor_config.json`` for a model folder, a JSON file, or a hub name in the local cache."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / PREPROCESSOR_CONFIG_NAME
        if not candidate.is_file():
            raise FileNotFoundError(f"model folder {path} has no {PREPROCESSOR_CONFIG_NAME}; save the image processor beside the weights")
        return candidate

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(str(name_or_path), PREPROCESSOR_CONFIG_NAME, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as error:
        raise FileNotFoundError(
            f"backbone {str(name_or_path)!r} is neither a local folder nor in the Hugging Face cache "
            f"(downloads are disabled); pass a local model folder or download it first ({error})"
        ) from error


def load_preprocess_config(name_or_path: str | os.PathLike) -> PreprocessConfig:
    """Read the backbone's ``preprocessor_config.json`` (model folder, JSON file, or cached hub name; no network)."""
    config_path = find_preprocessor_config(name_or_path)
    return preprocess_config_from_dict(json.loads(config_path.read_text()), source=str(config_path))


def decode_image(data: bytes) -> Image.Image:
    """Decode file bytes into an 8-bit RGB image, with EXIF orientation applied.

    Raises :class:`ImageDecodeError` for empty, truncated or unreadable data,
    and for images over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``).
    The first frame of an animated GIF or WebP is used.
    """
    if data is None or len(data) == 0:
        raise ImageDecodeError("empty image data (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x the limit; check_pixel_limit rejects both.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            check_pixel_limit(image)
            image.load()
            image = ImageOps.exif_transpose(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"image is over the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels ({error})") from error
    except Image.UnidentifiedImageError as error:
        raise ImageDecodeError(f"not a recognised image format ({len(data)} bytes, starting {data[:8]!r})") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageDecodeError(f"corrupt or truncated image ({len(data)} bytes): {error}") from error
    except Exception as error:  # noqa: BLE001 - PIL plugins raise struct.error, IndexError... on malformed files
        raise ImageDecodeError(f"failed to decode image ({len(data)} bytes): {type(error).__name__}: {error}") from error
    return to_rgb(image)


def check_pixel_limit(image: Image.Image) -> None:
    """Raise :class:`ImageDecodeError` when the image has more pixels than ``Image.MAX_IMAGE_PIXELS``."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise ImageDecodeError(
            f"image of {width}x{height} = {width * height} pixels is over the decompression-bomb limit of {limit} pixels"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: transparency onto white, 16/32-bit grey scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit PNGs open as "I;16" or "I"; PIL's convert("L") clips at 255 instead of scaling.
        values = np.asarray(image, dtype=np.uint32)
        return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32))
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in _TRANSPARENT_MODES or image.info.get("transparency") is not None:
        # Same rule as the Hugging Face processor: composite transparent pixels onto white.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_output_size(width: int, height: int, config: PreprocessConfig) -> tuple[int, int]:
    """Return the ``(width, height)`` of the resized image, rounding as the Hugging Face processor does."""
    if config.shortest_edge is None:
        return int(config.resize_width), int(config.resize_height)
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = config.shortest_edge, int(config.shortest_edge * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Center-crop an ``(H, W, C)`` array, zero-padding first when it is smaller than the crop."""
    height, width = pixels.shape[:2]
    if height < crop_height or width < crop_width:
        padded_height, padded_width = max(height, crop_height), max(width, crop_width)
        padded = np.zeros((padded_height, padded_width, pixels.shape[2]), dtype=pixels.dtype)
        top, left = (padded_height - height) // 2, (padded_width - width) // 2
        padded[top : top + height, left : left + width] = pixels
        pixels, height, width = padded, padded_height, padded_width
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return pixels[top : top + crop_height, left : left + crop_width]


def preprocess(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """Resize, crop, rescale and normalize an RGB image into a float32 array of shape ``(3, H, W)``.

    The input must be an 8-bit ``PIL.Image`` (as returned by :func:`decode_image`),
    so pixel values are rescaled exactly once.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"preprocess expects a PIL.Image from decode_image, got {type(image).__name__}; "
            "pass the decoded image, not an array that may already be rescaled"
        )
    if image.mode != "RGB":
        image = to_rgb(image)

    if config.do_resize:
        size = resize_output_size(image.width, image.height, config)
        if size != image.size:
            image = image.resize(size, resample=config.resample)
    pixels = np.asarray(image)
    if config.do_center_crop:
        pixels = center_crop(pixels, config.crop_height, config.crop_width)

    # One copy into (3, H, W) float32, then rescale and normalize in place as x * scale - offset per channel.
    values = pixels.transpose(2, 0, 1).astype(np.float32, order="C")
    scale, offset = normalization_terms(config)
    values *= scale
    values -= offset
    return values


@functools.lru_cache(maxsize=8)
def normalization_terms(config: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """Return per-channel ``(scale, offset)`` of shape ``(3, 1, 1)`` such that output = pixel * scale - offset."""
    rescale = config.rescale_factor if config.do_rescale else 1.0
    mean = np.asarray(config.image_mean, dtype=np.float64) if config.do_normalize else np.zeros(3)
    std = np.asarray(config.image_std, dtype=np.float64) if config.do_normalize else np.ones(3)
    scale = (rescale / std).astype(np.float32).reshape(3, 1, 1)
    offset = (mean / std).astype(np.float32).reshape(3, 1, 1)
    return scale, offset


def load_pixel_values(data: bytes, config: PreprocessConfig) -> np.ndarray:
    """Decode and preprocess one image's bytes into a float32 ``(3, H, W)`` array."""
    return preprocess(decode_image(data), config)


def preprocess_batch(images: Sequence[Image.Image], config: PreprocessConfig) -> np.ndarray:
    """Preprocess decoded images into one float32 array of shape ``(n, 3, H, W)``."""
    return np.stack([preprocess(image, config) for image in images]) if images else np.zeros((0, *config.output_shape), np.float32)
