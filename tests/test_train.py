"""Tests of scfoundation.train: config, schedule, data order, gradient accumulation, the model pretrain returns,
checkpoints, exact resume (stop_after, SIGKILL), finished runs, the cache, DDP and FSDP on two CPU processes, bad checkpoints."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

import scfoundation.train as train_module
from scfoundation.data import DataError
from scfoundation.evaluate import embed_cells
from scfoundation.genes import Vocab
from scfoundation.model import ModelConfig, ModelError, SCFModel, mask_batch, random_batch
from scfoundation.tokenization import RankValueTokenizer
from scfoundation.train import (RESULT_FREE_FIELDS, CheckpointError, TrainConfig, accumulate_gradients, build_model,
                                cache_key, code_version, default_cache_dir, find_latest_checkpoint, learning_rate,
                                micro_batch_indices, pretrain, read_checkpoint, training_stream)

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
    "A finished run of 4 steps: its folder and the model pretrain returned."
    out = tmp_path_factory.mktemp("run")
    return out, pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK), out, progress=False)


def files_snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def same_weights(first, second):
    one, two = first.state_dict(), second.state_dict()
    return one.keys() == two.keys() and all(torch.equal(one[key].cpu(), two[key].cpu()) for key in one)


def launch(script, *args, launcher=(sys.executable,)):
    return subprocess.Popen([*launcher, str(script), *map(str, args)], env=SUBPROCESS_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(processes, timeout=180):
    for process in processes:
        _, errors = process.communicate(timeout=timeout)
        assert process.returncode == 0, errors.decode()[-3000:]


def run_in_process(script, *args, monkeypatch):
    "Run a worker script in this process, as `python script args…` would (no start-up cost: the imports are done)."
    import runpy
    monkeypatch.setattr(sys, "argv", [str(script), *map(str, args)])
    runpy.run_path(str(script), run_name="__main__")


def torchrun(n):
    return (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--master_port", str(29500 + (os.getpid() + n * 37) % 1000))


# --- config, schedule, data order --------------------------------------------------------------------

def test_train_config_json_and_errors():
    config = TrainConfig(steps=7, precision="bf16", grad_accum=2, batch_size=6)
    assert TrainConfig.from_json(config.to_json()) == config
    for bad, words in [(dict(batch_size=5, grad_accum=2), "multiple of grad_accum"), (dict(mask_prob=1.5), "mask_prob"),
                       (dict(precision="fp16"), "precision"), (dict(device="tpu"), "device"), (dict(steps=0), "steps"),
                       (dict(batch_size=0), "batch_size=0"), (dict(lr=-1), "lr=-1 must be > 0"), (dict(lr=float("nan")), "lr=nan"),
                       (dict(save_every=-1), "save_every"), (dict(keep_last=-2), "keep_last"), (dict(clip_norm=-1), "clip_norm")]:
        with pytest.raises(ValueError, match=words): TrainConfig(**bad)
    with pytest.raises(ValueError, match=r"TrainConfig has unknown keys \['stepz'\]: no fields"): TrainConfig.from_dict({"stepz": 3})


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
    whole = mask_batch(random_batch(config, [3, 12, 7, 20, 5, 9], seed=4), config, 0.3, seed=1)
    def grads(batches, accum):
        model.zero_grad(); accumulate_gradients(model, batches, TrainConfig(batch_size=6, grad_accum=accum), torch.device("cpu"))
        return [p.grad.clone() for p in model.parameters()]
    parts = [{k: v[rows] for k, v in whole.items()} for rows in (slice(0, 2), slice(2, 4), slice(4, 6))]
    for one, three in zip(grads([whole], 1), grads(parts, 3)): torch.testing.assert_close(one, three, atol=1e-6, rtol=1e-5)


# --- the run, its files and the model it returns ----------------------------------------------------

def test_pretrain_returns_the_model_with_history_and_tokenizer(trained, adata):
    out, model = trained
    assert isinstance(model, SCFModel)
    history = model.history
    assert list(history.columns) == ["step", "loss", "lr", "grad_norm", "masked", "tokens_per_s", "flops", "mfu"]
    assert history.step.tolist() == [1, 2, 3, 4] and np.isfinite(history.loss).all()
    assert isinstance(model.tokenizer, RankValueTokenizer) and model.tokenizer.name == "rank"
    assert model.tokenizer.vocab.version == model.config.vocab_version and model.config.tokenizer == model.tokenizer.to_dict()
    assert model.config.vocab_size == N_GENES + 3 and model.tokenizer.vocab.medians is not None   # medians computed for rank
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "final"]
    assert sorted(p.name for p in (out / "checkpoint-4").iterdir()) == [
        "checksums.json", "config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json", "vocab.json"]
    assert sorted(p.name for p in (out / "final").iterdir()) == [
        "checksums.json", "config.json", "history.json", "model.safetensors", "train_config.json", "vocab.json"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4 and [row["loss"] for row in state["history"]] == history.loss.tolist()
    loaded = SCFModel.from_pretrained(out / "final")
    assert same_weights(loaded, model) and loaded.config == model.config
    assert loaded.tokenizer.to_dict() == model.tokenizer.to_dict() and loaded.tokenizer.vocab == model.tokenizer.vocab
    assert json.loads((out / "final" / "history.json").read_text()) == history.to_dict("records")
    suffixes = {p.suffix for p in out.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors"}                      # no pickle anywhere


def test_pretrain_is_deterministic_and_bf16_runs(adata, tmp_path):
    config = TrainConfig(**{**QUICK, "steps": 2, "save_every": 0})
    first = pretrain(adata, ModelConfig(**TINY), config, tmp_path / "a", progress=False).history
    second = pretrain(adata, ModelConfig(**TINY), config, tmp_path / "b", progress=False).history
    assert first.loss.tolist() == second.loss.tolist()
    bf16 = pretrain(adata, ModelConfig(**TINY), TrainConfig(**{**config.to_dict(), "precision": "bf16"}), tmp_path / "c",
                    progress=False).history
    assert np.isfinite(bf16.loss).all() and abs(bf16.loss[0] - first.loss[0]) < 0.1


def test_auto_precision_follows_the_hardware(adata, tmp_path, monkeypatch):
    "precision='auto' (the default) is fp32 on a CPU, and the run records what ran; bf16 on a CPU without bf16 units warns."
    import scfoundation.train as train
    assert TrainConfig().precision == "auto"
    monkeypatch.setattr(train, "_cpu_has_bf16", lambda: False)          # as on an AVX2-only CPU
    config = TrainConfig(**{**QUICK, "steps": 1, "save_every": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # auto never warns
        pretrain(adata, ModelConfig(**TINY), config, tmp_path / "auto", progress=False)
    assert json.loads((tmp_path / "auto" / "final" / "train_config.json").read_text())["precision"] == "fp32"
    with pytest.warns(UserWarning, match='use precision="auto"'):
        pretrain(adata, ModelConfig(**TINY), TrainConfig(**{**config.to_dict(), "precision": "bf16"}), tmp_path / "bf16", progress=False)
    monkeypatch.setattr(train, "_cpu_has_bf16", lambda: True)
    assert train.resolve_precision("auto", torch.device("cpu")) == "fp32"     # even with bf16 units: measured no faster
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train.resolve_precision("bf16", "cpu") == "bf16"               # units present: no warning


def test_compile_trains_the_same_model_and_saves_plain_names(trained, adata, tmp_path):
    "compile=True compiles the forward in place: the same losses (to float error), checkpoints with the model's own names."
    _, whole = trained
    compiled = pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK, compile=True), tmp_path, progress=False)
    np.testing.assert_allclose(compiled.history.loss, whole.history.loss, rtol=1e-4)
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert set(saved) == set(SCFModel(ModelConfig(**TINY, vocab_size=compiled.config.vocab_size)).state_dict())


def test_stop_after_then_resume_equals_uninterrupted(trained, adata, tmp_path):
    _, whole = trained
    partial = pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK), tmp_path, progress=False, stop_after=3)
    assert len(partial.history) == 3 and not (tmp_path / "final").exists() and (tmp_path / "checkpoint-3").is_dir()
    resumed = pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK), tmp_path, progress=False)
    assert resumed.history.loss.tolist() == whole.history.loss.tolist()
    assert same_weights(resumed, whole)


WORKER = textwrap.dedent("""
    import sys, anndata as ad
    from scfoundation.genes import Vocab
    from scfoundation.model import ModelConfig
    from scfoundation.train import TrainConfig, pretrain
    data, out, config = ad.read_h5ad(sys.argv[1]), sys.argv[2], TrainConfig.from_json(open(sys.argv[3]).read())
    vocab = Vocab.from_genes(list(data.var_names))     # skips loading the gene table: a faster start
    pretrain(data, ModelConfig(**{tiny}), config, out, vocab=vocab, progress=False)
""").format(tiny=TINY)


def test_resume_after_sigkill_continues_the_curve_exactly(adata, tmp_path, monkeypatch):
    adata.write_h5ad(tmp_path / "cells.h5ad")
    (tmp_path / "worker.py").write_text(WORKER)
    config = TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=5, save_every=5, keep_last=0)
    (tmp_path / "config.json").write_text(config.to_json())
    run = lambda out: launch(tmp_path / "worker.py", tmp_path / "cells.h5ad", out, tmp_path / "config.json")
    victim = run(tmp_path / "killed")
    deadline = time.time() + 60
    while find_latest_checkpoint(tmp_path / "killed") is None and victim.poll() is None and time.time() < deadline: time.sleep(0.01)
    victim.send_signal(signal.SIGKILL); victim.wait()
    assert victim.returncode == -signal.SIGKILL and not (tmp_path / "killed" / "final").exists(), "the run ended before it was killed"
    killed_at = read_checkpoint(find_latest_checkpoint(tmp_path / "killed"))["state"]["step"]
    assert 5 <= killed_at < config.steps
    resuming = run(tmp_path / "killed")
    run_in_process(tmp_path / "worker.py", tmp_path / "cells.h5ad", tmp_path / "whole", tmp_path / "config.json",
                   monkeypatch=monkeypatch)                           # beside it, the uninterrupted run
    finish([resuming])
    resumed = json.loads((tmp_path / "killed" / "final" / "history.json").read_text())
    whole = json.loads((tmp_path / "whole" / "final" / "history.json").read_text())
    assert [row["step"] for row in resumed] == list(range(1, config.steps + 1))
    np.testing.assert_allclose([row["loss"] for row in resumed], [row["loss"] for row in whole], rtol=0, atol=1e-6)


# --- finished runs and the cache ---------------------------------------------------------------------

@pytest.fixture
def run_copy(trained, tmp_path):
    out = tmp_path / "run"; shutil.copytree(trained[0], out)
    return out


def no_training(monkeypatch):
    "Make any optimizer step an error: what runs after this only loads."
    def refuse(*args, **kwargs): raise AssertionError("a step was trained")
    monkeypatch.setattr(train_module, "train_step", refuse)


def test_a_finished_run_warns_and_trains_nothing(run_copy, trained, adata, monkeypatch):
    before = files_snapshot(run_copy)
    no_training(monkeypatch)
    with pytest.warns(UserWarning, match="already holds this finished run of 4 steps.*trained nothing"):
        again = pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK), run_copy, progress=False)
    assert files_snapshot(run_copy) == before
    pd.testing.assert_frame_equal(again.history, trained[1].history)
    assert same_weights(again, trained[1]) and again.tokenizer.to_dict() == trained[1].tokenizer.to_dict()


def test_lowering_steps_of_a_run_is_refused(run_copy, adata):
    before = files_snapshot(run_copy)
    with pytest.raises(CheckpointError, match="trained 4 steps, more than steps=2"):
        pretrain(adata, ModelConfig(**TINY), TrainConfig(**{**QUICK, "steps": 2}), run_copy, progress=False)
    assert files_snapshot(run_copy) == before


def test_cache_trains_once_and_keys_on_the_settings(adata, tmp_path, monkeypatch, capsys):
    config = TrainConfig(**{**QUICK, "save_every": 0})
    first = pretrain(adata, ModelConfig(**TINY), config, cache=tmp_path, progress=False)
    folders = sorted(tmp_path.iterdir())
    assert len(folders) == 1 and (folders[0] / "final").is_dir() and len(folders[0].name) == 16
    before = files_snapshot(tmp_path)
    with monkeypatch.context() as patch:
        no_training(patch)
        capsys.readouterr()
        second = pretrain(adata, ModelConfig(**TINY), config, cache=tmp_path, progress=False)
        assert f"loaded the cached run {folders[0].name}" in capsys.readouterr().out
        quieter = TrainConfig(**{**config.to_dict(), "log_every": 3, "keep_last": 5, "num_workers": 0})
        pretrain(adata, ModelConfig(**TINY), quieter, cache=tmp_path, progress=False)   # fields that change no number
    assert set(RESULT_FREE_FIELDS) >= {"log_every", "keep_last"}
    pd.testing.assert_frame_equal(second.history, first.history)
    assert same_weights(second, first) and files_snapshot(tmp_path) == before
    other = pretrain(adata, ModelConfig(**TINY), TrainConfig(**{**config.to_dict(), "seed": 1}), cache=tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 2 and other.history.loss.tolist() != first.history.loss.tolist()
    with pytest.raises(DataError, match="pass out_dir or cache, not both"):
        pretrain(adata, ModelConfig(**TINY), config, tmp_path / "run", cache=tmp_path, progress=False)


def test_cache_true_uses_the_default_folder(adata, tmp_path, monkeypatch):
    monkeypatch.delenv("SCF_CACHE_DIR", raising=False)
    (tmp_path / "project" / "notebooks").mkdir(parents=True)
    (tmp_path / "project" / "pyproject.toml").write_text("")
    monkeypatch.chdir(tmp_path / "project" / "notebooks")
    assert default_cache_dir() == tmp_path / "project" / ".scfoundation-cache"
    monkeypatch.setenv("SCF_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    pretrain(adata, ModelConfig(**TINY), TrainConfig(**{**QUICK, "steps": 1}), cache=True, progress=False)
    assert [p.name for p in (tmp_path / "elsewhere").iterdir() if (p / "final").is_dir()] and \
        not (tmp_path / "project" / ".scfoundation-cache").exists()


def cache_key_of(data, model_config=ModelConfig(**TINY), train_config=TrainConfig(**QUICK)):
    stream = training_stream(data, model_config, train_config)
    return cache_key(stream, build_model(model_config, stream.tokenizer, train_config.seed), train_config)


def test_cache_key_tracks_data_model_and_settings_not_entry_order(adata):
    base = cache_key_of(adata)
    assert cache_key_of(adata) == base
    shuffled = adata.copy()
    matrix = shuffled.X.tocsr()
    order = np.concatenate([np.arange(start, stop)[::-1] for start, stop in zip(matrix.indptr[:-1], matrix.indptr[1:])])
    shuffled.X = sp.csr_matrix((matrix.data[order], matrix.indices[order], matrix.indptr), shape=matrix.shape)
    assert not shuffled.X.has_sorted_indices
    assert cache_key_of(shuffled) == base                                   # the same counts, stored in another order
    changed = adata.copy()
    changed.X = changed.X.tocsr(copy=True)
    changed.X.data[0] += 1
    assert cache_key_of(changed) != base
    assert cache_key_of(adata, train_config=TrainConfig(**{**QUICK, "steps": 5})) != base
    assert cache_key_of(adata, model_config=ModelConfig(**{**TINY, "d_model": 64})) != base
    assert cache_key_of(adata, train_config=TrainConfig(**{**QUICK, "save_every": 1, "log_every": 7, "device": "cpu"})) == base


def test_editing_the_code_changes_the_cache_key(adata, tmp_path, monkeypatch):
    model = SCFModel(ModelConfig(vocab_size=N_GENES + 3, **TINY))
    base = code_version(model)
    assert code_version(model) == base and len(base) == 16
    config = TrainConfig(**{**QUICK, "steps": 1, "save_every": 0})
    pretrain(adata, ModelConfig(**TINY), config, cache=tmp_path / "cache", progress=False)
    real_find_spec = importlib.util.find_spec
    source = Path(real_find_spec("scfoundation.model").origin)
    edited = tmp_path / "model.py"
    edited.write_bytes(source.read_bytes() + b"\n# an edit\n")            # what editing the notebook and exporting does
    def find_spec(name, *args, **kwargs):
        return SimpleNamespace(origin=str(edited)) if name == "scfoundation.model" else real_find_spec(name, *args, **kwargs)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert code_version(model) != base
    pretrain(adata, ModelConfig(**TINY), config, cache=tmp_path / "cache", progress=False)   # not the old run
    assert len(list((tmp_path / "cache").iterdir())) == 2
    monkeypatch.undo()
    assert code_version(model) == base


# --- several processes -------------------------------------------------------------------------------

FSDP_CONFIG = TrainConfig(steps=3, batch_size=8, lr=3e-3, warmup_steps=1, save_every=2)

WORKER_2P = textwrap.dedent("""
    import json, sys, torch, anndata as ad, torch.distributed as dist
    from pathlib import Path
    from safetensors.torch import save_file
    from scfoundation.genes import Vocab
    from scfoundation.model import ModelConfig
    from scfoundation.train import TrainConfig, build_model, pretrain, setup_distributed, train_step, training_stream, wrap_model

    class KeepGradients:  # an optimizer that updates nothing: train_step's gradients stay on the model
        param_groups = []
        def step(self): pass
        def zero_grad(self, set_to_none=True): pass

    data, out = ad.read_h5ad(sys.argv[1]), Path(sys.argv[2])   # cells in memory
    config = TrainConfig(steps=3, batch_size=8, grad_accum=2, lr=3e-3, warmup_steps=1, save_every=0, clip_norm=0)
    device = torch.device("cpu")
    rank, world_size = setup_distributed(device)
    vocab = Vocab.from_genes(list(data.var_names))
    stream = training_stream(data, ModelConfig(**{tiny}), config, vocab, rank=rank, world_size=world_size)
    model = build_model(ModelConfig(**{tiny}), stream.tokenizer, config.seed).train()
    seen = []
    def recorded(batches):
        for batch in batches: seen.append(batch["cell_ids"].tolist()); yield batch
    row = train_step(wrap_model(model, False, world_size), KeepGradients(), recorded(stream.batches(0)), 0, model.config,
                     config, device, rank, world_size)
    cells = [None] * world_size
    if world_size > 1: dist.all_gather_object(cells, seen[:config.grad_accum])
    else: cells = [seen[:config.grad_accum]]
    history = pretrain(data, ModelConfig(**{tiny}), config, out / "run", vocab=vocab, progress=False).history
    if rank == 0:
        save_file({{name: p.grad.contiguous() for name, p in model.named_parameters() if p.grad is not None}}, str(out / "grads.safetensors"))
        (out / "losses.json").write_text(json.dumps({{"step": row["loss"], "masked": row["masked"], "cells": cells,
                                                     "history": history.loss.tolist(), "world_size": world_size}}))
    if world_size > 1:   # FSDP on the same cells in memory (it used to take a corpus only)
        pretrain(data, ModelConfig(**{tiny}), TrainConfig.from_json(sys.argv[3]), out / "fsdp", vocab=vocab, fsdp=True, progress=False)
        dist.destroy_process_group()
""").format(tiny=TINY)


@pytest.fixture(scope="module")
def two_processes(adata, tmp_path_factory):
    "One torchrun of two gloo processes (DDP, then FSDP) and, meanwhile, the same DDP worker on one process in this one."
    folder = tmp_path_factory.mktemp("processes")
    adata.write_h5ad(folder / "cells.h5ad")
    (folder / "worker.py").write_text(WORKER_2P)
    (folder / "fsdp.json").write_text(FSDP_CONFIG.to_json())
    for name in ("single", "ddp"): (folder / name).mkdir()
    started = launch(folder / "worker.py", folder / "cells.h5ad", folder / "ddp", folder / "fsdp.json", launcher=torchrun(2))
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_in_process(folder / "worker.py", folder / "cells.h5ad", folder / "single", folder / "fsdp.json", monkeypatch=monkeypatch)
    finish([started])
    return folder


def test_ddp_on_two_processes_gives_single_process_gradients(two_processes):
    launchers = ("single", "ddp")
    single, ddp = (json.loads((two_processes / name / "losses.json").read_text()) for name in launchers)
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    for micro, cells in enumerate(single["cells"][0]):                        # each rank streams its half of each micro-batch
        assert ddp["cells"][0][micro] + ddp["cells"][1][micro] == cells and len(ddp["cells"][0][micro]) == len(cells) // 2
    single_grads, ddp_grads = (load_file(str(two_processes / name / "grads.safetensors")) for name in launchers)
    assert single_grads.keys() == ddp_grads.keys() and len(single_grads) > 5
    for key in single_grads: torch.testing.assert_close(ddp_grads[key], single_grads[key], atol=1e-6, rtol=1e-5)
    assert ddp["masked"] == single["masked"] and ddp["step"] == pytest.approx(single["step"], abs=1e-6)
    np.testing.assert_allclose(ddp["history"], single["history"], atol=1e-5)
    assert (two_processes / "ddp" / "run" / "final" / "model.safetensors").is_file()


def test_fsdp_on_two_processes_trains_in_memory_cells_and_saves_a_loadable_model(two_processes, adata, tmp_path):
    fsdp = two_processes / "ddp" / "fsdp"
    assert sorted(p.name for p in fsdp.iterdir()) == ["checkpoint-2", "checkpoint-3", "final"]
    model = SCFModel.from_pretrained(fsdp / "final")
    assert model.tokenizer is not None and model.tokenizer.vocab.version == model.config.vocab_version
    single = pretrain(adata, ModelConfig(**TINY), FSDP_CONFIG, tmp_path, vocab=Vocab.from_genes(list(adata.var_names)), progress=False)
    history = json.loads((fsdp / "final" / "history.json").read_text())
    np.testing.assert_allclose([row["loss"] for row in history], single.history.loss, atol=1e-5)
    for key, value in single.state_dict().items(): torch.testing.assert_close(model.state_dict()[key], value, atol=1e-4, rtol=1e-4)
    checkpoint = read_checkpoint(fsdp / "checkpoint-2")
    assert checkpoint["state"]["world_size"] == 2 and checkpoint["optimizer_state"]["state"]   # the full optimizer state, gathered
    resumed = SCFModel.from_pretrained(fsdp / "checkpoint-2")                  # a checkpoint is a pretrained folder too
    assert resumed.tokenizer.to_dict() == model.tokenizer.to_dict()


# --- bad input ---------------------------------------------------------------------------------------

def flip_a_byte(path, offset=-8):
    "One bit of one number changed, as a bad copy or a failing disk does: the safetensors header still reads."
    damaged = bytearray(path.read_bytes()); damaged[offset] ^= 0x40; path.write_bytes(bytes(damaged))


DAMAGES = {
    "flipped weight": lambda folder: flip_a_byte(folder / "model.safetensors"),
    "truncated weights": lambda folder: (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:500]),
    "garbage optimizer": lambda folder: (folder / "optimizer.safetensors").write_bytes(b"garbage"),
    "cut trainer state": lambda folder: (folder / "trainer_state.json").write_text('{"step": 4, "hi'),
    "foreign trainer state": lambda folder: (folder / "trainer_state.json").write_text('{"step": 4}'),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_is_skipped_never_trained_from(trained, adata, tmp_path, damage):
    "Issue 18, case 4: resume from a damaged checkpoint trained to NaN and replaced final/; now it resumes from the one before."
    run = tmp_path / "run"
    pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK), run, progress=False, stop_after=3)   # checkpoint-2, checkpoint-3
    DAMAGES[damage](run / "checkpoint-3")
    with pytest.warns(UserWarning, match="skipped the damaged checkpoint-3 .*resuming from checkpoint-2"):
        resumed = pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK), run, progress=False)
    assert resumed.history.loss.tolist() == trained[1].history.loss.tolist() and same_weights(resumed, trained[1])
    assert SCFModel.from_pretrained(run / "final") is not None


def test_every_checkpoint_damaged_is_refused_and_nothing_changes(run_copy, adata):
    for name in ("checkpoint-2", "checkpoint-4"): flip_a_byte(run_copy / name / "model.safetensors")
    before = files_snapshot(run_copy)
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be used.*do not match checksums.json"):
        pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK), run_copy, progress=False)
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
    with pytest.raises(CheckpointError, match="different model or vocabulary .*vocab_version"):   # other cells: other medians
        pretrain(adata[:40].copy(), ModelConfig(**TINY), extend, run_copy, progress=False)
    its_tokenizer = SCFModel.from_pretrained(run_copy / "final").tokenizer
    with pytest.raises(CheckpointError, match="trained on 48 cells"):
        pretrain(adata[:40].copy(), ModelConfig(**TINY), extend, run_copy, tokenizer=its_tokenizer, progress=False)
    assert files_snapshot(run_copy) == before


def test_another_steps_is_part_of_the_schedule_extend_says_so(run_copy, adata):
    "Issue 18, case 9: a changed steps made the schedule jump silently; now it needs extend=True, which warns."
    before = files_snapshot(run_copy)
    with pytest.raises(CheckpointError, match=r"run of steps=4; steps=6 changes its learning-rate schedule.*extend=True"):
        pretrain(adata, ModelConfig(**TINY), TrainConfig(**{**QUICK, "steps": 6}), run_copy, progress=False)
    assert files_snapshot(run_copy) == before
    with pytest.warns(UserWarning, match="extending the run .* from steps=4 to steps=6"):
        longer = pretrain(adata, ModelConfig(**TINY), TrainConfig(**{**QUICK, "steps": 6}), run_copy, progress=False, extend=True)
    assert longer.history.step.tolist() == [1, 2, 3, 4, 5, 6] and (run_copy / "checkpoint-6").is_dir()
    assert json.loads((run_copy / "final" / "train_config.json").read_text())["steps"] == 6


def test_the_final_folder_checks_its_vocabulary(run_copy, genes, adata):
    model = SCFModel.from_pretrained(run_copy / "final")
    assert model.tokenizer.vocab.version == model.config.vocab_version and model.tokenizer.name == "rank"
    Vocab.from_genes(genes[:30]).save(run_copy / "final" / "vocab.json")
    with pytest.raises(ModelError, match="vocab.json in .* do not match checksums.json"):
        SCFModel.from_pretrained(run_copy / "final")
    (run_copy / "final" / "checksums.json").unlink()                 # a folder without checksums still checks the version
    with pytest.raises(ModelError, match="vocab.json has version .* the model was trained with"):
        SCFModel.from_pretrained(run_copy / "final")
    (run_copy / "final" / "vocab.json").unlink()
    bare = SCFModel.from_pretrained(run_copy / "final")
    assert bare.tokenizer is None
    with pytest.raises(DataError, match="no tokenizer"): embed_cells(bare, adata)


def test_pretrain_leaves_the_input_unchanged_and_rejects_tiny_data(genes, tmp_path):
    data = make_counts(genes, n_cells=10)
    before = (data.X.copy(), data.obs.copy(), data.var.copy(), dict(data.obsm), dict(data.uns))
    with pytest.raises(ValueError, match="lower batch_size"):
        pretrain(data, ModelConfig(**TINY), TrainConfig(batch_size=16), tmp_path, progress=False)
    pretrain(data, ModelConfig(**TINY), TrainConfig(steps=1, batch_size=4), tmp_path / "ok", progress=False)
    assert (data.X != before[0]).nnz == 0 and data.obs.equals(before[1]) and data.var.equals(before[2])
    assert dict(data.obsm) == before[3] and dict(data.uns) == before[4]


def test_pretrain_continues_a_given_model_and_reads_h5ad_paths(trained, adata, tmp_path):
    model = SCFModel.from_pretrained(trained[0] / "final")
    tokenizer = model.tokenizer
    before = {name: value.clone() for name, value in model.state_dict().items()}
    adata.write_h5ad(tmp_path / "cells.h5ad")
    again = pretrain(str(tmp_path / "cells.h5ad"), model, TrainConfig(**{**QUICK, "steps": 2}), tmp_path / "more", progress=False)
    assert again is model and len(again.history) == 2 and again.tokenizer is tokenizer     # the model's own tokenizer
    assert any(not torch.equal(before[name], value) for name, value in model.state_dict().items())
    model.tokenizer = None
    with pytest.raises(ModelError, match="built for a vocabulary of 63 tokens"):
        pretrain(adata, model, TrainConfig(**QUICK), tmp_path / "bad", vocab=Vocab.from_genes(list(adata.var_names[:20])), progress=False)


def test_a_model_with_its_own_tokenizer_refuses_another_vocabulary(trained, adata, tmp_path):
    model = SCFModel.from_pretrained(trained[0] / "final")
    other = Vocab.from_genes(list(adata.var_names[:20]))
    with pytest.raises(ModelError, match="drop vocab="):
        pretrain(adata, model, TrainConfig(**QUICK), tmp_path / "other", vocab=other, progress=False)
    assert not (tmp_path / "other").exists()
    assert not model.training and not trained[1].training               # pretrain returns models ready for inference


# --- issue 18: a run folder that protects the user's work ---------------------------------------------

LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from scfoundation.train import run_lock
    with run_lock(Path(sys.argv[1])):
        print("locked", flush=True); time.sleep(120)
""")


def test_two_runs_into_one_folder_the_second_is_refused_naming_the_holder(adata, tmp_path):
    "Issue 18, case 3: two pretrain runs into one folder both 'succeeded', one replacing the other."
    (tmp_path / "holder.py").write_text(LOCK_HOLDER)
    holder = subprocess.Popen([sys.executable, str(tmp_path / "holder.py"), str(tmp_path / "run")], env=SUBPROCESS_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        with pytest.raises(CheckpointError, match=f"in use by another run \\(pid {holder.pid} on "):
            pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK), tmp_path / "run", progress=False)
        assert not any((tmp_path / "run").glob("checkpoint-*"))
    finally:
        holder.kill(); holder.wait()
    model = pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK), tmp_path / "run", progress=False)  # a killed holder lets go
    assert len(model.history) == 4 and sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-2", "checkpoint-4", "final"]


def test_a_run_replaces_or_prunes_only_what_it_wrote(run_copy, adata, tmp_path, monkeypatch):
    "Issue 18, case 2: the user's final/notes.txt, an incomplete checkpoint-1/ and another tool's checkpoint-N/ were deleted."
    (run_copy / "final" / "notes.txt").write_text("my notes")
    before = files_snapshot(run_copy)
    with pytest.raises(CheckpointError, match=r"final holds what scfoundation did not write \(notes.txt\)"):
        pretrain(adata, ModelConfig(**TINY), TrainConfig(**{**QUICK, "steps": 6}), run_copy, progress=False, extend=True)
    assert files_snapshot(run_copy) == before
    fresh = tmp_path / "fresh"
    (fresh / "checkpoint-1").mkdir(parents=True); (fresh / "checkpoint-1" / "config.json").write_text("{}")  # a copy under way
    (fresh / "checkpoint-900").mkdir(); (fresh / "checkpoint-900" / "weights.bin").write_bytes(b"another tool")
    pretrain(adata, ModelConfig(**TINY), TrainConfig(**{**QUICK, "keep_last": 1}), fresh, progress=False)
    assert sorted(p.name for p in fresh.iterdir()) == ["checkpoint-1", "checkpoint-4", "checkpoint-900", "final"]
    assert (fresh / "checkpoint-900" / "weights.bin").read_bytes() == b"another tool"
    clash = tmp_path / "clash"; (clash / "checkpoint-2").mkdir(parents=True)
    no_training(monkeypatch)                                            # refused before the first step
    with pytest.raises(CheckpointError, match="checkpoint-2 holds what scfoundation did not write"):
        pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK), clash, progress=False)
    with pytest.raises(CheckpointError, match="holds a finished model, but no checkpoint"):
        shutil.rmtree(run_copy / "checkpoint-2"); shutil.rmtree(run_copy / "checkpoint-4")
        pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK), run_copy, progress=False)


def dead_pid():
    process = subprocess.Popen(["true"]); process.wait()
    return process.pid


def test_what_killed_writers_left_is_recovered_or_removed(run_copy, trained, adata, monkeypatch):
    "A kill between the two renames of a folder replace left final/ aside; temp folders of killed runs stayed forever."
    pid = dead_pid()
    os.replace(run_copy / "final", run_copy / f".final.old.{pid}.tmp")
    (run_copy / f".checkpoint-6.{pid}.tmp").mkdir(); (run_copy / f".checkpoint-6.{pid}.tmp" / "model.safetensors").write_bytes(b"half")
    (run_copy / ".scf-run.lock").write_text(f"pid {pid} on a host, since long ago")   # the lock file of a killed run: no lock
    no_training(monkeypatch)
    with pytest.warns(UserWarning, match="finished run"):
        pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK), run_copy, progress=False)
    assert sorted(p.name for p in run_copy.iterdir()) == ["checkpoint-2", "checkpoint-4", "final"]
    assert same_weights(SCFModel.from_pretrained(run_copy / "final"), trained[1])


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_state(adata, tmp_path, monkeypatch):
    "Issue 18, case 6: lr=1e9 saved a NaN model as final/ with exit 0."
    with pytest.raises(train_module.TrainingError, match=r"at step \d+: training diverged. Likely cause: lr=1e\+09 is too high"):
        pretrain(adata, ModelConfig(**TINY), TrainConfig(**{**QUICK, "lr": 1e9}), tmp_path / "huge", progress=False)
    assert not (tmp_path / "huge" / "final").exists() and not any((tmp_path / "huge").glob("checkpoint-*"))
    run = tmp_path / "run"
    pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK), run, progress=False, stop_after=2)
    before = files_snapshot(run)
    real_step = train_module.train_step
    def nan_at_step_three(*args, **kwargs):
        row = real_step(*args, **kwargs)
        return {**row, "loss": float("nan")} if row["step"] == 3 else row
    monkeypatch.setattr(train_module, "train_step", nan_at_step_three)
    with pytest.raises(train_module.TrainingError, match="loss is nan .* at step 3.*checkpoint-2 and final/ are as they were"):
        pretrain(adata, ModelConfig(**TINY), TrainConfig(**QUICK), run, progress=False)
    assert files_snapshot(run) == before


def test_resume_refuses_other_cells_of_the_same_size(run_copy, genes):
    "Issue 18, case 9: resume accepted other data with the same number of cells."
    other = make_counts(genes, seed=1)
    before = files_snapshot(run_copy)
    with pytest.raises(CheckpointError, match="different model or vocabulary"):      # their medians differ
        pretrain(other, ModelConfig(**TINY), TrainConfig(**QUICK), run_copy, progress=False)
    its_tokenizer = SCFModel.from_pretrained(run_copy / "final").tokenizer          # the same tokens: the counts still differ
    with pytest.raises(CheckpointError, match="trained on other data of the same size"):
        pretrain(other, ModelConfig(**TINY), TrainConfig(**QUICK), run_copy, tokenizer=its_tokenizer, progress=False)
    assert files_snapshot(run_copy) == before


def test_flipped_bytes_in_a_saved_model_are_refused(run_copy, adata, tmp_path):
    "Issue 18, case 5: flipped bytes in model.safetensors loaded silently (embeddings off by up to 11, or NaN)."
    flip_a_byte(run_copy / "final" / "model.safetensors")
    with pytest.raises(ModelError, match="model.safetensors in .* do not match checksums.json"):
        SCFModel.from_pretrained(run_copy / "final")
    adata.write_h5ad(tmp_path / "cells.h5ad")
    from scfoundation.cli import main
    assert main(["embed", str(run_copy), str(tmp_path / "cells.h5ad"), str(tmp_path / "embedded.h5ad")]) == 2
    assert not (tmp_path / "embedded.h5ad").exists()


def test_written_files_have_the_usual_modes(trained):
    "Weights and config were written 0600 (tempfile.mkstemp) while the rest was 0644: a shared folder could not read its model."
    modes = {oct(p.stat().st_mode & 0o777) for p in trained[0].rglob("*") if p.is_file()}
    umask = os.umask(0); os.umask(umask)
    assert modes == {oct(0o666 & ~umask)}


# --- issue 17: compute accounting ---------------------------------------------------------------------

def test_history_counts_the_flops_each_step_needed_and_its_utilisation(trained, adata):
    "Each row's FLOPs are count_flops of that step's masked batches (training: 3x forward); MFU is against the measured peak."
    from scfoundation.model import count_flops
    from scfoundation.train import derived_seed, matmul_peak_flops
    _, model = trained
    config = TrainConfig(**QUICK)
    stream = training_stream(adata, model.config, config, tokenizer=model.tokenizer)
    batches = stream.batches(0)
    for step in range(2):
        masked = [mask_batch(next(batches), model.config, config.mask_prob, seed=derived_seed(config.seed, 0, step, micro))
                  for micro in range(config.grad_accum)]
        expected = sum(count_flops(model.config, batch, training=True)["total"] for batch in masked)
        assert model.history.flops[step] == pytest.approx(expected, rel=1e-12)
    seconds = model.history.flops / (model.history.mfu * matmul_peak_flops("cpu", "fp32"))     # the step times behind the MFU
    tokens = model.history.tokens_per_s * seconds                                              # the same steps' tokens
    assert (model.history.mfu > 0).all() and model.history.mfu.median() < 1.5 and (tokens.round() >= model.history.masked).all()


def test_the_peak_is_declared_for_known_gpus_and_measured_once_elsewhere(monkeypatch):
    from scfoundation import train as module
    assert module.declared_peak_flops("NVIDIA H200", "bf16") == 989.4e12 and module.declared_peak_flops("Tesla T4", "fp32") is None
    monkeypatch.setattr(module, "_PEAKS", {})
    calls = []
    real_probe = module._matmul_probe
    monkeypatch.setattr(module, "_matmul_probe", lambda *args: calls.append(args) or real_probe(*args))
    first, second = module.matmul_peak_flops("cpu", "fp32"), module.matmul_peak_flops("cpu", "fp32")
    assert first == second > 1e8 and len(calls) == 1


def test_embedding_reports_cells_per_second(trained, adata, capsys):
    _, model = trained
    embed_cells(model, adata, progress=True)
    assert "cell/s" in capsys.readouterr().err
