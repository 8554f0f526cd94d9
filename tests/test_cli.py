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
