"""Speed of gene mapping: match_gene_ids over many identifiers and map_genes over a large sparse matrix.

    python -P bench/bench_genes.py [--cells 50000] [--genes 20000] [--density 0.01]

(`-P`: do not put bench/ first on sys.path, where a script named like a standard module would shadow it.)

Prints seconds per step. Numbers depend on the machine; run on a quiet one.
"""
import argparse
import resource
import time
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfoundation.genes import Vocab, gene_table, map_genes, match_gene_ids


def mixed_ids(n_genes: int, seed: int) -> list[str]:
    "Identifiers of real genes in mixed styles (symbol, lower case, Ensembl+version, Entrez), some junk."
    rng = np.random.default_rng(seed)
    table = gene_table()
    table = table[table["ensembl_ids"] != ""].sample(n_genes, random_state=seed)
    style = rng.integers(0, 5, n_genes)
    ensembl = table["ensembl_ids"].str.split(";").str[0] + ".7"
    ids = np.select([style == 0, style == 1, style == 2, style == 3],
                    [table["token"], table["token"].str.lower(), ensembl, table["entrez_id"].astype(str)],
                    default=pd.Series([f"junk{i}" for i in range(n_genes)], index=table.index))
    return list(ids)


def random_counts(n_cells: int, n_genes: int, density: float, seed: int) -> sp.csr_matrix:
    "Random CSR counts with about `density` non-zeros per row (no dense intermediate)."
    rng = np.random.default_rng(seed)
    per_row = max(1, int(n_genes * density))
    indices = np.sort(rng.integers(0, n_genes, (n_cells, per_row)), axis=1).ravel()
    data = rng.integers(1, 20, n_cells * per_row).astype(np.float32)
    X = sp.csr_matrix((data, indices, np.arange(n_cells + 1) * per_row), shape=(n_cells, n_genes))
    X.sum_duplicates()
    return X


def peak_rss_gb() -> float:
    "Peak resident memory of this process so far (Linux: ru_maxrss is in kB)."
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main(n_cells: int, n_genes: int, density: float, seed: int = 0):
    t0 = time.perf_counter(); gene_table(); from scfoundation.genes import _lookups; _lookups()
    print(f"load table + build lookups (once per process): {time.perf_counter() - t0:.2f} s")
    ids = mixed_ids(n_genes, seed)
    t0 = time.perf_counter(); matched = match_gene_ids(ids)
    print(f"match_gene_ids, {n_genes} mixed ids: {time.perf_counter() - t0:.3f} s "
          f"({(matched['match'] != 'unmapped').mean():.1%} mapped)")
    X = random_counts(n_cells, n_genes, density, seed)
    print(f"peak memory before mapping: {peak_rss_gb():.2f} GB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = ad.AnnData(X=X, var=pd.DataFrame(index=pd.Index(ids).astype(str)))
        t0 = time.perf_counter()
        mapped = map_genes(adata)
    seconds = time.perf_counter() - t0
    print(f"map_genes, {n_cells} cells x {n_genes} genes, {X.nnz / 1e6:.1f}M non-zeros: {seconds:.2f} s "
          f"({X.nnz / seconds / 1e6:.0f}M nnz/s) -> {mapped.n_vars} genes; peak memory {peak_rss_gb():.2f} GB")
    t0 = time.perf_counter(); vocab = Vocab.from_adata(mapped, min_cells=5)
    print(f"Vocab.from_adata: {time.perf_counter() - t0:.2f} s ({len(vocab.genes)} genes)")
    t0 = time.perf_counter(); vocab.ids(mapped.var_names, unknown="ignore")
    print(f"Vocab.ids over {mapped.n_vars} names: {(time.perf_counter() - t0) * 1e3:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=50_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--density", type=float, default=0.01)
    args = parser.parse_args()
    main(args.cells, args.genes, args.density)
