"""The integration chapter's API: each scib-style metric on hand-made cases, Harmony, the table, and bad input."""
import numpy as np
import pandas as pd
import pytest

from scfoundation.data import DataError
from scfoundation.evaluate import pca_baseline
from scfoundation.integrate import (BATCH_METRICS, BIO_METRICS, SCORE_COLUMNS, batch_asw, get_batches, graph_connectivity,
                                    harmony_embedding, integration_scores, isolated_label_asw, isolated_labels,
                                    knn_ilisi, knn_indices, plot_integration)
from scfoundation.simulate import SimConfig, simulate


@pytest.fixture(scope="module")
def batched():
    "Simulated cells in three batches with a strong batch effect, PCA and Harmony in obsm."
    adata = simulate(SimConfig(n_cells=360, n_genes=80, n_tfs=10, n_cell_types=3, lineage_depth=1, n_batches=3,
                               batch_effect_sd=0.3, seed=1))
    pca_baseline(adata, n_hvg=80, n_comps=15)
    harmony_embedding(adata, seed=0)
    return adata


def blobs(centres, per_blob=30, spread=0.1, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([np.asarray(centre, float) + rng.normal(0, spread, (per_blob, 2)) for centre in centres])


def test_batch_asw_mixed_beats_separated():
    labels = np.repeat(["T", "U"], 60)
    mixed_batches = np.tile(["b0", "b1"], 60)
    mixed = blobs([(0, 0), (0, 0), (9, 9), (9, 9)])                     # each type one blob, batches interleaved
    separated = blobs([(0, 0), (3, 0), (9, 9), (12, 9)])               # each type split by batch
    split_batches = np.repeat(["b0", "b1", "b0", "b1"], 30)
    assert batch_asw(mixed, mixed_batches, labels) > 0.85
    assert batch_asw(separated, split_batches, labels) < 0.3


def test_batch_asw_skips_single_batch_types_and_errors_when_none_left():
    embedding = blobs([(0, 0), (0, 0), (9, 9)])
    labels = np.repeat(["T", "T", "U"], 30)
    batches = np.repeat(["b0", "b1", "b0"], 30)
    alone = batch_asw(embedding, batches, labels)
    assert alone == pytest.approx(batch_asw(embedding[:60], batches[:60], labels[:60]))
    with pytest.raises(DataError, match="two or more batches"):
        batch_asw(embedding[60:], batches[60:], labels[60:])


def test_knn_ilisi_hand_cases():
    line = np.arange(40, dtype=float)[:, None]
    assert knn_ilisi(line, np.tile(["a", "a", "b", "b"], 10), n_neighbors=2) == pytest.approx(1.0)
    assert knn_ilisi(line, np.repeat(["a", "b"], 20), n_neighbors=2) == pytest.approx(0.0)
    # three batches evenly among 3 neighbours of the middle cell of a triple: LISI 2 (two other batches, p = 1/2)
    triples = np.repeat(np.arange(10) * 100.0, 4)[:, None] + np.tile([0, 1, 2, 3], 10)[:, None]
    score = knn_ilisi(triples, np.tile(["a", "b", "c", "a"], 10), n_neighbors=3)
    assert 0 < score < 1
    with pytest.raises(DataError, match="one batch"):
        knn_ilisi(line, np.repeat("a", 40))


def test_knn_indices_exclude_self_and_cap_k():
    points = np.arange(5, dtype=float)[:, None]
    neighbours = knn_indices(points, n_neighbors=10)
    assert neighbours.shape == (5, 4)
    assert not (neighbours == np.arange(5)[:, None]).any()
    with pytest.raises(DataError, match="two cells"):
        knn_indices(points[:1])


def test_graph_connectivity_sees_split_types():
    labels = np.repeat(["T", "U"], 60)
    whole = blobs([(0, 0), (0, 0.2), (50, 50), (50, 50.2)])
    split = blobs([(0, 0), (100, 0), (50, 50), (50, 50.2)])            # type T in two far islands
    assert graph_connectivity(whole, labels, n_neighbors=5) == pytest.approx(1.0)
    assert graph_connectivity(split, labels, n_neighbors=5) == pytest.approx(0.75)   # (0.5 + 1) / 2


def test_isolated_labels_and_asw():
    labels = np.repeat(["T", "U", "V"], 30)
    batches = np.r_[np.tile(["b0", "b1"], 15), np.tile(["b0", "b1"], 15), np.repeat("b0", 30)]
    assert isolated_labels(labels, batches) == ["V"]
    apart = blobs([(0, 0), (10, 0), (50, 50)])
    on_top = blobs([(0, 0), (10, 0), (10, 0)])
    assert isolated_label_asw(apart, labels, batches) > 0.95
    assert isolated_label_asw(on_top, labels, batches) < isolated_label_asw(apart, labels, batches) - 0.3
    # every label in every batch: all labels are isolated (scib's definition)
    assert isolated_labels(labels[:60], batches[:60]) == ["T", "U"]


def test_get_batches_errors_name_the_fix(batched):
    with pytest.raises(DataError, match="batch_key="):
        get_batches(batched, "sample")
    with pytest.raises(DataError, match="at least two batches"):
        get_batches(batched[batched.obs["batch"] == "batch0"], "batch")
    missing = batched.copy()
    missing.obs["batch"] = missing.obs["batch"].astype(object)
    missing.obs.iloc[0, missing.obs.columns.get_loc("batch")] = None
    with pytest.raises(DataError, match="missing"):
        get_batches(missing, "batch")


def test_harmony_mixes_batches_and_is_deterministic(batched):
    before = batched.obsm["X_harmony"].copy()
    again = harmony_embedding(batched.copy(), seed=0)
    np.testing.assert_allclose(again, before, atol=1e-5)
    assert before.shape == batched.obsm["X_pca_hvg"].shape
    batches = batched.obs["batch"].astype(str).to_numpy()
    assert knn_ilisi(before, batches) > knn_ilisi(batched.obsm["X_pca_hvg"], batches) + 0.2


def test_harmony_bad_input(batched):
    with pytest.raises(DataError, match="not found"):
        harmony_embedding(batched.copy(), basis="X_missing")
    with pytest.raises(DataError, match="batch_key="):
        harmony_embedding(batched.copy(), batch_key="donor")


def test_integration_scores_table(batched):
    obs_before, keys_before = batched.obs.copy(), set(batched.obsm)
    table = integration_scores(batched, ["X_pca_hvg", "X_harmony"])
    assert list(table.columns) == SCORE_COLUMNS and list(table.index) == ["X_pca_hvg", "X_harmony"]
    values = table[BATCH_METRICS + BIO_METRICS].drop(columns="ARI").to_numpy()
    assert ((values >= -1e-6) & (values <= 1 + 1e-6)).all() and (table["ARI"].abs() <= 1).all()
    np.testing.assert_allclose(table["overall"], 0.4 * table["batch_score"] + 0.6 * table["bio_score"])
    np.testing.assert_allclose(table["batch_score"], table[BATCH_METRICS].mean(axis=1))
    assert table.loc["X_harmony", "batch_score"] > table.loc["X_pca_hvg", "batch_score"]
    pd.testing.assert_frame_equal(batched.obs, obs_before)                  # the user's AnnData is unchanged
    assert set(batched.obsm) == keys_before
    pd.testing.assert_frame_equal(integration_scores(batched, "X_harmony"), table.loc[["X_harmony"]])


def test_integration_scores_bad_input(batched):
    with pytest.raises(DataError, match="not found"):
        integration_scores(batched, ["X_pca_hvg", "X_nope"])
    broken = batched.copy()
    broken.obsm["X_nan"] = broken.obsm["X_pca_hvg"].copy()
    broken.obsm["X_nan"][0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        integration_scores(broken, ["X_nan"])
    with pytest.raises(DataError, match="label_key"):
        integration_scores(batched, ["X_pca_hvg"], label_key="celltype")


def test_plot_integration_returns_figure(batched, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import scfoundation.integrate as integrate
    monkeypatch.setattr(integrate, "umap_coordinates", lambda embedding, seed=0: embedding[:, :2])  # skip UMAP's compile
    fig = plot_integration(batched, ["X_pca_hvg", "X_harmony"])
    assert fig.axes[0].get_title().startswith("X_pca_hvg") and len(fig.axes) == 4
