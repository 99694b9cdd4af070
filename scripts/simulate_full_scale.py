"""Run the pipeline's stages on synthetic data of SnakeCLEF 2023/2024 size and measure time and peak memory.

Full size is 182,261 images in 103,404 observations of 1,784 classes, with a
long-tailed class distribution and 7,816 observations in the ``val`` subset, as
in the SnakeCLEF training plus validation metadata. ``--scales`` runs fractions
of it (observations are sampled, so images follow). Everything runs except the
real backbone's forward pass:

    make_archive    synthetic .tar.gz of small JPEGs plus a metadata CSV (setup, not a pipeline stage)
    ingest          snakeclef.data.ingest.ingest_archives
    embed           snakeclef.embed.embed_images on Spark with a tiny random DINOv2
    make_features   synthetic 768-d [CLS] features in the embeddings layout (setup)
    train           snakeclef.train.train_classifier on those features
    log_probs       the trained classifier's log-probabilities for every image
    aggregate_*     snakeclef.predict.decide_observations: mode or mean, argmax or min-cost
    metrics         snakeclef.metrics.score_submission on each submission

Each stage runs in its own child process. This process samples the summed
resident memory (RSS) of that child and all its descendants (for Spark: the
JVM and its Python workers), so a stage's peak includes its imports. RSS
counts pages shared between processes once per process, so the sum is an
upper bound. Seconds are measured inside the child around the stage call
(for ``aggregate_*``, around ``decide_observations`` alone, without loading
the log-probabilities).

For every pair of consecutive scales the script computes each stage's growth
exponent ``log(t2 / t1) / log(n2 / n1)`` (1 = linear) and flags stages whose
exponent exceeds ``--superlinear-threshold``. ``n`` is the stage's items
(images, training rows times epochs, observations), multiplied by the number of
classes for the stages whose cost grows with the classifier's width. Fixed
start-up costs push the exponent below 1 at small scales, so use scales at
least 5x apart. ``--combine`` merges the outputs of separate runs.

The last output line is one JSON object with per-stage seconds and peak MB per scale.

Example (a quick check)::

    python scripts/simulate_full_scale.py --scales 0.02,0.1
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger("simulate_full_scale")

FULL_IMAGES = 182_261
FULL_OBSERVATIONS = 103_404
N_CLASSES = 1_784
FULL_VAL_OBSERVATIONS = 7_816
N_VENOMOUS = 285
# Zipf-like class sizes: weight (rank + offset) ** -exponent, plus a minimum per class.
CLASS_SIZE_EXPONENT = 1.6
CLASS_SIZE_OFFSET = 40
MIN_IMAGES_PER_CLASS = 3

ARCHIVE_TOP = "SnakeCLEF2023-small_size"
FEATURE_WIDTH = 768
DCT_K = 8

AGGREGATIONS = (("mode", "argmax"), ("mean", "argmax"), ("mode", "min-cost"), ("mean", "min-cost"))
STAGES = (
    "make_archive", "ingest", "embed", "make_features", "train", "log_probs",
    *(f"aggregate_{aggregate}_{decision.replace('-', '_')}" for aggregate, decision in AGGREGATIONS),
    "metrics",
)
SETUP_STAGES = ("make_archive", "make_features")

# Standard DINOv2 processor settings (shortest edge 256 bicubic, center crop 224, ImageNet mean/std).
DINOV2_PREPROCESSOR = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 256},
}


# --- synthetic data -------------------------------------------------------------------------------


def full_size_class_counts() -> np.ndarray:
    """Images per class at full size, (N_CLASSES,) int64, long-tailed and summing to FULL_IMAGES."""
    weights = (np.arange(N_CLASSES) + 1 + CLASS_SIZE_OFFSET) ** -CLASS_SIZE_EXPONENT
    spare = FULL_IMAGES - N_CLASSES * MIN_IMAGES_PER_CLASS
    counts = MIN_IMAGES_PER_CLASS + np.floor(spare * weights / weights.sum()).astype(np.int64)
    counts[: FULL_IMAGES - counts.sum()] += 1  # the rounding remainder goes to the largest classes
    return counts


def observations_per_class(image_counts: np.ndarray) -> np.ndarray:
    """Split FULL_OBSERVATIONS among the classes in proportion to their images, 1 <= m_c <= n_c."""
    counts = np.clip(np.round(image_counts * FULL_OBSERVATIONS / FULL_IMAGES), 1, image_counts).astype(np.int64)
    order = np.argsort(-image_counts, kind="stable")
    position = 0
    while counts.sum() != FULL_OBSERVATIONS:
        c = order[position % N_CLASSES]
        step = 1 if counts.sum() < FULL_OBSERVATIONS else -1
        if 1 <= counts[c] + step <= image_counts[c]:
            counts[c] += step
        position += 1
    return counts


def make_metadata(scale: float, *, seed: int = 0) -> pd.DataFrame:
    """Build a SnakeCLEF-style metadata table (one row per image) for a fraction ``scale`` of the full size.

    The full-size plan is fixed by ``seed``; a scale keeps a random
    ``round(scale * FULL_OBSERVATIONS)`` of its observations with all their images.
    """
    rng = np.random.default_rng(seed)
    image_counts = full_size_class_counts()
    obs_counts = observations_per_class(image_counts)

    obs_class = np.repeat(np.arange(N_CLASSES), obs_counts)
    obs_size = np.ones(FULL_OBSERVATIONS, dtype=np.int64)
    start = 0
    for c in range(N_CLASSES):
        extra = image_counts[c] - obs_counts[c]
        if extra:
            # Exponential weights give mostly single-image observations and a few large ones.
            shares = rng.exponential(size=obs_counts[c]) ** 2
            obs_size[start:start + obs_counts[c]] += rng.multinomial(extra, shares / shares.sum())
        start += obs_counts[c]

    observation_ids = np.sort(rng.choice(3_000_000, size=FULL_OBSERVATIONS, replace=False)).astype(np.int64)
    rng.shuffle(observation_ids)
    subset = np.full(FULL_OBSERVATIONS, "train", dtype=object)
    subset[rng.choice(FULL_OBSERVATIONS, size=FULL_VAL_OBSERVATIONS, replace=False)] = "val"
    countries = np.array([chr(65 + i // 26) + chr(65 + i % 26) for i in range(180)])
    obs_code = countries[rng.integers(0, len(countries), FULL_OBSERVATIONS)]
    obs_endemic = rng.random(FULL_OBSERVATIONS) < 0.15

    n_keep = max(1, round(scale * FULL_OBSERVATIONS))
    kept_observations = np.sort(rng.permutation(FULL_OBSERVATIONS)[:n_keep])
    image_obs = np.repeat(kept_observations, obs_size[kept_observations])
    n_images = len(image_obs)

    genus = np.arange(N_CLASSES) // 6
    binomial = np.array([f"Genus{g:03d} species{c:04d}" for c, g in enumerate(genus)])
    image_ids = rng.choice(10_000_000, size=n_images, replace=False)
    years = rng.integers(1990, 2024, n_images)
    suffixes = np.where(rng.random(n_images) < 0.3, ".JPG", ".jpg")
    classes = obs_class[image_obs]
    folder = np.char.replace(binomial[classes].astype(str), " ", "_")
    image_paths = [f"{y}/{f}/{i}{s}" for y, f, i, s in zip(years, folder, image_ids, suffixes)]

    return pd.DataFrame(
        {
            "observation_id": observation_ids[image_obs],
            "captive": False,
            "endemic": obs_endemic[image_obs],
            "binomial_name": binomial[classes],
            "code": obs_code[image_obs],
            "image_path": image_paths,
            "class_id": classes.astype(np.int64),
            "subset": subset[image_obs],
        }
    )


def make_venomous_list(path: Path, *, seed: int = 0) -> set[int]:
    """Write ``class_id,MIVS`` for all classes (N_VENOMOUS of them venomous) and return the venomous ids."""
    rng = np.random.default_rng(seed + 1)
    venomous = set(rng.choice(N_CLASSES, size=N_VENOMOUS, replace=False).tolist())
    pd.DataFrame({"class_id": np.arange(N_CLASSES), "MIVS": [int(c in venomous) for c in range(N_CLASSES)]}).to_csv(path, index=False)
    return venomous


def encode_image(rng: np.random.Generator, colour: np.ndarray, size: int) -> bytes:
    """Encode a small JPEG: the class colour plus a random gradient and noise, so no two images are identical."""
    from PIL import Image

    ramp = np.linspace(-30, 30, size)[:, None, None] * rng.normal(size=3)
    pixels = colour + ramp + rng.normal(0, 8, size=(size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def write_archive(metadata: pd.DataFrame, archive: Path, *, image_size: int, seed: int = 0) -> int:
    """Write every image of ``metadata`` into a .tar.gz as ``<top>/<image_path>``; return the archive's bytes."""
    rng = np.random.default_rng(seed + 2)
    colours = rng.integers(30, 226, size=(N_CLASSES, 3))
    with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
        for image_path, class_id in zip(metadata["image_path"], metadata["class_id"]):
            data = encode_image(rng, colours[class_id], image_size)
            member = tarfile.TarInfo(f"{ARCHIVE_TOP}/{image_path}")
            member.size = len(data)
            member.mtime = 1_700_000_000
            tar.addfile(member, io.BytesIO(data))
    return archive.stat().st_size


def save_tiny_dinov2(path: Path, *, hidden_size: int = 32, seed: int = 0) -> Path:
    """Save a randomly initialised two-layer DINOv2 in the Hugging Face folder layout."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        patch_size=14,
        image_size=224,
    )
    Dinov2Model(config).eval().save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(DINOV2_PREPROCESSOR, indent=2))
    return path


def write_synthetic_embeddings(metadata: pd.DataFrame, output_dir: Path, *, rows_per_file: int = 20_000, seed: int = 0) -> None:
    """Write 768-d [CLS] and 64-d DCT features per image in the embeddings layout, ``_SUCCESS`` last.

    A class's features scatter around its own random mean, so a linear
    classifier can learn them.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed + 3)
    class_means = rng.normal(size=(N_CLASSES, FEATURE_WIDTH)).astype(np.float32)
    output_dir.mkdir(parents=True)
    for part, start in enumerate(range(0, len(metadata), rows_per_file)):
        rows = metadata.iloc[start:start + rows_per_file]
        n = len(rows)
        cls = class_means[rows["class_id"].to_numpy()] + rng.normal(0, 6, size=(n, FEATURE_WIDTH)).astype(np.float32)
        dct = rng.normal(size=(n, DCT_K * DCT_K)).astype(np.float32)
        table = pa.table(
            {
                "image_path": pa.array(rows["image_path"].to_numpy(), pa.string()),
                "observation_id": pa.array(rows["observation_id"].to_numpy(), pa.int64()),
                "class_id": pa.array(rows["class_id"].to_numpy(), pa.int32()),
                "binomial_name": pa.array(rows["binomial_name"].to_numpy(), pa.string()),
                "code": pa.array(rows["code"].to_numpy(), pa.string()),
                "split": pa.array(rows["subset"].to_numpy(), pa.string()),
                "cls": _list_array(cls),
                "dct": _list_array(dct),
                "error": pa.nulls(n, pa.string()),
            }
        )
        pq.write_table(table, output_dir / f"part-{part:05d}.parquet")
    report = {"backbone": "synthetic-768", "hidden_size": FEATURE_WIDTH, "dct_k": DCT_K, "precision": "fp32", "rows": len(metadata)}
    (output_dir / "_embed_report.json").write_text(json.dumps(report, indent=1))
    (output_dir / "_SUCCESS").write_text("")


def _list_array(matrix: np.ndarray):
    import pyarrow as pa

    n, width = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1), pa.float32()))


# --- stages (each runs in a child process) ----------------------------------------------------------


def stage_make_archive(work: Path, args: argparse.Namespace) -> dict:
    metadata = make_metadata(args.scale, seed=args.seed)
    metadata.to_csv(work / "metadata.csv", index=False)
    make_venomous_list(work / "venomous_status_list.csv", seed=args.seed)
    archive_bytes = write_archive(metadata, work / "images.tar.gz", image_size=args.image_size, seed=args.seed)
    per_class = metadata.groupby("class_id").size()
    return {
        "items": len(metadata),
        "archive_mb": round(archive_bytes / 2**20, 1),
        "images": len(metadata),
        "observations": int(metadata["observation_id"].nunique()),
        "classes": int(per_class.size),
        "images_per_class": {"min": int(per_class.min()), "median": float(per_class.median()), "max": int(per_class.max())},
        "val_observations": int(metadata.loc[metadata["subset"] == "val", "observation_id"].nunique()),
    }


def stage_ingest(work: Path, args: argparse.Namespace) -> dict:
    from snakeclef.data.ingest import ingest_archives

    report = ingest_archives([work / "images.tar.gz"], work / "metadata.csv", work / "images", partitions=args.partitions)
    rows = _parquet_rows(work / "images")
    return {"items": _metadata_rows(work), "rows_written": rows, "report": _small_report(report)}


def stage_embed(work: Path, args: argparse.Namespace) -> dict:
    from snakeclef.embed import embed_images
    from snakeclef.spark import get_spark

    backbone = save_tiny_dinov2(work / "tiny-dinov2", hidden_size=args.tiny_hidden_size)
    spark = get_spark(master=args.spark_master, settings={"spark.ui.enabled": "false"})
    try:
        report = embed_images(spark, str(work / "images"), str(work / "embeddings"), backbone=str(backbone), batch_size=args.embed_batch_size)
    finally:
        spark.stop()
    errors = _parquet_errors(work / "embeddings")
    return {"items": _metadata_rows(work), "rows_written": _parquet_rows(work / "embeddings"), "error_rows": errors, "report": _small_report(report)}


def stage_make_features(work: Path, args: argparse.Namespace) -> dict:
    metadata = pd.read_csv(work / "metadata.csv")
    write_synthetic_embeddings(metadata, work / "features", seed=args.seed)
    return {"items": len(metadata), "rows_written": _parquet_rows(work / "features")}


def stage_train(work: Path, args: argparse.Namespace) -> dict:
    from snakeclef.train import train_classifier

    metrics = train_classifier(
        work / "features", work / "model", feature="cls", learning_rate=args.learning_rate,
        max_epochs=args.max_epochs, batch_size=args.train_batch_size, seed=args.seed,
    )
    keep = ("train_rows", "val_rows", "n_classes", "epochs", "best_epoch", "learning_rate", "val_accuracy", "val_macro_f1")
    # Items are training rows times epochs run, so a changed number of epochs does not look like growth.
    epochs = int(metrics.get("epochs") or args.max_epochs)
    items = int(metrics["train_rows"]) * max(epochs, 1)
    return {"items": items, "work": items * int(metrics["n_classes"]), **{key: metrics.get(key) for key in keep}}


def stage_log_probs(work: Path, args: argparse.Namespace) -> dict:
    import pyarrow.dataset as ds

    from snakeclef.models.classifier import load_classifier

    classifier = load_classifier(work / "model")
    table = ds.dataset(work / "features", format="parquet").to_table(columns=["observation_id", "cls"])
    features = table["cls"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    log_probs = np.empty((table.num_rows, len(classifier.label_map)), dtype=np.float32)
    for start in range(0, table.num_rows, 8192):
        log_probs[start:start + 8192] = classifier.log_probs(features[start:start + 8192])
    np.save(work / "log_probs.npy", log_probs)
    np.save(work / "observation_ids.npy", table["observation_id"].to_numpy())
    return {"items": table.num_rows, "work": log_probs.size, "classes": log_probs.shape[1], "log_probs_mb": round(log_probs.nbytes / 2**20, 1)}


def stage_aggregate(work: Path, args: argparse.Namespace, *, aggregate: str, decision: str) -> dict:
    from snakeclef.models.classifier import load_classifier
    from snakeclef.predict import decide_observations, normalise_prior, read_venomous_flags, write_submission

    classifier = load_classifier(work / "model")
    class_ids = [int(class_id) for class_id in classifier.label_map.class_ids]
    log_probs = np.load(work / "log_probs.npy")
    observation_ids = np.load(work / "observation_ids.npy")
    venomous = None
    if decision == "min-cost":
        venomous = read_venomous_flags(work / "venomous_status_list.csv", class_ids)

    started = time.perf_counter()
    submission = decide_observations(
        observation_ids.tolist(), log_probs, np.zeros(len(observation_ids), dtype=bool), class_ids=class_ids,
        class_prior=normalise_prior(classifier.class_prior, len(class_ids)), aggregate=aggregate, decision=decision,
        venomous=venomous,
    )
    seconds = time.perf_counter() - started
    write_submission(submission, work / f"submission_{aggregate}_{decision}.csv")
    return {"items": len(observation_ids), "work": log_probs.size, "seconds": seconds, "observations": len(submission), "classes": len(class_ids)}


def stage_metrics(work: Path, args: argparse.Namespace) -> dict:
    from snakeclef.metrics import read_venomous_class_ids, score_submission

    metadata = pd.read_csv(work / "metadata.csv", usecols=["observation_id", "class_id"])
    venomous = read_venomous_class_ids(work / "venomous_status_list.csv")
    scores = {}
    for aggregate, decision in AGGREGATIONS:
        path = work / f"submission_{aggregate}_{decision}.csv"
        if path.exists():
            result = score_submission(pd.read_csv(path), metadata, venomous)
            scores[f"{aggregate}/{decision}"] = {key: result.get(key) for key in ("f1", "accuracy", "track1", "track2")}
    if not scores:
        raise FileNotFoundError(f"No submission_*.csv in {work}: run the aggregate stages first.")
    observations = int(metadata["observation_id"].nunique())
    return {"items": observations * len(scores), "scores": scores}


def run_stage(name: str, work: Path, args: argparse.Namespace) -> dict:
    """Run one stage in this process; return its result with ``seconds`` (wall time of the stage call)."""
    if name.startswith("aggregate_"):
        aggregate, decision = next((a, d) for a, d in AGGREGATIONS if name == f"aggregate_{a}_{d.replace('-', '_')}")
        runner = lambda: stage_aggregate(work, args, aggregate=aggregate, decision=decision)  # noqa: E731
    else:
        runner = lambda: globals()[f"stage_{name}"](work, args)  # noqa: E731
    started = time.perf_counter()
    result = runner()
    result.setdefault("seconds", time.perf_counter() - started)
    return result


def _metadata_rows(work: Path) -> int:
    return int(pd.read_csv(work / "metadata.csv", usecols=["image_path"]).shape[0])


def _parquet_rows(path: Path) -> int:
    import pyarrow.dataset as ds

    return ds.dataset(path, format="parquet").count_rows()


def _parquet_errors(path: Path) -> int:
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    dataset = ds.dataset(path, format="parquet")
    if "error" not in dataset.schema.names:
        return 0
    return int(pc.sum(pc.is_valid(dataset.to_table(columns=["error"])["error"])).as_py() or 0)


def _small_report(report) -> dict:
    """Keep the scalar entries of a stage report (counts, seconds) and drop long lists of examples."""
    if not isinstance(report, dict):
        return {}
    return {key: value for key, value in report.items() if isinstance(value, (int, float, str, bool)) or value is None}


# --- measurement (in the parent) -----------------------------------------------------------------------


class TreeMemorySampler(threading.Thread):
    """Sample the summed RSS of a process and all its descendants until stopped; keep the maximum."""

    def __init__(self, pid: int, *, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.max_processes = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass  # exited between the listing and the reading
        self.peak_bytes = max(self.peak_bytes, total)
        self.max_processes = max(self.max_processes, len(processes))

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def measure_stage(name: str, work: Path, args: argparse.Namespace) -> dict:
    """Run one stage as a child process, sampling its process tree's memory; return its result and measurements."""
    result_path = work / "results" / f"{name}.json"
    log_path = work / "logs" / f"{name}.log"
    result_path.parent.mkdir(exist_ok=True)
    log_path.parent.mkdir(exist_ok=True)
    command = [sys.executable, __file__, "--run-stage", name, "--work-dir", str(work), "--result", str(result_path)]
    command += child_options(args)

    started = time.perf_counter()
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        sampler = TreeMemorySampler(child.pid)
        sampler.start()
        try:
            returncode = child.wait(timeout=args.stage_timeout)
        except BaseException:
            child.kill()
            child.wait()
            raise
        finally:
            sampler.stop()
    process_seconds = time.perf_counter() - started
    if returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"stage {name} failed with exit code {returncode} (log {log_path}):\n{tail}")

    result = json.loads(result_path.read_text())
    result.update(
        seconds=round(result["seconds"], 3),
        process_seconds=round(process_seconds, 3),
        peak_mb=round(sampler.peak_bytes / 2**20, 1),
        max_processes=sampler.max_processes,
    )
    return result


def child_options(args: argparse.Namespace) -> list[str]:
    """Return the options a stage needs as command-line arguments for the child process."""
    options = ["--scale", str(args.scale), "--seed", str(args.seed), "--image-size", str(args.image_size)]
    options += ["--partitions", str(args.partitions), "--tiny-hidden-size", str(args.tiny_hidden_size)]
    options += ["--embed-batch-size", str(args.embed_batch_size), "--spark-master", args.spark_master]
    options += ["--learning-rate", str(args.learning_rate), "--max-epochs", str(args.max_epochs)]
    options += ["--train-batch-size", str(args.train_batch_size)]
    return options


def check_result(name: str, result: dict) -> list[str]:
    """Return problems with a stage's output: rows lost or error rows where every image is valid."""
    problems = []
    if "rows_written" in result and result["rows_written"] != result["items"]:
        problems.append(f"{name}: wrote {result['rows_written']} rows for {result['items']} images")
    if result.get("error_rows"):
        problems.append(f"{name}: {result['error_rows']} error rows, expected none (every synthetic image is valid)")
    return problems


def growth_exponents(by_scale: dict[str, dict], stages: list[str]) -> dict[str, list[dict]]:
    """For consecutive scales, each stage's exponent k in ``seconds ~ size ** k`` and the same for peak memory.

    A stage's size is its ``work`` where it reports one (rows times classes,
    for the stages whose cost grows with the classifier's width), else its
    ``items``. The width grows with the scale because small samples miss rare
    classes, while at full size it is fixed, so ``time_exponent_items`` (the
    exponent over items alone) overstates those stages' growth in images.
    """
    scales = sorted(by_scale, key=float)
    growth: dict[str, list[dict]] = {}
    for small, large in zip(scales, scales[1:]):
        for stage in stages:
            a, b = by_scale[small]["stages"].get(stage), by_scale[large]["stages"].get(stage)
            if not a or not b or b["items"] <= a["items"] or a["seconds"] <= 0:
                continue
            unit = "work" if "work" in a and "work" in b else "items"
            size_ratio = math.log(b[unit] / a[unit])
            time_ratio = math.log(max(b["seconds"], 1e-6) / a["seconds"])
            growth.setdefault(stage, []).append(
                {
                    "scales": [float(small), float(large)],
                    "size": "items x classes" if unit == "work" else "items",
                    "size_ratio": round(b[unit] / a[unit], 2),
                    "time_exponent": round(time_ratio / size_ratio, 2),
                    "time_exponent_items": round(time_ratio / math.log(b["items"] / a["items"]), 2),
                    "memory_exponent": round(math.log(b["peak_mb"] / a["peak_mb"]) / size_ratio, 2),
                    "us_per_item": [round(1e6 * a["seconds"] / a["items"], 1), round(1e6 * b["seconds"] / b["items"], 1)],
                }
            )
    return growth


def machine_description() -> dict:
    import psutil

    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# --- command line ------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="0.02,0.1", help="Comma-separated fractions of the full size to run, e.g. 0.02,0.1 or 1.0 (default: %(default)s).")
    parser.add_argument("--scale", type=float, default=None, help="Run one fraction only (same as --scales with one value).")
    parser.add_argument("--stages", default=",".join(STAGES), help="Comma-separated stages to run, in order (default: all).")
    parser.add_argument("--work-dir", type=Path, default=None, help="Folder for the generated data (default: a temporary folder, deleted at the end).")
    parser.add_argument("--keep", action="store_true", help="Keep the generated data after the run.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the synthetic data and training.")
    parser.add_argument("--image-size", type=int, default=32, help="Side of the synthetic JPEGs, in pixels.")
    parser.add_argument("--partitions", type=int, default=200, help="Parquet files the ingest stage writes.")
    parser.add_argument("--tiny-hidden-size", type=int, default=32, help="Hidden size of the random DINOv2 used for embedding.")
    parser.add_argument("--embed-batch-size", type=int, default=32, help="Images per forward pass in the embed stage.")
    parser.add_argument("--spark-master", default="local[2]", help="Spark master URL for the embed stage.")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Fixed learning rate for training (the finder is skipped).")
    parser.add_argument("--max-epochs", type=int, default=3, help="Training epochs (early stopping cannot end a run this short).")
    parser.add_argument("--train-batch-size", type=int, default=1024, help="Training batch size.")
    parser.add_argument("--stage-timeout", type=float, default=3600, help="Seconds after which a stage's process is killed.")
    parser.add_argument("--superlinear-threshold", type=float, default=1.25, help="Flag a stage whose time or memory exponent between two scales exceeds this.")
    parser.add_argument("--combine", type=Path, nargs="+", default=None, help="Do not run anything: merge the outputs of earlier runs (files whose last line is the JSON summary) and recompute the growth exponents.")
    parser.add_argument("--run-stage", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def run_child(args: argparse.Namespace) -> None:
    """Entry point of a stage's child process: run it and write its result JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    result = run_stage(args.run_stage, args.work_dir, args)
    args.result.write_text(json.dumps(result, default=str))


def run_scale(scale: float, stages: list[str], root: Path, args: argparse.Namespace) -> dict:
    work = root / f"scale-{scale:g}"
    work.mkdir(parents=True, exist_ok=True)
    args.scale = scale
    results: dict[str, dict] = {}
    problems: list[str] = []
    for name in stages:
        logger.info("scale %g: %s ...", scale, name)
        result = measure_stage(name, work, args)
        results[name] = result
        problems += [f"scale {scale:g}: {problem}" for problem in check_result(name, result)]
        logger.info(
            "scale %g: %-24s %9.1f s  %8.1f MB peak  %3d processes  %d items",
            scale, name, result["seconds"], result["peak_mb"], result["max_processes"], result["items"],
        )
    counts = results.get("make_archive", {})
    return {
        "counts": {key: counts.get(key) for key in ("images", "observations", "classes", "val_observations", "images_per_class", "archive_mb")},
        "stages": results,
        "problems": problems,
    }


def load_summaries(paths: list[Path]) -> tuple[dict[str, dict], list[str]]:
    """Merge the per-scale stage results and problems of earlier runs (their last output line); later files win."""
    by_scale: dict[str, dict] = {}
    problems: list[str] = []
    for path in paths:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise SystemExit(f"{path} is empty: expected the output of an earlier run, whose last line is its JSON summary.")
        summary = json.loads(lines[-1])
        for scale, data in summary["scales"].items():
            entry = by_scale.setdefault(scale, {"counts": {}, "stages": {}})
            if data["counts"].get("images") is not None:
                entry["counts"] = data["counts"]
            for name, seconds in data["seconds"].items():
                details = data["details"].get(name, {})
                entry["stages"][name] = {"seconds": seconds, "peak_mb": data["peak_mb"][name], "items": data["items"][name], **details}
        problems += summary.get("problems", [])
    return by_scale, problems


def summarize(by_scale: dict[str, dict], problems: list[str], threshold: float) -> dict:
    """Build the final JSON: per-scale seconds, peak MB and items per stage, growth exponents and flags."""
    stages = [name for name in STAGES if name not in SETUP_STAGES]
    growth = growth_exponents(by_scale, stages)
    superlinear = sorted(
        stage for stage, pairs in growth.items()
        if any(pair["time_exponent"] > threshold or pair["memory_exponent"] > threshold for pair in pairs)
    )
    for stage in superlinear:
        logger.warning("%s grows faster than linearly: %s", stage, growth[stage])
    for problem in problems:
        logger.error("%s", problem)

    per_scale = {}
    for scale in sorted(by_scale, key=float):
        data = by_scale[scale]
        per_scale[scale] = {
            "counts": data["counts"],
            "seconds": {name: stage["seconds"] for name, stage in data["stages"].items()},
            "peak_mb": {name: stage["peak_mb"] for name, stage in data["stages"].items()},
            "items": {name: stage["items"] for name, stage in data["stages"].items()},
            "details": {
                name: {key: value for key, value in stage.items() if key not in ("seconds", "peak_mb", "items")}
                for name, stage in data["stages"].items()
            },
        }
    return {"scales": per_scale, "growth": growth, "superlinear": superlinear, "superlinear_threshold": threshold, "problems": problems}


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.run_stage:
        run_child(args)
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    started = time.perf_counter()
    if args.combine:
        by_scale, problems = load_summaries(args.combine)
    else:
        by_scale = run_scales(args)
        problems = [problem for scale in by_scale.values() for problem in scale.pop("problems")]

    summary = summarize(by_scale, problems, args.superlinear_threshold)
    summary.update(
        total_seconds=round(time.perf_counter() - started, 1),
        machine=machine_description(),
        command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    )
    print(json.dumps(summary))
    return 1 if summary["problems"] else 0


def run_scales(args: argparse.Namespace) -> dict[str, dict]:
    """Run the selected stages at every requested scale; return the results keyed by scale."""
    scales = [args.scale] if args.scale is not None else [float(value) for value in args.scales.split(",") if value.strip()]
    stages = [value.strip() for value in args.stages.split(",") if value.strip()]
    unknown = [name for name in stages if name not in STAGES]
    if unknown:
        raise SystemExit(f"Unknown stage(s) {unknown}; choose from {', '.join(STAGES)}.")
    if any(not 0 < scale <= 1 for scale in scales):
        raise SystemExit(f"Invalid --scales {scales}: each must be in (0, 1].")

    root = args.work_dir or Path(tempfile.mkdtemp(prefix="snakeclef-scale-"))
    try:
        return {f"{scale:g}": run_scale(scale, stages, root, args) for scale in scales}
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
