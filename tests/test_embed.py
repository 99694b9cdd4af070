"""The Spark embedding stage end to end: every row kept, bad images as error rows, resumable chunks."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from snakeclef.embed import embed_images
from test_images import DECODE_ERRORS, bad_image_catalogue

RECORD_SCHEMA = pa.schema(
    [
        ("image_path", pa.string()),
        ("observation_id", pa.int64()),
        ("class_id", pa.int32()),
        ("binomial_name", pa.string()),
        ("code", pa.string()),
        ("split", pa.string()),
        ("data", pa.binary()),
    ]
)


def jpeg_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (200 + seed, 240, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def write_image_records(folder: Path, images: dict[str, bytes], *, files: int) -> Path:
    """Write image records in the ``images/`` layout, spread round-robin over ``files`` Parquet files."""
    names = list(images)
    table = pa.table(
        {
            "image_path": names,
            "observation_id": list(range(len(names))),
            "class_id": [100 + 7 * (i % 3) for i in range(len(names))],
            "binomial_name": [f"Genus species{i % 3}" for i in range(len(names))],
            "code": ["PH" if i % 2 else None for i in range(len(names))],
            "split": ["train" if i % 3 else "val" for i in range(len(names))],
            "data": [images[name] for name in names],
        },
        schema=RECORD_SCHEMA,
    )
    folder.mkdir(parents=True)
    for index in range(files):
        rows = pa.array(range(index, len(names), files), type=pa.int64())
        pq.write_table(table.take(rows), folder / f"part-{index:05d}.parquet")
    return folder


def read_embeddings(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path).sort_values("image_path").reset_index(drop=True)


@pytest.fixture(scope="module")
def catalogue_records(tmp_path_factory) -> Path:
    images = {f"good/{seed}.jpg": jpeg_bytes(seed) for seed in range(4)}
    images.update({f"bad/{case}.jpg": data for case, data in bad_image_catalogue().items()})
    return write_image_records(tmp_path_factory.mktemp("catalogue") / "images", images, files=3)


@pytest.fixture(scope="module")
def catalogue_run(spark, catalogue_records, tiny_backbone, tmp_path_factory):
    output = tmp_path_factory.mktemp("catalogue-out") / "embeddings"
    report = embed_images(spark, str(catalogue_records), str(output), backbone=str(tiny_backbone), precision="fp32", dct_k=4, batch_size=4)
    return output, report


def test_embed_keeps_every_row(catalogue_run, catalogue_records):
    output, report = catalogue_run
    embeddings = read_embeddings(output)
    expected = sorted(pq.read_table(catalogue_records, columns=["image_path"]).column("image_path").to_pylist())
    assert embeddings["image_path"].tolist() == expected
    assert report["rows"] == len(expected)
    assert (output / "_SUCCESS").is_file()


def test_embed_output_schema(catalogue_run):
    output, report = catalogue_run
    schema = pq.read_schema(next(output.glob("part-*.parquet")))
    assert schema.names == ["image_path", "observation_id", "class_id", "binomial_name", "code", "split", "cls", "cls_last4", "dct", "error"]
    assert schema.field("cls").type == pa.list_(pa.float32())
    assert schema.field("cls_last4").type == pa.list_(pa.float32())
    assert schema.field("observation_id").type == pa.int64()
    assert report["hidden_size"] == 32
    assert report["dct_k"] == 4
    assert report["last_blocks"] == 2
    assert report["precision"] == "fp32"
    assert report["device"] == "cpu"
    assert report["worker_profile"]["images"] == report["rows"]
    assert report["worker_profile"]["forward_s"] > 0


@pytest.mark.parametrize("case", sorted(bad_image_catalogue()))
def test_embed_bad_image_catalogue(catalogue_run, case):
    embeddings = read_embeddings(catalogue_run[0]).set_index("image_path")
    row = embeddings.loc[f"bad/{case}.jpg"]
    if case in DECODE_ERRORS:
        assert DECODE_ERRORS[case] in row["error"]
        assert row["cls"] is None
        assert row["cls_last4"] is None
        assert row["dct"] is None
    else:
        assert row["error"] is None
        assert len(row["cls"]) == 32
        assert len(row["cls_last4"]) == 64
        assert len(row["dct"]) == 16
        assert np.isfinite(row["cls"]).all()


def test_embed_reports_error_count(catalogue_run):
    report = catalogue_run[1]
    assert report["errors"] == len(DECODE_ERRORS)
    assert report["embedded"] == report["rows"] - len(DECODE_ERRORS)


def test_embed_cls_equals_direct_model(catalogue_run, tiny_backbone):
    from transformers import AutoImageProcessor, Dinov2Model

    embeddings = read_embeddings(catalogue_run[0]).set_index("image_path")
    processor = AutoImageProcessor.from_pretrained(tiny_backbone)
    model = Dinov2Model.from_pretrained(tiny_backbone).eval()
    for seed in range(4):
        inputs = processor(Image.open(io.BytesIO(jpeg_bytes(seed))), return_tensors="pt")
        with torch.no_grad():
            expected = model(**inputs).last_hidden_state[0, 0].numpy()
        np.testing.assert_allclose(embeddings.loc[f"good/{seed}.jpg", "cls"], expected, atol=1e-4)


def test_embed_rerun_is_noop(spark, catalogue_run, catalogue_records, tiny_backbone):
    output, report = catalogue_run
    before = {path.name: path.stat().st_mtime_ns for path in output.iterdir()}
    again = embed_images(spark, str(catalogue_records), str(output), backbone=str(tiny_backbone), precision="fp32", dct_k=4, batch_size=4)
    assert again == report
    assert {path.name: path.stat().st_mtime_ns for path in output.iterdir()} == before


def test_embed_logs_error_count(spark, catalogue_records, tiny_backbone, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="snakeclef.embed"):
        embed_images(spark, str(catalogue_records), str(tmp_path / "out"), backbone=str(tiny_backbone), precision="fp32", dct_k=2)
    assert f"Embedded {4 + len(bad_image_catalogue())} images" in caplog.text
    assert f"{len(DECODE_ERRORS)} errors" in caplog.text
    assert f"{len(DECODE_ERRORS)} images could not be embedded and are kept as error rows, e.g. bad/" in caplog.text


def test_embed_rejects_missing_data(spark, tmp_path, tiny_backbone):
    folder = tmp_path / "images"
    folder.mkdir()
    pq.write_table(pa.table({"image_path": ["a.jpg"], "observation_id": [1]}), folder / "part-0.parquet")
    with pytest.raises(ValueError, match="have no 'data' column"):
        embed_images(spark, str(folder), str(tmp_path / "out"), backbone=str(tiny_backbone))


def test_embed_rejects_large_dct_k(spark, catalogue_records, tiny_backbone, tmp_path):
    with pytest.raises(ValueError, match="dct_k=40 is larger than the backbone's hidden size 32"):
        embed_images(spark, str(catalogue_records), str(tmp_path / "out"), backbone=str(tiny_backbone), dct_k=40)


def test_embed_rejects_foreign_output(spark, catalogue_records, tiny_backbone, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="was not written by embed_images"):
        embed_images(spark, str(catalogue_records), str(tmp_path / "out"), backbone=str(tiny_backbone))


@pytest.fixture(scope="module")
def chunked_records(tmp_path_factory) -> Path:
    images = {f"img/{seed:02d}.jpg": jpeg_bytes(seed) for seed in range(24)}
    images["img/zz_empty.jpg"] = b""
    return write_image_records(tmp_path_factory.mktemp("chunked") / "images", images, files=10)


EMBED_SCRIPT = textwrap.dedent(
    """
    import sys
    from snakeclef.spark import get_spark
    from snakeclef.embed import embed_images

    spark = get_spark(master="local[2]", settings={"spark.driver.memory": "1g"})
    embed_images(spark, sys.argv[1], sys.argv[2], backbone=sys.argv[3], precision="fp32", dct_k=4, batch_size=2, chunk_size=1)
    """
)


def done_markers(output: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in (output / "_chunks").glob("chunk-*.json")}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_embed_resumes_after_sigkill(spark, chunked_records, tiny_backbone, tmp_path):
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-c", EMBED_SCRIPT, str(chunked_records), str(killed), str(tiny_backbone)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 240
        while len(done_markers(killed)) < 3 if (killed / "_chunks").is_dir() else True:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no chunk finished in time"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    done_before = done_markers(killed)
    assert not (killed / "_SUCCESS").exists()
    assert 3 <= len(done_before) < 10
    # A chunk whose files were moved in before the kill, but whose marker was not written yet.
    stray = next(f"part-c{index:05d}-00000-stray.parquet" for index in range(10) if f"chunk-{index:05d}.json" not in done_before)
    pq.write_table(pq.read_table(next(killed.glob("part-c*.parquet"))), killed / stray)

    options = dict(backbone=str(tiny_backbone), precision="fp32", dct_k=4, batch_size=2, chunk_size=1)
    resumed = embed_images(spark, str(chunked_records), str(killed), **options)
    assert resumed["chunks"] == 10
    assert resumed["chunks_reused"] == len(done_before)
    assert resumed["chunks_computed"] == 10 - len(done_before)
    assert {name: mtime for name, mtime in done_markers(killed).items() if name in done_before} == done_before
    assert not (killed / stray).exists()

    uninterrupted = embed_images(spark, str(chunked_records), str(tmp_path / "uninterrupted"), **options)
    assert uninterrupted["chunks_computed"] == 10
    expected, result = read_embeddings(tmp_path / "uninterrupted"), read_embeddings(killed)
    assert result["image_path"].is_unique
    assert result["image_path"].tolist() == expected["image_path"].tolist()
    assert result["error"].tolist() == expected["error"].tolist()
    ok = result["error"].isna()
    np.testing.assert_allclose(np.stack(result.loc[ok, "cls"]), np.stack(expected.loc[ok, "cls"]), atol=1e-5)
    np.testing.assert_allclose(np.stack(result.loc[ok, "dct"]), np.stack(expected.loc[ok, "dct"]), atol=1e-5)
    assert resumed["rows"] == uninterrupted["rows"] == 25
    assert resumed["errors"] == 1


def test_embed_settings_change_restarts(spark, chunked_records, tiny_backbone, tmp_path, caplog):
    output = tmp_path / "out"
    options = dict(backbone=str(tiny_backbone), precision="fp32", chunk_size=10)
    embed_images(spark, str(chunked_records), str(output), dct_k=4, batch_size=4, **options)
    (output / "_SUCCESS").unlink()
    # The batch size does not change the features, so finished chunks are kept.
    kept = embed_images(spark, str(chunked_records), str(output), dct_k=4, batch_size=2, **options)
    assert kept["chunks_computed"] == 0
    assert kept["chunks_reused"] == kept["chunks"]
    (output / "_SUCCESS").unlink()
    with caplog.at_level(logging.WARNING, logger="snakeclef.embed"):
        report = embed_images(spark, str(chunked_records), str(output), dct_k=2, batch_size=4, **options)
    assert "started with other inputs or settings" in caplog.text
    assert report["chunks_reused"] == 0
    assert len(read_embeddings(output)) == 25
    assert set(read_embeddings(output)["dct"].dropna().map(len)) == {4}


def test_embed_empty_input(spark, tmp_path, tiny_backbone):
    folder = write_image_records(tmp_path / "images", {}, files=1)
    report = embed_images(spark, str(folder), str(tmp_path / "out"), backbone=str(tiny_backbone))
    assert report["rows"] == 0
    assert report["errors"] == 0
    assert (tmp_path / "out" / "_SUCCESS").is_file()
    assert len(read_embeddings(tmp_path / "out")) == 0


def test_embed_no_parquet_files(spark, tmp_path, tiny_backbone):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="no Parquet image records"):
        embed_images(spark, str(tmp_path / "images"), str(tmp_path / "out"), backbone=str(tiny_backbone))
