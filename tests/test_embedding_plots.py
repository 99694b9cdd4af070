"""Embedding plots: reading the embeddings Parquet, separation scores, UMAP figures and their JSON."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from snakeclef.embedding_plots import knn_accuracy, plot_embeddings, read_embeddings, separation_scores

# Species and images per species; two names come from the default species list.
SPECIES = {
    "Micrurus fulvius": (100, 40),
    "Morelia spilota": (200, 30),
    "Naja naja": (300, 25),
    "Ptyas mucosa": (400, 20),
    "Boiga dendrophila": (500, 10),
}


def embedding_rows(seed: int = 0, *, cls_dim: int = 32, dct_dim: int = 64) -> dict[str, list]:
    """Rows where ``cls`` separates species well and ``dct`` only weakly, plus two error rows."""
    rng = np.random.default_rng(seed)
    rows = {"image_path": [], "binomial_name": [], "class_id": [], "cls": [], "dct": [], "error": []}
    for species_index, (name, (class_id, count)) in enumerate(SPECIES.items()):
        cls_center = rng.normal(scale=4.0, size=cls_dim)
        dct_center = rng.normal(scale=0.4, size=dct_dim)
        for image in range(count):
            rows["image_path"].append(f"{name}/{image}.jpg")
            rows["binomial_name"].append(name)
            rows["class_id"].append(class_id)
            rows["cls"].append((cls_center + rng.normal(size=cls_dim)).astype(np.float32).tolist())
            rows["dct"].append((dct_center + rng.normal(size=dct_dim)).astype(np.float32).tolist())
            rows["error"].append(None)
    for image in range(2):
        rows["image_path"].append(f"broken/{image}.jpg")
        rows["binomial_name"].append("Naja naja")
        rows["class_id"].append(300)
        rows["cls"].append(None)
        rows["dct"].append(None)
        rows["error"].append("cannot identify image file")
    return rows


def write_embeddings(folder, rows: dict[str, list]):
    """Write rows as a Spark-like Parquet folder: two part files and a _SUCCESS marker."""
    schema = pa.schema(
        [
            ("image_path", pa.string()),
            ("binomial_name", pa.string()),
            ("class_id", pa.int32()),
            ("cls", pa.list_(pa.float32())),
            ("dct", pa.list_(pa.float32())),
            ("error", pa.string()),
        ]
    )
    table = pa.table(rows, schema=schema)
    folder.mkdir(parents=True)
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), folder / "part-00000.parquet")
    pq.write_table(table.slice(half), folder / "part-00001.parquet")
    (folder / "_SUCCESS").write_text("")
    (folder / "_embed_report.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def embeddings_folder(tmp_path_factory):
    return write_embeddings(tmp_path_factory.mktemp("embeddings") / "embeddings", embedding_rows())


# UMAP's first fit in a process compiles numba code: about 15-30 s on two shared cores.
umap_slow = pytest.mark.slow


@pytest.fixture(scope="module")
def plotted(embeddings_folder, tmp_path_factory):
    plots_dir = tmp_path_factory.mktemp("plots")
    report = plot_embeddings(embeddings_folder, plots_dir, top_k=3, seed=0)
    return plots_dir, report


def test_read_embeddings_skips_errors(embeddings_folder):
    frame, n_rows, n_skipped = read_embeddings(embeddings_folder)

    assert n_rows == 127
    assert n_skipped == 2
    assert len(frame) == 125
    assert frame["cls"].iloc[0].shape == (32,)
    assert frame["dct"].iloc[0].dtype == np.float32


def test_read_embeddings_missing_column(tmp_path):
    pq.write_table(pa.table({"class_id": [1], "cls": [[0.5, 1.0]]}), tmp_path / "part-0.parquet")

    with pytest.raises(ValueError, match=r"missing column\(s\) \['dct'\]"):
        read_embeddings(tmp_path)


def test_read_embeddings_all_errors(tmp_path):
    rows = embedding_rows()
    keep = [index for index, error in enumerate(rows["error"]) if error]
    write_embeddings(tmp_path / "embeddings", {key: [values[index] for index in keep] for key, values in rows.items()})

    with pytest.raises(ValueError, match=r"no rows with features \(2 rows, 2 with an error\)"):
        read_embeddings(tmp_path / "embeddings")


def test_read_embeddings_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="Embeddings not found"):
        read_embeddings(tmp_path / "nowhere")


def test_read_embeddings_empty_folder(tmp_path):
    (tmp_path / "_SUCCESS").write_text("")

    with pytest.raises(ValueError, match="contains no Parquet files"):
        read_embeddings(tmp_path)


def test_knn_accuracy_separated_clusters():
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(size=(20, 3)), rng.normal(loc=50.0, size=(20, 3))])
    labels = np.array(["a"] * 20 + ["b"] * 20)

    assert knn_accuracy(features, labels) == 1.0


def test_knn_accuracy_shuffled_labels():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 8))
    labels = rng.choice(["a", "b", "c", "d"], size=400)

    assert knn_accuracy(features, labels) < 0.4


def test_knn_accuracy_duplicate_vectors():
    # Every point has an exact duplicate of the other label, so self-exclusion must not drop the duplicate.
    features = np.repeat(np.arange(10, dtype=float)[:, None] * 100, 2, axis=0)
    labels = np.array(["a", "b"] * 10)

    assert knn_accuracy(features, labels, n_neighbors=1) == 0.0


def test_separation_scores_keys():
    rng = np.random.default_rng(1)
    features = np.concatenate([rng.normal(size=(15, 4)), rng.normal(loc=10.0, size=(15, 4))])
    scores = separation_scores(features, np.array([0] * 15 + [1] * 15))

    assert scores["dim"] == 4
    assert scores["knn_accuracy"] == 1.0
    assert scores["silhouette"] > 0.5


@umap_slow
def test_plot_writes_pngs(plotted):
    plots_dir, report = plotted

    assert sorted(path.name for path in plots_dir.iterdir()) == ["separation.json", "umap_species.png", "umap_top3.png"]
    for name in ("umap_species.png", "umap_top3.png"):
        with Image.open(plots_dir / name) as image:
            assert image.format == "PNG"
            assert image.size[0] > 1000


@umap_slow
def test_plot_top_species_group(plotted):
    _, report = plotted
    top = report["groups"]["top3"]

    assert top["species"] == ["Micrurus fulvius", "Morelia spilota", "Naja naja"]
    assert top["points_per_species"] == [40, 30, 25]
    assert top["n_points"] == 95


@umap_slow
def test_plot_species_list_present_only(plotted):
    _, report = plotted

    assert report["groups"]["species"]["species"] == ["Micrurus fulvius", "Morelia spilota"]
    assert "Bitis gabonica" in report["species_missing"]


@umap_slow
def test_plot_cls_separates_better(plotted):
    _, report = plotted
    top = report["groups"]["top3"]

    assert top["cls"]["knn_accuracy"] > 0.95
    assert top["dct"]["knn_accuracy"] < top["cls"]["knn_accuracy"]
    assert top["dct"]["silhouette"] < top["cls"]["silhouette"]


@umap_slow
def test_plot_separation_json(plotted):
    plots_dir, report = plotted
    saved = json.loads((plots_dir / "separation.json").read_text())

    assert saved == report
    assert saved["rows_skipped_with_error"] == 2
    assert saved["seed"] == 0


def test_plot_too_few_species(tmp_path):
    rows = embedding_rows()
    keep = [index for index, name in enumerate(rows["binomial_name"]) if name == "Ptyas mucosa"]
    write_embeddings(tmp_path / "embeddings", {key: [values[index] for index in keep] for key, values in rows.items()})

    report = plot_embeddings(tmp_path / "embeddings", tmp_path / "plots", top_k=3)

    assert report["groups"]["top3"]["skipped"] == "fewer than 2 species present"
    assert sorted(path.name for path in (tmp_path / "plots").iterdir()) == ["separation.json"]


@umap_slow
def test_plot_max_points_per_species(embeddings_folder, tmp_path):
    report = plot_embeddings(embeddings_folder, tmp_path, species=["Naja naja", "Boiga dendrophila"], top_k=2, max_points_per_species=12)

    assert report["groups"]["species"]["points_per_species"] == [12, 10]
    assert report["groups"]["top2"]["n_points"] == 24


def test_plot_top_k_invalid(embeddings_folder, tmp_path):
    with pytest.raises(ValueError, match="top_k must be at least 2"):
        plot_embeddings(embeddings_folder, tmp_path, top_k=1)


def test_read_includes_cls_last4_when_present(tmp_path):
    vector = [0.5, 1.0]
    table = pa.table({
        "binomial_name": ["Naja naja", "Naja naja", "Boiga dendrophila"],
        "class_id": pa.array([300, 300, 10], pa.int32()),
        "cls": [vector, vector, vector],
        "cls_last4": [vector * 4, None, vector * 4],
        "dct": [vector, vector, vector],
    })
    pq.write_table(table, tmp_path / "part-0.parquet")

    frame, n_rows, n_skipped = read_embeddings(tmp_path)

    assert list(frame.columns) == ["species", "cls_last4", "cls", "dct"]
    assert frame["cls_last4"].iloc[0].shape == (8,)
    assert n_rows == 3
    assert n_skipped == 1
