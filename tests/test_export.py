"""The exported submission folder runs on its own, offline, in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from snakeclef.export import export_submission, main
from snakeclef.predict import predict_submission
from test_predict_end_to_end import CLASS_IDS, write_model_folder, write_test_metadata

# Loaded by every Python process that has this folder on PYTHONPATH: no socket may connect,
# and the process reports which copy of the package it imported.
NO_NETWORK_SITECUSTOMIZE = textwrap.dedent(
    """
    import atexit, socket, sys

    def reject_connect(self, address, *args, **kwargs):
        sys.stderr.write(f"BLOCKED CONNECT {address}\\n")
        raise OSError(f"network is disabled: connect to {address}")

    socket.socket.connect = reject_connect
    socket.socket.connect_ex = reject_connect

    @atexit.register
    def report_package():
        package = sys.modules.get("snakeclef")
        sys.stderr.write(f"SNAKECLEF FROM {getattr(package, '__file__', None)}\\n")
        sys.stderr.write(f"PYSPARK IMPORTED {'pyspark' in sys.modules}\\n")
    """
)


@pytest.fixture
def exported(tmp_path, tiny_backbone):
    model_dir = write_model_folder(tmp_path / "model", tiny_backbone)
    venomous = tmp_path / "venomous.csv"
    venomous.write_text("class_id,venomous\n7,1\n1500,0\n42,1\n")
    folder = export_submission(model_dir, tmp_path / "export", venomous_list=venomous, aggregate="mean", decision="min-cost")
    return model_dir, folder, venomous


def test_export_folder_layout(exported):
    _, folder, _ = exported
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    for name in [
        "submission.py", "classifier.safetensors", "label_map.json", "model.json", "_SUCCESS", "export.json",
        "requirements.txt", "venomous_status.csv", "backbone/config.json", "backbone/model.safetensors",
        "backbone/preprocessor_config.json", "snakeclef/__init__.py", "snakeclef/predict.py",
        "snakeclef/features.py", "snakeclef/models/classifier.py", "snakeclef/data/images.py",
    ]:
        assert name in names
    assert not any(name.startswith(("snakeclef/spark", "snakeclef/workflow", "snakeclef/embed")) for name in names)
    requirements = (folder / "requirements.txt").read_text().split()
    assert any(line.startswith("torch==") for line in requirements)
    assert any(line.startswith("transformers==") for line in requirements)
    assert not any(line.startswith(("pyspark", "luigi")) for line in requirements)
    settings = json.loads((folder / "export.json").read_text())
    assert settings["decision"] == "min-cost"
    assert settings["flip_tta"] is True


def test_exported_script_runs_offline(tmp_path, exported, synthetic_dataset):
    model_dir, folder, venomous = exported
    metadata_csv, _ = write_test_metadata(synthetic_dataset)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_NETWORK_SITECUSTOMIZE)
    workdir = tmp_path / "run"
    workdir.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    env["PYTHONPATH"] = str(site)

    result = subprocess.run(
        [sys.executable, str(folder / "submission.py"), "--metadata", str(metadata_csv),
         "--images-root", str(synthetic_dataset), "--device", "cpu", "--no-progress"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "BLOCKED CONNECT" not in result.stderr
    assert f"SNAKECLEF FROM {folder / 'snakeclef' / '__init__.py'}" in result.stderr
    assert "PYSPARK IMPORTED False" in result.stderr
    submission = pd.read_csv(workdir / "submission.csv")
    assert submission["observation_id"].tolist() == [21, 5, 99, 13, 40]
    assert set(submission["class_id"]) <= set(CLASS_IDS)

    # The export's defaults (mean, min-cost, its venomous list) give what the package gives in-process.
    expected = tmp_path / "expected.csv"
    predict_submission(
        metadata_csv, synthetic_dataset, model_dir, expected,
        aggregate="mean", decision="min-cost", venomous_list=venomous, device="cpu", progress=False,
    )
    pd.testing.assert_frame_equal(submission, pd.read_csv(expected))


def test_export_cli_rejects_incomplete_model(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(FileNotFoundError, match=r"lacks \['classifier.safetensors', 'label_map.json', 'model.json'\]"):
        main(["--model-dir", str(tmp_path / "model"), "--output", str(tmp_path / "export")])
    assert not (tmp_path / "export").exists()


def test_export_min_cost_needs_list(tmp_path, tiny_backbone):
    model_dir = write_model_folder(tmp_path / "model", tiny_backbone)
    with pytest.raises(ValueError, match="min-cost' needs venomous_list"):
        export_submission(model_dir, tmp_path / "export", decision="min-cost")


def test_export_rejects_incomplete_list(tmp_path, tiny_backbone):
    model_dir = write_model_folder(tmp_path / "model", tiny_backbone)
    venomous = tmp_path / "venomous.csv"
    venomous.write_text("class_id,MIVS\n7,1\n")
    with pytest.raises(ValueError, match="no entry for 2 class_id"):
        export_submission(model_dir, tmp_path / "export", venomous_list=venomous)
    assert not (tmp_path / "export").exists()
