"""Tests of scfoundation.corpus: building shards (manifest, checksums, resume, parallel), bad input,
reading back, streaming over ranks and workers with exact resume, the one `pretrain` on a corpus (one
process, and DDP / FSDP on two CPU processes under torchrun)."""
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

from scfoundation.corpus import (Corpus, CorpusBatches, CorpusDataset, CorpusError, build_corpus, corpus_gene_medians,
                                 corpus_vocab, local_shuffle, sample_shards, stream_batches)
from scfoundation.data import DataError
from scfoundation.genes import Vocab, gene_version_of
from scfoundation.model import ModelConfig, SCFModel
from scfoundation.tokenization import BinningTokenizer, ContinuousTokenizer, RankValueTokenizer
from scfoundation.train import CheckpointError, TrainConfig, pretrain

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
TINY = dict(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=48)


def sha(path): return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_counts(path, genes, n_cells, seed, empty_rows=()):
    "An .h5ad of Poisson counts (CSR) over `genes`; `empty_rows` get no counts at all."
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(0.6, 2.0, len(genes)), (n_cells, len(genes))).astype(np.float32)
    counts[:, 0] += 1  # no empty cell unless asked
    counts[list(empty_rows)] = 0
    adata = ad.AnnData(sp.csr_matrix(counts), obs=pd.DataFrame(index=[f"c{seed}-{i}" for i in range(n_cells)]),
                       var=pd.DataFrame(index=genes))
    adata.write_h5ad(path)
    return adata


@pytest.fixture(scope="module")
def genes():
    return list(Vocab.from_gene_table().genes[:80])


@pytest.fixture(scope="module")
def sources(tmp_path_factory, genes):
    "Two studies: overlapping gene panels, one column outside the gene table, one empty cell."
    folder = tmp_path_factory.mktemp("sources")
    first = write_counts(folder / "a.h5ad", genes[:60] + ["not-a-gene"], 150, seed=1)
    second = write_counts(folder / "b.h5ad", genes[30:80], 110, seed=2, empty_rows=[5])
    return folder, first, second


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, sources):
    out = tmp_path_factory.mktemp("corpus") / "corpus"
    build_corpus(sources[0], out, corpus_vocab(sources[0]), shard_size=64, workers=2, progress=False)
    return out


def test_manifest_and_round_trip(sources, corpus_dir):
    folder, first, second = sources
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    assert manifest["n_cells"] == 150 + 110 - 1                            # the empty cell is dropped
    assert [source["n_kept"] for source in manifest["sources"]] == [150, 109]
    assert [source["sha256"] for source in manifest["sources"]] == [sha(folder / "a.h5ad"), sha(folder / "b.h5ad")]
    assert sum(shard["n_dropped_empty"] for shard in manifest["shards"]) == 1
    for shard in manifest["shards"]:
        for name, digest in shard["files"].items(): assert sha(corpus_dir / shard["name"] / name) == digest
    corpus = Corpus(corpus_dir)
    columns = corpus.vocab.ids(list(second.var_names))
    stored = sp.vstack([matrix for _, _, matrix in corpus.read(np.arange(150, 259))]).tocsr()
    expected = np.delete(second.X.toarray(), 5, axis=0)
    np.testing.assert_array_equal(stored[:, columns].toarray(), expected)
    # the last column keeps the counts of genes outside the vocabulary, so the depth T is the source's
    stored_a = sp.vstack([matrix for _, _, matrix in corpus.read(np.arange(150))]).tocsr()
    np.testing.assert_array_equal(np.asarray(stored_a.sum(axis=1)).ravel(), np.asarray(first.X.sum(axis=1)).ravel())
    np.testing.assert_array_equal(stored_a[:, -1].toarray().ravel(), first.X[:, -1].toarray().ravel())


def test_duplicate_gene_columns_are_summed(tmp_path, genes):
    adata = write_counts(tmp_path / "dup.h5ad", genes[:10], 20, seed=3)
    adata.var_names = genes[:9] + [genes[0].lower()]  # the same gene twice (identifiers are matched case-insensitively)
    adata.write_h5ad(tmp_path / "dup.h5ad")
    vocab = corpus_vocab(tmp_path / "dup.h5ad")
    build_corpus(tmp_path / "dup.h5ad", tmp_path / "c", vocab, workers=1, progress=False)
    (_, _, stored), = Corpus(tmp_path / "c").read(np.arange(20))
    column = vocab.ids([genes[0]])[0]
    np.testing.assert_array_equal(stored[:, column].toarray().ravel(), adata.X[:, 0].toarray().ravel() + adata.X[:, 9].toarray().ravel())


def test_parallel_build_equals_serial(sources, corpus_dir, tmp_path):
    serial = build_corpus(sources[0], tmp_path / "serial", corpus_vocab(sources[0]), shard_size=64, workers=1, progress=False)
    parallel = json.loads((corpus_dir / "manifest.json").read_text())
    assert [shard["files"] for shard in serial["shards"]] == [shard["files"] for shard in parallel["shards"]]


def test_resume_rebuilds_only_what_is_missing_or_changed(sources, tmp_path):
    folder = tmp_path / "inputs"; shutil.copytree(sources[0], folder)
    vocab, out = corpus_vocab(folder), tmp_path / "corpus"
    first = build_corpus(folder, out, vocab, shard_size=64, workers=1, progress=False)
    assert first["build"]["shards_built"] == 5
    shutil.rmtree(out / first["shards"][1]["name"])                       # crashed before the rename
    killed = subprocess.Popen(["true"]); killed.wait()
    (out / f".shard-00000-00001.{killed.pid}.tmp").mkdir()                # a half-written temp folder of a killed build
    (out / first["shards"][3]["name"] / "indices.npy").write_bytes(b"x")  # corrupted
    again = build_corpus(folder, out, vocab, shard_size=64, workers=1, progress=False)
    assert (again["build"]["shards_built"], again["build"]["shards_reused"]) == (2, 3)
    assert not (out / f".shard-00000-00001.{killed.pid}.tmp").exists()    # removed, not left forever
    assert [shard["files"] for shard in again["shards"]] == [shard["files"] for shard in first["shards"]]
    write_counts(folder / "b.h5ad", list(ad.read_h5ad(folder / "b.h5ad").var_names), 110, seed=9)  # a source changes
    changed = build_corpus(folder, out, vocab, shard_size=64, workers=1, progress=False)
    assert changed["build"]["shards_built"] == 2                          # only the shards of b.h5ad
    assert Corpus(out).verify() == []
    fresh = build_corpus(folder, out, vocab, shard_size=64, workers=1, progress=False, resume=False)
    assert fresh["build"]["shards_built"] == 5


def test_bad_inputs(tmp_path, sources, genes):
    folder = sources[0]
    before = {path.name: sha(path) for path in folder.glob("*.h5ad")}
    vocab = corpus_vocab(folder)
    with pytest.raises(CorpusError, match="does not exist"): build_corpus([tmp_path / "nope.h5ad"], tmp_path / "c", vocab)
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(CorpusError, match="not an .h5ad"): build_corpus([tmp_path / "table.csv"], tmp_path / "c", vocab)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .h5ad"): build_corpus([tmp_path / "empty"], tmp_path / "c", vocab)
    with pytest.raises(CorpusError, match="listed twice"): build_corpus([folder / "a.h5ad", folder / "a.h5ad"], tmp_path / "c", vocab)
    logged = ad.read_h5ad(folder / "a.h5ad"); logged.X = logged.X.log1p(); logged.write_h5ad(tmp_path / "log.h5ad")
    with pytest.raises(DataError, match="non-integer.*prepare_counts"):
        build_corpus(tmp_path / "log.h5ad", tmp_path / "c-log", vocab, workers=1, progress=False)
    write_counts(tmp_path / "mouse.h5ad", ["Xkr4x", "Gm1992x"], 5, seed=0)
    with pytest.raises(CorpusError, match="none of its genes"): build_corpus(tmp_path / "mouse.h5ad", tmp_path / "c-m", vocab, progress=False)
    with pytest.raises(CorpusError, match="must be >= 1"): build_corpus(folder, tmp_path / "c", vocab, shard_size=0)
    build_corpus(folder / "a.h5ad", tmp_path / "c-v", vocab, workers=1, progress=False)
    with pytest.raises(CorpusError, match="built with vocabulary"):
        build_corpus(folder / "a.h5ad", tmp_path / "c-v", Vocab.from_genes(genes[:5]), progress=False)
    assert {path.name: sha(path) for path in folder.glob("*.h5ad")} == before  # inputs never modified


def test_reading_errors(tmp_path, corpus_dir):
    with pytest.raises(CorpusError, match="no manifest.json"): Corpus(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CorpusError, match="cannot be read"): Corpus(tmp_path)
    corpus = Corpus(corpus_dir)
    with pytest.raises(IndexError): corpus.read(np.array([len(corpus)]))
    with pytest.raises(DataError): corpus.tokenize(np.arange(3), BinningTokenizer(Vocab.from_gene_table(), max_length=16))


@pytest.mark.parametrize("kind", ["rank", "bins", "continuous"])
def test_tokens_equal_those_from_the_source_file(sources, corpus_dir, kind):
    corpus, first = Corpus(corpus_dir), sources[1]
    vocab = corpus.vocab
    tokenizer = {"rank": lambda: RankValueTokenizer(vocab.with_medians(corpus_gene_medians(corpus)), max_length=24),
                 "bins": lambda: BinningTokenizer(vocab, max_length=24),
                 "continuous": lambda: ContinuousTokenizer(vocab, max_length=24)}[kind]()
    cells = np.array([3, 0, 77, 149, 12])
    from_corpus = corpus.tokenize(cells, tokenizer, seed=5)
    token_ids = vocab.ids(list(first.var_names), unknown="ignore")
    from_file = tokenizer.tokenize(first.X[np.sort(cells)], token_ids, cell_ids=np.sort(cells), seed=5)
    for key in ("offsets", "input_ids", "value_ids", "values", "expressed", "depth"):
        left, right = getattr(from_corpus, key), getattr(from_file, key)
        assert (left is None and right is None) or np.array_equal(left, right), key


def test_a_corpus_records_the_genes_of_its_vocabulary(sources, tmp_path):
    "Shards hold token ids: built with a vocabulary carrying medians they record its gene_version, and resume without it."
    plain = corpus_vocab(sources[0])
    with_medians = plain.with_medians(np.ones(len(plain.genes)))
    built = build_corpus(sources[0], tmp_path / "c", with_medians, shard_size=64, workers=1, progress=False)
    assert built["vocab_version"] == plain.version == with_medians.gene_version != with_medians.version
    assert Corpus(tmp_path / "c").vocab == with_medians                                 # opens: its genes match the manifest
    again = build_corpus(sources[0], tmp_path / "c", plain, shard_size=64, workers=1, progress=False)
    assert again["build"]["shards_built"] == 0                                          # same genes: every shard reused
    with pytest.raises(CorpusError, match="built with vocabulary"):
        build_corpus(sources[0], tmp_path / "c", Vocab(plain.genes[::-1]), shard_size=64, workers=1, progress=False)


def test_a_rebuild_drops_medians_cached_from_other_shards(sources, tmp_path):
    "gene_medians.npy belongs to the shards it was computed from: a rebuild that changes them removes it."
    folder = tmp_path / "inputs"; shutil.copytree(sources[0], folder)
    vocab, out = corpus_vocab(folder), tmp_path / "corpus"
    build_corpus(folder, out, vocab, shard_size=64, workers=1, progress=False)
    before = Corpus(out).gene_medians()
    build_corpus(folder, out, vocab, shard_size=64, workers=1, progress=False)             # nothing changes: kept
    assert (out / "gene_medians.npy").is_file()
    write_counts(folder / "b.h5ad", list(ad.read_h5ad(folder / "b.h5ad").var_names), 110, seed=9)
    build_corpus(folder, out, vocab, shard_size=64, workers=1, progress=False)
    assert not (out / "gene_medians.npy").is_file()
    assert not np.array_equal(Corpus(out).gene_medians(), before, equal_nan=True)


def test_rank_model_on_a_corpus_records_its_medians(corpus_dir, tmp_path):
    "corpus → Corpus.gene_medians → rank tokenizer → model: the model's version names the medians, a saved model reloads."
    config, train = ModelConfig(input_kind="rank", **TINY), TrainConfig(steps=2, batch_size=8, warmup_steps=1, save_every=0)
    shutil.copytree(corpus_dir, tmp_path / "c"); corpus = Corpus(tmp_path / "c")
    model = pretrain(corpus, config, train, tmp_path / "run", progress=False)
    assert model.tokenizer.vocab == corpus.vocab.with_medians(corpus.gene_medians())
    assert model.config.vocab_version == model.tokenizer.vocab.version and model.tokenizer.vocab.gene_version == corpus.vocab.version
    loaded = SCFModel.from_pretrained(tmp_path / "run" / "final")
    assert loaded.tokenizer.vocab == model.tokenizer.vocab
    other = corpus.vocab.with_medians(np.where(np.isnan(corpus.gene_medians()), np.nan, 1.0))
    with pytest.raises(ValueError, match="version"): SCFModel.from_pretrained(tmp_path / "run" / "final", vocab=other)


def test_training_stream_tokenizer_and_cached_medians(corpus_dir, tmp_path):
    shutil.copytree(corpus_dir, tmp_path / "c"); corpus = Corpus(tmp_path / "c")
    subset = sample_shards(corpus, 100)
    assert 100 <= len(subset) < len(corpus) and np.all(np.diff(subset) > 0)
    medians = corpus.gene_medians(max_cells=100)
    cached = np.load(tmp_path / "c" / "gene_medians.npy")
    assert np.array_equal(medians, cached, equal_nan=True)
    assert np.array_equal(cached, corpus_gene_medians(corpus, max_cells=100), equal_nan=True)
    assert not np.array_equal(cached, corpus_gene_medians(corpus), equal_nan=True)  # a subsample, not every cell
    stream = corpus.training_stream(ModelConfig(input_kind="rank", **TINY), TrainConfig(batch_size=8))
    assert stream.tokenizer.name == "rank" and np.array_equal(stream.tokenizer.vocab.medians, cached, equal_nan=True)
    assert corpus.training_stream(ModelConfig(input_kind="bins", n_bins=7, **TINY), TrainConfig(batch_size=8)).tokenizer.n_bins == 7
    assert corpus.training_stream(ModelConfig(input_kind="continuous", **TINY), TrainConfig(batch_size=8)).tokenizer.name == "continuous"
    with pytest.raises(CorpusError, match="multiple of 4"):
        CorpusBatches(corpus, BinningTokenizer(corpus.vocab), TrainConfig(batch_size=6), world_size=4)
    first = stream.fingerprint()
    assert first == corpus.training_stream(ModelConfig(input_kind="rank", **TINY), TrainConfig(batch_size=8)).fingerprint()
    assert first != corpus.training_stream(ModelConfig(input_kind="rank", **{**TINY, "max_len": 40}), TrainConfig(batch_size=8)).fingerprint()


def test_local_shuffle_bounds():
    order = local_shuffle(5000, 50, np.random.default_rng(1))
    assert sorted(order) == list(range(5000)) and np.abs(order - np.arange(5000)).max() < 50
    assert not np.array_equal(order, local_shuffle(5000, 50, np.random.default_rng(2)))


def test_stream_splits_ranks_equally_and_disjointly(corpus_dir):
    corpus = Corpus(corpus_dir)
    tokenizer = BinningTokenizer(corpus.vocab, max_length=24)
    ranks = [CorpusDataset(corpus, tokenizer, batch_size=8, seed=3, shuffle_buffer=32, rank=rank, world_size=3) for rank in range(3)]
    assert len({dataset.batches_per_epoch for dataset in ranks}) == 1
    for epoch in (0, 1):
        cells = [np.concatenate([dataset.batch_cells(epoch, b) for b in range(dataset.batches_per_epoch)]) for dataset in ranks]
        together = np.concatenate(cells)
        assert len(np.unique(together)) == len(together) == 3 * ranks[0].batches_per_epoch * 8
    assert not np.array_equal(ranks[0].epoch_cells(0), ranks[0].epoch_cells(1))
    again = CorpusDataset(corpus, tokenizer, batch_size=8, seed=3, shuffle_buffer=32, rank=0, world_size=3)
    assert np.array_equal(again.epoch_cells(1), ranks[0].epoch_cells(1))
    with pytest.raises(CorpusError, match="fewer than one batch"): CorpusDataset(corpus, tokenizer, batch_size=1000)
    with pytest.raises(CorpusError, match="rank"): CorpusDataset(corpus, tokenizer, batch_size=8, rank=3, world_size=3)


def test_stream_same_for_any_workers_and_resumes_exactly(corpus_dir):
    corpus = Corpus(corpus_dir)
    tokenizer = ContinuousTokenizer(corpus.vocab, max_length=24)
    make = lambda: CorpusDataset(corpus, tokenizer, batch_size=16, seed=1, shuffle_buffer=40)
    def take(dataset, n, workers): return [batch["values"] for batch in itertools.islice(stream_batches(dataset, workers), n)]
    reference = take(make(), 20, 0)                                        # 16 batches per epoch: into epoch 1
    assert all(torch.equal(a, b) for a, b in zip(reference, take(make(), 20, 2)))
    for stop in (5, 16):                                                   # mid-epoch and at the epoch boundary
        first = make(); take(first, stop, 2)
        resumed = make(); resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert all(torch.equal(a, b) for a, b in zip(reference[stop:], take(resumed, 20 - stop, 2)))
    with pytest.raises(CorpusError, match="seed"):
        CorpusDataset(corpus, tokenizer, batch_size=16, seed=2).load_state_dict(make().state_dict())
    finite = make(); assert len(list(stream_batches(finite, 0, epochs=1))) == finite.batches_per_epoch


def test_pretrain_on_a_corpus_resumes_exactly(corpus_dir, tmp_path):
    config, train = ModelConfig(input_kind="bins", **TINY), TrainConfig(steps=4, batch_size=8, warmup_steps=1, save_every=2)
    whole = pretrain(corpus_dir, config, train, tmp_path / "whole", progress=False).history        # the folder
    pretrain(Corpus(corpus_dir), config, train, tmp_path / "split", progress=False, stop_after=2)  # or the Corpus
    state = json.loads((tmp_path / "split" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["data"]["stream"]["batch"] == 2 and state["data"]["source"] == "corpus" and state["world_size"] == 1
    resumed = pretrain(corpus_dir, config, train, tmp_path / "split", progress=False).history
    assert resumed["loss"].tolist() == whole["loss"].tolist()
    model = SCFModel.from_pretrained(tmp_path / "split" / "final")
    assert model.tokenizer.vocab.version == Corpus(corpus_dir).vocab.version and model.tokenizer.name == "bins"
    with pytest.raises(DataError, match="fsdp=True needs several processes"):
        pretrain(corpus_dir, config, train, tmp_path / "fsdp", fsdp=True, progress=False)


def test_a_corpus_checkpoint_is_refused_for_other_data(corpus_dir, sources, tmp_path):
    "Resuming a corpus run on cells in memory (or the other way round) is an error that names the fix, nothing is overwritten."
    config, train = ModelConfig(input_kind="bins", **TINY), TrainConfig(steps=4, batch_size=8, warmup_steps=1, save_every=2)
    pretrain(corpus_dir, config, train, tmp_path / "run", progress=False, stop_after=2)
    cells = ad.read_h5ad(sources[0] / "a.h5ad")
    with pytest.raises(CheckpointError):
        pretrain(cells, config, train, tmp_path / "run", vocab=Corpus(corpus_dir).vocab, progress=False)
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["checkpoint-2"]


def test_pretrain_on_a_corpus_trains_a_prior_model_and_resumes_it(corpus_dir, tmp_path):
    "A model built by the caller (here with a prior) trains on the corpus; checkpoints and final carry prior.json."
    from scfoundation.model import SCFModel
    from scfoundation.prior import add_prior, build_prior_features
    corpus = Corpus(corpus_dir)

    def prior_model():
        torch.manual_seed(0)
        config = ModelConfig(input_kind="bins", **TINY, vocab_size=len(corpus.vocab), vocab_version=corpus.vocab.version)
        return add_prior(SCFModel(config), build_prior_features(corpus.vocab, sources=("chromosome", "KEGG"), dim=4))

    train = TrainConfig(steps=4, batch_size=8, warmup_steps=1, save_every=2)
    whole = pretrain(corpus_dir, prior_model(), train, tmp_path / "whole", progress=False).history
    pretrain(corpus_dir, prior_model(), train, tmp_path / "split", progress=False, stop_after=2)
    assert (tmp_path / "split" / "checkpoint-2" / "prior.json").is_file()
    resumed = pretrain(corpus_dir, prior_model(), train, tmp_path / "split", progress=False).history
    assert resumed["loss"].tolist() == whole["loss"].tolist()
    model = SCFModel.from_pretrained(tmp_path / "split" / "final")
    assert model.embedding.gene.sources == ("chromosome", "KEGG") and model.tokenizer.name == "bins"


WORKER = """
import sys
from scfoundation.model import ModelConfig
from scfoundation.train import TrainConfig, pretrain
corpus, out = sys.argv[1], sys.argv[2]
config = ModelConfig(input_kind="rank", d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=48)
train = TrainConfig(steps=4, batch_size=16, grad_accum=2, warmup_steps=1, save_every=2, precision="bf16")
for mode in ("ddp", "fsdp"):  # one launch: the process group is joined once and reused
    for name, stop in (("whole", None), ("split", 2), ("split", None)):
        pretrain(corpus, config, train, f"{out}/{mode}-{name}", fsdp=mode == "fsdp", progress=False, stop_after=stop)
"""


def test_ddp_and_fsdp_on_two_processes(corpus_dir, tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={29700 + os.getpid() % 200}",
               str(tmp_path / "worker.py"), str(corpus_dir), str(tmp_path)]
    run = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for mode in ("ddp", "fsdp"):
        whole, split = (load_file(tmp_path / f"{mode}-{name}" / "final" / "model.safetensors") for name in ("whole", "split"))
        assert all(torch.equal(whole[key], split[key]) for key in whole), mode  # resumed run == uninterrupted run
        history = json.loads((tmp_path / f"{mode}-whole" / "final" / "history.json").read_text())
        assert len(history) == 4 and all(np.isfinite(row["loss"]) for row in history)
        state = json.loads((tmp_path / f"{mode}-split" / "checkpoint-4" / "trainer_state.json").read_text())
        assert state["world_size"] == 2 and state["data"]["stream"]["batch"] == 4 * 2
        model = SCFModel.from_pretrained(tmp_path / f"{mode}-whole" / "final")  # a plain model, whatever the wrapper
        assert gene_version_of(model.config.vocab_version) == Corpus(corpus_dir).vocab.gene_version  # + the corpus's medians
        assert model.config.vocab_version == model.tokenizer.vocab.version != Corpus(corpus_dir).vocab.version
    ddp, fsdp = (load_file(tmp_path / f"{mode}-whole" / "final" / "model.safetensors") for mode in ("ddp", "fsdp"))
    assert all(torch.allclose(ddp[key], fsdp[key], atol=2e-2) for key in ddp)  # the same training, another wrapper
