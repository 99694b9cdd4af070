"""The pipeline under Luigi's central scheduler (``luigid`` on 127.0.0.1) with task history recorded.

Luigi 3.8.1's database task history fails at luigid start-up with SQLAlchemy 2
(its schema upgrade passes plain SQL strings to ``execute``; see
https://github.com/spotify/luigi/issues/3227), so these tests need SQLAlchemy 1.4.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import stop_process_group

LUIGID_STARTUP_TIMEOUT_S = 60
PIPELINE_TIMEOUT_S = 600


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_luigid() -> str:
    """Return the ``luigid`` command installed beside this interpreter, or the one on PATH."""
    beside = Path(sys.executable).parent / "luigid"
    if beside.is_file():
        return str(beside)
    found = shutil.which("luigid")
    if found is None:
        pytest.skip("luigid is not installed")
    return found


@dataclass
class CentralScheduler:
    """A running ``luigid`` and the files it writes."""

    port: int
    history_db: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, method: str, **arguments) -> dict:
        """Call one of the scheduler's JSON API methods (``/api/<method>``) and return its response."""
        query = urllib.parse.urlencode({"data": json.dumps(arguments)})
        with urllib.request.urlopen(f"{self.url}/api/{method}?{query}", timeout=10) as response:
            return json.load(response)["response"]

    def get_page(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:
            return response.read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


def write_scheduler_config(tmp_path: Path, history_db: Path) -> Path:
    """Write the luigid configuration: task history in ``history_db``, scheduler state under ``tmp_path``."""
    config = tmp_path / "luigid.cfg"
    config.write_text(
        "[scheduler]\n"
        "record_task_history = true\n"
        f"state_path = {tmp_path / 'luigid-state.pickle'}\n"
        "\n"
        "[task_history]\n"
        f"db_connection = sqlite:///{history_db}\n"
    )
    return config


def wait_for_scheduler(scheduler: CentralScheduler, process: subprocess.Popen) -> None:
    """Block until luigid responds to API calls. Raise if it exits or does not respond in time."""
    deadline = time.monotonic() + LUIGID_STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"luigid exited with code {process.returncode}\n{scheduler.log()}")
        try:
            scheduler.call("task_list")
            return
        except (OSError, ValueError):
            time.sleep(0.3)
    raise TimeoutError(f"luigid did not respond on port {scheduler.port} within {LUIGID_STARTUP_TIMEOUT_S} s\n{scheduler.log()}")


@pytest.fixture
def central_scheduler(tmp_path):
    """``luigid`` on a free port of 127.0.0.1 that records task history in a SQLite file, stopped at teardown."""
    pytest.importorskip("sqlalchemy", reason="luigid's task history needs SQLAlchemy")
    import sqlalchemy

    if int(sqlalchemy.__version__.split(".")[0]) >= 2:
        pytest.skip(f"luigi's task history fails with SQLAlchemy {sqlalchemy.__version__}; install sqlalchemy<2")

    folder = tmp_path / "luigid"
    folder.mkdir()
    scheduler = CentralScheduler(port=find_free_port(), history_db=folder / "history.db", log_path=folder / "luigid.log")
    env = dict(os.environ, LUIGI_CONFIG_PATH=str(write_scheduler_config(folder, scheduler.history_db)))
    command = [find_luigid(), "--address", "127.0.0.1", "--port", str(scheduler.port)]
    command += ["--state-path", str(folder / "luigid-state.pickle"), "--logdir", str(folder)]

    with open(scheduler.log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=folder, start_new_session=True)
    try:
        wait_for_scheduler(scheduler, process)
        yield scheduler
    finally:
        stop_process_group(process)


# Non-zero exit codes for failures, so the command's status shows whether the run worked.
CLIENT_CONFIG = """\
[retcode]
already_running = 10
missing_data = 20
not_run = 25
task_failed = 30
scheduling_error = 35
unhandled_exception = 40
"""


def run_luigi(scheduler: CentralScheduler, task: str, params: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``luigi --module snakeclef.workflow TASK`` as a command against the central scheduler."""
    config = tmp_path / "client.cfg"
    config.write_text(CLIENT_CONFIG)
    command = [sys.executable, "-m", "luigi", "--module", "snakeclef.workflow", task]
    command += ["--scheduler-host", "127.0.0.1", "--scheduler-port", str(scheduler.port), "--no-lock"]
    for name, value in params.items():
        command += [f"--{name.replace('_', '-')}", value]
    env = dict(os.environ, LUIGI_CONFIG_PATH=str(config))
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=PIPELINE_TIMEOUT_S)


def read_history(history_db: Path) -> dict[str, list[str]]:
    """Return each recorded task's events in time order, keyed by task family, from the SQLite history."""
    with sqlite3.connect(history_db) as connection:
        rows = connection.execute(
            "SELECT tasks.name, task_events.event_name FROM tasks JOIN task_events ON task_events.task_id = tasks.id "
            "ORDER BY task_events.ts, task_events.id"
        ).fetchall()
    events: dict[str, list[str]] = {}
    for name, event in rows:
        events.setdefault(name, []).append(event)
    return events


PIPELINE_TASKS = {"Ingest", "Embed", "Umap", "Train", "EvalSet", "Predict", "Evaluate", "Pipeline"}


@pytest.mark.slow
@pytest.mark.timeout(PIPELINE_TIMEOUT_S + 60)
def test_pipeline_under_luigid(central_scheduler, synthetic_dataset, tiny_backbone, tmp_path):
    root = tmp_path / "run"
    venomous_list = tmp_path / "venomous_status.csv"
    venomous_list.write_text("class_id,venomous\n100,0\n107,1\n114,0\n")
    params = {
        "dataset": str(synthetic_dataset),
        "backbone": str(tiny_backbone),
        "output_root": str(root),
        "venomous_list": str(venomous_list),
        "partitions": "2",
        "batch_size": "4",
        "max_epochs": "5",
    }
    result = run_luigi(central_scheduler, "Pipeline", params, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert (root / "metrics.json").is_file()
    assert (root / "submission.csv").is_file()

    # The scheduler's live state: every task of the chain is DONE and none failed.
    done = central_scheduler.call("task_list", status="DONE")
    assert {task["name"] for task in done.values()} == PIPELINE_TASKS
    assert central_scheduler.call("task_list", status="FAILED") == {}
    assert central_scheduler.call("task_list", status="PENDING") == {}

    # The recorded history: each task was scheduled, ran and finished, once.
    history = read_history(central_scheduler.history_db)
    assert set(history) == PIPELINE_TASKS
    for name, events in history.items():
        assert events == ["PENDING", "RUNNING", "DONE"], name
    page = central_scheduler.get_page("/history")
    for name in PIPELINE_TASKS:
        assert f">{name}</a>" in page, name

    # A second run finds every output complete and runs nothing.
    again = run_luigi(central_scheduler, "Pipeline", params, tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-6000:]
    assert "ran successfully" not in again.stderr
    assert "complete ones were encountered" in again.stderr
    assert all(events.count("RUNNING") == 1 for events in read_history(central_scheduler.history_db).values())
