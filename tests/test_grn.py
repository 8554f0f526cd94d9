"""The network chapter's API: true edges, correlation baseline, embedding and attention scores, AUPRC table, bad input."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from scfoundation.data import DataError
from scfoundation.data import log_normalise
from scfoundation.evaluate import gene_embeddings
from scfoundation.grn import (AttentionRecorder, attention_weights, auprc_table, correlation_baseline,
                              edge_scores_from_attention, edge_scores_from_embeddings, grn_benchmark, long_scores,
                              truth_edges)
from scfoundation.model import ModelConfig, TokenLayout, encoder_keep
from scfoundation.simulate import simulate
from scfoundation.tokenization import CellDataset, collate
from scfoundation.train import TrainConfig, build_model, training_stream


def tiny_model(sim, **overrides):
    "An untrained (seeded) small model with the tokenizer pretraining would give it; (model, vocab, tokenizer)."
    config = ModelConfig.named("teaching", d_model=32, n_layers=2, n_heads=2, d_ff=64, **overrides)
    model = build_model(config, training_stream(sim, config, TrainConfig(batch_size=8)).tokenizer).eval()
    return model, model.tokenizer.vocab, model.tokenizer


@pytest.fixture(scope="module")
def world():
    sim = simulate(n_cells=120, n_genes=50, n_tfs=6, edge_density=0.3, n_cell_types=2, lineage_depth=1, n_batches=1, seed=2)
    return (sim, *tiny_model(sim))


def test_truth_edges_and_long_scores(world):
    sim = world[0]
    edges = truth_edges(sim)
    assert len(edges) == len(sim.uns["truth"]["network"]["weight"]) > 0
    assert set(edges["regulator"]) <= set(sim.uns["truth"]["tfs"]) and set(edges["target"]) <= set(sim.var_names)
    table = long_scores(np.arange(6).reshape(2, 3), ["a", "b"], ["a", "b", "c"])
    assert list(zip(table["regulator"], table["target"], table["score"])) == [("a", "b", 1), ("a", "c", 2), ("b", "a", 3), ("b", "c", 5)]
    with pytest.raises(DataError, match="simulate"): truth_edges(ad.AnnData(np.ones((2, 2))))


def test_auprc_table_perfect_random_and_errors():
    truth = pd.DataFrame({"regulator": ["r", "r"], "target": ["a", "b"]})
    pairs = long_scores(np.array([[0.9, 0.8, 0.1, 0.2]]), ["r"], ["a", "b", "c", "d"])
    table = auprc_table({"perfect": pairs, "worst": pairs.assign(score=-pairs["score"])}, truth)
    assert table.loc["perfect", "auprc"] == pytest.approx(1) and table.loc["perfect", "early_precision"] == 1
    assert table.loc["worst", "auroc"] == 0 and table.loc["perfect", "random_auprc"] == pytest.approx(0.5)
    assert table.loc["perfect", "auprc_ratio"] == pytest.approx(2)
    with pytest.raises(DataError, match="regulator, target, score"): auprc_table({"x": pairs.drop(columns="score")}, truth)
    with pytest.raises(DataError, match="NaN"): auprc_table({"x": pairs.assign(score=np.nan)}, truth)
    with pytest.raises(DataError, match="both edges and non-edges"): auprc_table({"x": pairs[2:]}, truth)


def test_correlation_baseline_against_numpy_and_scipy(world):
    sim = world[0]
    tfs, genes = list(sim.uns["truth"]["tfs"]), list(sim.var_names)
    dense = sim.X.toarray()
    logged = np.log1p(1e4 * dense / dense.sum(1, keepdims=True))
    pearson = correlation_baseline(sim, tfs, genes).set_index(["regulator", "target"])["score"]
    spearman = correlation_baseline(sim, tfs, genes, "spearman").set_index(["regulator", "target"])["score"]
    regulator, target = tfs[0], genes[-1]
    columns = sim.var_names.get_loc(regulator), sim.var_names.get_loc(target)
    assert pearson[(regulator, target)] == pytest.approx(abs(np.corrcoef(logged[:, columns[0]], logged[:, columns[1]])[0, 1]), rel=1e-4)
    stored = log_normalise(sim).toarray()  # the same float32 matrix, so that ties are the same
    assert spearman[(regulator, target)] == pytest.approx(abs(spearmanr(stored[:, columns[0]], stored[:, columns[1]]).statistic), rel=1e-4)
    assert len(pearson) == len(tfs) * (len(genes) - 1)
    constant = sim.copy(); constant.X = constant.X.toarray(); constant.X[:, columns[1]] = 0.0  # never expressed: no variance
    assert correlation_baseline(constant, [regulator], [target])["score"].iloc[0] == 0
    with pytest.raises(DataError, match="var_names"): correlation_baseline(sim, ["NOPE"], genes)
    with pytest.raises(DataError, match="pearson"): correlation_baseline(sim, tfs, genes, "kendall")


def test_embedding_scores(world):
    sim, model, vocab, tokenizer = world
    genes = list(sim.var_names[:4])
    table = gene_embeddings(model, genes=genes, kind="input")
    np.testing.assert_array_equal(table.to_numpy(), model.embedding.gene.weight[vocab.ids(genes)].detach().numpy())
    scores = edge_scores_from_embeddings(table, genes[:1], genes[1:], absolute=False)
    vectors = table.to_numpy()
    expected = vectors[1:] @ vectors[0] / (np.linalg.norm(vectors[1:], axis=1) * np.linalg.norm(vectors[0]))
    np.testing.assert_allclose(scores["score"].to_numpy(), expected, rtol=1e-5)
    with pytest.raises(DataError, match="no embedding"): edge_scores_from_embeddings(table, genes[:1], ["NOPE"])


def test_benchmark_scores_evaluates_gene_embeddings(world):
    "The two embedding rows score exactly the cosines of evaluate.gene_embeddings (input, and contextual over the same cells)."
    sim, model, vocab, tokenizer = world
    _, scores = grn_benchmark(model, sim, max_cells=30, seed=1)
    regulators, targets = list(sim.uns["truth"]["tfs"]), list(sim.var_names)
    for kind in ("input", "contextual"):
        table = gene_embeddings(model, sim, targets, kind, max_cells=30, seed=1)
        expected = edge_scores_from_embeddings(table, regulators, targets)
        pd.testing.assert_frame_equal(scores[f"model: {kind} embedding cosine"], expected)


@pytest.mark.parametrize("kind", ["rank", "continuous"])
def test_attention_weights_reproduce_the_model(kind):
    "The recomputed weights times the values must equal what SDPA returns, with padding (and asymmetric masking)."
    sim = simulate(n_cells=12, n_genes=30, n_tfs=4, n_cell_types=2, lineage_depth=1, n_batches=1, seed=5)
    model, _, tokenizer = tiny_model(sim, input_kind=kind, asymmetric=kind == "continuous")
    batch = collate(CellDataset(sim, tokenizer).__getitems__(np.arange(6)))
    keep = encoder_keep(batch, model.config)
    layout = TokenLayout.from_keep(keep)
    assert layout.key_mask is not None  # cells of different lengths: the padding is exercised
    block = model.encoder.blocks[0]
    with torch.no_grad():
        packed = block.attention_norm(model.embedding(batch, keep))
        weights = attention_weights(block.attention, packed, layout)
        grid = layout.to_grid(block.attention.qkv(packed)).view(layout.batch_size, layout.width, 3, 2, -1)
        values = grid.permute(2, 0, 3, 1, 4)[2]
        mixed = (weights @ values).transpose(1, 2).reshape(layout.batch_size, layout.width, -1)
        torch.testing.assert_close(block.attention.out(layout.from_grid(mixed)), block.attention(packed, layout), atol=1e-5, rtol=1e-4)


def test_attention_scores_by_hand_and_hooks_removed(world):
    sim, model, vocab, tokenizer = world
    regulator, target = sim.var_names[0], sim.var_names[1]
    scores = edge_scores_from_attention(model, sim[:8], tokenizer, [regulator], [target], layers=[1], max_cells=None)
    batch = collate(CellDataset(sim[:8], tokenizer).__getitems__(np.arange(8)))
    with AttentionRecorder(model, [1]) as recorder: model.embed(batch)
    assert all(not block.attention._forward_pre_hooks for block in model.encoder.blocks)
    r_id, t_id, found = vocab.ids([regulator])[0], vocab.ids([target])[0], []
    for cell, ids in enumerate(batch["input_ids"].tolist()):
        if r_id in ids and t_id in ids: found.append(float(recorder.maps[0][cell, ids.index(t_id), ids.index(r_id)]))
    assert found, "the test needs cells expressing both genes"
    assert scores["score"].iloc[0] == pytest.approx(np.mean(found), rel=1e-5)
    forward = edge_scores_from_attention(model, sim, tokenizer, [regulator], [target], max_cells=30)["score"].iloc[0]
    backward = edge_scores_from_attention(model, sim, None, [target], [regulator], max_cells=30)["score"].iloc[0]
    both = edge_scores_from_attention(model, sim, tokenizer, [regulator], [target], direction="both", max_cells=30)["score"].iloc[0]
    assert both == pytest.approx((forward + backward) / 2)
    with pytest.raises(DataError, match="direction"): edge_scores_from_attention(model, sim, tokenizer, [regulator], [target], direction="up")
    with pytest.raises(DataError, match="var_names"): edge_scores_from_attention(model, sim, tokenizer, ["NOPE"], [target])


def test_benchmark_runs_leaves_data_alone_and_is_deterministic(world):
    sim, model, vocab, tokenizer = world
    before = sim.copy()
    table, scores = grn_benchmark(model, sim, tokenizer, max_cells=40)
    assert {"baseline: |Pearson|", "model: attention target→regulator"} <= set(table.index)
    assert (table["random_auprc"] == len(truth_edges(sim)) / table["n_pairs"]).all()
    assert table.loc["baseline: |Pearson|", "auprc"] > table.loc["baseline: |Pearson|", "random_auprc"]  # co-expression carries edges
    again, _ = grn_benchmark(model, sim, max_cells=40)                      # tokenizer None: the model's
    pd.testing.assert_frame_equal(table, again)
    assert (sim.X != before.X).nnz == 0 and sim.obs.equals(before.obs)
