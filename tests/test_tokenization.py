"""The tokenization chapter's API: each vectorised tokenizer against a plain per-cell reference
(generated and real data, ties included), Dataset/collate, streaming, medians and bad input."""
import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scfoundation.data import DataError, load_pbmc68k
from scfoundation.data import log_normalise_values as log_normalise
from scfoundation.genes import CLS_ID, PAD_ID, Vocab
from scfoundation.tokenization import (MIN_COUNTS_IN_VOCAB, TOKENIZERS, BinningTokenizer, CellDataset, ContinuousTokenizer,
                                       RankValueTokenizer, check_vocab_overlap, collate, column_token_ids, compute_gene_medians, count_bins, hash_uint32,
                                       iter_tokenized, quantile_bins, segment_sort, tokenizer_for, tokenizer_from_dict)


# ---------------------------------------------------------------- per-cell references (one sort per cell)
def cell_entries(row, token_ids):
    "Expressed vocabulary genes of one dense row, by token id, with their counts and the cell's total."
    keep = (row > 0) & (token_ids >= 0)
    order = np.argsort(token_ids[keep])
    return token_ids[keep][order], row[keep][order], row.astype(np.float64).sum()


def reference_rank_value(row, token_ids, medians, max_length):
    tokens, counts, _ = cell_entries(row, token_ids)
    has_median = np.isfinite(medians[tokens]) & (medians[tokens] > 0)
    tokens, counts = tokens[has_median], counts[has_median]
    ratio = counts.astype(np.float32) / medians[tokens].astype(np.float32)  # float32, as Geneformer
    order = np.lexsort((tokens, -ratio))  # descending ratio, ties by token id
    return {"input_ids": np.concatenate([[CLS_ID], tokens[order][:max_length - 1]])}


def sampled(tokens, max_length, cell_id, seed):
    "Indices (ascending) of the max_length - 1 tokens with the smallest hash draws."
    if len(tokens) <= max_length - 1: return np.arange(len(tokens))
    return np.sort(np.argsort(hash_uint32(seed, np.full(len(tokens), cell_id), tokens), kind="stable")[:max_length - 1])


def reference_zeros(tokens, panel, n_zeros, cell_id, seed):
    zeros = np.setdiff1d(panel, tokens)
    if n_zeros >= len(zeros): return zeros
    return np.sort(zeros[np.argsort(hash_uint32(seed, np.full(len(zeros), cell_id), zeros), kind="stable")[:n_zeros]])


def reference_binning(row, token_ids, n_bins, max_length, cell_id, seed, include_zeros=False):
    tokens, counts, total = cell_entries(row, token_ids)
    values = log_normalise(counts.astype(np.float64), total)
    value_ids = np.digitize(values, np.quantile(values, np.linspace(0, 1, n_bins - 1))) + 1
    chosen = sampled(tokens, max_length, cell_id, seed)
    kept, value_ids = tokens[chosen], value_ids[chosen]
    if include_zeros:
        panel = np.unique(token_ids[token_ids >= 0])
        zeros = reference_zeros(tokens, panel, max_length - 1 - len(kept), cell_id, seed)
        kept, value_ids = np.concatenate([kept, zeros]), np.concatenate([value_ids, np.ones(len(zeros), int)])
    return {"input_ids": np.concatenate([[CLS_ID], kept]), "value_ids": np.concatenate([[0], value_ids])}


def reference_continuous(row, token_ids, max_length, cell_id, seed, include_zeros=True, target_depth=None):
    tokens, counts, total = cell_entries(row, token_ids)
    values = log_normalise(counts.astype(np.float64), total).astype(np.float32)
    chosen = sampled(tokens, max_length, cell_id, seed)
    kept, values = tokens[chosen], values[chosen]
    zeros = np.zeros(0, np.int64)
    if include_zeros:
        zeros = reference_zeros(tokens, np.unique(token_ids[token_ids >= 0]), max_length - 1 - len(kept), cell_id, seed)
    return {"input_ids": np.concatenate([[CLS_ID], kept, zeros]),
            "values": np.concatenate([[0], values, np.zeros(len(zeros))]).astype(np.float32),
            "expressed": np.concatenate([[False], np.ones(len(kept), bool), np.zeros(len(zeros), bool)]),
            "depth": np.log10([total, total if target_depth is None else target_depth]).astype(np.float32)}


def assert_same(cells, references):
    assert len(cells) == len(references)
    for index, reference in enumerate(references):
        got = cells.cell(index)
        assert got.pop("cell_id") == index                                 # the default cell ids: 0 … n - 1
        assert set(got) == set(reference), (got.keys(), reference.keys())
        for key in reference: np.testing.assert_array_equal(got[key], reference[key], err_msg=f"cell {index}, {key}")


# ---------------------------------------------------------------- data
def generated(n_cells=120, n_genes=300, seed=0, n_unknown=5):
    "Counts with heavy ties (small counts), a few genes outside the vocabulary, shuffled token order."
    rng = np.random.default_rng(seed)
    density = rng.uniform(0.05, 0.6, size=(n_cells, 1))
    counts = rng.geometric(0.5, size=(n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < density)
    counts[:, 0] += 1  # no empty cell
    genes = [f"G{i}" for i in range(n_genes)]
    vocab = Vocab.from_genes([genes[i] for i in rng.permutation(n_genes - n_unknown)])
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
                       var=pd.DataFrame(index=genes))
    return adata, vocab


def tied_medians(vocab, seed=0):
    "Medians from a set of 4 values: many ties in counts / median."
    medians = np.random.default_rng(seed).choice([0.5, 1.0, 2.0, 3.0], len(vocab)).astype(np.float32)
    medians[:3] = np.nan
    return vocab.with_medians(medians)


@pytest.fixture(scope="module")
def pbmc():
    adata = load_pbmc68k()
    vocab = Vocab.from_genes(adata.var_names)
    return adata, vocab.with_medians(compute_gene_medians(adata, vocab))


# ---------------------------------------------------------------- correctness against the references
@pytest.mark.parametrize("max_length", [2, 10, 400])
def test_rank_value_matches_reference_with_ties(max_length):
    adata, vocab = generated()
    vocab = tied_medians(vocab)
    token_ids = column_token_ids(vocab, adata.var_names)
    cells = RankValueTokenizer(vocab, max_length).tokenize_adata(adata)
    dense = adata.X.toarray()
    assert_same(cells, [reference_rank_value(row, token_ids, vocab.medians, max_length) for row in dense])


@pytest.mark.parametrize("n_bins,max_length,include_zeros", [(51, 1200, False), (5, 20, False), (11, 30, True),
                                                             (3, 500, True)])
@pytest.mark.parametrize("path", ["count histogram", "sort"])
def test_binning_matches_reference(n_bins, max_length, include_zeros, path):
    adata, vocab = generated(seed=1)
    token_ids = column_token_ids(vocab, adata.var_names)
    tokenizer = BinningTokenizer(vocab, max_length, n_bins, include_zeros=include_zeros)
    if path == "sort": tokenizer.histogram_max_count = 0
    cells = tokenizer.tokenize_adata(adata, seed=5)
    references = [reference_binning(row, token_ids, n_bins, max_length, i, 5, include_zeros)
                  for i, row in enumerate(adata.X.toarray())]
    assert_same(cells, references)


@pytest.mark.parametrize("max_length,include_zeros,target_depth", [(2048, True, None), (40, True, 1e5), (25, False, None)])
def test_continuous_matches_reference(max_length, include_zeros, target_depth):
    adata, vocab = generated(seed=2)
    token_ids = column_token_ids(vocab, adata.var_names)
    tokenizer = ContinuousTokenizer(vocab, max_length, include_zeros=include_zeros, target_depth=target_depth)
    cells = tokenizer.tokenize_adata(adata, seed=9)
    references = [reference_continuous(row, token_ids, max_length, i, 9, include_zeros, target_depth)
                  for i, row in enumerate(adata.X.toarray())]
    assert_same(cells, references)


def test_all_schemes_match_reference_on_pbmc(pbmc):
    adata, vocab = pbmc
    token_ids, dense = column_token_ids(vocab, adata.var_names), adata.X.toarray()
    assert_same(RankValueTokenizer(vocab, 64).tokenize_adata(adata),
                [reference_rank_value(row, token_ids, vocab.medians, 64) for row in dense])
    assert_same(BinningTokenizer(vocab, 100, include_zeros=True).tokenize_adata(adata, seed=1),
                [reference_binning(row, token_ids, 51, 100, i, 1, True) for i, row in enumerate(dense)])
    assert_same(ContinuousTokenizer(vocab, 300).tokenize_adata(adata, seed=1),
                [reference_continuous(row, token_ids, 300, i, 1) for i, row in enumerate(dense)])


def test_quantile_bins_equal_numpy_on_random_rows():
    rng = np.random.default_rng(3)
    for _ in range(200):
        lengths = rng.integers(1, 80, rng.integers(1, 6))
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        values = np.log1p(rng.integers(1, 5, indptr[-1]) / rng.integers(3, 900) * 1e4)
        rows = np.repeat(np.arange(len(lengths)), lengths)
        values = values[np.lexsort((values, rows))]
        n_bins = int(rng.integers(3, 80))
        expected = np.concatenate([np.digitize(values[a:b], np.quantile(values[a:b], np.linspace(0, 1, n_bins - 1)))
                                   for a, b in zip(indptr[:-1], indptr[1:])])
        np.testing.assert_array_equal(quantile_bins(indptr, values, n_bins), expected)


def test_count_bins_equal_numpy_on_random_rows():
    rng = np.random.default_rng(5)
    for _ in range(200):
        lengths = rng.integers(1, 80, rng.integers(1, 6))
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        counts = rng.geometric(rng.uniform(0.05, 0.9), indptr[-1]).astype(np.float32)
        totals = np.add.reduceat(counts.astype(np.float64), indptr[:-1]) + rng.integers(0, 50, len(lengths))
        values = log_normalise(counts, np.repeat(totals, lengths))
        n_bins = int(rng.integers(3, 80))
        expected = np.concatenate([np.digitize(values[a:b], np.quantile(values[a:b], np.linspace(0, 1, n_bins - 1)))
                                   for a, b in zip(indptr[:-1], indptr[1:])])
        np.testing.assert_array_equal(count_bins(indptr, counts, totals, n_bins), expected)


def test_segment_sort_orders_by_key_then_payload_per_row():
    rng = np.random.default_rng(4)
    lengths = rng.integers(0, 40, 30)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    high = rng.integers(0, 5, indptr[-1]).astype(np.uint32)
    low = rng.integers(0, 2**32, indptr[-1], dtype=np.uint64).astype(np.uint32)
    rows = np.repeat(np.arange(30), lengths)
    expected = low[np.lexsort((low, high, rows))]
    for block_rows in (1, 7, 256):
        np.testing.assert_array_equal(segment_sort(indptr, high, low, block_rows), expected)


# ---------------------------------------------------------------- determinism
def test_same_seed_same_tokens_other_seed_other_sample():
    adata, vocab = generated(seed=3)
    tokenizer = ContinuousTokenizer(vocab, 12, include_zeros=False)
    first, again = tokenizer.tokenize_adata(adata, seed=1), tokenizer.tokenize_adata(adata, seed=1)
    np.testing.assert_array_equal(first.input_ids, again.input_ids)
    assert not np.array_equal(first.input_ids, tokenizer.tokenize_adata(adata, seed=2).input_ids)


def test_block_size_does_not_change_tokens():
    adata, vocab = generated(seed=9)
    for tokenizer in (RankValueTokenizer(tied_medians(vocab), 30), BinningTokenizer(vocab, 25, include_zeros=True),
                      ContinuousTokenizer(vocab, 40)):
        whole = tokenizer.tokenize(adata.X, column_token_ids(vocab, adata.var_names), seed=2)
        blocks = tokenizer.tokenize(adata.X, column_token_ids(vocab, adata.var_names), seed=2, block_cells=7)
        for key in ("offsets", "input_ids", "value_ids", "values", "expressed", "depth"):
            np.testing.assert_array_equal(getattr(blocks, key), getattr(whole, key), err_msg=key)


def test_medians_saved_with_the_vocabulary(tmp_path):
    adata, vocab = generated(seed=10)
    vocab = vocab.with_medians(compute_gene_medians(adata, vocab))
    loaded = Vocab.load(vocab.save(tmp_path / "vocab.json"))
    np.testing.assert_array_equal(loaded.medians, vocab.medians)
    np.testing.assert_array_equal(RankValueTokenizer(loaded, 50).tokenize_adata(adata).input_ids,
                                  RankValueTokenizer(vocab, 50).tokenize_adata(adata).input_ids)


def test_streaming_independent_of_chunks_and_threads(tmp_path):
    adata, vocab = generated(seed=4)
    path = tmp_path / "corpus.h5ad"
    adata.write_h5ad(path)
    tokenizer = BinningTokenizer(vocab, 15, include_zeros=True)
    whole = tokenizer.tokenize_adata(adata, seed=3)
    for chunk_size, n_workers, processes in [(7, 1, False), (16, 2, False), (1000, 2, False), (33, 2, True)]:
        parts = list(iter_tokenized(path, tokenizer, chunk_size=chunk_size, n_workers=n_workers, seed=3, processes=processes))
        assert [first for first, _ in parts] == list(range(0, adata.n_obs, chunk_size))
        np.testing.assert_array_equal(np.concatenate([cells.input_ids for _, cells in parts]), whole.input_ids)
        np.testing.assert_array_equal(np.concatenate([cells.value_ids for _, cells in parts]), whole.value_ids)


# ---------------------------------------------------------------- Dataset and collate
def test_collate_contract_and_batch_padding():
    adata, vocab = generated(seed=5)
    dataset = CellDataset(adata, ContinuousTokenizer(vocab, 64), seed=0)
    batch = collate(dataset.__getitems__([3, 0, 7]))
    lengths = [len(dataset[i]["input_ids"]) for i in (3, 0, 7)]
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].dtype == torch.bool and batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][:, 0] == CLS_ID).all()
    assert (batch["input_ids"][~batch["attention_mask"]] == PAD_ID).all()
    assert batch["values"].dtype == torch.float32 and (batch["values"][~batch["attention_mask"]] == 0).all()
    assert not (batch["expressed_mask"] & ~batch["attention_mask"]).any() and not batch["expressed_mask"][:, 0].any()
    assert batch["depth"].shape == (3, 2)
    np.testing.assert_allclose(batch["depth"][:, 0].numpy(), np.log10(adata.X[[3, 0, 7]].sum(axis=1).A1), rtol=1e-6)
    binned = collate(CellDataset(adata, BinningTokenizer(vocab, 64), seed=0).__getitems__([1, 2]))
    assert set(binned) == {"input_ids", "attention_mask", "value_ids", "cell_ids"}
    assert binned["value_ids"][binned["attention_mask"]][1:].min() >= 0 and binned["value_ids"].max() <= 51


def test_collate_carries_cell_ids():
    adata, vocab = generated(seed=5)
    dataset = CellDataset(adata, BinningTokenizer(vocab, 16), seed=0)
    batch = collate(dataset.__getitems__([3, 0, 7]))
    assert batch["cell_ids"].dtype == torch.int64 and batch["cell_ids"].tolist() == [3, 0, 7]
    listed = collate([dataset[i] for i in (3, 0, 7)])                     # per-cell dicts give the same batch
    assert set(listed) == set(batch) and all(torch.equal(listed[key], batch[key]) for key in batch)
    assert collate(BinningTokenizer(vocab, 16).tokenize_adata(adata[:4])).get("cell_ids").tolist() == [0, 1, 2, 3]
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    for batch in loader:                                                  # each row says which cell it is
        again = collate(dataset.__getitems__(batch["cell_ids"].numpy()))
        assert all(torch.equal(again[key], batch[key]) for key in batch)


def test_dataloader_without_collate_names_it():
    adata, vocab = generated(seed=5)
    loader = torch.utils.data.DataLoader(CellDataset(adata, BinningTokenizer(vocab, 16)), batch_size=4)
    with pytest.raises(TypeError, match="collate_fn=scfoundation.tokenization.collate"): next(iter(loader))


def test_tokenizer_names_are_the_input_kinds():
    from scfoundation.model import INPUT_KINDS, ModelConfig
    assert list(TOKENIZERS) == list(INPUT_KINDS) == ["rank", "bins", "continuous"]
    adata, vocab = generated(seed=12)
    vocab = tied_medians(vocab)
    for name, scheme in TOKENIZERS.items():
        assert scheme.name == name == INPUT_KINDS[name].name
        batch = collate(scheme.for_model(vocab, max_length=30).tokenize_adata(adata))
        assert set(INPUT_KINDS[name].batch_keys) <= set(batch), name     # the tokenizer feeds its kind's model
        assert ModelConfig(vocab_size=len(vocab), input_kind=name).kind is INPUT_KINDS[name]


def test_tokenizer_for_computes_medians_only_when_needed():
    adata, vocab = generated(seed=11)
    calls = []
    def medians():
        calls.append(1)
        return compute_gene_medians(adata, vocab)
    rank = tokenizer_for("rank", vocab, max_length=33, gene_medians=medians)
    assert isinstance(rank, RankValueTokenizer) and rank.max_length == 33 and calls == [1]
    np.testing.assert_array_equal(rank.vocab.medians, compute_gene_medians(adata, vocab))
    assert vocab.medians is None and rank.vocab.gene_version == vocab.version         # the caller's vocabulary is kept
    again = tokenizer_for("rank", rank.vocab, max_length=33, gene_medians=medians)
    assert calls == [1] and again.vocab is rank.vocab                                  # it has medians: not recomputed
    bins = tokenizer_for("bins", vocab, max_length=20, n_bins=7, gene_medians=medians)
    assert isinstance(bins, BinningTokenizer) and (bins.max_length, bins.n_bins) == (20, 7)
    continuous = tokenizer_for("continuous", vocab, max_length=21, gene_medians=medians)
    assert isinstance(continuous, ContinuousTokenizer) and continuous.max_length == 21 and calls == [1]
    with pytest.raises(DataError, match="needs gene medians.*gene_medians="): tokenizer_for("rank", vocab, 10)
    with pytest.raises(DataError, match="input kind 'words' has no tokenizer"): tokenizer_for("words", vocab, 10)


def test_dataloader_batches_match_direct_tokenization_and_epochs_resample():
    adata, vocab = generated(seed=6)
    tokenizer = BinningTokenizer(vocab, 10)
    dataset = CellDataset(adata, tokenizer, seed=4)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, collate_fn=collate)
    batches = list(loader)
    direct = collate(tokenizer.tokenize_adata(adata[:32], seed=4 * 1_000_003))
    for key in direct: assert torch.equal(batches[0][key], direct[key])
    dataset.set_epoch(1)
    assert not torch.equal(next(iter(loader))["input_ids"], batches[0]["input_ids"])


def test_backed_dataset_equals_in_memory(tmp_path):
    adata, vocab = generated(seed=7)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    tokenizer = RankValueTokenizer(tied_medians(vocab), 20)
    on_disk, in_memory = CellDataset(tmp_path / "cells.h5ad", tokenizer), CellDataset(adata, tokenizer)
    for key, value in collate(in_memory.__getitems__([5, 2, 5, 9])).items():
        assert torch.equal(collate(on_disk.__getitems__([5, 2, 5, 9]))[key], value)


def test_tokenizer_config_round_trip_and_vocab_check():
    adata, vocab = generated()
    vocab = tied_medians(vocab)
    for tokenizer in (RankValueTokenizer(vocab, 77), BinningTokenizer(vocab, 33, 9, 1e3, True),
                      ContinuousTokenizer(vocab, 55, 1e3, False, 2e4)):
        config = json.loads(json.dumps(tokenizer.to_dict()))
        assert config["name"] == tokenizer.name and config["vocab_version"] == vocab.version
        assert tokenizer_from_dict(config, vocab).to_dict() == config
    other = Vocab.from_genes(["A", "B"])
    with pytest.raises(ValueError, match="does not match"): tokenizer_from_dict(BinningTokenizer(vocab).to_dict(), other)
    with pytest.raises(DataError, match="Unknown tokenizer"): tokenizer_from_dict({"name": "bpe"}, vocab)


# ---------------------------------------------------------------- medians
def test_exact_and_histogram_medians_against_numpy(tmp_path):
    adata, vocab = generated(seed=8)
    dense = adata.X.toarray()
    normalised = dense / dense.sum(axis=1, keepdims=True) * 1e4
    expected = np.array([np.median(col[col > 0]) if (col > 0).any() else np.nan for col in normalised.T])
    np.testing.assert_allclose(compute_gene_medians(adata, method="exact", chunk_size=17), expected, rtol=1e-6)
    np.testing.assert_allclose(compute_gene_medians(adata.X, chunk_size=50), expected, rtol=0.04)
    adata.write_h5ad(tmp_path / "c.h5ad")
    per_token = compute_gene_medians(tmp_path / "c.h5ad", vocab, method="exact")
    assert per_token.shape == (len(vocab),) and np.isnan(per_token[:3]).all()
    token_ids = column_token_ids(vocab, adata.var_names)
    np.testing.assert_allclose(per_token[token_ids[token_ids >= 0]], expected[token_ids >= 0], rtol=1e-6)
    assert vocab.with_medians(per_token).medians is not None


# ---------------------------------------------------------------- bad input and edge cases
def test_empty_cell_raises_naming_the_cell():
    adata, vocab = generated()
    X = adata.X.tolil(); X[4, :] = 0; adata.X = sp.csr_matrix(X)
    for tokenizer in (RankValueTokenizer(tied_medians(vocab)), BinningTokenizer(vocab), ContinuousTokenizer(vocab)):
        with pytest.raises(DataError, match="1 of 120 cells have no counts.*first: cell 4.*filter_cells"):
            tokenizer.tokenize_adata(adata)


def test_cells_with_few_genes_are_short_and_padded():
    adata, vocab = generated()
    cells = BinningTokenizer(vocab, 5000).tokenize_adata(adata)
    n_expressed = (adata.X[:, :-5] > 0).sum(axis=1).A1  # the last 5 genes are outside the vocabulary
    np.testing.assert_array_equal(cells.lengths, n_expressed + 1)
    batch = collate(cells)
    assert batch["input_ids"].shape[1] == n_expressed.max() + 1 < 5000


def test_genes_outside_vocabulary_are_dropped_and_none_known_is_an_error():
    adata, vocab = generated(n_unknown=5)
    cells = ContinuousTokenizer(vocab, 1000).tokenize_adata(adata)
    known = set(vocab.ids(list(adata.var_names[:-5])))
    assert set(np.unique(cells.input_ids)) <= known | {CLS_ID}
    stranger = ad.AnnData(adata.X, var=pd.DataFrame(index=[f"X{i}" for i in range(adata.n_vars)]))
    with pytest.raises(DataError, match="None of the 300 genes.*map_genes"): CellDataset(stranger, BinningTokenizer(vocab))
    duplicated = ad.AnnData(adata.X[:, :2], var=pd.DataFrame(index=["G0", "G0_"]))
    duplicated.var_names = ["G0", "G0"]
    with pytest.raises(DataError, match="same vocabulary gene"): column_token_ids(vocab, duplicated.var_names)


@pytest.mark.parametrize("bad", ["log", "negative", "nan"])
def test_non_counts_raise_and_leave_adata_unchanged(bad):
    adata, vocab = generated()
    X = adata.X.copy()
    X.data = {"log": np.log1p(X.data) + 0.1, "negative": -X.data, "nan": np.where(X.data > 2, np.nan, X.data)}[bad]
    adata.X = X
    before = adata.X.copy()
    with pytest.raises(DataError, match="prepare_counts"): BinningTokenizer(vocab).tokenize_adata(adata)
    with pytest.raises(DataError, match="prepare_counts"): CellDataset(adata, ContinuousTokenizer(vocab))
    with pytest.raises(DataError, match="prepare_counts"): compute_gene_medians(adata)
    np.testing.assert_array_equal(adata.X.toarray(), before.toarray())


def test_vocab_without_medians_and_bad_parameters():
    _, vocab = generated()
    with pytest.raises(DataError, match="no medians.*compute_gene_medians"): RankValueTokenizer(vocab)
    with pytest.raises(DataError, match="max_length"): BinningTokenizer(vocab, max_length=1)
    with pytest.raises(DataError, match="n_bins"): BinningTokenizer(vocab, n_bins=2)
    with pytest.raises(DataError, match="method"): compute_gene_medians(sp.csr_matrix(np.eye(3)), method="mean")


def test_no_cells_and_mismatched_token_ids_are_errors():
    adata, vocab = generated()
    token_ids = column_token_ids(vocab, adata.var_names)
    with pytest.raises(DataError, match="No cells"): BinningTokenizer(vocab).tokenize(adata.X[:0], token_ids)
    with pytest.raises(DataError, match="token_ids has"): BinningTokenizer(vocab).tokenize(adata.X[:, :10], token_ids)


def test_genes_without_median_are_dropped():
    adata, vocab = generated()
    medians = np.ones(len(vocab), np.float32); medians[:3] = np.nan
    unseen = vocab.ids(["G0"])[0]
    medians[unseen] = np.nan
    cells = RankValueTokenizer(vocab.with_medians(medians), 1000).tokenize_adata(adata)
    assert unseen not in set(cells.input_ids)


def test_tokenizing_never_reorders_the_callers_matrix():
    "Columns in a different order than the vocabulary: sorting tokens must not permute the user's data array."
    import scfoundation.genes as genes
    from scfoundation.tokenization import RankValueTokenizer, compute_gene_medians
    rng = np.random.default_rng(0)
    names = list(genes.Vocab.from_gene_table().genes[:50])[::-1]  # reversed: token order ≠ column order
    X = sp.csr_matrix(rng.poisson(2.0, size=(40, 50)).astype(np.float32) + 1)
    adata = ad.AnnData(X, var=pd.DataFrame(index=names))
    dense_before = X.toarray()
    vocab = genes.Vocab.from_genes(names)
    vocab = vocab.with_medians(compute_gene_medians(adata, vocab))
    RankValueTokenizer(vocab).tokenize_adata(adata)
    np.testing.assert_array_equal(adata.X.toarray(), dense_before)
    from scfoundation.tokenization import column_token_ids, map_columns
    map_columns(X, column_token_ids(vocab, names), len(vocab))  # the building block, on the caller's own matrix
    np.testing.assert_array_equal(X.toarray(), dense_before)


# ---------------------------------------------------------------- medians in the version (issue 18, case 7)
def rank_model(adata, vocab):
    "A tiny rank-value model with its tokenizer, its config completed as pretrain leaves it."
    from scfoundation.model import ModelConfig, SCFModel
    tokenizer = RankValueTokenizer(vocab.with_medians(compute_gene_medians(adata, vocab)), max_length=32)
    config = ModelConfig(vocab_size=len(vocab), input_kind="rank", d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=32,
                         vocab_version=tokenizer.vocab.version, tokenizer=tokenizer.to_dict())
    torch.manual_seed(0)
    model = SCFModel(config).eval()
    model.tokenizer = tokenizer
    return model


def test_a_saved_model_refuses_its_vocab_json_with_other_medians(tmp_path):
    "Other medians give other rank-value tokens: refused with the old version field, and with a recomputed one."
    from scfoundation.model import SCFModel
    adata, vocab = generated(seed=11)
    model = rank_model(adata, vocab)
    model.save_pretrained(tmp_path)
    assert SCFModel.from_pretrained(tmp_path).tokenizer.vocab == model.tokenizer.vocab
    other = vocab.with_medians(compute_gene_medians(generated(seed=99)[0], vocab))   # medians of other cells
    assert other.gene_version == model.tokenizer.vocab.gene_version and other.version != model.tokenizer.vocab.version
    assert not np.array_equal(RankValueTokenizer(other, 32).tokenize_adata(adata).input_ids,
                              model.tokenizer.tokenize_adata(adata).input_ids)        # the tokens do change
    (tmp_path / "checksums.json").unlink(missing_ok=True)   # edited by hand, no checksums (or rewritten): the versions must tell
    saved = json.loads((tmp_path / "vocab.json").read_text())
    edited = json.loads(other.save(tmp_path / "other.json").read_text())["medians"]
    (tmp_path / "vocab.json").write_text(json.dumps({**saved, "medians": edited}))     # the old "version" kept
    with pytest.raises(DataError, match="tokens or medians do not match the recorded version"):
        SCFModel.from_pretrained(tmp_path)
    other.save(tmp_path / "vocab.json")                                                # the version recomputed
    with pytest.raises(ValueError, match="version"):
        SCFModel.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="version"):
        SCFModel.from_pretrained(tmp_path, vocab=other)                                # vocab= with other medians


def test_tokenizer_config_records_the_medians():
    adata, vocab = generated(seed=12)
    rank = RankValueTokenizer(vocab.with_medians(compute_gene_medians(adata, vocab)), 40)
    other = vocab.with_medians(np.ones(len(vocab.genes)))
    assert tokenizer_from_dict(rank.to_dict(), rank.vocab).to_dict() == rank.to_dict()
    with pytest.raises(DataError, match="other medians"):
        tokenizer_from_dict(rank.to_dict(), other)


# ---------------------------------------------------------------- the data's genes against the vocabulary (case 8)
def test_tokenizing_warns_when_the_vocabulary_misses_most_counts(tmp_path):
    "A vocabulary holding 2 of 300 genes: tokenize_adata, CellDataset (the embedding path) and iter_tokenized each warn once."
    adata, _ = generated(seed=13)
    sliver = Vocab.from_genes(["G0", "G1"])                                  # G0: in every cell
    share = float(adata.X[:, :2].sum() / adata.X.sum())
    path = tmp_path / "cells.h5ad"; adata.write_h5ad(path)
    makers = [lambda: BinningTokenizer(sliver, 16).tokenize_adata(adata), lambda: CellDataset(adata, BinningTokenizer(sliver, 16)),
              lambda: CellDataset(path, BinningTokenizer(sliver, 16)), lambda: list(iter_tokenized(path, BinningTokenizer(sliver, 16)))]
    for make in makers:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make()
        messages = [str(warning.message) for warning in caught if issubclass(warning.category, UserWarning)]
        assert len(messages) == 1 and "\n" not in messages[0], messages
        assert f"only {share:.1%} of the counts (2 of 300 genes)" in messages[0] and "map_genes" in messages[0]
    assert share < MIN_COUNTS_IN_VOCAB


def test_embedding_with_a_foreign_vocabulary_warns():
    "evaluate.embed_adata of data whose genes the model's vocabulary barely knows: the warning reaches the caller."
    from scfoundation.evaluate import embed_adata
    from scfoundation.model import ModelConfig, SCFModel
    adata, _ = generated(seed=14)
    vocab = Vocab.from_genes(["G0", "G1", "G2"])
    model = SCFModel(ModelConfig(vocab_size=len(vocab), input_kind="bins", n_bins=11, d_model=16, n_layers=1, n_heads=2,
                                 d_ff=32, max_len=16, vocab_version=vocab.version))
    model.tokenizer = BinningTokenizer(vocab, 16, n_bins=11)
    with pytest.warns(UserWarning, match=r"of the counts \(3 of 300 genes\) fall in genes of the vocabulary"):
        embed_adata(adata, model, progress=False)


def test_no_overlap_warning_in_the_normal_flows(pbmc):
    "pbmc68k with its own vocabulary, the simulator's cells with theirs, a vocabulary missing a few genes: silent."
    from scfoundation.genes import map_genes
    from scfoundation.simulate import simulate
    adata, vocab = pbmc
    simulated = simulate(n_cells=60, n_genes=120, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CellDataset(adata, RankValueTokenizer(vocab, 64))
        mapped = map_genes(adata)
        CellDataset(mapped, BinningTokenizer(Vocab.from_adata(mapped), 64))
        BinningTokenizer(Vocab.from_adata(simulated), 64).tokenize_adata(simulated)
        generated_adata, generated_vocab = generated(seed=15)                   # 5 of 300 genes unknown
        assert check_vocab_overlap(generated_adata, column_token_ids(generated_vocab, generated_adata.var_names)) > 0.95
