"""The Luigi chain end to end: tiny random backbone on synthetic images, and the real backbone on real photos."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import luigi
import pandas as pd
import pytest

from snakeclef import workflow


def run_pipeline(**params) -> luigi.execution_summary.LuigiRunResult:
    return luigi.build([workflow.Pipeline(**params)], local_scheduler=True, detailed_summary=True, log_level="WARNING")


def read_submission(path) -> pd.DataFrame:
    submission = pd.read_csv(path)
    assert list(submission.columns) == ["observation_id", "class_id"]
    return submission


def add_broken_images(dataset) -> list[str]:
    """Append a truncated JPEG (train) and a text file named .jpg (val) to the dataset's index."""
    index = pd.read_csv(dataset / "index.csv")
    good = index.iloc[0]
    truncated = "train/broken/truncated.jpg"
    not_an_image = "val/broken/not_an_image.jpg"
    (dataset / "train" / "broken").mkdir(parents=True)
    (dataset / "val" / "broken").mkdir(parents=True)
    (dataset / truncated).write_bytes((dataset / good["image_path"]).read_bytes()[:300])
    (dataset / not_an_image).write_text("this is not a JPEG")
    extra = pd.DataFrame([
        {**good.to_dict(), "image_path": truncated, "split": "train"},
        {**good.to_dict(), "image_path": not_an_image, "split": "val"},
    ])
    pd.concat([index, extra]).to_csv(dataset / "index.csv", index=False)
    return [truncated, not_an_image]


def test_pipeline_tiny_backbone(spark, synthetic_dataset, tiny_backbone, tmp_path, caplog):
    broken = add_broken_images(synthetic_dataset)
    root = tmp_path / "run"
    params = dict(dataset=str(synthetic_dataset), backbone=str(tiny_backbone), output_root=str(root), partitions=4, batch_size=4)

    first = run_pipeline(**params)
    assert first.status == luigi.execution_summary.LuigiStatusCode.SUCCESS, first.summary_text

    for artifact in ("images/_SUCCESS", "embeddings/_SUCCESS", "model/_SUCCESS", "model/label_map.json", "eval/_SUCCESS", "submission.csv", "metrics.json", "plots/separation.json"):
        assert (root / artifact).exists(), artifact

    index = pd.read_csv(synthetic_dataset / "index.csv")
    val_ids = index.index[index["split"] == "val"].tolist()
    submission = read_submission(root / "submission.csv")
    assert submission["observation_id"].tolist() == val_ids
    label_map = json.loads((root / "model" / "label_map.json").read_text())
    class_ids = label_map["class_ids"] if isinstance(label_map, dict) else label_map
    assert sorted(class_ids) == sorted(index.loc[index["split"] == "train", "class_id"].unique().tolist())
    assert set(submission["class_id"]) <= set(class_ids)

    metrics = json.loads((root / "metrics.json").read_text())
    for key in ("f1", "accuracy", "track1", "track2"):
        assert key in metrics

    # Broken images stay in the embeddings as error rows, and the broken val
    # image, its own observation, still gets a prediction.
    embeddings = pd.read_parquet(root / "embeddings", columns=["image_path", "error"])
    assert len(embeddings) == len(index)
    errors = embeddings.dropna(subset=["error"])
    assert sorted(errors["image_path"]) == sorted(broken)

    mtimes = {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}
    second = run_pipeline(**params)
    assert second.status == luigi.execution_summary.LuigiStatusCode.SUCCESS
    assert "ran successfully" not in second.summary_text
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()} == mtimes

    # Another setting on the same output root is rejected, not silently skipped over the old outputs.
    settings = json.loads((root / "_settings" / "Predict.json").read_text())
    assert settings["aggregate"] == "mode"
    third = run_pipeline(**params, aggregate="mean")
    assert third.status != luigi.execution_summary.LuigiStatusCode.SUCCESS
    assert "--aggregate 'mode' (now 'mean')" in third.summary_text or "--aggregate 'mode' (now 'mean')" in caplog.text
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()} == mtimes


def test_ingest_command_line_output(synthetic_dataset, tmp_path):
    output = tmp_path / "records"
    command = [sys.executable, "-m", "luigi", "--module", "snakeclef.workflow", "Ingest", "--local-scheduler",
               "--dataset", str(synthetic_dataset), "--output", str(output), "--partitions", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (output / "_SUCCESS").is_file()
    report = json.loads((output / "_ingest_report.json").read_text())
    assert report["output"] == str(output)


def test_failed_stage_exits_nonzero(tmp_path):
    command = [sys.executable, "-m", "luigi", "--module", "snakeclef.workflow", "Pipeline", "--local-scheduler",
               "--dataset", str(tmp_path / "no-such-dataset"), "--backbone", str(tmp_path / "no-backbone"),
               "--output-root", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    # conf/luigi.cfg sets [retcode] task_failed = 30; Luigi's own default would be 0.
    assert result.returncode == 30, result.stdout + result.stderr
    assert "index file not found" in result.stdout + result.stderr


def write_subset(ph_snakes, root, *, n_species: int = 5, n_train: int = 40, n_val: int = 8):
    """A dataset folder that links to real photos: the first ``n_species`` species, a few images each."""
    index = pd.read_csv(ph_snakes / "index.csv")
    species = sorted(index["binomial_name"].unique())[:n_species]
    parts = []
    for name in species:
        rows = index[index["binomial_name"] == name]
        parts.append(rows[rows["split"] == "train"].head(n_train))
        parts.append(rows[rows["split"] == "val"].head(n_val))
    root.mkdir(parents=True)
    for split in ("train", "val"):
        os.symlink(ph_snakes / split, root / split)
    pd.concat(parts).to_csv(root / "index.csv", index=False)
    (root / "venomous_status.csv").write_text((ph_snakes / "venomous_status.csv").read_text())
    return root


@pytest.mark.slow
def test_pipeline_real_photos(spark, ph_snakes, dinov2_small, tmp_path):
    dataset = write_subset(ph_snakes, tmp_path / "subset")
    root = tmp_path / "run"

    result = run_pipeline(dataset=str(dataset), backbone=str(dinov2_small), output_root=str(root), partitions=4)
    assert result.status == luigi.execution_summary.LuigiStatusCode.SUCCESS, result.summary_text

    submission = read_submission(root / "submission.csv")
    assert len(submission) == 5 * 8
    known_ids = set(pd.read_csv(ph_snakes / "venomous_status.csv")["class_id"])
    assert set(submission["class_id"]) <= known_ids

    metrics = json.loads((root / "metrics.json").read_text())
    # Five species: chance is 20. The full dataset scores about 65 over 14 species.
    assert metrics["accuracy"] >= 50, metrics
