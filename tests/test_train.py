"""Tests of scfoundation.train: config, schedule, data order, gradient accumulation, checkpoints,
resume after SIGKILL, DDP on two CPU processes, bad checkpoints, embeddings."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

from scfoundation.genes import Vocab
from scfoundation.model import ModelConfig, SCFModel, mask_batch, random_batch
from scfoundation.train import (CheckpointError, TrainConfig, accumulate_gradients, embed_adata, find_latest_checkpoint,
                                learning_rate, load_pretrained, micro_batch_indices, pretrain, read_checkpoint)

N_GENES, N_CELLS = 60, 48
TINY = dict(input_kind="rank", d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=40)
QUICK = dict(steps=4, batch_size=8, lr=3e-3, warmup_steps=2, save_every=2, log_every=1)
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


@pytest.fixture(scope="module")
def genes():
    return list(Vocab.from_gene_table().genes[:N_GENES])


def make_counts(genes, n_cells=N_CELLS, seed=0):
    "Poisson counts with a cell-type structure: two groups expressing different halves of the genes more."
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, n_cells)
    rates = np.where((np.arange(len(genes))[None, :] < len(genes) // 2) == (group[:, None] == 0), 3.0, 0.3)
    counts = rng.poisson(rates).astype(np.float32)
    counts[:, 0] += 1                                   # no empty cell
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names, adata.obs_names = genes, [f"cell{i}" for i in range(n_cells)]
    adata.obs["group"] = group.astype(str)
    return adata


@pytest.fixture(scope="module")
def adata(genes): return make_counts(genes)


@pytest.fixture(scope="module")
def trained(adata, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    history = pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK), out, progress=False)
    return out, history


def files_snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# --- config, schedule, data order --------------------------------------------------------------------

def test_train_config_json_and_errors():
    config = TrainConfig(steps=7, precision="bf16", grad_accum=2, batch_size=6)
    assert TrainConfig.from_json(config.to_json()) == config
    for bad, words in [(dict(batch_size=5, grad_accum=2), "multiple of grad_accum"), (dict(mask_prob=1.5), "mask_prob"),
                       (dict(precision="fp16"), "precision"), (dict(device="tpu"), "device"), (dict(steps=0), "steps")]:
        with pytest.raises(ValueError, match=words): TrainConfig(**bad)
    with pytest.raises(ValueError, match="no fields"): TrainConfig.from_dict({"stepz": 3})


def test_learning_rate_warmup_then_cosine():
    config = TrainConfig(steps=50, lr=1.0, warmup_steps=5, min_lr_ratio=0.2)
    rates = np.array([learning_rate(step, config) for step in range(50)])
    assert np.all(np.diff(rates[:5]) > 0) and np.all(np.diff(rates[4:]) <= 1e-12)
    assert rates.max() == pytest.approx(1.0) and rates[-1] == pytest.approx(0.2)


def test_micro_batches_cover_each_epoch_and_depend_on_seed():
    config = TrainConfig(batch_size=6, grad_accum=3, seed=1)             # micro-batches of 2
    epoch = np.concatenate([b for step in range(2) for b in micro_batch_indices(step, 12, config)])
    assert sorted(epoch.tolist()) == list(range(12))
    other = micro_batch_indices(0, 12, TrainConfig(batch_size=6, grad_accum=3, seed=2))
    assert not all(np.array_equal(a, b) for a, b in zip(other, micro_batch_indices(0, 12, config)))
    with pytest.raises(ValueError, match="lower batch_size"): micro_batch_indices(0, 1, config)


def test_gradient_accumulation_equals_one_big_batch():
    config = ModelConfig(vocab_size=50, **{**TINY, "max_len": 64})
    torch.manual_seed(0); model = SCFModel(config).train()
    whole = mask_batch(random_batch(config, [3, 12, 7, 20, 5, 9], seed=4), config, 0.3, torch.Generator().manual_seed(1))
    def grads(batches, accum):
        model.zero_grad(); accumulate_gradients(model, batches, TrainConfig(batch_size=6, grad_accum=accum), torch.device("cpu"))
        return [p.grad.clone() for p in model.parameters()]
    parts = [{k: v[rows] for k, v in whole.items()} for rows in (slice(0, 2), slice(2, 4), slice(4, 6))]
    for one, three in zip(grads([whole], 1), grads(parts, 3)): torch.testing.assert_close(one, three, atol=1e-6, rtol=1e-5)


# --- the run and its files ---------------------------------------------------------------------------

def test_pretrain_layout_history_and_final(trained, adata):
    out, history = trained
    assert list(history.columns) == ["step", "loss", "lr", "grad_norm", "masked", "tokens_per_s"]
    assert history.step.tolist() == [1, 2, 3, 4] and np.isfinite(history.loss).all()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "final"]
    assert sorted(p.name for p in (out / "checkpoint-4").iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json", "vocab.json"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4 and [row["loss"] for row in state["history"]] == history.loss.tolist()
    model = SCFModel.from_pretrained(out / "final")
    assert model.config.vocab_size == N_GENES + 3 and model.config.tokenizer["name"] == "rank_value"
    suffixes = {p.suffix for p in out.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors"}                      # no pickle anywhere


def test_pretrain_is_deterministic_and_bf16_runs(adata, tmp_path):
    config = TrainConfig(**{**QUICK, "steps": 2, "save_every": 0})
    first = pretrain(adata, ModelConfig(**TINY), config, tmp_path / "a", progress=False)
    second = pretrain(adata, ModelConfig(**TINY), config, tmp_path / "b", progress=False)
    assert first.loss.tolist() == second.loss.tolist()
    bf16 = pretrain(adata, ModelConfig(**TINY), TrainConfig(**{**config.to_dict(), "precision": "bf16"}), tmp_path / "c", progress=False)
    assert np.isfinite(bf16.loss).all() and abs(bf16.loss[0] - first.loss[0]) < 0.1


def test_stop_after_then_resume_equals_uninterrupted(trained, adata, tmp_path):
    _, whole = trained
    partial = pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK), tmp_path, progress=False, stop_after=3)
    assert len(partial) == 3 and not (tmp_path / "final").exists()
    resumed = pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK), tmp_path, progress=False)
    assert resumed.loss.tolist() == whole.loss.tolist()


WORKER = textwrap.dedent("""
    import sys, anndata as ad
    from scfoundation.genes import Vocab
    from scfoundation.model import ModelConfig
    from scfoundation.train import TrainConfig, pretrain
    data, out, config = ad.read_h5ad(sys.argv[1]), sys.argv[2], TrainConfig.from_json(open(sys.argv[3]).read())
    vocab = Vocab.from_genes(list(data.var_names))     # skips loading the gene table: a faster start
    pretrain(data, ModelConfig(**{tiny}), config, out, vocab=vocab, progress=False)
""").format(tiny=TINY)


def test_resume_after_sigkill_continues_the_curve_exactly(adata, tmp_path):
    adata.write_h5ad(tmp_path / "cells.h5ad")
    (tmp_path / "worker.py").write_text(WORKER)
    config = TrainConfig(steps=80, batch_size=8, lr=3e-3, warmup_steps=5, save_every=10, keep_last=0)
    (tmp_path / "config.json").write_text(config.to_json())
    run = lambda out: subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "cells.h5ad"), str(out),
                                        str(tmp_path / "config.json")], env=SUBPROCESS_ENV, stderr=subprocess.PIPE)
    victim = run(tmp_path / "killed")
    deadline = time.time() + 60
    while find_latest_checkpoint(tmp_path / "killed") is None and victim.poll() is None and time.time() < deadline: time.sleep(0.01)
    victim.send_signal(signal.SIGKILL); victim.wait()
    assert victim.returncode == -signal.SIGKILL and not (tmp_path / "killed" / "final").exists(), "the run ended before it was killed"
    killed_at = read_checkpoint(find_latest_checkpoint(tmp_path / "killed"))["state"]["step"]
    assert 10 <= killed_at < config.steps
    processes = [run(tmp_path / out) for out in ("killed", "whole")]  # resume; and, beside it, the uninterrupted run
    for process in processes:
        _, errors = process.communicate(timeout=120)
        assert process.returncode == 0, errors.decode()[-2000:]
    resumed = json.loads((tmp_path / "killed" / "final" / "history.json").read_text())
    whole = json.loads((tmp_path / "whole" / "final" / "history.json").read_text())
    assert [row["step"] for row in resumed] == list(range(1, config.steps + 1))
    np.testing.assert_allclose([row["loss"] for row in resumed], [row["loss"] for row in whole], rtol=0, atol=1e-6)


# --- several processes -------------------------------------------------------------------------------

DDP_WORKER = textwrap.dedent("""
    import json, sys, torch, anndata as ad, torch.distributed as dist
    from pathlib import Path
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel
    from scfoundation.genes import Vocab
    from scfoundation.model import ModelConfig, SCFModel
    from scfoundation.train import (TrainConfig, _step_loader, accumulate_gradients, masked_step_batches,
                                    prepare_training_data, pretrain, setup_distributed)
    data, out = ad.read_h5ad(sys.argv[1]), Path(sys.argv[2])
    config = TrainConfig(steps=3, batch_size=8, grad_accum=2, lr=3e-3, warmup_steps=1, save_every=0)
    rank, world_size = setup_distributed(torch.device("cpu"))
    vocab = Vocab.from_genes(list(data.var_names))
    dataset, vocab, tokenizer, model_config = prepare_training_data(data, ModelConfig(**{tiny}), vocab)
    torch.manual_seed(0); model = SCFModel(model_config).train()
    wrapped = DistributedDataParallel(model, find_unused_parameters=True) if world_size > 1 else model
    masked = masked_step_batches(iter(_step_loader(dataset, 0, config)), 0, model_config, config)
    loss, _, _ = accumulate_gradients(wrapped, masked, config, torch.device("cpu"), rank, world_size)
    history = pretrain(data, ModelConfig(**{tiny}), config, out / "run", vocab=vocab, progress=False)
    if rank == 0:
        save_file({{name: p.grad.contiguous() for name, p in model.named_parameters() if p.grad is not None}}, str(out / "grads.safetensors"))
        (out / "losses.json").write_text(json.dumps({{"step_loss": loss, "history": history.loss.tolist(), "world_size": world_size}}))
    if world_size > 1: dist.destroy_process_group()
""").format(tiny=TINY)


def test_ddp_on_two_processes_gives_single_process_gradients(adata, tmp_path):
    adata.write_h5ad(tmp_path / "cells.h5ad")
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    commands = {"single": [sys.executable], "ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                                   "--master_port", str(29500 + os.getpid() % 1000)]}
    processes = []
    for name, launcher in commands.items():                       # both at once
        (tmp_path / name).mkdir()
        processes.append(subprocess.Popen(launcher + [str(tmp_path / "worker.py"), str(tmp_path / "cells.h5ad"), str(tmp_path / name)],
                                          env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for process in processes:
        _, errors = process.communicate(timeout=180)
        assert process.returncode == 0, errors.decode()[-3000:]
    single, ddp = (json.loads((tmp_path / name / "losses.json").read_text()) for name in commands)
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    single_grads, ddp_grads = (load_file(str(tmp_path / name / "grads.safetensors")) for name in commands)
    assert single_grads.keys() == ddp_grads.keys() and len(single_grads) > 5
    for key in single_grads: torch.testing.assert_close(ddp_grads[key], single_grads[key], atol=1e-6, rtol=1e-5)
    assert ddp["step_loss"] == pytest.approx(single["step_loss"], abs=1e-6)
    np.testing.assert_allclose(ddp["history"], single["history"], atol=1e-5)
    assert (tmp_path / "ddp" / "run" / "final" / "model.safetensors").is_file()


# --- bad input ---------------------------------------------------------------------------------------

@pytest.fixture
def run_copy(trained, tmp_path):
    import shutil
    out = tmp_path / "run"; shutil.copytree(trained[0], out)
    return out


@pytest.mark.parametrize("damage, words", [
    (lambda out: (out / "checkpoint-4" / "model.safetensors").write_bytes((out / "checkpoint-4" / "model.safetensors").read_bytes()[:500]), "corrupt or truncated"),
    (lambda out: (out / "checkpoint-4" / "optimizer.safetensors").write_bytes(b"garbage"), "corrupt or truncated"),
    (lambda out: (out / "checkpoint-4" / "trainer_state.json").write_text('{"step": 4, "hi'), "cannot be read as JSON"),
    (lambda out: (out / "checkpoint-4" / "trainer_state.json").write_text('{"step": 4}'), "not a trainer state"),
])
def test_damaged_checkpoint_is_refused_and_nothing_is_overwritten(run_copy, adata, damage, words):
    damage(run_copy)
    before = files_snapshot(run_copy)
    with pytest.raises(CheckpointError, match=words):
        pretrain(adata, ModelConfig(**TINY), TrainConfig(**{**QUICK, "steps": 6}), run_copy, progress=False)
    assert files_snapshot(run_copy) == before


def test_mismatched_run_is_refused_and_nothing_is_overwritten(run_copy, adata, genes):
    before = files_snapshot(run_copy)
    extend = TrainConfig(**{**QUICK, "steps": 6})
    with pytest.raises(CheckpointError, match="d_model: saved 32, now 64"):
        pretrain(adata, ModelConfig(**{**TINY, "d_model": 64}), extend, run_copy, progress=False)
    other_genes = make_counts(genes[:40] + list(Vocab.from_gene_table().genes[100:120]))
    with pytest.raises(CheckpointError, match="different model or vocabulary"):
        pretrain(other_genes, ModelConfig(**TINY), extend, run_copy, progress=False)
    with pytest.raises(CheckpointError, match="lr: saved 0.003, now 0.001"):
        pretrain(adata, ModelConfig(**TINY), TrainConfig(**{**QUICK, "lr": 1e-3}), run_copy, progress=False)
    with pytest.raises(CheckpointError, match="resume=True"):
        pretrain(adata, ModelConfig(**TINY), extend, run_copy, resume=False, progress=False)
    with pytest.raises(CheckpointError, match="trained on 48 cells"):
        pretrain(adata[:40].copy(), ModelConfig(**TINY), extend, run_copy, progress=False)
    assert files_snapshot(run_copy) == before


def test_extending_a_finished_run(run_copy, adata):
    longer = pretrain(adata, ModelConfig(**TINY), TrainConfig(**{**QUICK, "steps": 6}), run_copy, progress=False)
    assert longer.step.tolist() == [1, 2, 3, 4, 5, 6] and (run_copy / "checkpoint-6").is_dir()


def test_load_pretrained_checks_the_vocabulary(run_copy, genes):
    model, vocab, tokenizer = load_pretrained(run_copy / "final")
    assert vocab.version == model.config.vocab_version and tokenizer.name == "rank_value"
    Vocab.from_genes(genes[:30]).save(run_copy / "final" / "vocab.json")
    with pytest.raises(ValueError, match="vocabulary version"): load_pretrained(run_copy / "final")
    (run_copy / "final" / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match="no vocab.json"): load_pretrained(run_copy / "final")


def test_pretrain_leaves_the_input_unchanged_and_rejects_tiny_data(genes, tmp_path):
    data = make_counts(genes, n_cells=10)
    before = (data.X.copy(), data.obs.copy(), data.var.copy(), dict(data.obsm), dict(data.uns))
    with pytest.raises(ValueError, match="lower batch_size"):
        pretrain(data, ModelConfig(**TINY), TrainConfig(batch_size=16), tmp_path, progress=False)
    pretrain(data, ModelConfig(**TINY), TrainConfig(steps=1, batch_size=4), tmp_path / "ok", progress=False)
    assert (data.X != before[0]).nnz == 0 and data.obs.equals(before[1]) and data.var.equals(before[2])
    assert dict(data.obsm) == before[3] and dict(data.uns) == before[4]


# --- embeddings --------------------------------------------------------------------------------------

def test_embed_adata_copy_semantics_and_equivalent_inputs(trained, adata):
    out, _ = trained
    embedded = embed_adata(out / "final", adata, batch_size=10, progress=False)
    assert embedded is not adata and "X_scf" not in adata.obsm
    values = embedded.obsm["X_scf"]
    assert values.shape == (N_CELLS, TINY["d_model"]) and np.isfinite(values).all()
    assert np.abs(values[:, :] - values[0]).max() > 1e-4                       # cells differ
    model, vocab, _ = load_pretrained(out / "final")
    again = embed_adata(model, adata, vocab=vocab, batch_size=48, key="X_other", progress=False)
    np.testing.assert_allclose(again.obsm["X_other"], values, atol=1e-5)     # batch size does not matter
    target = adata.copy()
    assert embed_adata(out / "final", target, copy=False, progress=False) is None
    np.testing.assert_allclose(target.obsm["X_scf"], values, atol=1e-5)
    with pytest.raises(ValueError, match="pass vocab="): embed_adata(model, adata, progress=False)


def test_pretrain_continues_a_given_model_and_reads_h5ad_paths(trained, adata, tmp_path):
    model, vocab, _ = load_pretrained(trained[0] / "final")
    before = {name: value.clone() for name, value in model.state_dict().items()}
    adata.write_h5ad(tmp_path / "cells.h5ad")
    history = pretrain(str(tmp_path / "cells.h5ad"), model, TrainConfig(**{**QUICK, "steps": 2}), tmp_path / "more", vocab=vocab, progress=False)
    assert len(history) == 2 and any(not torch.equal(before[name], value) for name, value in model.state_dict().items())
    with pytest.raises(ValueError, match="vocabulary of"):
        pretrain(adata, model, TrainConfig(**QUICK), tmp_path / "bad", vocab=Vocab.from_genes(list(adata.var_names[:20])), progress=False)
