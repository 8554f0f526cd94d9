"""Cell embeddings of a Geneformer checkpoint: the peer's own path against ours, same weights, same outputs.

A Geneformer-6L-shaped checkpoint (random weights, written by transformers itself: no download; 25,424 genes,
as Geneformer-6L's dictionary, so that its vocabulary head costs what it costs there) embeds
real-length cells of the built-in pbmc68k data, in one run:
- the peer's path, as Geneformer's embedding extractor runs it: the whole `BertForMaskedLM` forward with
  `output_hidden_states=True` (vocabulary head on every token included), then the mean of the
  second-to-last layer over each cell's tokens;
- ours: `load_geneformer` into SCFModel, `model.embed` (packed tokens, no padding work, only the layers
  up to the embedding's, no vocabulary head).
and the same for a scGPT checkpoint at its whole-human shape (12 layers of width 512, 8 heads), through scGPT's own
`encode_batch` and through `load_scgpt` + `model.embed` (`--no-scgpt` skips it; it needs scgpt's code).
Both see the same batches (cells sorted by length, which favours the padded peer), and the script checks
that the embeddings agree before it prints cells/s.

    python bench/published.py                 # 256 cells, batches of 32, fp32, 2 threads
    python bench/published.py --cells 64 --repeats 2
"""
import sys
from pathlib import Path

sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from scfoundation.data import load_pbmc68k
from scfoundation.evaluate import iter_batches
from scfoundation.genes import gene_table, map_genes
from scfoundation.published import geneformer_inputs, geneformer_vocab, load_geneformer, random_geneformer, read_dictionary


GENEFORMER_GENES = 25_424   # Geneformer-6L's token dictionary: 25,426 entries with <pad> and <mask>


def median_seconds(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        began = time.perf_counter(); run(); times.append(time.perf_counter() - began)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scgpt-cells", type=int, default=128, help="cells for the scGPT half (it is 12 layers of width 512)")
    parser.add_argument("--no-scgpt", action="store_true", help="only the Geneformer half")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import BertForMaskedLM

    cells = load_pbmc68k()
    order = np.argsort(-np.diff(cells.X.tocsr().indptr)[: args.cells], kind="stable")   # longest first
    cells = map_genes(cells[order])
    root = Path(tempfile.mkdtemp())
    genes = list(load_pbmc68k().var_names)            # the cells' genes first, then the gene table's, up to Geneformer-6L's 25,424
    genes += [gene for gene in gene_table()["token"] if gene not in set(genes)][: GENEFORMER_GENES - len(genes)]
    folder = random_geneformer(root, genes, n_layers=6, d_model=256, n_heads=4, d_ff=512, max_tokens=2048)
    ours = load_geneformer(folder, verbose=False)
    peer = BertForMaskedLM.from_pretrained(folder).eval()
    tokens = read_dictionary(root / "token_dictionary_random.pkl")
    source_ids = torch.as_tensor(geneformer_vocab(tokens, read_dictionary(root / "gene_median_dictionary_random.pkl"))[1])
    batches = [batch for _, batch in iter_batches(cells, ours.tokenizer, batch_size=args.batch_size)]
    peer_batches = [geneformer_inputs(batch, source_ids, tokens) for batch in batches]   # the same cells in Geneformer's ids

    def run_peer():
        out = []
        with torch.inference_mode():
            for ids, mask in peer_batches:
                hidden = peer(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states[-2]
                out.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        return torch.cat(out)

    def run_ours():
        return torch.cat([ours.embed(batch) for batch in batches])

    difference = (run_ours() - run_peer()).abs().max().item()
    lengths = np.concatenate([batch["attention_mask"].sum(1).numpy() - 1 for batch in batches])
    peer_seconds, our_seconds = median_seconds(run_peer, args.repeats), median_seconds(run_ours, args.repeats)
    print(f"torch {torch.__version__}, {args.threads} threads; Geneformer-6L shape ({sum(p.numel() for p in peer.parameters()):,} "
          f"parameters in the peer), {args.cells} pbmc68k cells of {lengths.min()}–{lengths.max()} genes (median {int(np.median(lengths))}), "
          f"batches of {args.batch_size}, fp32")
    print(f"largest difference between the embeddings: {difference:.1e}")
    print(f"{'path':<46}{'cells/s':>9}")
    print(f"{'peer: BertForMaskedLM + hidden states (extractor)':<46}{args.cells / peer_seconds:9.1f}")
    print(f"{'ours: load_geneformer + SCFModel.embed':<46}{args.cells / our_seconds:9.1f}")
    print(f"ours / peer: {peer_seconds / our_seconds:.1f}x")
    if not args.no_scgpt: scgpt_speed(args, cells)


def scgpt_speed(args, cells):
    "scGPT's encode_batch against load_scgpt + embed, same weights, same cells (its whole-human shape)."
    import contextlib, io
    from scfoundation.published import load_scgpt, random_scgpt, scgpt_inputs, scgpt_model_class, scgpt_vocab
    import json
    n_cells = min(args.cells, args.scgpt_cells)
    cells = cells[:n_cells]
    genes = list(load_pbmc68k().var_names)
    folder = random_scgpt(Path(tempfile.mkdtemp()) / "scgpt", genes, n_layers=12, d_model=512, n_heads=8, d_ff=512, max_len=1200)
    ours = load_scgpt(folder, verbose=False)
    vocab = json.loads((folder / "vocab.json").read_text())
    peer = scgpt_model_class()(len(vocab), 512, 8, 512, 12, vocab=vocab, dropout=0.0, pad_token="<pad>", pad_value=-2,
                               input_emb_style="continuous", cell_emb_style="cls")
    peer.load_state_dict(torch.load(folder / "best_model.pt", weights_only=True)); peer.eval()
    source = torch.as_tensor(scgpt_vocab(vocab)[1])
    batches = [batch for _, batch in iter_batches(cells, ours.tokenizer, batch_size=args.batch_size)]
    peer_batches = [scgpt_inputs(batch, source, vocab) for batch in batches]   # scGPT's conventions for the same cells

    def run_peer():
        with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()):
            return torch.cat([peer.encode_batch(*batch, batch_size=len(batch[0]), time_step=0, return_np=False) for batch in peer_batches])

    def run_ours():
        return torch.cat([ours.embed(batch) for batch in batches])

    difference = (run_ours() - run_peer()).abs().max().item()
    peer_seconds, our_seconds = median_seconds(run_peer, args.repeats), median_seconds(run_ours, args.repeats)
    print(f"\nscGPT whole-human shape ({sum(p.numel() for p in peer.parameters()):,} parameters in the peer), {n_cells} cells, "
          f"batches of {args.batch_size}; largest difference between the embeddings: {difference:.1e}")
    print(f"{'peer: TransformerModel.encode_batch':<46}{n_cells / peer_seconds:9.1f}")
    print(f"{'ours: load_scgpt + SCFModel.embed':<46}{n_cells / our_seconds:9.1f}")
    print(f"ours / peer: {peer_seconds / our_seconds:.1f}x")


if __name__ == "__main__":
    main()
