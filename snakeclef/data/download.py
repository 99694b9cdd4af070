"""Copy a ``gs://bucket/prefix`` or a local folder into a local folder, verifying every file.

Each file is checked against the source's size and CRC32C (GCS reports both;
for a local source they are computed). A destination file that already
matches is skipped, so a rerun after a crash fetches only what is missing or
damaged. A file is written under a temporary name (``.<name>.download``) and
renamed when verified, so no file at its final name is ever partial.
``_download_report.json`` and ``_SUCCESS`` are written last.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import google_crc32c

from snakeclef import storage
from snakeclef.data.metadata import is_unsafe_relative_path

logger = logging.getLogger(__name__)

REPORT_NAME = "_download_report.json"
SUCCESS_NAME = "_SUCCESS"
CHUNK_BYTES = 8 * 1024 * 1024
PROGRESS_INTERVAL_S = 5.0
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class SourceFile:
    """One file to fetch: its path relative to the source root, size in bytes and CRC32C (base64, as GCS reports it)."""

    relative_path: str
    size: int
    crc32c: str | None
    md5: str | None = None
    location: str = ""


class TransientError(Exception):
    """A failure worth retrying: a dropped connection, a 5xx/429 response or a checksum mismatch in transit."""


def download(
    source: str,
    destination: str | os.PathLike,
    *,
    max_attempts: int = 5,
    initial_backoff_s: float = 1.0,
) -> dict:
    """Copy every file under ``source`` (``gs://bucket/prefix``, a local folder or file, ``file://``) into ``destination``.

    Returns the download report: files and bytes fetched, skipped (already
    verified) and retried. A transient error is retried up to ``max_attempts``
    times with exponential backoff starting at ``initial_backoff_s`` seconds; a
    permanent one raises naming the object.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts!r}.")
    if storage.is_gcs(destination):
        raise ValueError(
            f"download destination must be a local folder, got {destination!r}. "
            "Download to local disk and publish the folder with snakeclef.storage.upload_folder."
        )
    started = time.perf_counter()
    destination = Path(storage.strip_file_scheme(destination))
    destination.mkdir(parents=True, exist_ok=True)
    # The marker goes first: while files change, the folder must not look complete.
    (destination / SUCCESS_NAME).unlink(missing_ok=True)

    fetch = _GcsSource(source) if storage.is_gcs(source) else _LocalSource(source)
    files = fetch.list()
    if not files:
        raise FileNotFoundError(f"download source {source!r} contains no files.")
    progress = _Progress(sum(f.size for f in files))
    report = {"source": source, "destination": str(destination), "files": len(files), "fetched": 0, "skipped": 0,
              "retries": 0, "bytes_fetched": 0, "bytes_total": progress.total, "refetched_damaged": []}

    for file in files:
        if is_unsafe_relative_path(file.relative_path):
            raise ValueError(
                f"download source object {file.location} has the unsafe relative path {file.relative_path!r} "
                "(absolute or with a '..' component), which would land outside the destination. Rename the object."
            )
        target = destination / file.relative_path
        state = _verify(target, file)
        if state == "verified":
            report["skipped"] += 1
            progress.advance(file.size, fetched=False)
            continue
        if state == "damaged":
            logger.warning("%s does not match %s (size or checksum); fetching it again", target, file.location)
            report["refetched_damaged"].append(file.relative_path)
        report["retries"] += _with_retries(lambda: _fetch_verified(fetch, file, target, progress), file, max_attempts, initial_backoff_s)
        report["fetched"] += 1
        report["bytes_fetched"] += file.size

    report["seconds"] = round(time.perf_counter() - started, 3)
    storage.write_text(destination / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    (destination / SUCCESS_NAME).write_text("")
    logger.info(
        "download %s -> %s: %d files, %d fetched (%.1f MB), %d already verified, %d retries, %.1f s",
        source, destination, report["files"], report["fetched"], report["bytes_fetched"] / 1e6,
        report["skipped"], report["retries"], report["seconds"],
    )
    return report


def crc32c_of_file(path: Path) -> str:
    """Return the CRC32C of a file, base64 encoded big-endian as GCS reports it."""
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode("ascii")


def _verify(target: Path, file: SourceFile) -> str:
    """Return "missing", "damaged" or "verified" for the local copy of ``file``."""
    if not target.is_file():
        return "missing"
    if target.stat().st_size != file.size:
        return "damaged"
    if file.crc32c is not None:
        return "verified" if crc32c_of_file(target) == file.crc32c else "damaged"
    if file.md5 is not None:
        return "verified" if _md5_of_file(target) == file.md5 else "damaged"
    # NOTE: an object without any checksum (possible for composite objects without CRC32C) is verified by size only.
    return "verified"


def _md5_of_file(path: Path) -> str:
    import hashlib

    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode("ascii")


def _fetch_verified(fetch, file: SourceFile, target: Path, progress: "_Progress") -> None:
    """Fetch ``file`` to a temporary name beside ``target``, check size and checksum, rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.download")
    written = 0
    checksum = google_crc32c.Checksum()
    try:
        with open(partial, "wb") as handle:
            for chunk in fetch.chunks(file):
                handle.write(chunk)
                checksum.update(chunk)
                written += len(chunk)
                progress.advance(len(chunk), fetched=True)
            handle.flush()
            os.fsync(handle.fileno())
        crc32c = base64.b64encode(checksum.digest()).decode("ascii")
        if written != file.size or (file.crc32c is not None and crc32c != file.crc32c):
            raise TransientError(
                f"{file.location}: received {written} bytes with CRC32C {crc32c}, expected {file.size} bytes with CRC32C {file.crc32c}"
            )
        if file.crc32c is None and file.md5 is not None and _md5_of_file(partial) != file.md5:
            raise TransientError(f"{file.location}: MD5 of the received bytes does not match {file.md5}")
        os.replace(partial, target)
    except BaseException:
        progress.advance(-written, fetched=True)
        partial.unlink(missing_ok=True)
        raise


def _with_retries(action: Callable[[], None], file: SourceFile, max_attempts: int, initial_backoff_s: float) -> int:
    """Run ``action``, retrying transient errors with exponential backoff and jitter; return the number of retries."""
    for attempt in range(1, max_attempts + 1):
        try:
            action()
            return attempt - 1
        except Exception as error:
            if not _is_transient(error):
                raise RuntimeError(f"download of {file.location} failed permanently: {type(error).__name__}: {error}") from error
            if attempt == max_attempts:
                raise RuntimeError(
                    f"download of {file.location} failed after {max_attempts} attempts; last error: {type(error).__name__}: {error}. "
                    "Check the network or raise max_attempts."
                ) from error
            delay = min(MAX_BACKOFF_S, initial_backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            logger.warning("download of %s failed (attempt %d of %d: %s); retrying in %.1f s", file.location, attempt, max_attempts, error, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _is_transient(error: Exception) -> bool:
    if isinstance(error, TransientError):
        return True
    try:
        import requests
        from google.api_core import exceptions as api_exceptions
    except ImportError:  # pragma: no cover - both come with google-cloud-storage
        return False
    transient_types = (
        requests.ConnectionError,
        requests.Timeout,
        api_exceptions.TooManyRequests,
        api_exceptions.InternalServerError,
        api_exceptions.BadGateway,
        api_exceptions.ServiceUnavailable,
        api_exceptions.GatewayTimeout,
    )
    return isinstance(error, transient_types) or isinstance(error, ConnectionError)


class _Progress:
    """Log bytes done, total and rate at most every ``PROGRESS_INTERVAL_S`` seconds."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.fetched = 0
        self.started = time.monotonic()
        self.last_log = self.started

    def advance(self, nbytes: int, *, fetched: bool) -> None:
        self.done += nbytes
        if fetched:
            self.fetched += nbytes
        now = time.monotonic()
        if now - self.last_log >= PROGRESS_INTERVAL_S:
            self.last_log = now
            rate = self.fetched / max(now - self.started, 1e-9)
            logger.info("download progress: %.1f of %.1f MB (%.0f%%), %.1f MB/s",
                        self.done / 1e6, self.total / 1e6, 100 * self.done / max(self.total, 1), rate / 1e6)


class _LocalSource:
    def __init__(self, source: str):
        self.root = Path(storage.strip_file_scheme(source))
        if not self.root.exists():
            raise FileNotFoundError(f"download source not found: {self.root}")

    def list(self) -> list[SourceFile]:
        if self.root.is_file():
            paths = [self.root]
            base = self.root.parent
        else:
            base = self.root
            paths = sorted(p for p in self.root.rglob("*") if p.is_file() and not _is_own_file(p.name))
        return [SourceFile(p.relative_to(base).as_posix(), p.stat().st_size, crc32c_of_file(p), location=str(p)) for p in paths]

    def chunks(self, file: SourceFile) -> Iterator[bytes]:
        with open(file.location, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                yield chunk


class _GcsSource:
    def __init__(self, source: str):
        self.bucket_name, prefix = storage.split_gcs(source)
        self.prefix = prefix.strip("/")
        self.client = storage.make_gcs_client()
        self.bucket = self.client.bucket(self.bucket_name)

    def list(self) -> list[SourceFile]:
        from google.api_core import exceptions as api_exceptions

        folder = f"{self.prefix}/" if self.prefix else ""
        try:
            blobs = [b for b in self.client.list_blobs(self.bucket_name, prefix=folder) if not b.name.endswith("/")]
        except api_exceptions.NotFound as error:
            raise FileNotFoundError(f"download source gs://{self.bucket_name}/{self.prefix}: bucket not found ({error.message}).") from error
        except api_exceptions.Forbidden as error:
            raise PermissionError(
                f"download source gs://{self.bucket_name}/{self.prefix}: listing forbidden ({error.message}). "
                "Check the credentials' storage.objects.list permission."
            ) from error
        if blobs:
            return [self._source_file(b, b.name[len(folder):]) for b in blobs if not _is_own_file(b.name.rsplit("/", 1)[-1])]
        blob = self.bucket.get_blob(self.prefix) if self.prefix else None
        if blob is None:
            return []
        return [self._source_file(blob, self.prefix.rsplit("/", 1)[-1])]

    def _source_file(self, blob, relative_path: str) -> SourceFile:
        return SourceFile(relative_path, int(blob.size), blob.crc32c, blob.md5_hash, location=f"gs://{self.bucket_name}/{blob.name}")

    def chunks(self, file: SourceFile) -> Iterator[bytes]:
        name = file.location[len(f"gs://{self.bucket_name}/"):]
        blob = self.bucket.blob(name)
        # Ranged reads keep memory at one chunk; the checksum is verified over the whole file afterwards.
        with blob.open("rb", chunk_size=CHUNK_BYTES) as reader:
            while chunk := reader.read(CHUNK_BYTES):
                yield chunk


def _is_own_file(name: str) -> bool:
    """True for this module's marker and report, and for temporary files of an interrupted download."""
    return name in (SUCCESS_NAME, REPORT_NAME) or (name.startswith(".") and name.endswith(".download"))
