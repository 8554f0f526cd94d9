"""Tests of scfoundation.prior: prior-knowledge gene vectors, the prior embedding, save/load (also through
train.pretrain checkpoints), homology."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

from scfoundation.data import DataError
from scfoundation.genes import Vocab, gene_table
from scfoundation.model import ModelConfig, ModelError, SCFModel, random_batch
from scfoundation.prior import (CHROMOSOMES, GENE_SET_SOURCES, PRIOR_SOURCES, PriorError, PriorFeatures,
                                PriorGeneEmbedding, add_prior, build_prior_features, chromosome_features,
                                coexpression_features, filter_gene_sets, gene_set_features, gene_sets,
                                homology_coverage_report, homology_vocab_map, prior_sources,
                                read_homology_table, set_prior_sources)

GENES = ["CD3E", "CD3D", "CD19", "MS4A1", "LYZ", "CD14", "TP53", "MDM2", "ACTB", "GAPDH"]


@pytest.fixture(scope="module")
def vocab():
    return Vocab(GENES)


@pytest.fixture(scope="module")
def corpus():
    "Two modules of co-varying genes (T-like and B-like) and a constant gene, as counts."
    rng = np.random.default_rng(0)
    t_module, b_module = rng.gamma(2.0, 40.0, 400), rng.gamma(2.0, 40.0, 400)
    rates = np.column_stack([t_module, t_module, b_module, b_module] + [np.full(400, 20.0)] * 5 + [np.zeros(400)])
    counts = rng.poisson(rates).astype(np.float32)
    return AnnData(X=sp.csr_matrix(counts), var=pd.DataFrame(index=GENES))


def write_by_hand(path, text):
    "Edit a file of a saved model as a person would, in a folder without checksums (as older versions wrote): the prior's own checks answer."
    path.write_text(text)
    (path.parent / "checksums.json").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def features(vocab, corpus):
    return build_prior_features(vocab, corpus=corpus, dim=4)


def small_model(vocab, seed=0):
    torch.manual_seed(seed)
    return SCFModel(ModelConfig.named("teaching", vocab_size=len(vocab), d_model=16, n_heads=2, d_ff=32,
                                      max_len=16, vocab_version=vocab.version))


def test_errors_are_data_errors():
    assert issubclass(PriorError, DataError) and issubclass(PriorError, ValueError)


# --- gene sets -----------------------------------------------------------------------------------

def test_shipped_gene_sets_are_filtered():
    table = gene_sets()
    assert list(table.columns) == ["entrez_id", "source", "term"]
    assert set(table["source"]) == set(GENE_SET_SOURCES)
    sizes = table.groupby(["source", "term"]).size()
    assert sizes.min() >= 5 and sizes.max() <= 500
    assert not table.duplicated().any()
    table.loc[0, "term"] = "changed"        # a copy: the cache is not modified
    assert gene_sets().loc[0, "term"] != "changed"


def test_filter_gene_sets_bounds_and_nd():
    table = pd.DataFrame({"entrez_id": [1, 2, 3, 4, 1, 2, 1, 1], "source": "KEGG",
                          "term": ["a", "a", "a", "a", "b", "b", "a", "c"],
                          "evidence": ["x", "x", "x", "x", "x", "ND", "y", "x"]})
    kept = filter_gene_sets(table, min_genes=2, max_genes=3)
    assert kept.empty                              # a has 4 genes (> 3); b loses its ND row; c has 1
    kept = filter_gene_sets(table, min_genes=2, max_genes=4)
    assert kept["term"].unique().tolist() == ["a"] and kept["entrez_id"].tolist() == [1, 2, 3, 4]
    with pytest.raises(PriorError, match="entrez_id"):
        filter_gene_sets(table.drop(columns="entrez_id"))


def test_gene_set_features_shared_terms_align(vocab):
    entrez = gene_table().set_index("token")["entrez_id"]
    rows = [("CD3E", "t"), ("CD3D", "t"), ("CD3E", "t2"), ("CD3D", "t2"), ("CD19", "b"), ("MS4A1", "b"), ("TP53", "p")]
    table = pd.DataFrame({"entrez_id": [entrez[g] for g, _ in rows], "source": "KEGG", "term": [t for _, t in rows]})
    vectors, missing = gene_set_features(vocab, "KEGG", dim=3, table=table)
    ids = vocab.ids(GENES)
    assert vectors.shape == (len(vocab), 3) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors[ids[0]], vectors[ids[1]], atol=1e-6)      # same terms, same vector
    assert abs(float(vectors[ids[0]] @ vectors[ids[2]])) < 1e-6                  # disjoint terms, orthogonal
    assert missing[ids].tolist() == [False] * 4 + [True, True, False] + [True] * 3
    assert not missing[:3].any() and np.abs(vectors[:3]).sum() == 0             # special tokens carry nothing
    assert np.abs(vectors[missing]).sum() == 0


def test_gene_set_features_real_table_is_deterministic(vocab):
    first, missing = gene_set_features(vocab, "GO:BP", dim=4, seed=3)
    second, _ = gene_set_features(vocab, "GO:BP", dim=4, seed=3)
    np.testing.assert_array_equal(first, second)
    annotated = ~missing & (np.arange(len(vocab)) >= 3)
    assert annotated.sum() >= 8                                  # these are well-studied genes
    np.testing.assert_allclose(np.linalg.norm(first[annotated], axis=1), 1, atol=1e-5)


def test_gene_set_features_bad_source(vocab):
    with pytest.raises(PriorError, match="gene-set source"):
        gene_set_features(vocab, "Reactome")


# --- co-expression and chromosome --------------------------------------------------------------

def test_coexpression_modules(vocab, corpus):
    vectors, missing = coexpression_features(corpus, vocab, dim=2)
    ids = vocab.ids(GENES)
    assert float(vectors[ids[0]] @ vectors[ids[1]]) > 0.9 and float(vectors[ids[2]] @ vectors[ids[3]]) > 0.9
    assert float(vectors[ids[0]] @ vectors[ids[2]]) < float(vectors[ids[0]] @ vectors[ids[1]])
    assert missing[ids[-1]] and not missing[ids[:-1]].any()          # GAPDH never varies (all zero)
    assert np.abs(vectors[:3]).sum() == 0


def test_coexpression_does_not_modify_corpus(vocab, corpus):
    before = corpus.X.copy()
    coexpression_features(corpus, vocab, dim=2)
    assert (corpus.X != before).nnz == 0


def test_coexpression_bad_corpus(vocab, corpus):
    with pytest.raises(PriorError, match="map_genes"):
        coexpression_features(AnnData(X=corpus.X, var=pd.DataFrame(index=[f"x{i}" for i in range(10)])), vocab)
    negative = corpus.copy(); negative.X = -negative.X
    with pytest.raises(PriorError, match="raw counts"):
        coexpression_features(negative, vocab)
    with pytest.raises(PriorError, match="at least 3 cells"):
        coexpression_features(corpus[:2].copy(), vocab)
    with pytest.raises(PriorError, match="AnnData"):
        coexpression_features(corpus.X, vocab)


def test_chromosome_features():
    vocab = Vocab(["CD3E", "XIST", "MT-ND1", "TP53"])
    vectors, missing = chromosome_features(vocab, n_frequencies=4)
    assert vectors.shape == (len(vocab), len(CHROMOSOMES) + 8)
    assert [CHROMOSOMES[i] for i in vectors[3:, :len(CHROMOSOMES)].argmax(1)] == ["11", "X", "MT", "17"]
    assert vectors[3:, :len(CHROMOSOMES)].sum(1).tolist() == [1, 1, 1, 1]
    assert not missing.any()


# --- PriorFeatures -----------------------------------------------------------------------------

def test_build_prior_features_and_coverage(vocab, features):
    assert features.sources == PRIOR_SOURCES and features.vocab_version == vocab.version == vocab.gene_version
    coverage = features.coverage()
    assert list(coverage.index) == list(PRIOR_SOURCES)
    assert coverage.loc["chromosome", "fraction"] == 1.0
    assert coverage.loc["coexpression", "genes"] == len(GENES) - 1
    assert coverage.loc["GO:BP", "dim"] == 4


def test_build_prior_features_errors(vocab):
    with pytest.raises(PriorError, match="needs a corpus"):
        build_prior_features(vocab, sources=("coexpression",))
    with pytest.raises(PriorError, match="unknown prior sources"):
        build_prior_features(vocab, sources=("GO",))
    with pytest.raises(PriorError, match="unknown prior sources"):
        build_prior_features(vocab, sources=())


def test_prior_features_follow_the_genes_not_the_medians(vocab, features):
    "A rank-value model's version names its medians too: features of the same genes fit it, of other genes do not."
    with_medians = vocab.with_medians(np.ones(len(vocab.genes)))
    assert build_prior_features(with_medians, sources=("chromosome",)).vocab_version == vocab.version
    assert small_model(with_medians).config.vocab_version == with_medians.version != vocab.version
    add_prior(small_model(with_medians), features)
    with pytest.raises(PriorError, match="genes of vocabulary"):
        add_prior(small_model(Vocab(vocab.genes[::-1])), features)


def test_features_save_load_roundtrip(features, tmp_path):
    path = features.save(tmp_path / "prior.safetensors")
    loaded = PriorFeatures.load(path)
    assert loaded.sources == features.sources and loaded.vocab_version == features.vocab_version
    for source in features.sources:
        np.testing.assert_array_equal(loaded.vectors[source], features.vectors[source])
        np.testing.assert_array_equal(loaded.missing[source], features.missing[source])


def test_features_load_bad_file(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PriorError, match="save it again"):
        PriorFeatures.load(tmp_path / "bad.safetensors")
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(PriorError, match="no scfoundation prior"):
        PriorFeatures.load(tmp_path / "other.safetensors")


# --- the prior embedding -----------------------------------------------------------------------

def test_add_prior_starts_as_plain_model(vocab, features):
    plain, prior = small_model(vocab), add_prior(small_model(vocab), features)
    batch = random_batch(plain.config, [6, 4], seed=0)
    assert isinstance(prior.embedding.gene, PriorGeneEmbedding)
    assert torch.equal(plain.embed(batch), prior.embed(batch))
    with torch.no_grad():
        prior.embedding.gene.projections["chromosome"].weight.normal_()
    assert not torch.equal(plain.embed(batch), prior.embed(batch))
    set_prior_sources(prior, [source for source in PRIOR_SOURCES if source != "chromosome"])
    assert torch.equal(plain.embed(batch), prior.embed(batch))


def test_prior_is_trained_and_buffers_fixed(vocab, features):
    model = add_prior(small_model(vocab), features)
    from scfoundation.model import mask_batch
    batch = mask_batch(random_batch(model.config, [8, 8], seed=1), model.config, seed=0)
    model(batch)["loss"].backward()
    gene = model.embedding.gene
    assert gene.projections["GO_BP"].weight.grad.abs().sum() > 0
    assert all(not buffer.requires_grad for buffer in gene.buffers())
    names = {name for name, _ in model.named_parameters()}
    assert not any(name.startswith("embedding.gene.prior_") for name in names)


def test_prior_sources_for_one_block(vocab, features):
    plain, prior = small_model(vocab), set_prior_sources(add_prior(small_model(vocab), features), ["KEGG", "Pfam"])
    with torch.no_grad():
        prior.embedding.gene.projections["KEGG"].weight.normal_()
    batch = random_batch(plain.config, [6, 4], seed=0)
    with prior_sources(prior, []) as same:
        assert same is prior and prior.embedding.gene.active == set()
        assert torch.equal(plain.embed(batch), prior.embed(batch))
    assert prior.embedding.gene.active == {"KEGG", "Pfam"}
    with pytest.raises(RuntimeError), prior_sources(prior, ["chromosome"]):
        assert prior.embedding.gene.active == {"chromosome"}
        raise RuntimeError("the sources come back after an error too")
    assert prior.embedding.gene.active == {"KEGG", "Pfam"}
    with prior_sources(plain, []):                                   # a plain model is its learned embedding
        assert torch.equal(plain.embed(batch), plain.embed(batch))
    with pytest.raises(PriorError, match="no prior"), prior_sources(plain, ["KEGG"]):
        pass


def test_add_prior_errors(vocab, features):
    model = add_prior(small_model(vocab), features)
    with pytest.raises(PriorError, match="already has a prior"):
        add_prior(model, features)
    with pytest.raises(PriorError, match="vocab_size"):
        add_prior(small_model(Vocab(GENES[:5])), features)
    other = PriorFeatures(features.vectors, features.missing, "0000000000000000")
    with pytest.raises(PriorError, match="model's vocabulary"):
        add_prior(small_model(vocab), other)
    with pytest.raises(PriorError, match="not in the features"):
        add_prior(small_model(vocab), build_prior_features(vocab, sources=("KEGG",), dim=2), sources=("Pfam",))
    with pytest.raises(PriorError, match="no prior"):
        set_prior_sources(small_model(vocab), ["KEGG"])
    with pytest.raises(PriorError, match="not in this model's prior"):
        set_prior_sources(add_prior(small_model(vocab), build_prior_features(vocab, sources=("KEGG",), dim=2)), ["Pfam"])


def test_save_load_a_prior_model(vocab, features, tmp_path):
    model = add_prior(small_model(vocab), features)
    with torch.no_grad():
        for projection in model.embedding.gene.projections.values(): projection.weight.normal_()
    set_prior_sources(model, ["KEGG", "coexpression"])
    model.save_pretrained(tmp_path / "m")
    loaded = SCFModel.from_pretrained(tmp_path / "m", vocab=vocab)
    batch = random_batch(model.config, [7, 3], seed=2)
    assert torch.equal(loaded.embed(batch), model.embed(batch))
    assert loaded.embedding.gene.active == {"KEGG", "coexpression"}
    assert torch.equal(loaded.embedding.gene.prior_coexpression, model.embedding.gene.prior_coexpression)
    assert not loaded.training
    with pytest.raises(ModelError, match="vocabulary version"):
        SCFModel.from_pretrained(tmp_path / "m", vocab=Vocab(GENES[::-1]))


def test_load_plain_and_corrupt_prior_folders(vocab, features, tmp_path):
    plain = small_model(vocab)
    plain.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "prior.json").exists()
    assert not isinstance(SCFModel.from_pretrained(tmp_path / "plain").embedding.gene, PriorGeneEmbedding)
    model = add_prior(small_model(vocab), features)
    model.save_pretrained(tmp_path / "p")
    header = (tmp_path / "p" / "prior.json").read_text().replace('"KEGG": 4', '"KEGG": 5')
    write_by_hand(tmp_path / "p" / "prior.json", header)
    with pytest.raises(ModelError, match="config.json and prior.json: save them together with save_pretrained"):
        SCFModel.from_pretrained(tmp_path / "p")


def test_plain_from_pretrained_restores_the_prior(vocab, features, tmp_path):
    model = add_prior(small_model(vocab), features)
    with torch.no_grad():
        for projection in model.embedding.gene.projections.values(): projection.weight.normal_()
    set_prior_sources(model, ["GO:BP", "chromosome"])
    model.save_pretrained(tmp_path)
    header = json.loads((tmp_path / "prior.json").read_text())
    assert header["active"] == ["GO:BP", "chromosome"] and header["dims"]["KEGG"] == 4
    loaded = SCFModel.from_pretrained(tmp_path, vocab=vocab)
    assert isinstance(loaded.embedding.gene, PriorGeneEmbedding)
    assert loaded.embedding.gene.sources == PRIOR_SOURCES and loaded.embedding.gene.active == {"GO:BP", "chromosome"}
    batch = random_batch(model.config, [7, 3], seed=2)
    assert torch.equal(loaded.embed(batch), model.embed(batch))
    small_model(vocab).save_pretrained(tmp_path)                      # a plain model into the same folder
    assert not (tmp_path / "prior.json").exists()
    assert not isinstance(SCFModel.from_pretrained(tmp_path).embedding.gene, PriorGeneEmbedding)


def test_from_pretrained_imports_the_prior_module_on_demand(vocab, features, tmp_path):
    add_prior(small_model(vocab), features).save_pretrained(tmp_path)
    script = ("import sys; from scfoundation.model import SCFModel; assert 'scfoundation.prior' not in sys.modules; "
              "print(type(SCFModel.from_pretrained(sys.argv[1]).embedding.gene).__name__)")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "PriorGeneEmbedding"


@pytest.mark.parametrize("change, error, words", [
    ({"format": "other"}, PriorError, "not a scfoundation prior header"),
    ({"vocab_version": "0000000000000000"}, PriorError, "different models"),
    ({"active": ["Pfam", "unknown"]}, PriorError, "inconsistent"),
    ({"sources": ["GO:BP"], "active": ["GO:BP"]}, ModelError, "unexpected weights"),
])
def test_bad_prior_json_names_the_fix(vocab, features, tmp_path, change, error, words):
    add_prior(small_model(vocab), features).save_pretrained(tmp_path)
    path = tmp_path / "prior.json"
    write_by_hand(path, json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(error, match=words) as raised:
        SCFModel.from_pretrained(tmp_path)
    assert "save_pretrained" in str(raised.value)


# --- train.pretrain with a prior -----------------------------------------------------------------

QUICK = dict(steps=6, batch_size=8, lr=3e-3, warmup_steps=2, save_every=2, log_every=1, device="cpu")


def pretrained_prior_model(vocab, features, corpus, out_dir, active=("KEGG", "coexpression", "chromosome"), **train):
    "A tiny prior model, pretrained with train.pretrain (checkpoints every 2 steps); its history in `.history`."
    from scfoundation.train import TrainConfig, pretrain
    model = set_prior_sources(add_prior(small_model(vocab), features), active)
    return pretrain(corpus, model, TrainConfig(**QUICK), out_dir, vocab=vocab, progress=False, **train)


def test_pretrain_checkpoints_carry_the_prior_and_the_tokenizer(vocab, features, corpus, tmp_path):
    from scfoundation.evaluate import embed_cells
    model = pretrained_prior_model(vocab, features, corpus, tmp_path / "run")
    assert len(model.history) == 6 and (tmp_path / "run" / "checkpoint-6" / "prior.json").is_file()
    loaded = SCFModel.from_pretrained(tmp_path / "run" / "final")
    gene = loaded.embedding.gene
    assert isinstance(gene, PriorGeneEmbedding) and gene.sources == PRIOR_SOURCES
    assert gene.active == {"KEGG", "coexpression", "chromosome"}
    assert torch.equal(gene.prior_coexpression, model.embedding.gene.prior_coexpression)
    assert loaded.tokenizer is not None and loaded.tokenizer.to_dict() == model.tokenizer.to_dict()
    assert loaded.tokenizer.vocab.version == model.tokenizer.vocab.version == loaded.config.vocab_version
    np.testing.assert_array_equal(loaded.tokenizer.vocab.medians, model.tokenizer.vocab.medians)
    np.testing.assert_array_equal(embed_cells(loaded, corpus[:16]), embed_cells(model, corpus[:16]))  # each with its own tokenizer
    trained = {name: tensor for name, tensor in model.state_dict().items() if "projections" in name}
    assert any(tensor.abs().sum() > 0 for tensor in trained.values())   # the projections left zero: they were trained


def test_pretrain_resumes_a_prior_model_exactly(vocab, features, corpus, tmp_path):
    from scfoundation.train import CheckpointError, TrainConfig, pretrain
    whole = pretrained_prior_model(vocab, features, corpus, tmp_path / "whole").history
    pretrained_prior_model(vocab, features, corpus, tmp_path / "cut", stop_after=3)
    with pytest.raises(CheckpointError, match="prior.json"):           # other active sources: another run
        pretrained_prior_model(vocab, features, corpus, tmp_path / "cut", active=("KEGG",))
    with pytest.raises(CheckpointError, match="prior.json"):           # no prior at all
        pretrain(corpus, small_model(vocab), TrainConfig(**QUICK), tmp_path / "cut", vocab=vocab, progress=False)
    resumed = pretrained_prior_model(vocab, features, corpus, tmp_path / "cut").history
    assert resumed.loss.tolist() == whole.loss.tolist()


def test_pretrained_folder_with_a_bad_prior_json(vocab, features, corpus, tmp_path):
    pretrained_prior_model(vocab, features, corpus, tmp_path / "run")
    path = tmp_path / "run" / "final" / "prior.json"
    header = json.loads(path.read_text())
    write_by_hand(path, json.dumps({**header, "dims": {**header["dims"], "KEGG": 7}}))
    with pytest.raises(ModelError, match=r"shape mismatch for embedding\.gene\.prior_KEGG.*config\.json and prior\.json"):
        SCFModel.from_pretrained(tmp_path / "run" / "final")
    write_by_hand(path, json.dumps(header)[:40])
    with pytest.raises(ModelError, match="not valid JSON.*save_pretrained"):
        SCFModel.from_pretrained(tmp_path / "run" / "final")
    write_by_hand(path, json.dumps({**header, "vocab_version": "0000000000000000"}))
    with pytest.raises(PriorError, match="different models.*model.save_pretrained"):
        SCFModel.from_pretrained(tmp_path / "run" / "final")


# --- homology ------------------------------------------------------------------------------------

def human_counts(seed=0, n_cells=50):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, size=(n_cells, len(GENES))).astype(np.float32)
    return AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame({"cell_type": ["a", "b"] * (n_cells // 2)},
                                                            index=[f"c{i}" for i in range(n_cells)]),
                   var=pd.DataFrame(index=GENES))


def mouse_style(name: str) -> str:
    return name[:1] + name[1:].lower()


@pytest.fixture()
def homology_tsv(tmp_path):
    "A made-up homology table in the documented format (not real orthology), written as TSV."
    table = pd.DataFrame({"species_gene": [mouse_style(g) for g in GENES], "human_gene": GENES,
                          "orthology_type": "ortholog_one2one", "species": "mouse"})
    path = tmp_path / "mouse_human.tsv"
    table.to_csv(path, sep="\t", index=False)
    return path


def mouse_from(human: AnnData) -> AnnData:
    return AnnData(X=human.X.copy(), obs=human.obs.copy(), var=pd.DataFrame(index=[mouse_style(g) for g in human.var_names]))


def test_homology_roundtrip_preserves_counts(homology_tsv):
    human = human_counts()
    mouse = mouse_from(human)
    before = mouse.X.copy()
    back = homology_vocab_map(mouse, homology_tsv, species="mouse")
    assert list(back.var_names) == GENES
    assert (back.X != human.X).nnz == 0
    assert (mouse.X != before).nnz == 0 and mouse.var_names[0] == "Cd3e"   # input unchanged
    report = homology_coverage_report(back)
    assert report.loc[("homology", "genes"), "fraction"] == 1.0
    assert report.loc[("human table", "counts"), "fraction"] == 1.0
    assert back.uns["scf_homology"]["species"] == "mouse"
    assert back.obs["cell_type"].tolist() == human.obs["cell_type"].tolist()


def test_homology_one_to_many_and_many_to_one(homology_tsv):
    table = pd.read_csv(homology_tsv, sep="\t")
    extra = pd.DataFrame({"species_gene": ["Cd3e", "Lyz2"], "human_gene": ["CD3D", "LYZ"],
                          "orthology_type": ["ortholog_one2many", "ortholog_many2one"], "species": "mouse"})
    table = pd.concat([table, extra], ignore_index=True)
    human = human_counts()
    mouse = mouse_from(human)
    lyz2 = np.arange(mouse.n_obs, dtype=np.float32)[:, None]
    mouse = AnnData(X=sp.hstack([mouse.X, sp.csr_matrix(lyz2)]).tocsr(), obs=mouse.obs,
                    var=pd.DataFrame(index=list(mouse.var_names) + ["Lyz2"]))
    dropped = homology_vocab_map(mouse, table)                             # defaults: drop, sum
    assert "CD3E" not in dropped.var_names                                  # Cd3e has two human partners
    np.testing.assert_array_equal(dropped[:, "CD3D"].X.toarray(), human[:, "CD3D"].X.toarray())
    np.testing.assert_array_equal(dropped[:, "LYZ"].X.toarray(), human[:, "LYZ"].X.toarray() + lyz2)
    assert dropped.uns["scf_homology"]["one_to_many_genes"] == 1
    assert dropped.uns["scf_homology"]["many_to_one_genes"] >= 1
    copied = homology_vocab_map(mouse, table, one_to_many="copy", many_to_one="drop")
    assert "CD3E" in copied.var_names and "LYZ" not in copied.var_names and "CD3D" not in copied.var_names


def test_homology_orthology_filter(homology_tsv):
    table = pd.read_csv(homology_tsv, sep="\t")
    table.loc[0, "orthology_type"] = "ortholog_one2many"
    mapped = homology_vocab_map(mouse_from(human_counts()), table, orthology_types="ortholog_one2one")
    assert "CD3E" not in mapped.var_names and len(mapped.var_names) == len(GENES) - 1


def test_homology_case_insensitive_and_no_species_column(homology_tsv):
    table = pd.read_csv(homology_tsv, sep="\t").drop(columns=["species", "orthology_type"])
    mouse = mouse_from(human_counts())
    mouse.var_names = [name.upper() for name in mouse.var_names]
    mapped = homology_vocab_map(mouse, table, species="rat")   # no species column: any species name works
    assert list(mapped.var_names) == GENES


def test_homology_errors(homology_tsv, tmp_path):
    mouse = mouse_from(human_counts())
    with pytest.raises(PriorError, match="ships none"):
        homology_vocab_map(mouse, None)
    with pytest.raises(PriorError, match="not found"):
        homology_vocab_map(mouse, tmp_path / "absent.tsv")
    with pytest.raises(PriorError, match="not in the homology table"):
        homology_vocab_map(mouse, homology_tsv, species="zebrafish")
    with pytest.raises(PriorError, match="map_genes"):
        homology_vocab_map(mouse, homology_tsv, species="human")
    with pytest.raises(PriorError, match="species="):
        homology_vocab_map(mouse, homology_tsv, species="")
    bad = tmp_path / "bad.tsv"
    pd.read_csv(homology_tsv, sep="\t").rename(columns={"human_gene": "human"}).to_csv(bad, sep="\t", index=False)
    with pytest.raises(PriorError, match=r"lacks columns \['human_gene'\]"):
        homology_vocab_map(mouse, bad)
    comma = tmp_path / "comma.csv"
    pd.read_csv(homology_tsv, sep="\t").to_csv(comma, index=False)
    with pytest.raises(PriorError, match="tab-separated"):
        homology_vocab_map(mouse, comma)
    with pytest.raises(PriorError, match="'drop' or 'copy'"):
        homology_vocab_map(mouse, homology_tsv, one_to_many="first")
    with pytest.raises(PriorError, match="'sum' or 'drop'"):
        homology_vocab_map(mouse, homology_tsv, many_to_one="mean")
    with pytest.raises(PriorError, match="is it the table"):
        homology_vocab_map(AnnData(X=mouse.X, var=pd.DataFrame(index=[f"g{i}" for i in range(len(GENES))])), homology_tsv)
    with pytest.raises(PriorError, match="orthology_type column"):
        homology_vocab_map(mouse, pd.read_csv(homology_tsv, sep="\t").drop(columns="orthology_type"),
                           orthology_types="ortholog_one2one")
    with pytest.raises(PriorError, match="AnnData"):
        homology_vocab_map(mouse.X, homology_tsv)
    with pytest.raises(PriorError, match="homology_vocab_map"):
        homology_coverage_report(human_counts())


def test_read_homology_table_dedupes(homology_tsv):
    table = pd.read_csv(homology_tsv, sep="\t")
    doubled = pd.concat([table, table.assign(species_gene=" " + table["species_gene"])], ignore_index=True)
    read = read_homology_table(doubled, species="Mouse")
    assert len(read) == len(GENES)


def test_input_gene_embeddings_of_a_prior_model_read_the_prior(vocab, features):
    "evaluate.gene_embeddings(kind='input') goes through the gene-embedding module, so the prior's vectors count."
    from scfoundation.evaluate import gene_embeddings
    from scfoundation.tokenization import BinningTokenizer
    plain = small_model(vocab)
    with_prior = add_prior(small_model(vocab), features)
    with torch.no_grad():                                                   # the prior's projections start at zero
        for projection in with_prior.embedding.gene.projections.values(): projection.weight.normal_()
    for model in (plain, with_prior): model.tokenizer = BinningTokenizer(vocab)
    genes = list(vocab.genes[:5])
    expected = with_prior.embedding.gene(torch.as_tensor(vocab.ids(genes))).detach().numpy()
    np.testing.assert_allclose(gene_embeddings(with_prior, genes=genes, kind="input").to_numpy(), expected, rtol=1e-6)
    assert not np.allclose(gene_embeddings(plain, genes=genes, kind="input").to_numpy(), expected)
