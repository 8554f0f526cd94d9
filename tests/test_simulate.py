"""Tests of scfoundation.simulate: configuration checks, the generative model, the truth, chunked output."""
import dataclasses

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scfoundation.data import DataError
from scfoundation.genes import gene_table
from scfoundation.simulate import (BLOCK_CELLS, SimConfig, SimulationError, parse_perturbation, program_weights,
                                   propagate, random_perturbations, sample_negative_binomial, simulate,
                                   simulate_to_h5ad)

SMALL = SimConfig(n_cells=700, n_genes=150, n_tfs=15, n_cell_types=4, lineage_depth=2, n_batches=2,
                  perturbations=("ko:tf0", "kd:tf1+oe:tf2", "oe:gene5"), seed=7)


@pytest.fixture(scope="module")
def small():
    return simulate(SMALL)


# --- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, words", [
    (dict(n_cells=0), "n_cells"), (dict(n_genes=1), "n_genes"), (dict(n_cells=2.5), "integer"),
    (dict(dispersion_range=(-0.1, 0.5)), "dispersion"), (dict(dispersion_range=(0.5, 0.1)), "dispersion"),
    (dict(n_tfs=150), "n_tfs"), (dict(edge_density=1.5), "edge_density"), (dict(dropout=1.0), "dropout"),
    (dict(library_log_sd=-1), "standard deviation"), (dict(knockdown_factor=2.0), "knockdown_factor"),
    (dict(perturbations=("xx:tf0",)), "kind"), (dict(perturbations=("ko:tf15",)), "tf15 does not exist"),
    (dict(perturbations=("ko:gene150",)), "gene150 does not exist"), (dict(perturbations=("ko:tf0", "ko:tf0")), "duplicates"),
    (dict(perturbations=("ko:tf0+kd:tf0",)), "twice"), (dict(n_cell_types=0), "n_cell_types"),
])
def test_bad_config_names_the_problem(changes, words):
    with pytest.raises(SimulationError, match=words):
        dataclasses.replace(SMALL, **changes)


def test_more_perturbed_genes_than_genes():
    with pytest.raises(SimulationError, match="perturbs 3 genes"):
        SimConfig(n_genes=2, n_tfs=1, perturbations=("ko:gene0+kd:gene1+oe:tf0",))


def test_simulation_error_is_a_data_error():
    assert issubclass(SimulationError, DataError) and issubclass(SimulationError, ValueError)


def test_unknown_symbol_fails_at_simulate_time():
    with pytest.raises(SimulationError, match="not among the simulated genes"):
        simulate(dataclasses.replace(SMALL, perturbations=("ko:NOTAGENE",)))


def test_config_round_trips_through_dict_and_h5ad(small, tmp_path):
    assert SimConfig.from_dict(SMALL.to_dict()) == SMALL
    small.write_h5ad(tmp_path / "small.h5ad")
    assert SimConfig.from_dict(ad.read_h5ad(tmp_path / "small.h5ad").uns["sim_config"]) == SMALL
    with pytest.raises(SimulationError, match=r"SimConfig has unknown keys \['colour'\]"):
        SimConfig.from_dict({**SMALL.to_dict(), "colour": 1})
    assert SimConfig.from_json(SMALL.to_json()) == SMALL and isinstance(SimConfig.from_json(SMALL.to_json()).perturbations, tuple)


def test_parse_and_random_perturbations():
    assert parse_perturbation("ko:tf1+oe:GATA1") == [("ko", "tf1"), ("oe", "GATA1")]
    specs = random_perturbations(10, n_tfs=4, seed=3)
    assert specs == random_perturbations(10, n_tfs=4, seed=3) and len(set(specs)) == 10
    assert all(1 <= len(parse_perturbation(spec)) <= 2 for spec in specs)
    with pytest.raises(SimulationError, match="only 3 distinct"):
        random_perturbations(4, n_tfs=1, max_genes=1)


# --- building blocks -----------------------------------------------------------------------------

def test_propagate_is_exact_on_a_chain_and_identity_without_tfs():
    chain = np.array([[0.0, 0.5, 0.2], [0.0, 0.0, -1.0]])   # TF0 → TF1 (0.5), TF0 → g2 (0.2), TF1 → g2 (-1)
    np.testing.assert_allclose(propagate(np.array([2.0, 0, 0]), chain, np.array([0, 1])), [2.0, 1.0, 0.4 - 1.0])
    np.testing.assert_allclose(propagate(np.ones((2, 3)), np.zeros((0, 3)), np.array([], dtype=int)), np.ones((2, 3)))


def test_program_weights_ramp_level_by_level():
    weights = program_weights(np.linspace(0, 1, 7), depth=3)
    assert weights.shape == (7, 3) and (np.diff(weights, axis=0) >= 0).all()
    np.testing.assert_allclose(weights[0], 0) ; np.testing.assert_allclose(weights[-1], 1)


@pytest.mark.parametrize("mean, dispersion", [(0.1, 0.2), (2.0, 0.5), (8.0, 1.0), (40.0, 0.1)])
def test_negative_binomial_moments(mean, dispersion):
    draws = sample_negative_binomial(np.full((100_000, 1), mean), np.array([dispersion]), np.random.default_rng(1)).toarray()
    variance = mean + dispersion * mean**2
    assert abs(draws.mean() - mean) < 5 * np.sqrt(variance / draws.size)
    assert abs(draws.var() / variance - 1) < 0.06
    assert abs((draws == 0).mean() - (1 + dispersion * mean) ** (-1 / dispersion)) < 0.006


# --- the simulated AnnData -----------------------------------------------------------------------

def test_shapes_types_and_labels(small):
    assert small.shape == (700, 150) and small.X.format == "csr" and small.X.dtype == np.float32
    assert np.array_equal(small.X.data, np.round(small.X.data)) and (small.X.data > 0).all()
    assert list(small.obs.columns[:4]) == ["cell_type", "batch", "perturbation", "pseudotime"]
    assert list(small.obs["perturbation"].cat.categories) == ["control", *SMALL.perturbations]
    assert small.obs["pseudotime"].between(0, 1).all()
    coding = gene_table().query("gene_type == 'protein-coding'")["symbol"]
    assert small.var_names.is_unique and small.var_names.isin(coding).all()
    assert small.var["is_tf"].sum() == 15 and sorted(small.var.loc[small.var["is_tf"], "tf_order"]) == list(range(15))


def test_same_seed_same_data_other_seed_other_data(small):
    again = simulate(SMALL)
    assert (again.X != small.X).nnz == 0 and again.obs.equals(small.obs)
    other = simulate(dataclasses.replace(SMALL, seed=8))
    assert (other.X != small.X).nnz > 0 and list(other.var_names) != list(small.var_names)


def test_library_sizes_follow_the_truth(small):
    totals = np.asarray(small.X.sum(axis=1)).ravel()
    truth_library = small.obs["library_size"].to_numpy()
    control = (small.obs["perturbation"] == "control").to_numpy()
    assert np.corrcoef(np.log(totals[control]), np.log(truth_library[control]))[0, 1] > 0.95
    log_library = np.log(truth_library) - SMALL.library_log_mean
    shift = pd.Series(log_library).groupby(small.obs["batch"].cat.codes.to_numpy()).mean().to_numpy()
    np.testing.assert_allclose(shift, small.uns["truth"]["batch_depth_shift"], atol=4 * SMALL.library_log_sd / np.sqrt(200))


def test_cell_types_carry_their_markers(small):
    truth = small.uns["truth"]
    normalised = small.X.toarray() / small.X.sum(axis=1).A
    mature = (small.obs["pseudotime"] == 1).to_numpy() & (small.obs["perturbation"] == "control").to_numpy()
    for row, name in enumerate(truth["cell_types"]):
        others = np.delete(truth["cell_type_log_effect"], row, axis=0).mean(axis=0)
        marker = np.argmax(truth["cell_type_log_effect"][row] - others)
        in_type = mature & (small.obs["cell_type"] == name).to_numpy()
        assert normalised[in_type, marker].mean() > normalised[mature & ~in_type, marker].mean()


def test_lineage_is_a_nested_tree(small):
    lineage = pd.DataFrame(small.uns["truth"]["lineage"])
    leaves = set(small.uns["truth"]["cell_types"])
    assert leaves <= set(lineage["node"]) and (lineage.loc[lineage["level"] == 1, "parent"] == "").all()
    deeper = lineage[lineage["level"] > 1]
    assert all(node.startswith(parent + ".") for node, parent in zip(deeper["node"], deeper["parent"]))


def test_network_is_a_dag_from_tfs(small):
    edges = pd.DataFrame(small.uns["truth"]["network"])
    tf_order = small.var["tf_order"]
    assert len(edges) > 0 and small.var.loc[edges["regulator"], "is_tf"].all()
    to_tf = small.var.loc[edges["target"], "is_tf"].to_numpy()
    assert (tf_order[edges["regulator"]].to_numpy()[to_tf] < tf_order[edges["target"]].to_numpy()[to_tf]).all()
    assert (np.sign(edges["weight"]) == edges["sign"]).all()
    assert list(small.uns["truth"]["tfs"]) == list(tf_order[tf_order >= 0].sort_values().index)


def test_perturbation_truth_is_exact_and_seen_in_counts(small):
    truth, var = small.uns["truth"]["perturbations"], small.var
    tfs = small.uns["truth"]["tfs"]
    assert list(truth["name"]) == list(SMALL.perturbations)
    assert list(truth["n_cells"]) == [int((small.obs["perturbation"] == name).sum()) for name in SMALL.perturbations]
    knocked = var.index.get_loc(tfs[0])
    ko_cells = (small.obs["perturbation"] == "ko:tf0").to_numpy()
    assert small.X[ko_cells][:, knocked].sum() == 0 and truth["mean_perturbed"][0, knocked] == 0
    assert truth["knocked_out"][0, knocked] and truth["knocked_out"].sum() == 1
    np.testing.assert_allclose(truth["log_effect"][0, knocked], np.log(SMALL.knockout_signal))
    # a non-TF gene perturbed alone changes only itself
    assert np.count_nonzero(truth["log_effect"][2]) == 1 and truth["log_effect"][2, 5] == pytest.approx(np.log(4.0))
    # the direct targets of tf0 move by weight × log(knockout_signal) plus paths through other TFs
    edges = pd.DataFrame(small.uns["truth"]["network"]).query("regulator == @tfs[0]")
    non_tf_targets = edges[~var.loc[edges["target"], "is_tf"].to_numpy()]
    if len(non_tf_targets):
        columns = var.index.get_indexer(non_tf_targets["target"])
        assert (np.sign(truth["log_effect"][0, columns]) != 0).all()
    # the recorded mean response matches the observed counts on average
    observed = small.X[(small.obs["perturbation"] == "oe:gene5").to_numpy()][:, 5].mean()
    assert abs(observed / truth["mean_perturbed"][2, 5] - 1) < 0.35
    assert truth["mean_perturbed"][2, 5] > 2 * truth["mean_control"][2, 5]


def test_dropout_adds_zeros():
    plain = simulate(dataclasses.replace(SMALL, perturbations=()))
    dropped = simulate(dataclasses.replace(SMALL, perturbations=(), dropout=0.5))
    assert dropped.X.nnz < 0.6 * plain.X.nnz


@pytest.mark.parametrize("changes", [dict(n_cells=1), dict(n_tfs=0), dict(n_cell_types=1, lineage_depth=3),
                                     dict(n_batches=1, lineage_depth=1), dict(edge_density=0.0, program_fraction=0.0),
                                     dict(perturbed_fraction=1.0)])
def test_edge_cases_run(changes):
    if changes.get("n_tfs") == 0: changes = {**changes, "perturbations": ("ko:gene0",)}
    config = dataclasses.replace(SMALL, **changes)
    adata = simulate(config)
    assert adata.shape == (config.n_cells, config.n_genes) and adata.X.sum() > 0
    if config.perturbed_fraction == 1.0: assert (adata.obs["perturbation"] != "control").all()


# --- chunked output --------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [1, 300, 10_000])
def test_h5ad_is_identical_to_in_memory(tmp_path, chunk_size):
    config = dataclasses.replace(SMALL, n_cells=BLOCK_CELLS + 77)
    simulate(config).write_h5ad(tmp_path / "whole.h5ad")                     # what writing the in-memory result gives
    expected = ad.read_h5ad(tmp_path / "whole.h5ad")
    written = ad.read_h5ad(simulate_to_h5ad(config, tmp_path / "sim.h5ad", chunk_size=chunk_size))
    assert (written.X != expected.X).nnz == 0 and written.X.dtype == np.float32
    pd.testing.assert_frame_equal(written.obs, expected.obs, check_categorical=False)   # (category order aside)
    pd.testing.assert_frame_equal(written.var, expected.var, check_categorical=False)
    for key in ("log_effect", "mean_control", "mean_perturbed"):
        np.testing.assert_array_equal(written.uns["truth"]["perturbations"][key], expected.uns["truth"]["perturbations"][key])
    np.testing.assert_array_equal(written.uns["truth"]["network"]["weight"], expected.uns["truth"]["network"]["weight"])


def test_h5ad_bad_chunk_size(tmp_path):
    with pytest.raises(SimulationError, match="chunk_size"):
        simulate_to_h5ad(SMALL, tmp_path / "x.h5ad", chunk_size=0)


def test_simulate_accepts_field_changes():
    adata = simulate(SMALL, n_cells=50, seed=1)
    assert adata.n_obs == 50 and adata.uns["sim_config"]["seed"] == 1
    with pytest.raises(SimulationError, match="n_cells"):
        simulate(SMALL, n_cells=0)


def test_h5ad_memory_does_not_grow_with_cells(tmp_path):
    import tracemalloc
    def peak_bytes(n_blocks):
        config = dataclasses.replace(SMALL, n_cells=n_blocks * BLOCK_CELLS, n_genes=300, perturbations=())
        tracemalloc.start()
        simulate_to_h5ad(config, tmp_path / f"{n_blocks}.h5ad", chunk_size=BLOCK_CELLS)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak, ad.read_h5ad(tmp_path / f"{n_blocks}.h5ad").X
    peak_bytes(1)  # warm-up: one-off allocations (gene table cache, imports) must not count
    small_peak, _ = peak_bytes(2)
    large_peak, large_X = peak_bytes(8)
    whole_matrix = large_X.data.nbytes + large_X.indices.nbytes + large_X.indptr.nbytes
    assert large_peak - small_peak < 0.25 * whole_matrix
