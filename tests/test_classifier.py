"""Label map, model folder writing and safe loading of the trained classifier."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from snakeclef.models.classifier import LabelMap, load_classifier, save_model_folder


def write_model(model_dir, *, n_classes=4, feature_dim=6, class_ids=None, **info):
    rng = np.random.default_rng(0)
    label_map = LabelMap(class_ids if class_ids is not None else [10 * (i + 1) for i in range(n_classes)])
    info = {"backbone": "tiny", "hidden_size": feature_dim, "dct_k": 8, "feature": "cls", "class_counts": [5] * len(label_map), **info}
    save_model_folder(
        model_dir,
        weight=rng.normal(size=(n_classes, feature_dim)).astype(np.float32),
        bias=rng.normal(size=n_classes).astype(np.float32),
        label_map=label_map,
        info=info,
        metrics={"val_accuracy": 0.5},
    )
    return model_dir


def test_label_map_round_trip(tmp_path):
    label_map = LabelMap.from_labels([7, 1500, 42, 42, 7])
    indices = label_map.to_indices([7, 1500, 42])

    assert label_map.class_ids == (7, 42, 1500)
    assert indices.tolist() == [0, 2, 1]
    assert label_map.to_class_ids(indices).tolist() == [7, 1500, 42]

    label_map.save(tmp_path / "label_map.json")
    loaded = LabelMap.load(tmp_path / "label_map.json")
    assert loaded == label_map
    assert loaded.to_class_ids(loaded.to_indices([7, 1500, 42])).tolist() == [7, 1500, 42]


def test_label_map_unknown_class_id():
    with pytest.raises(KeyError, match=r"class_ids \[99\] are not in the label map"):
        LabelMap([7, 42]).to_indices([7, 99])


def test_label_map_index_out_of_range():
    with pytest.raises(IndexError, match=r"Output index out of range \[0, 2\)"):
        LabelMap([7, 42]).to_class_ids([2])


def test_label_map_duplicates_rejected():
    with pytest.raises(ValueError, match=r"duplicate class_ids \[7\]"):
        LabelMap([7, 42, 7])


@pytest.mark.parametrize("text", ['{"class_ids": ["7", "42"]}', "[7, 42]", '{"class_ids": [7, true]}'])
def test_label_map_load_invalid_json(tmp_path, text):
    (tmp_path / "label_map.json").write_text(text)
    with pytest.raises(ValueError, match="Invalid label map"):
        LabelMap.load(tmp_path / "label_map.json")


def test_model_folder_round_trip(tmp_path):
    model_dir = write_model(tmp_path / "model")
    classifier = load_classifier(model_dir)
    features = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
    log_probs = classifier.log_probs(features)

    assert sorted(p.name for p in model_dir.iterdir()) == [
        "_SUCCESS", "classifier.safetensors", "label_map.json", "metrics.json", "model.json",
    ]
    assert log_probs.shape == (3, 4)
    assert np.allclose(np.exp(log_probs).sum(axis=1), 1.0, atol=1e-5)
    assert classifier.predict_class_ids(features).tolist() == [10 * (i + 1) for i in log_probs.argmax(axis=1)]
    assert classifier.feature == "cls"
    assert classifier.backbone == "tiny"
    assert classifier.class_prior.tolist() == [0.25] * 4
    assert classifier.metrics == {"val_accuracy": 0.5}


def test_log_probs_standardization(tmp_path):
    mean, std = [1.0] * 6, [2.0] * 6
    model_dir = write_model(tmp_path / "model", standardization={"mean": mean, "std": std})
    classifier = load_classifier(model_dir)
    features = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
    expected = ((features - 1.0) / 2.0) @ classifier.weight.T + classifier.bias

    assert np.allclose(classifier.logits(features), expected, atol=1e-5)


def test_calibrated_log_probs_add_prior(tmp_path):
    model_dir = write_model(
        tmp_path / "model", class_counts=[1, 1, 2, 4], options={"imbalance": "logit_adjustment", "logit_adjustment_tau": 1.0}
    )
    classifier = load_classifier(model_dir)
    features = np.zeros((1, 6), dtype=np.float32)
    shift = classifier.calibrated_log_probs(features) - classifier.log_probs(features)
    expected = np.log([1 / 8, 1 / 8, 2 / 8, 4 / 8])

    assert np.allclose(shift - shift.mean(), expected - expected.mean(), atol=1e-5)


def test_load_mismatched_label_map(tmp_path):
    model_dir = write_model(tmp_path / "model", n_classes=4)
    LabelMap([1, 2, 3]).save(model_dir / "label_map.json")

    with pytest.raises(ValueError, match="has 4 outputs but its label map has 3 class_ids"):
        load_classifier(model_dir)


def test_load_mismatched_feature_width(tmp_path):
    model_dir = write_model(tmp_path / "model", feature_dim=6)
    info = json.loads((model_dir / "model.json").read_text())
    info.update(hidden_size=384, feature_dim=None)
    (model_dir / "model.json").write_text(json.dumps(info))

    with pytest.raises(ValueError, match=r"takes 6 features, but 'cls' features of backbone 'tiny' \(hidden_size=384"):
        load_classifier(model_dir)


def test_save_mismatched_label_map(tmp_path):
    with pytest.raises(ValueError, match="has 4 outputs but its label map has 2"):
        save_model_folder(
            tmp_path / "model", weight=np.zeros((4, 6)), bias=np.zeros(4), label_map=LabelMap([1, 2]),
            info={"backbone": "tiny", "feature": "cls"}, metrics={},
        )
    assert not (tmp_path / "model").exists()


def test_log_probs_wrong_width(tmp_path):
    classifier = load_classifier(write_model(tmp_path / "model", feature_dim=6))
    with pytest.raises(ValueError, match=r"expects \(n, 6\) 'cls' features from backbone 'tiny'"):
        classifier.log_probs(np.zeros((2, 5), dtype=np.float32))


def test_load_incomplete_folder(tmp_path):
    model_dir = write_model(tmp_path / "model")
    (model_dir / "_SUCCESS").unlink()
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        load_classifier(model_dir)


def test_save_failure_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        save_model_folder(
            tmp_path / "model", weight=np.zeros((2, 3)), bias=np.zeros(2), label_map=LabelMap([1, 2]),
            info={"backbone": "tiny", "feature": "cls"}, metrics={}, extra_files={"log": tmp_path / "missing"},
        )
    assert list(tmp_path.iterdir()) == []


class _WriteMarker:
    """Pickled payload that creates a file when unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_load_pickle_not_executed(tmp_path):
    model_dir = write_model(tmp_path / "model")
    marker = tmp_path / "code-ran"
    (model_dir / "classifier.safetensors").write_bytes(pickle.dumps({"weight": _WriteMarker(marker)}))

    with pytest.raises(Exception):
        load_classifier(model_dir)
    assert not marker.exists()


def test_load_cls_last4_width_checked(tmp_path):
    # cls_last4 of a 384-wide backbone over 4 blocks has 1,536 values; a 6-wide classifier cannot take it.
    model_dir = write_model(tmp_path / "model", feature_dim=6, feature="cls_last4")
    info = json.loads((model_dir / "model.json").read_text())
    info.update(hidden_size=384, last_blocks=4, feature_dim=None)
    (model_dir / "model.json").write_text(json.dumps(info))

    with pytest.raises(ValueError, match=r"takes 6 features, but 'cls_last4' features of backbone 'tiny' .*last_blocks=4.* have 1536"):
        load_classifier(model_dir)
