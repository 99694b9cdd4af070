"""Read and validate SnakeCLEF metadata CSVs and the ``index.csv`` of an image folder.

Both readers return one row per image with at least ``image_path`` (normalised
with :func:`normalise_image_path`, the join key), ``observation_id`` (int64) and
``class_id`` (nullable Int32). Duplicate ``image_path`` rows keep their first
occurrence; the dropped rows are logged and listed in ``df.attrs["duplicate_rows"]``
so the ingest report can count them.
"""

from __future__ import annotations

import logging
import os
import unicodedata
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)

REQUIRED_METADATA_COLUMNS = ("observation_id", "image_path")
MAX_EXAMPLES = 20


def normalise_image_path(path: str) -> str:
    """Normalise an image path for joining: ``/`` separators, no ``./`` or doubled ``/``, Unicode NFC.

    Letter case is kept, because the SnakeCLEF metadata names files exactly as
    they are stored (``.JPG`` and ``.jpg`` both occur).
    """
    text = unicodedata.normalize("NFC", str(path).strip()).replace("\\", "/")
    parts = [part for part in text.split("/") if part not in ("", ".")]
    # A leading "/" stays, so that an absolute path is still rejected as unsafe later.
    return ("/" if text.startswith("/") else "") + "/".join(parts)


def is_unsafe_relative_path(path: str) -> bool:
    """Return True for a path that is absolute or climbs out of its folder (a ``..`` component)."""
    text = str(path).replace("\\", "/")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        return True
    return ".." in text.split("/")


def read_metadata(path: str | os.PathLike, *, require_labels: bool = False) -> pd.DataFrame:
    """Read a SnakeCLEF metadata CSV (one row per image) and validate its columns.

    Requires ``observation_id`` and ``image_path``. ``class_id`` is optional
    unless ``require_labels`` is set; when present it must be an integer or
    empty. A UTF-8 byte order mark is accepted. Without a ``split`` column, a
    ``subset`` column (as in the SnakeCLEF files) is copied into ``split``.
    """
    path = Path(str(path).removeprefix("file://"))
    df = _read_csv(path)
    missing = [column for column in REQUIRED_METADATA_COLUMNS if column not in df.columns]
    if missing:
        raise ValueError(
            f"metadata file {path} is missing the required column(s) {missing}; "
            f"found {list(df.columns)}. A metadata CSV needs {list(REQUIRED_METADATA_COLUMNS)}."
        )
    df["observation_id"] = _integer_column(df, "observation_id", path, nullable=False).astype("int64")
    if "split" not in df.columns and "subset" in df.columns:
        df["split"] = df["subset"]
    return _finish(df, path, require_labels=require_labels)


def read_index(dataset_dir: str | os.PathLike, *, index_name: str = "index.csv") -> pd.DataFrame:
    """Read the ``index.csv`` of an image folder (columns ``image_path`` and optionally ``split``,
    ``binomial_name``, ``class_id``, ``venomous``).

    Without an ``observation_id`` column every image is its own observation and
    ``observation_id`` is the row's 0-based position in the index file.
    """
    path = Path(str(dataset_dir).removeprefix("file://")) / index_name
    if not path.is_file():
        raise FileNotFoundError(f"index file not found: {path}. An image folder needs an {index_name} listing image_path per image.")
    df = _read_csv(path)
    if "image_path" not in df.columns:
        raise ValueError(f"index file {path} is missing the required column 'image_path'; found {list(df.columns)}.")
    if "observation_id" in df.columns:
        df["observation_id"] = _integer_column(df, "observation_id", path, nullable=False).astype("int64")
    else:
        df.insert(1, "observation_id", pd.RangeIndex(len(df), dtype="int64"))
    return _finish(df, path, require_labels=False)


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"metadata file not found: {path}")
    try:
        # utf-8-sig strips a byte order mark, which would otherwise stick to the first column's name.
        df = pd.read_csv(path, encoding="utf-8-sig", dtype={"image_path": str}, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise ValueError(f"metadata file {path} is empty: it needs a header row and one row per image.") from None
    df.columns = [str(column).strip() for column in df.columns]
    if df.empty:
        raise ValueError(f"metadata file {path} has a header but no rows: there is nothing to ingest.")
    return df


def _integer_column(df: pd.DataFrame, column: str, path: Path, *, nullable: bool) -> pd.Series:
    """Convert ``column`` to integers or raise naming the first offending CSV line (header = line 1)."""
    values = df[column]
    numbers = pd.to_numeric(values, errors="coerce")
    invalid = numbers.isna() & values.notna()
    invalid |= numbers.notna() & (numbers != numbers.round())
    if not nullable:
        invalid |= values.isna()
    if invalid.any():
        position = int(invalid.to_numpy().nonzero()[0][0])
        allowed = "an integer or empty" if nullable else "an integer"
        raise ValueError(
            f"metadata file {path}, line {position + 2} (image_path {df['image_path'].iloc[position]!r}): "
            f"{column} must be {allowed}, got {values.iloc[position]!r} ({int(invalid.sum())} such row(s)). "
            f"Fix or remove these rows."
        )
    return numbers


def _finish(df: pd.DataFrame, path: Path, *, require_labels: bool) -> pd.DataFrame:
    empty_path = df["image_path"].isna() | (df["image_path"].astype(str).str.strip() == "")
    if empty_path.any():
        position = int(empty_path.to_numpy().nonzero()[0][0])
        raise ValueError(f"metadata file {path}, line {position + 2}: image_path is empty. Every row must name its image.")
    df["image_path"] = df["image_path"].map(normalise_image_path)

    if "class_id" in df.columns:
        df["class_id"] = _integer_column(df, "class_id", path, nullable=True).astype("Int32")
    elif require_labels:
        raise ValueError(f"metadata file {path} has no class_id column, but labels are required here (training or evaluation).")
    else:
        df["class_id"] = pd.array([pd.NA] * len(df), dtype="Int32")
    if require_labels and df["class_id"].isna().any():
        position = int(df["class_id"].isna().to_numpy().nonzero()[0][0])
        raise ValueError(f"metadata file {path}, line {position + 2}: class_id is empty, but labels are required here.")

    for column in ("binomial_name", "code", "split"):
        if column not in df.columns:
            df[column] = pd.Series([None] * len(df), dtype="object")
    return _drop_duplicate_paths(df, path)


def _drop_duplicate_paths(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    duplicated = df["image_path"].duplicated(keep="first")
    duplicates = [
        {"line": int(position) + 2, "image_path": df["image_path"].iloc[position], "observation_id": int(df["observation_id"].iloc[position])}
        for position in duplicated.to_numpy().nonzero()[0]
    ]
    if duplicates:
        logger.warning(
            "metadata file %s: %d row(s) repeat an earlier image_path and are ignored (first kept), e.g. line %d %r",
            path, len(duplicates), duplicates[0]["line"], duplicates[0]["image_path"],
        )
    df = df.loc[~duplicated].reset_index(drop=True)
    df.attrs["duplicate_rows"] = duplicates
    df.attrs["source"] = str(path)
    logger.info("metadata file %s: %d image rows, %d observations", path, len(df), df["observation_id"].nunique())
    return df

