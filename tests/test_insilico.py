"""The in-silico perturbation chapter's API: token edits, shifts, the simulator's truth, the DE baseline, scoring, bad input."""
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scfoundation.data import DataError
from scfoundation.insilico import (candidate_genes, de_baseline, insert_front, insilico_benchmark, insilico_perturb,
                                   network_matrix, perturb_batch, ranking_table, remove_tokens, shift_measures, true_shift)
from scfoundation.model import ModelConfig, SCFModel
from scfoundation.simulate import simulate
from scfoundation.tokenization import CellDataset, collate
from scfoundation.train import TrainConfig, build_model, training_stream


def tiny_model(sim, **overrides) -> SCFModel:
    "An untrained (seeded) small model with the tokenizer pretraining would give it."
    config = ModelConfig.named("teaching", d_model=32, n_layers=1, n_heads=2, d_ff=64, **overrides)
    return build_model(config, training_stream(sim, config, TrainConfig(batch_size=8)).tokenizer).eval()


@pytest.fixture(scope="module")
def world():
    "A small simulation and an untrained rank-value model with its tokenizer."
    sim = simulate(n_cells=160, n_genes=60, n_tfs=8, edge_density=0.3, n_cell_types=2, lineage_depth=1,
                   n_batches=1, perturbations=("ko:tf0",), perturbed_fraction=0.2, seed=1)
    model = tiny_model(sim)
    return sim, model, model.tokenizer


def masks(sim):
    control = (sim.obs["perturbation"] == "control").to_numpy()
    types = list(sim.uns["truth"]["cell_types"])
    return ((sim.obs["cell_type"] == types[0]).to_numpy() & control, (sim.obs["cell_type"] == types[1]).to_numpy() & control, types)


def toy_batch():
    return collate([{"input_ids": np.array([2, 10, 11, 12])}, {"input_ids": np.array([2, 11, 13])}])


def test_remove_and_insert_keep_order_and_padding():
    batch = toy_batch()
    removed = remove_tokens(batch, batch["input_ids"] == 10)
    assert removed["input_ids"].tolist() == [[2, 11, 12], [2, 11, 13]]
    assert removed["attention_mask"].all()
    front = insert_front(removed, {"input_ids": 13, "attention_mask": True}, max_len=3)
    assert front["input_ids"].tolist() == [[2, 13, 11], [2, 13, 11]]
    with pytest.raises(DataError, match="<cls>"): remove_tokens(batch, torch.ones_like(batch["attention_mask"]))


def test_perturb_batch_rank_bins_continuous():
    batch = toy_batch()
    rank = ModelConfig.named("teaching", vocab_size=20, max_len=4)
    assert perturb_batch(batch, 11, "delete", rank)["input_ids"].tolist() == [[2, 10, 12], [2, 13, 0]]
    assert perturb_batch(batch, 13, "overexpress", rank)["input_ids"].tolist() == [[2, 13, 10, 11], [2, 13, 11, 0]]
    continuous = {**batch, "values": torch.tensor([[0.0, 1.0, 3.0, 2.0], [0.0, 0.5, 0.75, 0.0]]),
                  "expressed_mask": batch["attention_mask"].clone(), "depth": torch.ones(2, 2)}
    config = ModelConfig.named("teaching", vocab_size=20, max_len=8, input_kind="continuous")
    deleted = perturb_batch(continuous, 11, "delete", config)
    assert deleted["values"].tolist() == [[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.75, 0.0]]
    assert deleted["expressed_mask"][:, 1:3].tolist() == [[True, False], [False, True]]
    over = perturb_batch(continuous, 10, "overexpress", config)
    assert over["input_ids"][:, 1].tolist() == [10, 10] and over["values"][:, 1].tolist() == pytest.approx([3.0, 0.75])
    assert torch.equal(over["depth"], continuous["depth"]) and over["expressed_mask"][:, 1].all()
    binned = {**batch, "value_ids": torch.tensor([[0, 3, 5, 2], [0, 4, 2, 0]])}
    bins = ModelConfig.named("teaching", vocab_size=20, max_len=8, input_kind="bins", n_bins=7)
    assert perturb_batch(binned, 11, "delete", bins)["value_ids"].tolist() == [[0, 3, 1, 2], [0, 1, 2, 0]]  # bin 1: not expressed
    assert perturb_batch(binned, 12, "overexpress", bins)["value_ids"].tolist() == [[0, 7, 3, 5], [0, 7, 4, 2]]
    with pytest.raises(DataError, match="delete"): perturb_batch(batch, 11, "silence", rank)


def test_shift_measures_geometry():
    out = shift_measures(np.array([[2.0, 0.0]]), np.array([[0.0, 0.0]]), np.array([0.0, 0.0]), np.array([4.0, 0.0]))
    assert out["toward_target"][0] == pytest.approx(0.5)


def test_deletion_equals_retokenizing_without_the_gene(world):
    "Deleting a token must give the embedding of the same cells whose counts of that gene are zero."
    sim, model, tokenizer = world
    source, target, _ = masks(sim)
    counts = sp.csr_matrix(sim.X)
    gene = sim.var_names[np.argmax(np.asarray((counts[source] > 0).mean(0)).ravel())]
    shifts = insilico_perturb(model, sim, [gene], tokenizer, source, target, max_cells=None, batch_size=16)
    column = sim.var_names.get_loc(gene)
    expressing = np.asarray(counts[source][:, column].todense()).ravel() > 0
    assert shifts.loc[gene, "n_cells_changed"] == expressing.sum()
    knocked = sim.copy(); knocked.X = sp.csr_matrix(knocked.X); knocked.X[:, column] = 0; knocked.X.eliminate_zeros()
    embed = lambda data, cells: model.embed(collate(CellDataset(data, tokenizer).__getitems__(np.flatnonzero(cells)))).numpy()
    before, after, target_mean = embed(sim, source), embed(knocked, source), embed(sim, target).mean(0)
    axis = target_mean - before.mean(0)
    expected = ((after - before) @ axis / (axis @ axis)).mean()
    assert shifts.loc[gene, "toward_target"] == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_overexpress_changes_every_cell_and_data_unchanged(world):
    sim, model, tokenizer = world
    source, target, _ = masks(sim)
    before = sim.copy()
    genes = list(sim.var_names[:3])
    shifts = insilico_perturb(model, sim, genes, tokenizer, source, target, mode="overexpress", max_cells=10, seed=3)
    assert (shifts["n_cells_changed"] == 10).all() and (shifts["embedding_shift"] > 0).all()
    again = insilico_perturb(model, sim, genes, None, source, target, mode="overexpress", max_cells=10, seed=3)
    pd.testing.assert_frame_equal(shifts, again)                          # tokenizer None: the model's
    assert (sim.X != before.X).nnz == 0 and sim.obs.equals(before.obs) and sim.uns.keys() == before.uns.keys()


def test_insilico_perturb_bad_input(world):
    sim, model, tokenizer = world
    source, target, _ = masks(sim)
    with pytest.raises(DataError, match="var_names"): insilico_perturb(model, sim, ["NOPE"], tokenizer, source, target)
    with pytest.raises(DataError, match="empty"): insilico_perturb(model, sim, [], tokenizer, source, target)
    with pytest.raises(DataError, match="boolean mask"): insilico_perturb(model, sim, [sim.var_names[0]], tokenizer, source.astype(int), target)
    with pytest.raises(DataError, match="selects no cells"): insilico_perturb(model, sim, [sim.var_names[0]], tokenizer, source, target & False)
    with pytest.raises(DataError, match="mode"): insilico_perturb(model, sim, [sim.var_names[0]], tokenizer, source, target, mode="up")


def test_network_matrix_and_true_shift_by_hand(world):
    sim, _, _ = world
    weights, tf_columns = network_matrix(sim)
    truth = sim.uns["truth"]
    assert (weights != 0).sum() == len(truth["network"]["weight"])
    _, _, types = masks(sim)
    step = truth["cell_type_log_effect"][1] - truth["cell_type_log_effect"][0]
    log_ko = np.log(sim.uns["sim_config"]["knockout_signal"])
    tau = true_shift(sim, types[0], types[1])
    # a TF whose targets are all non-TFs: its knockout moves itself and its direct targets only
    last_tf = tf_columns[-1]
    children = np.flatnonzero(weights[-1])
    assert not np.isin(children, tf_columns).any()
    expected = log_ko * (step[last_tf] + weights[-1, children] @ step[children]) / (step @ step)
    assert tau.iloc[last_tf] == pytest.approx(expected)
    with pytest.raises(DataError, match="not simulated"): true_shift(sim, types[0], "nope")
    import anndata as ad
    with pytest.raises(DataError, match="simulate"): network_matrix(ad.AnnData(np.ones((2, 2))))


def test_de_baseline_matches_dense_computation(world):
    sim, _, _ = world
    source, target, _ = masks(sim)
    dense = sim.X.toarray()
    logged = np.log1p(1e4 * dense / dense.sum(1, keepdims=True))
    expected = logged[source].mean(0) - logged[target].mean(0)
    np.testing.assert_allclose(de_baseline(sim, list(sim.var_names), source, target).to_numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(de_baseline(sim, list(sim.var_names), source, target, mode="overexpress").to_numpy(), -expected, rtol=1e-4, atol=1e-5)


def test_ranking_table_and_candidates(world):
    sim, _, _ = world
    truth = pd.Series(np.linspace(-1, 1, 20), index=[f"g{i}" for i in range(20)])
    table = ranking_table({"right": truth, "noise": pd.Series(np.random.default_rng(0).normal(size=20), index=truth.index)}, truth, threshold=0.5, k=3)
    assert table.loc["right", "spearman"] == pytest.approx(1) and table.loc["right", "auroc"] == 1 and table.loc["right", "precision@3"] == 1
    assert table.loc["noise", "spearman"] < 1 and table["positive_rate"].iloc[0] == pytest.approx((truth > 0.5).mean())
    with pytest.raises(DataError, match="threshold"): ranking_table({"x": truth}, truth, threshold=5)
    source, _, _ = masks(sim)
    genes = candidate_genes(sim, source, min_expressed=0.9)
    share = np.asarray((sp.csr_matrix(sim.X)[source] > 0).mean(0)).ravel()
    assert set(genes) == set(sim.var_names[share >= 0.9])


def test_benchmark_runs_and_is_deterministic(world):
    sim, model, tokenizer = world
    _, _, types = masks(sim)
    table, per_gene = insilico_benchmark(model, sim, tokenizer, types[0], types[1], min_expressed=0.8, max_cells=8, threshold=0.0)
    assert list(table.columns[:3]) == ["spearman", "auroc", "precision@10"]
    assert "baseline: DE (source - target)" in table.index and table["spearman"].between(-1, 1).all()
    table_again, _ = insilico_benchmark(model, sim, None, types[0], types[1], min_expressed=0.8, max_cells=8, threshold=0.0)
    pd.testing.assert_frame_equal(table, table_again)
    assert per_gene["true_shift"].equals(true_shift(sim, types[0], types[1], list(per_gene.index)))


def test_value_models_delete_by_zeroing_and_overexpress_by_inserting(world):
    "Binned and continuous (asymmetric) models: deletion touches only expressing cells, overexpression every cell."
    sim, _, _ = world
    source, target, _ = masks(sim)
    gene = sim.var_names[np.argmax(np.asarray((sp.csr_matrix(sim.X)[source] > 0).mean(0)).ravel())]
    expressing = int((np.asarray(sp.csr_matrix(sim.X)[source][:, sim.var_names.get_loc(gene)].todense()).ravel() > 0).sum())
    for overrides in (dict(input_kind="bins", n_bins=11), dict(input_kind="continuous", asymmetric=True, max_len=64)):
        model = tiny_model(sim, **overrides)
        deleted = insilico_perturb(model, sim, [gene], None, source, target, max_cells=None)
        over = insilico_perturb(model, sim, [gene], None, source, target, mode="overexpress", max_cells=None)
        assert deleted.loc[gene, "n_cells_changed"] <= expressing and deleted.loc[gene, "embedding_shift"] > 0
        assert over.loc[gene, "n_cells_changed"] == source.sum() and np.isfinite(over.to_numpy(dtype=float)).all()
