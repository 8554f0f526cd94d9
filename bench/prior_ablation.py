"""Prior-knowledge ablation, longer than the chapter's: the same pretraining (train.pretrain, same
seeds, same split) with no prior, with all seven sources, and with each source group alone, on
pbmc68k; held-out masked loss and kNN accuracy of cell types; on the simulator, regulator→target
AUROC of gene embeddings; on a simulated perturbation screen (pretrained on its control cells),
how well the perturbation head of chapter 10 predicts held-out perturbations from each arm's gene
embeddings. Prints one table per data set (mean ± sd over seeds).

    python -P bench/prior_ablation.py                     # 3 seeds × 400 steps
    python -P bench/prior_ablation.py --steps 100 --seeds 2 --quick   # no per-group arms
    python -P bench/prior_ablation.py --data perturbation # one data set

(`-P`: do not put bench/ on sys.path, where bench/tokenize.py would shadow the standard library's
`tokenize` module.)
"""
import argparse
import tempfile
import time

import numpy as np
import pandas as pd
import torch

from scfoundation.data import load_pbmc68k
from scfoundation.evaluate import embed_adata, gene_embeddings, iter_batches, knn_accuracy, stratified_split
from scfoundation.genes import Vocab, map_genes
from scfoundation.model import ModelConfig, SCFModel, mask_batch
from scfoundation.perturb import design_perturbations, perturbation_benchmark
from scfoundation.prior import GENE_SET_SOURCES, add_prior, build_prior_features, prior_sources
from scfoundation.simulate import SimConfig, simulate
from scfoundation.tokenization import RankValueTokenizer, compute_gene_medians
from scfoundation.train import TrainConfig, pretrain

ARMS = {"no prior": None, "all 7 sources": "all", "gene sets (GO/KEGG/Pfam)": GENE_SET_SOURCES,
        "co-expression": ("coexpression",), "chromosome": ("chromosome",)}
HEAD = "model: head on gene embeddings"   # perturbation_benchmark's name for the head on the model's gene embeddings


def with_vocab(adata, train):
    "The vocabulary of `adata` with medians from the `train` cells, and its rank tokenizer."
    vocab = Vocab.from_adata(adata)
    vocab = vocab.with_medians(compute_gene_medians(train, vocab))
    return vocab, RankValueTokenizer(vocab, max_length=128)


def prepared(adata, label_key="cell_type"):
    "Split, vocabulary with training medians, tokenizer and prior features from the training cells only."
    labels = adata.obs[label_key].to_numpy()
    is_test = stratified_split(labels, test_size=0.3, seed=0)
    train = adata[~is_test].copy()
    vocab, tokenizer = with_vocab(adata, train)
    return dict(adata=adata, labels=labels, train=train, test=adata[is_test].copy(), vocab=vocab,
                tokenizer=tokenizer, prior=build_prior_features(vocab, corpus=train, dim=32))


def prepared_screen():
    "The perturbation chapter's screen; pretraining cells, vocabulary medians and prior from its control cells only."
    specs = design_perturbations(n_tfs=30, n_singles=16, n_doubles=16, seed=0)
    screen = map_genes(simulate(SimConfig(n_cells=2000, n_genes=200, n_tfs=30, edge_density=0.1, n_batches=1,
                                          perturbations=tuple(specs), perturbed_fraction=0.8, seed=0)))
    controls = screen[screen.obs["perturbation"] == "control"].copy()
    vocab, tokenizer = with_vocab(screen, controls)
    return dict(screen=screen, specs=specs, train=controls, vocab=vocab, tokenizer=tokenizer,
                prior=build_prior_features(vocab, corpus=controls, dim=32))


def trained(data, sources, seed, steps):
    "The model of `seed` with the prior `sources` (None: none), pretrained by train.pretrain on the training cells."
    torch.manual_seed(seed)
    model = SCFModel(ModelConfig.named("teaching", vocab_size=len(data["vocab"]), max_len=128,
                                       vocab_version=data["vocab"].version))
    if sources is not None:
        add_prior(model, data["prior"], None if sources == "all" else sources)
    settings = TrainConfig(steps=steps, batch_size=32, lr=1e-3, seed=seed, save_every=0, device="cpu")
    with tempfile.TemporaryDirectory() as folder:     # not cached: the table's seconds are training time
        return pretrain(data["train"], model, settings, folder, tokenizer=data["tokenizer"], progress=False).eval()


@torch.no_grad()
def held_out_loss(model, data):
    "The masked-gene loss over all held-out cells, in one batch, masks drawn from seed 123."
    (_, batch), = iter_batches(data["test"], model.tokenizer, batch_size=data["test"].n_obs)
    return float(model(mask_batch(batch, model.config, seed=123))["loss"])


def edge_auroc(model, network, learned_only):
    "Mean over regulators of the AUROC that ranks its targets above the other genes by cosine similarity."
    from sklearn.metrics import roc_auc_score
    if learned_only:                                   # the learned part E alone: the prior off while it is read
        with prior_sources(model, []): vectors = gene_embeddings(model, kind="input")
    else: vectors = gene_embeddings(model, kind="input")
    vectors = vectors.astype(np.float64)
    vectors = vectors.div(np.maximum(np.linalg.norm(vectors, axis=1), 1e-12), axis=0)
    scores = []
    for regulator, targets in network.groupby("regulator")["target"]:
        others = vectors.index[vectors.index != regulator]
        is_target = others.isin(targets)
        if 0 < is_target.sum() < len(others):
            scores.append(roc_auc_score(is_target, vectors.loc[others].to_numpy() @ vectors.loc[regulator].to_numpy()))
    return float(np.mean(scores))


def cell_scores(model, data):
    embed_adata(data["adata"], model, key_added="X_arm", batch_size=256, progress=False)
    return {"held-out loss": held_out_loss(model, data),
            "kNN accuracy": knn_accuracy(data["adata"].obsm["X_arm"], data["labels"], seed=0)}


def network_scores(network):
    def score(model, data):
        return {**cell_scores(model, data), "edges AUROC (E)": edge_auroc(model, network, True),
                "edges AUROC (E+prior)": edge_auroc(model, network, False)}
    return score


def weighted(scores):
    "Mean Pearson r and top-DE MSE over all scored perturbations (each group weighted by its size)."
    return {"perturbation r": float(np.average(scores["pearson"], weights=scores["n"])),
            "perturbation MSE (top DE)": float(np.average(scores["mse_top_de"], weights=scores["n"]))}


def perturbation_scores(model, data):
    "The perturbation head on the model's gene embeddings, on the held-out perturbations (chapter 10's benchmark)."
    scores, _ = perturbation_benchmark(model, data["screen"], perturbations=data["specs"], seed=0)
    data["baselines"] = scores.drop(HEAD, level="method")      # they do not read the model: the same in every run
    return weighted(scores.xs(HEAD, level="method"))


def baselines(data):
    "The mean and additive baselines of the last benchmark, over the perturbations each predicts."
    rows = {method: {**weighted(table), "perturbations": int(table["n"].sum())}
            for method, table in data["baselines"].groupby(level="method")}
    return pd.DataFrame(rows).T.astype({"perturbations": int}).round(4)


def run(data, arms, seeds, steps, score=cell_scores):
    rows = []
    for seed in range(seeds):
        for arm in arms:
            began = time.perf_counter()
            model = trained(data, ARMS[arm], seed, steps)
            rows.append({"arm": arm, "seed": seed, **score(model, data), "seconds": time.perf_counter() - began})
    table = pd.DataFrame(rows).drop(columns="seed").groupby("arm", sort=False)
    return table.mean().round(4).astype(str) + " ± " + table.std().round(4).astype(str)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="only 'no prior' and 'all 7 sources'")
    parser.add_argument("--data", nargs="+", choices=("pbmc", "simulator", "perturbation"),
                        default=["pbmc", "simulator", "perturbation"], help="data sets to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    arms = list(ARMS)[:2] if args.quick else list(ARMS)
    print(f"torch threads {torch.get_num_threads()}, {args.steps} steps, {args.seeds} seeds (teaching config, max_len 128)")
    if "pbmc" in args.data:
        pbmc = prepared(map_genes(load_pbmc68k()))
        print("\npbmc68k (700 cells; held-out = 30% stratified):")
        print(run(pbmc, arms, args.seeds, args.steps).to_string())
    if "simulator" in args.data:
        simulated = map_genes(simulate(SimConfig(n_cells=1000, n_genes=400, n_tfs=40, seed=0)))
        network = pd.DataFrame(simulated.uns["truth"]["network"])[["regulator", "target"]]
        print("\nsimulator (1000 cells, 400 genes, random GRN over real human genes):")
        print(run(prepared(simulated), arms, args.seeds, args.steps, network_scores(network)).to_string())
    if "perturbation" in args.data:
        screen = prepared_screen()
        print(f"\nperturbation screen (2000 cells, 200 genes, 16 singles + 16 doubles; pretrained on its "
              f"{screen['train'].n_obs} control cells):")
        print(run(screen, arms, args.seeds, args.steps, perturbation_scores).to_string())
        print(baselines(screen).to_string())


if __name__ == "__main__":
    main()
