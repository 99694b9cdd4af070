"""Train stage on embeddings Parquet written by the tests: data, split, learning rate, determinism, crash and rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.numpy import load_file

from snakeclef import train
from snakeclef.models.classifier import load_classifier
from snakeclef.train import read_embeddings, split_train_val, train_classifier


def write_embeddings(path: Path, features, class_ids, *, split=None, errors=None, dct_k=2, backbone="tiny-backbone"):
    """Write an embeddings Parquet folder (two files) and its _embed_report.json, as the Embed stage does."""
    features = np.asarray(features, dtype=np.float32)
    n = len(features)
    errors = errors if errors is not None else [None] * n
    columns = {
        "image_path": [f"img_{i}.jpg" for i in range(n)],
        "observation_id": pa.array(np.arange(n), pa.int64()),
        "class_id": pa.array(class_ids, pa.int32()),
        "cls": pa.array([None if e else row.tolist() for row, e in zip(features, errors)], pa.list_(pa.float32())),
        "cls_last4": pa.array([None if e else row.tolist() for row, e in zip(features, errors)], pa.list_(pa.float32())),
        "dct": pa.array([None if e else row[: dct_k * dct_k].tolist() for row, e in zip(features, errors)], pa.list_(pa.float32())),
        "error": pa.array(errors, pa.string()),
    }
    if split is not None:
        columns["split"] = pa.array(split, pa.string())
    table = pa.table(columns)
    path.mkdir(parents=True)
    half = n // 2
    pq.write_table(table.slice(0, half), path / "part-00000.parquet")
    pq.write_table(table.slice(half), path / "part-00001.parquet")
    # One block, so that cls_last4 (the default feature) has the hidden size, like cls.
    report = {"backbone": backbone, "hidden_size": features.shape[1], "last_blocks": 1, "dct_k": dct_k, "precision": "fp32", "rows": n}
    (path / "_embed_report.json").write_text(json.dumps(report))
    (path / "_SUCCESS").write_text("")
    return path


def gaussian_blobs(n_per_class, class_ids, *, dim=8, spread=0.3, seed=0):
    """Separable clusters: one random centre per class plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(len(class_ids), dim))
    labels = np.repeat(class_ids, n_per_class)
    features = np.repeat(centres, n_per_class, axis=0) + rng.normal(scale=spread, size=(len(labels), dim))
    return features.astype(np.float32), labels


@pytest.fixture(autouse=True)
def single_thread():
    """Run these tiny models on one thread: on a busy machine a thread pool costs more than it gives here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def blobs_parquet(tmp_path):
    features, labels = gaussian_blobs(30, [7, 42, 1500])
    return write_embeddings(tmp_path / "embeddings", features, labels)


def test_train_separable_reaches_full_accuracy(blobs_parquet, tmp_path):
    metrics = train_classifier(blobs_parquet, tmp_path / "model", learning_rate=0.1, max_epochs=15, batch_size=16)
    classifier = load_classifier(tmp_path / "model")
    data = read_embeddings(blobs_parquet)

    assert (classifier.predict_class_ids(data.features) == data.class_ids).all()
    assert metrics["val_accuracy"] == 1.0
    assert classifier.label_map.class_ids == (7, 42, 1500)


def test_train_model_folder_contents(blobs_parquet, tmp_path):
    train_classifier(blobs_parquet, tmp_path / "model", learning_rate=0.05, max_epochs=3, batch_size=16, feature="dct")
    model_dir = tmp_path / "model"
    info = json.loads((model_dir / "model.json").read_text())
    log_lines = (model_dir / "training_log" / "metrics.csv").read_text().splitlines()

    assert (model_dir / "_SUCCESS").exists()
    assert info["backbone"] == "tiny-backbone"
    assert info["feature"] == "dct"
    assert info["feature_dim"] == 4
    assert info["class_counts"] == [24, 24, 24]
    assert {"val_loss", "val_accuracy", "val_macro_f1", "train_loss", "train_accuracy"} <= set(log_lines[0].split(","))
    assert not list(model_dir.glob("**/*.ckpt"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_lr_finder_value_used(blobs_parquet, tmp_path, monkeypatch):
    used_rates = []
    configure = train.LinearClassifierModule.configure_optimizers

    def record(module):
        optimizer = configure(module)
        used_rates.append(optimizer.param_groups[0]["lr"])
        return optimizer

    monkeypatch.setattr(train.LinearClassifierModule, "configure_optimizers", record)
    metrics = train_classifier(blobs_parquet, tmp_path / "model", max_epochs=40, batch_size=8)
    info = json.loads((tmp_path / "model" / "model.json").read_text())

    assert len(used_rates) == 3  # the finder's sweep, the training, the refit on train + val
    assert used_rates[1] == metrics["learning_rate"]
    assert used_rates[2] == metrics["learning_rate"]
    assert metrics["learning_rate"] != train.DEFAULT_LEARNING_RATE
    assert info["options"]["learning_rate"] == metrics["learning_rate"]
    assert info["options"]["learning_rate_from_finder"] is True


def test_fixed_learning_rate_skips_finder(blobs_parquet, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "_find_learning_rate", lambda *args: pytest.fail("LR finder ran"))
    metrics = train_classifier(blobs_parquet, tmp_path / "model", learning_rate=0.02, max_epochs=2)
    assert metrics["learning_rate"] == 0.02


def test_read_excludes_error_and_unlabeled_rows(tmp_path):
    features, labels = gaussian_blobs(4, [1, 2])
    labels = labels.tolist()
    labels[3] = None
    errors = [None] * 8
    errors[5] = "cannot identify image file"
    data = read_embeddings(write_embeddings(tmp_path / "embeddings", features, labels, errors=errors))

    assert data.counts == {"rows_read": 8, "rows_with_error": 1, "rows_unlabeled": 1, "rows_nonfinite": 0, "rows_used": 6}
    assert data.features.shape == (6, 8)
    assert data.class_ids.tolist() == [1, 1, 1, 2, 2, 2]


def test_read_missing_column(tmp_path):
    path = tmp_path / "embeddings"
    path.mkdir()
    pq.write_table(pa.table({"class_id": [1, 2]}), path / "part-0.parquet")
    with pytest.raises(ValueError, match=r"lacks columns \['cls_last4'\].*Delete that folder and run the Embed stage again"):
        read_embeddings(path)


def test_split_column_used(tmp_path):
    features, labels = gaussian_blobs(5, [1, 2])
    split = ["train", "train", "val", "train", "test"] * 2
    data = read_embeddings(write_embeddings(tmp_path / "embeddings", features, labels, split=split))
    train_rows, val_rows, how = split_train_val(data.class_ids, data.split)

    assert how == "split column"
    assert train_rows.tolist() == [0, 1, 3, 5, 6, 8]
    assert val_rows.tolist() == [2, 7]


def test_stratified_split_keeps_singletons():
    class_ids = np.array([1] * 10 + [2] * 5 + [3])
    train_rows, val_rows, how = split_train_val(class_ids, None, seed=3)
    again = split_train_val(class_ids, None, seed=3)

    assert how.startswith("stratified")
    assert np.bincount(class_ids[val_rows], minlength=4).tolist() == [0, 2, 1, 0]
    assert 15 in train_rows
    assert sorted(train_rows.tolist() + val_rows.tolist()) == list(range(16))
    assert again[0].tolist() == train_rows.tolist()


def test_train_deterministic(blobs_parquet, tmp_path):
    options = dict(max_epochs=4, batch_size=8, seed=5, imbalance="class_weights")
    first = train_classifier(blobs_parquet, tmp_path / "a", **options)
    second = train_classifier(blobs_parquet, tmp_path / "b", **options)
    weights_a = load_file(tmp_path / "a" / "classifier.safetensors")
    weights_b = load_file(tmp_path / "b" / "classifier.safetensors")

    for key in ("learning_rate", "val_loss", "val_accuracy", "val_macro_f1", "best_epoch"):
        assert first[key] == second[key], key
    assert np.array_equal(weights_a["weight"], weights_b["weight"])


@pytest.mark.parametrize("imbalance", ["logit_adjustment", "class_weights"])
def test_train_imbalance_options(tmp_path, imbalance):
    features, labels = gaussian_blobs(40, [1, 2, 3], spread=1.5)
    keep = np.concatenate([np.arange(40), np.arange(40, 52), np.arange(80, 84)])
    embeddings = write_embeddings(tmp_path / "embeddings", features[keep], labels[keep])
    metrics = train_classifier(embeddings, tmp_path / "model", learning_rate=0.05, max_epochs=5, imbalance=imbalance)
    info = json.loads((tmp_path / "model" / "model.json").read_text())

    assert info["options"]["imbalance"] == imbalance
    assert info["class_counts"] == [32, 10, 3]
    assert 0.0 <= metrics["val_macro_f1"] <= 1.0


def test_label_smoothing_loss_by_hand():
    module = train.LinearClassifierModule(4, 3, label_smoothing=0.2)
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -2.0]])
    target = torch.tensor([0, 2])
    log_p = torch.log_softmax(logits, dim=1)
    nll = -log_p[torch.arange(2), target]
    by_hand = (0.8 * nll - 0.2 * log_p.mean(dim=1)).mean()

    torch.testing.assert_close(module._loss(logits, target, label_smoothing=0.2), by_hand)
    torch.testing.assert_close(module._loss(logits, target), nll.mean())


def test_label_smoothing_recorded_and_trains(blobs_parquet, tmp_path):
    metrics = train_classifier(blobs_parquet, tmp_path / "model", learning_rate=0.05, max_epochs=3, label_smoothing=0.3)
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    assert info["options"]["label_smoothing"] == 0.3
    assert metrics["val_accuracy"] > 0.9


def test_train_rerun_is_noop(blobs_parquet, tmp_path):
    first = train_classifier(blobs_parquet, tmp_path / "model", learning_rate=0.05, max_epochs=2)
    stamp = (tmp_path / "model" / "_SUCCESS").stat().st_mtime_ns
    second = train_classifier(blobs_parquet, tmp_path / "model", learning_rate=0.5, max_epochs=2)

    assert second == first
    assert (tmp_path / "model" / "_SUCCESS").stat().st_mtime_ns == stamp


def test_train_missing_embed_report(blobs_parquet, tmp_path):
    (blobs_parquet / "_embed_report.json").unlink()
    with pytest.raises(FileNotFoundError, match="_embed_report.json not found"):
        train_classifier(blobs_parquet, tmp_path / "model", learning_rate=0.05, max_epochs=1)
    assert not (tmp_path / "model").exists()


def test_train_report_width_mismatch(blobs_parquet, tmp_path):
    report = json.loads((blobs_parquet / "_embed_report.json").read_text())
    (blobs_parquet / "_embed_report.json").write_text(json.dumps({**report, "hidden_size": 384}))
    with pytest.raises(ValueError, match=r"'cls_last4' in .* has 8 values per row, but _embed_report.json .* implies 384"):
        train_classifier(blobs_parquet, tmp_path / "model", learning_rate=0.05, max_epochs=1)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("feature", "patch", "feature='patch' is not supported"), ("imbalance", "focal", "imbalance='focal' is not supported"),
     ("learning_rate", -1.0, "learning_rate=-1.0 must be positive"),
     ("label_smoothing", 1.0, r"label_smoothing=1.0 must be in \[0, 1\)")],
)
def test_train_invalid_option(blobs_parquet, tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        train_classifier(blobs_parquet, tmp_path / "model", **{option: value})


TRAIN_SCRIPT = """
import sys
from snakeclef.train import train_classifier
train_classifier(sys.argv[1], sys.argv[2], learning_rate=0.01, max_epochs=int(sys.argv[3]), patience=1000, batch_size=8, seed=1)
"""


def run_training(embeddings, model_dir, max_epochs):
    return subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, str(embeddings), str(model_dir), str(max_epochs)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_train_killed_then_rerun(tmp_path):
    features, labels = gaussian_blobs(50, [1, 2, 3, 4], spread=2.0)
    embeddings = write_embeddings(tmp_path / "embeddings", features, labels)
    model_dir = tmp_path / "models" / "model"
    model_dir.parent.mkdir()
    epochs = 15

    process = run_training(embeddings, model_dir, epochs)
    deadline = time.monotonic() + 120
    while not list(model_dir.parent.glob(".model.work-*/checkpoints/*.ckpt")):
        assert process.poll() is None, "training finished before it could be killed"
        assert time.monotonic() < deadline, "training did not reach its first checkpoint"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    assert not (model_dir / "_SUCCESS").exists()
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        load_classifier(model_dir)

    assert run_training(embeddings, model_dir, epochs).wait() == 0
    assert run_training(embeddings, tmp_path / "reference", epochs).wait() == 0
    resumed = load_classifier(model_dir)
    reference = load_classifier(tmp_path / "reference")

    assert np.array_equal(resumed.weight, reference.weight)
    for key in ("val_loss", "val_accuracy", "val_macro_f1", "best_epoch"):
        assert resumed.metrics[key] == reference.metrics[key], key
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["model"]


def test_holdout_split_never_trained_on(tmp_path):
    """Rows of the held-out split take no part in training or validation."""
    rng = np.random.default_rng(0)
    n_per_class, classes = 30, [3, 9]
    rows = []
    for class_id in classes:
        for i in range(n_per_class):
            split = "val" if i % 5 == 0 else "train"
            rows.append({"image_path": f"{class_id}/{i}.jpg", "class_id": class_id, "split": split,
                         "cls": (rng.normal(size=8) + class_id).astype(np.float32).tolist()})
    folder = tmp_path / "embeddings"
    folder.mkdir()
    import pandas as pd

    pd.DataFrame(rows).assign(error=None).to_parquet(folder / "part-0.parquet")
    (folder / "_embed_report.json").write_text(json.dumps({"backbone": "tiny", "hidden_size": 8, "dct_k": 2}))

    metrics = train_classifier(folder, tmp_path / "model", feature="cls", learning_rate=0.01, max_epochs=2, holdout_split="val")

    held_out = sum(row["split"] == "val" for row in rows)
    assert metrics["rows_held_out"] == held_out
    assert metrics["train_rows"] + metrics["val_rows"] == len(rows) - held_out
    assert metrics["split"] != "split column"


def test_lr_finder_skipped_when_epochs_too_few(blobs_parquet, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(train, "_find_learning_rate", lambda *args: pytest.fail("LR finder ran"))
    with caplog.at_level("WARNING", logger="snakeclef.train"):
        metrics = train_classifier(blobs_parquet, tmp_path / "model", max_epochs=2)
    assert metrics["learning_rate"] == train.DEFAULT_LEARNING_RATE
    assert "Skipped the learning-rate finder" in caplog.text
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    assert info["options"]["learning_rate_from_finder"] is False
