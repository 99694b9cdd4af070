"""Turn an image folder with ``index.csv``, or tar archives plus a metadata CSV, into Parquet image records.

Output folder layout: ``part-00000.parquet`` ... (one row per image: ``image_path``,
``observation_id`` int64, ``class_id`` int32 nullable, ``binomial_name``, ``code``,
``split``, the other metadata columns, ``data`` = the original file bytes),
``_ingest_report.json`` and ``_SUCCESS``, written last. The folder is built
under a temporary name and renamed into place, so it never exists half-written.

Archives are read once, as a stream: member bytes go straight into Parquet
row groups of bounded size, so memory does not grow with the archive.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import queue
import shutil
import tarfile
import threading
import time
import zlib
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from snakeclef import storage
from snakeclef.data.metadata import MAX_EXAMPLES, is_unsafe_relative_path, normalise_image_path, read_index, read_metadata

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
CORE_COLUMNS = ("image_path", "observation_id", "class_id", "binomial_name", "code", "split")
STRING_COLUMNS = ("image_path", "binomial_name", "code", "split")
REPORT_NAME = "_ingest_report.json"
SUCCESS_NAME = "_SUCCESS"
ROW_GROUP_BYTES = 16 * 1024 * 1024
QUEUED_BYTES = 2 * ROW_GROUP_BYTES


def ingest_folder(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    index_name: str = "index.csv",
    partitions: int = 200,
    destination: str | None = None,
) -> dict:
    """Write the images listed in ``<dataset_dir>/<index_name>`` as Parquet image records, in index order.

    Returns the ingest report. Does nothing and returns the existing report when
    ``output_dir`` is already complete. ``destination`` is the report's
    ``output`` when ``output_dir`` is a staging folder that will be moved or
    uploaded there; default ``output_dir``.
    """
    dataset_dir = Path(storage.strip_file_scheme(dataset_dir))
    _check_partitions(partitions)
    done = _completed_report(output_dir)
    if done is not None:
        return done
    metadata = read_index(dataset_dir, index_name=index_name)
    source = {"kind": "folder", "dataset_dir": str(dataset_dir), "index": index_name}
    return _publish(
        output_dir, metadata, source, partitions, lambda writer, report: _read_folder(dataset_dir, index_name, metadata, writer, report),
        destination=destination,
    )


def ingest_archives(
    archives: Sequence[str | os.PathLike],
    metadata_csv: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    partitions: int = 200,
    destination: str | None = None,
) -> dict:
    """Stream the image members of tar archives (``.tar``, ``.tar.gz``, ``.tgz``) into Parquet image records.

    A member ``<top>/2023/Genus_species/1.jpg`` joins the metadata row whose
    ``image_path`` is ``2023/Genus_species/1.jpg``: the longest trailing part of
    the member name found in the metadata wins, and an exact-case match is
    preferred to one that ignores letter case. Rows follow archive order.
    Returns the ingest report; does nothing when ``output_dir`` is already complete.
    ``destination`` is recorded as the report's ``output`` as in :func:`ingest_folder`.
    """
    if isinstance(archives, (str, os.PathLike)):
        archives = [archives]
    archives = [Path(storage.strip_file_scheme(archive)) for archive in archives]
    if not archives:
        raise ValueError("ingest_archives needs at least one archive; got an empty list.")
    for archive in archives:
        if not archive.is_file():
            raise FileNotFoundError(f"archive not found: {archive}")
    _check_partitions(partitions)
    done = _completed_report(output_dir)
    if done is not None:
        return done
    metadata = read_metadata(metadata_csv)
    source = {"kind": "archives", "archives": [str(a) for a in archives], "metadata": str(metadata_csv)}
    return _publish(
        output_dir, metadata, source, partitions, lambda writer, report: _read_archives(archives, metadata, writer, report),
        destination=destination,
    )


class IngestReport:
    """Counts per kind of event plus up to ``MAX_EXAMPLES`` examples of each."""

    def __init__(self, kinds: Sequence[str]):
        self.counts = {kind: 0 for kind in kinds}
        self.examples: dict[str, list] = {}

    def add(self, kind: str, example=None, count: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + count
        if example is not None:
            examples = self.examples.setdefault(kind, [])
            if len(examples) < MAX_EXAMPLES:
                examples.append(example)


class RecordWriter:
    """Write image records as ``part-NNNNN.parquet`` files of ``rows_per_part`` rows, in row groups of bounded size.

    A record is a position in ``metadata`` plus the image bytes. The metadata
    columns come from a pre-built Arrow table, so a flush is one ``take``.
    A background thread writes the files while the caller reads the next
    images. At most ``QUEUED_BYTES`` of image data wait for it (or one row group
    when that is larger), which bounds memory.
    """

    def __init__(self, folder: Path, metadata: pd.DataFrame, *, rows_per_part: int, row_group_bytes: int = ROW_GROUP_BYTES):
        self.folder = folder
        self.rows_per_part = rows_per_part
        self.row_group_bytes = row_group_bytes
        self.metadata_table = _metadata_table(metadata)
        self.schema = self.metadata_table.schema.append(pa.field("data", pa.binary()))
        self.parts: list[dict] = []
        self.bytes_written = 0
        self._part_rows = 0
        self._part_open = False
        self._reset_buffer()
        self._queue: queue.Queue = queue.Queue()
        self._queued_bytes = 0
        self._queue_space = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_loop, name="parquet-writer", daemon=True)
        self._thread.start()

    def add(self, position: int, data: bytes) -> None:
        self._positions.append(position)
        self._data += data
        self._offsets.append(len(self._data))
        if self._part_rows + len(self._positions) >= self.rows_per_part or len(self._data) >= self.row_group_bytes:
            self._flush()

    def close(self) -> None:
        """Write what is buffered, close the last part and wait for the writer thread."""
        self._flush()
        if self._part_open:
            self._put(("close", None))
        if not self.parts:
            # An empty part keeps the schema readable by Spark and pandas.
            self._open_part()
            self._put(("close", None))
        self._stop()

    def abort(self) -> None:
        """Stop the writer thread without writing what is buffered (the caller discards the folder)."""
        try:
            self._stop()
        except Exception:
            logger.debug("Parquet writer failed while aborting", exc_info=True)

    def _reset_buffer(self) -> None:
        self._positions: list[int] = []
        self._data = bytearray()
        self._offsets = [0]

    def _flush(self) -> None:
        if not self._positions:
            return
        if not self._part_open:
            self._open_part()
        # The binary column wraps the buffer as it is: offsets plus one contiguous byte buffer, no copy per image.
        offsets = pa.py_buffer(np.asarray(self._offsets, dtype=np.int32))
        data = pa.Array.from_buffers(pa.binary(), len(self._positions), [None, offsets, pa.py_buffer(self._data)])
        table = self.metadata_table.take(pa.array(self._positions, pa.int64()))
        table = table.append_column(self.schema.field("data"), data)
        self._put(("write", table), nbytes=len(self._data))

        self._part_rows += table.num_rows
        self.parts[-1]["rows"] = self._part_rows
        self.bytes_written += len(self._data)
        self._reset_buffer()
        if self._part_rows >= self.rows_per_part:
            self._put(("close", None))
            self._part_open = False

    def _open_part(self) -> None:
        name = f"part-{len(self.parts):05d}.parquet"
        self._put(("open", self.folder / name))
        self.parts.append({"file": name, "rows": 0})
        self._part_rows = 0
        self._part_open = True

    def _put(self, command, *, nbytes: int = 0) -> None:
        """Queue a command for the writer thread, first waiting until the queued image bytes leave room."""
        with self._queue_space:
            while self._queued_bytes > 0 and self._queued_bytes + nbytes > QUEUED_BYTES and self._error is None:
                self._queue_space.wait(timeout=0.5)
            if self._error is not None:
                raise RuntimeError(f"writing Parquet under {self.folder} failed: {self._error}") from self._error
            self._queued_bytes += nbytes
        self._queue.put((command, nbytes))

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._put(None)
            self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"writing Parquet under {self.folder} failed: {self._error}") from self._error

    def _write_loop(self) -> None:
        columns = [name for name in self.schema.names if name != "data"]
        writer = None
        try:
            while True:
                command, nbytes = self._queue.get()
                if command is None:
                    break
                kind, value = command
                if kind == "open":
                    writer = pq.ParquetWriter(
                        value,
                        self.schema,
                        # Image bytes are already compressed (JPEG, PNG), so compressing them again only costs time.
                        compression={column: "snappy" for column in columns} | {"data": "none"},
                        use_dictionary=columns,
                        write_statistics=columns,
                    )
                elif kind == "write":
                    writer.write_table(value)
                    with self._queue_space:
                        self._queued_bytes -= nbytes
                        self._queue_space.notify()
                else:
                    writer.close()
                    writer = None
        except BaseException as error:
            with self._queue_space:
                self._error = error
                self._queue_space.notify()
        finally:
            if writer is not None:
                writer.close()


def _metadata_table(metadata: pd.DataFrame) -> pa.Table:
    """Arrow table of the metadata with the image-record column order and types (``data`` excluded)."""
    if "data" in metadata.columns:
        raise ValueError(
            f"metadata file {metadata.attrs.get('source', '')} has a column named 'data', which image records "
            "reserve for the image bytes. Rename that column."
        )
    columns = list(CORE_COLUMNS) + [c for c in metadata.columns if c not in CORE_COLUMNS]
    table = pa.Table.from_pandas(metadata[columns], preserve_index=False)
    fields = []
    for field in table.schema:
        if field.name in STRING_COLUMNS or pa.types.is_null(field.type):
            field = field.with_type(pa.string())
        elif field.name == "observation_id":
            field = field.with_type(pa.int64())
        elif field.name == "class_id":
            field = field.with_type(pa.int32())
        fields.append(field)
    return table.cast(pa.schema(fields)).replace_schema_metadata(None)


def _check_partitions(partitions: int) -> None:
    if not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"partitions must be a positive integer, got {partitions!r}.")


def _completed_report(output_dir: str | os.PathLike) -> dict | None:
    output_dir = Path(storage.strip_file_scheme(output_dir))
    if not (output_dir / SUCCESS_NAME).is_file():
        return None
    logger.info("ingest output %s is already complete; nothing to do", output_dir)
    return json.loads((output_dir / REPORT_NAME).read_text())


def _remove_stale_temporaries(output_dir: Path) -> None:
    """Delete temporary folders that a killed earlier run left beside ``output_dir``."""
    for stale in output_dir.parent.glob(f".{output_dir.name}.tmp-*"):
        logger.warning("removing %s, left by an interrupted earlier run", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _publish(output_dir, metadata: pd.DataFrame, source: dict, partitions: int, read, *, destination: str | None = None) -> dict:
    """Run ``read(writer, report)`` into a temporary folder, add the report and ``_SUCCESS``, rename into place."""
    started = time.perf_counter()
    output_dir = Path(storage.strip_file_scheme(output_dir))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(output_dir)
    rows_per_part = max(1, math.ceil(len(metadata) / partitions))
    report = IngestReport(_report_kinds(source["kind"]))
    duplicates = metadata.attrs.get("duplicate_rows", [])
    report.add("duplicate_metadata_rows", count=len(duplicates))
    report.examples["duplicate_metadata_rows"] = duplicates[:MAX_EXAMPLES]

    with storage.atomic_path(output_dir) as tmp:
        tmp.mkdir()
        writer = RecordWriter(tmp, metadata, rows_per_part=rows_per_part)
        try:
            read(writer, report)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        if report.counts["rows_written"] == 0:
            raise ValueError(f"ingest found no image with metadata in {_describe(source)}; nothing was written. Counts: {report.counts}")
        summary = _summary(source, destination or output_dir, report, writer, partitions, rows_per_part, time.perf_counter() - started)
        (tmp / REPORT_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        (tmp / SUCCESS_NAME).write_text("")

    counts = summary["counts"]
    logger.info(
        "ingest %s -> %s: %d rows in %d parts, %.1f MB, %.1f s; %s",
        _describe(source), output_dir, counts["rows_written"], len(writer.parts), writer.bytes_written / 1e6,
        summary["seconds"], ", ".join(f"{k}={v}" for k, v in counts.items() if k != "rows_written"),
    )
    return summary


def _describe(source: dict) -> str:
    if source["kind"] == "folder":
        return f"folder {source['dataset_dir']}"
    return f"archive(s) {', '.join(source['archives'])} with metadata {source['metadata']}"


def _report_kinds(kind: str) -> list[str]:
    if kind == "folder":
        return ["files_found", "images_found", "rows_written", "images_without_metadata", "metadata_rows_without_image",
                "non_image_files", "rejected_rows", "duplicate_metadata_rows"]
    return ["members_read", "directories", "images_read", "rows_written", "images_without_metadata",
            "metadata_rows_without_image", "non_image_members", "rejected_members", "duplicate_images",
            "duplicate_metadata_rows", "matched_ignoring_case"]


def _summary(source, output_dir, report, writer, partitions, rows_per_part, seconds) -> dict:
    summary = {
        "source": source,
        "output": str(output_dir),
        "partitions_requested": partitions,
        "partitions_written": len(writer.parts),
        "rows_per_partition": rows_per_part,
        "counts": report.counts,
        "examples": {kind: examples for kind, examples in report.examples.items() if examples},
        "parts": writer.parts,
        "data_bytes": writer.bytes_written,
        "seconds": round(seconds, 3),
    }
    if len(writer.parts) < partitions:
        summary["partitions_note"] = (
            f"{len(writer.parts)} of {partitions} requested partitions written: "
            f"{report.counts['rows_written']} rows at up to {rows_per_part} per partition."
        )
    return summary


def _read_folder(dataset_dir: Path, index_name: str, metadata: pd.DataFrame, writer: RecordWriter, report: IngestReport) -> None:
    listed = set(metadata["image_path"])
    for root, _, names in os.walk(dataset_dir):
        for name in sorted(names):
            relative = normalise_image_path(Path(root, name).relative_to(dataset_dir).as_posix())
            if relative == index_name:
                continue
            report.add("files_found")
            if PurePosixPath(relative).suffix.lower() not in IMAGE_SUFFIXES:
                report.add("non_image_files", relative)
                continue
            report.add("images_found")
            if relative not in listed:
                report.add("images_without_metadata", relative)

    for position, image_path in enumerate(metadata["image_path"]):
        if is_unsafe_relative_path(image_path):
            report.add("rejected_rows", {"image_path": image_path, "reason": "absolute path or '..' component"})
            continue
        file = dataset_dir / image_path
        if not file.is_file():
            report.add("metadata_rows_without_image", image_path)
            continue
        writer.add(position, file.read_bytes())
        report.add("rows_written")


def _read_archives(archives: Sequence[Path], metadata: pd.DataFrame, writer: RecordWriter, report: IngestReport) -> None:
    matcher = PathMatcher(metadata["image_path"])
    written = np.zeros(len(metadata), dtype=bool)
    for archive in archives:
        _read_archive(archive, matcher, written, writer, report)

    missing = np.flatnonzero(~written)
    report.add("metadata_rows_without_image", count=len(missing))
    report.examples["metadata_rows_without_image"] = [metadata["image_path"].iloc[i] for i in missing[:MAX_EXAMPLES]]


def _read_archive(archive: Path, matcher: "PathMatcher", written: np.ndarray, writer: RecordWriter, report: IngestReport) -> None:
    members = 0
    member_bytes = 0
    try:
        # "r|*": one sequential pass, with gzip/bz2/xz detected from the data; nothing is extracted to disk.
        with tarfile.open(archive, mode="r|*") as tar:
            while (member := tar.next()) is not None:
                # Stream mode keeps every TarInfo it has seen; dropping them keeps memory flat.
                tar.members.clear()
                members += 1
                member_bytes += member.size
                _read_member(tar, member, archive, matcher, written, writer, report)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise ValueError(
            f"archive {archive} is truncated or corrupt: reading failed after {members} members "
            f"({member_bytes / 1e6:.1f} MB of member data): {type(error).__name__}: {error}. "
            f"Download the archive again; no output was written."
        ) from error
    logger.info("archive %s: %d members, %.1f MB", archive, members, member_bytes / 1e6)


def _read_member(tar, member, archive, matcher, written, writer, report) -> None:
    report.add("members_read")
    name = member.name
    if member.isdir():
        report.add("directories")
        return
    reason = _rejection_reason(member)
    if reason is not None:
        report.add("rejected_members", {"archive": archive.name, "member": name, "reason": reason})
        if report.counts["rejected_members"] <= MAX_EXAMPLES:
            logger.warning("archive %s: rejected member %r (%s)", archive, name, reason)
        return
    if PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES:
        report.add("non_image_members", {"archive": archive.name, "member": name})
        return

    report.add("images_read")
    position, ignoring_case = matcher.match(name)
    if position is None:
        report.add("images_without_metadata", {"archive": archive.name, "member": name})
        return
    if written[position]:
        report.add("duplicate_images", {"archive": archive.name, "member": name, "image_path": matcher.paths[position]})
        return
    if ignoring_case:
        report.add("matched_ignoring_case", {"member": name, "image_path": matcher.paths[position]})
    writer.add(position, tar.extractfile(member).read())
    written[position] = True
    report.add("rows_written")


def _rejection_reason(member: tarfile.TarInfo) -> str | None:
    if member.issym() or member.islnk():
        return f"link to {member.linkname!r}"
    if not member.isfile():
        return "not a regular file"
    if is_unsafe_relative_path(member.name):
        return "absolute path or '..' component"
    return None


class PathMatcher:
    """Find the metadata row of an archive member by the longest trailing part of its name."""

    def __init__(self, image_paths: pd.Series):
        self.paths = list(image_paths)
        self.exact = {path: position for position, path in enumerate(self.paths)}
        self.folded: dict[str, int | None] = {}
        for position, path in enumerate(self.paths):
            key = path.casefold()
            # None marks a folded name shared by several rows, which cannot be matched ignoring case.
            self.folded[key] = None if key in self.folded else position

    def match(self, member_name: str) -> tuple[int | None, bool]:
        """Return (row position or None, whether the match ignored letter case)."""
        parts = normalise_image_path(member_name).split("/")
        suffixes = ["/".join(parts[i:]) for i in range(len(parts))]
        for suffix in suffixes:
            if suffix in self.exact:
                return self.exact[suffix], False
        for suffix in suffixes:
            position = self.folded.get(suffix.casefold())
            if position is not None:
                return position, True
        return None, False
