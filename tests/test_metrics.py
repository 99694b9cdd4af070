"""SnakeCLEF metrics: known values, hand-computed error kinds, chance level, invalid submissions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from snakeclef.metrics import (
    SubmissionError,
    read_venomous_class_ids,
    score_predictions,
    score_submission,
    track1_score,
    track2_cost,
)

VENOMOUS = {10, 11}


def frame(observation_ids, class_ids) -> pd.DataFrame:
    return pd.DataFrame({"observation_id": observation_ids, "class_id": class_ids})


def test_track1_known_value():
    assert track1_score(53.65, 29.53, 3.06, 7.38, 19.51) == 85.64


def test_track2_known_value():
    assert track2_cost(1860, 193, 112, 296) == 3398


def test_all_correct_scores_best():
    true = np.array([1, 2, 3, 10, 11, 11])
    scores = score_predictions(true, true.copy(), VENOMOUS)

    assert scores["track1"] == 100.0
    assert scores["track2"] == 0
    assert scores["f1"] == 100.0
    assert scores["accuracy"] == 100.0
    assert (scores["p00"], scores["p01"], scores["p10"], scores["p11"]) == (0.0, 0.0, 0.0, 0.0)


# True classes 1, 2 are harmless and 10, 11 venomous; each case has one wrong prediction.
ERROR_KIND_CASES = [
    # name, predicted, expected (e00, e01, e10, e11), expected (p00, p01, p10, p11), track 2
    ("harmless as harmless", [2, 2, 10, 11], (1, 0, 0, 0), (50.0, 0.0, 0.0, 0.0), 1),
    ("harmless as venomous", [10, 2, 10, 11], (0, 1, 0, 0), (0.0, 50.0, 0.0, 0.0), 2),
    ("venomous as harmless", [1, 2, 1, 11], (0, 0, 1, 0), (0.0, 0.0, 50.0, 0.0), 5),
    ("venomous as venomous", [1, 2, 11, 11], (0, 0, 0, 1), (0.0, 0.0, 0.0, 50.0), 2),
    ("venomous as unlisted", [1, 2, 999, 11], (0, 0, 1, 0), (0.0, 0.0, 50.0, 0.0), 5),
]


@pytest.mark.parametrize("name, predicted, counts, rates, cost", ERROR_KIND_CASES, ids=[case[0] for case in ERROR_KIND_CASES])
def test_error_kind_counted(name, predicted, counts, rates, cost):
    scores = score_predictions(np.array([1, 2, 10, 11]), np.array(predicted), VENOMOUS)

    assert (scores["e00"], scores["e01"], scores["e10"], scores["e11"]) == counts
    assert (scores["p00"], scores["p01"], scores["p10"], scores["p11"]) == rates
    assert scores["track2"] == cost
    assert scores["n_harmless"] == 2
    assert scores["n_venomous"] == 2


def test_harmless_error_hand_computed():
    # Per-class F1: class 1 has no correct prediction (0), class 2 has precision 1/2 and
    # recall 1 (2/3), classes 10 and 11 are perfect (1): macro-F1 = (0 + 2/3 + 1 + 1) / 4.
    scores = score_predictions(np.array([1, 2, 10, 11]), np.array([2, 2, 10, 11]), VENOMOUS)

    assert scores["f1"] == 66.67
    assert scores["accuracy"] == 75.0
    # (66.67 + (100 - 50) + 2 * 100 + 5 * 100 + 2 * 100) / 11 = 1016.67 / 11
    assert scores["track1"] == 92.42


def test_venomous_error_hand_computed():
    # Two of three venomous observations predicted harmless: p10 = 66.67.
    true = np.array([1, 10, 10, 10])
    predicted = np.array([1, 10, 1, 1])
    scores = score_predictions(true, predicted, VENOMOUS)

    assert scores["e10"] == 2
    assert scores["p10"] == 66.67
    assert scores["track2"] == 10
    # Class 1: precision 1/3, recall 1 -> 1/2. Class 10: precision 1, recall 1/3 -> 1/2.
    assert scores["f1"] == 50.0
    # (50 + 100 + 2 * 100 + 5 * (100 - 66.67) + 2 * 100) / 11 = 716.65 / 11
    assert scores["track1"] == 65.15


def test_unknown_class_left_out_of_denominators():
    # An unknown (-1) true class is neither harmless nor venomous in the denominators,
    # but a wrong prediction for it still counts as a harmless-true error.
    scores = score_predictions(np.array([-1, 1, 10]), np.array([10, 1, 10]), VENOMOUS)

    assert scores["n_unknown"] == 1
    assert scores["n_harmless"] == 1
    assert scores["n_venomous"] == 1
    assert scores["e01"] == 1
    assert scores["p01"] == 100.0


def test_random_submission_near_chance_level():
    # Uniform random predictions over 100 classes of which 20 are venomous: about 80 % of
    # predictions are harmless, so p00 ~ p10 ~ 80 and p01 ~ p11 ~ 20, and with F1 ~ 0
    # Track 1 ~ (0 + 20 + 2 * 80 + 5 * 20 + 2 * 80) / 11 = 40.
    rng = np.random.default_rng(0)
    class_ids = np.arange(100)
    venomous = set(range(20))
    true = rng.choice(class_ids, size=20_000)
    predicted = rng.choice(class_ids, size=20_000)

    scores = score_predictions(true, predicted, venomous)

    assert 0.15 < scores["n_venomous"] / scores["n_observations"] < 0.25
    assert scores["f1"] < 3
    assert 38 <= scores["track1"] <= 42


def test_submission_ground_truth_reduced():
    ground_truth = frame([5, 5, 5, 6, 7], [1, 1, 1, 10, 2])
    submission = frame([7, 6, 5], [2, 11, 1])

    scores = score_submission(submission, ground_truth, VENOMOUS)

    assert scores["n_observations"] == 3
    assert scores["e11"] == 1
    assert scores["accuracy"] == 66.67


def test_submission_order_ignored():
    ground_truth = frame([1, 2, 3, 4], [1, 2, 10, 11])
    in_order = score_submission(frame([1, 2, 3, 4], [2, 2, 1, 11]), ground_truth, VENOMOUS)
    shuffled = score_submission(frame([4, 3, 1, 2], [11, 1, 2, 2]), ground_truth, VENOMOUS)

    assert in_order == shuffled


def test_submission_missing_ids():
    ground_truth = frame(list(range(30)), [1] * 30)
    submission = frame(list(range(15)), [1] * 15)

    with pytest.raises(SubmissionError, match=r"15 observation\(s\) of the ground truth are missing: 15, 16, .*24, \.\.\. \(5 more\)"):
        score_submission(submission, ground_truth, VENOMOUS)


def test_submission_extra_ids():
    ground_truth = frame([1, 2], [1, 1])
    submission = frame([1, 2, 99], [1, 1, 1])

    with pytest.raises(SubmissionError, match=r"1 observation id\(s\) are not in the ground truth: 99\."):
        score_submission(submission, ground_truth, VENOMOUS)


def test_submission_duplicate_ids():
    ground_truth = frame([1, 2], [1, 1])
    submission = frame([1, 2, 2], [1, 1, 10])

    with pytest.raises(SubmissionError, match=r"appear more than once: 2\. A submission needs exactly one row"):
        score_submission(submission, ground_truth, VENOMOUS)


def test_submission_error_is_value_error():
    with pytest.raises(ValueError, match="missing"):
        score_submission(frame([1], [1]), frame([1, 2], [1, 1]), VENOMOUS)


def test_submission_empty():
    empty = pd.DataFrame({"observation_id": pd.Series([], dtype="int64"), "class_id": pd.Series([], dtype="int64")})

    with pytest.raises(SubmissionError, match=r"Submission has 0 rows for 2 ground-truth observations"):
        score_submission(empty, frame([1, 2], [1, 1]), VENOMOUS)


def test_ground_truth_empty():
    empty = pd.DataFrame({"observation_id": [], "class_id": []})

    with pytest.raises(SubmissionError, match="Ground truth has no rows"):
        score_submission(frame([1], [1]), empty, VENOMOUS)


def test_ground_truth_conflicting_classes():
    with pytest.raises(SubmissionError, match=r"more than one class_id for 1 observation\(s\): 5\."):
        score_submission(frame([5], [1]), frame([5, 5], [1, 2]), VENOMOUS)


def test_submission_missing_column():
    submission = pd.DataFrame({"observation_id": [1], "species": [1]})

    with pytest.raises(SubmissionError, match=r"Submission is missing column\(s\) \['class_id'\]"):
        score_submission(submission, frame([1], [1]), VENOMOUS)


@pytest.mark.parametrize("bad_value", [None, "cobra", 1.5])
def test_submission_invalid_class_id(bad_value):
    submission = frame([1, 2], [1, bad_value])

    with pytest.raises(SubmissionError, match=r"submission `class_id` has 1 value\(s\) that are missing or not integers, at row\(s\) 1"):
        score_submission(submission, frame([1, 2], [1, 1]), VENOMOUS)


def test_venomous_list_mivs_column(tmp_path):
    path = tmp_path / "venomous_status_list.csv"
    path.write_text("class_id,MIVS\n3,1\n4,0\n5,1\n")

    assert read_venomous_class_ids(path) == {3, 5}


def test_venomous_list_venomous_column_with_bom(tmp_path):
    path = tmp_path / "venomous_status.csv"
    path.write_text("\ufeffclass_id,binomial_name,venomous\n3,Naja naja,1\n4,Ptyas mucosa,0\n", encoding="utf-8")

    assert read_venomous_class_ids(path) == {3}


def test_venomous_list_missing_column(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("class_id,toxic\n3,1\n")

    with pytest.raises(ValueError, match=r"expected `class_id` and one of `MIVS` or `venomous`"):
        read_venomous_class_ids(path)


def test_venomous_list_invalid_flag(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("class_id,MIVS\n3,1\n4,yes\n")

    with pytest.raises(ValueError, match=r"values other than 0 or 1 on CSV line\(s\) 3\."):
        read_venomous_class_ids(path)


def test_venomous_list_official(snakeclef_meta):
    venomous = read_venomous_class_ids(snakeclef_meta / "venomous_status_list.csv")
    table = pd.read_csv(snakeclef_meta / "venomous_status_list.csv")

    assert venomous == set(table.loc[table["MIVS"] == 1, "class_id"])
    assert len(venomous) == 285


def test_venomous_list_ph_snakes(ph_snakes):
    venomous = read_venomous_class_ids(ph_snakes / "venomous_status.csv")
    table = pd.read_csv(ph_snakes / "venomous_status.csv")

    assert venomous == set(table.loc[table["venomous"] == 1, "class_id"])
