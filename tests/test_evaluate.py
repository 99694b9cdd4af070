"""Evaluation report and command line: files written, their contents, invalid submissions."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from snakeclef.evaluate import main, top_species_confusion, write_evaluation
from snakeclef.metrics import SubmissionError

# Observations 1-6; classes 10 and 11 are venomous.
GROUND_TRUTH = pd.DataFrame(
    {
        "observation_id": [1, 1, 2, 3, 4, 5, 6],
        "class_id": [1, 1, 1, 2, 10, 10, 11],
        "binomial_name": ["Ptyas mucosa", "Ptyas mucosa", "Ptyas mucosa", "Boiga dendrophila", "Naja naja", "Naja naja", "Daboia russelii"],
    }
)
# One error of each kind except e00: 2 -> 10 (e01), 5 -> 1 (e10), 6 -> 10 (e11).
SUBMISSION = pd.DataFrame({"observation_id": [6, 5, 4, 3, 2, 1], "class_id": [10, 1, 10, 10, 1, 1]})
VENOMOUS_LIST = "class_id,MIVS\n1,0\n2,0\n10,1\n11,1\n"


@pytest.fixture
def inputs(tmp_path):
    GROUND_TRUTH.to_csv(tmp_path / "ground_truth.csv", index=False)
    SUBMISSION.to_csv(tmp_path / "submission.csv", index=False)
    (tmp_path / "venomous.csv").write_text(VENOMOUS_LIST)
    return tmp_path / "submission.csv", tmp_path / "ground_truth.csv", tmp_path / "venomous.csv"


def test_report_files_written(inputs, tmp_path):
    output_dir = tmp_path / "report"
    report = write_evaluation(*inputs, output_dir=output_dir)

    assert sorted(path.name for path in output_dir.iterdir()) == ["metrics.json", "per_species.csv", "plots", "venom_confusion.csv"]
    assert json.loads((output_dir / "metrics.json").read_text()) == report
    with Image.open(output_dir / "plots" / "confusion_matrix.png") as image:
        assert image.format == "PNG"
        assert min(image.size) > 300


def test_report_metrics_values(inputs, tmp_path):
    report = write_evaluation(*inputs, output_dir=tmp_path / "report")

    assert report["n_observations"] == 6
    assert (report["n_harmless"], report["n_venomous"]) == (3, 3)
    assert (report["e00"], report["e01"], report["e10"], report["e11"]) == (0, 1, 1, 1)
    assert report["track2"] == 2 + 5 + 2
    assert report["accuracy"] == 50.0
    for key in ("f1", "track1", "p00", "p01", "p10", "p11", "confusion_matrix_plot"):
        assert key in report
    assert report["confusion_matrix_plot"] == "plots/confusion_matrix.png"


def test_report_per_species(inputs, tmp_path):
    write_evaluation(*inputs, output_dir=tmp_path / "report")
    per_species = pd.read_csv(tmp_path / "report" / "per_species.csv")

    assert list(per_species.columns) == ["class_id", "binomial_name", "venomous", "support", "predicted", "precision", "recall", "f1"]
    # Sorted by support: class 1 (2 observations), class 10 (2), then 2 and 11 (1 each).
    assert per_species["class_id"].tolist() == [1, 10, 2, 11]
    naja = per_species.set_index("class_id").loc[10]
    assert naja["binomial_name"] == "Naja naja"
    assert bool(naja["venomous"])
    assert naja["support"] == 2
    assert naja["predicted"] == 3
    assert naja["precision"] == pytest.approx(1 / 3, abs=1e-4)
    assert naja["recall"] == 0.5


def test_report_venom_confusion(inputs, tmp_path):
    report = write_evaluation(*inputs, output_dir=tmp_path / "report")
    table = pd.read_csv(tmp_path / "report" / "venom_confusion.csv", index_col="true_status")

    assert report["venom_confusion"] == {
        "true_harmless": {"predicted_harmless": 2, "predicted_venomous": 1},
        "true_venomous": {"predicted_harmless": 1, "predicted_venomous": 2},
    }
    assert table.loc["true_harmless", "predicted_venomous"] == 1
    assert table.loc["true_venomous", "predicted_harmless"] == 1


def test_report_plots_dir_option(inputs, tmp_path):
    write_evaluation(*inputs, output_dir=tmp_path / "report", plots_dir=tmp_path / "figures")

    assert (tmp_path / "figures" / "confusion_matrix.png").is_file()
    assert not (tmp_path / "report" / "plots").exists()


def test_report_without_species_names(tmp_path):
    GROUND_TRUTH[["observation_id", "class_id"]].to_csv(tmp_path / "gt.csv", index=False)
    SUBMISSION.to_csv(tmp_path / "sub.csv", index=False)
    (tmp_path / "venomous.csv").write_text(VENOMOUS_LIST)

    write_evaluation(tmp_path / "sub.csv", tmp_path / "gt.csv", tmp_path / "venomous.csv", output_dir=tmp_path / "report")

    assert "binomial_name" not in pd.read_csv(tmp_path / "report" / "per_species.csv").columns


def test_report_invalid_submission_writes_nothing(inputs, tmp_path):
    submission, ground_truth, venomous = inputs
    SUBMISSION.iloc[:4].to_csv(submission, index=False)

    with pytest.raises(SubmissionError, match=r"2 observation\(s\) of the ground truth are missing: 1, 2\."):
        write_evaluation(submission, ground_truth, venomous, output_dir=tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_report_empty_submission_file(inputs, tmp_path):
    submission, ground_truth, venomous = inputs
    submission.write_text("")

    with pytest.raises(SubmissionError, match=r"Submission file .* is empty"):
        write_evaluation(submission, ground_truth, venomous, output_dir=tmp_path / "report")


def test_report_submission_with_bom(inputs, tmp_path):
    submission, ground_truth, venomous = inputs
    submission.write_text("\ufeff" + SUBMISSION.to_csv(index=False), encoding="utf-8")

    report = write_evaluation(submission, ground_truth, venomous, output_dir=tmp_path / "report")

    assert report["n_observations"] == 6


def test_report_missing_file(inputs, tmp_path):
    _, ground_truth, venomous = inputs

    with pytest.raises(FileNotFoundError, match=r"Submission file not found: .*nowhere\.csv"):
        write_evaluation(tmp_path / "nowhere.csv", ground_truth, venomous, output_dir=tmp_path / "report")


def test_top_species_confusion_other_column():
    true = np.array([3, 3, 3, 5, 5, 7])
    predicted = np.array([3, 5, 7, 5, 9, 7])

    top, counts = top_species_confusion(true, predicted, top_species=2)

    assert top.tolist() == [3, 5]
    # Rows 3 and 5; columns 3, 5, other (7 and 9 are outside the top two).
    assert counts.tolist() == [[1, 1, 1], [0, 1, 1]]


def test_cli_prints_metrics(inputs, tmp_path, capsys):
    submission, ground_truth, venomous = inputs
    output = tmp_path / "out" / "metrics.json"

    main(["--submission", str(submission), "--ground-truth", str(ground_truth), "--venomous-list", str(venomous), "--output", str(output)])

    printed = json.loads(capsys.readouterr().out)
    assert printed["track2"] == 9
    assert json.loads(output.read_text()) == printed


def test_cli_rejects_duplicate_ids(inputs, capsys):
    submission, ground_truth, venomous = inputs
    pd.concat([SUBMISSION, SUBMISSION.iloc[:1]]).to_csv(submission, index=False)

    with pytest.raises(SystemExit) as exit_info:
        main(["--submission", str(submission), "--ground-truth", str(ground_truth), "--venomous-list", str(venomous)])

    assert exit_info.value.code == 2
    assert "observation id(s) appear more than once: 6" in capsys.readouterr().err


def test_cli_module_on_real_val_split(ph_snakes, tmp_path):
    # Every image of this dataset is its own observation: observation_id is the index row.
    index = pd.read_csv(ph_snakes / "index.csv")
    val = index[index["split"] == "val"].rename_axis("observation_id").reset_index()
    val.to_csv(tmp_path / "ground_truth.csv", index=False)
    predicted = val["class_id"].to_numpy().copy()
    predicted[::3] = predicted[::-1][::3]
    pd.DataFrame({"observation_id": val["observation_id"], "class_id": predicted}).to_csv(tmp_path / "submission.csv", index=False)

    command = [
        sys.executable, "-m", "snakeclef.evaluate",
        "--submission", str(tmp_path / "submission.csv"),
        "--ground-truth", str(tmp_path / "ground_truth.csv"),
        "--venomous-list", str(ph_snakes / "venomous_status.csv"),
        "--output-dir", str(tmp_path / "report"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["n_observations"] == len(val)
    assert 0 < metrics["track1"] < 100
    assert metrics["n_correct"] >= len(val) * 2 // 3
    assert (tmp_path / "report" / "plots" / "confusion_matrix.png").is_file()
    assert len(pd.read_csv(tmp_path / "report" / "per_species.csv")) == val["class_id"].nunique()
