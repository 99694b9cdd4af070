"""Aggregation, venom-aware decision, metadata reading and submission writing of the offline predictor."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from snakeclef.predict import (
    aggregate_observation,
    decide,
    decide_observations,
    expected_costs,
    make_cost_matrix,
    mode_first_tiebreak,
    normalise_prior,
    read_prediction_metadata,
    read_venomous_flags,
    write_submission,
)


def one_hot_log_probs(indices: list[int], n_classes: int = 3) -> np.ndarray:
    probs = np.full((len(indices), n_classes), 0.1 / (n_classes - 1))
    probs[np.arange(len(indices)), indices] = 0.9
    return np.log(probs)


@pytest.mark.parametrize(
    ("predictions", "expected"),
    [
        (["A", "B", "B", "A"], "A"),
        (["A", "B", "B"], "B"),
        (["B", "A", "A", "B"], "B"),
        (["C"], "C"),
        (["A", "B", "C"], "A"),
        (["C", "A", "B", "B", "A"], "A"),
    ],
)
def test_mode_first_image_breaks_tie(predictions, expected):
    index = {"A": 0, "B": 1, "C": 2}
    assert mode_first_tiebreak([index[p] for p in predictions]) == index[expected]


def test_mode_aggregate_on_log_probs():
    # Images predict [A, B, B, A]: a 2-2 tie that the first image's class (A = index 0) wins.
    assert aggregate_observation(one_hot_log_probs([0, 1, 1, 0]), aggregate="mode") == 0
    assert aggregate_observation(one_hot_log_probs([0, 1, 1]), aggregate="mode") == 1


def test_mode_empty_rejected():
    with pytest.raises(ValueError, match="empty list of predictions"):
        mode_first_tiebreak([])


def test_mean_aggregate_differs_from_mode():
    # Two images weakly say class 0, one image strongly says class 1: mode -> 0, mean -> 1.
    probs = np.array([[0.4, 0.35, 0.25], [0.4, 0.35, 0.25], [0.0, 1.0, 0.0]])
    log_probs = np.log(np.clip(probs, 1e-12, None))
    assert aggregate_observation(log_probs, aggregate="mode") == 0
    # Mean probabilities: class 0 = 0.8 / 3 = 0.267, class 1 = 1.7 / 3 = 0.567.
    assert aggregate_observation(log_probs, aggregate="mean") == 1


def test_cost_matrix_values():
    cost = make_cost_matrix([False, False, True, True])
    expected = np.array([
        [0, 1, 2, 2],
        [1, 0, 2, 2],
        [5, 5, 0, 2],
        [5, 5, 2, 0],
    ], dtype=float)
    np.testing.assert_array_equal(cost, expected)


def test_expected_costs_match_cost_matrix():
    rng = np.random.default_rng(0)
    venomous = rng.random(50) < 0.3
    probs = rng.dirichlet(np.ones(50), size=20)
    np.testing.assert_allclose(expected_costs(probs, venomous), probs @ make_cost_matrix(venomous), atol=1e-12)


def test_min_cost_picks_venomous():
    # Class 0 harmless with p = 0.55, class 1 venomous with p = 0.45.
    # Predicting 0 costs 0.45 * 5 = 2.25 (venomous taken for harmless); predicting 1 costs 0.55 * 2 = 1.10.
    probs = np.array([[0.55, 0.45]])
    assert decide(probs, decision="argmax")[0] == 0
    assert decide(probs, decision="min-cost", venomous=[False, True])[0] == 1


def test_min_cost_keeps_confident_harmless():
    # Class 0 harmless with p = 0.8: predicting 0 costs 0.2 * 5 = 1.0, predicting 1 costs 0.8 * 2 = 1.6.
    probs = np.array([[0.8, 0.2]])
    assert decide(probs, decision="min-cost", venomous=[False, True])[0] == 0


def test_min_cost_without_costs_rejected():
    with pytest.raises(ValueError, match="needs the venomous flags"):
        decide(np.array([[0.5, 0.5]]), decision="min-cost")


def test_min_cost_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="2 venomous flags do not match 3 classes"):
        decide(np.full((1, 3), 1 / 3), decision="min-cost", venomous=[False, True])


def test_invalid_options_rejected():
    with pytest.raises(ValueError, match=r"Invalid aggregate='median': expected one of 'mode', 'mean'"):
        aggregate_observation(one_hot_log_probs([0]), aggregate="median")
    with pytest.raises(ValueError, match=r"Invalid decision='cheapest'"):
        decide(np.array([[1.0]]), decision="cheapest")


def test_observations_one_row_each():
    # Label map [7, 1500, 42]: output index 0 -> class_id 7, 1 -> 1500, 2 -> 42.
    class_ids = [7, 1500, 42]
    observation_ids = [30, 30, 10, 20, 20, 30]
    predicted = [1, 2, 2, 0, 0, 2]
    failed = [False, False, False, True, True, False]
    log_probs = one_hot_log_probs(predicted)
    log_probs[np.array(failed)] = np.nan
    prior = np.array([0.2, 0.5, 0.3])

    submission = decide_observations(observation_ids, log_probs, failed, class_ids=class_ids, class_prior=prior)

    assert submission["observation_id"].tolist() == [30, 10, 20]
    # 30: [1500, 42, 42] -> 42; 10: 42; 20: every image failed -> prior argmax = index 1 -> 1500.
    assert submission["class_id"].tolist() == [42, 42, 1500]
    assert str(submission["class_id"].dtype) == "int64"


def test_all_failed_uses_min_cost_prior():
    # Prior 0.6 harmless / 0.4 venomous: argmax picks harmless, min-cost picks venomous (0.6*2 < 0.4*5).
    class_ids = [7, 1500]
    log_probs = np.full((1, 2), np.nan)
    prior = np.array([0.6, 0.4])
    argmax_rows = decide_observations([5], log_probs, [True], class_ids=class_ids, class_prior=prior)
    min_cost_rows = decide_observations(
        [5], log_probs, [True], class_ids=class_ids, class_prior=prior, decision="min-cost", venomous=[False, True]
    )
    assert argmax_rows["class_id"].tolist() == [7]
    assert min_cost_rows["class_id"].tolist() == [1500]


def test_prior_from_counts():
    np.testing.assert_allclose(normalise_prior([1, 3, 0], 3), [0.25, 0.75, 0.0])
    np.testing.assert_allclose(normalise_prior(None, 4), [0.25] * 4)
    with pytest.raises(ValueError, match="expected 3 non-negative counts"):
        normalise_prior([1, 2], 3)


@pytest.mark.parametrize("column", ["MIVS", "venomous"])
def test_venomous_list_columns(tmp_path, column):
    path = tmp_path / "venomous.csv"
    path.write_text(f"class_id,{column}\n42,1\n7,0\n1500,1\n99,0\n")
    flags = read_venomous_flags(path, [7, 1500, 42])
    assert flags.tolist() == [False, True, True]


def test_venomous_list_missing_class(tmp_path):
    path = tmp_path / "venomous.csv"
    path.write_text("class_id,MIVS\n7,0\n")
    with pytest.raises(ValueError, match=r"no entry for 2 class_id\(s\) of the model, e.g. \[1500, 42\]"):
        read_venomous_flags(path, [7, 1500, 42])


def test_venomous_list_bad_columns(tmp_path):
    path = tmp_path / "venomous.csv"
    path.write_text("class_id,poisonous\n7,0\n")
    with pytest.raises(ValueError, match="either 'MIVS' or 'venomous'"):
        read_venomous_flags(path, [7])


def test_metadata_keeps_order_and_bom(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text("\ufeffobservation_id,image_path,code\n9,b.jpg,PH\n3,a.JPG,PH\n9,c.jpg,\n", encoding="utf-8")
    metadata = read_prediction_metadata(path)
    assert metadata["observation_id"].tolist() == [9, 3, 9]
    assert metadata["image_path"].tolist() == ["b.jpg", "a.JPG", "c.jpg"]


def test_metadata_without_ids_numbers_rows(tmp_path):
    path = tmp_path / "index.csv"
    path.write_text("image_path,split\na.jpg,train\nb.jpg,val\nc.jpg,val\n")
    metadata = read_prediction_metadata(path, split="val")
    assert metadata["observation_id"].tolist() == [1, 2]
    assert metadata["image_path"].tolist() == ["b.jpg", "c.jpg"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("observation_id,path\n1,a.jpg\n", "has no 'image_path' column"),
        ("observation_id,image_path\n1,a.jpg\nx7,b.jpg\n", r"non-integer observation_id in 1 row\(s\), first at data row 2: 'x7'"),
    ],
)
def test_metadata_invalid_rejected(tmp_path, text, message):
    path = tmp_path / "meta.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_prediction_metadata(path)


def test_submission_written_whole(tmp_path):
    output = tmp_path / "out" / "submission.csv"
    write_submission(pd.DataFrame({"observation_id": [3, 1], "class_id": [42, 7]}), output)
    assert output.read_text() == "observation_id,class_id\n3,42\n1,7\n"
    assert sorted(p.name for p in output.parent.iterdir()) == ["submission.csv"]


def test_submission_failure_keeps_old_file(tmp_path, monkeypatch):
    output = tmp_path / "submission.csv"
    output.write_text("observation_id,class_id\n1,7\n")

    def fail_midway(self, path, **kwargs):
        with open(path, "w") as handle:
            handle.write("observation_id,class_id\n3,")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        write_submission(pd.DataFrame({"observation_id": [3], "class_id": [42]}), output)
    assert output.read_text() == "observation_id,class_id\n1,7\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]
