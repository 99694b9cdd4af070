"""Reading and validating metadata CSVs and folder index files."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from snakeclef.data.metadata import is_unsafe_relative_path, normalise_image_path, read_index, read_metadata

HEADER = "observation_id,captive,endemic,binomial_name,code,image_path,class_id,subset\n"


def write(path, text, *, bom=False):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2023/Genus_species/1.jpg", "2023/Genus_species/1.jpg"),
        ("./2023//Genus_species/1.JPG", "2023/Genus_species/1.JPG"),
        ("2023\\Genus_species\\1.jpg", "2023/Genus_species/1.jpg"),
        (" 2023/a/1.jpg ", "2023/a/1.jpg"),
        ("/etc//x.jpg", "/etc/x.jpg"),
        ("2023/Cafe\u0301/1.jpg", "2023/Caf\u00e9/1.jpg"),
    ],
)
def test_normalise_image_path(raw, expected):
    assert normalise_image_path(raw) == expected


@pytest.mark.parametrize(("path", "unsafe"), [("a/b.jpg", False), ("../b.jpg", True), ("a/../../b.jpg", True), ("/etc/x.jpg", True), ("C:/x.jpg", True), ("a..b/c.jpg", False)])
def test_unsafe_relative_path(path, unsafe):
    assert is_unsafe_relative_path(path) is unsafe


def test_metadata_real_schema(snakeclef_meta):
    df = read_metadata(snakeclef_meta / "SnakeCLEF2023-ValMetadata.csv", require_labels=True)
    assert len(df) == 14117
    assert df["observation_id"].nunique() == 7816
    assert df["observation_id"].dtype == "int64"
    assert str(df["class_id"].dtype) == "Int32"
    assert set(df["split"]) == {"val"}
    assert df["image_path"].str.endswith(".JPG").any()
    assert df.attrs["duplicate_rows"] == []


def test_metadata_bom(tmp_path):
    path = write(tmp_path / "m.csv", HEADER + "1,False,False,A b,US,2023/A_b/1.jpg,5,test\n", bom=True)
    df = read_metadata(path)
    assert list(df["observation_id"]) == [1]
    assert df["class_id"].iloc[0] == 5


def test_metadata_without_labels(tmp_path):
    path = write(tmp_path / "m.csv", "observation_id,image_path,code\n7,2023/A_b/1.jpg,PH\n7,2023/A_b/2.jpg,PH\n")
    df = read_metadata(path)
    assert df["class_id"].isna().all()
    assert df["binomial_name"].isna().all()
    with pytest.raises(ValueError, match="has no class_id column, but labels are required"):
        read_metadata(path, require_labels=True)


def test_metadata_missing_column(tmp_path):
    path = write(tmp_path / "m.csv", "observation_id,path\n1,a.jpg\n")
    with pytest.raises(ValueError, match=r"m\.csv is missing the required column\(s\) \['image_path'\]"):
        read_metadata(path)


def test_metadata_non_numeric_class_id(tmp_path):
    path = write(tmp_path / "m.csv", "observation_id,image_path,class_id\n1,a/1.jpg,3\n2,a/2.jpg,snake\n")
    with pytest.raises(ValueError, match=r"line 3 \(image_path 'a/2.jpg'\): class_id must be an integer or empty, got 'snake'"):
        read_metadata(path)


def test_metadata_non_numeric_observation_id(tmp_path):
    path = write(tmp_path / "m.csv", "observation_id,image_path\n1,a/1.jpg\nx7,a/2.jpg\n")
    with pytest.raises(ValueError, match="line 3 .*observation_id must be an integer, got 'x7'"):
        read_metadata(path)


def test_metadata_duplicates_reported(tmp_path, caplog):
    rows = "observation_id,image_path,class_id\n1,a/1.jpg,3\n2,a/2.jpg,3\n1,./a/1.jpg,3\n"
    path = write(tmp_path / "m.csv", rows)
    with caplog.at_level(logging.WARNING):
        df = read_metadata(path)
    assert list(df["image_path"]) == ["a/1.jpg", "a/2.jpg"]
    assert df.attrs["duplicate_rows"] == [{"line": 4, "image_path": "a/1.jpg", "observation_id": 1}]
    assert "1 row(s) repeat an earlier image_path" in caplog.text


@pytest.mark.parametrize(("text", "message"), [("", "is empty"), ("observation_id,image_path\n", "has a header but no rows")])
def test_metadata_empty(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        read_metadata(write(tmp_path / "m.csv", text))


def test_metadata_empty_image_path(tmp_path):
    path = write(tmp_path / "m.csv", "observation_id,image_path\n1,a/1.jpg\n2,\n")
    with pytest.raises(ValueError, match="line 3: image_path is empty"):
        read_metadata(path)


def test_metadata_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata file not found"):
        read_metadata(tmp_path / "missing.csv")


def test_index_observation_ids(ph_snakes):
    df = read_index(ph_snakes)
    index = pd.read_csv(ph_snakes / "index.csv")
    assert len(df) == len(index) == 1183
    assert list(df["observation_id"]) == list(range(1183))
    assert list(df["image_path"]) == list(index["image_path"])
    assert set(df["split"]) == {"train", "val"}
    assert str(df["class_id"].dtype) == "Int32"


def test_index_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="index file not found"):
        read_index(tmp_path)
