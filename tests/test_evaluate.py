"""The embedding chapter's API: the PCA baseline, each metric, the table, and bad input."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scfoundation.data import DataError
from scfoundation.evaluate import (cluster_scores, evaluate_embeddings, get_embedding, get_labels, knn_accuracy,
                                   label_silhouette, leiden_clusters, log_normalise, pca_baseline, stratified_split)


def make_cells(n_types=4, per_type=30, n_genes=60, seed=0):
    "Counts where each type over-expresses its own block of genes; labels in obs['cell_type']."
    rng = np.random.default_rng(seed)
    labels = np.repeat([f"type{t}" for t in range(n_types)], per_type)
    rates = np.full((len(labels), n_genes), 1.0)
    block = n_genes // n_types
    for t in range(n_types): rates[labels == f"type{t}", t * block:(t + 1) * block] = 8.0
    counts = sp.csr_matrix(rng.poisson(rates).astype(np.float32))
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])
    adata = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    onehot = pd.get_dummies(labels).to_numpy(dtype=np.float32)
    adata.obsm["X_good"] = onehot * 4 + rng.normal(size=onehot.shape).astype(np.float32)
    adata.obsm["X_noise"] = rng.normal(size=(len(labels), 8)).astype(np.float32)
    return adata


@pytest.fixture
def cells(): return make_cells()


def test_log_normalise_matches_formula(cells):
    counts = cells.X.toarray()
    expected = np.log1p(1e4 * counts / counts.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(log_normalise(cells).toarray(), expected, rtol=1e-5)
    assert sp.isspmatrix_csr(log_normalise(cells))


def test_pca_baseline_writes_obsm_and_is_deterministic(cells):
    before = cells.X.copy()
    out = pca_baseline(cells, n_hvg=30, n_comps=10, key="X_base", seed=0)
    assert out.shape == (120, 10) and cells.obsm["X_base"].shape == (120, 10)
    assert cells.uns["X_base"]["n_hvg"] == 30
    assert (cells.X != before).nnz == 0  # counts untouched
    np.testing.assert_allclose(pca_baseline(cells.copy(), n_hvg=30, n_comps=10, key="X_base"), out, atol=1e-4)


def test_pca_baseline_separates_types(cells):
    pca_baseline(cells, n_hvg=40, n_comps=10)
    table = evaluate_embeddings(cells, keys=["X_pca_hvg", "X_noise"])
    assert table.loc["X_pca_hvg", "knn_accuracy"] > 0.9 > table.loc["X_noise", "knn_accuracy"]


def test_pca_baseline_caps_components_on_tiny_data():
    tiny = make_cells(n_types=2, per_type=3, n_genes=10)
    assert pca_baseline(tiny, n_hvg=5, n_comps=50).shape == (6, 5)


def test_leiden_hits_the_target_and_is_deterministic(cells):
    clusters, resolution = leiden_clusters(cells.obsm["X_good"], n_clusters=4, seed=0)
    assert len(np.unique(clusters)) == 4 and resolution > 0
    np.testing.assert_array_equal(leiden_clusters(cells.obsm["X_good"], n_clusters=4, seed=0)[0], clusters)
    assert cluster_scores(cells.obs["cell_type"].to_numpy(), clusters)["ARI"] > 0.95


def test_more_clusters_asked_more_found(cells):
    few = len(np.unique(leiden_clusters(cells.obsm["X_noise"], n_clusters=2)[0]))
    many = len(np.unique(leiden_clusters(cells.obsm["X_noise"], n_clusters=8)[0]))
    assert few < many


def test_cluster_scores_range_and_label_permutation():
    labels = np.array(list("aaabbbccc"))
    assert cluster_scores(labels, np.array([2, 2, 2, 0, 0, 0, 1, 1, 1])) == {"ARI": 1.0, "NMI": 1.0}
    mixed = cluster_scores(labels, np.array([0, 1, 2] * 3))
    assert mixed["ARI"] < 0.1 and mixed["NMI"] < 0.2


def test_silhouette_is_scaled(cells):
    labels = cells.obs["cell_type"].astype(str).to_numpy()
    good, noise = label_silhouette(cells.obsm["X_good"], labels), label_silhouette(cells.obsm["X_noise"], labels)
    assert 0 <= noise < good <= 1
    assert abs(noise - 0.5) < 0.05
    sampled = label_silhouette(cells.obsm["X_good"], labels, max_cells=50, seed=1)
    assert abs(sampled - good) < 0.1


def test_stratified_split_keeps_proportions(cells):
    labels = cells.obs["cell_type"].astype(str).to_numpy()
    is_test = stratified_split(labels, test_size=0.3, seed=0)
    assert is_test.sum() == 36
    for label in np.unique(labels): assert is_test[labels == label].sum() == 9
    np.testing.assert_array_equal(stratified_split(labels, 0.3, seed=0), is_test)
    assert not np.array_equal(stratified_split(labels, 0.3, seed=1), is_test)


def test_knn_accuracy_good_vs_noise(cells):
    labels = cells.obs["cell_type"].astype(str).to_numpy()
    assert knn_accuracy(cells.obsm["X_good"], labels) == 1.0
    assert knn_accuracy(cells.obsm["X_noise"], labels) < 0.6


def test_evaluate_embeddings_table(cells):
    before_obs, before_obsm = cells.obs.copy(), set(cells.obsm.keys())
    table = evaluate_embeddings(cells, keys=["X_good", "X_noise"], label_key="cell_type", seed=0)
    assert list(table.index) == ["X_good", "X_noise"]
    assert {"ARI", "NMI", "silhouette", "knn_accuracy", "n_clusters"} <= set(table.columns)
    assert (table.loc["X_good", ["ARI", "NMI", "silhouette", "knn_accuracy"]]
            > table.loc["X_noise", ["ARI", "NMI", "silhouette", "knn_accuracy"]]).all()
    pd.testing.assert_frame_equal(cells.obs, before_obs)
    assert set(cells.obsm.keys()) == before_obsm
    pd.testing.assert_frame_equal(evaluate_embeddings(cells, keys=["X_good", "X_noise"]), table)
    pd.testing.assert_frame_equal(evaluate_embeddings(cells, keys="X_good"), table.loc[["X_good"]])


def test_sparse_embedding_is_accepted(cells):
    cells.obsm["X_sparse"] = sp.csr_matrix(cells.obsm["X_good"])
    np.testing.assert_array_equal(get_embedding(cells, "X_sparse"), cells.obsm["X_good"])


def test_missing_key_names_key_and_fix(cells):
    with pytest.raises(DataError, match="X_missing.*pca_baseline"):
        evaluate_embeddings(cells, keys=["X_good", "X_missing"])


def test_bad_embeddings_and_labels_are_refused_unchanged(cells):
    cells.obsm["X_nan"] = cells.obsm["X_good"].copy()
    cells.obsm["X_nan"][3, 0] = np.nan
    before = cells.obs.copy()
    with pytest.raises(DataError, match="NaN"): evaluate_embeddings(cells, keys=["X_nan"])
    with pytest.raises(DataError, match="label_key"): evaluate_embeddings(cells, keys=["X_good"], label_key="nope")
    cells.obs["one"] = "same"
    with pytest.raises(DataError, match="at least two"): evaluate_embeddings(cells, keys=["X_good"], label_key="one")
    cells.obs["gappy"] = cells.obs["cell_type"].astype(object)
    cells.obs.loc["c0", "gappy"] = None
    with pytest.raises(DataError, match="missing for 1 cells"): evaluate_embeddings(cells, keys=["X_good"], label_key="gappy")
    cells.obs["rare"] = cells.obs["cell_type"].astype(str)
    cells.obs.loc["c0", "rare"] = "singleton"
    with pytest.raises(DataError, match="singleton"): evaluate_embeddings(cells, keys=["X_good"], label_key="rare")
    pd.testing.assert_frame_equal(cells.obs[before.columns], before)


def test_bad_counts_are_refused():
    negative = ad.AnnData(sp.csr_matrix(np.array([[1.0, -2.0], [3.0, 1.0]], dtype=np.float32)))
    with pytest.raises(DataError, match="prepare_counts"): pca_baseline(negative)
    empty = make_cells(n_types=2, per_type=5, n_genes=10)
    empty.X = sp.csr_matrix(empty.X.multiply(np.arange(10)[:, None] > 0))  # first cell emptied
    with pytest.raises(DataError, match="filter_cells"): pca_baseline(empty)
    assert "X_pca_hvg" not in empty.obsm
    with pytest.raises(DataError, match="n_hvg"): pca_baseline(make_cells(), n_hvg=1)


def test_one_dimensional_embedding_refused(cells):
    cells.obsm["X_flat"] = np.zeros((cells.n_obs, 0), dtype=np.float32)
    with pytest.raises(DataError, match="cells × dims"): get_embedding(cells, "X_flat")
    assert list(get_labels(cells, "cell_type")[:1]) == ["type0"]


def test_fingerprint_tracks_data_and_configs_not_entry_order(cells):
    from scfoundation.evaluate import _fingerprint
    from scfoundation.model import ModelConfig
    from scfoundation.train import TrainConfig
    model_config, train_config = ModelConfig.named("teaching"), TrainConfig(steps=5)
    base = _fingerprint(cells, model_config, train_config)
    shuffled = cells.copy()
    matrix = shuffled.X.tocsr()
    order = np.concatenate([np.arange(start, stop)[::-1] for start, stop in zip(matrix.indptr[:-1], matrix.indptr[1:])])
    shuffled.X = sp.csr_matrix((matrix.data[order], matrix.indices[order], matrix.indptr), shape=matrix.shape)
    assert not shuffled.X.has_sorted_indices
    assert _fingerprint(shuffled, model_config, train_config) == base
    assert _fingerprint(cells, model_config, TrainConfig(steps=6)) != base
    assert _fingerprint(cells, ModelConfig.named("teaching", d_model=64), train_config) != base
    changed = cells.copy()
    changed.X = changed.X.tocsr(copy=True)
    changed.X.data[0] += 1
    assert _fingerprint(changed, model_config, train_config) != base


def test_cached_pretrain_trains_once(cells, tmp_path, monkeypatch):
    import scfoundation.train
    from scfoundation.evaluate import cached_pretrain
    from scfoundation.model import ModelConfig
    from scfoundation.train import TrainConfig
    calls = []
    def fake_pretrain(adata, model_config, train_config, out_dir, **kwargs):
        calls.append(out_dir)
        (out_dir / "final").mkdir(parents=True)
        (out_dir / "final" / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(scfoundation.train, "pretrain", fake_pretrain)
    first = cached_pretrain(cells, ModelConfig.named("teaching"), TrainConfig(steps=5), cache_dir=tmp_path)
    second = cached_pretrain(cells, ModelConfig.named("teaching"), TrainConfig(steps=5), cache_dir=tmp_path)
    assert first == second and first.parent.parent == tmp_path and len(calls) == 1
    cached_pretrain(cells, ModelConfig.named("teaching"), TrainConfig(steps=6), cache_dir=tmp_path)
    assert len(calls) == 2
