"""The offline predictor from image files to submission.csv, with the tiny DINOv2 and a hand-made model folder."""

from __future__ import annotations

import json
import socket

import numpy as np
import pandas as pd
import pytest

from snakeclef.features import FeatureExtractor
from snakeclef.models.classifier import LabelMap, load_classifier, save_model_folder
from snakeclef.predict import mode_first_tiebreak, predict_submission

CLASS_IDS = [7, 1500, 42]


def write_model_folder(path, backbone, *, hidden_size=32, seed=0, feature="cls", dct_k=8):
    """Write a model folder with a random linear layer over the tiny backbone's [CLS] or DCT features."""
    rng = np.random.default_rng(seed)
    width = hidden_size if feature == "cls" else dct_k * dct_k
    save_model_folder(
        path,
        weight=rng.normal(0, 1, (len(CLASS_IDS), width)).astype(np.float32),
        bias=np.zeros(len(CLASS_IDS), np.float32),
        label_map=LabelMap(CLASS_IDS),
        info={"feature": feature, "backbone": str(backbone), "hidden_size": hidden_size, "dct_k": dct_k, "class_counts": [5, 30, 10]},
        metrics={},
    )
    return path


def write_test_metadata(dataset):
    """Write test metadata over the synthetic images: 5 observations, one all-corrupt, one with a missing file."""
    index = pd.read_csv(dataset / "index.csv")
    paths = index["image_path"].tolist()
    (dataset / "broken.jpg").write_bytes(b"not a jpeg at all")
    (dataset / "empty.jpg").write_bytes(b"")
    rows = [
        (21, paths[0]), (21, paths[7]), (21, paths[14]),
        (5, paths[1]),
        (99, "broken.jpg"), (99, "empty.jpg"),
        (13, paths[2]), (13, "missing/nowhere.jpg"),
        (40, paths[8]), (40, paths[9]),
    ]
    metadata = pd.DataFrame(rows, columns=["observation_id", "image_path"])
    metadata["code"] = "PH"
    metadata.to_csv(dataset / "test.csv", index=False)
    return dataset / "test.csv", metadata


@pytest.fixture
def model_dir(tmp_path, tiny_backbone):
    return write_model_folder(tmp_path / "model", tiny_backbone)


def test_submission_one_row_per_observation(tmp_path, synthetic_dataset, model_dir):
    metadata_csv, metadata = write_test_metadata(synthetic_dataset)
    output = tmp_path / "out" / "submission.csv"

    summary = predict_submission(metadata_csv, synthetic_dataset, model_dir, output, device="cpu", progress=False)

    submission = pd.read_csv(output)
    assert list(submission.columns) == ["observation_id", "class_id"]
    assert submission["observation_id"].tolist() == [21, 5, 99, 13, 40]
    assert set(submission["class_id"]) <= set(CLASS_IDS)
    assert summary["observations"] == 5
    assert summary["images"] == 10
    assert summary["failures"] == 3
    assert summary["failed_observations"] == 1
    # Every image of observation 99 failed: the class prior [5, 30, 10] makes it class_id 1500.
    assert submission.set_index("observation_id").loc[99, "class_id"] == 1500


def test_submission_matches_direct_features(tmp_path, synthetic_dataset, model_dir, tiny_backbone):
    metadata_csv, metadata = write_test_metadata(synthetic_dataset)
    output = tmp_path / "submission.csv"
    predict_submission(metadata_csv, synthetic_dataset, model_dir, output, device="cpu", batch_size=3, progress=False)

    # The same images through the extractor and classifier by hand: the mean probabilities of
    # each image and its mirror image (the default flip_tta), then the mode per observation.
    classifier = load_classifier(model_dir)
    extractor = FeatureExtractor(tiny_backbone, device="cpu")
    expected = {}
    for observation_id, group in metadata.groupby("observation_id", sort=False):
        files = [synthetic_dataset / p for p in group["image_path"] if (synthetic_dataset / p).is_file()]
        batch = extractor.embed([f.read_bytes() for f in files], flipped=True)
        probs = np.exp(classifier.log_probs(batch.cls[batch.ok])) + np.exp(classifier.log_probs(batch.cls_flipped[batch.ok]))
        indices = probs.argmax(axis=1).tolist()
        if indices:
            expected[observation_id] = CLASS_IDS[mode_first_tiebreak(indices)]

    submission = pd.read_csv(output).set_index("observation_id")["class_id"].to_dict()
    assert {k: submission[k] for k in expected} == expected


def test_min_cost_and_mean_run(tmp_path, synthetic_dataset, model_dir):
    metadata_csv, _ = write_test_metadata(synthetic_dataset)
    venomous = tmp_path / "venomous.csv"
    venomous.write_text("class_id,MIVS\n7,1\n1500,0\n42,1\n")
    output = tmp_path / "submission.csv"

    predict_submission(
        metadata_csv, synthetic_dataset, model_dir, output,
        aggregate="mean", decision="min-cost", venomous_list=venomous, device="cpu", progress=False,
    )

    submission = pd.read_csv(output)
    assert submission["observation_id"].tolist() == [21, 5, 99, 13, 40]
    # Prior [5, 30, 10] / 45 with venomous {7, 42}: choosing 1500 costs (5 + 10) / 45 * 5 = 1.67,
    # choosing 42 costs (5 * 2 + 30 * 2) / 45 = 1.56, choosing 7 costs (30 * 2 + 10 * 2) / 45 = 1.78.
    assert submission.set_index("observation_id").loc[99, "class_id"] == 42


def test_min_cost_without_list_rejected(tmp_path, synthetic_dataset, model_dir):
    metadata_csv, _ = write_test_metadata(synthetic_dataset)
    with pytest.raises(ValueError, match="min-cost' needs venomous_list"):
        predict_submission(metadata_csv, synthetic_dataset, model_dir, tmp_path / "s.csv", decision="min-cost")
    assert not (tmp_path / "s.csv").exists()


def test_no_socket_connection(tmp_path, synthetic_dataset, model_dir, monkeypatch):
    attempts = []

    def reject_connect(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network is disabled in this test: connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", reject_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", reject_connect)
    metadata_csv, _ = write_test_metadata(synthetic_dataset)

    summary = predict_submission(metadata_csv, synthetic_dataset, model_dir, tmp_path / "submission.csv", device="cpu", progress=False)

    assert attempts == []
    assert summary["observations"] == 5


def test_cli_writes_submission(tmp_path, synthetic_dataset, model_dir, capsys):
    from snakeclef.predict import main

    metadata_csv, _ = write_test_metadata(synthetic_dataset)
    output = tmp_path / "submission.csv"
    main([
        "--metadata", str(metadata_csv), "--images-root", str(synthetic_dataset), "--model-dir", str(model_dir),
        "--output", str(output), "--aggregate", "mean", "--device", "cpu", "--no-progress",
    ])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["aggregate"] == "mean"
    assert len(pd.read_csv(output)) == 5


def test_folder_index_without_ids(tmp_path, synthetic_dataset, model_dir):
    output = tmp_path / "submission.csv"
    summary = predict_submission(
        synthetic_dataset / "index.csv", synthetic_dataset, model_dir, output, split="val", device="cpu", progress=False
    )
    index = pd.read_csv(synthetic_dataset / "index.csv")
    assert pd.read_csv(output)["observation_id"].tolist() == index.index[index["split"] == "val"].tolist()
    assert summary["failures"] == 0


def test_missing_images_root_rejected(tmp_path, synthetic_dataset, model_dir):
    metadata_csv, _ = write_test_metadata(synthetic_dataset)
    with pytest.raises(FileNotFoundError, match="Images root .*nowhere' is not a folder"):
        predict_submission(metadata_csv, tmp_path / "nowhere", model_dir, tmp_path / "submission.csv")
    assert not (tmp_path / "submission.csv").exists()


def test_dct_model_uses_its_dct_k(tmp_path, synthetic_dataset, tiny_backbone):
    model_dir = write_model_folder(tmp_path / "model", tiny_backbone, feature="dct", dct_k=4)
    metadata_csv, metadata = write_test_metadata(synthetic_dataset)
    output = tmp_path / "submission.csv"
    predict_submission(metadata_csv, synthetic_dataset, model_dir, output, device="cpu", progress=False)

    classifier = load_classifier(model_dir)
    extractor = FeatureExtractor(tiny_backbone, device="cpu", dct_k=4)
    batch = extractor.embed([(synthetic_dataset / metadata["image_path"][3]).read_bytes()])
    expected = CLASS_IDS[int(classifier.log_probs(batch.dct).argmax())]
    # Observation 5 has exactly one image, the fourth metadata row.
    assert pd.read_csv(output).set_index("observation_id").loc[5, "class_id"] == expected


def test_empty_metadata_writes_header(tmp_path, synthetic_dataset, model_dir):
    metadata_csv = tmp_path / "empty.csv"
    metadata_csv.write_text("observation_id,image_path\n")
    output = tmp_path / "submission.csv"
    summary = predict_submission(metadata_csv, synthetic_dataset, model_dir, output, device="cpu", progress=False)
    assert output.read_text() == "observation_id,class_id\n"
    assert summary["observations"] == 0
    assert summary["images"] == 0


def test_no_class_counts_uses_uniform_prior(tmp_path, synthetic_dataset, tiny_backbone):
    model_dir = write_model_folder(tmp_path / "model", tiny_backbone)
    info = json.loads((model_dir / "model.json").read_text())
    del info["class_counts"]
    (model_dir / "model.json").write_text(json.dumps(info))
    metadata_csv, _ = write_test_metadata(synthetic_dataset)
    output = tmp_path / "submission.csv"

    predict_submission(metadata_csv, synthetic_dataset, model_dir, output, device="cpu", progress=False)

    # A uniform prior ties every class, and argmax takes the first: index 0, class_id 7.
    assert pd.read_csv(output).set_index("observation_id").loc[99, "class_id"] == 7
