"""Decoding and preprocessing: parity with the Hugging Face processor, and the catalogue of bad inputs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from snakeclef.data.images import (
    ImageDecodeError,
    PreprocessConfig,
    decode_image,
    load_pixel_values,
    load_preprocess_config,
    preprocess,
)


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def smooth_rgb(width: int, height: int) -> Image.Image:
    """An asymmetric colour gradient that survives JPEG compression with small errors."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / width, 255 * y / height, 128 + 60 * np.sin(x / 7.0)], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def exif_rotated_jpeg() -> tuple[bytes, bytes]:
    """Return (JPEG stored sideways with EXIF orientation 6, the same picture stored upright)."""
    upright = smooth_rgb(48, 32)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes()), encode(upright, "JPEG", quality=95)


def bad_image_catalogue() -> dict[str, bytes]:
    """Encoded files that must each give an error row or correct pixels, keyed by case name."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    jpeg = encode(noise, "JPEG", quality=90)

    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 200, 30, 40] + [0, 0, 0] * 254)
    palette.paste(1, (0, 0, 8, 16))

    grey16 = Image.fromarray(np.arange(256, dtype="<u2").reshape(16, 16) * 257)

    rotated, _ = exif_rotated_jpeg()
    return {
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "zero_bytes": b"",
        "text_named_jpg": b"species,count\nNaja naja,3\n",
        "palette_transparency_png": encode(palette, "PNG", transparency=0),
        "grey16_png": encode(grey16, "PNG"),
        "cmyk_jpeg": encode(smooth_rgb(32, 32).convert("CMYK"), "JPEG", quality=95),
        "exif_rotated_jpeg": rotated,
        "webp_named_jpg": encode(smooth_rgb(20, 10), "WEBP", lossless=True),
        "gif_named_jpg": encode(palette.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "GIF"),
        "decompression_bomb_png": encode(Image.new("1", (10_000, 9_000)), "PNG"),
    }


# Cases that must raise, with the wording of the message.
DECODE_ERRORS = {
    "truncated_jpeg": "truncated",
    "zero_bytes": "empty image data",
    "text_named_jpg": "not a recognised image format",
    "decompression_bomb_png": "decompression-bomb limit",
}


@pytest.fixture(scope="module")
def catalogue() -> dict[str, bytes]:
    return bad_image_catalogue()


@pytest.mark.parametrize("case", sorted(DECODE_ERRORS))
def test_decode_rejects_bad_file(catalogue, case):
    with pytest.raises(ImageDecodeError, match=DECODE_ERRORS[case]):
        decode_image(catalogue[case])


def test_decode_bomb_limit_follows_pil(monkeypatch):
    image = encode(smooth_rgb(40, 40), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError, match="40x40 = 1600 pixels is over the decompression-bomb limit of 1000"):
        decode_image(image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(ImageDecodeError, match="over the decompression-bomb limit of 500 pixels"):
        decode_image(image)


def test_decode_palette_transparency_on_white(catalogue):
    pixels = np.asarray(decode_image(catalogue["palette_transparency_png"]))
    assert pixels.shape == (16, 16, 3)
    assert (pixels[:, :8] == [200, 30, 40]).all()
    assert (pixels[:, 8:] == 255).all()


def test_decode_grey16_scaled_to_8bit(catalogue):
    image = decode_image(catalogue["grey16_png"])
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(pixels[..., 0], np.arange(256).reshape(16, 16))
    np.testing.assert_array_equal(pixels[..., 1], pixels[..., 2])


def test_decode_cmyk_jpeg_colours(catalogue):
    pixels = np.asarray(decode_image(catalogue["cmyk_jpeg"]), dtype=np.float32)
    expected = np.asarray(smooth_rgb(32, 32), dtype=np.float32)
    assert pixels.shape == expected.shape
    assert np.abs(pixels - expected).mean() < 3


def test_decode_exif_orientation_applied():
    rotated, upright = exif_rotated_jpeg()
    decoded = np.asarray(decode_image(rotated), dtype=np.float32)
    reference = np.asarray(decode_image(upright), dtype=np.float32)
    assert decoded.shape == reference.shape == (32, 48, 3)
    assert np.abs(decoded - reference).mean() < 3


@pytest.mark.parametrize("case, expected", [("webp_named_jpg", smooth_rgb(20, 10)), ("gif_named_jpg", None)])
def test_decode_format_from_content(catalogue, case, expected):
    pixels = np.asarray(decode_image(catalogue[case]))
    if expected is not None:
        np.testing.assert_array_equal(pixels, np.asarray(expected))
    else:
        assert pixels.shape == (16, 16, 3)
        assert (pixels[:, :8] == [200, 30, 40]).all()
        assert (pixels[:, 8:] == 0).all()


@pytest.fixture(scope="module")
def hf_processor(tiny_backbone):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(tiny_backbone)


def parity_images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    sizes = [(224, 224), (500, 300), (301, 517), (100, 150), (257, 256), (1024, 683)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    return images + [smooth_rgb(640, 480)]


def test_preprocess_matches_hf_processor(tiny_backbone, hf_processor):
    config = load_preprocess_config(tiny_backbone)
    for image in parity_images():
        ours = preprocess(image, config)
        theirs = hf_processor(image, return_tensors="np")["pixel_values"][0]
        assert ours.dtype == np.float32
        assert ours.shape == theirs.shape == (3, 224, 224)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_preprocess_matches_hf_on_bad_catalogue(tiny_backbone, hf_processor, catalogue):
    config = load_preprocess_config(tiny_backbone)
    for case in ("palette_transparency_png", "cmyk_jpeg", "webp_named_jpg", "gif_named_jpg"):
        image = decode_image(catalogue[case])
        np.testing.assert_allclose(
            preprocess(image, config), hf_processor(image, return_tensors="np")["pixel_values"][0], atol=1e-5, err_msg=case
        )


def test_preprocess_real_photos_match_hf(ph_snakes, hf_processor, tiny_backbone):
    config = load_preprocess_config(tiny_backbone)
    for path in sorted(ph_snakes.glob("train/*/*"))[:8]:
        data = path.read_bytes()
        theirs = hf_processor(Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(load_pixel_values(data, config), theirs, atol=1e-5, err_msg=str(path))


def test_preprocess_rejects_array():
    with pytest.raises(TypeError, match="not an array that may already be rescaled"):
        preprocess(np.zeros((224, 224, 3), dtype=np.float32), PreprocessConfig())


def test_preprocess_small_image_padded():
    config = PreprocessConfig(do_resize=False, do_normalize=False, do_rescale=False)
    out = preprocess(Image.new("RGB", (100, 300), (10, 20, 30)), config)
    assert out.shape == (3, 224, 224)
    assert (out[:, :, :62] == 0).all()
    assert (out[0, :, 62:162] == 10).all()


def test_config_reads_folder(tiny_backbone):
    config = load_preprocess_config(tiny_backbone)
    assert config.shortest_edge == 256
    assert (config.crop_height, config.crop_width) == (224, 224)
    assert config.resample == Image.Resampling.BICUBIC
    assert config.image_std == (0.229, 0.224, 0.225)


def test_config_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no preprocessor_config.json"):
        load_preprocess_config(tmp_path)


def test_config_unknown_hub_name():
    with pytest.raises(FileNotFoundError, match="neither a local folder nor in the Hugging Face cache"):
        load_preprocess_config("no-such-org/no-such-model")


def test_config_rejects_longest_edge(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 224, "longest_edge": 512}}))
    with pytest.raises(ValueError, match="longest_edge"):
        load_preprocess_config(tmp_path)
