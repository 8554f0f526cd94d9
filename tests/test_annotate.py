"""The annotation chapter's API: split, logistic baseline, fine-tuning (head and full), predictions, scores, bad input."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scfoundation.annotate import (annotate, annotation_table, cell_embeddings, finetune_classifier, logistic_baseline,
                                   plot_confusion, predict_proba, split_cells, train_test_labels, write_predictions)
from scfoundation.data import DataError
from scfoundation.genes import Vocab
from scfoundation.model import ModelConfig, SCFModel
from scfoundation.tokenization import RankValueTokenizer, compute_gene_medians


def make_cells(n_types=3, per_type=20, n_genes=40, seed=0):
    "Counts where each type over-expresses its own block of genes; labels in obs['cell_type']."
    rng = np.random.default_rng(seed)
    labels = np.repeat([f"type{t}" for t in range(n_types)], per_type)
    rates = np.full((len(labels), n_genes), 1.0)
    block = n_genes // n_types
    for t in range(n_types): rates[labels == f"type{t}", t * block:(t + 1) * block] = 10.0
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])
    return ad.AnnData(sp.csr_matrix(rng.poisson(rates).astype(np.float32)), obs=obs,
                      var=pd.DataFrame(index=[f"GENE{i}" for i in range(n_genes)]))


@pytest.fixture
def cells():
    adata = make_cells()
    split_cells(adata, test_size=0.3, seed=0)
    return adata


@pytest.fixture(scope="module")
def tiny_model():
    "A small random model and its tokenizer: fine-tuning must work without pretraining too."
    adata = make_cells()
    vocab = Vocab.from_genes(list(adata.var_names))
    vocab = vocab.with_medians(compute_gene_medians(adata, vocab))
    tokenizer = RankValueTokenizer(vocab, max_length=64)
    config = ModelConfig(vocab_size=len(vocab), d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=64,
                         vocab_version=vocab.version, tokenizer=tokenizer.to_dict())
    torch.manual_seed(0)
    return SCFModel(config), tokenizer


def test_split_is_stratified_stored_and_deterministic():
    adata = make_cells()
    split = split_cells(adata, test_size=0.3, seed=0)
    assert list(adata.obs["split"]) == list(split) and adata.uns["split"]["seed"] == 0
    assert pd.crosstab(adata.obs["cell_type"], split)["test"].tolist() == [6, 6, 6]
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
    assert set(pipeline.classes_) == {"type0", "type1", "type2"}
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
    scrambled.obs.loc[test, "cell_type"] = scrambled.obs.loc[test, "cell_type"].map({"type0": "type1", "type1": "type2", "type2": "type0"})
    logistic_baseline(scrambled, n_hvg=20)
    np.testing.assert_allclose(scrambled.obsm["logreg_proba"], before, atol=1e-6)
    assert annotation_table(scrambled, keys="logreg").loc["logreg", "accuracy"] == 0.0


def test_annotation_table_scores_and_macro_f1(cells):
    labels = cells.obs["cell_type"].astype(str).to_numpy()
    cells.obs["perfect_pred"] = labels
    cells.obs["one_pred"] = "type0"
    table = annotation_table(cells, keys=["perfect", "one"])
    assert table.loc["perfect", "accuracy"] == 1.0 and table.loc["perfect", "macro_F1"] == 1.0
    assert abs(table.loc["one", "accuracy"] - 1 / 3) < 1e-9
    assert abs(table.loc["one", "macro_F1"] - (2 * (1 / 3) / (1 + 1 / 3)) / 3) < 1e-9  # F1 of type0 = 0.5, others 0


@pytest.mark.parametrize("mode", ["head", "full"])
def test_finetune_modes(cells, tiny_model, mode):
    model, tokenizer = tiny_model
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    global_state = torch.random.get_rng_state()
    classifier = finetune_classifier(model, cells, tokenizer, mode=mode, epochs=10 if mode == "full" else 30,
                                     batch_size=16, lr=1e-2, backbone_lr=1e-3, seed=0)
    assert torch.equal(torch.random.get_rng_state(), global_state)
    for name, value in model.state_dict().items(): assert torch.equal(value, weights[name])  # the input model is untouched
    changed = any(not torch.equal(value, weights[name]) for name, value in classifier.backbone.state_dict().items())
    assert changed == (mode == "full")
    losses = classifier.history["loss"]
    assert losses[-1] < losses[0]
    predictions = annotate(cells, classifier, key_added=f"scf_{mode}")
    assert list(predictions.cat.categories) == ["type0", "type1", "type2"]
    np.testing.assert_allclose(cells.obsm[f"scf_{mode}_proba"].sum(axis=1), 1, rtol=1e-5)
    train_accuracy = (predictions.astype(str) == cells.obs["cell_type"].astype(str))[cells.obs["split"] == "train"].mean()
    assert train_accuracy > 0.6


def test_finetune_is_deterministic(cells, tiny_model):
    model, tokenizer = tiny_model
    first = finetune_classifier(model, cells, tokenizer, mode="head", epochs=5, seed=3)
    second = finetune_classifier(model, cells, tokenizer, mode="head", epochs=5, seed=3)
    assert torch.equal(first.head.weight, second.head.weight)
    np.testing.assert_allclose(predict_proba(first, cells), predict_proba(second, cells))


def test_cell_embeddings_match_model_embed(cells, tiny_model):
    model, tokenizer = tiny_model
    embeddings = cell_embeddings(model, cells, tokenizer, batch_size=7)
    assert embeddings.shape == (60, 32)
    np.testing.assert_allclose(cell_embeddings(model, cells, tokenizer, batch_size=60), embeddings, atol=1e-5)


def test_confusion_figure(cells):
    logistic_baseline(cells, n_hvg=20)
    figure = plot_confusion(cells, keys=["logreg"])
    assert len(figure.axes) == 2


def test_bad_input_is_refused_and_data_unchanged(cells, tiny_model):
    model, tokenizer = tiny_model
    obs_before = cells.obs.copy()
    with pytest.raises(DataError, match="mode="): finetune_classifier(model, cells, tokenizer, mode="half")
    with pytest.raises(DataError, match="epochs"): finetune_classifier(model, cells, tokenizer, epochs=0)
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
    lonely.obs.iloc[0, 0] = "rare"
    with pytest.raises(DataError, match="rare"): split_cells(lonely)
    assert "split" not in lonely.obs


def test_vocabulary_mismatch_is_refused(cells, tiny_model):
    model, _ = tiny_model
    other = Vocab.from_genes([f"OTHER{i}" for i in range(40)])
    other = other.with_medians(np.ones(len(other)))
    with pytest.raises(Exception, match="(?i)vocab"):
        finetune_classifier(model, cells, RankValueTokenizer(other, max_length=64))


def test_head_sees_standardised_embeddings(cells, tiny_model):
    model, tokenizer = tiny_model
    classifier = finetune_classifier(model, cells, tokenizer, mode="head", epochs=2)
    train = (cells.obs["split"] == "train").to_numpy()
    embeddings = torch.from_numpy(cell_embeddings(model, cells[train], tokenizer))
    torch.testing.assert_close(classifier.standardise.running_mean, embeddings.mean(dim=0))
    standardised = classifier.standardise(embeddings)
    torch.testing.assert_close(standardised.mean(dim=0), torch.zeros(32), atol=1e-4, rtol=0)
    expected = (embeddings - embeddings.mean(dim=0)) / (embeddings.var(dim=0) + classifier.standardise.eps).sqrt()
    torch.testing.assert_close(standardised, expected, atol=1e-4, rtol=1e-4)
