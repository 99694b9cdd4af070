"""Benchmark archive ingest against a raw tarfile read of the same archive.

Builds a SnakeCLEF-like ``.tar.gz`` of N JPEGs (ph-snakes photos re-encoded at
about 500 px) with its metadata CSV for each N, then measures, each in a fresh
Python process:

- raw read: iterate the archive with ``tarfile`` and read every member's bytes, nothing else;
- ingest: ``snakeclef.data.ingest.ingest_archives`` into Parquet image records.

Ingest uses no Spark session, so there is no session start to exclude.
The last output line is one JSON object with ``ingest_img_s``, ``raw_read_img_s``,
``time_ratio`` (ingest seconds / raw seconds) and ``peak_rss_mb`` per N.

    python scripts/bench_ingest.py --photos PATH/TO/ph-snakes --sizes 5000 20000

Each child also reports its CPU seconds (all threads), because on a shared
machine the wall times depend on what else runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def encode_variants(photos: Path, *, edge: int, variants: int) -> list[tuple[str, bytes]]:
    """Re-encode every photo at ``edge`` px as JPEG, ``variants`` times with different crops and flips."""
    import pandas as pd
    from PIL import Image, ImageOps

    index = pd.read_csv(photos / "index.csv")
    encoded = []
    for variant in range(variants):
        for row in index.itertuples():
            with Image.open(photos / row.image_path) as image:
                image = image.convert("RGB")
                crop = 4 * variant
                image = image.crop((crop, 0, image.width - crop, image.height - crop))
                if variant % 2:
                    image = ImageOps.mirror(image)
                image = image.resize((edge, edge * 3 // 4 + 8 * variant), Image.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
            encoded.append((row.binomial_name.replace(" ", "_"), buffer.getvalue()))
    return encoded


def build_archive(folder: Path, n_images: int, encoded: list[tuple[str, bytes]]) -> tuple[Path, Path]:
    """Write ``images.tar.gz`` (members ``SnakeCLEF-bench/2023/Genus_species/<id>.jpg``) and ``metadata.csv``."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "images.tar.gz"
    lines = ["observation_id,endemic,code,image_path"]
    with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
        for i in range(n_images):
            genus_species, data = encoded[i % len(encoded)]
            suffix = ".JPG" if i % 7 == 0 else ".jpg"
            relative = f"2023/{genus_species}/{1_000_000 + i}{suffix}"
            info = tarfile.TarInfo(f"SnakeCLEF-bench/{relative}")
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
            lines.append(f"{100_000 + i // 2},False,PH,{relative}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return archive, folder / "metadata.csv"


def measure_raw(archive: Path) -> dict:
    started = time.perf_counter()
    cpu_started = time.process_time()
    images = 0
    total_bytes = 0
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            if member.isfile():
                total_bytes += len(tar.extractfile(member).read())
                images += 1
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started, "images": images, "bytes": total_bytes}


def measure_ingest(archive: Path, metadata: Path, output: Path, partitions: int) -> dict:
    from snakeclef.data.ingest import ingest_archives

    started = time.perf_counter()
    cpu_started = time.process_time()
    report = ingest_archives([archive], metadata, output, partitions=partitions)
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "images": report["counts"]["rows_written"],
        "bytes": report["data_bytes"],
    }


def peak_rss_mb() -> float:
    """Return this process's peak resident set size in MB.

    ``VmHWM`` is used rather than ``getrusage``, because on Linux ``ru_maxrss``
    keeps the parent's peak across ``fork`` + ``exec``.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(*arguments: str) -> dict:
    """Run one measurement in a fresh interpreter, so its peak RSS is its own."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, __file__, "--measure", *arguments], capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def child_main(arguments: argparse.Namespace) -> None:
    kind, *paths = arguments.measure
    if kind == "raw":
        result = measure_raw(Path(paths[0]))
    else:
        result = measure_ingest(Path(paths[0]), Path(paths[1]), Path(paths[2]), arguments.partitions)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "ph-snakes",
                        help="folder of photos with index.csv (ph-snakes layout)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000], help="numbers of images per archive")
    parser.add_argument("--edge", type=int, default=500, help="width in pixels of the re-encoded JPEGs")
    parser.add_argument("--variants", type=int, default=2, help="distinct re-encodings per photo")
    parser.add_argument("--partitions", type=int, default=200, help="Parquet partitions written by ingest")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement; the fastest counts")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for archives and output (default: a temporary folder)")
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.measure:
        child_main(arguments)
        return

    workdir = arguments.workdir or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    started = time.perf_counter()
    encoded = encode_variants(arguments.photos, edge=arguments.edge, variants=arguments.variants)
    mean_kb = sum(len(data) for _, data in encoded) / len(encoded) / 1024
    print(f"encoded {len(encoded)} distinct JPEGs at {arguments.edge} px, mean {mean_kb:.0f} KB, in {time.perf_counter() - started:.1f} s")
    print("spark session start: not applicable (ingest runs without Spark)")

    figures = {"ingest_img_s": {}, "ingest_mb_s": {}, "raw_read_img_s": {}, "raw_read_mb_s": {}, "time_ratio": {},
               "cpu_ratio": {}, "peak_rss_mb": {}, "raw_peak_rss_mb": {}, "archive_mb": {}}
    try:
        for n_images in arguments.sizes:
            folder = workdir / f"n{n_images}"
            started = time.perf_counter()
            archive, metadata = build_archive(folder, n_images, encoded)
            print(f"N={n_images}: built {archive} ({archive.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.1f} s")

            raws, ingests = [], []
            for _ in range(arguments.repeats):
                raws.append(run_child("raw", str(archive)))
                shutil.rmtree(folder / "images", ignore_errors=True)
                ingests.append(run_child("ingest", str(archive), str(metadata), str(folder / "images")))
            raw = min(raws, key=lambda r: r["seconds"])
            ingest = min(ingests, key=lambda r: r["seconds"])
            if ingest["images"] != n_images or raw["images"] != n_images:
                raise RuntimeError(f"N={n_images}: ingest wrote {ingest['images']} and raw read {raw['images']} images")

            key = str(n_images)
            figures["ingest_img_s"][key] = round(n_images / ingest["seconds"], 1)
            figures["ingest_mb_s"][key] = round(ingest["bytes"] / 1e6 / ingest["seconds"], 1)
            figures["raw_read_img_s"][key] = round(n_images / raw["seconds"], 1)
            figures["raw_read_mb_s"][key] = round(raw["bytes"] / 1e6 / raw["seconds"], 1)
            figures["time_ratio"][key] = round(ingest["seconds"] / raw["seconds"], 3)
            figures["cpu_ratio"][key] = round(ingest["cpu_seconds"] / raw["cpu_seconds"], 3)
            figures["peak_rss_mb"][key] = round(max(r["peak_rss_mb"] for r in ingests), 1)
            figures["raw_peak_rss_mb"][key] = round(max(r["peak_rss_mb"] for r in raws), 1)
            figures["archive_mb"][key] = round(archive.stat().st_size / 1e6, 1)
            print(
                f"N={n_images}: raw read {raw['seconds']:.2f} s ({figures['raw_read_img_s'][key]} img/s), "
                f"ingest {ingest['seconds']:.2f} s ({figures['ingest_img_s'][key]} img/s, {figures['ingest_mb_s'][key]} MB/s), "
                f"ratio {figures['time_ratio'][key]} (CPU seconds {ingest['cpu_seconds']:.2f} vs {raw['cpu_seconds']:.2f}), ingest peak RSS {figures['peak_rss_mb'][key]} MB "
                f"(all runs: raw {[round(r['seconds'], 2) for r in raws]} s, ingest {[round(r['seconds'], 2) for r in ingests]} s)"
            )
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if arguments.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    sizes = [str(n) for n in arguments.sizes]
    figures["spark_start_s"] = None
    figures["cpu_count"] = os.cpu_count()
    figures["load_average"] = [round(value, 2) for value in os.getloadavg()]
    if len(sizes) >= 2:
        figures["rss_growth"] = round(figures["peak_rss_mb"][sizes[-1]] / figures["peak_rss_mb"][sizes[0]], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
