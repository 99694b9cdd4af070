"""Paths that may be local or ``gs://`` URIs, and writes that never look complete early.

Local writes go to a temporary name beside the target and are renamed into
place when they finish, so a crash leaves no file that looks complete. A
``gs://`` object upload is atomic on its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

GCS_SCHEME = "gs://"


def is_gcs(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(GCS_SCHEME)


def split_gcs(uri: str) -> tuple[str, str]:
    """Split ``gs://bucket/some/key`` into ``("bucket", "some/key")``."""
    if not is_gcs(uri):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    bucket, _, key = uri[len(GCS_SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"gs:// URI without a bucket name: {uri!r}")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or a ``gs://`` URI."""
    base = str(base)
    if is_gcs(base):
        return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])
    return str(Path(base, *parts))


def strip_file_scheme(uri: str | os.PathLike) -> str:
    uri = str(uri)
    return uri[len("file://"):] if uri.startswith("file://") else uri


def make_gcs_client():
    """Create a ``google.cloud.storage.Client``.

    With ``STORAGE_EMULATOR_HOST`` set (a local emulator), the client uses
    anonymous credentials, so it never contacts a credentials or metadata service.
    """
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "emulator"), credentials=AnonymousCredentials())
    return storage.Client()


def exists(uri: str | os.PathLike) -> bool:
    uri = strip_file_scheme(uri)
    if is_gcs(uri):
        bucket, key = split_gcs(uri)
        return make_gcs_client().bucket(bucket).blob(key).exists()
    return Path(uri).exists()


def read_text(uri: str | os.PathLike) -> str:
    uri = strip_file_scheme(uri)
    if is_gcs(uri):
        bucket, key = split_gcs(uri)
        return make_gcs_client().bucket(bucket).blob(key).download_as_text()
    return Path(uri).read_text()


def write_text(uri: str | os.PathLike, text: str) -> None:
    """Write a small text file (a report, a marker) so that it appears whole or not at all."""
    uri = strip_file_scheme(uri)
    if is_gcs(uri):
        bucket, key = split_gcs(uri)
        make_gcs_client().bucket(bucket).blob(key).upload_from_string(text)
        return
    with atomic_path(uri) as tmp:
        Path(tmp).write_text(text)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` if the block succeeds.

    Works for files and folders. On error the temporary path is removed and
    ``target`` is left as it was. An existing folder at ``target`` is replaced.
    Temporaries of ``target`` left by a killed earlier write are deleted first,
    so two processes must not write the same ``target`` at once: the later one
    would delete the earlier one's temporary.
    """
    target = Path(strip_file_scheme(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if target.is_dir() and tmp.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _remove_stale_temporaries(target: Path) -> None:
    """Delete the temporaries of ``target`` that an earlier write left when it was killed (SIGKILL skips ``finally``)."""
    pattern = re.compile(re.escape(f".{target.name}.tmp-") + "[0-9a-f]{8}")
    for stale in target.parent.iterdir():
        if not pattern.fullmatch(stale.name):
            continue
        logger.warning("Removing %s, left by an interrupted earlier write of %s", stale, target)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def local_staging(uri: str | os.PathLike) -> Iterator[Path]:
    """Yield a local folder for a stage to write into, published to ``uri`` on success.

    For a local ``uri`` this is :func:`atomic_path`. For a ``gs://`` URI the
    folder is a temporary one whose files are uploaded under ``uri`` when the
    block succeeds.
    """
    uri = strip_file_scheme(uri)
    if not is_gcs(uri):
        with atomic_path(uri) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="snakeclef-") as tmp:
        staging = Path(tmp, "out")
        yield staging
        upload_folder(staging, uri)


def upload_folder(local_dir: str | os.PathLike, uri: str) -> None:
    """Upload every file under ``local_dir`` to ``uri``; files starting with ``_`` go last (markers)."""
    bucket_name, prefix = split_gcs(uri)
    bucket = make_gcs_client().bucket(bucket_name)
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name.startswith("_"))
    for path in files:
        key = "/".join(filter(None, [prefix.rstrip("/"), path.relative_to(local_dir).as_posix()]))
        bucket.blob(key).upload_from_filename(str(path))
