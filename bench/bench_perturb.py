"""Perturbation response on the simulator: held-out singles and doubles, model head vs mean and additive baselines (chapter 10).

    python bench/bench_perturb.py            # the teaching run of the chapter (3,000 cells, 16 singles, 16 doubles)
    python bench/bench_perturb.py --full     # 8,000 cells, 24 singles, 40 doubles, 600 pretraining steps
"""
import argparse
import time

import pandas as pd
import torch

from scfoundation.evaluate import gene_embeddings
from scfoundation.model import ModelConfig, SCFModel
from scfoundation.perturb import (additive_baseline, design_perturbations, fit_perturbation_model,
                                  mean_baseline, observed_response, predict_response, response_scores,
                                  split_perturbations, true_response)
from scfoundation.simulate import SimConfig, simulate
from scfoundation.train import TrainConfig, pretrain


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more cells and perturbations, longer pretraining")
    args = parser.parse_args()
    began = time.perf_counter()
    n_singles, n_doubles = (24, 40) if args.full else (16, 16)
    specs = design_perturbations(n_tfs=30, n_singles=n_singles, n_doubles=n_doubles, seed=0)
    sim = simulate(SimConfig(n_cells=8000 if args.full else 3000, n_genes=200, n_tfs=30, edge_density=0.1, n_batches=1,
                             perturbations=tuple(specs), perturbed_fraction=0.8, seed=0))
    split, observed, truth = split_perturbations(specs, seed=0), observed_response(sim), true_response(sim)
    controls = sim[sim.obs["perturbation"] == "control"].copy()
    train_config = (TrainConfig(steps=600, batch_size=32, lr=1e-3, warmup_steps=50, save_every=200) if args.full else
                    TrainConfig(steps=60, batch_size=16, lr=2e-3, warmup_steps=6, save_every=0))
    model = pretrain(controls, ModelConfig.named("teaching"), train_config, cache=True, progress=False)
    torch.manual_seed(0)
    untrained = SCFModel(model.config); untrained.tokenizer = model.tokenizer
    embeddings = {name: gene_embeddings(each, controls, seed=0).to_numpy()
                  for name, each in (("model (pretrained)", model), ("model (untrained)", untrained))}
    train_responses = observed.loc[split.index[split["split"] == "train"]]
    test_groups = split.loc[split["split"] == "test", "group"]
    tests, tfs = list(test_groups.index), list(sim.uns["truth"]["tfs"])
    predictions = {"observed (ceiling)": observed.loc[tests], "mean baseline": mean_baseline(train_responses, tests),
                   "additive baseline": additive_baseline(train_responses, tests),
                   **{name: predict_response(fit_perturbation_model(embedding, train_responses, tfs=tfs, seed=0), tests)
                      for name, embedding in embeddings.items()}}
    with pd.option_context("display.width", 200):
        print(f"{sim.n_obs} cells, {len(train_responses)} training / {len(tests)} held-out perturbations, "
              f"{train_config.steps} pretraining steps; scored against the simulator's true response")
        print(response_scores(predictions, truth, test_groups).round(3).to_string())
    print(f"total {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
