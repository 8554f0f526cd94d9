"""Throughput of scfoundation's model against Hugging Face `BertForMaskedLM` (Geneformer-6L shapes).

Measures in one run, on this machine: the bf16 and fp32 matmul peak; training tokens/s (forward,
backward, AdamW step; 15% masking) and inference cells/s (cell embeddings) of both models at
full sequence length 512 and 2048, in fp32 and bf16 (autocast); and a real-length run on cells of
the default data (lengths = expressed genes per cell, batches grouped by length).

    python bench/train.py --quick          # a few repeats, length 512 only (minutes)
    python bench/train.py                  # the full table
    python bench/train.py --threads 2 --lengths 512 2048 --precisions bf16
    python bench/train.py --only-scgpt     # ours against scGPT's TransformerModel at its whole-human shape
    python bench/train.py --no-scgpt       # without the scGPT table (it runs whenever scgpt is installed)

The scGPT table needs `pip install --no-deps scgpt==0.2.4` (in the dev set-up): its model module is loaded
alone (`scfoundation.published.scgpt_model_class`), without the rest of its package, which wants torchtext
(it cannot load against torch 2.13), datasets, wandb … scGPT runs as
published: 12 layers of width 512, 8 heads, feed-forward 512, dropout 0.2, 51 value bins (category
embedding), an MSE expression decoder on every token, `encode_batch` for cell embeddings.

The peer runs at its best: SDPA attention with attention dropout 0 (the fused kernel), hidden
dropout 0.02 as Geneformer; its inference is `model.bert` (hidden states, no vocabulary head).
A second peer inference column ("as EmbExtractor") runs what Geneformer's own embedding extractor
runs: the whole `BertForMaskedLM` forward with `output_hidden_states=True`, vocabulary head on every
token included, its hidden states then pooled. "flop x" is the peer's training FLOPs over ours: the
training ratio both models would show at equal efficiency.
FLOPs are counted from the matrix products actually needed (see `scfoundation.model.count_flops`):
our head only on masked tokens, the peer's head on every token (that is what it computes).
Requires `transformers` (bench_requirements in settings.ini); the scGPT table also scgpt (above).
"""
import sys
from pathlib import Path

# bench/ holds scripts named like standard modules (bench/tokenize.py): keep this folder off the import path
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import importlib.util
import statistics
import time

import numpy as np
import torch

from scfoundation.model import ModelConfig, SCFModel, count_flops, mask_batch, random_batch, _stack_flops
from scfoundation.train import matmul_peak_flops


def attention_seconds(config: ModelConfig, batches: list[dict], precision: str, repeats: int) -> float:
    "Seconds of the fused SDPA kernel alone (forward + backward, all layers) on these batches: both models pay it."
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    head_dim = config.d_model // config.n_heads
    tensors = [torch.randn(len(batch["input_ids"]), config.n_heads, batch["input_ids"].shape[1], head_dim, dtype=dtype, requires_grad=True)
               for batch in batches]

    def run():
        for query in tensors:
            for _ in range(config.n_layers):
                torch.nn.functional.scaled_dot_product_attention(query, query, query).sum().backward()
    return timed(run, repeats)


def timed(step, repeats: int) -> float:
    "Median seconds of `step()` after one warm-up call."
    return interleaved([step], repeats)[0]


def interleaved(steps: list, repeats: int) -> list[float]:
    "Median seconds of each step, run in turn (A B A B ...) so that a change of load on a shared machine hits all alike."
    for step in steps: step()
    times = [[] for _ in steps]
    for _ in range(repeats):
        for step, record in zip(steps, times):
            start = time.perf_counter()
            step()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def ours(config: ModelConfig, batches: list[dict], precision: str) -> dict:
    "Training and inference steps of SCFModel over `batches`, and the training FLOPs."
    torch.manual_seed(0)
    model = SCFModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    masked = [mask_batch(batch, config, seed=index) for index, batch in enumerate(batches)]

    def train_all():
        for batch in masked:
            with autocast(precision):
                loss = model(batch)["loss"]
            loss.backward()
            optimizer.step(); optimizer.zero_grad(set_to_none=True)

    def infer_all():
        with autocast(precision):
            for batch in batches: model.embed(batch)

    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    cells = sum(len(batch["input_ids"]) for batch in batches)
    flops = sum(count_flops(config, batch)["total"] for batch in masked)
    return dict(train=train_all, infer=infer_all, tokens=tokens, cells=cells, flops=flops)


def peer(config: ModelConfig, batches: list[dict], precision: str) -> dict:
    "The same for transformers' BertForMaskedLM with Geneformer-6L's config and SDPA attention."
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    bert_config = BertConfig(vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layers,
                             num_attention_heads=config.n_heads, intermediate_size=config.d_ff,
                             max_position_embeddings=config.max_len, hidden_dropout_prob=config.dropout,
                             attention_probs_dropout_prob=0.0, hidden_act="relu")
    bert_config._attn_implementation = "sdpa"
    model = BertForMaskedLM(bert_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    masked = []
    for index, batch in enumerate(batches):
        hidden = mask_batch(batch, config, seed=index)
        labels = hidden["labels"].masked_fill(~hidden["mask_positions"], -100)
        masked.append(dict(input_ids=hidden["input_ids"], attention_mask=hidden["attention_mask"].long(), labels=labels))
    plain = [dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()) for batch in batches]

    def train_all():
        for batch in masked:
            with autocast(precision):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step(); optimizer.zero_grad(set_to_none=True)

    def infer_all():
        model.eval()
        with torch.inference_mode(), autocast(precision):
            for batch in plain: model.bert(**batch)
        model.train()

    def infer_as_extractor():
        model.eval()
        with torch.inference_mode(), autocast(precision):
            for batch in plain: model(**batch, output_hidden_states=True).hidden_states[-1]
        model.train()

    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    cells = sum(len(batch["input_ids"]) for batch in batches)
    d_model, vocab = config.d_model, config.vocab_size
    flops = 0.0
    for batch in batches:   # the peer computes on padding too, and its head on every token
        padded = torch.full((len(batch["input_ids"]),), batch["input_ids"].shape[1])
        flops += 3 * (_stack_flops(padded, config.n_layers, d_model, config.d_ff) + padded.sum().item() * (2 * d_model * d_model + 2 * d_model * vocab))
    return dict(train=train_all, infer=infer_all, infer_extractor=infer_as_extractor, tokens=tokens, cells=cells, flops=flops)


SCGPT_SHAPE = dict(vocab_size=60_697, input_kind="bins", n_bins=51, d_model=512, n_layers=12, n_heads=8, d_ff=512,
                   max_len=1200, dropout=0.2)   # scGPT's whole-human model (args.json of its release)


def scgpt_peer(config: ModelConfig, batches: list[dict], precision: str) -> dict:
    "scGPT's own TransformerModel at its whole-human shape: binned values (category embedding), MSE on masked genes, `encode_batch`."
    from scfoundation.published import scgpt_model_class
    TransformerModel = scgpt_model_class()
    torch.manual_seed(0)
    mask_bin, pad_bin = config.n_bins + 1, config.n_bins + 2          # its value embedding: bins 0..n_bins, then mask and padding
    model = TransformerModel(config.vocab_size, config.d_model, config.n_heads, config.d_ff, config.n_layers, vocab={"<pad>": 0},
                             dropout=config.dropout, pad_token="<pad>", pad_value=pad_bin, input_emb_style="category",
                             n_input_bins=config.n_bins + 3, cell_emb_style="cls").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    steps, plain = [], []
    for index, batch in enumerate(batches):
        hidden = mask_batch(batch, config, seed=index)
        padding = ~batch["attention_mask"]
        values = batch["value_ids"].masked_fill(padding, pad_bin)
        steps.append((batch["input_ids"], values.masked_fill(hidden["mask_positions"], mask_bin), padding, hidden["mask_positions"], values.float()))
        plain.append((batch["input_ids"], values, padding))

    def train_all():
        for genes, values, padding, masked, target in steps:
            with autocast(precision):
                prediction = model(genes, values, padding)["mlm_output"]
            torch.nn.functional.mse_loss(prediction.float()[masked], target[masked]).backward()
            optimizer.step(); optimizer.zero_grad(set_to_none=True)

    def infer_all():
        model.eval()
        with torch.inference_mode(), autocast(precision):
            for genes, values, padding in plain: model.encode_batch(genes, values, padding, batch_size=len(genes), time_step=0)
        model.train()

    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    cells = sum(len(batch["input_ids"]) for batch in batches)
    flops = 0.0
    for batch in batches:   # the peer computes on padding too, and its expression decoder (d -> d -> 1) on every token
        padded = torch.full((len(batch["input_ids"]),), batch["input_ids"].shape[1])
        flops += 3 * (_stack_flops(padded, config.n_layers, config.d_model, config.d_ff) + padded.sum().item() * 2 * (config.d_model ** 2 + config.d_model))
    return dict(train=train_all, infer=infer_all, tokens=tokens, cells=cells, flops=flops)


def scgpt_table(args, peaks: dict):
    "Ours against scGPT's TransformerModel at scGPT's whole-human shape: full length (1,200 tokens, 4 cells) and real lengths."
    config = ModelConfig(**SCGPT_SHAPE)
    print(f"\nscGPT whole-human shape ({SCFModel(config).num_parameters():,} parameters in ours), binned inputs, {args.repeats} repeats")
    header = f"{'run':<14}{'prec':<6}{'ours tok/s':>11}{'scGPT tok/s':>12}{'x':>6}{'flop x':>7}{'ours cell/s':>12}{'scGPT cell/s':>13}{'x':>6}{'% peak':>8}"
    print(header); print("-" * len(header))
    runs = [("full L=1200", lambda: [random_batch(config, [config.max_len - 1] * 4, seed=0)])]
    if not args.no_real: runs.append(("real lengths", lambda: real_length_batches(config, 4 * config.max_len, 16 if args.quick else 32)))
    precisions = [precision for precision in args.precisions if precision == "fp32"]
    if len(precisions) < len(args.precisions):   # torch's TransformerEncoderLayer inference fast path refuses bf16 autocast
        print("(bf16 not measured for scGPT: its nn.TransformerEncoder inference path fails under bf16 autocast)")
    for name, make in runs:
        batches = make()
        for precision in precisions:
            mine, other = measure([ours(config, batches, precision), scgpt_peer(config, batches, precision)], args.repeats)
            print(f"{name:<14}{precision:<6}{mine['train_tokens']:11.0f}{other['train_tokens']:12.0f}{mine['train_tokens'] / other['train_tokens']:6.1f}"
                  f"{other['flops'] / mine['flops']:7.1f}{mine['infer_cells']:12.1f}{other['infer_cells']:13.1f}"
                  f"{mine['infer_cells'] / other['infer_cells']:6.1f}{100 * mine['train_gflops'] / peaks[precision]:7.1f}%", flush=True)


def measure(models: list[dict], repeats: int) -> list[dict]:
    "Training tokens/s, inference cells/s and training GFLOP/s of each model, their repeats interleaved."
    train_seconds = interleaved([model["train"] for model in models], repeats)
    extra = [model["infer_extractor"] for model in models if "infer_extractor" in model]
    infer_seconds = interleaved([model["infer"] for model in models] + extra, repeats)
    results = [dict(train_tokens=model["tokens"] / train, infer_cells=model["cells"] / infer,
                    train_gflops=model["flops"] / train / 1e9, train_seconds=train, flops=model["flops"])
               for model, train, infer in zip(models, train_seconds, infer_seconds)]
    if extra: results[-1]["extractor_cells"] = models[-1]["cells"] / infer_seconds[-1]
    return results


def full_length_batches(config: ModelConfig, length: int, tokens_per_batch: int, n_batches: int) -> list[dict]:
    "Batches of cells that fill `length` tokens (`<cls>` + length - 1 genes)."
    cells = max(1, tokens_per_batch // length)
    return [random_batch(config, [length - 1] * cells, seed=index) for index in range(n_batches)]


def real_length_batches(config: ModelConfig, tokens_per_batch: int, n_cells: int) -> list[dict]:
    "Cells of the default data (expressed genes per cell), sorted by length and cut into batches."
    from scfoundation.data import load_pbmc68k
    adata = load_pbmc68k()
    expressed = np.diff(adata.X.tocsr().indptr) if hasattr(adata.X, "tocsr") else (np.asarray(adata.X) > 0).sum(1)
    lengths = np.sort(np.minimum(expressed[:n_cells], config.max_len - 1))[::-1]
    batches, start = [], 0
    while start < len(lengths):
        cells = max(1, tokens_per_batch // (int(lengths[start]) + 1))
        batches.append(random_batch(config, [int(n) for n in lengths[start:start + cells]], seed=start))
        start += cells
    return batches


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="length 512 only, 2 repeats, half-size batches, 64 real cells")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--tokens-per-batch", type=int, default=8192, help="16 cells of 512, 4 of 2048")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--no-real", action="store_true")
    parser.add_argument("--no-scgpt", action="store_true", help="skip the scGPT table (ours against scGPT's TransformerModel at its whole-human shape)")
    parser.add_argument("--only-scgpt", action="store_true", help="only the scGPT table")
    args = parser.parse_args()
    if args.quick: args.lengths, args.repeats, args.tokens_per_batch = [512], 2, args.tokens_per_batch // 2
    torch.set_num_threads(args.threads)
    config = ModelConfig.named("geneformer-6l")
    sizes = (1024, 2048) if args.quick else (1024, 2048, 3072)
    peaks = {precision: matmul_peak_flops("cpu", precision, sizes=sizes, repeats=5) / 1e9 for precision in ("bf16", "fp32")}  # GFLOP/s
    print(f"torch {torch.__version__}, {args.threads} threads; matmul peak: bf16 {peaks['bf16']:.0f} GFLOP/s, fp32 {peaks['fp32']:.0f} GFLOP/s")
    print(f"model: geneformer-6l ({SCFModel(config).num_parameters():,} parameters), 15% masking, fused AdamW, {args.repeats} repeats\n")
    header = (f"{'run':<14}{'prec':<6}{'ours tok/s':>11}{'peer tok/s':>11}{'x':>6}{'flop x':>7}{'ours cell/s':>12}{'peer cell/s':>12}{'x':>6}"
              f"{'as EmbExtractor':>16}{'x':>6}{'ours GF/s':>10}{'% peak':>8}{'attn %':>8}{'max x':>7}")
    if args.only_scgpt: return scgpt_table(args, peaks)
    print(header); print("-" * len(header))
    runs = [(f"full L={length}", lambda length=length: full_length_batches(config, length, args.tokens_per_batch, 1)) for length in args.lengths]
    if not args.no_real: runs.append(("real lengths", lambda: real_length_batches(config, args.tokens_per_batch, 64 if args.quick else 256)))
    for name, make in runs:
        batches = make()
        for precision in args.precisions:
            models = [ours(config, batches, precision)] + ([] if args.no_peer else [peer(config, batches, precision)])
            mine, other = (measure(models, args.repeats) + [None])[:2]
            attention = attention_seconds(config, batches, precision, args.repeats)
            ratio = lambda key: f"{mine[key] / other[key]:6.1f}" if other else "-".rjust(6)
            value = lambda key, width, digits: f"{other[key]:{width}.{digits}f}" if other else "-".rjust(width)
            ceiling = f"{other['train_seconds'] / attention:7.1f}" if other else "-".rjust(7)
            flop_ratio = f"{other['flops'] / mine['flops']:7.1f}" if other else "-".rjust(7)
            extractor = f"{other['extractor_cells']:16.1f}{mine['infer_cells'] / other['extractor_cells']:6.1f}" if other else "-".rjust(22)
            print(f"{name:<14}{precision:<6}{mine['train_tokens']:11.0f}{value('train_tokens', 11, 0)}{ratio('train_tokens')}{flop_ratio}"
                  f"{mine['infer_cells']:12.1f}{value('infer_cells', 12, 1)}{ratio('infer_cells')}{extractor}"
                  f"{mine['train_gflops']:10.0f}{100 * mine['train_gflops'] / peaks[precision]:7.1f}%"
                  f"{100 * attention / mine['train_seconds']:7.0f}%{ceiling}", flush=True)
    print("\nx: ours / peer, same precision, same batches. flop x: the peer's training FLOPs / ours (x at equal efficiency).")
    print("as EmbExtractor: the peer's inference the way Geneformer's embedding extractor runs it (BertForMaskedLM forward,")
    print("vocabulary head on every token), and our inference over it. % peak: our training GFLOP/s (useful matrix-product FLOPs,")
    print("scfoundation.model.count_flops) over this machine's matmul peak in that precision. attn %: share of our training")
    print("step spent in the fused SDPA kernel (forward + backward), which both models call; max x: the training ratio a model")
    print("doing nothing but that attention would reach against the peer (an upper bound on x at this length).")
    if args.no_scgpt: return
    if importlib.util.find_spec("scgpt") is None: print("\n(scGPT table skipped: pip install --no-deps scgpt==0.2.4)")
    else: scgpt_table(args, peaks)


if __name__ == "__main__":
    main()
