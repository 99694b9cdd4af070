"""Embedding stage: ``images/`` Parquet -> ``embeddings/`` Parquet of [CLS] and DCT features, on Spark.

Each Python worker loads the backbone once (cached in this module) and runs
:class:`snakeclef.features.FeatureExtractor` inside ``mapInArrow``, so only the
two small feature vectors per image travel back through Arrow.

The input files are split into chunks of about ``chunk_size`` rows. Each chunk
is written to a hidden temporary folder, its part files are moved into the
output folder, and then a marker ``_chunks/chunk-NNNNN.json`` records it as
done. A rerun after a crash skips the chunks with a marker and deletes the
files of a chunk without one before recomputing it. ``_SUCCESS`` is written
after all chunks and the report.

Output folder layout::

    part-cNNNNN-*.parquet     rows of chunk NNNNN (input columns except ``data``, plus cls, cls_last4, dct, error)
    _chunks/plan.json         the chunk plan: input files per chunk and the settings they were computed with
    _chunks/chunk-NNNNN.json  per-chunk marker: files, rows, errors, seconds
    _embed_report.json        totals, then _SUCCESS
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.accumulators import AccumulatorParam
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T
from pyspark.errors import AnalysisException

from snakeclef import storage

logger = logging.getLogger(__name__)

REPORT_NAME = "_embed_report.json"
SUCCESS_NAME = "_SUCCESS"
CHUNKS_DIR = "_chunks"
PLAN_NAME = "plan.json"
DEFAULT_CHUNK_SIZE = 4096
FEATURE_FIELDS = [
    T.StructField("cls", T.ArrayType(T.FloatType())),
    T.StructField("cls_last4", T.ArrayType(T.FloatType())),
    T.StructField("dct", T.ArrayType(T.FloatType())),
    T.StructField("error", T.StringType()),
]


@dataclasses.dataclass(frozen=True)
class EmbedSettings:
    """Settings a Python worker builds its feature extractor from."""

    backbone: str
    device: str
    precision: str
    dct_k: int
    batch_size: int
    num_threads: int | None


# Feature extractors built in this Python worker, keyed by settings: the model loads once per worker process.
_EXTRACTORS: dict[EmbedSettings, object] = {}


def get_extractor(settings: EmbedSettings):
    """Return this process's :class:`FeatureExtractor` for ``settings``, loading the backbone on first use."""
    extractor = _EXTRACTORS.get(settings)
    if extractor is None:
        from snakeclef.features import FeatureExtractor

        extractor = FeatureExtractor(
            settings.backbone,
            device=settings.device,
            precision=settings.precision,
            dct_k=settings.dct_k,
            batch_size=settings.batch_size,
            num_threads=settings.num_threads,
        )
        _EXTRACTORS[settings] = extractor
    return extractor


def list_array(values: np.ndarray, ok: np.ndarray) -> pa.ListArray:
    """Build an Arrow ``list<float>`` column from ``(n, width)`` rows, null where ``ok`` is False."""
    width = values.shape[1]
    offsets = np.zeros(len(ok) + 1, dtype=np.int32)
    np.cumsum(ok * width, out=offsets[1:])
    flat = pa.array(values[ok].ravel(), type=pa.float32())
    return pa.ListArray.from_arrays(pa.array(offsets), flat, mask=pa.array(~ok))


def embed_record_batches(batches: Iterator[pa.RecordBatch], settings: EmbedSettings, stats=None) -> Iterator[pa.RecordBatch]:
    """Replace the ``data`` column of each image-record batch by ``cls``, ``cls_last4``, ``dct`` and ``error`` columns."""
    loaded = settings in _EXTRACTORS
    started = time.perf_counter()
    extractor = get_extractor(settings)
    # A new extractor's load time includes importing torch and transformers in this worker.
    load_seconds = 0.0 if loaded else time.perf_counter() - started
    before = dict(extractor.timings)
    for batch in batches:
        result = extractor.embed(batch.column("data").to_pylist())
        ok = result.ok
        columns = {name: batch.column(name) for name in batch.schema.names if name != "data"}
        columns["cls"] = list_array(result.cls, ok)
        columns["cls_last4"] = list_array(result.cls_last4, ok)
        columns["dct"] = list_array(result.dct, ok)
        columns["error"] = pa.array(result.errors, type=pa.string())
        yield pa.RecordBatch.from_pydict(columns)
    if stats is not None:
        profile = {key: extractor.timings[key] - before[key] for key in WORKER_TIMINGS}
        profile["load_s"] = load_seconds
        stats.add({**profile, "devices": {f"{extractor.backbone.device.type}/{extractor.backbone.precision}"}})


WORKER_TIMINGS = ("load_s", "decode_s", "forward_s", "images")


class WorkerStatsAccumulator(AccumulatorParam):
    """Spark accumulator of worker timings (summed over workers) and the device/precision pairs they used."""

    def zero(self, value: dict) -> dict:
        return {**{key: 0 for key in WORKER_TIMINGS}, "devices": set()}

    def addInPlace(self, value1: dict, value2: dict) -> dict:
        for key in WORKER_TIMINGS:
            value1[key] = value1.get(key, 0) + value2.get(key, 0)
        value1["devices"] = set(value1.get("devices", ())) | set(value2.get("devices", ()))
        return value1


def _local_path(uri: str) -> Path:
    """Turn a Spark input-file URI (``file:///a%20b``) into a local path."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme in ("file", "") else Path(uri)


def count_file_rows(spark: SparkSession, files: list[str]) -> list[int]:
    """Return the row count of each Parquet file, from its footer when the file is local."""
    counts = []
    for uri in files:
        path = _local_path(uri)
        if path.is_file():
            counts.append(pq.ParquetFile(path).metadata.num_rows)
        else:
            counts.append(spark.read.parquet(uri).count())
    return counts


def plan_chunks(files: list[str], rows: list[int], chunk_size: int) -> list[dict]:
    """Group input files, in order, into chunks of at least ``chunk_size`` rows (the last may be smaller)."""
    chunks: list[dict] = []
    current: dict = {"files": [], "rows": 0}
    for uri, count in zip(files, rows):
        current["files"].append(uri)
        current["rows"] += count
        if current["rows"] >= chunk_size:
            chunks.append(current)
            current = {"files": [], "rows": 0}
    if current["files"]:
        chunks.append(current)
    return [{"index": index, **chunk} for index, chunk in enumerate(chunks)]


def chunk_marker(output: Path, index: int) -> Path:
    return output / CHUNKS_DIR / f"chunk-{index:05d}.json"


def chunk_prefix(index: int) -> str:
    return f"part-c{index:05d}-"


def read_or_make_plan(output: Path, plan: dict) -> dict:
    """Return the saved plan when it matches ``plan``; otherwise clear the output folder and save ``plan``."""
    plan_path = output / CHUNKS_DIR / PLAN_NAME
    if plan_path.is_file():
        saved = json.loads(plan_path.read_text())
        if saved == plan:
            return saved
        logger.warning("Embedding output %s was started with other inputs or settings; discarding its %s and starting again", output, CHUNKS_DIR)
        remove_outputs(output)
    elif output.is_dir() and any(not p.name.startswith(".") for p in output.iterdir()):
        raise ValueError(
            f"output folder {output} exists, is not complete and was not written by embed_images "
            f"(no {CHUNKS_DIR}/{PLAN_NAME}); remove it or choose another output path"
        )
    output.mkdir(parents=True, exist_ok=True)
    storage.write_text(plan_path, json.dumps(plan, indent=1))
    return plan


def remove_outputs(output: Path) -> None:
    """Delete the part files, chunk markers and report of an unfinished run."""
    for path in output.iterdir():
        if path.name.startswith("part-") or path.name == REPORT_NAME or path.name.startswith("."):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    shutil.rmtree(output / CHUNKS_DIR, ignore_errors=True)


def embed_chunk(spark: SparkSession, chunk: dict, output: Path, schema: T.StructType, settings: EmbedSettings, stats) -> dict:
    """Embed one chunk of input files; return its marker contents once its part files are in ``output``."""
    index = chunk["index"]
    prefix = chunk_prefix(index)
    for stale in output.glob(f"{prefix}*"):
        stale.unlink()  # files moved in by a run that died before writing this chunk's marker

    started = time.perf_counter()
    temporary = output / f".chunk-{index:05d}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        # Round-robin rows over one partition per task slot: file-based splits can leave a core idle at the end.
        images = spark.read.schema(schema).parquet(*chunk["files"]).repartition(task_slots(spark))
        embeddings = images.mapInArrow(lambda batches: embed_record_batches(batches, settings, stats), output_schema(schema))
        embeddings.write.parquet(str(temporary))

        names = []
        for part in sorted(temporary.glob("part-*.parquet")):
            name = prefix + part.name[len("part-"):]
            os.replace(part, output / name)
            names.append(name)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)

    errors = read_errors(output, names)
    if errors.num_rows != chunk["rows"]:
        # On a multi-node cluster, executors write where the driver cannot see
        # unless the output folder is on a filesystem shared by every node.
        raise RuntimeError(
            f"chunk {index} of {output}: {chunk['rows']} input rows but {errors.num_rows} embedding rows found "
            "after the write; put the output on a filesystem that every Spark node shares"
        )
    marker = {
        "index": index,
        "files": names,
        "rows": errors.num_rows,
        "errors": int(errors.num_rows - errors.column("error").null_count),
        "seconds": round(time.perf_counter() - started, 3),
        "workers": sorted(stats.value["devices"]),
    }
    if marker["errors"]:
        examples = errors.filter(errors.column("error").is_valid()).slice(0, 3).to_pylist()
        logger.warning(
            "Chunk %d: %d images could not be embedded and are kept as error rows, e.g. %s",
            index, marker["errors"], "; ".join(f"{row['image_path']}: {row['error']}" for row in examples),
        )
    storage.write_text(chunk_marker(output, index), json.dumps(marker))
    return marker


def task_slots(spark: SparkSession) -> int:
    """Return how many tasks the cluster runs at once: its cores divided by ``spark.task.cpus``."""
    return max(1, spark.sparkContext.defaultParallelism // int(spark.conf.get("spark.task.cpus", "1")))


def read_errors(output: Path, names: list[str]) -> pa.Table:
    """Read the ``image_path`` and ``error`` columns of a chunk's part files."""
    if not names:
        return pa.table({"image_path": pa.array([], pa.string()), "error": pa.array([], pa.string())})
    return pq.read_table([str(output / name) for name in names], columns=["image_path", "error"])


def output_schema(schema: T.StructType) -> T.StructType:
    """Return the embeddings schema: the image-record columns except ``data``, then cls, cls_last4, dct and error."""
    return T.StructType([field for field in schema.fields if field.name != "data"] + FEATURE_FIELDS)


def check_inputs(images: DataFrame, images_path: str, *, batch_size: int, dct_k: int, chunk_size: int) -> None:
    columns = dict((field.name, field.dataType) for field in images.schema.fields)
    for name, expected in (("data", T.BinaryType()), ("image_path", T.StringType())):
        if name not in columns:
            raise ValueError(f"image records at {images_path} have no {name!r} column (columns: {sorted(columns)}); run the ingest stage first")
        if columns[name] != expected:
            raise ValueError(f"column {name!r} at {images_path} has type {columns[name].simpleString()}, expected {expected.simpleString()}")
    for option, value in (("batch_size", batch_size), ("dct_k", dct_k), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{option} must be a positive integer, got {value!r}")


def read_backbone_config(backbone: str) -> tuple[int, int]:
    """Return the backbone's hidden size and block count from its config (no weights are loaded on the driver)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(backbone, local_files_only=True)
        return int(config.hidden_size), int(config.num_hidden_layers)
    except OSError as error:
        raise FileNotFoundError(
            f"backbone {backbone!r} is neither a local model folder nor in the Hugging Face cache (downloads are disabled): {error}"
        ) from error


def embed_images(
    spark: SparkSession,
    images_path: str,
    output_path: str,
    *,
    backbone: str,
    batch_size: int = 32,
    precision: str = "auto",
    device: str = "auto",
    dct_k: int = 8,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    num_threads: int | None = None,
    arrow_batch_size: int | None = None,
) -> dict:
    """Embed every image record of ``images_path`` into ``output_path`` and return the stage report.

    Every input row is kept: a row whose image cannot be decoded has null
    features and an ``error`` string. ``cls`` has the backbone's hidden
    size, ``cls_last4`` that times the report's ``last_blocks`` (4, or every
    block of a smaller model), ``dct`` has ``dct_k**2`` values. ``num_threads`` sets torch
    threads per Python worker (default ``spark.task.cpus``, so concurrent
    tasks do not oversubscribe the cores). ``arrow_batch_size`` is the rows
    per Arrow batch sent to a worker (default ``2 * batch_size``); both bound
    worker memory. A finished output (``_SUCCESS``) is returned as it is.
    """
    if storage.is_gcs(output_path):
        raise ValueError(f"output_path must be a local folder, got {output_path!r}; write locally and upload with snakeclef.storage")
    output = Path(storage.strip_file_scheme(output_path))
    if (output / SUCCESS_NAME).is_file():
        logger.info("Embeddings at %s are complete; nothing to do", output)
        return json.loads((output / REPORT_NAME).read_text())

    started = time.perf_counter()
    try:
        images = spark.read.parquet(images_path)
    except AnalysisException as error:
        raise FileNotFoundError(f"no Parquet image records found at {images_path}; run the ingest stage first ({error})") from error
    check_inputs(images, images_path, batch_size=batch_size, dct_k=dct_k, chunk_size=chunk_size)
    hidden_size, num_layers = read_backbone_config(backbone)
    if dct_k > hidden_size:
        raise ValueError(f"dct_k={dct_k} is larger than the backbone's hidden size {hidden_size}; use dct_k <= {hidden_size}")
    if num_threads is None:
        # NOTE: on a GPU host every concurrent task loads its own copy of the model onto the GPU;
        # set spark.task.cpus to the executor's cores there so that one task at a time uses the GPU.
        num_threads = int(spark.conf.get("spark.task.cpus", "1"))
    settings = EmbedSettings(str(backbone), device, precision, dct_k, batch_size, num_threads)

    files = sorted(images.inputFiles())
    # Only settings that change the features decide whether finished chunks can be kept.
    feature_settings = {key: getattr(settings, key) for key in ("backbone", "device", "precision", "dct_k")}
    feature_settings["columns"] = [field.name for field in FEATURE_FIELDS]
    plan = read_or_make_plan(output, {"settings": feature_settings, "chunks": plan_chunks(files, count_file_rows(spark, files), chunk_size)})
    markers, profile = run_chunks(spark, plan, output, images.schema, settings, arrow_batch_size or 2 * batch_size)

    report = make_report(plan, markers, profile, settings, hidden_size, time.perf_counter() - started)
    from snakeclef.models.backbone import last_blocks

    report["last_blocks"] = last_blocks(num_layers)
    storage.write_text(output / REPORT_NAME, json.dumps(report, indent=2))
    storage.write_text(output / SUCCESS_NAME, "")
    logger.info(
        "Embedded %d images into %s: %d errors, %d of %d chunks computed in this run, %.1f images/s",
        report["rows"], output, report["errors"], report["chunks_computed"], report["chunks"], report["images_per_second"],
    )
    return report


def run_chunks(
    spark: SparkSession, plan: dict, output: Path, schema: T.StructType, settings: EmbedSettings, arrow_batch_size: int
) -> tuple[dict, dict]:
    """Embed every chunk that has no marker yet; return all markers (``computed`` set on this run's) and the worker profile."""
    chunks = plan["chunks"]
    markers, pending = {}, []
    for chunk in chunks:
        marker_path = chunk_marker(output, chunk["index"])
        if marker_path.is_file():
            markers[chunk["index"]] = {**json.loads(marker_path.read_text()), "computed": False}
        else:
            pending.append(chunk)
    if markers:
        logger.info("Resuming embeddings at %s: %d of %d chunks already done", output, len(markers), len(chunks))

    stats = spark.sparkContext.accumulator(WorkerStatsAccumulator().zero({}), WorkerStatsAccumulator())
    arrow_key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    previous = spark.conf.get(arrow_key, None)
    spark.conf.set(arrow_key, str(arrow_batch_size))
    rows_done, started = 0, time.perf_counter()
    try:
        for chunk in pending:
            marker = embed_chunk(spark, chunk, output, schema, settings, stats)
            markers[chunk["index"]] = {**marker, "computed": True}
            rows_done += marker["rows"]
            logger.info(
                "Chunk %d done (%d/%d): %d rows, %d errors, %.1f s; %.1f images/s so far",
                chunk["index"], len(markers), len(chunks), marker["rows"], marker["errors"], marker["seconds"],
                rows_done / (time.perf_counter() - started),
            )
    finally:
        if previous is None:
            spark.conf.unset(arrow_key)
        else:
            spark.conf.set(arrow_key, previous)
    profile = {key: round(value, 3) for key, value in stats.value.items() if key in WORKER_TIMINGS}
    return markers, profile


def make_report(plan: dict, markers: dict, profile: dict, settings: EmbedSettings, hidden_size: int, seconds: float) -> dict:
    """Summarise the run: settings, counts over all chunks, and the speed of the chunks computed now."""
    chunk_markers = [markers[chunk["index"]] for chunk in plan["chunks"]]
    # "cpu/bf16"-style pairs reported by the workers, so "auto" shows what it resolved to.
    workers = sorted(set().union(*(marker.get("workers", []) for marker in chunk_markers)))
    computed = [marker for marker in chunk_markers if marker["computed"]]
    computed_rows = sum(marker["rows"] for marker in computed)
    compute_seconds = sum(marker["seconds"] for marker in computed)
    return {
        "backbone": settings.backbone,
        "hidden_size": hidden_size,
        "dct_k": settings.dct_k,
        "precision": workers[0].split("/")[1] if len(workers) == 1 else settings.precision,
        "device": workers[0].split("/")[0] if len(workers) == 1 else settings.device,
        "precision_requested": settings.precision,
        "device_requested": settings.device,
        "workers_device_precision": workers,
        "batch_size": settings.batch_size,
        "torch_threads_per_worker": settings.num_threads,
        "rows": sum(marker["rows"] for marker in chunk_markers),
        "embedded": sum(marker["rows"] - marker["errors"] for marker in chunk_markers),
        "errors": sum(marker["errors"] for marker in chunk_markers),
        "chunks": len(chunk_markers),
        "chunks_computed": len(computed),
        "chunks_reused": len(chunk_markers) - len(computed),
        "rows_computed": computed_rows,
        "seconds": round(seconds, 3),
        "images_per_second": round(computed_rows / compute_seconds, 2) if compute_seconds else 0.0,
        # Seconds summed over the Python workers of this run: model load, decode + preprocess, forward + DCT.
        "worker_profile": profile,
    }
