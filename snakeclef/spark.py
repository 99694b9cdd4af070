"""The one place that builds the SparkSession.

Spark runs embedded (``local[*]``) unless a master URL is configured. Settings
come, lowest precedence first, from the defaults below, ``conf/spark.conf``
(or the file named by ``SNAKECLEF_SPARK_CONF``), the caller's ``settings``, and
the environment (``SNAKECLEF_SPARK_MASTER``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Mapping

from pyspark.sql import SparkSession

logger = logging.getLogger(__name__)

DEFAULT_MASTER = "local[*]"
DEFAULT_CONF_FILE = Path(__file__).resolve().parent.parent / "conf" / "spark.conf"

# Image rows carry the original file bytes (100 KB to a few MB each), so Arrow
# batches are bounded by record count; Spark's default of 10,000 rows per batch
# would buffer gigabytes in each Python worker.
DEFAULT_SETTINGS: dict[str, str] = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "64",
    "spark.sql.parquet.compression.codec": "zstd",
    "spark.sql.session.timeZone": "UTC",
    "spark.ui.showConsoleProgress": "false",
    "spark.python.worker.reuse": "true",
    "spark.driver.memory": "4g",
}


def read_conf_file(path: str | os.PathLike) -> dict[str, str]:
    """Read a ``spark-defaults.conf``-style file: ``key value`` or ``key=value`` per line, ``#`` comments."""
    settings: dict[str, str] = {}
    for line_number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=") if "=" in line else line.partition(" ")
        if not sep or not key.strip():
            raise ValueError(f"{path}:{line_number}: expected 'key value' or 'key=value', got {raw!r}")
        settings[key.strip()] = value.strip()
    return settings


def resolve_settings(master: str | None = None, settings: Mapping[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """Merge the defaults, the configuration file, ``settings`` and the environment into (master, settings)."""
    resolved = dict(DEFAULT_SETTINGS)
    conf_file = Path(os.environ.get("SNAKECLEF_SPARK_CONF", DEFAULT_CONF_FILE))
    if conf_file.is_file():
        resolved.update(read_conf_file(conf_file))
    elif "SNAKECLEF_SPARK_CONF" in os.environ:
        raise FileNotFoundError(f"SNAKECLEF_SPARK_CONF points to {conf_file}, which does not exist")
    resolved.update(settings or {})

    master = os.environ.get("SNAKECLEF_SPARK_MASTER") or master or resolved.pop("spark.master", None) or DEFAULT_MASTER
    resolved.pop("spark.master", None)
    return master, resolved


def get_spark(master: str | None = None, settings: Mapping[str, str] | None = None, app_name: str = "snakeclef") -> SparkSession:
    """Return the process's SparkSession, creating it on first use.

    A session that already exists is returned as it is, because Spark cannot
    change the master of a running session. So Luigi tasks in one process
    share it, none of them stops it, and it ends with the process.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active

    master, resolved = resolve_settings(master, settings)
    # Workers must run the same interpreter as the driver, or pickled UDFs fail.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

    if master.startswith("local"):
        # Embedded Spark talks only to itself: keep it on loopback instead of
        # the first network interface it finds.
        resolved.setdefault("spark.driver.host", "127.0.0.1")
        resolved.setdefault("spark.driver.bindAddress", "127.0.0.1")
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in resolved.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    logger.info("Spark session started: master=%s, version %s", master, session.version)
    return session
