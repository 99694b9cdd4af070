"""Turn the held-out split of the image records into what a competitor receives.

The offline predictor reads a metadata CSV and a folder of image files, as in
the competition. Writing the held-out split in that form lets the pipeline
score exactly the code path that a submission runs.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path, PurePosixPath

import pyarrow.compute as pc
import pyarrow.dataset as ds

from snakeclef import storage

logger = logging.getLogger(__name__)

SPLIT_COLUMNS = ("split", "subset")
LABEL_COLUMNS = ("class_id", "binomial_name", "venomous", "MIVS")


def safe_relative_path(image_path: str) -> PurePosixPath:
    """Return ``image_path`` as a relative path that cannot leave its folder; raise ValueError otherwise."""
    path = PurePosixPath(image_path.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"image_path {image_path!r} is absolute, empty or contains '..'; it cannot be written under the eval folder")
    return path


def _venomous_status(dataset: ds.Dataset):
    """Return ``class_id, venomous`` for every labelled class of the records, or None when they carry no venomous flag."""
    flag = next((name for name in ("venomous", "MIVS") if name in dataset.schema.names), None)
    if flag is None or "class_id" not in dataset.schema.names:
        return None
    table = dataset.to_table(columns=["class_id", flag]).to_pandas().dropna()
    table = table.astype("int64").drop_duplicates("class_id").sort_values("class_id")
    return table.rename(columns={flag: "venomous"})


def write_eval_set(images_path: str | Path, output_dir: str | Path, *, split: str = "val") -> dict:
    """Write ``metadata.csv``, ``ground_truth.csv`` and ``images/`` for the rows whose split is ``split``.

    ``metadata.csv`` has no label columns. ``ground_truth.csv`` has one row
    per image (``observation_id, class_id`` and ``binomial_name`` when known).
    Rows keep the order of the image records. When the records carry a
    venomous flag, ``venomous_status.csv`` lists it for every labelled class.
    ``_SUCCESS`` is written last.
    """
    dataset = ds.dataset(str(images_path), format="parquet", exclude_invalid_files=True)
    names = dataset.schema.names
    split_column = next((name for name in SPLIT_COLUMNS if name in names), None)
    if split_column is None:
        raise ValueError(f"the image records at {images_path} have no split column ({' or '.join(SPLIT_COLUMNS)}), so no rows can be held out for evaluation")

    table = dataset.to_table(filter=pc.field(split_column) == split)
    if table.num_rows == 0:
        present = sorted(set(dataset.to_table(columns=[split_column]).column(0).drop_null().to_pylist()))
        raise ValueError(f"no image records with {split_column} == {split!r} in {images_path}; values present: {present}")

    metadata_columns = [name for name in names if name not in LABEL_COLUMNS and name not in ("data", split_column)]
    truth_columns = [name for name in ("observation_id", "class_id", "binomial_name") if name in names]

    with storage.atomic_path(output_dir) as tmp:
        tmp.mkdir(parents=True)
        image_root = tmp / "images"
        with open(tmp / "metadata.csv", "w", newline="") as meta_file, open(tmp / "ground_truth.csv", "w", newline="") as truth_file:
            meta_writer = csv.writer(meta_file)
            truth_writer = csv.writer(truth_file)
            meta_writer.writerow(metadata_columns)
            truth_writer.writerow(truth_columns)
            for batch in table.to_batches(max_chunksize=256):
                for row in batch.to_pylist():
                    target = image_root / safe_relative_path(row["image_path"])
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(row["data"])
                    meta_writer.writerow([row[name] for name in metadata_columns])
                    truth_writer.writerow([row[name] for name in truth_columns])
        venomous = _venomous_status(dataset)
        if venomous is not None:
            venomous.to_csv(tmp / "venomous_status.csv", index=False)
        (tmp / "_SUCCESS").write_text("")

    n_observations = len(set(table.column("observation_id").to_pylist()))
    logger.info("Eval set: %d images of %d observations (%s == %r) written to %s", table.num_rows, n_observations, split_column, split, output_dir)
    return {"images": table.num_rows, "observations": n_observations, "split_column": split_column, "split": split}
