"""bench/gpu.py works on a machine without a GPU: its help, and a tiny CPU run that prints every column."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_gpu_bench_help_works_without_a_gpu():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    assert "--compile" in result.stdout and "--attention-only" in result.stdout


def test_gpu_bench_runs_small_on_cpu_with_both_backends():
    result = run("--device", "cpu", "--precision", "fp32", "--configs", "geneformer-6l", "--length", "96",
                 "--tokens", "384", "--batches", "1", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("geneformer-6l")]
    assert [(row[2], row[3]) for row in rows] == [("full", "padded"), ("full", "jagged"), ("ragged", "padded"), ("ragged", "jagged")]
    assert all(float(row[5]) > 0 and 0 < float(row[7].rstrip("%")) < 100 for row in rows)   # tokens/s and MFU


def test_gpu_bench_attention_only_compares_the_backends():
    result = run("--device", "cpu", "--precision", "fp32", "--attention-only", "--configs", "geneformer-6l",
                 "--length", "128", "--tokens", "512", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    assert "padded" in result.stdout and "jagged" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")
def test_gpu_bench_refuses_cuda_where_none_is_visible():
    result = run("--device", "cuda")
    assert result.returncode != 0 and "no CUDA device" in result.stderr
