"""Training throughput of the teaching run on the default data, fp32 beside bf16 autocast, through
`scfoundation.train.pretrain` itself (tokenization, masking, optimizer and checkpoint included).

    python -m bench.pretrain            # 30 steps per precision (run as a module: bench/tokenization.py
                                        # would shadow the standard library as a script)
    python -m bench.pretrain --quick    # 8 steps per precision
"""
import argparse, tempfile, time

import torch

from scfoundation.data import load_pbmc68k
from scfoundation.genes import map_genes
from scfoundation.model import ModelConfig
from scfoundation.train import TrainConfig, pretrain


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 steps per precision instead of 30")
    parser.add_argument("--batch-size", type=int, default=16, help="cells per step (default 16, as in the chapter)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = 8 if args.quick else 30
    pbmc = map_genes(load_pbmc68k())
    print(f"teaching config, pbmc68k ({pbmc.n_obs} cells), batch {args.batch_size}, {steps} steps, {args.threads} threads")
    print(f"{'precision':<10}{'tokens/s':>12}{'s/step':>10}{'final loss':>12}")
    for precision in ("fp32", "bf16"):
        config = TrainConfig(steps=steps, batch_size=args.batch_size, lr=2e-3, warmup_steps=4, save_every=0, precision=precision)
        started = time.perf_counter()
        history = pretrain(pbmc, ModelConfig.named("teaching"), config, tempfile.mkdtemp(), progress=False).history
        seconds = (time.perf_counter() - started) / steps
        rate = history.tokens_per_s.iloc[2:].median()             # the first steps warm up caches and allocators
        print(f"{precision:<10}{rate:>12,.0f}{seconds:>10.2f}{history.loss.iloc[-1]:>12.3f}")


if __name__ == "__main__":
    main()
