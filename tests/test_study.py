"""Chapter 17's API: the study table (reading, curves, baselines, the figure), few-shot masks, logistic
regression on an embedding, and the few-shot comparison on small generated data."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scfoundation.data import DataError
from scfoundation.study import (STUDY_COLUMNS, TRANSFER_COLUMNS, baseline_levels, few_shot_annotation, few_shot_mask,
                                full_finetune_epochs, load_study, load_transfer, logistic_on_embedding, plot_few_shot,
                                plot_study, plot_transfer, study_curves, transfer_summary)

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "bench" / "results" / "pretraining_study.csv"
COMMITTED_TRANSFER = ROOT / "bench" / "results" / "transfer_study.csv"


def toy_study(path: Path) -> Path:
    "Two variants over two seeds and three steps, both poolings, plus PCA at two seeds: a table of known means."
    rows = []
    for variant, offset in (("base", 0.0), ("fast", 0.1)):
        for seed in (0, 1):
            for step in (10, 20, 30):
                for pooling, shift in (("mean", 0.0), ("cls", -0.2)):
                    rows.append(dict(variant=variant, seed=seed, step=step, pooling=pooling, knn_accuracy=0.5 + offset + shift + step / 100 + seed / 100,
                                     loss=6 - step / 10, cells_seen=step * 32, flops=step * 1e9, seconds=step / 2, lr=1e-3,
                                     input_kind="rank", d_model=128, n_layers=2, mask_prob=0.15))
    rows += [dict(variant="PCA on HVGs", seed=seed, pooling="", knn_accuracy=0.8 + seed / 100) for seed in (0, 1)]
    pd.DataFrame(rows).reindex(columns=STUDY_COLUMNS).to_csv(path, index=False)
    return path


def test_load_study_and_curves(tmp_path):
    study = load_study(toy_study(tmp_path / "study.csv"))
    curves = study_curves(study, "step", "mean")
    row = curves[(curves.variant == "fast") & (curves.step == 20)].iloc[0]
    assert np.isclose(row["mean"], 0.5 + 0.1 + 0.2 + 0.005) and np.isclose(row["sd"], np.std([0.0, 0.01], ddof=1)) and row["seeds"] == 2
    assert study_curves(study, "flops", "cls")["mean"].max() < curves["mean"].max()
    levels = baseline_levels(study)
    assert list(levels.index) == ["PCA on HVGs"] and np.isclose(levels.loc["PCA on HVGs", "mean"], 0.805)
    fig = plot_study(study, ["base", "fast"], x="flops")
    assert len(fig.axes[0].lines) == 3 and fig.axes[0].get_xscale() == "log"   # two variants and the baseline


def test_bad_study_tables_are_refused(tmp_path):
    with pytest.raises(DataError, match="pretraining_study.py"): load_study(tmp_path / "missing.csv")
    pd.DataFrame({"variant": ["x"]}).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(DataError, match="lacks the columns"): load_study(tmp_path / "other.csv")
    study = load_study(toy_study(tmp_path / "study.csv"))
    with pytest.raises(DataError, match="not in the table"): plot_study(study, ["nope"])
    with pytest.raises(DataError, match="pooling='max'"): study_curves(study, pooling="max")


def test_committed_study_table_is_complete():
    study = load_study(COMMITTED)
    assert {"base", "PCA on HVGs", "scVI"} <= set(study.variant)
    assert study[study.variant == "base"].seed.nunique() >= 3, "the base run has a seed band"
    checkpoints = study[study.step.notna()]
    assert set(checkpoints.pooling) == {"mean", "cls"} and checkpoints.knn_accuracy.between(0, 1).all()


def test_few_shot_mask():
    labels = np.array(list("aaaabbbbcc") * 2)
    is_test = np.arange(20) % 2 == 1
    chosen = few_shot_mask(labels, is_test, 1, seed=3)
    assert not (chosen & is_test).any() and sorted(labels[chosen]) == ["a", "b", "c"]
    assert few_shot_mask(labels, is_test, 100).sum() == (~is_test).sum()        # more than there are: all
    np.testing.assert_array_equal(few_shot_mask(labels, is_test, 2, seed=5), few_shot_mask(labels, is_test, 2, seed=5))
    with pytest.raises(DataError, match="at least one"): few_shot_mask(labels, is_test, 0)


def test_logistic_on_embedding(typed_cells):
    from scfoundation.annotate import annotation_table, split_cells
    cells = typed_cells(n_types=3, per_type=20, n_genes=30)
    onehot = pd.get_dummies(cells.obs["cell_type"]).to_numpy(float)
    cells.obsm["X_good"] = onehot * 3 + np.random.default_rng(0).normal(size=onehot.shape)
    split_cells(cells)
    logistic_on_embedding(cells, "X_good", key_added="lr_good")
    assert cells.uns["lr_good"]["features"] == "X_good"
    assert annotation_table(cells, ["lr_good"]).loc["lr_good", "accuracy"] > 0.9
    with pytest.raises(DataError, match="X_missing"): logistic_on_embedding(cells, "X_missing")


def test_few_shot_annotation_on_generated_cells(typed_cells):
    from scfoundation.evaluate import pca_baseline
    from scfoundation.genes import Vocab
    from scfoundation.model import ModelConfig
    from scfoundation.train import TrainConfig, pretrain
    cells = typed_cells(n_types=3, per_type=20, n_genes=40)
    pca_baseline(cells, n_hvg=30, n_comps=10)
    model = pretrain(cells, ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=64, pooling="mean"),
                     TrainConfig(steps=2, batch_size=8, save_every=0), vocab=Vocab.from_genes(list(cells.var_names)), progress=False)
    before = set(cells.obs.columns)
    runs = few_shot_annotation(cells, model, n_per_type=(1, None), seed=0, head_epochs=5)
    assert list(runs.index.unique()) == ["logreg_hvg", "logreg_pca", "scf_head"] and set(runs.per_type) == {"1", "all"}
    with_full = few_shot_annotation(cells, model, n_per_type=(1,), seed=0, head_epochs=5, full_steps=2)
    assert list(with_full.index.unique()) == ["logreg_hvg", "logreg_pca", "scf_head", "scf_full"]
    assert with_full.loc["scf_head", "accuracy"] == runs[runs.per_type == "1"].loc["scf_head", "accuracy"]   # same cells, same head
    assert runs[runs.per_type == "1"].n_labelled.unique().tolist() == [3] and runs[runs.per_type == "all"].n_labelled.iloc[0] == 42
    assert runs.accuracy.between(0, 1).all() and set(cells.obs.columns) == before        # the input is not modified
    assert len(plot_few_shot(runs).axes[0].lines) == 3


def test_full_finetune_epochs_give_a_fixed_number_of_steps():
    for n_labelled in (1, 10, 33, 64, 490):
        epochs = full_finetune_epochs(n_labelled, 32, batch_size=32)
        steps_per_epoch = -(-n_labelled // 32)
        assert epochs * steps_per_epoch >= 32 and (epochs - 1) * steps_per_epoch < 32
    with pytest.raises(DataError, match="at least one step"): full_finetune_epochs(10, 0)


def toy_transfer(path: Path) -> Path:
    "A model with checkpoints at two steps over three seeds, and one baseline per seed."
    rows = [dict(method="model (atlas)", seed=seed, step=step, knn_accuracy=0.5 + step / 1000 + seed / 100,
                 few_shot_1_f1=0.4, few_shot_5_f1=0.6, loss=5.0, cells_seen=step * 32, seconds=step / 10)
            for seed in (0, 1, 2) for step in (100, 200)]
    rows += [dict(method="PCA on HVGs", seed=seed, knn_accuracy=0.8, few_shot_1_f1=0.5 + seed / 10, few_shot_5_f1=0.7) for seed in (0, 1, 2)]
    pd.DataFrame(rows).reindex(columns=TRANSFER_COLUMNS).to_csv(path, index=False)
    return path


def test_transfer_table_summary_and_figure(tmp_path):
    table = load_transfer(toy_transfer(tmp_path / "transfer.csv"))
    summary = transfer_summary(table)
    assert np.isclose(summary.loc["model (atlas)", ("knn_accuracy", "mean")], 0.71)           # the last step only
    assert np.isclose(summary.loc["PCA on HVGs", ("few_shot_1_f1", "sd")], 0.1) and summary.attrs["n_seeds"] == 3
    fig = plot_transfer(table, "knn_accuracy")
    assert len(fig.axes[0].lines) == 2                                                         # the model and the baseline
    with pytest.raises(DataError, match="use one of"): plot_transfer(table, "auroc")
    with pytest.raises(DataError, match="transfer_study.py"): load_transfer(tmp_path / "missing.csv")
    pd.DataFrame({"method": ["x"]}).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(DataError, match="lacks the columns"): load_transfer(tmp_path / "other.csv")


def test_committed_transfer_table_is_complete():
    transfer = load_transfer(COMMITTED_TRANSFER)
    assert {"model (atlas)", "model (held-out cells)", "PCA on HVGs", "PCA (atlas)", "scVI", "scVI (atlas)", "LR on HVGs"} <= set(transfer.method)
    assert (transfer.groupby("method").seed.nunique() >= 3).all()


@pytest.mark.parametrize("script", ["pretraining_study.py", "transfer_study.py"])
def test_study_scripts_explain_themselves(script):
    import subprocess, sys
    run = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "bench/results/" in run.stdout, run.stderr[-2000:]


def test_committed_input_kinds_have_seed_bands():
    study = load_study(COMMITTED)
    seeds = study.groupby("variant").seed.nunique()
    for variant in ("bins", "continuous", "len64", "len64-bins", "len64-continuous"):
        assert seeds.get(variant, 0) >= 3, f"{variant} has {seeds.get(variant, 0)} seeds"


def test_gene_set_objective_adds_a_cell_loss_and_round_trips(tmp_path):
    import importlib.util, torch
    from scfoundation.model import ModelConfig, SCFModel, mask_batch, random_batch
    spec = importlib.util.spec_from_file_location("pretraining_study", ROOT / "bench" / "pretraining_study.py")
    study_script = importlib.util.module_from_spec(spec); spec.loader.exec_module(study_script)
    config = ModelConfig.named("laptop", vocab_size=60, max_len=16)
    torch.manual_seed(0)
    probe = study_script.GeneSetObjective(config)
    plain = SCFModel(config); plain.load_state_dict({k: v for k, v in probe.state_dict().items() if not k.startswith("gene_set_head")})
    batch = mask_batch(random_batch(config, [11, 8, 5, 11], seed=1), config, 0.3, seed=2)
    with torch.no_grad(): extra = probe(batch)["loss"] - plain(batch)["loss"]
    assert extra > 0.1                                      # the BCE over the vocabulary starts near log 2
    probe.save_pretrained(tmp_path / "probe")
    again = study_script.GeneSetObjective.from_pretrained(tmp_path / "probe")
    torch.testing.assert_close(again.gene_set_head.weight, probe.gene_set_head.weight)
    with torch.no_grad(): torch.testing.assert_close(probe.embed(batch), plain.embed(batch))   # embeddings: the same network
