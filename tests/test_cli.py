"""The `scf` console script: help text, prepare, errors as one readable line, the demo."""
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

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
    assert result.returncode == 2 and "--layer counts" in result.stderr   # the fix, as a flag


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
    assert result.returncode == 2 and "--steps 0" in result.stderr and "Traceback" not in result.stderr


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


# --- nothing lost, nothing silently wrong (issue 18) ---

def _usual_mode():
    import os
    umask = os.umask(0); os.umask(umask)
    return 0o666 & ~umask


def _cells_with_empty(n_cells=200, n_empty=5, names=("CD3E", "LYZ", "NKG7", "GNLY", "MS4A1", "CD79A")):
    rng = np.random.default_rng(0)
    X = rng.poisson(3, size=(n_cells, len(names))).astype(np.float32) + 1
    X[:n_empty] = 0
    cells = ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]), var=pd.DataFrame(index=list(names)))
    cells.obsm["X_mine"] = np.ones((n_cells, 2), np.float32)
    return cells


def test_an_input_is_never_an_output(tmp_path, capsys):
    "prepare/embed/evaluate refuse to write over their input, even with --overwrite, before any work (the run need not exist)."
    source = tmp_path / "x.h5ad"
    _cells_with_empty().write_h5ad(source)
    before = source.read_bytes()
    for argv in (["prepare", str(source), str(source)], ["prepare", str(source), str(source), "--overwrite"],
                 ["embed", str(tmp_path / "no-run"), str(source), str(source)],
                 ["evaluate", str(source), "--output", str(source)], ["evaluate", str(source), "--table", str(source)]):
        assert main(argv) == 2, argv
        assert "is also the input" in capsys.readouterr().err, argv
    assert source.read_bytes() == before


def test_an_existing_output_needs_overwrite(tmp_path, capsys):
    source, output = tmp_path / "x.h5ad", tmp_path / "y.h5ad"
    _cells_with_empty().write_h5ad(source)
    output.write_text("the user's earlier result")
    for argv in (["prepare", str(source), str(output), "--min-genes", "1"], ["simulate", str(output), "--cells", "50"],
                 ["embed", str(tmp_path / "no-run"), str(source), str(output)]):
        assert main(argv) == 2, argv
        assert "pass --overwrite to replace it" in capsys.readouterr().err, argv
    assert output.read_text() == "the user's earlier result"
    assert main(["prepare", str(source), str(output), "--min-genes", "1", "--overwrite"]) == 0
    assert ad.read_h5ad(output).n_obs == 195 and (output.stat().st_mode & 0o777) == _usual_mode()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["x.h5ad", "y.h5ad"]        # no temp file left


def test_outputs_of_the_wrong_kind_are_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder").mkdir()
    cases = [(["pretrain", "pbmc68k", "--out", str(tmp_path / "a-file")], "is a file"),
             (["build-corpus", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "a-file")], "is a file"),
             (["prepare", "pbmc68k", str(tmp_path / "a-folder")], "is a folder"),
             (["evaluate", "pbmc68k", "--table", str(tmp_path / "a-folder")], "is a folder")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, argv


def test_prepare_counts_the_cells_it_leaves_out_from_the_input(tmp_path, capsys):
    _cells_with_empty().write_h5ad(tmp_path / "x.h5ad")
    assert main(["prepare", str(tmp_path / "x.h5ad"), str(tmp_path / "y.h5ad"), "--min-genes", "1"]) == 0
    assert "kept 195 of 200 cells: 5 without any count, 0 below QC" in capsys.readouterr().out


def test_embed_warns_about_cells_without_an_embedding(simulated_run, tmp_path):
    sim_file, run = simulated_run
    raw = ad.read_h5ad(sim_file)
    X = raw.X.toarray()
    X[:3] = 0
    ad.AnnData(X, obs=raw.obs[[]], var=pd.DataFrame(index=raw.var_names)).write_h5ad(tmp_path / "raw.h5ad")   # prepared on the fly
    with pytest.warns(UserWarning, match="4 of 400 input cells get no embedding and no training: 3 without any count, 1 below QC"):
        assert main(["embed", str(run), str(tmp_path / "raw.h5ad"), str(tmp_path / "embedded.h5ad")]) == 0
    assert ad.read_h5ad(tmp_path / "embedded.h5ad").n_obs == 396


def test_damaged_inputs_are_one_line(tmp_path, capsys):
    _cells_with_empty().write_h5ad(tmp_path / "whole.h5ad")
    whole = (tmp_path / "whole.h5ad").read_bytes()
    (tmp_path / "cut.h5ad").write_bytes(whole[: len(whole) // 2])
    assert main(["prepare", str(tmp_path / "cut.h5ad"), str(tmp_path / "out.h5ad")]) == 2
    assert "cut short" in capsys.readouterr().err
    folder = tmp_path / "tenx"
    folder.mkdir()
    scipy.io.mmwrite(str(folder / "matrix.mtx"), sp.csr_matrix(np.ones((4, 3))).T)     # 3 genes × 4 cells…
    (folder / "features.tsv").write_text("".join(f"ENSG{i}\tG{i}\tGene Expression\n" for i in range(2)))   # …but 2 genes
    (folder / "barcodes.tsv").write_text("".join(f"c{i}\n" for i in range(4)))
    assert main(["prepare", str(folder), str(tmp_path / "out.h5ad")]) == 2
    assert "not a readable 10x matrix folder" in capsys.readouterr().err
    assert not (tmp_path / "out.h5ad").exists()


def test_build_corpus_refuses_a_cut_short_file(tmp_path, capsys):
    _cells_with_empty().write_h5ad(tmp_path / "whole.h5ad")
    whole = (tmp_path / "whole.h5ad").read_bytes()
    (tmp_path / "cut.h5ad").write_bytes(whole[: len(whole) // 2])
    assert main(["build-corpus", str(tmp_path / "cut.h5ad"), "--out", str(tmp_path / "corpus"), "--workers", "1"]) == 2
    error = capsys.readouterr().err
    assert "cut short" in error and error.count("\n") == 1


@pytest.mark.parametrize("option,value", [("--steps", "0"), ("--batch-size", "0"), ("--lr", "-1"), ("--save-every", "-1")])
def test_invalid_pretrain_numbers_are_refused_before_the_data(tmp_path, capsys, option, value):
    "The settings are checked first: the input does not even exist, and the error is about the setting, as a flag."
    assert main(["pretrain", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "run"), option, value]) == 2
    error = capsys.readouterr().err
    assert error.startswith("scf pretrain: error: ") and option in error and error.count("\n") == 1
    assert "does not exist" not in error and not (tmp_path / "run").exists()


def test_a_batch_larger_than_the_data_names_the_flag(tmp_path, capsys):
    assert main(["pretrain", "pbmc68k", "--out", str(tmp_path / "run"), "--batch-size", "5000", "--steps", "2"]) == 2
    assert "lower --batch-size" in capsys.readouterr().err


def test_preparing_flags_apply_the_fixes_the_errors_name(tmp_path, capsys):
    X = np.random.default_rng(0).poisson(3, size=(30, 4)).astype(np.float32) + 1
    ad.AnnData(X, var=pd.DataFrame(index=["CD3E", "LYZ", "CD3E", "NKG7"])).write_h5ad(tmp_path / "dups.h5ad")
    assert main(["prepare", str(tmp_path / "dups.h5ad"), str(tmp_path / "out.h5ad"), "--min-genes", "1"]) == 2
    assert "--duplicate-genes sum" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "dups.h5ad"), str(tmp_path / "out.h5ad"), "--min-genes", "1", "--duplicate-genes", "sum"]) == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_array_equal(out[:, "CD3E"].X.toarray().ravel(), X[:, 0] + X[:, 2])
    ad.AnnData(X, var=pd.DataFrame(index=["920", "4069", "4818", "2"])).write_h5ad(tmp_path / "entrez.h5ad")   # CD4, LYZ, NKG7, A2M
    assert main(["prepare", str(tmp_path / "entrez.h5ad"), str(tmp_path / "e.h5ad"), "--min-genes", "1", "--id-type", "ensembl"]) == 2
    assert "--id-type" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "entrez.h5ad"), str(tmp_path / "e.h5ad"), "--min-genes", "1", "--id-type", "entrez"]) == 0
    assert list(ad.read_h5ad(tmp_path / "e.h5ad").var_names) == ["CD4", "LYZ", "NKG7", "A2M"]


def test_use_raw_takes_the_counts_from_raw(tmp_path, capsys):
    names = ["CD3E", "LYZ", "NKG7", "GNLY", "MS4A1"]
    counts = np.random.default_rng(0).poisson(3, size=(30, 5)).astype(np.float32) + 1
    cells = ad.AnnData(counts, var=pd.DataFrame(index=names))
    cells.raw = cells
    cells = cells[:, :3].copy()
    cells.X = cells.X * 2                                      # X holds other counts (say, of another pipeline)
    cells.write_h5ad(tmp_path / "in.h5ad")
    assert main(["prepare", str(tmp_path / "in.h5ad"), str(tmp_path / "out.h5ad"), "--min-genes", "1", "--use-raw"]) == 0
    assert ad.read_h5ad(tmp_path / "out.h5ad").n_vars == 5
    ad.AnnData(counts * 0.5, var=pd.DataFrame(index=names)).write_h5ad(tmp_path / "halves.h5ad")
    assert main(["prepare", str(tmp_path / "halves.h5ad"), str(tmp_path / "h.h5ad")]) == 2
    assert "--use-raw if .raw holds them" in capsys.readouterr().err


def test_pretrain_resume_and_extend_flags(simulated_run, tmp_path, capsys):
    import shutil
    sim_file, run = simulated_run
    shutil.copytree(run, tmp_path / "run")                     # the shared run stays as it is
    base = ["pretrain", str(sim_file), "--out", str(tmp_path / "run"), "--batch-size", "16"]
    assert main([*base, "--steps", "4", "--no-resume"]) == 2
    assert "Drop --no-resume to continue that run" in capsys.readouterr().err
    assert main([*base, "--steps", "6"]) == 2
    assert "--extend" in capsys.readouterr().err
    assert main([*base, "--steps", "6", "--extend"]) == 0
    assert len(pd.read_csv(tmp_path / "run" / "history.csv")) == 6


def test_an_error_about_many_labels_stays_short(simulated_run, tmp_path, capsys):
    sim_file, run = simulated_run
    many = ad.read_h5ad(sim_file)
    many.obs["cell_type"] = [f"a rather long cell type name number {i // 2:03d}" for i in range(many.n_obs)]   # 200 types
    many.write_h5ad(tmp_path / "many.h5ad")
    assert main(["evaluate", str(tmp_path / "many.h5ad"), "--task", "insilico", "--model", str(run), "--source", "nope",
                 "--target", "nope"]) == 2
    error = capsys.readouterr().err
    assert "(200 in all)" in error and len(error) < 1000


# --- issue 18: runs that protect the user's work, seen from the command line --------------------------

def test_a_diverging_run_stops_with_the_cause_and_saves_nothing(simulated_run, tmp_path, capsys):
    "Case 6: `scf pretrain --lr 1e9` saved a NaN model as final/ and exited 0."
    sim_file, _ = simulated_run
    assert main(["pretrain", str(sim_file), "--out", str(tmp_path / "run"), "--steps", "4", "--batch-size", "16", "--lr", "1e9"]) == 2
    error = capsys.readouterr().err
    assert "training diverged" in error and "--lr 1e+09 is too high" in error and "Traceback" not in error
    assert not (tmp_path / "run" / "final").exists()


def test_a_damaged_model_is_refused_before_anything_is_written(simulated_run, tmp_path, capsys):
    "Case 5: flipped bytes in model.safetensors gave wrong embeddings with exit 0."
    import shutil
    sim_file, run = simulated_run
    shutil.copytree(run, tmp_path / "run")
    weights = tmp_path / "run" / "final" / "model.safetensors"
    damaged = bytearray(weights.read_bytes()); damaged[-8] ^= 0x40; weights.write_bytes(bytes(damaged))
    assert main(["embed", str(tmp_path / "run"), str(sim_file), str(tmp_path / "out.h5ad")]) == 2
    assert "do not match checksums.json" in capsys.readouterr().err and not (tmp_path / "out.h5ad").exists()


def test_two_pretrain_commands_into_one_folder_one_is_refused(simulated_run, tmp_path):
    "Case 3: two `scf pretrain` into one --out at once both exited 0, the folder holding one run's result."
    sim_file, _ = simulated_run
    command = [sys.executable, "-m", "scfoundation", "pretrain", str(sim_file), "--out", str(tmp_path / "run"), "--steps", "40",
               "--batch-size", "16"]
    first = subprocess.Popen([*command, "--seed", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "run" / ".scf-run.lock"
    import time
    deadline = time.time() + 120
    while not (lock.is_file() and lock.read_text().startswith("pid")) and first.poll() is None and time.time() < deadline: time.sleep(0.05)
    second = subprocess.run([*command, "--seed", "1"], capture_output=True, text=True, timeout=600)
    first_out, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2 and f"in use by another run (pid {first.pid}" in second.stderr, second.stderr[-2000:]
    import json
    assert json.loads((tmp_path / "run" / "final" / "train_config.json").read_text())["seed"] == 0
