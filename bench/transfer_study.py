"""Transfer: does pretraining on a large corpus help on data the model never saw? Simulate an atlas
(chapter 4: many cell types on a three-level lineage, ten batches standing in for donors), keep two
batches out, write the other eight as a corpus (chapter 14) and pretrain the teaching model on it,
streamed. Then score cells of the two held-out batches, beside baselines fitted on the held-out cells
alone (PCA on HVGs, scVI) and on the atlas (PCA and scVI fitted on the atlas, the held-out cells
projected), and beside the same model pretrained on the held-out cells only (chapter 17's setting).

    python bench/transfer_study.py --help
    python bench/transfer_study.py --cells 4000 --steps 40 --eval-every 20 --seeds 0   # a quick look (~2 min)

The committed table that chapter 17 plots (bench/results/transfer_study.csv) was made with
    python bench/transfer_study.py --seeds 0 1 2 --out bench/results/transfer_study.csv

One row per (method, seed, checkpoint step) with the kNN accuracy of the cell type on the held-out
cells (mean over three stratified splits), and the macro-F1 of logistic regression on the embedding
with 1 and 5 labelled cells per type (the rest of the held-out cells as test cells). The model's rows
also carry the loss, the cells seen and the wall time (time on a quiet machine).
"""
import argparse, tempfile, time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from scfoundation.annotate import annotation_table, logistic_baseline, split_cells, train_test_labels
from scfoundation.corpus import build_corpus, corpus_vocab
from scfoundation.evaluate import (embed_cells, get_labels, highly_variable_genes, knn_accuracy, log_normalise,
                                   pca_baseline, scvi_baseline)
from scfoundation.genes import map_genes
from scfoundation.model import ModelConfig, SCFModel
from scfoundation.simulate import SimConfig, simulate_to_h5ad
from scfoundation.study import TRANSFER_COLUMNS, few_shot_mask, logistic_on_embedding
from scfoundation.train import TrainConfig, pretrain

TRAIN = dict(batch_size=32, lr=3e-4, warmup_steps=12)     # the chapters' settings (on the simulator lr 1e-3 collapses the embedding)
SPLIT_SEEDS = (0, 1, 2)
FEW_SHOT = (1, 5)


def make_atlas(workdir: Path, n_cells: int, n_types: int, n_batches: int, n_held_out: int, n_eval: int):
    "Simulate the atlas; write the training batches as a corpus; return (corpus folder, held-out cells, training cells)."
    config = SimConfig(n_cells=n_cells, n_genes=500, n_cell_types=n_types, lineage_depth=3, n_batches=n_batches,
                       library_log_mean=7.0, seed=0)   # about 1,100 counts and 230 genes per cell
    atlas = ad.read_h5ad(simulate_to_h5ad(config, workdir / "atlas.h5ad"))
    held_out = atlas.obs["batch"].cat.codes.to_numpy() >= n_batches - n_held_out
    train_file = workdir / "atlas_train.h5ad"
    atlas[~held_out].copy().write_h5ad(train_file)
    build_corpus([train_file], workdir / "corpus", corpus_vocab([train_file]), shard_size=8192, progress=False)
    chosen = np.random.default_rng(0).choice(np.flatnonzero(held_out), min(n_eval, held_out.sum()), replace=False)
    return workdir / "corpus", map_genes(atlas[np.sort(chosen)].copy()), atlas[~held_out].copy()


def few_shot_f1(cells: ad.AnnData, embedding: np.ndarray | None, n_per_type: int, seed: int) -> float:
    "Macro-F1 on the test cells of LR on the embedding (None: LR on HVGs) from n_per_type labelled cells per type."
    cells = cells.copy()
    split_cells(cells, "cell_type", seed=seed)
    labels, is_test = train_test_labels(cells, "cell_type")
    subset = cells[few_shot_mask(labels, is_test, n_per_type, seed) | is_test].copy()
    if embedding is None: logistic_baseline(subset, "cell_type", seed=seed, key_added="method")
    else:
        subset.obsm["features"] = embedding[few_shot_mask(labels, is_test, n_per_type, seed) | is_test]
        logistic_on_embedding(subset, "features", "cell_type", seed=seed, key_added="method")
    return float(annotation_table(subset, ["method"], "cell_type").loc["method", "macro_F1"])


def score(method: str, seed: int, cells: ad.AnnData, embedding: np.ndarray | None, **extra) -> dict:
    "One table row: kNN accuracy of the embedding (none for LR on HVGs) and few-shot macro-F1."
    labels = get_labels(cells, "cell_type")
    accuracy = np.nan if embedding is None else float(np.mean([knn_accuracy(embedding, labels, seed=s) for s in SPLIT_SEEDS]))
    row = dict(method=method, seed=seed, knn_accuracy=accuracy, **extra)
    row.update({f"few_shot_{n}_f1": few_shot_f1(cells, embedding, n, seed) for n in FEW_SHOT})
    print({key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()}, flush=True)
    return row


def atlas_pca(atlas: ad.AnnData, cells: ad.AnnData, n_hvg: int = 500, n_comps: int = 50, seed: int = 0) -> np.ndarray:
    "pca_baseline's recipe fitted on the atlas (HVGs, scaling and components), applied to the held-out cells."
    from sklearn.decomposition import PCA
    genes = highly_variable_genes(atlas, n_hvg)
    names = atlas.var_names[genes]
    reference = log_normalise(atlas)[:, genes].toarray()
    mean, sd = reference.mean(axis=0), np.maximum(reference.std(axis=0), 1e-8)
    pca = PCA(n_comps, svd_solver="randomized", random_state=seed).fit(np.clip((reference - mean) / sd, -10, 10))
    query = log_normalise(cells)[:, _columns_of(cells, names)].toarray()
    return pca.transform(np.clip((query - mean) / sd, -10, 10)).astype(np.float32)


def _columns_of(cells: ad.AnnData, symbols) -> np.ndarray:
    "Column of each atlas gene symbol in the mapped held-out cells (map_genes keeps the symbol in var['input_id'])."
    columns = pd.Index(cells.var["input_id"].astype(str)).get_indexer(symbols)
    if (columns < 0).any(): raise ValueError(f"{(columns < 0).sum()} atlas genes are missing from the held-out cells")
    return columns


def atlas_scvi(atlas: ad.AnnData, cells: ad.AnnData, max_epochs: int, seed: int) -> np.ndarray:
    "scVI (scvi-tools defaults, one batch) trained on the atlas; the held-out cells' latent mean."
    import scipy.sparse as sp
    import scvi
    from scfoundation.evaluate import _quiet_lightning
    reference = ad.AnnData(sp.csr_matrix(atlas.X, dtype=np.float32), var=pd.DataFrame(index=atlas.var_names.copy()))
    query = ad.AnnData(sp.csr_matrix(cells.X, dtype=np.float32)[:, _columns_of(cells, atlas.var_names)],
                       var=pd.DataFrame(index=atlas.var_names.copy()))
    with _quiet_lightning():
        scvi.settings.seed = seed
        scvi.model.SCVI.setup_anndata(reference)
        model = scvi.model.SCVI(reference)
        model.train(max_epochs=max_epochs, enable_progress_bar=False)
        return model.get_latent_representation(query).astype(np.float32)


def model_rows(method: str, seed: int, data, cells: ad.AnnData, steps: int, eval_every: int) -> list[dict]:
    "Pretrain the teaching model on `data` (a corpus folder or AnnData); score every checkpoint on the held-out cells."
    train_config = TrainConfig(steps=steps, seed=seed, save_every=eval_every, keep_last=0, **TRAIN)
    folder = Path(tempfile.mkdtemp(prefix=f"transfer-{method}-"))
    started = time.perf_counter()
    history = pretrain(data, ModelConfig.named("laptop"), train_config, folder, progress=False).history
    seconds = time.perf_counter() - started
    rows = []
    for step in range(eval_every, steps + 1, eval_every):
        model = SCFModel.from_pretrained(folder / f"checkpoint-{step}")
        done = history[history.step <= step]
        rows.append(score(method, seed, cells, embed_cells(model, cells), step=step, loss=float(done.loss.iloc[-10:].mean()),
                          cells_seen=step * train_config.batch_size, seconds=seconds * step / steps))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=40_000, help="cells in the atlas (default 40,000)")
    parser.add_argument("--types", type=int, default=20, help="cell types (default 20)")
    parser.add_argument("--batches", type=int, default=10, help="batches (donors) in the atlas (default 10)")
    parser.add_argument("--held-out", type=int, default=2, help="batches kept out of pretraining (default 2)")
    parser.add_argument("--eval-cells", type=int, default=1500, help="held-out cells scored (default 1,500)")
    parser.add_argument("--steps", type=int, default=2000, help="pretraining steps on the atlas (default 2,000)")
    parser.add_argument("--in-sample-steps", type=int, default=500, help="steps of the model pretrained on the held-out cells (default 500)")
    parser.add_argument("--eval-every", type=int, default=250, help="score a checkpoint every N steps (default 250)")
    parser.add_argument("--scvi-epochs", type=int, default=100, help="scVI epochs on the held-out cells (default 100, as chapter 7)")
    parser.add_argument("--atlas-scvi-epochs", type=int, default=20, help="scVI epochs on the atlas (default 20)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="pretraining, scVI and split seeds (default 0)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--out", type=Path, help="append the rows to this CSV")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="transfer-"))
    started = time.perf_counter()
    corpus, cells, atlas = make_atlas(workdir, args.cells, args.types, args.batches, args.held_out, args.eval_cells)
    print(f"atlas: {atlas.n_obs} training cells in {args.batches - args.held_out} batches, {cells.n_obs} held-out cells "
          f"scored, {cells.obs.cell_type.nunique()} types ({time.perf_counter() - started:.0f} s)", flush=True)
    for seed in args.seeds:
        rows = [score("LR on HVGs", seed, cells, None),
                score("PCA on HVGs", seed, cells, pca_baseline(cells.copy(), seed=seed)),
                score("scVI", seed, cells, scvi_baseline(cells.copy(), max_epochs=args.scvi_epochs, seed=seed)),
                score("PCA (atlas)", seed, cells, atlas_pca(atlas, cells, seed=seed)),
                score("scVI (atlas)", seed, cells, atlas_scvi(atlas, cells, args.atlas_scvi_epochs, seed))]
        rows += model_rows("model (held-out cells)", seed, cells, cells, args.in_sample_steps, args.eval_every)
        rows += model_rows("model (atlas)", seed, corpus, cells, args.steps, args.eval_every)
        if args.out is not None: _append(pd.DataFrame(rows), args.out)


def _append(rows: pd.DataFrame, path: Path):
    "Append rows to the CSV (created with its header the first time)."
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.reindex(columns=TRANSFER_COLUMNS).to_csv(path, mode="a", header=not path.exists(), index=False)


if __name__ == "__main__":
    main()
