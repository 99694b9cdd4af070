"""SIGKILL the EvalSet, Umap, Predict and Evaluate tasks inside ``run()``, then check that a rerun matches an uninterrupted run.

Each test runs one task as a user does (``python -m luigi --module
snakeclef.workflow TASK --local-scheduler``) in its own process group, waits
until the task has written part of its output, and kills the whole group.
The upstream outputs are prepared once per module without Spark: Ingest and
Train run in-process, and the embeddings are computed with the same
``FeatureExtractor`` that the Spark stage runs on its workers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import luigi
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT, write_synthetic_dataset
from snakeclef import workflow
from snakeclef.storage import atomic_path

TASK_TIMEOUT_S = 180
POLL_S = 0.002
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Enough classes and images that the predictor, the confusion-matrix plot and
# the second UMAP group each run for 0.2 to 0.5 s on a 2-core CPU, which
# leaves the test time to kill them part-way.
CHAIN_CLASSES = 10
CHAIN_IMAGES_PER_CLASS = 27
DCT_K = 4
# write_synthetic_dataset puts every third image of a class in the "val" split.
CHAIN_HELD_OUT = CHAIN_CLASSES * CHAIN_IMAGES_PER_CLASS // 3
PLOTTED_SPECIES = ",".join(f"Genus species{index}" for index in range(CHAIN_CLASSES))
# About 3000 held-out images, so writing the eval set takes long enough to kill part-way.
EVALSET_IMAGES_PER_CLASS = 3000

UMAP_FILES = {"umap_top5.png", "umap_species.png", "separation.json"}
EVALUATE_TABLES = ("per_species.csv", "venom_confusion.csv")


def task_params(task_class: type[luigi.Task], params: dict) -> dict:
    """Keep the parameters that ``task_class`` accepts, so one dict serves every task of the chain."""
    names = {name for name, _ in task_class.get_params()}
    return {name: value for name, value in params.items() if name in names}


def task_env() -> dict:
    threads = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    return {**os.environ, **threads, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def start_task(task_class: type[luigi.Task], params: dict, log_path: Path) -> subprocess.Popen:
    """Start ``luigi --module snakeclef.workflow TASK`` in a new process group, logging to ``log_path``."""
    command = [sys.executable, "-m", "luigi", "--module", "snakeclef.workflow", task_class.__name__, "--local-scheduler"]
    for name, value in task_params(task_class, params).items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    with open(log_path, "w") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=task_env(), cwd=log_path.parent, start_new_session=True
        )


def log_tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:]


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], log_path: Path) -> None:
    """SIGKILL the process group as soon as ``ready()`` is true, and fail if the task ends first."""
    deadline = time.monotonic() + TASK_TIMEOUT_S
    try:
        while not ready():
            assert process.poll() is None, f"the task ended before it could be killed part-way:\n{log_tail(log_path)}"
            assert time.monotonic() < deadline, f"the task did not reach the kill point in {TASK_TIMEOUT_S} s"
            time.sleep(POLL_S)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    # -SIGKILL, not 0: the task was still running when the signal arrived.
    assert process.returncode == -signal.SIGKILL, f"exit status {process.returncode}:\n{log_tail(log_path)}"


def rerun_task(task_class: type[luigi.Task], params: dict, log_path: Path) -> None:
    """Run the task again to completion in a fresh process and check that it succeeded."""
    process = start_task(task_class, params, log_path)
    try:
        process.wait(timeout=TASK_TIMEOUT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    assert process.returncode == 0, log_tail(log_path)
    assert task_class(**task_params(task_class, params)).complete(), log_tail(log_path)


def run_in_process(*tasks: luigi.Task) -> None:
    result = luigi.build(list(tasks), local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert result.status == luigi.execution_summary.LuigiStatusCode.SUCCESS, result.summary_text


def temporaries(folder: Path) -> list[str]:
    """List the hidden temporary files and folders under ``folder`` that a killed ``storage.atomic_path`` leaves."""
    return sorted(path.name for path in folder.rglob(".*.tmp-*"))


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def without_timings(value, root: Path):
    """Drop the wall-clock keys of a report and replace the output root in paths, so two runs compare equal."""
    if isinstance(value, dict):
        return {key: without_timings(item, root) for key, item in value.items() if not key.endswith("seconds")}
    if isinstance(value, list):
        return [without_timings(item, root) for item in value]
    if isinstance(value, str):
        return value.replace(str(root), "<output-root>")
    return value


def write_embeddings(images: Path, output: Path, backbone: Path) -> None:
    """Write ``embeddings/`` in the Embed stage's layout, with the extractor that stage runs on Spark workers."""
    from snakeclef.features import FeatureExtractor

    records = pq.read_table(images)
    extractor = FeatureExtractor(backbone, device="cpu", precision="fp32", dct_k=DCT_K)
    batch = extractor.embed(records.column("data").to_pylist())
    assert not any(batch.errors)

    vectors = pa.list_(pa.float32())
    table = records.drop_columns(["data"])
    table = table.append_column("cls", pa.array([row.tolist() for row in batch.cls], vectors))
    table = table.append_column("cls_last4", pa.array([row.tolist() for row in batch.cls_last4], vectors))
    table = table.append_column("dct", pa.array([row.tolist() for row in batch.dct], vectors))
    table = table.append_column("error", pa.array(batch.errors, pa.string()))
    output.mkdir(parents=True)
    pq.write_table(table, output / "part-00000.parquet")
    report = {
        "backbone": str(backbone), "hidden_size": extractor.hidden_size, "last_blocks": extractor.backbone.last_blocks,
        "dct_k": DCT_K, "precision": "fp32", "rows": len(table),
    }
    (output / "_embed_report.json").write_text(json.dumps(report))
    (output / "_SUCCESS").write_text("")


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_backbone):
    """Prepare the upstream outputs (images, embeddings, model) in ``base``, and run every later task uninterrupted in ``reference``."""
    folder = tmp_path_factory.mktemp("chain")
    dataset = write_synthetic_dataset(folder / "dataset", n_classes=CHAIN_CLASSES, per_class=CHAIN_IMAGES_PER_CLASS, size=32)
    base = folder / "base"
    params = dict(
        dataset=str(dataset), backbone=str(tiny_backbone), output_root=str(base), partitions=2, batch_size=8,
        dct_k=DCT_K, learning_rate=0.05, max_epochs=5, species=PLOTTED_SPECIES,
    )
    run_in_process(workflow.Ingest(**task_params(workflow.Ingest, params)))
    write_embeddings(base / "images", base / "embeddings", tiny_backbone)
    run_in_process(workflow.Train(**task_params(workflow.Train, params)))

    reference = folder / "reference"
    shutil.copytree(base, reference)
    reference_params = {**params, "output_root": str(reference)}
    run_in_process(*(task_class(**task_params(task_class, reference_params)) for task_class in (workflow.Evaluate, workflow.Umap)))
    return {"params": params, "base": base, "reference": reference}


def prepare_root(chain: dict, root: Path, *copied: str) -> dict:
    """Copy the upstream outputs, plus ``copied`` outputs of the uninterrupted run, into a fresh output root."""
    shutil.copytree(chain["base"], root)
    for name in copied:
        source = chain["reference"] / name
        if source.is_dir():
            shutil.copytree(source, root / name)
        else:
            shutil.copy2(source, root / name)
    return {**chain["params"], "output_root": str(root)}


@pytest.mark.slow
def test_evalset_killed_then_rerun(tmp_path, tiny_backbone):
    dataset = write_synthetic_dataset(tmp_path / "dataset", per_class=EVALSET_IMAGES_PER_CLASS, size=16)
    root = tmp_path / "run"
    params = dict(dataset=str(dataset), backbone=str(tiny_backbone), output_root=str(root), partitions=2)
    run_in_process(workflow.Ingest(**task_params(workflow.Ingest, params)))
    reference = tmp_path / "reference"
    shutil.copytree(root, reference)
    run_in_process(workflow.EvalSet(**task_params(workflow.EvalSet, {**params, "output_root": str(reference)})))
    expected = file_bytes(reference / "eval")
    n_images = sum(name.startswith("images/") for name in expected)

    # Rows are written in record order, class 0 first: once class 1's folder
    # exists, class 0's images are all written and two classes are still to come.
    def second_class_started() -> bool:
        return any(work.joinpath("images", "val", "Snake 1 (Genus species1)").is_dir() for work in root.glob(".eval.tmp-*"))

    log_path = tmp_path / "killed.log"
    kill_when(start_task(workflow.EvalSet, params, log_path), second_class_started, log_path)

    assert not (root / "eval").exists()
    assert not workflow.EvalSet(**task_params(workflow.EvalSet, params)).complete()
    (work,) = root.glob(".eval.tmp-*")
    assert not (work / "_SUCCESS").exists()
    assert 0 < len(list((work / "images").rglob("*.jpg"))) < n_images

    rerun_task(workflow.EvalSet, params, tmp_path / "rerun.log")

    resumed = file_bytes(root / "eval")
    assert sorted(resumed) == sorted(expected)
    for name in ("metadata.csv", "ground_truth.csv", "venomous_status.csv", "_SUCCESS"):
        assert resumed[name] == expected[name], name
    assert resumed == expected
    metadata = pd.read_csv(root / "eval" / "metadata.csv")
    assert len(metadata) == n_images
    assert metadata["image_path"].is_unique
    assert temporaries(root) == []


@pytest.mark.slow
def test_umap_killed_then_rerun(chain, tmp_path):
    root = tmp_path / "run"
    params = prepare_root(chain, root)
    plots = root / "plots"

    # The top-5 plot is written first. A kill before separation.json leaves a plots folder without its marker.
    def first_plot_written() -> bool:
        return (plots / "umap_top5.png").is_file()

    log_path = tmp_path / "killed.log"
    kill_when(start_task(workflow.Umap, params, log_path), first_plot_written, log_path)

    assert not (plots / "separation.json").exists()
    assert not workflow.Umap(**task_params(workflow.Umap, params)).complete()

    rerun_task(workflow.Umap, params, tmp_path / "rerun.log")

    assert {path.name for path in plots.iterdir()} == UMAP_FILES
    for name in ("umap_top5.png", "umap_species.png"):
        assert (plots / name).read_bytes().startswith(PNG_SIGNATURE), name
    resumed = without_timings(json.loads((plots / "separation.json").read_text()), root)
    expected = without_timings(json.loads((chain["reference"] / "plots" / "separation.json").read_text()), chain["reference"])
    assert resumed == expected
    assert temporaries(root) == []


@pytest.mark.slow
def test_predict_killed_then_rerun(chain, tmp_path):
    root = tmp_path / "run"
    params = prepare_root(chain, root, "eval")
    log_path = tmp_path / "killed.log"

    # The log line comes after the model and the backbone are loaded, right before the forward passes.
    def predicting() -> bool:
        return "Predicting " in log_path.read_text(errors="replace")

    kill_when(start_task(workflow.Predict, params, log_path), predicting, log_path)

    assert "Prediction summary" not in log_path.read_text()
    assert not (root / "submission.csv").exists()
    assert not workflow.Predict(**task_params(workflow.Predict, params)).complete()

    rerun_task(workflow.Predict, params, tmp_path / "rerun.log")

    assert (root / "submission.csv").read_bytes() == (chain["reference"] / "submission.csv").read_bytes()
    submission = pd.read_csv(root / "submission.csv")
    assert len(submission) == CHAIN_HELD_OUT
    assert submission["observation_id"].is_unique
    assert temporaries(root) == []


@pytest.mark.slow
def test_evaluate_killed_then_rerun(chain, tmp_path):
    root = tmp_path / "run"
    params = prepare_root(chain, root, "eval", "submission.csv")

    # The two tables come first, then the confusion-matrix plot, and metrics.json, the task's marker, last.
    def tables_written() -> bool:
        return (root / "venom_confusion.csv").is_file()

    log_path = tmp_path / "killed.log"
    kill_when(start_task(workflow.Evaluate, params, log_path), tables_written, log_path)

    assert (root / "per_species.csv").is_file()
    assert not (root / "metrics.json").exists()
    assert not workflow.Evaluate(**task_params(workflow.Evaluate, params)).complete()

    rerun_task(workflow.Evaluate, params, tmp_path / "rerun.log")

    reference = chain["reference"]
    resumed = without_timings(json.loads((root / "metrics.json").read_text()), root)
    expected = without_timings(json.loads((reference / "metrics.json").read_text()), reference)
    assert resumed == expected
    for name in EVALUATE_TABLES:
        assert (root / name).read_bytes() == (reference / name).read_bytes(), name
    assert (root / "plots" / "confusion_matrix.png").read_bytes().startswith(PNG_SIGNATURE)
    assert temporaries(root) == []


KILLED_WRITE = """
import os, signal, sys
from snakeclef.storage import atomic_path

with atomic_path(sys.argv[1]) as tmp:
    if sys.argv[2] == "folder":
        tmp.mkdir()
        tmp = tmp / "part-00000.csv"
    tmp.write_text("partial")
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_atomic_path_rewrite_after_kill(tmp_path, kind):
    target = tmp_path / "out" / "report.csv"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target), kind], env=task_env(), timeout=60)

    assert killed.returncode == -signal.SIGKILL
    assert not target.exists()
    assert len(temporaries(target.parent)) == 1

    with atomic_path(target) as tmp:
        tmp.write_text("complete")

    assert target.read_text() == "complete"
    assert temporaries(target.parent) == []
