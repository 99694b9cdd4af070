"""Shared fixtures: one Spark session per test run, a tiny random DINOv2, real data paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
PH_SNAKES = SHARED / "data" / "ph-snakes"
SNAKECLEF_META = SHARED / "data" / "snakeclef-meta"
DINOV2_SMALL = SHARED / "models" / "dinov2-small"

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

# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """Folder of a tiny random DINOv2 (hidden size 32), loadable with ``from_pretrained``."""
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny-dinov2"))


@pytest.fixture(scope="session")
def spark():
    """The run's one SparkSession, in local mode with two cores."""
    from snakeclef.spark import get_spark

    return get_spark(master="local[2]", settings={"spark.sql.shuffle.partitions": "4", "spark.driver.memory": "2g"})


@pytest.fixture(scope="session")
def ph_snakes() -> Path:
    if not (PH_SNAKES / "index.csv").is_file():
        pytest.skip(f"real photos not found at {PH_SNAKES}")
    return PH_SNAKES


@pytest.fixture(scope="session")
def dinov2_small() -> Path:
    if not (DINOV2_SMALL / "config.json").is_file():
        pytest.skip(f"pretrained DINOv2-small not found at {DINOV2_SMALL}")
    return DINOV2_SMALL


@pytest.fixture(scope="session")
def snakeclef_meta() -> Path:
    if not (SNAKECLEF_META / "venomous_status_list.csv").is_file():
        pytest.skip(f"SnakeCLEF metadata not found at {SNAKECLEF_META}")
    return SNAKECLEF_META


def write_synthetic_dataset(root: Path, *, n_classes: int = 3, per_class: int = 6, size: int = 64, seed: int = 0) -> Path:
    """Write a folder of JPEGs plus ``index.csv`` in the ph-snakes layout; each class has its own colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = ["image_path,split,binomial_name,class_id,venomous"]
    for c in range(n_classes):
        class_id = 100 + 7 * c
        name = f"Genus species{c}"
        base = rng.integers(0, 256, size=3)
        for i in range(per_class):
            split = "val" if i % 3 == 0 else "train"
            rel = f"{split}/Snake {c} ({name})/img_{c}_{i}.jpg"
            pixels = np.clip(base + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / rel, quality=90)
            rows.append(f'"{rel}",{split},{name},{class_id},{c % 2}')
    (root / "index.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def synthetic_dataset(tmp_path) -> Path:
    """A small labelled image folder with ``index.csv`` (3 classes x 6 images, ids 100, 107, 114)."""
    return write_synthetic_dataset(tmp_path / "dataset")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A gcp-storage-emulator process on 127.0.0.1; yields its ``http://127.0.0.1:PORT`` address."""
    import socket
    import subprocess
    import time

    port = free_port()
    log_path = tmp_path_factory.mktemp("emulator") / "emulator.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            ["gcp-storage-emulator", "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--quiet"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"gcp-storage-emulator did not start on 127.0.0.1:{port}; see {log_path}")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def stop_process_group(process) -> None:
    """Stop a process started with ``start_new_session=True``: SIGTERM to its group, SIGKILL after 20 s."""
    import os
    import signal
    import subprocess

    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)
