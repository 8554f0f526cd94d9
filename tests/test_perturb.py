"""The perturbation chapter's API: design and split, observed and true responses, baselines, the head, scoring, bad input."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scfoundation.data import DataError
from scfoundation.perturb import (PerturbationHead, additive_baseline, design_perturbations, fit_perturbation_model,
                                  mean_baseline, observed_response, perturbation_benchmark, plot_response, predict_response,
                                  resolve_perturbation, response_scores, split_perturbations, true_response)
from scfoundation.simulate import SimConfig, simulate


@pytest.fixture(scope="module")
def screen():
    "A small simulated screen: 6 singles and 6 doubles built from them."
    specs = design_perturbations(n_tfs=12, n_singles=6, n_doubles=6, seed=3)
    adata = simulate(SimConfig(n_cells=900, n_genes=80, n_tfs=12, edge_density=0.15, n_batches=1,
                               perturbations=tuple(specs), perturbed_fraction=0.8, seed=2))
    return specs, adata


def test_design_is_seeded_and_builds_doubles_from_singles():
    specs = design_perturbations(20, 5, 4, kinds=("kd",), seed=1)
    assert specs == design_perturbations(20, 5, 4, kinds=("kd",), seed=1)
    assert specs != design_perturbations(20, 5, 4, kinds=("kd",), seed=2)
    singles, doubles = specs[:5], specs[5:]
    assert all(spec.startswith("kd:") for spec in singles) and len(doubles) == 4
    assert all(set(double.split("+")) <= set(singles) for double in doubles)
    for bad, match in [(dict(n_singles=0), "n_singles"), (dict(n_doubles=11), "at most 10"), (dict(kinds=("xx",)), "kinds")]:
        with pytest.raises(DataError, match=match):
            design_perturbations(**{"n_tfs": 20, "n_singles": 5, "n_doubles": 0, **bad})


def test_split_groups_follow_the_training_singles():
    specs = ["ko:tf0", "ko:tf1", "ko:tf2", "ko:tf3", "ko:tf0+ko:tf1", "ko:tf2+ko:tf3", "ko:tf0+ko:tf2", "ko:tf1+ko:tf3"]
    table = split_perturbations(specs, single_test_fraction=0.5, double_test_fraction=0.5, seed=0)
    train_singles = set(table.index[(table["split"] == "train") & (table["n_genes"] == 1)])
    assert len(train_singles) == 2 and (table.loc[table["n_genes"] == 2, "split"] == "test").sum() == 2
    for spec in specs[4:]:
        expected = f"double {sum(part in train_singles for part in spec.split('+'))}/2 seen"
        assert table.loc[spec, "group"] == expected
    assert (table.loc[specs[:4], "group"] == "single").all()
    with pytest.raises(DataError, match="3\\+ genes"):
        split_perturbations(["ko:tf0+ko:tf1+ko:tf2"])
    with pytest.raises(DataError, match="duplicates"):
        split_perturbations(["ko:tf0", "ko:tf0"])


def test_observed_response_matches_a_dense_computation(screen):
    specs, adata = screen
    before = adata.X.copy()
    observed = observed_response(adata)
    counts = adata.X.toarray()
    logged = np.log1p(1e4 * counts / counts.sum(axis=1, keepdims=True))
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    expected = logged[labels == specs[0]].mean(0) - logged[labels == "control"].mean(0)
    np.testing.assert_allclose(observed.loc[specs[0]].to_numpy(), expected, atol=1e-5)
    assert sorted(observed.index) == sorted(specs) and "control" not in observed.index
    assert (adata.X != before).nnz == 0                                  # the user's AnnData is unchanged


def test_observed_response_bad_input(screen):
    _, adata = screen
    with pytest.raises(DataError, match="perturbation_key="):
        observed_response(adata, perturbation_key="guide")
    with pytest.raises(DataError, match="control="):
        observed_response(adata, control="non-targeting")
    with pytest.raises(DataError, match="min_cells"):
        observed_response(adata, min_cells=10_000)


def test_true_response_agrees_with_observed_and_needs_truth(screen):
    _, adata = screen
    truth, observed = true_response(adata), observed_response(adata)
    assert truth.shape == observed.shape
    correlations = [np.corrcoef(truth.loc[name], observed.loc[name])[0, 1] for name in truth.index]
    assert np.median(correlations) > 0.7
    plain = ad.AnnData(sp.csr_matrix(np.ones((3, 2), np.float32)))
    with pytest.raises(DataError, match="observed_response"):
        true_response(plain)


def test_baselines_by_hand():
    train = pd.DataFrame([[1.0, -1.0], [3.0, 1.0], [0.5, 0.5]], index=["ko:a", "oe:b", "ko:a+oe:b"], columns=["g", "h"])
    np.testing.assert_allclose(mean_baseline(train, ["p", "q"]).to_numpy(), [[1.5, 0.5 / 3]] * 2)
    additive = additive_baseline(train, ["oe:b+ko:a", "ko:a+kd:c", "ko:a"])
    np.testing.assert_allclose(additive.loc["oe:b+ko:a"], [4.0, 0.0])
    assert additive.loc[["ko:a+kd:c", "ko:a"]].isna().all().all()


def test_resolve_perturbation():
    genes = ["A", "B", "C"]
    assert resolve_perturbation("ko:C+oe:A", genes) == [(0, 2), (2, 0)]
    assert resolve_perturbation("kd:tf0", genes, tfs=["B"]) == [(1, 1)]
    with pytest.raises(DataError, match="not among"):
        resolve_perturbation("ko:Z", genes)
    with pytest.raises(DataError):
        resolve_perturbation("knock:A", genes)


def test_head_is_additive_in_its_code_and_fits_a_toy():
    rng = np.random.default_rng(0)
    head = PerturbationHead(rng.normal(size=(4, 6)), hidden=8)
    single_a, single_b, double = head([[(0, 0)]]), head([[(0, 1)]]), head([[(0, 0), (0, 1)]])
    empty = head.bias.detach()
    torch.testing.assert_close(double - empty, (single_a - empty) + (single_b - empty), atol=1e-5, rtol=1e-5)
    responses = pd.DataFrame(-2 * np.eye(4), index=[f"ko:{g}" for g in "ABCD"], columns=list("ABCD"))
    features = rng.normal(size=(4, 6))
    fitted = fit_perturbation_model(features, responses, hidden=16, epochs=300, lr=1e-2, weight_decay=0, seed=0)
    np.testing.assert_allclose(predict_response(fitted, responses.index).to_numpy(), responses.to_numpy(), atol=0.1)
    barely = fit_perturbation_model(features, responses, hidden=16, epochs=5, lr=1e-2, weight_decay=0, seed=0)
    assert barely.final_loss > 10 * fitted.final_loss                      # training is what fits it


def test_fit_bad_input():
    responses = pd.DataFrame(np.zeros((1, 3)), index=["ko:A"], columns=list("ABC"))
    with pytest.raises(DataError, match="same AnnData"):
        fit_perturbation_model(np.zeros((2, 4)), responses)
    with pytest.raises(DataError, match="not among"):
        fit_perturbation_model(np.zeros((3, 4)), responses.rename(index={"ko:A": "ko:Q"}), epochs=1)


def test_fit_restores_thread_count():
    threads = torch.get_num_threads()
    responses = pd.DataFrame(np.zeros((1, 3)), index=["ko:A"], columns=list("ABC"))
    fit_perturbation_model(np.random.default_rng(0).normal(size=(3, 4)), responses, epochs=2)
    assert torch.get_num_threads() == threads


def test_response_scores_by_hand():
    truth = pd.DataFrame([[1.0, 2.0, 3.0, 0.0], [0.0, -1.0, 0.0, 2.0]], index=["p", "q"], columns=list("abcd"))
    groups = pd.Series({"p": "single", "q": "double 2/2 seen"})
    with_nan = truth.copy(); with_nan.loc["q"] = np.nan
    table = response_scores({"exact": truth, "zero": truth * 0 + 1e-9 * np.arange(4), "partial": with_nan}, truth, groups, n_top=2)
    assert table.loc[("single", "exact"), "pearson"] == pytest.approx(1.0)
    assert table.loc[("single", "exact"), "mse_top_de"] == pytest.approx(0.0)
    assert table.loc[("single", "zero"), "mse_top_de"] == pytest.approx((9 + 4) / 2, rel=1e-6)
    assert ("double 2/2 seen", "partial") not in table.index and table.loc[("single", "partial"), "n"] == 1
    with pytest.raises(DataError, match="no prediction"):
        response_scores({"m": truth.loc[["p"]]}, truth, groups)


def test_benchmark_reads_the_models_tokenizer_and_contextual_embeddings(screen, monkeypatch):
    "An untrained model with its tokenizer: the benchmark runs without tokenizer=, on evaluate.gene_embeddings of the controls."
    from scfoundation import evaluate, perturb
    from scfoundation.model import ModelConfig
    from scfoundation.train import TrainConfig, build_model, training_stream
    specs, adata = screen
    config = ModelConfig.named("teaching", d_model=32, n_layers=1, n_heads=2, d_ff=64)
    model = build_model(config, training_stream(adata, config, TrainConfig()).tokenizer)
    calls = []
    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return evaluate.gene_embeddings(*args, **kwargs)
    monkeypatch.setattr(perturb, "gene_embeddings", recorded)
    table, predictions = perturbation_benchmark(model, adata, perturbations=specs, max_cells=50)
    assert calls[0]["kind"] == "contextual" and calls[0]["genes"] == list(adata.var_names) and calls[0]["tokenizer"] is None
    assert {"model: head on gene embeddings", "baseline: mean of training"} <= set(table.index.get_level_values("method"))
    assert table["pearson"].between(-1, 1).all()
    again, _ = perturbation_benchmark(model, adata, model.tokenizer, perturbations=specs, max_cells=50)
    pd.testing.assert_frame_equal(table, again)                            # tokenizer=None is the model's


def test_plot_response_returns_figure():
    import matplotlib
    matplotlib.use("Agg")
    truth = pd.DataFrame([[1.0, 2.0, 3.0]], index=["p"], columns=list("abc"))
    fig = plot_response({"exact": truth, "missing": truth * np.nan}, truth, "p")
    assert len(fig.axes) == 1 and fig.axes[0].get_title() == "exact"
