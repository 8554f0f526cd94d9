"""The `scf` console script: help text, prepare, errors as one readable line, the demo."""
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scfoundation.cli import main


def run_scf(*args):
    return subprocess.run([sys.executable, "-m", "scfoundation", *args], capture_output=True, text=True, timeout=600)


def test_help_names_every_command():
    result = run_scf("--help")
    assert result.returncode == 0
    for command in ["prepare", "demo"]:
        assert command in result.stdout


def test_prepare_writes_mapped_counts(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.poisson(3, size=(20, 4)).astype(np.float32) + 1
    names = ["cd3e", "ENSG00000105369.10", "4069", "NKG7"]  # symbol (any case), Ensembl with version, Entrez
    ad.AnnData(X, var=pd.DataFrame(index=names)).write_h5ad(tmp_path / "in.h5ad")
    assert main(["prepare", str(tmp_path / "in.h5ad"), str(tmp_path / "out.h5ad"), "--min-genes", "1"]) == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert list(out.var_names) == ["CD3E", "CD79A", "LYZ", "NKG7"]
    np.testing.assert_array_equal(out.X.toarray() if hasattr(out.X, "toarray") else out.X, X)


def test_bad_input_is_one_line_not_a_traceback(tmp_path):
    (tmp_path / "bad.h5ad").write_text("not hdf5")
    result = run_scf("prepare", str(tmp_path / "bad.h5ad"), str(tmp_path / "out.h5ad"))
    assert result.returncode == 2
    assert "not HDF5" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.h5ad").exists()


def test_normalised_input_names_the_fix(tmp_path):
    X = np.log1p(np.random.default_rng(0).poisson(3, size=(20, 4)) * np.random.default_rng(1).uniform(0.5, 2, (20, 4)))
    ad.AnnData(X.astype(np.float32) + 0.01, var=pd.DataFrame(index=["CD3E", "LYZ", "NKG7", "GNLY"])).write_h5ad(tmp_path / "n.h5ad")
    result = run_scf("prepare", str(tmp_path / "n.h5ad"), str(tmp_path / "out.h5ad"))
    assert result.returncode == 2 and "layer=" in result.stderr


# --- scf simulate and scf evaluate --task: every downstream table from the command line ---

@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory):
    "A small simulation with perturbations and a model pretrained on it for a few steps."
    folder = tmp_path_factory.mktemp("sim")
    sim_file, run = folder / "sim.h5ad", folder / "run"
    assert main(["simulate", str(sim_file), "--cells", "400", "--genes", "80", "--tfs", "10",
                 "--singles", "6", "--doubles", "4", "--seed", "1"]) == 0
    assert main(["pretrain", str(sim_file), "--out", str(run), "--steps", "4", "--batch-size", "16"]) == 0
    return sim_file, run


def test_simulate_writes_truth_and_mapped_genes(simulated_run):
    sim = ad.read_h5ad(simulated_run[0])
    assert sim.shape == (400, 80) and "entrez_id" in sim.var
    assert {"network", "perturbations", "tfs"} <= set(sim.uns["truth"])
    assert sim.obs["perturbation"].nunique() == 1 + 6 + 4


@pytest.mark.parametrize("task,extra,baseline", [
    ("perturbation", [], "baseline: additive"),
    ("grn", ["--max-cells", "60"], "baseline: |Pearson|"),
    ("annotation", ["--epochs", "1"], "logreg"),
])
def test_each_task_prints_the_model_beside_its_baseline(simulated_run, tmp_path, capsys, task, extra, baseline):
    sim_file, run = simulated_run
    table = tmp_path / "table.csv"
    assert main(["evaluate", str(sim_file), "--task", task, "--model", str(run), "--table", str(table), *extra]) == 0
    written = pd.read_csv(table)
    methods = set(written["method"])
    assert baseline in methods and any(method.startswith(("model", "scf")) for method in methods)
    assert baseline in capsys.readouterr().out


def test_insilico_task_needs_known_cell_types(simulated_run, capsys):
    sim_file, run = simulated_run
    types = sorted(ad.read_h5ad(sim_file).obs["cell_type"].unique())
    assert main(["evaluate", str(sim_file), "--task", "insilico", "--model", str(run), "--source", "nope", "--target", types[1]]) == 2
    assert types[0] in capsys.readouterr().err                                 # the error lists the valid types
    assert main(["evaluate", str(sim_file), "--task", "insilico", "--model", str(run), "--source", types[0],
                 "--target", types[1], "--max-cells", "30"]) == 0
    assert "baseline: DE" in capsys.readouterr().out


def test_annotation_output_keeps_predictions(simulated_run, tmp_path):
    sim_file, run = simulated_run
    out = tmp_path / "annotated.h5ad"
    assert main(["evaluate", str(sim_file), "--task", "annotation", "--model", str(run), "--epochs", "1",
                 "--fine-tune", "head", "full", "--output", str(out)]) == 0
    annotated = ad.read_h5ad(out)
    n_types = annotated.obs["cell_type"].nunique()
    for method in ("logreg", "scf_head", "scf_full"):
        assert annotated.obsm[f"{method}_proba"].shape == (annotated.n_obs, n_types)
        assert list(annotated.uns[method]["classes"]) == sorted(annotated.obs["cell_type"].unique())
        assert set(annotated.obs[f"{method}_pred"]) <= set(annotated.obs["cell_type"])


def test_perturbation_without_truth_is_scored_against_observed_change(simulated_run, tmp_path):
    from scfoundation.cli import perturbation_command
    sim_file, run = simulated_run
    real_style = ad.read_h5ad(sim_file)
    tfs = [str(tf) for tf in real_style.uns.pop("truth")["tfs"]]             # real data carry no truth…
    real_style.obs["perturbation"] = real_style.obs["perturbation"].astype(str).str.replace(
        r"tf(\d+)", lambda match: tfs[int(match.group(1))], regex=True)        # …and name genes, not tf0, tf1, …
    table = perturbation_command(real_style, run)
    assert {"model: head on gene embeddings", "baseline: mean of training"} <= set(table.index.get_level_values("method"))
    assert table["pearson"].between(-1, 1).all()


def test_tasks_refuse_what_the_data_cannot_give(simulated_run, tmp_path, capsys):
    sim_file, run = simulated_run
    plain = ad.read_h5ad(sim_file)
    del plain.uns["truth"]
    plain.write_h5ad(tmp_path / "plain.h5ad")
    cases = [(["--task", "grn", "--model", str(run)], "scf simulate"),
             (["--task", "insilico", "--model", str(run), "--source", "A.1", "--target", "A.2"], "scf simulate"),
             (["--task", "annotation"], "--model"),
             (["--task", "integration"], "--batch-key"),
             (["--task", "perturbation", "--model", str(run), "--control", "untreated"], "control=")]
    for args, fix in cases:
        assert main(["evaluate", str(tmp_path / "plain.h5ad"), *args]) == 2, args
        assert fix in capsys.readouterr().err, args


def test_simulate_bad_parameters_are_one_line(tmp_path):
    result = run_scf("simulate", str(tmp_path / "x.h5ad"), "--tfs", "5", "--singles", "9")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "n_singles" in result.stderr
    assert not (tmp_path / "x.h5ad").exists()


# --- the version, the built-in data, corpora, torchrun, finished runs ---

def test_version_and_builtin_data(tmp_path):
    import scfoundation
    result = run_scf("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"scfoundation {scfoundation.__version__}"
    assert main(["prepare", "pbmc68k", str(tmp_path / "pbmc.h5ad"), "--min-genes", "50"]) == 0
    prepared = ad.read_h5ad(tmp_path / "pbmc.h5ad")
    assert prepared.n_obs == 700 and "entrez_id" in prepared.var and "scf_gene_coverage" in prepared.uns
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pbmc.h5ad"]          # no intermediate file left behind


def test_a_second_pretrain_on_a_finished_run_says_so(simulated_run, tmp_path):
    sim_file, run = simulated_run
    result = run_scf("pretrain", str(sim_file), "--out", str(run), "--steps", "4", "--batch-size", "16")
    assert result.returncode == 0 and "trained nothing" in result.stderr and "Traceback" not in result.stderr
    result = run_scf("pretrain", str(sim_file), "--out", str(tmp_path / "r"), "--steps", "0")
    assert result.returncode == 2 and "steps=0" in result.stderr and "Traceback" not in result.stderr


def test_pretrain_on_a_corpus_folder_also_under_torchrun(tmp_path):
    import os
    from scfoundation.model import SCFModel
    pbmc_file = tmp_path / "cells.h5ad"
    assert main(["simulate", str(pbmc_file), "--cells", "300", "--genes", "60", "--tfs", "6"]) == 0
    assert main(["build-corpus", str(pbmc_file), "--out", str(tmp_path / "corpus"), "--shard-size", "128", "--workers", "1"]) == 0
    assert main(["pretrain", str(tmp_path / "corpus"), "--out", str(tmp_path / "one"), "--steps", "3", "--batch-size", "16"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={29300 + os.getpid() % 300}",
              "-m", "scfoundation", "pretrain", str(tmp_path / "corpus"), "--out", str(tmp_path / "two"), "--steps", "3",
              "--batch-size", "16"]
    result = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("model in") == 1                                      # only rank 0 prints
    for name in ("one", "two"):
        model = SCFModel.from_pretrained(tmp_path / name / "final")
        assert model.tokenizer is not None and len(model.history if model.history is not None else []) == 0
        assert len(pd.read_csv(tmp_path / name / "history.csv")) == 3
    assert main(["embed", str(tmp_path / "two"), str(pbmc_file), str(tmp_path / "embedded.h5ad")]) == 0
    assert ad.read_h5ad(tmp_path / "embedded.h5ad").obsm["X_scf"].shape[0] > 0


def test_a_backed_file_flows_through_in_blocks(tmp_path):
    "Preparation, pretraining and embedding of a backed .h5ad hold one block of cells, not the matrix."
    import tracemalloc
    from scfoundation.cli import prepare, write_cells
    from scfoundation.data import read_anndata
    from scfoundation.evaluate import embed_adata
    from scfoundation.model import ModelConfig
    from scfoundation.simulate import SimConfig, simulate_to_h5ad
    from scfoundation.train import TrainConfig, pretrain
    from scfoundation.genes import match_gene_ids
    source = simulate_to_h5ad(SimConfig(n_cells=20_000, n_genes=400, n_tfs=10, seed=0), tmp_path / "big.h5ad")
    match_gene_ids(["TP53"])  # the gene table's lookups are built once per process (a fixed cost, not the data's)
    backed = read_anndata(source, backed=True)
    matrix_bytes = sum(backed.X.group[name].size * backed.X.group[name].dtype.itemsize for name in ("data", "indices", "indptr"))

    def peak(run):
        tracemalloc.start(); result = run(); value = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
        return result, value
    prepared, prepare_peak = peak(lambda: prepare(backed, min_genes=10, verbose=False, out=tmp_path / "prepared.h5ad", chunk_size=500))
    assert prepared.isbacked and prepared.n_obs > 18_000
    model = pretrain(prepared, ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=64),
                     TrainConfig(steps=2, batch_size=8, warmup_steps=1), tmp_path / "run", progress=False)
    _, embed_peak = peak(lambda: embed_adata(prepared, model, batch_size=256, progress=False))
    assert prepare_peak < matrix_bytes / 2, (prepare_peak, matrix_bytes)
    assert embed_peak < matrix_bytes / 2 + prepared.obsm["X_scf"].nbytes, (embed_peak, matrix_bytes)
    written = ad.read_h5ad(write_cells(prepared, tmp_path / "embedded.h5ad"))
    np.testing.assert_array_equal(written.obsm["X_scf"], prepared.obsm["X_scf"])
    assert (written.X != prepared.to_memory().X).nnz == 0
