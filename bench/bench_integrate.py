"""Batch integration on the simulator: scib-style table for PCA, Harmony and the pretrained model (chapter 9).

    python bench/bench_integrate.py            # the teaching run of the chapter (900 cells, 60 steps)
    python bench/bench_integrate.py --full     # 3,000 cells, 600 pretraining steps
"""
import argparse
import time

import pandas as pd

from scfoundation.evaluate import embed_adata, pca_baseline
from scfoundation.integrate import harmony_embedding, integration_scores
from scfoundation.model import ModelConfig
from scfoundation.simulate import SimConfig, simulate
from scfoundation.train import TrainConfig, pretrain


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more cells and a longer pretraining run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulation")
    args = parser.parse_args()
    began = time.perf_counter()
    world = simulate(SimConfig(n_cells=3000 if args.full else 900, n_genes=200, n_cell_types=6, n_batches=3,
                               batch_effect_sd=0.3, batch_depth_sd=0.3, seed=args.seed))
    keep = ~((world.obs["cell_type"] == "A.3") & (world.obs["batch"] != "batch0")).to_numpy()  # an isolated label
    sim = world[keep].copy()
    pca_baseline(sim, n_hvg=200, n_comps=30, seed=0)
    harmony_embedding(sim, key="X_harmony", seed=0)
    train_config = (TrainConfig(steps=600, batch_size=32, lr=1e-3, warmup_steps=50, save_every=200) if args.full else
                    TrainConfig(steps=60, batch_size=16, lr=2e-3, warmup_steps=6, save_every=0))
    model = pretrain(sim, ModelConfig.named("teaching"), train_config, cache=True, progress=False)
    embed_adata(sim, model, key_added="X_scf", progress=False)
    harmony_embedding(sim, basis="X_scf", key="X_scf_harmony", seed=0)
    table = integration_scores(sim, ["X_pca_hvg", "X_harmony", "X_scf", "X_scf_harmony"])
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"{sim.n_obs} cells, {sim.obs['batch'].nunique()} batches, {train_config.steps} pretraining steps, seed {args.seed}")
        print(table.round(3).to_string())
    print(f"total {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
