"""The data chapter's API: reading every supported format, finding/recovering counts, QC, bad input."""
import gzip

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from scfoundation.data import (DataError, describe_values, filter_cells, load_pbmc68k, prepare_counts,
                               qc_metrics, read_anndata, sum_duplicate_genes)

GENES = ["CD3E", "MS4A1", "LYZ", "NKG7"]


@pytest.fixture
def counts():
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(2.0, size=(30, 4)).astype(np.float32) + np.eye(30, 4, dtype=np.float32))
    return ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(30)]), var=pd.DataFrame(index=GENES))


def write_10x_mtx(folder, adata):
    folder.mkdir()
    scipy.io.mmwrite(str(folder / "matrix.mtx"), sp.csr_matrix(adata.X).T.astype(np.int64))
    for name in ["matrix.mtx"]:
        data = (folder / name).read_bytes(); (folder / name).unlink()
        (folder / (name + ".gz")).write_bytes(gzip.compress(data))
    with gzip.open(folder / "features.tsv.gz", "wt") as f:
        for i, g in enumerate(adata.var_names): f.write(f"ENSG{i:011d}\t{g}\tGene Expression\n")
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as f:
        for b in adata.obs_names: f.write(b + "\n")


def write_10x_h5(path, adata):
    X = sp.csc_matrix(sp.csr_matrix(adata.X).T.astype(np.int32))  # genes × cells, stored by cell
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = X.data, X.indices, X.indptr
        m["shape"] = np.array(X.shape, dtype=np.int32)
        m["barcodes"] = np.array(adata.obs_names, dtype="S")
        feats = m.create_group("features")
        feats["id"] = np.array([f"ENSG{i:011d}" for i in range(adata.n_vars)], dtype="S")
        feats["name"] = np.array(adata.var_names, dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * adata.n_vars, dtype="S")
        feats["genome"] = np.array(["GRCh38"] * adata.n_vars, dtype="S")
        feats["_all_tag_keys"] = np.array([b"genome"])


def test_reads_every_format(tmp_path, counts):
    counts.write_h5ad(tmp_path / "a.h5ad")
    write_10x_mtx(tmp_path / "tenx", counts)
    write_10x_h5(tmp_path / "tenx.h5", counts)
    for source in [counts, tmp_path / "a.h5ad", tmp_path / "tenx", tmp_path / "tenx.h5"]:
        got = prepare_counts(read_anndata(source))
        np.testing.assert_array_equal(got.X.toarray(), counts.X.toarray())
        assert list(got.var_names) == GENES and sp.isspmatrix_csr(got.X) and got.X.dtype == np.float32
    backed = read_anndata(tmp_path / "a.h5ad", backed=True)
    assert backed.isbacked
    np.testing.assert_array_equal(prepare_counts(backed).X.toarray(), counts.X.toarray())


def test_dense_backed_h5ad_is_read_in_chunks(tmp_path, counts):
    dense = counts.copy(); dense.X = dense.X.toarray()
    dense.write_h5ad(tmp_path / "dense.h5ad")
    got = prepare_counts(read_anndata(tmp_path / "dense.h5ad", backed=True))
    assert sp.isspmatrix_csr(got.X)
    np.testing.assert_array_equal(got.X.toarray(), counts.X.toarray())


def test_recovers_counts_from_log1p_and_leaves_input(counts):
    lognorm = counts.copy()
    X = lognorm.X.toarray(); lognorm.X = sp.csr_matrix(np.log1p(X / X.sum(1, keepdims=True) * 1e4))
    before = lognorm.X.copy()
    got = prepare_counts(lognorm)
    assert got.uns["scf_counts"]["recovered"]
    # integers, proportional to the originals in every cell, and equal where a cell has a single count
    recovered = got.X.toarray()
    assert np.all(recovered == np.round(recovered))
    ratio = recovered.sum(1) / X.sum(1)
    np.testing.assert_allclose(recovered, X * ratio[:, None], rtol=1e-6)
    has_one = (X == 1).any(1)
    assert has_one.sum() > 5 and (~has_one).sum() > 0
    np.testing.assert_array_equal(recovered[has_one], X[has_one])
    assert (lognorm.X != before).nnz == 0


def test_finds_counts_in_layer_and_raw(counts):
    a = counts.copy(); a.layers["counts"] = a.X.copy(); a.X = sp.csr_matrix(np.log1p(a.X.toarray()) * 1.37)
    assert prepare_counts(a).uns["scf_counts"]["source"] == "layers['counts']"
    b = counts.copy(); b.raw = b; b.X = sp.csr_matrix(b.X.toarray() - 1.5)
    assert prepare_counts(b).uns["scf_counts"]["source"] == "raw.X"
    with pytest.raises(DataError, match="layer='missing' not found"): prepare_counts(a, layer="missing")
    with pytest.raises(DataError, match="adata.raw is None"): prepare_counts(counts, use_raw=True)


def test_pbmc68k_default():
    pbmc = load_pbmc68k()
    assert pbmc.shape == (700, 765) and pbmc.obs.cell_type.nunique() == 10
    assert np.all(pbmc.X.data == np.round(pbmc.X.data)) and pbmc.X.data.min() == 1


@pytest.mark.parametrize("kind,make,message", [
    ("log", lambda X: np.log1p(X / X.sum(1, keepdims=True) * 1e4 * np.random.default_rng(1).uniform(0.9, 1.1, X.shape)), "log-normalised"),
    ("tpm", lambda X: X / X.sum(1, keepdims=True) * 1e6 + 0.001 * (X > 0), "TPM"),
    ("fpkm", lambda X: X * 37.3, "FPKM"),
    ("scaled", lambda X: (X - X.mean(0)) / X.std(0), "scaled"),
])
def test_normalised_input_is_named(counts, kind, make, message):
    X = counts.X.toarray().astype(np.float64)
    bad = ad.AnnData(make(X).astype(np.float32), var=counts.var)
    with pytest.raises(DataError, match=message) as err:
        prepare_counts(bad)
    assert "layer=" in str(err.value)


@pytest.mark.parametrize("values,message", [
    ([[1, np.nan, 2], [0, 1, 1]], "NaN"),
    ([[1, np.inf, 2], [0, 1, 1]], "NaN"),
    ([[1, -1, 2], [0, 1, 1]], "negative"),
    (np.zeros((0, 3)), "empty"),
    (np.zeros((2, 3)), "all zeros"),
    ([[1, 2, 3], [0, 0, 0]], "zero counts"),
])
def test_bad_values(values, message):
    adata = ad.AnnData(np.asarray(values, dtype=np.float32), var=pd.DataFrame(index=["A", "B", "C"]))
    before = adata.X.copy()
    with pytest.raises(DataError, match=message): prepare_counts(adata)
    np.testing.assert_array_equal(adata.X, before)


def test_nan_in_named_layer_is_reported():
    adata = ad.AnnData(np.ones((2, 3), dtype=np.float32), var=pd.DataFrame(index=["A", "B", "C"]))
    adata.layers["counts"] = np.array([[1, np.nan, 2], [0, 1, 1]], dtype=np.float32)
    with pytest.raises(DataError, match="NaN/Inf values in 1 cells"): prepare_counts(adata, layer="counts")


def test_duplicated_gene_names():
    adata = ad.AnnData(np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32), var=pd.DataFrame(index=["A", "B", "A"]))
    with pytest.raises(DataError, match="duplicate_genes='sum'"): prepare_counts(adata)
    summed = prepare_counts(adata, duplicate_genes="sum")
    np.testing.assert_array_equal(summed.X.toarray(), [[4, 2], [10, 5]])
    assert list(adata.var_names) == ["A", "B", "A"]
    X, names = sum_duplicate_genes(sp.csr_matrix(adata.X), adata.var_names)
    assert list(names) == ["A", "B"] and sp.issparse(X)


def test_not_an_anndata(tmp_path):
    (tmp_path / "x.h5ad").write_text("hello")
    with pytest.raises(DataError, match="not HDF5"): read_anndata(tmp_path / "x.h5ad")
    with h5py.File(tmp_path / "y.h5ad", "w") as f: f["something"] = np.arange(3)
    with pytest.raises(DataError, match="not an AnnData file"): read_anndata(tmp_path / "y.h5ad")
    (tmp_path / "z.csv").write_text("a,b")
    with pytest.raises(DataError, match="unknown format"): read_anndata(tmp_path / "z.csv")
    with pytest.raises(DataError, match="does not exist"): read_anndata(tmp_path / "nope.h5ad")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="matrix.mtx"): read_anndata(tmp_path / "folder")


def test_dense_matrix_too_large_for_memory(tmp_path):
    path = tmp_path / "huge.h5ad"
    ad.AnnData(np.ones((2, 3), dtype=np.float32)).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        attrs = dict(f["X"].attrs); del f["X"]
        f.create_dataset("X", shape=(5_000_000, 60_000), dtype="float32", chunks=(1000, 1000))
        f["X"].attrs.update(attrs)
    with pytest.raises(DataError, match="dense 5,000,000 × 60,000 float32.*backed=True"):
        read_anndata(path)
    with pytest.raises(DataError, match="backed=True"):
        read_anndata(tmp_path / "huge.h5ad", max_dense_bytes=10)


def test_describe_values_kinds(counts):
    assert describe_values(counts.X)["kind"] == "counts"
    assert describe_values(sp.csr_matrix((3, 0)))["kind"] == "empty"


def test_qc_and_filters(counts):
    adata = counts.copy()
    adata.var_names = ["MT-CO1", "MS4A1", "LYZ", "NKG7"]
    qc_metrics(adata)
    X = adata.X.toarray()
    np.testing.assert_allclose(adata.obs.total_counts, X.sum(1))
    np.testing.assert_array_equal(adata.obs.n_genes, (X > 0).sum(1))
    np.testing.assert_allclose(adata.obs.pct_mito, 100 * X[:, 0] / X.sum(1), rtol=1e-6)
    kept = filter_cells(adata, min_genes=4, max_pct_mito=100, verbose=False)
    assert kept.n_obs == int(((X > 0).sum(1) >= 4).sum())
    assert adata.n_obs == 30
