"""In-silico perturbation and network inference against the simulator's truth, beside their baselines.

    python -P bench/insilico_grn.py [--steps 200 2000] [--cells 800] [--perturb-cells 30] [--threads 2]

For each pretraining length: pretrains the teaching config on a simulation (cached between runs,
like the chapters), then prints the in-silico table (model vs differential expression, A.1 → B.1
deletions), the network table (embeddings and attention vs correlation, AUPRC beside the edge
density) and the seconds each part took, with forward passes per second for the perturbations.
Numbers depend on the machine; run on a quiet one.
"""
import sys
from pathlib import Path

sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import time

import pandas as pd
import torch

from scfoundation.grn import grn_benchmark
from scfoundation.insilico import insilico_benchmark
from scfoundation.model import ModelConfig
from scfoundation.simulate import simulate
from scfoundation.train import TrainConfig, pretrain


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[200], help="pretraining steps, one run each")
    parser.add_argument("--cells", type=int, default=800, help="simulated cells")
    parser.add_argument("--perturb-cells", type=int, default=30, help="source cells perturbed per gene")
    parser.add_argument("--grn-cells", type=int, default=300, help="cells for contextual embeddings and attention")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pd.set_option("display.width", 200)
    sim = simulate(n_cells=args.cells, n_genes=200, n_tfs=20, edge_density=0.1, n_cell_types=4, lineage_depth=2,
                   n_batches=1, perturbations=("ko:tf0", "ko:tf3"), perturbed_fraction=0.3, library_log_mean=7.0, seed=0)
    for steps in args.steps:
        train_config = TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=max(1, steps // 10), save_every=0)
        started = time.perf_counter()
        model = pretrain(sim, ModelConfig.named("teaching"), train_config, cache=True, progress=False)
        pretrain_s = time.perf_counter() - started
        started = time.perf_counter()
        table, per_gene = insilico_benchmark(model, sim, None, "A.1", "B.1", min_expressed=0.5, max_cells=args.perturb_cells)
        insilico_s = time.perf_counter() - started
        started = time.perf_counter()
        grn_table, _ = grn_benchmark(model, sim, max_cells=args.grn_cells)
        grn_s = time.perf_counter() - started
        print(f"\n== {steps} pretraining steps ({pretrain_s:.1f} s, or read from the cache) ==")
        print(f"in silico: {len(per_gene)} genes x {args.perturb_cells} cells in {insilico_s:.1f} s "
              f"({len(per_gene) / insilico_s:.1f} genes/s)")
        print(table.round(3).to_string())
        print(f"network: {grn_s:.1f} s")
        print(grn_table.round(3).to_string())


if __name__ == "__main__":
    main()
