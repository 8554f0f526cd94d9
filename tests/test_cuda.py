"""The GPU path, where a CUDA device is visible (skipped elsewhere): jagged attention on CUDA computes what
the padded grid computes on CPU, "auto" picks it, bf16 pretraining runs with FLOPs and MFU in its history,
a compiled model trains, and bench/gpu.py runs."""
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scfoundation.genes import Vocab
from scfoundation.model import ModelConfig, SCFModel, TokenLayout, mask_batch, random_batch
from scfoundation.train import TrainConfig, matmul_peak_flops, pretrain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ROOT = Path(__file__).resolve().parents[1]


def small(kind="rank", **overrides):
    return ModelConfig.named("teaching", vocab_size=300, input_kind=kind, d_model=64, n_heads=4, d_ff=128, max_len=512, **overrides)


@pytest.fixture(autouse=True)
def exact_fp32():
    "fp32 matrix products in full precision (no TF32), so that CUDA and CPU results can be compared closely."
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_auto_is_jagged_on_cuda_when_cells_are_padded():
    keep = torch.tensor([[True, True, True], [True, False, False]], device="cuda")
    assert TokenLayout.from_keep(keep, "auto").jagged
    assert not TokenLayout.from_keep(torch.ones(2, 3, dtype=torch.bool, device="cuda"), "auto").jagged


@pytest.mark.parametrize("kind", ["rank", "bins", "continuous"])
def test_jagged_on_cuda_equals_padded_on_cpu(kind):
    torch.manual_seed(0)
    config = small(kind)
    batch = mask_batch(random_batch(config, [300, 40, 7, 1], seed=1), config, seed=0)
    cpu = SCFModel(config).eval()
    cpu.attention = "padded"
    gpu = SCFModel(config).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    cpu_loss, gpu_loss = cpu(batch)["loss"], gpu(batch)["loss"]
    cpu_loss.backward(); gpu_loss.backward()
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.embed(batch).cpu(), cpu.embed(batch), atol=1e-4, rtol=1e-4)
    for (name, cpu_param), gpu_param in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(gpu_param.grad.cpu(), cpu_param.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_bf16_pretraining_on_cuda_records_flops_and_mfu(tmp_path):
    genes = list(Vocab.from_gene_table().genes[:200])
    rng = np.random.default_rng(0)
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(0.5, (64, len(genes))).astype(np.float32)))
    adata.var_names, adata.obs_names = genes, [f"cell{i}" for i in range(64)]
    config = TrainConfig(steps=6, batch_size=16, precision="bf16", device="cuda", save_every=3, log_every=1, warmup_steps=2)
    model = pretrain(adata, ModelConfig.named("teaching", max_len=256), config, tmp_path / "run", progress=False)
    history = model.history
    assert model.device.type == "cuda" and len(history) == 6
    assert all(np.isfinite(row["loss"]) and row["flops"] > 0 and 0 < row["mfu"] < 1 for row in history)
    assert matmul_peak_flops("cuda", "bf16") > matmul_peak_flops("cuda", "fp32")


def test_a_compiled_model_trains_on_cuda():
    torch.manual_seed(0)
    config = small()
    model = SCFModel(config).cuda().train()
    compiled = torch.compile(model, dynamic=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(3):
        batch = mask_batch(random_batch(config, [200, 90, 31], seed=step), config, seed=step)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(batch)["loss"]
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        losses.append(loss.item())
    assert all(np.isfinite(losses))


def test_bench_gpu_runs_on_cuda():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--quick", "--configs", "geneformer-6l"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "MFU" in result.stdout and "jagged" in result.stdout
