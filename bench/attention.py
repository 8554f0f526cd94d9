"""What moves attention towards the matmul peak on this machine: SDPA backend, head width, torch.compile.

Attention is the part of a training step furthest below the matmul peak. At Geneformer-6L's width
(256) it times the attention core alone, forward + backward, on full-length cells, for each
precision and length:
- the SDPA backends torch offers on this device (flash, math; "default" is torch's own choice);
- the same width cut into 8, 4 (Geneformer-6L) or 2 heads (head widths 32, 64, 128): the same FLOPs;
- torch.compile of the attention core (inductor), against the eager call.
Figures are useful attention FLOP/s (QK^T and AV, forward 4 L^2 d per cell, backward twice that)
over the matmul peak measured in the same run.

    python bench/attention.py                       # lengths 512 and 2048, fp32 and bf16 (bf16 only with bf16 units)
    python bench/attention.py --lengths 512 --precisions fp32 --no-compile
"""
import sys
from pathlib import Path

sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from scfoundation.train import matmul_peak_flops

BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def attention_core(query, key, value):
    return F.scaled_dot_product_attention(query, key, value)


def seconds(run, repeats: int) -> float:
    "Median seconds of run() after two warm-up calls."
    run(); run()
    times = []
    for _ in range(repeats):
        began = time.perf_counter(); run(); times.append(time.perf_counter() - began)
    return statistics.median(times)


def forward_backward(function, shape, dtype, backend=None):
    "A callable running attention forward and backward on fresh (B, H, L, d_h) tensors of `shape`."
    tensors = [torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3)]

    def run():
        with (sdpa_kernel(backend) if backend is not None else torch.enable_grad()):
            function(*tensors).sum().backward()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--width", type=int, default=256, help="model width (Geneformer-6L: 256)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per call: 16 cells of 512, 4 of 2048")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if "bf16" in args.precisions and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("(bf16 skipped: this CPU has no bf16 matrix units)"); args.precisions = [p for p in args.precisions if p != "bf16"]
    peaks = {precision: matmul_peak_flops("cpu", precision, sizes=(1024, 2048), repeats=5) for precision in args.precisions}
    print(f"torch {torch.__version__}, {args.threads} threads; matmul peak " + ", ".join(f"{p} {peaks[p] / 1e9:.0f} GFLOP/s" for p in peaks))
    header = f"{'prec':<6}{'L':>6}{'variant':>22}{'ms':>9}{'GFLOP/s':>9}{'% peak':>8}"
    print(header); print("-" * len(header))
    compiled = None if args.no_compile else torch.compile(attention_core, dynamic=False)
    for precision in args.precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for length in args.lengths:
            cells = max(1, args.tokens // length)
            useful = 3 * 4 * cells * length ** 2 * args.width
            variants = [(f"4 heads, {name}", forward_backward(attention_core, (cells, 4, length, args.width // 4), dtype, backend))
                        for name, backend in BACKENDS.items()]
            variants += [(f"{heads} heads of {args.width // heads}", forward_backward(attention_core, (cells, heads, length, args.width // heads), dtype))
                         for heads in (8, 2)]
            if compiled is not None:
                variants.append(("4 heads, compiled", forward_backward(compiled, (cells, 4, length, args.width // 4), dtype)))
            for name, run in variants:
                try: taken = seconds(run, args.repeats)
                except RuntimeError as error:
                    print(f"{precision:<6}{length:>6}{name:>22}   not available: {str(error).splitlines()[0][:60]}"); continue
                print(f"{precision:<6}{length:>6}{name:>22}{1e3 * taken:9.1f}{useful / taken / 1e9:9.0f}{100 * useful / taken / peaks[precision]:7.1f}%", flush=True)


if __name__ == "__main__":
    main()
