"""Embedding on a real Spark standalone cluster gives the same rows as local mode.

The fixture starts one master and one worker on 127.0.0.1 from the installed
pyspark. pyspark allows one SparkContext per process and the suite's ``spark``
fixture is a local one, so the cluster-mode run happens in a child process:
this file run as a script (see ``run_cluster_job``) with ``SNAKECLEF_SPARK_MASTER`` set.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import stop_process_group

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


def wait_for_workers(cluster: StandaloneCluster, daemons: list[subprocess.Popen], count: int) -> None:
    """Block until ``count`` workers are ALIVE at the master. Raise if a daemon exits or time runs out."""
    deadline = time.monotonic() + SPARK_STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        for daemon in daemons:
            if daemon.poll() is not None:
                raise RuntimeError(f"Spark daemon {daemon.args[1]} exited with code {daemon.returncode}\n{cluster.logs()}")
        try:
            if cluster.status().get("aliveworkers", 0) >= count:
                return
        except (OSError, ValueError):
            pass  # The master's web UI is not up yet, or sent an incomplete page while starting.
        time.sleep(0.5)
    raise TimeoutError(f"{count} Spark worker(s) did not register within {SPARK_STARTUP_TIMEOUT_S} s\n{cluster.logs()}")


def daemon_environment(tmp_path: Path) -> dict[str, str]:
    """Return the environment for the daemons: loopback only, logs and scratch space under ``tmp_path``."""
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    # Without this, the master of pyspark 4.3 also starts its REST submission server on the fixed port 6066.
    (conf_dir / "spark-defaults.conf").write_text("spark.master.rest.enabled false\n")
    env = dict(os.environ)
    env.update(
        SPARK_LOCAL_IP="127.0.0.1",
        SPARK_CONF_DIR=str(conf_dir),
        SPARK_LOG_DIR=str(tmp_path / "logs"),
        PYSPARK_PYTHON=sys.executable,
    )
    return env



@pytest.fixture
def spark_cluster(tmp_path):
    """A standalone master and one worker (1 core, 2 GiB) on 127.0.0.1, both stopped at teardown even when the test fails."""
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
            stop_process_group(daemon)


def write_image_records(folder: Path, *, n_files: int = 3, per_file: int = 5, size: int = 48) -> list[str]:
    """Write image-record Parquet files of small JPEGs plus one truncated JPEG, and return the image paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    image_paths = []
    for file_index in range(n_files):
        rows = {name: [] for name in ("image_path", "observation_id", "class_id", "binomial_name", "code", "split", "data")}
        for row in range(per_file):
            number = file_index * per_file + row
            buffer = io.BytesIO()
            pixels = rng.integers(0, 256, size=(size, size + 8 * row, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            data = buffer.getvalue()
            if number == 7:
                data = data[: len(data) // 3]  # truncated: the stage must keep it as an error row
            rows["image_path"].append(f"2023/Genus_species{number % 3}/{number}.jpg")
            rows["observation_id"].append(number // 2)
            rows["class_id"].append(100 + number % 3)
            rows["binomial_name"].append(f"Genus species{number % 3}")
            rows["code"].append("PH")
            rows["split"].append("train" if number % 4 else "val")
            rows["data"].append(data)
        schema = pa.schema([
            ("image_path", pa.string()), ("observation_id", pa.int64()), ("class_id", pa.int32()),
            ("binomial_name", pa.string()), ("code", pa.string()), ("split", pa.string()), ("data", pa.binary()),
        ])
        pq.write_table(pa.table(rows, schema=schema), folder / f"part-{file_index:05d}.parquet")
        image_paths += rows["image_path"]
    return image_paths


def read_embeddings(folder: Path):
    """Read an embeddings folder into a DataFrame sorted by ``image_path``."""
    import pyarrow.dataset as ds

    table = ds.dataset(folder, format="parquet").to_table()
    return table.to_pandas().sort_values("image_path").reset_index(drop=True)


EMBED_OPTIONS = {"batch_size": 4, "precision": "fp32", "device": "cpu"}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_embed_cluster_matches_local(spark_cluster, spark, tiny_backbone, tmp_path):
    from snakeclef.embed import embed_images

    images = tmp_path / "images"
    image_paths = write_image_records(images)
    local_output = tmp_path / "embeddings-local"
    cluster_output = tmp_path / "embeddings-cluster"
    job_result = tmp_path / "cluster-job.json"
    job_log = tmp_path / "cluster-job.log"

    # The cluster job starts first and runs while this process embeds in local mode.
    command = [sys.executable, __file__, str(images), str(cluster_output), str(tiny_backbone), str(job_result)]
    env = dict(os.environ, SNAKECLEF_SPARK_MASTER=spark_cluster.master_url, SPARK_LOCAL_IP="127.0.0.1")
    with open(job_log, "wb") as log:
        job_process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        embed_images(spark, str(images), str(local_output), backbone=str(tiny_backbone), **EMBED_OPTIONS)
        returncode = job_process.wait(timeout=JOB_TIMEOUT_S)
    finally:
        if job_process.poll() is None:
            job_process.kill()
            job_process.wait()
    assert returncode == 0, job_log.read_text(errors="replace")[-6000:] + "\n" + spark_cluster.logs()

    # The job ran on the cluster: its driver used the master URL, the master lists the
    # application, and the worker started an executor for it.
    job = json.loads(job_result.read_text())
    assert job["master"] == spark_cluster.master_url
    applications = [app["id"] for app in spark_cluster.status()["completedapps"] + spark_cluster.status()["activeapps"]]
    assert job["application_id"] in applications
    assert (spark_cluster.work_dir / job["application_id"]).is_dir()
    assert (cluster_output / "_SUCCESS").is_file()

    local = read_embeddings(local_output)
    cluster = read_embeddings(cluster_output)
    assert sorted(image_paths) == local["image_path"].tolist()
    assert local["image_path"].tolist() == cluster["image_path"].tolist()
    for column in ("observation_id", "class_id", "binomial_name", "code", "split", "error"):
        assert local[column].tolist() == cluster[column].tolist(), column

    failed = local["error"].notna()
    assert failed.sum() == 1
    assert local.loc[failed, "image_path"].tolist() == ["2023/Genus_species1/7.jpg"]
    assert cluster.loc[failed, "cls"].isna().all()
    for column in ("cls", "dct"):
        local_values = np.stack(local.loc[~failed, column].to_numpy())
        cluster_values = np.stack(cluster.loc[~failed, column].to_numpy())
        np.testing.assert_allclose(cluster_values, local_values, rtol=1e-4, atol=1e-5, err_msg=column)

    assert job["report"]["rows"] == len(image_paths)
    assert job["report"]["errors"] == 1


def run_cluster_job(images: str, output: str, backbone: str, result_path: str) -> None:
    """Embed ``images`` with the master from ``SNAKECLEF_SPARK_MASTER``; write the master, application id and report."""
    from snakeclef.embed import embed_images
    from snakeclef.spark import get_spark

    spark = get_spark(settings={"spark.ui.enabled": "false", "spark.executor.memory": "1g", "spark.driver.memory": "1g"})
    try:
        report = embed_images(spark, images, output, backbone=backbone, **EMBED_OPTIONS)
        result = {"master": spark.sparkContext.master, "application_id": spark.sparkContext.applicationId, "report": report}
        Path(result_path).write_text(json.dumps(result))
    finally:
        spark.stop()


if __name__ == "__main__":
    run_cluster_job(*sys.argv[1:5])
