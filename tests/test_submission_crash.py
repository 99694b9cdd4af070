"""A submission run killed with SIGKILL leaves no submission.csv behind, and a rerun writes the full one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from snakeclef.predict import predict_submission
from test_predict_end_to_end import write_model_folder

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "submission.py"


def start_submission(metadata_csv, images_root, model_dir, output):
    command = [
        sys.executable, str(SCRIPT), "--metadata", str(metadata_csv), "--images-root", str(images_root),
        "--model-dir", str(model_dir), "--output", str(output), "--batch-size", "2", "--device", "cpu", "--no-progress",
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_killed_run_leaves_no_submission(tmp_path, synthetic_dataset, tiny_backbone):
    model_dir = write_model_folder(tmp_path / "model", tiny_backbone)
    index = pd.read_csv(synthetic_dataset / "index.csv")
    # 612 rows over the 18 images: long enough to be killed while predicting.
    metadata = pd.DataFrame({"image_path": index["image_path"].tolist() * 34})
    metadata.insert(0, "observation_id", metadata.index // 3)
    metadata_csv = tmp_path / "test.csv"
    metadata.to_csv(metadata_csv, index=False)
    output = tmp_path / "out" / "submission.csv"

    process = start_submission(metadata_csv, synthetic_dataset, model_dir, output)
    for line in process.stdout:
        if "Predicting" in line:
            break
    time.sleep(1.0)
    assert process.poll() is None, "the run finished before it could be killed; give it more rows"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not output.exists()
    assert not output.parent.exists() or list(output.parent.iterdir()) == []

    rerun = start_submission(metadata_csv, synthetic_dataset, model_dir, output)
    log, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, log[-3000:]

    expected = tmp_path / "expected.csv"
    predict_submission(metadata_csv, synthetic_dataset, model_dir, expected, device="cpu", progress=False)
    pd.testing.assert_frame_equal(pd.read_csv(output), pd.read_csv(expected))
    assert len(pd.read_csv(output)) == 204
