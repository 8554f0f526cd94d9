"""Speed of the embedding scores and the annotation baseline on synthetic data of growing size.

    python -P bench/bench_evaluate.py [--cells 5000 20000] [--genes 2000] [--types 12] [--threads 2]

Prints seconds per step (PCA baseline, Leiden search, silhouette, kNN accuracy, logistic
regression) for each size. Numbers depend on the machine; run on a quiet one.
"""
import sys
from pathlib import Path

sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import os
import time

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def synthetic_counts(n_cells: int, n_genes: int, n_types: int, seed: int = 0) -> ad.AnnData:
    "Poisson counts, ~5% non-zero, where each type over-expresses its own 50 genes; labels in obs['cell_type']."
    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, n_cells)
    nnz_per_cell = int(0.05 * n_genes)
    rows = np.repeat(np.arange(n_cells), nnz_per_cell)
    cols = rng.integers(0, n_genes, n_cells * nnz_per_cell)
    marker = (types[rows] * 50 + rng.integers(0, 50, len(rows))) % n_genes
    cols = np.where(rng.random(len(rows)) < 0.3, marker, cols)
    values = rng.poisson(2.0, len(rows)).astype(np.float32) + 1
    counts = sp.csr_matrix((values, (rows, cols)), shape=(n_cells, n_genes))
    counts.sum_duplicates()
    obs = pd.DataFrame({"cell_type": pd.Categorical([f"type{t}" for t in types])}, index=[f"c{i}" for i in range(n_cells)])
    return ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))


def timed(label: str, function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    print(f"  {label:<28} {time.perf_counter() - start:8.2f} s", flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--types", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from scfoundation.annotate import logistic_baseline, split_cells
    from scfoundation.evaluate import get_labels, knn_accuracy, label_silhouette, leiden_clusters, pca_baseline
    for n_cells in args.cells:
        adata = synthetic_counts(n_cells, args.genes, args.types)
        print(f"{n_cells:,} cells × {args.genes:,} genes, {args.types} types, {adata.X.nnz:,} non-zeros")
        embedding = timed("pca_baseline (500 HVGs, 50)", pca_baseline, adata, n_hvg=500, n_comps=50)
        labels = get_labels(adata, "cell_type")
        clusters, resolution = timed("leiden_clusters (sweep of 20)", leiden_clusters, embedding, labels)
        print(f"  {'':<28} {len(np.unique(clusters))} clusters at resolution {resolution:.1f}")
        timed("label_silhouette", label_silhouette, embedding, labels)
        accuracy = timed("knn_accuracy", knn_accuracy, embedding, labels)
        split_cells(adata)
        timed("logistic_baseline", logistic_baseline, adata, n_hvg=500)
        print(f"  {'':<28} kNN accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
