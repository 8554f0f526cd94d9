"""Build and stream a simulated corpus; print what pretraining at scale needs from the data path.

Prints: peak memory of the whole process tree (main process + build workers / DataLoader workers)
during the build and during pretraining, as RSS summed over processes (counts pages that forked
workers share once per process, so it overstates) and as PSS (shared pages split between them); the build rate (cells/s); the disk used (bytes per cell and per stored
count); the stream rate (cells/s with 0 and N loader workers); the model's consumption rate (cells/s
of the teaching model training here) and the ratio stream / consumption; and, for a Geneformer-6L
sized model, the training FLOPs per cell measured on the streamed cells.

    python bench/corpus.py                          # 1M cells (simulated once, hard-linked into 50 files)
    python bench/corpus.py --cells 200000 --quick   # a smaller run under CPU contention

Each phase runs in a child process so that its peak memory is its own.
"""
import sys
from pathlib import Path

# bench/ holds scripts named like standard modules (bench/tokenize.py): keep this folder off the import path
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time


def tree_memory_bytes(root: int) -> tuple[int, int, int]:
    "(RSS, PSS) summed over a process and all its descendants, and the PSS of the process alone, from /proc."
    children, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit(): continue
        try:
            with open(f"/proc/{entry}/stat") as handle: fields = handle.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError): continue
    total_rss, total_pss, root_pss, todo = 0, 0, 0, [root]
    while todo:
        pid = todo.pop(); total_rss += rss.get(pid, 0); todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                pss = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("Pss:"))
        except (OSError, StopIteration): pss = rss.get(pid, 0)
        total_pss += pss; root_pss = pss if pid == root else root_pss
    return total_rss, total_pss, root_pss


def run_phase(args, phase: str) -> tuple[dict, list]:
    "Run `phase` in a child process; return (its JSON result, [peak RSS, peak PSS] of its process tree and its own peak PSS, bytes)."
    result_file = Path(args.out) / f"{phase}.json"
    command = [sys.executable, __file__, "--phase", phase] + sys.argv[1:]
    child = subprocess.Popen(command)
    peak, done = [0, 0, 0], threading.Event()
    def sample():
        while not done.is_set():
            peak[:] = [max(old, new) for old, new in zip(peak, tree_memory_bytes(child.pid))]; time.sleep(0.05)
    sampler = threading.Thread(target=sample); sampler.start()
    code = child.wait(); done.set(); sampler.join()
    if code: sys.exit(f"phase {phase} failed with exit code {code}")
    return json.loads(result_file.read_text()), peak


def phase_simulate(args) -> dict:
    from scfoundation.simulate import SimConfig, simulate_to_h5ad
    inputs = Path(args.out) / "inputs"; inputs.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    first = simulate_to_h5ad(SimConfig(n_cells=args.file_cells, n_genes=args.genes, seed=0), inputs / "study-000.h5ad")
    seconds = time.perf_counter() - began
    n_files = max(1, args.cells // args.file_cells)
    for index in range(1, n_files):  # hard links: distinct sources for the builder, no extra disk
        os.link(first, inputs / f"study-{index:03d}.h5ad")
    return {"n_files": n_files, "simulate_seconds": seconds, "input_bytes": first.stat().st_size * n_files}


def phase_build(args) -> dict:
    from scfoundation.corpus import build_corpus, corpus_vocab
    files = sorted((Path(args.out) / "inputs").glob("*.h5ad"))
    began = time.perf_counter()
    vocab = corpus_vocab(files[:1])  # every file holds the same genes
    manifest = build_corpus(files, Path(args.out) / "corpus", vocab, shard_size=args.shard_size,
                            workers=args.workers, progress=False)
    seconds = time.perf_counter() - began
    disk = sum(path.stat().st_size for path in (Path(args.out) / "corpus").rglob("*") if path.is_file())
    return {"n_cells": manifest["n_cells"], "nnz": manifest["nnz"], "n_shards": len(manifest["shards"]),
            "seconds": seconds, "disk_bytes": disk}


def _model_config(args):
    from scfoundation.model import ModelConfig
    return ModelConfig.named("teaching", input_kind=args.kind, max_len=args.max_len)


def phase_stream(args) -> dict:
    "Stream rate with 0 and N workers; the teaching model's consumption rate on the same batches; FLOPs per cell."
    import itertools
    import torch
    from scfoundation.corpus import Corpus, CorpusDataset, stream_batches
    from scfoundation.model import ModelConfig, SCFModel, count_flops, mask_batch
    from scfoundation.train import TrainConfig, accumulate_gradients, make_optimizer, optimizer_step
    from scfoundation.tokenization import tokenizer_for
    torch.set_num_threads(args.threads)
    corpus, model_config = Corpus(Path(args.out) / "corpus"), _model_config(args)
    began = time.perf_counter()
    tokenizer = tokenizer_for(model_config.input_kind, corpus.vocab, model_config.max_len, model_config.n_bins, gene_medians=corpus.gene_medians)
    medians_seconds = time.perf_counter() - began
    out = {"medians_seconds": medians_seconds}
    for workers in sorted({0, args.workers}):
        dataset = CorpusDataset(corpus, tokenizer, batch_size=args.batch_size, seed=workers)
        batches = stream_batches(dataset, workers)
        warm = list(itertools.islice(batches, 2 * max(workers, 1)))  # worker start-up is not the steady rate
        began = time.perf_counter(); kept = list(itertools.islice(batches, args.stream_batches))
        out[f"stream_cells_per_s_{workers}_workers"] = args.batch_size * len(kept) / (time.perf_counter() - began)
    tokens = [int(batch["attention_mask"].sum()) for batch in kept]
    out["tokens_per_cell"] = sum(tokens) / (len(tokens) * args.batch_size)
    config = ModelConfig(**{**model_config.to_dict(), "vocab_size": len(corpus.vocab)})
    model, train_config = SCFModel(config).train(), TrainConfig(batch_size=args.batch_size, precision=args.precision)
    optimizer = make_optimizer(model, train_config)
    masked = [mask_batch(batch, config, 0.15, seed=index) for index, batch in enumerate(kept[:args.train_steps + 2])]
    for index, batch in enumerate(masked):
        if index == 2: began = time.perf_counter()   # two warm-up steps
        accumulate_gradients(model, [batch], train_config, torch.device("cpu")); optimizer_step(model, optimizer, index, train_config)
    out["model_cells_per_s"] = args.batch_size * (len(masked) - 2) / (time.perf_counter() - began)
    big = ModelConfig.named("geneformer-6l", vocab_size=len(corpus.vocab), input_kind=args.kind, max_len=args.max_len)
    out["geneformer6l_train_flops_per_cell"] = float(count_flops(big, masked[0], training=True)["total"]) / args.batch_size
    return out


def phase_train(args) -> dict:
    "`pretrain` on the corpus itself (loader workers included), for its peak memory and wall time."
    import torch
    from scfoundation.train import TrainConfig, pretrain
    torch.set_num_threads(args.threads)
    config = TrainConfig(steps=args.train_steps, batch_size=args.batch_size, warmup_steps=2, save_every=0,
                         precision=args.precision, num_workers=args.loader_workers)
    began = time.perf_counter()
    history = pretrain(Path(args.out) / "corpus", _model_config(args), config, Path(args.out) / "run", progress=False).history
    return {"seconds": time.perf_counter() - began, "steps": len(history), "final_loss": float(history["loss"].iloc[-1])}


PHASES = {"simulate": phase_simulate, "build": phase_build, "stream": phase_stream, "train": phase_train}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=1_000_000, help="cells in the corpus (default 1M)")
    parser.add_argument("--file-cells", type=int, default=20_000, help="cells per input file (simulated once, hard-linked)")
    parser.add_argument("--genes", type=int, default=2_000, help="genes per simulated cell panel")
    parser.add_argument("--shard-size", type=int, default=16_384, help="cells per shard")
    parser.add_argument("--workers", type=int, default=2, help="build processes, and the stream-rate comparison's DataLoader workers")
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="DataLoader workers while pretraining (default 0: on 2 cores one process streams faster than "
                             "forked workers, and each worker adds its own memory)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the model")
    parser.add_argument("--batch-size", type=int, default=32, help="cells per batch")
    parser.add_argument("--stream-batches", type=int, default=100, help="batches timed for the stream rate")
    parser.add_argument("--train-steps", type=int, default=20, help="optimizer steps timed for the model")
    parser.add_argument("--max-len", type=int, default=1024, help="tokens per cell (model and tokenizer)")
    parser.add_argument("--kind", default="rank", choices=("rank", "bins", "continuous"), help="tokenizer / model input kind")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--quick", action="store_true", help="30 stream batches, 8 train steps")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one, deleted at the end)")
    parser.add_argument("--phase", choices=tuple(PHASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick: args.stream_batches, args.train_steps = 30, 8
    return args


def report(args, results: dict, peaks: dict):
    gib, build, stream = 2**30, results["build"], results["stream"]
    fast = stream[f"stream_cells_per_s_{args.workers}_workers"]
    print(f"corpus: {build['n_cells']:,} cells in {build['n_shards']} shards from {results['simulate']['n_files']} files, "
          f"{build['nnz'] / build['n_cells']:.0f} stored counts per cell")
    print(f"build:  {build['n_cells'] / build['seconds']:,.0f} cells/s ({build['seconds']:.0f} s, {args.workers} workers), "
          f"peak memory of the process tree: RSS {peaks['build'][0] / gib:.2f} GiB, PSS {peaks['build'][1] / gib:.2f} GiB")
    print(f"disk:   {build['disk_bytes'] / 2**20:,.0f} MiB = {build['disk_bytes'] / build['n_cells']:,.0f} B/cell = "
          f"{build['disk_bytes'] / build['nnz']:.2f} B per stored count (inputs {results['simulate']['input_bytes'] / 2**20:,.0f} MiB)")
    print(f"medians (rank-value, one pass): {stream['medians_seconds']:.0f} s")
    for key, value in stream.items():
        if key.startswith("stream_cells_per_s"): print(f"stream: {value:,.0f} cells/s ({key.split('_')[-2]} workers)")
    ratio = fast / stream["model_cells_per_s"]
    print(f"model:  {stream['model_cells_per_s']:,.1f} cells/s consumed (teaching model, {args.precision}, {args.threads} threads, "
          f"{stream['tokens_per_cell']:.0f} tokens/cell) → stream / consumption = {ratio:,.0f}x (goal >= 10x)")
    print(f"train:  pretrain on the corpus ({args.loader_workers} loader workers) {results['train']['steps']} steps in {results['train']['seconds']:.0f} s, "
          f"peak memory of the process tree: RSS {peaks['train'][0] / gib:.2f} GiB, PSS {peaks['train'][1] / gib:.2f} GiB "
          f"(goal <= 2 GiB each; the training process alone: PSS {peaks['train'][2] / gib:.2f} GiB, model and activations included)")
    print(f"FLOPs:  Geneformer-6L training on these cells: {stream['geneformer6l_train_flops_per_cell'] / 1e9:.1f} GFLOP/cell")
    print("JSON:", json.dumps({"args": vars(args), "results": results, "peak_rss_bytes": peaks}))


def main():
    args = parse_args()
    if args.phase:  # a child: run one phase, write its result
        result = PHASES[args.phase](args)
        (Path(args.out) / f"{args.phase}.json").write_text(json.dumps(result)); return
    temporary = args.out is None
    args.out = args.out or tempfile.mkdtemp(prefix="scf-bench-corpus-")
    if not temporary: Path(args.out).mkdir(parents=True, exist_ok=True)
    sys.argv += ["--out", args.out] if temporary else []
    results, peaks = {}, {}
    try:
        for phase in PHASES:
            results[phase], peaks[phase] = run_phase(args, phase)
            print(f"[{phase} done]", flush=True)
        report(args, results, peaks)
    finally:
        if temporary: shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
