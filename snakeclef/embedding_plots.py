"""UMAP projections of the [CLS] and DCT embeddings, side by side, with a measured separation score.

For each species group (the ``top_k`` species by image count, and a configured
species list) one PNG shows 2-D UMAP projections of both features coloured by
species. Each panel's title gives two separation scores computed on the
standardised features themselves, not on the 2-D projection:

- ``knn_accuracy``: leave-one-out accuracy of a 5-nearest-neighbour majority vote,
- ``silhouette``: mean silhouette coefficient (Euclidean) of the species labels.

Command line::

    python -m snakeclef.embedding_plots --embeddings runs/ph/embeddings --plots-dir runs/ph/plots
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from snakeclef.storage import atomic_path

logger = logging.getLogger(__name__)

# Default species plot: venomous species beside harmless look-alikes, such as the milk snake
# Lampropeltis triangulum, which mimics the coral snake Micrurus fulvius.
DEFAULT_SPECIES = (
    "Micrurus fulvius",
    "Lampropeltis triangulum",
    "Morelia spilota",
    "Bitis gabonica",
    "Agkistrodon contortrix",
    "Agkistrodon piscivorus",
)
FEATURES = ("cls", "dct")
# Plotted too when the embeddings have it (older runs do not).
OPTIONAL_FEATURES = ("cls_last4",)
FEATURE_TITLES = {"cls_last4": "[CLS] tokens, last 4 blocks", "cls": "[CLS] token", "dct": "DCT of patch tokens"}
SEPARATION_FILE = "separation.json"
KNN_NEIGHBORS = 5
UMAP_NEIGHBORS = 15


def plot_embeddings(
    embeddings_path: str | os.PathLike,
    plots_dir: str | os.PathLike,
    *,
    species: Sequence[str] = DEFAULT_SPECIES,
    top_k: int = 5,
    seed: int = 0,
    max_points_per_species: int | None = None,
) -> dict:
    """Plot UMAP projections of ``cls``, ``dct`` (and ``cls_last4`` when present) for the top-k species (ties by name) and a species list; return the scores.

    Writes ``umap_top<k>.png``, ``umap_species.png`` (when at least two of
    ``species`` are present) and ``separation.json`` (last) into ``plots_dir``.
    Rows with an ``error`` are skipped and counted.
    """
    if top_k < 2:
        raise ValueError(f"top_k must be at least 2 to compare species, got {top_k}.")
    if max_points_per_species is not None and max_points_per_species < 2:
        raise ValueError(f"max_points_per_species must be None or at least 2, got {max_points_per_species}.")
    started = time.perf_counter()
    plots_dir = Path(plots_dir)

    embeddings, n_rows, n_skipped = read_embeddings(embeddings_path)
    counts = embeddings["species"].value_counts()
    top_species = counts.sort_index().sort_values(ascending=False, kind="stable").index[:top_k].tolist()
    listed_species = [name for name in species if name in counts.index]
    missing_species = [name for name in species if name not in counts.index]
    if missing_species:
        logger.info("Species not in the embeddings, left out of the species plot: %s", ", ".join(missing_species))

    groups = {f"top{top_k}": top_species, "species": listed_species}
    results = {}
    plots_dir.mkdir(parents=True, exist_ok=True)
    for group_name, group_species in groups.items():
        if len(group_species) < 2:
            logger.warning("Skipped the %r plot: %d species present, at least 2 needed", group_name, len(group_species))
            results[group_name] = {"species": group_species, "skipped": "fewer than 2 species present"}
            continue
        subset = _sample_species(embeddings, group_species, max_points_per_species=max_points_per_species, seed=seed)
        results[group_name] = plot_species_group(subset, plots_dir / f"umap_{group_name}.png", title=group_name, seed=seed)

    report = {
        "embeddings": str(embeddings_path),
        "rows": n_rows,
        "rows_skipped_with_error": n_skipped,
        "species_requested": list(species),
        "species_missing": missing_species,
        "seed": seed,
        "knn_neighbors": KNN_NEIGHBORS,
        "groups": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    with atomic_path(plots_dir / SEPARATION_FILE) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("Wrote embedding plots for %d groups to %s in %.1f s", len(results), plots_dir, report["seconds"])
    return report


def read_embeddings(embeddings_path: str | os.PathLike) -> tuple[pd.DataFrame, int, int]:
    """Read ``species``, ``cls`` and ``dct`` of rows without an error from an embeddings Parquet folder or file.

    Returns the frame (features as ``(dim,)`` float32 arrays), the number of rows
    read and the number skipped because of an error or missing features.
    """
    path = Path(embeddings_path)
    if not path.exists():
        raise FileNotFoundError(f"Embeddings not found: {str(path)!r}. Run the embedding stage first or check the path.")
    dataset = ds.dataset(path, format="parquet")  # Skips files starting with "_" or ".", such as _SUCCESS.
    if not dataset.files:
        raise ValueError(f"Embeddings folder {str(path)!r} contains no Parquet files. Run the embedding stage first.")
    missing = [name for name in ("class_id", *FEATURES) if name not in dataset.schema.names]
    if missing:
        raise ValueError(
            f"Embeddings at {str(path)!r} are missing column(s) {missing}; they have {dataset.schema.names}. "
            "Expected the embedding stage's output with class_id, cls and dct."
        )
    features = [name for name in (*OPTIONAL_FEATURES, *FEATURES) if name in dataset.schema.names]
    columns = [name for name in ("binomial_name", "class_id", "error", *features) if name in dataset.schema.names]
    table = dataset.to_table(columns=columns)

    usable = pc.is_valid(table[features[0]])
    for feature in features[1:]:
        usable = pc.and_(usable, pc.is_valid(table[feature]))
    if "error" in table.column_names:
        usable = pc.and_(usable, pc.is_null(table["error"]))
    n_rows = table.num_rows
    table = table.filter(usable)
    n_skipped = n_rows - table.num_rows
    if n_skipped:
        logger.info("Skipped %d of %d embedding rows with an error or no features", n_skipped, n_rows)
    if table.num_rows == 0:
        raise ValueError(f"Embeddings at {str(path)!r} have no rows with features ({n_rows} rows, {n_skipped} with an error).")

    frame = pd.DataFrame({"species": _species_labels(table)})
    for feature in features:
        frame[feature] = list(_feature_matrix(table[feature], name=feature))
    return frame, n_rows, n_skipped


def plot_species_group(subset: pd.DataFrame, png_path: Path, *, title: str, seed: int) -> dict:
    """Project each feature of ``subset`` to 2-D with UMAP, plot them side by side and return their scores."""
    labels = subset["species"].to_numpy()
    species_order = subset["species"].value_counts().sort_index().sort_values(ascending=False, kind="stable").index.tolist()
    features_present = [name for name in (*OPTIONAL_FEATURES, *FEATURES) if name in subset.columns]
    figure = Figure(figsize=(7 * len(features_present), 6.5))
    scores = {}

    for position, feature in enumerate(features_present, start=1):
        features = StandardScaler().fit_transform(np.stack(subset[feature].to_numpy()))
        scores[feature] = separation_scores(features, labels)
        started = time.perf_counter()
        projection = project_umap(features, seed=seed)
        scores[feature]["umap_seconds"] = round(time.perf_counter() - started, 1)

        axes = figure.add_subplot(1, len(features_present), position)
        _scatter_species(axes, projection, labels, species_order)
        axes.set_title(
            f"{FEATURE_TITLES[feature]} ({features.shape[1]}-d)\n"
            f"{KNN_NEIGHBORS}-NN accuracy {scores[feature]['knn_accuracy']:.3f}   "
            f"silhouette {scores[feature]['silhouette']:.3f}",
            fontsize=11,
        )

    handles, names = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=min(len(names), 5), fontsize=9, markerscale=2, frameon=False)
    figure.suptitle(f"UMAP of {len(subset)} images, {len(species_order)} species ({title})", fontsize=12)
    figure.subplots_adjust(bottom=0.1 + 0.035 * ((len(names) - 1) // 5))
    with atomic_path(png_path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    logger.info("Wrote %s: %s", png_path, scores)

    return {
        "species": species_order,
        "points_per_species": subset["species"].value_counts().reindex(species_order).astype(int).tolist(),
        "n_points": len(subset),
        "plot": png_path.name,
        **scores,
    }


def separation_scores(features: np.ndarray, labels: np.ndarray) -> dict:
    """Score how well species separate in ``features`` (n, dim): leave-one-out k-NN accuracy and silhouette."""
    return {
        "knn_accuracy": round(knn_accuracy(features, labels, n_neighbors=KNN_NEIGHBORS), 4),
        "silhouette": round(float(silhouette_score(features, labels, metric="euclidean")), 4),
        "dim": int(features.shape[1]),
    }


def knn_accuracy(features: np.ndarray, labels: np.ndarray, *, n_neighbors: int = KNN_NEIGHBORS) -> float:
    """Leave-one-out accuracy of a k-nearest-neighbour majority vote; a tie goes to the nearer neighbour's label."""
    n_neighbors = min(n_neighbors, len(features) - 1)
    index = NearestNeighbors(n_neighbors=n_neighbors + 1).fit(features)
    _, neighbors = index.kneighbors(features)

    correct = 0
    for point, row in enumerate(neighbors):
        # Drop the point itself; with duplicate vectors it may not come first.
        others = [neighbor for neighbor in row if neighbor != point][:n_neighbors]
        votes: dict = {}
        for label in labels[others]:
            votes[label] = votes.get(label, 0) + 1
        # max() returns the first of equal counts, and dicts keep insertion order: nearest first.
        winner = max(votes, key=votes.get)
        correct += winner == labels[point]
    return correct / len(features)


def project_umap(features: np.ndarray, *, seed: int) -> np.ndarray:
    """Project ``features`` (n, dim) to (n, 2) with UMAP; a fixed seed makes it reproducible and single-threaded."""
    import umap  # Imported here: loading umap and numba takes seconds.

    n_neighbors = min(UMAP_NEIGHBORS, len(features) - 1)
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=0.1, random_state=seed, n_jobs=1)
    return reducer.fit_transform(features)


def _scatter_species(axes: Axes, projection: np.ndarray, labels: np.ndarray, species_order: list[str]) -> None:
    palette = matplotlib.colormaps["tab10" if len(species_order) <= 10 else "tab20"]
    for index, name in enumerate(species_order):
        mask = labels == name
        axes.scatter(projection[mask, 0], projection[mask, 1], s=8, alpha=0.75, color=palette(index % palette.N), label=f"{name} ({mask.sum()})")
    axes.set_xticks([])
    axes.set_yticks([])


def _sample_species(embeddings: pd.DataFrame, species: list[str], *, max_points_per_species: int | None, seed: int) -> pd.DataFrame:
    subset = embeddings[embeddings["species"].isin(species)]
    if max_points_per_species is None:
        return subset.reset_index(drop=True)
    sampled = [
        group.sample(n=min(len(group), max_points_per_species), random_state=seed)
        for _, group in subset.groupby("species", sort=True)
    ]
    return pd.concat(sampled, ignore_index=True)


def _species_labels(table: pa.Table) -> list[str]:
    """Label rows by binomial name, or by ``class <id>`` where the name is missing."""
    class_ids = table["class_id"].to_pylist()
    names = table["binomial_name"].to_pylist() if "binomial_name" in table.column_names else [None] * len(class_ids)
    return [name if name else f"class {class_id}" for name, class_id in zip(names, class_ids)]


def _feature_matrix(column: pa.ChunkedArray, *, name: str) -> np.ndarray:
    """Convert a list<float> column of equal-length, non-null lists to a float32 (n, dim) matrix."""
    array = column.combine_chunks()
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    if lengths.size and (lengths != lengths[0]).any():
        raise ValueError(f"Column {name!r} has vectors of different lengths {sorted(set(lengths.tolist()))}; expected one length.")
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return values.reshape(len(array), -1)


def main(argv: list[str] | None = None) -> int:
    """Write UMAP plots and separation scores of an embeddings folder from the command line."""
    parser = argparse.ArgumentParser(prog="python -m snakeclef.embedding_plots", description=__doc__.splitlines()[0])
    parser.add_argument("--embeddings", required=True, help="Embeddings Parquet folder (the embedding stage's output).")
    parser.add_argument("--plots-dir", required=True, help="Folder for the PNGs and separation.json.")
    parser.add_argument("--species", nargs="+", default=list(DEFAULT_SPECIES), help="Binomial names for the species plot.")
    parser.add_argument("--top-k", type=int, default=5, help="Number of most frequent species in the top-k plot (default 5).")
    parser.add_argument("--seed", type=int, default=0, help="UMAP random seed (default 0).")
    parser.add_argument("--max-points-per-species", type=int, help="Sample at most this many images per species.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    report = plot_embeddings(
        args.embeddings, args.plots_dir, species=args.species, top_k=args.top_k, seed=args.seed,
        max_points_per_species=args.max_points_per_species,
    )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
