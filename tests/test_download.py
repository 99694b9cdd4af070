"""Download from a real GCS emulator on loopback and from local folders, with verification and resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from google.api_core import exceptions as api_exceptions

from conftest import REPO_ROOT
from snakeclef import storage
from snakeclef.data import download as download_module
from snakeclef.data.download import SourceFile, crc32c_of_file, download

BUCKET = "snakeclef-test"


@pytest.fixture
def bucket(gcs_emulator, monkeypatch):
    """An empty emulator bucket, with ``STORAGE_EMULATOR_HOST`` set for this test only."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    client = storage.make_gcs_client()
    existing = client.lookup_bucket(BUCKET)
    if existing is not None:
        for blob in client.list_blobs(BUCKET):
            blob.delete()
        return existing
    return client.create_bucket(BUCKET)


def upload_files(bucket, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        bucket.blob(name).upload_from_string(data)


def sample_files() -> dict[str, bytes]:
    return {
        "raw/SnakeCLEF2023-small.tar.gz": os.urandom(300_000),
        "raw/SnakeCLEF2023-TestMetadata.csv": b"observation_id,image_path\n1,2023/A_b/1.jpg\n",
        "raw/extra/notes.txt": b"hello",
        "other/ignored.bin": b"not under the prefix",
    }


def test_download_gcs_prefix(bucket, tmp_path):
    files = sample_files()
    upload_files(bucket, files)

    report = download(f"gs://{BUCKET}/raw", tmp_path / "raw")

    assert report["files"] == 3
    assert report["fetched"] == 3
    assert report["skipped"] == 0
    for name, data in files.items():
        local = tmp_path / name
        if name.startswith("raw/"):
            assert local.read_bytes() == data, name
        else:
            assert not local.exists()
    assert (tmp_path / "raw" / "_SUCCESS").is_file()
    assert json.loads((tmp_path / "raw" / "_download_report.json").read_text())["fetched"] == 3
    assert not list((tmp_path / "raw").rglob("*.download"))


def test_download_second_run_fetches_nothing(bucket, tmp_path):
    upload_files(bucket, sample_files())
    download(f"gs://{BUCKET}/raw/", tmp_path / "raw")
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "raw").rglob("*") if not p.name.startswith("_")}

    report = download(f"gs://{BUCKET}/raw/", tmp_path / "raw")

    assert report["fetched"] == 0
    assert report["skipped"] == 3
    assert report["bytes_fetched"] == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_download_refetches_damaged_copy(bucket, tmp_path, damage):
    files = sample_files()
    upload_files(bucket, files)
    download(f"gs://{BUCKET}/raw", tmp_path / "raw")
    archive = tmp_path / "raw" / "SnakeCLEF2023-small.tar.gz"
    data = bytearray(archive.read_bytes())
    if damage == "flip":
        data[1000] ^= 0xFF
    else:
        del data[-10:]
    archive.write_bytes(bytes(data))

    report = download(f"gs://{BUCKET}/raw", tmp_path / "raw")

    assert report["fetched"] == 1
    assert report["skipped"] == 2
    assert report["refetched_damaged"] == ["SnakeCLEF2023-small.tar.gz"]
    assert archive.read_bytes() == files["raw/SnakeCLEF2023-small.tar.gz"]


def test_download_single_object(bucket, tmp_path):
    upload_files(bucket, sample_files())
    report = download(f"gs://{BUCKET}/raw/SnakeCLEF2023-TestMetadata.csv", tmp_path / "meta")
    assert report["files"] == 1
    assert (tmp_path / "meta" / "SnakeCLEF2023-TestMetadata.csv").read_bytes().startswith(b"observation_id")


def test_download_empty_prefix(bucket, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"download source 'gs://{BUCKET}/nothing' contains no files"):
        download(f"gs://{BUCKET}/nothing", tmp_path / "raw")


def test_download_missing_bucket(bucket, tmp_path):
    with pytest.raises(FileNotFoundError, match="download source gs://no-such-bucket/raw: bucket not found"):
        download("gs://no-such-bucket/raw", tmp_path / "raw")


def test_download_unsafe_object_name(tmp_path, monkeypatch):
    # The emulator drops the connection on an upload named "raw/../x", so the listing is stubbed here.
    unsafe = SourceFile("../../escape.txt", 1, None, location="gs://bucket/raw/../../escape.txt")
    stub = type("Listing", (), {"list": lambda self: [unsafe], "chunks": lambda self, file: iter([b"x"])})()
    monkeypatch.setattr(download_module, "_LocalSource", lambda source: stub)
    with pytest.raises(ValueError, match=r"unsafe relative path '\.\./\.\./escape\.txt'"):
        download(str(tmp_path), tmp_path / "a" / "b" / "raw")
    assert not (tmp_path / "a" / "escape.txt").exists()


def test_download_progress_logged(bucket, tmp_path, caplog, monkeypatch):
    upload_files(bucket, sample_files())
    monkeypatch.setattr(download_module, "PROGRESS_INTERVAL_S", 0.0)
    with caplog.at_level(logging.INFO, logger="snakeclef.data.download"):
        download(f"gs://{BUCKET}/raw", tmp_path / "raw")
    assert "download progress: 0.3 of 0.3 MB (100%)" in caplog.text
    assert "3 files, 3 fetched" in caplog.text


def test_download_local_folder(ph_snakes, tmp_path):
    source = tmp_path / "source"
    (source / "train").mkdir(parents=True)
    (source / "train" / "a.jpg").write_bytes(b"a" * 1000)
    (source / "metadata.csv").write_text("observation_id,image_path\n")

    first = download(f"file://{source}", tmp_path / "raw")
    second = download(str(source), tmp_path / "raw")

    assert first["fetched"] == 2
    assert second["skipped"] == 2
    assert (tmp_path / "raw" / "train" / "a.jpg").read_bytes() == b"a" * 1000


def test_download_local_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="download source not found"):
        download(str(tmp_path / "nowhere"), tmp_path / "raw")


def test_download_gcs_destination_rejected(tmp_path):
    with pytest.raises(ValueError, match="download destination must be a local folder"):
        download(str(tmp_path), "gs://bucket/raw")


class FlakySource:
    """A local source whose first ``failures`` reads raise the given error."""

    def __init__(self, root: Path, error: Exception, failures: int):
        self.inner = download_module._LocalSource(str(root))
        self.error = error
        self.failures = failures
        self.calls = 0

    def list(self):
        return self.inner.list()

    def chunks(self, file):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        yield from self.inner.chunks(file)


@pytest.mark.parametrize("failures", [1, 2])
def test_download_retries_transient(tmp_path, monkeypatch, failures):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"x" * 5000)
    flaky = FlakySource(tmp_path / "src", api_exceptions.ServiceUnavailable("try later"), failures)
    monkeypatch.setattr(download_module, "_LocalSource", lambda source: flaky)

    report = download(str(tmp_path / "src"), tmp_path / "raw", initial_backoff_s=0.01)

    assert report["retries"] == failures
    assert (tmp_path / "raw" / "a.bin").read_bytes() == b"x" * 5000


def test_download_gives_up_after_max_attempts(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"x")
    flaky = FlakySource(tmp_path / "src", ConnectionResetError("reset by peer"), 10)
    monkeypatch.setattr(download_module, "_LocalSource", lambda source: flaky)

    with pytest.raises(RuntimeError, match=r"a\.bin failed after 3 attempts; last error: ConnectionResetError: reset by peer"):
        download(str(tmp_path / "src"), tmp_path / "raw", max_attempts=3, initial_backoff_s=0.01)
    assert flaky.calls == 3
    assert not (tmp_path / "raw" / "a.bin").exists()
    assert not (tmp_path / "raw" / "_SUCCESS").exists()


def test_download_permanent_error_not_retried(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"x")
    flaky = FlakySource(tmp_path / "src", api_exceptions.Forbidden("no access"), 10)
    monkeypatch.setattr(download_module, "_LocalSource", lambda source: flaky)

    with pytest.raises(RuntimeError, match=r"download of .*a\.bin failed permanently: Forbidden"):
        download(str(tmp_path / "src"), tmp_path / "raw", initial_backoff_s=0.01)
    assert flaky.calls == 1


def test_download_checksum_mismatch_retried(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"abc")
    source = download_module._LocalSource(str(tmp_path / "src"))
    listed = source.list()
    corrupted = [True]

    class CorruptOnce:
        def list(self):
            return listed

        def chunks(self, file: SourceFile):
            if corrupted.pop() if corrupted else False:
                yield b"abd"
                return
            yield from source.chunks(file)

    monkeypatch.setattr(download_module, "_LocalSource", lambda _: CorruptOnce())
    report = download(str(tmp_path / "src"), tmp_path / "raw", initial_backoff_s=0.01)
    assert report["retries"] == 1
    assert crc32c_of_file(tmp_path / "raw" / "a.bin") == listed[0].crc32c


CRASHING_CHILD = textwrap.dedent(
    """
    import sys, time
    from snakeclef.data import download

    chunks = download._GcsSource.chunks

    def slow_chunks(self, file):
        for chunk in chunks(self, file):
            time.sleep(0.2)  # slow enough for the parent to kill the run mid-file
            yield chunk

    download._GcsSource.chunks = slow_chunks
    download.CHUNK_BYTES = 64 * 1024
    download.download(sys.argv[1], sys.argv[2])
    """
)


def test_download_resumes_after_kill(bucket, gcs_emulator, tmp_path):
    files = {f"raw/part-{i}.bin": os.urandom(200_000) for i in range(4)}
    upload_files(bucket, files)
    destination = tmp_path / "raw"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "STORAGE_EMULATOR_HOST": gcs_emulator}
    child = subprocess.Popen([sys.executable, "-c", CRASHING_CHILD, f"gs://{BUCKET}/raw", str(destination)], env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            if (destination / "part-0.bin").exists() and list(destination.glob(".part-1.bin.download")):
                break
            time.sleep(0.01)
        assert child.poll() is None, "the download finished before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()

    assert not (destination / "_SUCCESS").exists()
    assert not (destination / "part-1.bin").exists()
    assert (destination / "part-0.bin").read_bytes() == files["raw/part-0.bin"]

    report = download(f"gs://{BUCKET}/raw", destination)

    assert report["skipped"] == 1
    assert report["fetched"] == 3
    assert sorted(p.name for p in destination.iterdir()) == ["_SUCCESS", "_download_report.json"] + [f"part-{i}.bin" for i in range(4)]
    for name, data in files.items():
        assert (tmp_path / name).read_bytes() == data, name
