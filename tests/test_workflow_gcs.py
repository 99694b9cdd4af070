"""The main job from a gs:// dataset to a gs:// output root, against a GCS emulator on loopback."""

from __future__ import annotations

import io
import json

import luigi
import pandas as pd

from snakeclef import storage, workflow

BUCKET = "snakeclef-pipeline"


def test_pipeline_gcs_round_trip(spark, synthetic_dataset, tiny_backbone, gcs_emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("SNAKECLEF_WORK_DIR", str(tmp_path / "work"))
    client = storage.make_gcs_client()
    bucket = client.lookup_bucket(BUCKET) or client.create_bucket(BUCKET)
    for path in synthetic_dataset.rglob("*"):
        if path.is_file():
            bucket.blob(f"datasets/synthetic/{path.relative_to(synthetic_dataset).as_posix()}").upload_from_filename(str(path))

    task = workflow.Pipeline(
        dataset=f"gs://{BUCKET}/datasets/synthetic",
        backbone=str(tiny_backbone),
        output_root=f"gs://{BUCKET}/runs/first",
        partitions=2,
        batch_size=4,
        max_epochs=5,
    )
    result = luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert result.status == luigi.execution_summary.LuigiStatusCode.SUCCESS, result.summary_text

    names = {blob.name for blob in client.list_blobs(BUCKET, prefix="runs/first/")}
    for artifact in ("images/_SUCCESS", "embeddings/_SUCCESS", "model/_SUCCESS", "model/label_map.json", "submission.csv", "metrics.json"):
        assert f"runs/first/{artifact}" in names, artifact

    submission = pd.read_csv(io.BytesIO(bucket.blob("runs/first/submission.csv").download_as_bytes()))
    index = pd.read_csv(synthetic_dataset / "index.csv")
    assert submission["observation_id"].tolist() == index.index[index["split"] == "val"].tolist()
    metrics = json.loads(bucket.blob("runs/first/metrics.json").download_as_text())
    assert "track1" in metrics
    assert task.complete()


def test_ingest_gcs_archive_and_metadata(synthetic_dataset, gcs_emulator, tmp_path, monkeypatch):
    import tarfile

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    index = pd.read_csv(synthetic_dataset / "index.csv")
    archive = tmp_path / "train.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for image_path in index["image_path"]:
            tar.add(synthetic_dataset / image_path, arcname=f"SnakeCLEF-small/{image_path}")
    metadata = index.assign(observation_id=range(1000, 1000 + len(index)))
    metadata_csv = tmp_path / "metadata.csv"
    metadata.to_csv(metadata_csv, index=False)

    client = storage.make_gcs_client()
    bucket = client.lookup_bucket(BUCKET) or client.create_bucket(BUCKET)
    # Both files under one prefix: each gets its own download folder and marker.
    bucket.blob("snakeclef/train.tar.gz").upload_from_filename(str(archive))
    bucket.blob("snakeclef/metadata.csv").upload_from_filename(str(metadata_csv))

    output = tmp_path / "images"
    task = workflow.Ingest(
        archive=(f"gs://{BUCKET}/snakeclef/train.tar.gz",),
        metadata=f"gs://{BUCKET}/snakeclef/metadata.csv",
        output=str(output),
        output_root=str(tmp_path / "run"),
        partitions=2,
    )
    result = luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert result.status == luigi.execution_summary.LuigiStatusCode.SUCCESS, result.summary_text

    report = json.loads((output / "_ingest_report.json").read_text())
    assert report["counts"]["rows_written"] == len(index), report
