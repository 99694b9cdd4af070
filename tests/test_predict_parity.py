"""The offline predictor and the Spark embedding stage give the same per-image predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest

from snakeclef.data.ingest import ingest_folder
from snakeclef.embed import embed_images
from snakeclef.models.classifier import load_classifier
from snakeclef.predict import predict_submission
from test_predict_end_to_end import write_model_folder


@pytest.mark.slow
def test_spark_and_offline_agree(tmp_path, spark, synthetic_dataset, tiny_backbone):
    model_dir = write_model_folder(tmp_path / "model", tiny_backbone, seed=3)
    (synthetic_dataset / "val" / "unreadable.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with open(synthetic_dataset / "index.csv", "a") as index:
        index.write('"val/unreadable.jpg",val,Genus species0,100,0\n')

    # Spark path: image records, then embeddings, then the classifier on the stored [CLS] features.
    ingest_folder(synthetic_dataset, tmp_path / "images", partitions=2)
    embed_images(spark, str(tmp_path / "images"), str(tmp_path / "embeddings"), backbone=str(tiny_backbone), device="cpu")
    embeddings = ds.dataset(tmp_path / "embeddings", format="parquet").to_table(
        columns=["observation_id", "cls", "error"]
    ).to_pandas().sort_values("observation_id")
    classifier = load_classifier(model_dir)
    ok = embeddings["error"].isna().to_numpy()
    features = np.stack(embeddings.loc[ok, "cls"].to_list()).astype(np.float32)
    spark_class_ids = classifier.predict_class_ids(features)

    # Offline path: each index row is its own observation, numbered by row as the ingest stage numbers it.
    # The stored features are of the images as they are, so the mirror-image pass is off here.
    output = tmp_path / "submission.csv"
    summary = predict_submission(
        synthetic_dataset / "index.csv", synthetic_dataset, model_dir, output, device="cpu", batch_size=4, flip_tta=False, progress=False
    )
    offline = pd.read_csv(output).set_index("observation_id")["class_id"]

    assert summary["failures"] == 1
    assert (~ok).sum() == 1
    assert len(offline) == len(embeddings)
    np.testing.assert_array_equal(offline.loc[embeddings.loc[ok, "observation_id"]].to_numpy(), spark_class_ids)
