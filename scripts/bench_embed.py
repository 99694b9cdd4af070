"""Benchmark the embedding stage against the bare backbone and a paper-style Spark reference, in one run.

Three throughputs, in images/s:

(a) limit: the backbone forward alone on pre-made input tensors, with bf16 weights and the stage's batch
    size. It runs in one process with all cores as torch threads, and in one single-threaded process per
    core. With --compile it also runs compiled.
(b) embed: ``snakeclef.embed.embed_images`` end to end (Parquet in, Parquet out, through Spark local mode).
    This includes the Python workers' startup and model load.
(c) reference: a paper-style Spark job. It runs the Hugging Face processor per batch and the fp32 model in a
    UDF that returns the whole flattened ``last_hidden_state``, and the DCT in a second UDF over that column.

It also samples the peak resident memory of the whole process tree (driver, JVM, Python workers).
The last output line is one JSON object.

Example:
    python scripts/bench_embed.py --dataset PATH/ph-snakes --backbone PATH/dinov2-small
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import psutil
import torch

from snakeclef.data.images import load_pixel_values, load_preprocess_config
from snakeclef.models.backbone import load_backbone

logger = logging.getLogger("bench_embed")


class PeakMemory:
    """Sample the resident memory of this process and all its descendants until stopped."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        root = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [root, *root.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return round(self.peak_bytes / 2**20, 1)


def make_batches(backbone_path: str, image_bytes: list[bytes], batch_size: int) -> list[torch.Tensor]:
    """Preprocess images into bf16 batches of ``(batch_size, 3, H, W)``, ready for the model, dropping a partial last batch."""
    config = load_preprocess_config(backbone_path)
    pixel_values = torch.from_numpy(np.stack([load_pixel_values(data, config) for data in image_bytes]))
    batches = [pixel_values[start : start + batch_size].to(torch.bfloat16) for start in range(0, len(pixel_values), batch_size)]
    # Full batches only: a smaller last batch makes a compiled model recompile inside the timed loop.
    return [batch for batch in batches if len(batch) == batch_size] or batches


def time_forward(model, batches: list[torch.Tensor], barrier=None) -> float:
    """Return the seconds taken by forward passes over ``batches``, after one warm-up pass."""
    with torch.inference_mode():
        model(pixel_values=batches[0])
        if barrier is not None:
            barrier.wait()
        started = time.perf_counter()
        for batch in batches:
            model(pixel_values=batch).last_hidden_state
        return time.perf_counter() - started


def forward_worker(backbone_path: str, image_bytes: list[bytes], batch_size: int, barrier, results) -> None:
    """Time one single-threaded process's share of the forward passes (for the multi-process limit)."""
    torch.set_num_threads(1)
    batches = make_batches(backbone_path, image_bytes, batch_size)
    model = load_backbone(backbone_path, device="cpu", precision="bf16").model
    results.put((sum(len(batch) for batch in batches), time_forward(model, batches, barrier)))


def measure_limit(backbone_path: str, image_bytes: list[bytes], *, batch_size: int, threads: int, compile_model: bool) -> dict:
    """Time the bf16-weight forward pass alone on preprocessed tensors; return images/s per variant.

    Variants: one process with ``threads`` torch threads (eager, and compiled if requested), and
    ``threads`` processes with one torch thread each, as Spark runs one task per core.
    """
    import multiprocessing

    torch.set_num_threads(threads)
    batches = make_batches(backbone_path, image_bytes, batch_size)
    count = sum(len(batch) for batch in batches)
    backbone = load_backbone(backbone_path, device="cpu", precision="bf16")
    results = {f"eager_1x{threads}_threads": count / time_forward(backbone.model, batches)}
    if compile_model:
        results[f"compiled_1x{threads}_threads"] = count / time_forward(torch.compile(backbone.model), batches)
    del backbone

    if threads > 1:
        context = multiprocessing.get_context("spawn")
        barrier, queue = context.Barrier(threads), context.Queue()
        shares = [image_bytes[index::threads] for index in range(threads)]
        processes = [context.Process(target=forward_worker, args=(backbone_path, share, batch_size, barrier, queue)) for share in shares]
        for process in processes:
            process.start()
        timings = [queue.get() for _ in processes]
        for process in processes:
            process.join()
        results[f"eager_{threads}x1_threads"] = sum(n for n, _ in timings) / max(seconds for _, seconds in timings)

    for name, value in results.items():
        logger.info("limit (%s, bf16 weights, batch %d): %.1f images/s", name, batch_size, value)
    return results


def run_reference(spark, images_path: str, output_path: str, backbone_path: str, *, batch_size: int) -> None:
    """Paper-style pipeline: HF processor + fp32 model in one UDF returning all tokens, the DCT in a second UDF."""
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("array<float>")
    def tokens_udf(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        import io

        from PIL import Image
        from transformers import AutoImageProcessor, AutoModel

        processor = AutoImageProcessor.from_pretrained(backbone_path)
        model = AutoModel.from_pretrained(backbone_path).eval()
        for series in batches:
            outputs = []
            for start in range(0, len(series), batch_size):
                images = [Image.open(io.BytesIO(data)).convert("RGB") for data in series.iloc[start : start + batch_size]]
                with torch.no_grad():
                    hidden = model(**processor(images, return_tensors="pt")).last_hidden_state
                outputs.extend(row.flatten().numpy() for row in hidden)
            yield pd.Series(outputs)

    hidden_size = int(json.loads(Path(backbone_path, "config.json").read_text())["hidden_size"])

    @pandas_udf("array<float>")
    def dct_udf(tokens: pd.Series) -> pd.Series:
        import scipy.fft

        def dct_of(flat):
            matrix = np.asarray(flat, dtype=np.float32).reshape(-1, hidden_size)
            return scipy.fft.dctn(matrix[1:], type=2, norm="ortho")[:8, :8].ravel()

        return tokens.map(dct_of)

    images = spark.read.parquet(images_path)
    with_tokens = images.withColumn("tokens", tokens_udf("data"))
    features = with_tokens.select(
        "image_path",
        F.slice("tokens", 1, hidden_size).alias("cls"),
        dct_udf("tokens").alias("dct"),
    )
    features.write.parquet(output_path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="image folder with index.csv (image_path column)")
    parser.add_argument("--backbone", required=True, help="backbone folder with preprocessor_config.json")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--master", default="local[2]", help="Spark master for (b) and (c)")
    parser.add_argument("--task-cpus", type=int, default=1, help="spark.task.cpus: cores (torch threads) per Spark task")
    parser.add_argument("--partitions", type=int, default=4, help="Parquet files written by the ingest stage")
    parser.add_argument("--max-images", type=int, default=0, help="use only the first N images of the index for (a) and (b); 0 means all")
    parser.add_argument("--reference-images", type=int, default=0, help="images for (c), the first N of those used for (b); 0 means all")
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd model for (a)")
    parser.add_argument("--skip-reference", action="store_true", help="skip (c)")
    parser.add_argument("--workdir", default=None, help="folder for the Parquet data (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)  # keeps the JSON line last
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from snakeclef.data.ingest import ingest_folder
    from snakeclef.embed import embed_images
    from snakeclef.spark import get_spark

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-embed-"))
    images_path = workdir / "images"
    dataset = Path(args.dataset)
    if args.max_images:
        # A shorter index.csv beside a link to each image keeps the ingest stage's folder layout.
        dataset = workdir / "dataset"
        index = pd.read_csv(Path(args.dataset) / "index.csv").head(args.max_images)
        for relative in index["image_path"]:
            link = dataset / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(Path(args.dataset).resolve() / relative)
        index.to_csv(dataset / "index.csv", index=False)
    ingest_folder(dataset, images_path, partitions=args.partitions)
    import pyarrow.parquet as pq

    image_bytes = pq.read_table(images_path, columns=["data"]).column("data").to_pylist()
    count = len(image_bytes)
    cores = int(args.master[len("local["):-1]) if args.master.startswith("local[") and args.master[6:-1].isdigit() else os.cpu_count()

    with PeakMemory() as memory:
        limits = measure_limit(args.backbone, image_bytes, batch_size=args.batch_size, threads=cores, compile_model=args.compile)
        limit_memory = memory.peak_mb

        spark = get_spark(master=args.master, settings={"spark.task.cpus": str(args.task_cpus), "spark.driver.memory": "2g"})
        started = time.perf_counter()
        report = embed_images(spark, str(images_path), str(workdir / "embeddings"), backbone=args.backbone, batch_size=args.batch_size)
        embed_seconds = time.perf_counter() - started
        embed_memory = memory.peak_mb

        reference_seconds, reference_count = None, 0
        if not args.skip_reference:
            reference_input = str(images_path)
            if args.reference_images:
                subset = spark.read.parquet(str(images_path)).limit(args.reference_images)
                reference_input = str(workdir / "reference-images")
                subset.write.parquet(reference_input)
            reference_count = spark.read.parquet(reference_input).count()
            started = time.perf_counter()
            run_reference(spark, reference_input, str(workdir / "reference"), args.backbone, batch_size=args.batch_size)
            reference_seconds = time.perf_counter() - started

    limit = max(limits.values())
    embed_rate = count / embed_seconds
    reference_rate = reference_count / reference_seconds if reference_seconds else None
    result = {
        "images": count,
        "batch_size": args.batch_size,
        "master": args.master,
        "task_cpus": args.task_cpus,
        "limit_variants_img_s": {name: round(value, 2) for name, value in limits.items()},
        "embed_report": report,
        "peak_rss_mb_limit_phase": limit_memory,
        "peak_rss_mb_embed_phase": embed_memory,
        "limit_img_s": round(limit, 2),
        "embed_img_s": round(embed_rate, 2),
        "reference_img_s": None if reference_rate is None else round(reference_rate, 2),
        "ratio_to_limit": round(embed_rate / limit, 3),
        "ratio_to_reference": None if reference_rate is None else round(embed_rate / reference_rate, 2),
        "peak_rss_mb": memory.peak_mb,
    }
    print(json.dumps({key: result[key] for key in result if key != "embed_report"}, indent=1), file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
