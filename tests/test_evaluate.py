"""The embedding chapter's API: the one inference path (iter_batches, embed_cells, embed_adata, gene_embeddings,
sample_cells), the PCA baseline, each metric, the table, and bad input."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scfoundation.data import DataError
from scfoundation.evaluate import (cluster_scores, embed_adata, embed_cells, evaluate_embeddings, gene_embeddings,
                                   evaluate_seeds, format_mean_sd, get_embedding, get_labels, iter_batches, knn_accuracy,
                                   label_silhouette, leiden_clusters, leiden_sweep, LEIDEN_RESOLUTIONS, neighbors_graph,
                                   obs_values, pca_baseline, sample_cells, scvi_baseline, seed_summary, stratified_split)
from scfoundation.genes import GeneError, Vocab
from scfoundation.model import ModelConfig, SCFModel
from scfoundation.tokenization import CellDataset, collate

TINY = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=64)


def with_embeddings(adata, seed=1):
    "Add obsm['X_good'] (the labels, one-hot, plus noise) and obsm['X_noise'] (noise only)."
    rng = np.random.default_rng(seed)
    onehot = pd.get_dummies(adata.obs["cell_type"]).to_numpy(dtype=np.float32)
    adata.obsm["X_good"] = onehot * 4 + rng.normal(size=onehot.shape).astype(np.float32)
    adata.obsm["X_noise"] = rng.normal(size=(adata.n_obs, 8)).astype(np.float32)
    return adata


@pytest.fixture
def make_cells(typed_cells):
    return lambda **kwargs: with_embeddings(typed_cells(**kwargs))


@pytest.fixture
def cells(make_cells): return make_cells()


@pytest.fixture(scope="module")
def pretrained(typed_cells, tmp_path_factory):
    "A tiny rank-value model pretrained for two steps on labelled cells: (its run folder, the model, the cells)."
    adata = typed_cells(n_types=3, per_type=20, n_genes=40)
    out = tmp_path_factory.mktemp("run")
    from scfoundation.train import TrainConfig, pretrain
    model = pretrain(adata, ModelConfig(**TINY), TrainConfig(steps=2, batch_size=8, save_every=0), out,
                     vocab=Vocab.from_genes(list(adata.var_names)), progress=False)
    return out, model, adata


# ---------------------------------------------------------------- the one inference path
def test_sample_cells():
    np.testing.assert_array_equal(sample_cells(5), np.arange(5))
    np.testing.assert_array_equal(sample_cells(5, max_cells=5), np.arange(5))
    chosen = sample_cells(100, max_cells=10, seed=3)
    assert len(chosen) == 10 == len(np.unique(chosen)) and (np.diff(chosen) > 0).all() and chosen.max() < 100
    np.testing.assert_array_equal(sample_cells(100, 10, seed=3), chosen)
    assert not np.array_equal(sample_cells(100, 10, seed=4), chosen)


def test_iter_batches_tokenizes_the_chosen_cells_in_order(pretrained):
    _, model, adata = pretrained
    dataset = CellDataset(adata, model.tokenizer)
    order = np.array([7, 2, 40, 3, 59])
    parts = list(iter_batches(adata, model.tokenizer, cells=order, batch_size=2, device="cpu"))
    assert [chosen.tolist() for chosen, _ in parts] == [[7, 2], [40, 3], [59]]
    for chosen, batch in parts:
        expected = collate(dataset.__getitems__(chosen))
        assert batch.keys() == expected.keys() and all(torch.equal(batch[key], expected[key]) for key in batch)
        assert batch["cell_ids"].tolist() == chosen.tolist()
    assert sum(len(chosen) for chosen, _ in iter_batches(adata, model.tokenizer, batch_size=7)) == adata.n_obs
    with pytest.raises(DataError, match="no tokenizer"): next(iter_batches(adata, None))


def test_embed_cells_equals_the_models_embedding(pretrained):
    _, model, adata = pretrained
    embedding = embed_cells(model, adata, batch_size=7)
    assert embedding.shape == (adata.n_obs, TINY["d_model"]) and embedding.dtype == np.float32
    whole = model.embed(collate(model.tokenizer.tokenize_adata(adata))).numpy()     # one batch, padded to the longest
    np.testing.assert_allclose(embedding, whole, atol=1e-5)
    some = embed_cells(model, adata, cells=[9, 0, 4], batch_size=2)
    np.testing.assert_allclose(some, embedding[[9, 0, 4]], atol=1e-5)
    reordered = Vocab.from_genes(list(adata.var_names[::-1]))               # the same genes, other token ids
    stranger = model.tokenizer.for_model(reordered.with_medians(np.ones(len(reordered), np.float32)), max_length=64)
    with pytest.raises(GeneError, match="does not match the model's"): embed_cells(model, adata, tokenizer=stranger)
    bare = SCFModel(model.config)
    with pytest.raises(DataError, match="no tokenizer.*tokenizer="): embed_cells(bare, adata)
    np.testing.assert_allclose(embed_cells(bare, adata, tokenizer=model.tokenizer)[:2],       # a tokenizer passed in
                               bare.embed(collate(model.tokenizer.tokenize_adata(adata[:2]))).numpy(), atol=1e-5)


def test_embed_adata_in_place_copy_and_equivalent_inputs(pretrained, tmp_path):
    out, model, adata = pretrained
    values = embed_cells(model, adata)
    target = adata.copy()
    assert embed_adata(target, model, progress=False) is None                 # in place, scanpy style
    np.testing.assert_allclose(target.obsm["X_scf"], values, atol=1e-5)
    copied = embed_adata(adata, out, key_added="X_other", copy=True, batch_size=48, progress=False)  # a run folder
    assert copied is not adata and "X_other" not in adata.obsm and "X_scf" not in adata.obsm
    np.testing.assert_allclose(copied.obsm["X_other"], values, atol=1e-5)    # batch size does not matter
    np.testing.assert_allclose(embed_adata(adata, out / "final", copy=True, progress=False).obsm["X_scf"], values, atol=1e-5)
    assert np.abs(values - values[0]).max() > 1e-4 and np.isfinite(values).all()   # cells differ
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    from_disk = embed_adata(backed, model, copy=True, progress=False)
    assert not from_disk.isbacked
    np.testing.assert_allclose(from_disk.obsm["X_scf"], values, atol=1e-5)
    backed.file.close()
    with pytest.raises(TypeError, match=r"AnnData first.*embed_adata\(adata, model\)"): embed_adata(model, adata)
    with pytest.raises(TypeError, match="AnnData first"): embed_adata(out, adata)


def test_gene_embeddings_input_and_contextual(pretrained):
    _, model, adata = pretrained
    genes = list(adata.var_names[:5])
    ids = model.tokenizer.vocab.ids(genes)
    table = gene_embeddings(model, genes=genes, kind="input")
    assert list(table.index) == genes and table.index.name == "gene"
    np.testing.assert_allclose(table.to_numpy(), model.embedding.gene.weight[torch.as_tensor(ids)].detach().numpy())
    assert list(gene_embeddings(model, kind="input").index) == list(model.tokenizer.vocab.genes)   # default: the vocabulary
    contextual = gene_embeddings(model, adata, kind="contextual", max_cells=None)
    assert list(contextual.index) == list(adata.var_names) and contextual.shape[1] == model.config.output_dim
    batch = collate(model.tokenizer.tokenize_adata(adata))                   # reference: one batch, a plain mean
    with torch.no_grad(): hidden = model.eval()(batch)["hidden"]
    for gene, token in zip(genes, ids):
        at = batch["input_ids"] == int(token)
        at[:, 0] = False
        assert contextual.attrs["n_cells"][gene] == int(at.any(1).sum()) > 0
        np.testing.assert_allclose(contextual.loc[gene].to_numpy(), hidden[at].mean(0).numpy(), atol=1e-5)
    few = gene_embeddings(model, adata, genes=genes, max_cells=10, seed=2)
    chosen = collate(model.tokenizer.tokenize_adata(adata[sample_cells(adata.n_obs, 10, seed=2)]))
    assert few.attrs["n_cells"][genes[0]] == int((chosen["input_ids"][:, 1:] == int(ids[0])).any(1).sum())
    with pytest.raises(DataError, match="not in the model's vocabulary"): gene_embeddings(model, adata, genes=["NOPE"])
    with pytest.raises(DataError, match="pass adata="): gene_embeddings(model, genes=genes)
    with pytest.raises(DataError, match="kind="): gene_embeddings(model, adata, kind="output")


def test_gene_embeddings_of_unseen_genes_are_zero(typed_cells):
    from scfoundation.tokenization import BinningTokenizer
    adata = typed_cells(n_types=2, per_type=6, n_genes=12)
    silent = adata.X.toarray(); silent[:, -1] = 0
    adata.X = sp.csr_matrix(silent)                                           # the last gene is never expressed
    vocab = Vocab.from_genes(list(adata.var_names))
    model = SCFModel(ModelConfig(vocab_size=len(vocab), input_kind="bins", n_bins=11, asymmetric=True, decoder_d_model=32,
                                 vocab_version=vocab.version, **TINY))
    model.tokenizer = BinningTokenizer(vocab, max_length=64, n_bins=11)
    table = gene_embeddings(model, adata)
    assert table.shape == (12, 32) and table.attrs["n_cells"]["g11"] == 0 and (table.loc["g11"] == 0).all()
    assert (table.attrs["n_cells"].iloc[:-1] > 0).all() and (table.iloc[:-1].abs().sum(axis=1) > 0).all()


# ---------------------------------------------------------------- the baseline and the metrics
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


def test_pca_baseline_caps_components_on_tiny_data(make_cells):
    tiny = make_cells(n_types=2, per_type=3, n_genes=10)
    assert pca_baseline(tiny, n_hvg=5, n_comps=50).shape == (6, 5)


def test_leiden_sweep_picks_the_best_nmi_and_is_deterministic(cells):
    labels = cells.obs["cell_type"].astype(str).to_numpy()
    clusters, resolution = leiden_clusters(cells.obsm["X_good"], labels, seed=0)
    assert resolution in LEIDEN_RESOLUTIONS and len(np.unique(clusters)) == 4
    np.testing.assert_array_equal(leiden_clusters(cells.obsm["X_good"], labels, seed=0)[0], clusters)
    assert cluster_scores(labels, clusters)["ARI"] > 0.95
    sweep = leiden_sweep(neighbors_graph(cells.obsm["X_good"]), labels)
    assert list(sweep.index) == list(LEIDEN_RESOLUTIONS) and list(sweep.columns) == ["ARI", "NMI", "n_clusters"]
    assert resolution == sweep["NMI"].idxmax() and sweep.loc[resolution, "NMI"] == cluster_scores(labels, clusters)["NMI"]


def test_higher_resolution_more_clusters(cells):
    labels = cells.obs["cell_type"].astype(str).to_numpy()
    sweep = leiden_sweep(neighbors_graph(cells.obsm["X_noise"]), labels, resolutions=[0.1, 2.0])
    assert sweep.loc[0.1, "n_clusters"] < sweep.loc[2.0, "n_clusters"]


def test_neighbors_graph_is_scanpys(cells):
    import scanpy as sc
    graph = neighbors_graph(cells.obsm["X_good"], n_neighbors=10)
    reference = ad.AnnData(obs=pd.DataFrame(index=cells.obs_names), obsm={"E": cells.obsm["X_good"]})
    sc.pp.neighbors(reference, n_neighbors=10, use_rep="E", random_state=0)
    assert abs(graph.obsp["connectivities"] - reference.obsp["connectivities"]).max() < 1e-6


def test_evaluate_seeds_and_summary(cells):
    runs = evaluate_seeds(cells, {"good": "X_good", "noise": ["X_noise", "X_noise", "X_good"]}, seeds=(0, 1, 2))
    assert list(runs.index) == ["good"] * 3 + ["noise"] * 3 and list(runs.seed) == [0, 1, 2] * 2
    summary = seed_summary(runs)
    assert summary.columns.get_level_values(1).tolist()[:2] == ["mean", "sd"] and "seed" not in summary.columns.get_level_values(0)
    assert np.isclose(summary.loc["noise", ("knn_accuracy", "mean")], runs.loc["noise", "knn_accuracy"].mean())
    assert summary.loc["noise", ("knn_accuracy", "sd")] > summary.loc["good", ("knn_accuracy", "sd")]  # one seed scored X_good
    text = format_mean_sd(summary[["ARI"]], digits=2)
    assert text.loc["good", "ARI"].count(" ± ") == 1
    with pytest.raises(DataError, match="one per seed"): evaluate_seeds(cells, {"noise": ["X_noise", "X_good"]})


def test_scvi_baseline_learns_the_types(cells):
    pytest.importorskip("scvi")
    before = cells.X.copy()
    latent = scvi_baseline(cells, max_epochs=30, seed=0)
    assert latent.shape == (cells.n_obs, 10) and cells.uns["X_scvi"]["epochs"] == 30
    assert (cells.X != before).nnz == 0
    table = evaluate_embeddings(cells, keys=["X_scvi", "X_noise"])
    assert table.loc["X_scvi", "knn_accuracy"] > 0.9 > table.loc["X_noise", "knn_accuracy"]


def test_scvi_baseline_refuses_normalised_data_unchanged(cells):
    pytest.importorskip("scvi")
    cells.X = sp.csr_matrix(cells.X, dtype=np.float32) * 0.5 + 0.25 * (cells.X != 0)
    before = cells.X.copy()
    with pytest.raises(DataError, match="raw counts"): scvi_baseline(cells, max_epochs=1)
    assert (cells.X != before).nnz == 0 and "X_scvi" not in cells.obsm


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


def test_errors_about_many_labels_or_columns_stay_short():
    "200 long labels (each a singleton) or 200 obs columns: the message shows a few and the count, not all of them."
    labels = [f"a-very-long-cell-type-label-that-goes-on-and-on-{i:03d}" for i in range(200)]
    cells = ad.AnnData(np.zeros((400, 1), np.float32), obs=pd.DataFrame({"label": labels + ["common"] * 200},
                                                                        index=[f"c{i}" for i in range(400)]))
    with pytest.raises(DataError, match=r"\(200 in all\) have fewer than 2 cells") as error:
        obs_values(cells, "label", "label_key", "cell types", min_per_class=2)
    assert len(str(error.value)) < 1000 and labels[0] in str(error.value)
    wide = ad.AnnData(np.zeros((3, 1), np.float32), obs=pd.DataFrame({f"{label}-column": 0 for label in labels},
                                                                     index=["a", "b", "c"]))
    with pytest.raises(DataError, match=r"obs has .*\(200 in all\).*label_key=") as error:
        obs_values(wide, "nope", "label_key", "cell types")
    assert len(str(error.value)) < 1000

def test_bad_counts_are_refused(make_cells):
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
