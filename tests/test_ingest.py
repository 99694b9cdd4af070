"""Ingest of SnakeCLEF-format archives and image folders into Parquet image records."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT
from snakeclef.data.ingest import ingest_archives, ingest_folder

TOP_FOLDER = "SnakeCLEF2023-small_size"


def build_snakeclef_archive(ph_snakes: Path, folder: Path, *, limit: int | None = None, mode: str = "w:gz") -> tuple[Path, Path]:
    """Write a SnakeCLEF-like archive of ph-snakes photos plus its test metadata (no class_id, no binomial_name).

    Members are ``<top>/2023/Genus_species/<id><suffix>``, every fifth suffix upper-cased,
    and each pair of consecutive images forms one observation.
    """
    index = pd.read_csv(ph_snakes / "index.csv").head(limit)
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / ("images.tar.gz" if mode == "w:gz" else "images.tar")
    rows = []
    with tarfile.open(archive, mode) as tar:
        for i, row in enumerate(index.itertuples()):
            suffix = Path(row.image_path).suffix
            suffix = suffix.upper() if i % 5 == 0 else suffix.lower()
            relative = f"2023/{row.binomial_name.replace(' ', '_')}/{100000 + i}{suffix}"
            tar.add(ph_snakes / row.image_path, arcname=f"{TOP_FOLDER}/{relative}")
            rows.append({"observation_id": 5000 + i // 2, "endemic": False, "code": "PH", "image_path": relative, "source": row.image_path})
    metadata = pd.DataFrame(rows)
    metadata.drop(columns="source").to_csv(folder / "metadata.csv", index=False)
    metadata.to_csv(folder / "sources.csv", index=False)
    return archive, folder / "metadata.csv"


@pytest.fixture(scope="module")
def snakeclef_archive(ph_snakes, tmp_path_factory):
    return build_snakeclef_archive(ph_snakes, tmp_path_factory.mktemp("snakeclef-archive"))


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            add_bytes(tar, name, data)
    return path


def read_records(output: Path) -> pd.DataFrame:
    return pq.read_table(output).to_pandas()


def check_counts_add_up(report: dict) -> None:
    counts = report["counts"]
    assert counts["members_read"] == counts["directories"] + counts["images_read"] + counts["non_image_members"] + counts["rejected_members"]
    assert counts["images_read"] == counts["rows_written"] + counts["images_without_metadata"] + counts["duplicate_images"]


def test_archive_one_record_per_image(snakeclef_archive, tmp_path):
    archive, metadata_csv = snakeclef_archive
    sources = pd.read_csv(metadata_csv.with_name("sources.csv"))

    report = ingest_archives([archive], metadata_csv, tmp_path / "images", partitions=8)
    records = read_records(tmp_path / "images")

    assert len(records) == len(sources) == 1183
    assert records["image_path"].is_unique
    assert set(records["image_path"]) == set(sources["image_path"])
    expected_ids = dict(zip(sources["image_path"], sources["observation_id"]))
    assert all(records["observation_id"] == records["image_path"].map(expected_ids))
    assert records["class_id"].isna().all()
    assert set(records["code"]) == {"PH"}
    assert report["counts"]["rows_written"] == 1183
    assert report["counts"]["images_read"] == 1183
    assert report["counts"]["metadata_rows_without_image"] == 0
    assert report["counts"]["images_without_metadata"] == 0
    assert report["counts"]["non_image_members"] == 0
    check_counts_add_up(report)
    assert (tmp_path / "images" / "_SUCCESS").is_file()
    assert json.loads((tmp_path / "images" / "_ingest_report.json").read_text()) == report


def test_archive_bytes_and_schema(snakeclef_archive, ph_snakes, tmp_path):
    archive, metadata_csv = snakeclef_archive
    sources = pd.read_csv(metadata_csv.with_name("sources.csv")).set_index("image_path")["source"]
    ingest_archives([archive], metadata_csv, tmp_path / "images", partitions=8)
    table = pq.read_table(tmp_path / "images")
    records = table.to_pandas()

    for row in records.sample(50, random_state=0).itertuples():
        assert row.data == (ph_snakes / sources[row.image_path]).read_bytes(), row.image_path
    assert table.schema.field("observation_id").type == pa.int64()
    assert table.schema.field("class_id").type == pa.int32()
    assert table.schema.field("data").type == pa.binary()
    assert table.schema.names[:6] == ["image_path", "observation_id", "class_id", "binomial_name", "code", "split"]
    assert table.schema.names[-1] == "data"
    assert "endemic" in table.schema.names


def test_archive_partitions_balanced(snakeclef_archive, tmp_path):
    archive, metadata_csv = snakeclef_archive
    report = ingest_archives([archive], metadata_csv, tmp_path / "images", partitions=8)
    parts = sorted((tmp_path / "images").glob("part-*.parquet"))
    rows = [pq.ParquetFile(part).metadata.num_rows for part in parts]

    assert len(parts) == 8
    assert report["partitions_written"] == 8
    assert max(rows) - min(rows) <= report["rows_per_partition"]
    assert sum(rows) == 1183
    assert "partitions_note" not in report


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_archive_plain_and_gzip(ph_snakes, tmp_path, mode):
    archive, metadata_csv = build_snakeclef_archive(ph_snakes, tmp_path / "in", limit=12, mode=mode)
    report = ingest_archives([archive], metadata_csv, tmp_path / "images")
    assert report["counts"]["rows_written"] == 12
    assert report["partitions_written"] == 12
    assert "12 of 200 requested partitions written" in report["partitions_note"]


def test_archive_join_report(tmp_path):
    (tmp_path / "metadata.csv").write_text(
        "observation_id,image_path,class_id,binomial_name\n"
        "1,2023/A_b/1.JPG,10,A b\n"
        "1,2023/A_b/2.jpg,10,A b\n"
        "2,2023/C_d/3.png,20,C d\n"
        "3,2023/C_d/4.jpg,20,C d\n"
        "3,2023/C_d/4.jpg,20,C d\n"
    )
    first = write_tar(tmp_path / "a.tar.gz", [
        ("top/2023/A_b/1.jpg", b"one"),        # case differs from the metadata
        ("top/2023/A_b/2.jpg", b"two"),
        ("top/2023/A_b/9.jpeg", b"nine"),      # no metadata row
        ("top/README.txt", b"notes"),          # not an image
    ])
    second = write_tar(tmp_path / "b.tgz", [
        ("other/2023/A_b/2.jpg", b"two again"),  # already read from the first archive
        ("other/2023/C_d/3.PNG", b"three"),      # case differs, suffix recognised ignoring case
    ])

    report = ingest_archives([first, second], tmp_path / "metadata.csv", tmp_path / "images")
    records = read_records(tmp_path / "images").set_index("image_path")
    counts = report["counts"]

    assert sorted(records.index) == ["2023/A_b/1.JPG", "2023/A_b/2.jpg", "2023/C_d/3.png"]
    assert records.loc["2023/A_b/2.jpg", "data"] == b"two"
    assert records.loc["2023/C_d/3.png", "class_id"] == 20
    assert counts["rows_written"] == 3
    assert counts["images_read"] == 5
    assert counts["images_without_metadata"] == 1
    assert counts["duplicate_images"] == 1
    assert counts["non_image_members"] == 1
    assert counts["matched_ignoring_case"] == 2
    assert counts["metadata_rows_without_image"] == 1
    assert counts["duplicate_metadata_rows"] == 1
    assert report["examples"]["images_without_metadata"] == [{"archive": "a.tar.gz", "member": "top/2023/A_b/9.jpeg"}]
    assert report["examples"]["duplicate_images"][0]["member"] == "other/2023/A_b/2.jpg"
    assert report["examples"]["metadata_rows_without_image"] == ["2023/C_d/4.jpg"]
    assert report["examples"]["duplicate_metadata_rows"] == [{"line": 6, "image_path": "2023/C_d/4.jpg", "observation_id": 3}]
    check_counts_add_up(report)


def test_archive_examples_capped(tmp_path):
    (tmp_path / "metadata.csv").write_text("observation_id,image_path\n1,2023/A_b/1.jpg\n")
    members = [("t/2023/A_b/1.jpg", b"x")] + [(f"t/2023/A_b/{i}.txt", b"x") for i in range(30)]
    report = ingest_archives([write_tar(tmp_path / "a.tar.gz", members)], tmp_path / "metadata.csv", tmp_path / "images")
    assert report["counts"]["non_image_members"] == 30
    assert len(report["examples"]["non_image_members"]) == 20


def test_archive_hostile_members(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "metadata.csv").write_text(
        "observation_id,image_path\n1,2023/A_b/1.jpg\n2,2023/A_b/link.jpg\n3,2023/A_b/hard.jpg\n4,evil.jpg\n5,etc/x.jpg\n"
    )
    archive = tmp_path / "hostile.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_bytes(tar, "top/2023/A_b/1.jpg", b"good")
        add_bytes(tar, "../evil.jpg", b"evil")
        add_bytes(tar, "top/../../evil.jpg", b"evil")
        add_bytes(tar, "/etc/x.jpg", b"evil")
        add_bytes(tar, "top/2023/A_b/link.jpg", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add_bytes(tar, "top/2023/A_b/hard.jpg", b"", type=tarfile.LNKTYPE, linkname="top/2023/A_b/1.jpg")
        add_bytes(tar, "top/2023/A_b/fifo.jpg", b"", type=tarfile.FIFOTYPE)
    before = {p for p in tmp_path.rglob("*")}

    previous = os.getcwd()
    os.chdir(work)
    try:
        report = ingest_archives([archive], tmp_path / "metadata.csv", tmp_path / "out" / "images")
    finally:
        os.chdir(previous)

    created = {p for p in tmp_path.rglob("*")} - before
    assert all(p.is_relative_to(tmp_path / "out") for p in created), created
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["_SUCCESS", "_ingest_report.json", "part-00000.parquet"]
    assert not (tmp_path / "evil.jpg").exists()
    assert list(work.iterdir()) == []
    rejected = {example["member"]: example["reason"] for example in report["examples"]["rejected_members"]}
    assert report["counts"]["rejected_members"] == 6
    assert rejected["../evil.jpg"] == "absolute path or '..' component"
    assert rejected["top/../../evil.jpg"] == "absolute path or '..' component"
    assert rejected["/etc/x.jpg"] == "absolute path or '..' component"
    assert rejected["top/2023/A_b/link.jpg"] == "link to '/etc/passwd'"
    assert rejected["top/2023/A_b/hard.jpg"] == "link to 'top/2023/A_b/1.jpg'"
    assert rejected["top/2023/A_b/fifo.jpg"] == "not a regular file"
    assert list(read_records(tmp_path / "out" / "images")["data"]) == [b"good"]
    assert report["counts"]["metadata_rows_without_image"] == 4
    check_counts_add_up(report)


def test_archive_truncated(snakeclef_archive, tmp_path):
    archive, metadata_csv = snakeclef_archive
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])

    with pytest.raises(ValueError, match=r"truncated\.tar\.gz is truncated or corrupt: reading failed after \d+ members \(\d+\.\d MB"):
        ingest_archives([truncated], metadata_csv, tmp_path / "images")
    assert not (tmp_path / "images").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["truncated.tar.gz"]


def test_archive_corrupt_bytes(tmp_path):
    (tmp_path / "metadata.csv").write_text("observation_id,image_path\n1,a/1.jpg\n")
    (tmp_path / "notes.tar.gz").write_bytes(b"this is not an archive" * 100)
    with pytest.raises(ValueError, match=r"notes\.tar\.gz is truncated or corrupt: reading failed after 0 members"):
        ingest_archives([tmp_path / "notes.tar.gz"], tmp_path / "metadata.csv", tmp_path / "images")
    assert not (tmp_path / "images").exists()


def test_archive_empty(tmp_path):
    (tmp_path / "metadata.csv").write_text("observation_id,image_path\n1,a/1.jpg\n")
    archive = write_tar(tmp_path / "empty.tar.gz", [])
    with pytest.raises(ValueError, match=r"ingest found no image with metadata in archive\(s\) .*empty\.tar\.gz"):
        ingest_archives([archive], tmp_path / "metadata.csv", tmp_path / "images")
    assert not (tmp_path / "images").exists()


def test_metadata_data_column_rejected(tmp_path):
    (tmp_path / "metadata.csv").write_text("observation_id,image_path,data\n1,a/1.jpg,x\n")
    archive = write_tar(tmp_path / "a.tar.gz", [("t/a/1.jpg", b"x")])
    with pytest.raises(ValueError, match="has a column named 'data'"):
        ingest_archives([archive], tmp_path / "metadata.csv", tmp_path / "images")


def test_archive_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="archive not found: .*nothing.tar"):
        ingest_archives([tmp_path / "nothing.tar"], tmp_path / "metadata.csv", tmp_path / "images")


@pytest.mark.parametrize("partitions", [0, -3, 2.5])
def test_ingest_invalid_partitions(synthetic_dataset, tmp_path, partitions):
    with pytest.raises(ValueError, match="partitions must be a positive integer"):
        ingest_folder(synthetic_dataset, tmp_path / "images", partitions=partitions)


def test_folder_ph_snakes(ph_snakes, tmp_path):
    report = ingest_folder(ph_snakes, tmp_path / "images", partitions=5)
    records = read_records(tmp_path / "images")
    index = pd.read_csv(ph_snakes / "index.csv")

    assert list(records["image_path"]) == list(index["image_path"])
    assert list(records["observation_id"]) == list(range(len(index)))
    assert list(records["class_id"]) == list(index["class_id"])
    assert list(records["split"]) == list(index["split"])
    assert records["data"].iloc[7] == (ph_snakes / index["image_path"].iloc[7]).read_bytes()
    assert report["partitions_written"] == 5
    assert report["counts"]["rows_written"] == 1183
    assert report["counts"]["images_found"] == 1183


def test_folder_missing_and_extra(synthetic_dataset, tmp_path):
    index = pd.read_csv(synthetic_dataset / "index.csv")
    removed = index["image_path"].iloc[2]
    (synthetic_dataset / removed).unlink()
    (synthetic_dataset / "extra").mkdir()
    (synthetic_dataset / "extra" / "stray.JPG").write_bytes(b"stray")
    (synthetic_dataset / "notes.txt").write_text("hello")

    report = ingest_folder(synthetic_dataset, tmp_path / "images", partitions=200)
    counts = report["counts"]

    assert counts["rows_written"] == 17
    assert counts["metadata_rows_without_image"] == 1
    assert report["examples"]["metadata_rows_without_image"] == [removed]
    assert counts["images_without_metadata"] == 1
    assert report["examples"]["images_without_metadata"] == ["extra/stray.JPG"]
    assert counts["non_image_files"] == 1
    assert counts["files_found"] == counts["images_found"] + counts["non_image_files"]
    assert report["partitions_written"] == 17
    assert removed not in set(read_records(tmp_path / "images")["image_path"])


def test_folder_unsafe_index_rows(synthetic_dataset, tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"secret")
    with open(synthetic_dataset / "index.csv", "a") as index:
        index.write("../secret.jpg,train,X y,1,0\n")
        index.write(f"{secret},train,X y,1,0\n")
    report = ingest_folder(synthetic_dataset, tmp_path / "images")
    assert report["counts"]["rejected_rows"] == 2
    assert report["counts"]["rows_written"] == 18
    assert b"secret" not in set(read_records(tmp_path / "images")["data"])


def test_ingest_rerun_is_noop(synthetic_dataset, tmp_path):
    first = ingest_folder(synthetic_dataset, tmp_path / "images", partitions=3)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "images").iterdir()}
    second = ingest_folder(synthetic_dataset, tmp_path / "images", partitions=3)
    assert second == first
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "images").iterdir()} == stamps


CRASHING_CHILD = textwrap.dedent(
    """
    import sys, time
    from snakeclef.data import ingest

    flush = ingest.RecordWriter._flush

    def slow_flush(self):
        flush(self)
        time.sleep(0.05)  # slow enough for the parent to kill the run between two parts

    ingest.RecordWriter._flush = slow_flush
    ingest.ingest_archives([sys.argv[1]], sys.argv[2], sys.argv[3], partitions=100)
    """
)


def test_ingest_resumes_after_kill(snakeclef_archive, tmp_path):
    archive, metadata_csv = snakeclef_archive
    output = tmp_path / "crashed" / "images"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CRASHING_CHILD, str(archive), str(metadata_csv), str(output)], env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            if len(list(output.parent.glob(".images.tmp-*/part-*.parquet"))) >= 3:
                break
            time.sleep(0.01)
        assert child.poll() is None, "the ingest finished before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()

    assert not output.exists()
    assert len(list(output.parent.glob(".images.tmp-*"))) == 1

    resumed = ingest_archives([archive], metadata_csv, output, partitions=100)
    uninterrupted = ingest_archives([archive], metadata_csv, tmp_path / "clean" / "images", partitions=100)

    assert list(output.parent.glob(".images.tmp-*")) == []
    assert resumed["counts"] == uninterrupted["counts"]
    resumed_table = pq.read_table(output)
    assert resumed_table.num_rows == 1183
    assert resumed_table.equals(pq.read_table(tmp_path / "clean" / "images"))


@pytest.mark.slow
def test_records_readable_by_spark(spark, synthetic_dataset, tmp_path):
    ingest_folder(synthetic_dataset, tmp_path / "images", partitions=4)
    frame = spark.read.parquet(str(tmp_path / "images"))
    assert frame.count() == 18
    assert frame.rdd.getNumPartitions() >= 1
    assert dict(frame.dtypes)["data"] == "binary"
    assert dict(frame.dtypes)["class_id"] == "int"
    assert sorted(r.class_id for r in frame.select("class_id").distinct().collect()) == [100, 107, 114]


def test_archive_real_metadata(snakeclef_meta, ph_snakes, tmp_path):
    metadata_csv = snakeclef_meta / "SnakeCLEF2023-ValMetadata.csv"
    metadata = pd.read_csv(metadata_csv)
    chosen = metadata.head(300)
    photos = sorted((ph_snakes / "train").rglob("*.jpg"))
    archive = tmp_path / "SnakeCLEF2023-val.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for photo, image_path in zip(photos, chosen["image_path"]):
            tar.add(photo, arcname=f"SnakeCLEF2023-val_images/{image_path}")

    report = ingest_archives([archive], metadata_csv, tmp_path / "images")
    records = read_records(tmp_path / "images").set_index("image_path")
    expected = chosen.set_index("image_path")

    assert report["counts"]["rows_written"] == 300
    assert report["counts"]["metadata_rows_without_image"] == len(metadata) - 300
    assert report["counts"]["matched_ignoring_case"] == 0
    assert sorted(records.index) == sorted(expected.index)
    assert any(path.endswith(".JPG") for path in records.index)
    assert (records["observation_id"] == expected.loc[records.index, "observation_id"]).all()
    assert (records["class_id"] == expected.loc[records.index, "class_id"]).all()
    assert (records["split"] == "val").all()
    assert records.groupby("observation_id").size().max() > 1
    assert records["captive"].dtype == bool


def test_ingest_write_failure_leaves_nothing(synthetic_dataset, tmp_path, monkeypatch):
    from snakeclef.data import ingest

    def failing_writer(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ingest.pq, "ParquetWriter", failing_writer)
    with pytest.raises(RuntimeError, match="writing Parquet under .* failed: No space left on device"):
        ingest_folder(synthetic_dataset, tmp_path / "images", partitions=3)
    assert not (tmp_path / "images").exists()
    assert list(tmp_path.glob(".images.tmp-*")) == []
