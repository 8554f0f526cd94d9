"""The annotation chapter's API: split, logistic baseline, fine-tuning (head and full), predictions, scores, bad input."""
import copy

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from scfoundation.annotate import (annotate, annotation_table, finetune_classifier, logistic_baseline, plot_confusion,
                                   predict_proba, split_cells, train_test_labels, write_predictions)
from scfoundation.data import DataError
from scfoundation.evaluate import embed_cells
from scfoundation.genes import Vocab
from scfoundation.model import ModelConfig
from scfoundation.simulate import SimConfig, simulate
from scfoundation.tokenization import RankValueTokenizer, compute_gene_medians, tokenizer_for
from scfoundation.train import build_model

TYPES = ["A", "B", "C"]


def make_cells(seed=0):
    "60 simulated cells of three unrelated types (13, 25 and 22 cells), each with a strong program, no trajectories."
    return simulate(SimConfig(n_cells=60, n_genes=40, n_tfs=5, n_cell_types=3, lineage_depth=1, n_batches=1,
                              program_fraction=0.3, program_lfc=(2.0, 3.0), trajectory_fraction=0.0, seed=seed))


@pytest.fixture
def cells():
    adata = make_cells()
    split_cells(adata, test_size=0.3, seed=0)
    return adata


@pytest.fixture(scope="module")
def tiny_model():
    "A small random model that carries its tokenizer: fine-tuning must work without pretraining too."
    adata = make_cells()
    vocab = Vocab.from_genes(list(adata.var_names))
    tokenizer = tokenizer_for("rank", vocab, max_length=64, gene_medians=lambda: compute_gene_medians(adata, vocab))
    return build_model(ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=64), tokenizer, seed=0)


def test_split_is_stratified_stored_and_deterministic():
    adata = make_cells()
    split = split_cells(adata, test_size=0.3, seed=0)
    assert list(adata.obs["split"]) == list(split) and adata.uns["split"]["seed"] == 0
    table = pd.crosstab(adata.obs["cell_type"], split)
    assert table["test"].sum() == 18
    np.testing.assert_allclose(table["test"], 0.3 * table.sum(axis=1), atol=1)   # 30 % of every type
    assert list(split_cells(adata.copy(), seed=0)) == list(split)
    assert list(split_cells(adata.copy(), seed=1)) != list(split)


def test_write_predictions_layout():
    adata = ad.AnnData(obs=pd.DataFrame(index=["a", "b", "c"]))
    write_predictions(adata, np.array([[0.1, 0.9], [0.7, 0.3], [0.5, 0.5]]), ["x", "y"], "m")
    assert list(adata.obs["m_pred"]) == ["y", "x", "x"]
    np.testing.assert_allclose(adata.obs["m_confidence"], [0.9, 0.7, 0.5])
    assert list(adata.uns["m"]["classes"]) == ["x", "y"] and adata.obsm["m_proba"].shape == (3, 2)


def test_logistic_baseline_learns_and_writes(cells):
    counts = cells.X.copy()
    pipeline = logistic_baseline(cells, n_hvg=20)
    assert list(pipeline.classes_) == TYPES
    assert cells.obsm["logreg_proba"].shape == (60, 3)
    np.testing.assert_allclose(cells.obsm["logreg_proba"].sum(axis=1), 1, rtol=1e-5)
    assert len(cells.uns["logreg"]["genes"]) == 20
    table = annotation_table(cells, keys=["logreg"])
    assert table.loc["logreg", "accuracy"] == 1.0 and table.loc["logreg", "n_test"] == 18
    assert (cells.X != counts).nnz == 0


def test_baseline_uses_only_training_labels(cells):
    "Scrambling the test cells' labels must not change the predictions."
    logistic_baseline(cells, n_hvg=20)
    before = cells.obsm["logreg_proba"].copy()
    scrambled = cells.copy()
    test = scrambled.obs["split"] == "test"
    scrambled.obs["cell_type"] = scrambled.obs["cell_type"].astype(str)
    scrambled.obs.loc[test, "cell_type"] = scrambled.obs.loc[test, "cell_type"].map({"A": "B", "B": "C", "C": "A"})
    logistic_baseline(scrambled, n_hvg=20)
    np.testing.assert_allclose(scrambled.obsm["logreg_proba"], before, atol=1e-6)
    assert annotation_table(scrambled, keys="logreg").loc["logreg", "accuracy"] == 0.0


def test_annotation_table_scores_and_macro_f1(cells):
    labels = cells.obs["cell_type"].astype(str).to_numpy()
    cells.obs["perfect_pred"] = labels
    cells.obs["one_pred"] = "A"
    table = annotation_table(cells, keys=["perfect", "one"])
    assert table.loc["perfect", "accuracy"] == 1.0 and table.loc["perfect", "macro_F1"] == 1.0
    share = (labels[cells.obs["split"] == "test"] == "A").mean()              # precision of "A"; its recall is 1
    assert abs(table.loc["one", "accuracy"] - share) < 1e-9
    assert abs(table.loc["one", "macro_F1"] - (2 * share / (1 + share)) / 3) < 1e-9  # F1 of A, the others 0


@pytest.mark.parametrize("mode", ["head", "full"])
def test_finetune_modes(cells, tiny_model, mode):
    model = tiny_model
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    global_state = torch.random.get_rng_state()
    classifier = finetune_classifier(model, cells, mode=mode, epochs=10 if mode == "full" else 30,
                                     batch_size=16, lr=1e-2, backbone_lr=1e-3, seed=0)
    assert torch.equal(torch.random.get_rng_state(), global_state)
    for name, value in model.state_dict().items(): assert torch.equal(value, weights[name])  # the input model is untouched
    changed = any(not torch.equal(value, weights[name]) for name, value in classifier.backbone.state_dict().items())
    assert changed == (mode == "full")
    losses = classifier.history["loss"]
    assert losses[-1] < losses[0]
    predictions = annotate(cells, classifier, key_added=f"scf_{mode}")
    assert list(predictions.cat.categories) == TYPES
    np.testing.assert_allclose(cells.obsm[f"scf_{mode}_proba"].sum(axis=1), 1, rtol=1e-5)
    train_accuracy = (predictions.astype(str) == cells.obs["cell_type"].astype(str))[cells.obs["split"] == "train"].mean()
    assert train_accuracy > 0.6


def test_finetune_is_deterministic(cells, tiny_model):
    first = finetune_classifier(tiny_model, cells, mode="head", epochs=5, seed=3)
    second = finetune_classifier(tiny_model, cells, tiny_model.tokenizer, mode="head", epochs=5, seed=3)  # the same, passed
    assert torch.equal(first.head.weight, second.head.weight)
    np.testing.assert_allclose(predict_proba(first, cells), predict_proba(second, cells))


def test_tokenizer_comes_from_the_model_or_is_asked_for(cells, tiny_model):
    classifier = finetune_classifier(tiny_model, cells, epochs=1)
    assert classifier.tokenizer is classifier.backbone.tokenizer                # the copied model's own
    assert classifier.tokenizer.vocab.version == tiny_model.tokenizer.vocab.version
    bare = copy.deepcopy(tiny_model)
    bare.tokenizer = None                                          # e.g. an SCFModel built by hand
    with pytest.raises(DataError, match="tokenizer="): finetune_classifier(bare, cells, epochs=1)
    assert finetune_classifier(bare, cells, tiny_model.tokenizer, epochs=1).tokenizer is tiny_model.tokenizer


def test_confusion_figure(cells):
    logistic_baseline(cells, n_hvg=20)
    figure = plot_confusion(cells, keys=["logreg"])
    assert len(figure.axes) == 2


def test_bad_input_is_refused_and_data_unchanged(cells, tiny_model):
    obs_before = cells.obs.copy()
    with pytest.raises(DataError, match="mode="): finetune_classifier(tiny_model, cells, mode="half")
    with pytest.raises(DataError, match="epochs"): finetune_classifier(tiny_model, cells, epochs=0)
    with pytest.raises(DataError, match="split_cells"): logistic_baseline(cells, split_key="nope")
    with pytest.raises(DataError, match="label_key"): logistic_baseline(cells, label_key="nope")
    with pytest.raises(DataError, match="key_added='scf'"): annotation_table(cells, keys=["scf"])
    pd.testing.assert_frame_equal(cells.obs, obs_before)
    broken = cells.copy()
    broken.obs["split"] = "train"
    with pytest.raises(DataError, match="no test cells"): train_test_labels(broken)
    broken.obs["split"] = "validation"
    with pytest.raises(DataError, match="validation"): train_test_labels(broken)
    lonely = make_cells()
    lonely.obs["cell_type"] = lonely.obs["cell_type"].astype(str)
    lonely.obs.loc[lonely.obs_names[0], "cell_type"] = "rare"
    with pytest.raises(DataError, match="rare"): split_cells(lonely)
    assert "split" not in lonely.obs


def test_vocabulary_mismatch_is_refused(cells, tiny_model):
    other = Vocab.from_genes([f"OTHER{i}" for i in range(40)])
    other = other.with_medians(np.ones(len(other)))
    with pytest.raises(Exception, match="(?i)vocab"):
        finetune_classifier(tiny_model, cells, RankValueTokenizer(other, max_length=64))


def test_head_sees_standardised_embeddings(cells, tiny_model):
    classifier = finetune_classifier(tiny_model, cells, mode="head", epochs=2)
    train = np.flatnonzero(cells.obs["split"] == "train")
    embeddings = torch.from_numpy(embed_cells(tiny_model, cells, train))
    torch.testing.assert_close(classifier.standardise.running_mean, embeddings.mean(dim=0))
    standardised = classifier.standardise(embeddings)
    torch.testing.assert_close(standardised.mean(dim=0), torch.zeros(32), atol=1e-4, rtol=0)
    expected = (embeddings - embeddings.mean(dim=0)) / (embeddings.var(dim=0) + classifier.standardise.eps).sqrt()
    torch.testing.assert_close(standardised, expected, atol=1e-4, rtol=1e-4)
