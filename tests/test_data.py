"""The data chapter's API: reading every supported format, finding/recovering counts, QC, bad input,
streaming to `.h5ad` with bounded memory, settings as JSON, and figures that pyplot does not manage."""
import dataclasses
import gc
import gzip
import tracemalloc
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

import scfoundation.data as data_module
from scfoundation.data import (QC_COLUMNS, Config, DataError, describe_values, filter_cells, highly_variable_genes,
                               load_pbmc68k, log_normalise, log_normalise_values, new_figure, prepare_counts, qc_metrics,
                               read_anndata, row_sums, sum_duplicate_genes)

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


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
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
    np.testing.assert_array_equal(adata.obs.n_genes_by_counts, (X > 0).sum(1))
    np.testing.assert_allclose(adata.obs.pct_counts_mt, 100 * X[:, 0] / X.sum(1), rtol=1e-6)
    kept = filter_cells(adata, min_genes=4, max_pct_mito=100, verbose=False)
    assert kept.n_obs == int(((X > 0).sum(1) >= 4).sum())
    assert adata.n_obs == 30


def test_qc_columns_are_scanpys(counts):
    import scanpy as sc
    adata = counts.copy()
    adata.var_names = ["MT-CO1", "MS4A1", "LYZ", "NKG7"]
    assert QC_COLUMNS == ("total_counts", "n_genes_by_counts", "pct_counts_mt")
    ours = qc_metrics(adata, inplace=False)
    assert list(ours.columns) == list(QC_COLUMNS) and "total_counts" not in adata.obs     # inplace=False writes nothing
    adata.var["mt"] = adata.var_names.str.startswith("MT-")
    theirs = sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=None, log1p=False, inplace=False)[0]
    for column in QC_COLUMNS:
        np.testing.assert_allclose(ours[column].to_numpy(float), theirs[column].to_numpy(float), rtol=1e-5, err_msg=column)


def test_qc_replaces_a_stale_obs_column_with_a_warning(counts):
    adata = counts.copy()
    adata.obs["total_counts"] = -1.0
    with pytest.warns(UserWarning, match=r"qc_metrics replaced obs columns \['total_counts'\]"):
        qc_metrics(adata)
    np.testing.assert_allclose(adata.obs.total_counts, counts.X.toarray().sum(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qc_metrics(adata)                                                   # same values: no warning


def test_filter_cells_result_carries_fresh_qc_columns(counts):
    kept = filter_cells(counts, min_genes=1, verbose=False)
    assert set(QC_COLUMNS) <= set(kept.obs) and "total_counts" not in counts.obs
    np.testing.assert_allclose(kept.obs.total_counts, counts.X.toarray().sum(1))
    stale = counts.copy()
    stale.obs["pct_counts_mt"] = 99.0
    with pytest.warns(UserWarning, match=r"filter_cells replaced obs columns \['pct_counts_mt'\]"):
        kept = filter_cells(stale, min_genes=1, verbose=False)
    assert (kept.obs.pct_counts_mt == 0).all() and (stale.obs.pct_counts_mt == 99.0).all()   # the input is left as it was


def test_read_anndata_backed_auto(tmp_path, counts, monkeypatch):
    counts.write_h5ad(tmp_path / "a.h5ad")
    size = (tmp_path / "a.h5ad").stat().st_size
    monkeypatch.setattr(data_module, "available_memory_bytes", lambda: 100 * size)
    small = read_anndata(tmp_path / "a.h5ad", backed="auto")
    assert not small.isbacked
    monkeypatch.setattr(data_module, "available_memory_bytes", lambda: 2 * size)   # the file is over a quarter of it
    large = read_anndata(tmp_path / "a.h5ad", backed="auto")
    assert large.isbacked
    np.testing.assert_array_equal(prepare_counts(large).X.toarray(), small.X.toarray())
    large.file.close()


def test_log_normalise_and_hvgs(counts):
    X = counts.X.toarray().astype(np.float64)
    expected = np.log1p(1e4 * X / X.sum(axis=1, keepdims=True))
    logged = log_normalise(counts)
    assert sp.isspmatrix_csr(logged) and logged.dtype == np.float32
    np.testing.assert_allclose(logged.toarray(), expected, rtol=1e-5)
    np.testing.assert_allclose(log_normalise_values(X[X > 0], np.repeat(X.sum(1), (X > 0).sum(1))), expected[X > 0])
    np.testing.assert_array_equal(row_sums(counts.X), X.sum(1))
    np.testing.assert_array_equal(row_sums(sp.csr_matrix((3, 2))), np.zeros(3))
    assert highly_variable_genes(counts, n_hvg=10).all()                    # fewer genes than asked: all of them
    wide = ad.AnnData(sp.csr_matrix(np.random.default_rng(2).poisson(3.0, (40, 30)).astype(np.float32)))
    mask = highly_variable_genes(wide, n_hvg=8)
    assert mask.dtype == bool and mask.shape == (30,) and mask.sum() == 8
    with pytest.raises(DataError, match="negative"): log_normalise(ad.AnnData(np.array([[1.0, -1.0]], np.float32)))


# ---------------------------------------------------------------- streamed to a file = in memory
def cells_file(path, n_cells=200, seed=0, log1p=False):
    "Counts with duplicated gene names, two empty cells and a per-cell obsm, written to `path`; also returned."
    rng = np.random.default_rng(seed)
    X = rng.poisson(1.0, (n_cells, 12)).astype(np.float32); X[:, 0] += 1; X[[5, 77]] = 0
    if log1p:
        rows = X.sum(1, keepdims=True)
        X = np.log1p(X / np.maximum(rows, 1) * 1e4).astype(np.float32)
    obs = pd.DataFrame({"donor": rng.choice(["a", "b"], n_cells)}, index=[f"c{i}" for i in range(n_cells)])
    adata = ad.AnnData(sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=["MT-CO1", *GENES[1:], *GENES[:4], *GENES[:4]]))
    adata.obsm["X_pos"] = rng.normal(size=(n_cells, 2)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)                       # anndata: names not unique (intended)
        adata.write_h5ad(path)
    return adata


def assert_same_anndata(got, expected):
    np.testing.assert_array_equal(got.X[:].toarray() if got.isbacked else got.X.toarray(), expected.X.toarray())
    pd.testing.assert_frame_equal(got.obs, expected.obs, check_dtype=False, check_categorical=False)
    pd.testing.assert_frame_equal(got.var, expected.var)
    assert sorted(got.obsm) == sorted(expected.obsm)
    for key in expected.obsm: np.testing.assert_array_equal(np.asarray(got.obsm[key]), expected.obsm[key])


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@pytest.mark.parametrize("log1p", [False, True])
@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_streamed_prepare_counts_equals_in_memory(tmp_path, log1p, chunk_size):
    source = cells_file(tmp_path / "in.h5ad", log1p=log1p)
    settings = dict(duplicate_genes="sum", empty_cells="drop")
    expected = prepare_counts(source, **settings)
    backed = read_anndata(tmp_path / "in.h5ad", backed=True)
    got = prepare_counts(backed, out=tmp_path / "out.h5ad", chunk_size=chunk_size, **settings)
    assert got.isbacked and Path(got.filename) == tmp_path / "out.h5ad" and got.n_obs == source.n_obs - 2
    assert expected.uns["scf_counts"]["recovered"] == log1p and list(got.var_names) == ["MT-CO1", *GENES[1:], "CD3E"]
    assert_same_anndata(got, expected.copy())
    assert dict(got.uns["scf_counts"]) == dict(expected.uns["scf_counts"]) and got.uns["scf_counts"]["n_dropped_empty"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "out.h5ad"]        # no temporary file left
    got.file.close(); backed.file.close()


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_streamed_prepare_counts_leaves_no_file_on_error(tmp_path):
    cells_file(tmp_path / "in.h5ad")
    with pytest.raises(DataError, match="duplicate_genes='sum'"):
        prepare_counts(read_anndata(tmp_path / "in.h5ad", backed=True), out=tmp_path / "out.h5ad", empty_cells="drop")
    with pytest.raises(DataError, match="zero counts"):
        prepare_counts(read_anndata(tmp_path / "in.h5ad", backed=True), out=tmp_path / "out.h5ad", duplicate_genes="sum", chunk_size=50)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@pytest.mark.parametrize("chunk_size", [9, 1000])
def test_streamed_filter_cells_equals_in_memory(tmp_path, chunk_size):
    source = cells_file(tmp_path / "in.h5ad")
    prepare_counts(source, duplicate_genes="sum", empty_cells="drop").write_h5ad(tmp_path / "counts.h5ad")
    settings = dict(min_genes=5, max_pct_mito=20, max_counts=16, verbose=False)
    expected = filter_cells(ad.read_h5ad(tmp_path / "counts.h5ad"), **settings)
    backed = read_anndata(tmp_path / "counts.h5ad", backed=True)
    got = filter_cells(backed, out=tmp_path / "kept.h5ad", chunk_size=chunk_size, **settings)
    assert got.isbacked and 0 < got.n_obs < backed.n_obs
    assert_same_anndata(got, expected)
    got.file.close(); backed.file.close()


# ---------------------------------------------------------------- memory of the streamed path
def traced_peak(run) -> int:
    "Peak bytes traced while `run()` works (a backed result is closed afterwards)."
    gc.collect()
    tracemalloc.start()
    try: result = run()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    if getattr(result, "isbacked", False): result.file.close()
    return peak


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    "20,000 cells × 400 genes of counts (about 2M stored values) in an `.h5ad`."
    from scfoundation.genes import Vocab
    rng, n_cells, n_genes = np.random.default_rng(0), 20_000, 400
    X = sp.random(n_cells, n_genes - 1, density=0.25, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 20, k)).astype(np.float32)
    X = sp.hstack([sp.csr_matrix(np.ones((n_cells, 1), np.float32)), X], format="csr")   # no empty cell
    adata = ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
                       var=pd.DataFrame(index=list(Vocab.from_gene_table().genes[:n_genes])))
    path = tmp_path_factory.mktemp("big") / "big.h5ad"
    adata.write_h5ad(path)
    return path, X.data.nbytes + X.indices.nbytes


@pytest.mark.parametrize("name", ["prepare_counts", "filter_cells", "map_genes"])
def test_streamed_memory_is_bounded_by_the_block(big_file, tmp_path, name):
    from scfoundation.genes import map_genes
    function = {"prepare_counts": prepare_counts, "filter_cells": filter_cells, "map_genes": map_genes}[name]
    settings = dict(min_genes=10, verbose=False) if name == "filter_cells" else {}
    path, whole = big_file
    streamed = lambda chunk: traced_peak(lambda: function(read_anndata(path, backed=True), out=tmp_path / "out.h5ad",
                                                          chunk_size=chunk, **settings))
    few = ad.read_h5ad(path)[:2000].copy()
    function(read_anndata(path, backed=True), out=tmp_path / "out.h5ad", chunk_size=10_000, **settings)  # warm-up: caches
    baseline = traced_peak(lambda: function(few, **settings))                 # one block in memory, and the fixed costs
    in_memory = traced_peak(lambda: function(read_anndata(path), **settings))
    small, large = streamed(2000), streamed(10_000)
    block = lambda cells: whole * cells / 20_000                              # bytes of the counts of that many cells
    assert in_memory - baseline > 0.9 * whole                                 # in memory: the whole matrix is held
    assert small - baseline < 0.3 * whole                                     # streamed: about one block, not the file
    assert large - small < 8 * (block(10_000) - block(2000))                  # and what it holds grows with the block only
    written = read_anndata(tmp_path / "out.h5ad", backed=True)
    assert written.shape == (20_000, 400)                                     # every cell has > 10 genes, every gene maps
    written.file.close()


# ---------------------------------------------------------------- settings as JSON
class KnobError(DataError): pass


@dataclasses.dataclass
class Knobs(Config):
    error = KnobError
    size: int = 3
    rate: float = 0.5
    name: str = "x"
    pair: tuple = (1, 2)
    on: bool = True

    def __post_init__(self): self.pair = tuple(self.pair)


def test_config_round_trips_and_refuses_unknown_keys(tmp_path):
    knobs = Knobs(size=7, rate=0.25, name="y", pair=(3, 4), on=False)
    assert knobs.to_dict() == {"size": 7, "rate": 0.25, "name": "y", "pair": [3, 4], "on": False}
    assert Knobs.from_dict(knobs.to_dict()) == knobs and Knobs.from_json(knobs.to_json()) == knobs
    knobs.to_json(tmp_path / "knobs.json")
    assert Knobs.from_json(tmp_path / "knobs.json") == knobs and Knobs.from_json(str(tmp_path / "knobs.json")) == knobs
    holder = ad.AnnData(np.zeros((1, 1), np.float32), uns={"knobs": knobs.to_dict()})
    holder.write_h5ad(tmp_path / "holder.h5ad")                              # numpy arrays and scalars come back
    assert Knobs.from_dict(dict(ad.read_h5ad(tmp_path / "holder.h5ad").uns["knobs"])) == knobs
    with pytest.raises(KnobError, match=r"Knobs has unknown keys \['colour', 'zize'\].*\['name', 'on', 'pair', 'rate', 'size'\]"):
        Knobs.from_dict({**knobs.to_dict(), "zize": 1, "colour": "red"})
    with pytest.raises(KnobError, match="not valid JSON"): Knobs.from_json('{"size": ')
    assert issubclass(Knobs.error, DataError) and Config.error is DataError


# ---------------------------------------------------------------- figures
def plot_calls():
    "Every plot_* function of data, genes, simulate and evaluate, with a call that draws it."
    import scfoundation.evaluate as evaluate
    import scfoundation.genes as genes
    import scfoundation.simulate as simulate
    rng = np.random.default_rng(0)
    counts = ad.AnnData(sp.csr_matrix(rng.poisson(2.0, (40, 4)).astype(np.float32) + 1),
                        var=pd.DataFrame(index=["MT-CO1", "CD3E", "LYZ", "junk"]))
    labelled = counts.copy()
    labelled.obs["cell_type"] = np.repeat(["a", "b"], 20)
    labelled.obsm["X_scf"], labelled.obsm["X_pca_hvg"] = rng.normal(size=(40, 3)), rng.normal(size=(40, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mapped = genes.map_genes(counts)
    simulated = simulate.simulate(simulate.SimConfig(n_cells=60, n_genes=30, n_tfs=3, n_cell_types=2))
    calls = {"plot_qc": lambda: data_module.plot_qc(counts, min_genes=2, max_pct_mito=10),
             "plot_gene_matches": lambda: genes.plot_gene_matches(mapped),
             "plot_realism": lambda: simulate.plot_realism({"counts": counts, "simulated": simulated}),
             "plot_embeddings": lambda: evaluate.plot_embeddings(labelled)}
    defined = {name for module in (data_module, genes, simulate, evaluate) for name, value in vars(module).items()
               if name.startswith("plot_") and getattr(value, "__module__", None) == module.__name__}
    return calls, defined


def test_every_plot_returns_a_figure_pyplot_does_not_hold(monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    import scfoundation.evaluate as evaluate
    monkeypatch.setattr(evaluate, "umap_coordinates", lambda embedding, seed=0: embedding[:, :2])   # skip UMAP's compile
    calls, defined = plot_calls()
    assert defined == set(calls)                                              # a new plot_* function needs a call here
    plt.close("all")
    for name, call in calls.items():
        figure = call()
        assert isinstance(figure, Figure) and figure.axes, name
        assert any(axis.has_data() for axis in figure.axes), f"{name} drew nothing"
        assert plt.get_fignums() == [], f"{name} left a figure open in pyplot"
    fig, axes = new_figure(3, 2, figsize=(3, 2))
    assert isinstance(fig, Figure) and axes.shape == (2, 3) and plt.get_fignums() == []
    assert new_figure(2, squeeze=False)[1].shape == (1, 2)


def test_short_list_names_a_few_and_counts_the_rest():
    from scfoundation.data import short_list
    assert short_list(["B cell", "T cell"]) == "'B cell', 'T cell'"
    assert short_list([f"type {i}" for i in range(200)], limit=2) == "'type 0', 'type 1', … (200 in all)"
    layers = {f"layer_{i}": sp.csr_matrix((2, 2)) for i in range(50)}
    adata = ad.AnnData(sp.csr_matrix(np.ones((2, 2))), layers=layers)
    with pytest.raises(DataError, match=r"\(50 in all\)") as error: prepare_counts(adata, layer="missing")
    assert len(str(error.value)) < 300


def test_damaged_files_are_named_with_the_fix(tmp_path, counts):
    from scfoundation.data import read_chunks, var_names_of
    counts.write_h5ad(tmp_path / "whole.h5ad")
    whole = (tmp_path / "whole.h5ad").read_bytes()
    (tmp_path / "cut.h5ad").write_bytes(whole[: len(whole) // 2])           # an interrupted copy
    for read in (read_anndata, lambda path: next(read_chunks(path)), var_names_of):
        with pytest.raises(DataError, match="cut short.*copy or write it again"): read(tmp_path / "cut.h5ad")
    folder = tmp_path / "tenx"
    write_10x_mtx(folder, counts)
    with gzip.open(folder / "features.tsv.gz", "wt") as f: f.write("ENSG0\tCD3E\tGene Expression\n")   # 1 line for 4 genes
    with pytest.raises(DataError, match="not a readable 10x matrix folder.*features.tsv"): read_anndata(folder)


def test_folder_outputs_may_exist_but_not_be_files(tmp_path):
    from scfoundation.data import check_output_folder
    assert check_output_folder(tmp_path / "new") == tmp_path / "new" and check_output_folder(tmp_path) == tmp_path
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file, not a folder"): check_output_folder(tmp_path / "file")
    with pytest.raises(DataError, match="also the input"): check_output_folder(tmp_path, inputs=[tmp_path])
