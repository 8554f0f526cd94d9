"""Training throughput and MFU of scfoundation's model on a GPU (or, smaller, on any device).

For each configuration (Geneformer-6L, and a ~100M-parameter model: 12 layers of width 768) at
2,048 tokens, it times full training steps (forward, backward, fused AdamW; 15% masking) on two
kinds of batch: cells that all fill the length, and ragged cells (lengths drawn from 256 to the
length, as real cells are) where padding would be wasted work. Each runs with the attention backends
asked for: "padded" (one grid, a key mask) and "jagged" (nested tensors over the cells' offsets: the
flash / memory-efficient kernels see no padding). It prints tokens/s, model TFLOP/s (useful
matrix-product FLOPs, scfoundation.model.count_flops) and MFU against the device's peak in that
precision (declared for known GPUs, else measured with a matmul probe; scfoundation.train.matmul_peak_flops).

    python bench/gpu.py                              # on CUDA: both configs, bf16, both backends
    python bench/gpu.py --compile                    # also torch.compile'd steps
    python bench/gpu.py --device cpu --quick         # the same script, small, on a CPU (a smoke run)
    python bench/gpu.py --attention-only             # SDPA alone, padded grid against jagged, on ragged cells

Nothing here downloads anything: the batches are random cells of the configuration's shape.
"""
import sys
from pathlib import Path

# bench/ holds scripts named like standard modules (bench/tokenize.py): keep this folder off the import path
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from scfoundation.model import ModelConfig, SCFModel, TokenLayout, count_flops, jagged_attention, jagged_heads, mask_batch, random_batch
from scfoundation.train import matmul_peak_flops

CONFIGS = {
    "geneformer-6l": ModelConfig.named("geneformer-6l", dropout=0.0),
    "100m": ModelConfig.named("geneformer-6l", d_model=768, n_layers=12, n_heads=12, d_ff=3072, dropout=0.0,
                              activation="gelu"),   # ~104M parameters with Geneformer's 25,426-token vocabulary
}


def synchronize(device: torch.device):
    if device.type == "cuda": torch.cuda.synchronize(device)


def ragged_lengths(length: int, tokens: int, seed: int) -> list[int]:
    "Gene counts (without `<cls>`) drawn uniformly between 256 (a quarter of short lengths) and the length, filling about `tokens`."
    rng, lengths, shortest = np.random.default_rng(seed), [], min(256, length // 4)
    while sum(lengths) + len(lengths) < tokens:
        lengths.append(int(rng.integers(shortest, length)))
    return sorted(lengths, reverse=True)


def make_batches(config: ModelConfig, kind: str, length: int, tokens: int, n_batches: int) -> list[dict]:
    "Masked batches of full-length or ragged cells, about `tokens` tokens each."
    batches = []
    for index in range(n_batches):
        genes = [length - 1] * max(1, tokens // length) if kind == "full" else ragged_lengths(length, tokens, seed=index)
        batches.append(mask_batch(random_batch(config, genes, seed=index), config, seed=index))
    return batches


def time_training(config: ModelConfig, batches: list[dict], device: torch.device, precision: str,
                  attention: str, compile_model: bool, repeats: int) -> dict:
    "Median seconds per training step over `batches` (after warm-up steps), and FLOPs and tokens per step."
    torch.manual_seed(0)
    model = SCFModel(config).to(device).train()
    model.attention = attention
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
    step_model = torch.compile(model, dynamic=True) if compile_model else model
    batches = [{key: value.to(device) for key, value in batch.items()} for batch in batches]

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = step_model(batch)["loss"]
        loss.backward()
        optimizer.step(); optimizer.zero_grad(set_to_none=True)

    for batch in batches: step(batch)                     # warm-up (and compilation)
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        for batch in batches: step(batch)
        synchronize(device)
        seconds.append((time.perf_counter() - began) / len(batches))
    flops = statistics.mean(count_flops(config, batch)["total"] for batch in batches)
    tokens = statistics.mean(int(batch["attention_mask"].sum()) for batch in batches)
    return dict(seconds=statistics.median(seconds), flops=flops, tokens=tokens)


def attention_only(args, device: torch.device):
    "Fused SDPA forward + backward on ragged cells: the padded grid with a key mask against jagged tensors."
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    for name in args.configs:
        config = CONFIGS[name]
        heads, width = config.n_heads, config.d_model // config.n_heads
        lengths = torch.tensor(ragged_lengths(args.length, args.tokens, seed=0)) + 1
        keep = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
        layout = TokenLayout.from_keep(keep.to(device))
        rows = torch.randn(int(lengths.sum()), 3 * config.d_model, device=device, dtype=dtype, requires_grad=True)

        def padded():
            grid = layout.to_grid(rows).view(layout.batch_size, layout.width, 3, heads, width)
            query, key, value = grid.permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=layout.key_mask)
            layout.from_grid(out.transpose(1, 2).reshape(layout.batch_size, layout.width, -1)).sum().backward()

        def jagged():
            query, key, value = (jagged_heads(part, layout.offsets, heads) for part in rows.chunk(3, dim=-1))
            jagged_attention(query, key, value).sum().backward()

        times = {}
        for label, run in (("padded", padded), ("jagged", jagged)):
            run(); synchronize(device)
            began = time.perf_counter()
            for _ in range(args.repeats): run()
            synchronize(device)
            times[label] = (time.perf_counter() - began) / args.repeats
        useful = 3 * 4 * float((lengths.double() ** 2).sum()) * config.d_model       # QK^T and AV, forward + backward
        print(f"{name:<15}{len(lengths):>4} cells, {int(lengths.sum()):>6} tokens: padded {1e3 * times['padded']:8.2f} ms"
              f"  jagged {1e3 * times['jagged']:8.2f} ms  (padded/jagged {times['padded'] / times['jagged']:.2f}x;"
              f" useful attention TFLOP/s padded {useful / times['padded'] / 1e12:.2f}, jagged {useful / times['jagged'] / 1e12:.2f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--length", type=int, default=2048, help="tokens per full cell, <cls> included")
    parser.add_argument("--tokens", type=int, default=32_768, help="tokens per batch (16 full cells of 2,048)")
    parser.add_argument("--batches", type=int, default=2, help="distinct batches per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--attention", nargs="+", default=["padded", "jagged"], choices=("padded", "jagged", "auto"))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model, dynamic=True)")
    parser.add_argument("--attention-only", action="store_true", help="only SDPA, padded against jagged, on ragged cells")
    parser.add_argument("--quick", action="store_true", help="length 512, 4,096 tokens, 2 repeats: a smoke run (CPU-sized)")
    args = parser.parse_args()
    if args.quick: args.length, args.tokens, args.repeats, args.batches = 512, 4096, 2, 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available(): raise SystemExit("no CUDA device visible: pass --device cpu")
    warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = matmul_peak_flops(device, args.precision)   # on CPU: the same probe sizes as the trainer's MFU
    print(f"torch {torch.__version__} on {name}; {args.precision} matmul peak {peak / 1e12:.3g} TFLOP/s; length {args.length},"
          f" ~{args.tokens:,} tokens per batch, {args.repeats} repeats of {args.batches} batches")
    if args.attention_only: return attention_only(args, device)
    header = f"{'config':<15}{'params':>7}{'cells':>8}{'attention':>10}{'compiled':>9}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>9}"
    print(header); print("-" * len(header))
    for config_name in args.configs:
        config = CONFIGS[config_name]
        millions = SCFModel(config).num_parameters() / 1e6
        for kind in ("full", "ragged"):
            batches = make_batches(config, kind, args.length, args.tokens, args.batches)
            for attention in args.attention:
                for compiled in ([False, True] if args.compile else [False]):
                    if device.type == "cuda": torch.cuda.reset_peak_memory_stats(device)
                    result = time_training(config, batches, device, args.precision, attention, compiled, args.repeats)
                    memory = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
                    achieved = result["flops"] / result["seconds"]
                    print(f"{config_name:<15}{millions:6.0f}M{kind:>8}{attention:>10}{'yes' if compiled else 'no':>9}"
                          f"{result['tokens'] / result['seconds']:11.0f}{achieved / 1e12:9.2f}{100 * achieved / peak:6.1f}%{memory:9.1f}", flush=True)
    print("\nMFU: useful matrix-product FLOPs per second (count_flops: no padding, head on masked tokens only) over the peak.")


if __name__ == "__main__":
    main()
