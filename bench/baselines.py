"""scVI's training length on the book's data: scvi-tools' default (400 epochs on 700 cells) beside the
100 epochs the chapters run, over three seeds, scored by chapter 7's evaluation (scanpy's Leiden with
scib's sweep, label silhouette, kNN accuracy), with PCA on HVGs beside them.

    python bench/baselines.py              # 100 and 400 epochs, seeds 0 1 2 (about 3 minutes on 2 cores)
    python bench/baselines.py --epochs 50 100 --seeds 0 1
"""
import argparse, time

import torch

from scfoundation.data import load_pbmc68k
from scfoundation.evaluate import evaluate_seeds, format_mean_sd, pca_baseline, scvi_baseline, seed_summary
from scfoundation.genes import map_genes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", nargs="+", type=int, default=[100, 400], help="scVI epochs to compare (default 100 400)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pbmc = map_genes(load_pbmc68k())
    pca_baseline(pbmc)
    methods, seconds = {"X_pca_hvg": "X_pca_hvg"}, {}
    for epochs in args.epochs:
        started = time.perf_counter()
        for seed in args.seeds: scvi_baseline(pbmc, max_epochs=epochs, key=f"X_scvi{epochs}_{seed}", seed=seed)
        seconds[f"scVI, {epochs} epochs"] = (time.perf_counter() - started) / len(args.seeds)
        methods[f"scVI, {epochs} epochs"] = [f"X_scvi{epochs}_{seed}" for seed in args.seeds]
    summary = seed_summary(evaluate_seeds(pbmc, methods, args.seeds), ["ARI", "NMI", "silhouette", "knn_accuracy"])
    table = format_mean_sd(summary)
    table["s per model"] = [f"{seconds[name]:.1f}" if name in seconds else "" for name in table.index]
    print(f"pbmc68k, {pbmc.n_obs} cells; mean ± sd over seeds {args.seeds}; {args.threads} torch threads")
    print(table.to_string())


if __name__ == "__main__":
    main()
