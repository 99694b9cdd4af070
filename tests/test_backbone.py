"""Backbone loading, device and precision choice, and the DCT feature."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.fft
import torch

from snakeclef.models import backbone as backbone_module
from snakeclef.models.backbone import dct_features, load_backbone, resolve_device, resolve_precision


def test_dct_matches_scipy_single_matrix():
    matrix = np.random.default_rng(0).normal(size=(256, 384)).astype(np.float32)
    expected = scipy.fft.dctn(matrix.astype(np.float64), type=2, norm="ortho")[:8, :8].ravel()
    result = dct_features(torch.from_numpy(matrix), 8).numpy()
    assert result.shape == (64,)
    np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-4)


def test_dct_matches_scipy_batch_and_k():
    tokens = np.random.default_rng(1).normal(size=(3, 16, 32))
    for k in (1, 4, 16):
        result = dct_features(torch.from_numpy(tokens), k).numpy()
        assert result.shape == (3, k * k)
        for row, matrix in zip(result, tokens):
            np.testing.assert_allclose(row, scipy.fft.dctn(matrix, type=2, norm="ortho")[:k, :k].ravel(), atol=1e-4)


def test_dct_known_constant_matrix():
    # The orthonormal DCT of a constant matrix puts everything in the DC term: value * sqrt(rows * cols).
    result = dct_features(torch.full((16, 9), 2.0), 3).numpy()
    assert result[0] == pytest.approx(2.0 * np.sqrt(16 * 9), rel=1e-6)
    np.testing.assert_allclose(result[1:], 0, atol=1e-5)


def test_dct_rejects_large_k():
    with pytest.raises(ValueError, match="dct_k=10 is out of range for 16 tokens x 9 hidden"):
        dct_features(torch.zeros(2, 16, 9), 10)


def test_load_backbone_tiny(tiny_backbone):
    backbone = load_backbone(tiny_backbone, device="cpu", precision="fp32")
    assert backbone.hidden_size == 32
    assert backbone.device.type == "cpu"
    assert next(backbone.model.parameters()).dtype == torch.float32
    features = backbone.features(torch.zeros(2, 3, 224, 224), dct_k=4)
    assert features["cls"].shape == (2, 32)
    # The tiny model has two blocks, so cls_last4 holds both.
    assert backbone.last_blocks == 2
    assert features["cls_last4"].shape == (2, 64)
    assert features["dct"].shape == (2, 16)
    assert {array.dtype for array in features.values()} == {np.dtype(np.float32)}


def test_cls_last4_is_normed_block_outputs(tiny_backbone):
    from transformers import Dinov2Model

    backbone = load_backbone(tiny_backbone, device="cpu", precision="fp32")
    pixels = torch.from_numpy(np.random.default_rng(2).normal(size=(3, 3, 224, 224)).astype(np.float32))
    features = backbone.features(pixels, dct_k=2)

    # Independently: run each block by hand on the embeddings and apply the final layer norm to its [CLS] token.
    model = Dinov2Model.from_pretrained(tiny_backbone).eval()
    with torch.no_grad():
        hidden = model.embeddings(pixels)
        expected = []
        for layer in model.encoder.layer:
            output = layer(hidden)
            hidden = output[0] if isinstance(output, tuple) else output
            expected.append(model.layernorm(hidden[:, 0]))
    np.testing.assert_allclose(features["cls_last4"], torch.cat(expected, dim=1).numpy(), atol=1e-4)
    np.testing.assert_allclose(features["cls_last4"][:, -32:], features["cls"], atol=1e-6)


def test_load_backbone_bf16_weights(tiny_backbone):
    backbone = load_backbone(tiny_backbone, device="cpu", precision="bf16")
    assert next(backbone.model.parameters()).dtype == torch.bfloat16
    features = backbone.features(torch.zeros(1, 3, 224, 224), dct_k=2)
    assert features["cls"].dtype == features["cls_last4"].dtype == np.float32


def test_load_backbone_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local model folder nor in the Hugging Face cache"):
        load_backbone(tmp_path / "absent", device="cpu")


def test_precision_auto_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(backbone_module, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="snakeclef.models.backbone"):
        assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert "no native bf16" in caplog.text


def test_precision_auto_native_bf16(monkeypatch):
    monkeypatch.setattr(backbone_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"


def test_precision_invalid():
    with pytest.raises(ValueError, match="precision='fp64' is not supported"):
        resolve_precision("fp64", torch.device("cpu"))


def test_device_invalid():
    with pytest.raises(ValueError, match="device='tpu' is not supported"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_device_cuda_missing():
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")


@pytest.mark.slow
def test_bf16_close_to_fp32(dinov2_small, ph_snakes):
    from snakeclef.data.images import load_pixel_values, load_preprocess_config

    config = load_preprocess_config(dinov2_small)
    paths = sorted(ph_snakes.glob("val/*/*"))[::25][:8]
    pixel_values = np.stack([load_pixel_values(path.read_bytes(), config) for path in paths])
    reference = load_backbone(dinov2_small, device="cpu", precision="fp32").features(pixel_values, dct_k=8)
    reduced = load_backbone(dinov2_small, device="cpu", precision="bf16").features(pixel_values, dct_k=8)

    for name in ("cls", "cls_last4"):
        a, b = reference[name], reduced[name]
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cosine.min() >= 0.9998, (name, cosine)
