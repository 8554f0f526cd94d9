import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def typed_cells():
    """A maker of labelled counts: `typed_cells(n_types, per_type, n_genes, seed, high, gene_prefix)` gives Poisson counts
    (rate 1) in which each cell type reaches rate `high` on its own block of genes; labels in obs['cell_type']."""
    def make(n_types=4, per_type=30, n_genes=60, seed=0, high=8.0, gene_prefix="g"):
        block = n_genes // n_types
        own_block = np.kron(np.eye(n_types), np.ones((per_type, block)))                  # cells × (n_types · block)
        rates = 1.0 + (high - 1.0) * np.pad(own_block, ((0, 0), (0, n_genes - own_block.shape[1])))
        counts = np.random.default_rng(seed).poisson(rates).astype(np.float32)
        names = np.repeat([f"type{t}" for t in range(n_types)], per_type)
        obs = pd.DataFrame({"cell_type": pd.Categorical(names)}, index=[f"c{i}" for i in range(len(names))])
        return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"{gene_prefix}{i}" for i in range(n_genes)]))
    return make
