"""What makes the pretrained model better per CPU-minute? Pretrain variants of the teaching model on
pbmc68k (700 cells, no labels) and score the zero-shot embedding of every checkpoint: kNN label
accuracy (mean over three stratified splits) with `<cls>` and with mean pooling, beside PCA on HVGs.

    python bench/pretraining_study.py --list                  # the variants
    python bench/pretraining_study.py --runs base lr3e-3      # some of them (seed 0, 400 steps)
    python bench/pretraining_study.py --runs base --seeds 0 1 2 --baselines --out bench/results/pretraining_study.csv

The committed table that chapter 17 plots (bench/results/pretraining_study.csv) was made with
    python bench/pretraining_study.py --baselines --out bench/results/pretraining_study.csv
    python bench/pretraining_study.py --runs base --seeds 1 2 --out bench/results/pretraining_study.csv
    python bench/pretraining_study.py --runs --baselines --seeds 1 2 --out bench/results/pretraining_study.csv
    python bench/pretraining_study.py --runs bins continuous --seeds 1 2 --out bench/results/pretraining_study.csv
    python bench/pretraining_study.py --runs len128 len64-lr3e-4 --out bench/results/pretraining_study.csv
    python bench/pretraining_study.py --runs len64 len64-3000 len64-bins len64-continuous len64-geneset len64-geneset-cls \
        len64-bins-geneset len64-d256 len64-4layers --seeds 0 1 2 --out bench/results/pretraining_study.csv

One row per (variant, seed, checkpoint step, pooling) with the loss, the cells and FLOPs seen so far,
the wall time, and the kNN accuracy. Quality does not depend on the machine's load; the wall time does:
time on a quiet machine.
"""
import argparse, tempfile, time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from scfoundation.data import load_pbmc68k
from scfoundation.evaluate import embed_cells, get_labels, knn_accuracy, pca_baseline
from scfoundation.genes import Vocab, map_genes
from scfoundation.model import N_SPECIAL, ModelConfig, SCFModel
from scfoundation.study import STUDY_COLUMNS
from scfoundation.train import TrainConfig, pretrain

BASE_TRAIN = dict(batch_size=32, lr=1e-3, warmup_steps=30)      # the demo's settings
VARIANTS = {                                                     # name: (ModelConfig overrides, TrainConfig overrides)
    "base": ({}, {}),
    "lr3e-4": ({}, dict(lr=3e-4)),
    "lr3e-3": ({}, dict(lr=3e-3)),
    "lr1e-2": ({}, dict(lr=1e-2)),
    "mask0.3": ({}, dict(mask_prob=0.3)),
    "bins": (dict(input_kind="bins"), {}),
    "continuous": (dict(input_kind="continuous"), {}),
    "d64": (dict(d_model=64, d_ff=128), {}),
    "d256": (dict(d_model=256, d_ff=512), {}),
    "4layers": (dict(n_layers=4), {}),
    "batch64": ({}, dict(batch_size=64)),
    "len64": (dict(max_len=64), {}),                             # the 63 highest-ranked genes of each cell (the laptop config)
    "len128": (dict(max_len=128), {}),
    "len64-lr3e-4": (dict(max_len=64), dict(lr=3e-4)),
    "len64-3000": (dict(max_len=64), dict(steps=3000, save_every=250)),         # the demo's 5-minute budget, spent on short cells
    "len64-d256": (dict(max_len=64, d_model=256, d_ff=512), {}),   # width and depth at the laptop length
    "len64-4layers": (dict(max_len=64, n_layers=4), {}),
    "len64-bins": (dict(max_len=64, input_kind="bins"), {}),     # the input kinds at the laptop length
    "len64-continuous": (dict(max_len=64, input_kind="continuous"), {}),
    "len64-geneset": (dict(max_len=64), {}),                     # + a cell-level objective (GeneSetObjective) on the mean
    "len64-geneset-cls": (dict(max_len=64, pooling="cls"), {}),  # the same objective on `<cls>`: a signal of its own
    "len64-bins-geneset": (dict(max_len=64, input_kind="bins"), {}),   # does the objective rescue the binned embedding?
}
DEFAULT_RUNS = ["base", "lr3e-4", "lr3e-3", "lr1e-2", "mask0.3", "bins", "continuous", "d64"]   # the committed table
SPLIT_SEEDS = (0, 1, 2)


class GeneSetObjective(SCFModel):
    """A probe of a cell-level objective, in the spirit of scGPT's expression-from-cell-embedding loss: beside the
    masked-gene loss, the cell embedding (the config's pooling) predicts which genes the cell's tokens hold, masked
    ones included (binary cross-entropy over the vocabulary). A study variant, not yet a model option."""
    weight = 1.0

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.gene_set_head = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, batch: dict) -> dict:
        result = super().forward(batch)
        if "mask_positions" not in batch: return result
        batch = self._on_device(batch)
        hidden_ids = batch["mask_positions"] & (self.config.input_kind == "rank")   # rank hides the gene itself
        ids = torch.where(hidden_ids, batch["labels"], batch["input_ids"])
        genes = batch["attention_mask"].clone(); genes[:, 0] = False
        target = torch.zeros(len(ids), self.config.vocab_size, device=ids.device).scatter_(1, ids * genes, genes.float())
        logits = self.gene_set_head(result["cell_embedding"])
        cell_loss = F.binary_cross_entropy_with_logits(logits[:, N_SPECIAL:], target[:, N_SPECIAL:])
        return dict(result, loss=result["loss"] + self.weight * cell_loss)

MODEL_CLASSES = {name: GeneSetObjective for name in ("len64-geneset", "len64-geneset-cls", "len64-bins-geneset")}   # default: SCFModel


def zero_shot_accuracy(model: SCFModel, cells, labels) -> dict:
    "kNN accuracy (mean over SPLIT_SEEDS) of the model's embedding under each pooling."
    scores = {}
    for pooling in ("cls", "mean"):
        model.config = replace(model.config, pooling=pooling)
        embedding = embed_cells(model, cells)
        scores[pooling] = float(np.mean([knn_accuracy(embedding, labels, seed=seed) for seed in SPLIT_SEEDS]))
    return scores


def baseline_rows(cells, labels, seeds) -> list[dict]:
    "PCA on HVGs (one embedding) and scVI (one model per seed, 100 epochs as in chapter 7), scored like the model."
    from scfoundation.evaluate import scvi_baseline
    rows = []
    for seed in seeds:
        for name, embedding in (("PCA on HVGs", pca_baseline(cells.copy())), ("scVI", scvi_baseline(cells.copy(), max_epochs=100, seed=seed))):
            accuracy = float(np.mean([knn_accuracy(embedding, labels, seed=split) for split in SPLIT_SEEDS]))
            rows.append(dict(variant=name, seed=seed, pooling="", knn_accuracy=accuracy))
    return rows


def run_variant(name: str, seed: int, steps: int, eval_every: int, cells, labels) -> list[dict]:
    model_overrides, train_overrides = VARIANTS[name]
    model_config = ModelConfig.named("teaching", **model_overrides)
    model_class, vocab = MODEL_CLASSES.get(name, SCFModel), Vocab.from_adata(cells)
    torch.manual_seed(seed)
    model = model_config if model_class is SCFModel else model_class(replace(model_config, vocab_size=len(vocab)))
    train_config = TrainConfig(**{**dict(steps=steps, save_every=eval_every), **BASE_TRAIN, **train_overrides, "seed": seed, "keep_last": 0})
    folder = Path(tempfile.mkdtemp(prefix=f"study-{name}-"))
    started = time.perf_counter()
    history = pretrain(cells, model, train_config, folder, vocab=vocab, progress=False).history
    seconds = time.perf_counter() - started
    rows = []
    for step in range(train_config.save_every, train_config.steps + 1, train_config.save_every):
        model = model_class.from_pretrained(folder / f"checkpoint-{step}")
        done = history[history.step <= step]
        for pooling, accuracy in zero_shot_accuracy(model, cells, labels).items():
            rows.append(dict(variant=name, seed=seed, step=step, pooling=pooling, knn_accuracy=accuracy,
                             loss=float(done.loss.iloc[-10:].mean()), cells_seen=step * train_config.batch_size,
                             flops=float(done.flops.sum()), seconds=seconds * step / train_config.steps,
                             lr=train_config.lr, input_kind=model_config.input_kind, d_model=model_config.d_model,
                             n_layers=model_config.n_layers, mask_prob=train_config.mask_prob, max_len=model_config.max_len))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, help=f"variants to run (default: {' '.join(DEFAULT_RUNS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="pretraining seeds (default 0)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run (default 400: the demo's budget)")
    parser.add_argument("--eval-every", type=int, default=50, help="score a checkpoint every N steps (default 50)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--out", type=Path, help="append the rows to this CSV")
    parser.add_argument("--baselines", action="store_true", help="also score PCA on HVGs and scVI at each seed")
    parser.add_argument("--list", action="store_true", help="print the variants and stop")
    args = parser.parse_args()
    if args.list:
        for name, (model_overrides, train_overrides) in VARIANTS.items(): print(f"{name:<12} model {model_overrides} train {train_overrides}")
        return
    unknown = set(args.runs) - set(VARIANTS)
    if unknown: parser.error(f"unknown variants {sorted(unknown)}: see --list")
    torch.set_num_threads(args.threads)
    cells = map_genes(load_pbmc68k())
    labels = get_labels(cells, "cell_type")
    if args.baselines:
        rows = pd.DataFrame(baseline_rows(cells, labels, args.seeds))
        print(rows.groupby("variant").knn_accuracy.agg(["mean", "std"]).round(3).to_string(), flush=True)
        if args.out is not None: _append(rows, args.out)
    for name in args.runs:
        for seed in args.seeds:
            rows = pd.DataFrame(run_variant(name, seed, args.steps, args.eval_every, cells, labels))
            print(rows.pivot_table(index=["variant", "seed", "step", "loss", "seconds"], columns="pooling", values="knn_accuracy").round(3).to_string(), flush=True)
            if args.out is not None: _append(rows, args.out)


def _append(rows: pd.DataFrame, path: Path):
    "Append rows to the CSV (created with its header the first time)."
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.reindex(columns=STUDY_COLUMNS).to_csv(path, mode="a", header=not path.exists(), index=False)


if __name__ == "__main__":
    main()
