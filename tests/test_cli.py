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
