"""Embedding on a real Spark standalone cluster gives the same rows as local mode.

The fixture starts one master and one worker on 127.0.0.1 from the installed
pyspark. pyspark allows one SparkContext per process and the suite's ``spark``
fixture is a local one, so the cluster-mode run happens in a child process:
this file run as a script (see ``main``) with ``SNAKECLEF_SPARK_MASTER`` set.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SPARK_STARTUP_TIMEOUT_S = 90
JOB_TIMEOUT_S = 240


def find_spark_class() -> Path:
    """Return ``bin/spark-class`` of the installed pyspark."""
    import pyspark

    return Path(pyspark.__file__).resolve().parent / "bin" / "spark-class"


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class StandaloneCluster:
    """A running Spark standalone master with its workers, all on 127.0.0.1."""

    master_url: str
    web_url: str
    work_dir: Path
    log_dir: Path

    def status(self) -> dict:
        """Return the master's JSON status page (workers, active and completed applications)."""
        with urllib.request.urlopen(f"{self.web_url}/json/", timeout=5) as response:
            return json.load(response)

    def logs(self) -> str:
        """Return the last lines of every daemon log, for failure messages."""
        tails = []
        for path in sorted(self.log_dir.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()
            tails.append(f"--- {path.name}\n" + "\n".join(lines[-30:]))
        return "\n".join(tails)


def start_daemon(spark_class: Path, args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start one Spark daemon in its own process group, output to ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [str(spark_class), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def stop_daemon(process: subprocess.Popen) -> None:
    """Stop a daemon started by ``start_daemon``: SIGTERM to its process group, SIGKILL after 20 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)


def wait_for_workers(cluster: StandaloneCluster, daemons: list[subprocess.Popen], count: int) -> None:
    """Block until ``count`` workers are ALIVE at the master; raise if a daemon exits or time runs out."""
    deadline = time.monotonic() + SPARK_STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        for daemon in daemons:
            if daemon.poll() is not None:
                raise RuntimeError(f"Spark daemon {daemon.args[1]} exited with code {daemon.returncode}\n{cluster.logs()}")
        try:
            if cluster.status().get("aliveworkers", 0) >= count:
                return
        except OSError:
            pass  # The master's web UI is not up yet.
        time.sleep(0.5)
    raise TimeoutError(f"{count} Spark worker(s) did not register within {SPARK_STARTUP_TIMEOUT_S} s\n{cluster.logs()}")


def daemon_environment(tmp_path: Path) -> dict[str, str]:
    """Return the environment for the daemons: loopback only, logs and scratch space under ``tmp_path``."""
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    # The master's REST submission server listens on a fixed port (6066) by default.
    (conf_dir / "spark-defaults.conf").write_text("spark.master.rest.enabled false\n")
    env = dict(os.environ)
    env.update(
        SPARK_LOCAL_IP="127.0.0.1",
        SPARK_CONF_DIR=str(conf_dir),
        SPARK_LOG_DIR=str(tmp_path / "logs"),
        SPARK_NO_DAEMONIZE="1",
        PYSPARK_PYTHON=sys.executable,
    )
    env.pop("SPARK_HOME", None)
    return env


import pytest  # noqa: E402


@pytest.fixture
def spark_cluster(tmp_path):
    """A standalone master and one worker (1 core, 2 GiB) on 127.0.0.1; both are stopped at teardown."""
    spark_class = find_spark_class()
    env = daemon_environment(tmp_path)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    work_dir = tmp_path / "work"
    work_dir.mkdir()

    master_port, master_web_port, worker_web_port = find_free_port(), find_free_port(), find_free_port()
    cluster = StandaloneCluster(
        master_url=f"spark://127.0.0.1:{master_port}",
        web_url=f"http://127.0.0.1:{master_web_port}",
        work_dir=work_dir,
        log_dir=log_dir,
    )
    daemons: list[subprocess.Popen] = []
    try:
        master_args = ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1"]
        master_args += ["--port", str(master_port), "--webui-port", str(master_web_port)]
        daemons.append(start_daemon(spark_class, master_args, log_dir / "master.log", env))

        worker_args = ["org.apache.spark.deploy.worker.Worker", cluster.master_url, "--host", "127.0.0.1"]
        worker_args += ["--cores", "1", "--memory", "2g", "--webui-port", str(worker_web_port)]
        worker_args += ["--work-dir", str(work_dir)]
        daemons.append(start_daemon(spark_class, worker_args, log_dir / "worker.log", env))

        wait_for_workers(cluster, daemons, count=1)
        yield cluster
    finally:
        for daemon in reversed(daemons):
            stop_daemon(daemon)


def test_cluster_fixture_runs_job(spark_cluster, tmp_path):
    output = tmp_path / "job.json"
    env = dict(os.environ, SNAKECLEF_SPARK_MASTER=spark_cluster.master_url, SPARK_LOCAL_IP="127.0.0.1")
    completed = subprocess.run(
        [sys.executable, __file__, "count", str(output)],
        env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stderr[-5000:]
    result = json.loads(output.read_text())
    assert result["master"] == spark_cluster.master_url
    assert result["count"] == 1000


def run_count_job(output: Path) -> None:
    from snakeclef.spark import get_spark

    spark = get_spark(settings={"spark.ui.enabled": "false"})
    count = spark.range(1000).repartition(4).count()
    output.write_text(json.dumps({"master": spark.sparkContext.master, "count": count, "app_id": spark.sparkContext.applicationId}))
    spark.stop()


if __name__ == "__main__":
    run_count_job(Path(sys.argv[2]))
