"""FeatureExtractor: the same features as a direct model call, and error rows for bad images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.fft
import torch
from PIL import Image

from snakeclef.features import FeatureExtractor


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(seed: int, size: tuple[int, int] = (300, 260)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def extractor(tiny_backbone) -> FeatureExtractor:
    return FeatureExtractor(tiny_backbone, device="cpu", precision="fp32", dct_k=4, batch_size=3)


def test_embed_matches_direct_model_call(extractor, tiny_backbone):
    from transformers import AutoImageProcessor, Dinov2Model

    images = [jpeg_bytes(seed) for seed in range(5)]
    batch = extractor.embed(images)

    processor = AutoImageProcessor.from_pretrained(tiny_backbone)
    model = Dinov2Model.from_pretrained(tiny_backbone).eval()
    inputs = processor([Image.open(io.BytesIO(data)) for data in images], return_tensors="pt")
    with torch.no_grad():
        tokens = model(**inputs).last_hidden_state.numpy()

    assert batch.cls.shape == (5, 32)
    assert batch.dct.shape == (5, 16)
    np.testing.assert_allclose(batch.cls, tokens[:, 0], atol=1e-4)
    for row, patch_tokens in zip(batch.dct, tokens[:, 1:]):
        np.testing.assert_allclose(row, scipy.fft.dctn(patch_tokens, norm="ortho")[:4, :4].ravel(), atol=1e-3)


def test_embed_bad_rows_nan(extractor):
    good = jpeg_bytes(0)
    batch = extractor.embed([good, b"", b"<html>not found</html>", good])
    assert batch.errors[0] is None
    assert batch.errors[3] is None
    assert "empty image data" in batch.errors[1]
    assert "not a recognised image format" in batch.errors[2]
    assert batch.ok.tolist() == [True, False, False, True]
    assert np.isnan(batch.cls[1:3]).all()
    assert np.isnan(batch.dct[1:3]).all()
    np.testing.assert_allclose(batch.cls[0], batch.cls[3], atol=1e-6)


def test_embed_batch_size_independent(tiny_backbone, extractor):
    images = [jpeg_bytes(seed, (224, 224)) for seed in range(7)]
    one_batch = FeatureExtractor(tiny_backbone, device="cpu", precision="fp32", dct_k=4, batch_size=16, prefetch=True)
    np.testing.assert_allclose(extractor.embed(images).cls, one_batch.embed(images).cls, atol=1e-5)


def test_embed_all_bad_and_empty(extractor):
    batch = extractor.embed([b"", b"x"])
    assert batch.cls.shape == (2, 32)
    assert not batch.ok.any()
    assert len(extractor.embed([])) == 0


def test_extractor_rejects_batch_size(tiny_backbone):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        FeatureExtractor(tiny_backbone, batch_size=0)


def test_embed_flipped_equals_mirrored_file(extractor):
    # 224 x 224 needs no resize or crop, so the mirrored file gives exactly the mirrored pixels.
    pixels = np.random.default_rng(5).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    image, mirrored = png_bytes(pixels), png_bytes(pixels[:, ::-1])
    batch = extractor.embed([image, b"", mirrored], flipped=True)
    reference = extractor.embed([mirrored, image])

    np.testing.assert_allclose(batch.cls_flipped[0], reference.cls[0], atol=1e-4)
    np.testing.assert_allclose(batch.dct_flipped[0], reference.dct[0], atol=1e-3)
    np.testing.assert_allclose(batch.cls_last4_flipped[0], reference.cls_last4[0], atol=1e-4)
    np.testing.assert_allclose(batch.cls_flipped[2], reference.cls[1], atol=1e-4)
    np.testing.assert_allclose(batch.cls, extractor.embed([image, b"", mirrored]).cls, atol=1e-5)
    assert not np.allclose(batch.cls[0], batch.cls_flipped[0], atol=1e-3)
    assert np.isnan(batch.cls_flipped[1]).all()
    assert extractor.embed([image]).cls_flipped is None
