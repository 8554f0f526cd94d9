"""Published models: Geneformer V1 folders written by transformers itself load into SCFModel and embed real
pbmc68k cells as the peer's own forward does (padding and truncation included), in both weight formats and
for every activation; pickles that name classes are refused; the CLI takes geneformer:DIR."""
import importlib.util
import json
import pickle
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from transformers import BertForMaskedLM

from scfoundation.data import load_pbmc68k
from scfoundation.evaluate import iter_batches
from scfoundation.genes import map_genes
from scfoundation.model import SCFModel
from scfoundation.published import (PublishedModelError, geneformer_inputs, geneformer_vocab, load_geneformer, load_model,
                                    published_kind, random_geneformer, read_dictionary, scgpt_inputs)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pbmc():
    return map_genes(load_pbmc68k()[:40])


def peer_embedding(folder, batch, source_ids, layer=-2):
    "Geneformer's extractor on our tokens: the BERT forward, the mean over each cell's tokens of hidden_states[layer]."
    bert = BertForMaskedLM.from_pretrained(folder).eval()
    ids, mask = geneformer_inputs(batch, source_ids, read_dictionary(folder.parent / "token_dictionary_random.pkl"))
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states[layer]
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def source_ids_of(root):
    tokens = read_dictionary(root / "token_dictionary_random.pkl")
    return geneformer_vocab(tokens, read_dictionary(root / "gene_median_dictionary_random.pkl"))[1]


@pytest.mark.parametrize("hidden_act, safetensors, layer", [("relu", True, -2), ("gelu", False, -2), ("gelu", True, -1)])
def test_geneformer_embeddings_equal_the_peers_forward(pbmc, tmp_path, hidden_act, safetensors, layer):
    folder = random_geneformer(tmp_path, list(pbmc.var_names), n_layers=2, max_tokens=220, hidden_act=hidden_act,
                               safetensors=safetensors, seed=3)
    model = load_geneformer(folder, embedding_layer=layer, verbose=False)
    _, batch = next(iter_batches(pbmc, model.tokenizer, batch_size=40))
    lengths = batch["attention_mask"].sum(1) - 1
    assert lengths.min() < lengths.max() == 220                       # some cells cut at 220 genes (the peer's 220 positions), others padded
    torch.testing.assert_close(model.embed(batch), peer_embedding(folder, batch, source_ids_of(tmp_path), layer), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling, layer", [("mean", -2), ("cls", -1), ("cls", -2)])
def test_geneformer_v2_with_cls_and_eos_equals_the_peers_forward(pbmc, tmp_path, pooling, layer):
    "V2: <cls>, the genes, <eos>; the extractor's mean leaves both out, its cls mode reads <cls>."
    folder = random_geneformer(tmp_path, list(pbmc.var_names), n_layers=3, max_tokens=200, version=2, seed=4)
    model = load_geneformer(folder, pooling=pooling, embedding_layer=layer, verbose=False)
    _, batch = next(iter_batches(pbmc, model.tokenizer, batch_size=40))
    real = batch["attention_mask"]
    lengths = real.sum(1)
    assert lengths.max() == 200 and lengths.min() < 200                  # cut cells (198 genes) and padded ones
    assert all(model.tokenizer.vocab.names(row[mask])[-1] == "<eos>" for row, mask in zip(batch["input_ids"], real))
    tokens = read_dictionary(tmp_path / "token_dictionary_random.pkl")
    source = torch.as_tensor(geneformer_vocab(tokens, read_dictionary(tmp_path / "gene_median_dictionary_random.pkl"))[1])
    ids, _ = geneformer_inputs(batch, source, tokens)
    bert = BertForMaskedLM.from_pretrained(folder).eval()
    with torch.no_grad(): hidden = bert(input_ids=ids, attention_mask=real.long(), output_hidden_states=True).hidden_states[layer]
    genes = real.clone(); genes[:, 0] = False; genes[torch.arange(len(genes)), lengths - 1] = False
    expected = hidden[:, 0] if pooling == "cls" else (hidden * genes[..., None]).sum(1) / genes.sum(1, keepdim=True)
    torch.testing.assert_close(model.embed(batch), expected, atol=1e-5, rtol=1e-5)


def test_jagged_attention_gives_the_same_geneformer_embedding(pbmc, tmp_path):
    folder = random_geneformer(tmp_path, list(pbmc.var_names), n_layers=2)
    model = load_geneformer(folder, verbose=False)
    _, batch = next(iter_batches(pbmc, model.tokenizer, batch_size=12))
    padded = model.embed(batch)
    model.attention = "jagged"
    torch.testing.assert_close(model.embed(batch), padded, atol=1e-5, rtol=1e-5)


def test_a_loaded_geneformer_saves_and_reloads_as_ours(pbmc, tmp_path):
    model = load_geneformer(random_geneformer(tmp_path, list(pbmc.var_names)), verbose=False)
    again = SCFModel.from_pretrained(model.save_pretrained(tmp_path / "ours"))
    _, batch = next(iter_batches(pbmc, model.tokenizer, batch_size=8))
    torch.testing.assert_close(again.embed(batch), model.embed(batch))
    assert again.tokenizer.vocab == model.tokenizer.vocab and np.allclose(again.tokenizer.medians, model.tokenizer.medians, equal_nan=True)
    assert published_kind(tmp_path / "ours") is None and published_kind(tmp_path / "model") == ("geneformer", tmp_path / "model")


def test_the_vocabulary_maps_ensembl_ids_and_reports_coverage():
    tokens = {"<pad>": 0, "<mask>": 1, "ENSG00000121410": 2, "ENSG00000175899": 3, "ENSG99999999999": 4}
    vocab, source, report = geneformer_vocab(tokens, {"ENSG00000121410": 1.5})
    assert list(vocab.genes) == ["A1BG", "A2M"] and source.tolist() == [2, 3]
    assert report["unknown to the gene table"] == 1 and report["without a median"] == 1


def test_pickles_naming_classes_are_refused_and_numpy_medians_read(tmp_path):
    path = tmp_path / "medians.pkl"
    path.write_bytes(pickle.dumps({"ENSG00000121410": np.float32(2.5), "n": [np.int64(3)]}))
    assert read_dictionary(path) == {"ENSG00000121410": 2.5, "n": [3]}

    class Attack:
        def __reduce__(self): return (subprocess.call, (["touch", str(tmp_path / "ran")],))
    path.write_bytes(pickle.dumps(Attack()))
    with pytest.raises(PublishedModelError, match="subprocess.call"): read_dictionary(path)
    assert not (tmp_path / "ran").exists()
    (tmp_path / "d.json").write_text(json.dumps({"<pad>": 0}))
    assert read_dictionary(tmp_path / "d.json") == {"<pad>": 0}
    path.write_bytes(b"not a pickle")
    with pytest.raises(PublishedModelError, match="not a readable pickle"): read_dictionary(path)


def test_bad_folders_and_dictionaries_are_named(pbmc, tmp_path):
    folder = random_geneformer(tmp_path, list(pbmc.var_names))
    (tmp_path / "token_dictionary_other.pkl").write_bytes((tmp_path / "token_dictionary_random.pkl").read_bytes())
    with pytest.raises(PublishedModelError, match="several token_dictionary files"): load_geneformer(folder)
    v2 = tmp_path / "v2.pkl"
    v2.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1, "<cls>": 2}))
    with pytest.raises(PublishedModelError, match="no <eos>"): load_geneformer(folder, v2, tmp_path / "gene_median_dictionary_random.pkl")
    with pytest.raises(PublishedModelError, match="V1 has no <cls>"):
        load_geneformer(folder, tmp_path / "token_dictionary_random.pkl", tmp_path / "gene_median_dictionary_random.pkl", pooling="cls")
    (folder / "model.safetensors").unlink()
    with pytest.raises(PublishedModelError, match="neither model.safetensors"): load_geneformer(folder, v2)
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(PublishedModelError, match="truncated or not a weights file"): load_geneformer(folder, v2)
    other = random_geneformer(tmp_path / "other", list(pbmc.var_names))
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(PublishedModelError, match="config.json lacks"): load_geneformer(other)


def test_pytorch_bins_holding_more_than_tensors_are_refused(pbmc, tmp_path):
    folder = random_geneformer(tmp_path, list(pbmc.var_names), safetensors=False)
    torch.save({"weights": torch.zeros(2), "extra": ad.AnnData(np.zeros((2, 2)))}, folder / "pytorch_model.bin")
    with pytest.raises(PublishedModelError, match="holds more than tensors"): load_model(folder)


def test_cli_embeds_and_evaluates_with_a_geneformer_folder(pbmc, tmp_path):
    folder = random_geneformer(tmp_path, list(load_pbmc68k().var_names), n_layers=2)
    out = tmp_path / "embedded.h5ad"
    scf = [sys.executable, "-m", "scfoundation"]
    result = subprocess.run([*scf, "embed", f"geneformer:{folder}", "pbmc68k", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    written = ad.read_h5ad(out)
    model = load_geneformer(folder, verbose=False)
    cells = map_genes(load_pbmc68k()[written.obs_names[:16]])
    _, batch = next(iter_batches(cells, model.tokenizer, batch_size=16))
    np.testing.assert_allclose(written.obsm["X_scf"][:16], model.embed(batch).numpy(), atol=1e-5)
    result = subprocess.run([*scf, "evaluate", "pbmc68k", "--model", str(folder)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "X_scf" in result.stdout and "X_pca_hvg" in result.stdout


# ---------------------------------------------------------------- scGPT
# scGPT's own code (pip install --no-deps scgpt==0.2.4, in the dev set-up); its package import needs torchtext, so only look for it
needs_scgpt = pytest.mark.skipif(importlib.util.find_spec("scgpt") is None, reason="needs scgpt's code: pip install --no-deps scgpt==0.2.4")


def scgpt_peer(folder, batch, source_ids):
    "scGPT's own encode_batch on our tokens: its gene ids, bins one lower, its pad value at <cls> and on padding."
    from scfoundation.published import scgpt_model_class
    args, vocab = json.loads((folder / "args.json").read_text()), json.loads((folder / "vocab.json").read_text())
    peer = scgpt_model_class()(len(vocab), args["embsize"], args["nheads"], args["d_hid"], args["nlayers"], vocab=vocab, dropout=0.0,
                               pad_token="<pad>", pad_value=-2, input_emb_style="continuous", cell_emb_style="cls")
    peer.load_state_dict(torch.load(folder / "best_model.pt", weights_only=True)); peer.eval()
    genes, values, padding = scgpt_inputs(batch, source_ids, vocab)
    with torch.no_grad():
        return peer.encode_batch(genes, values, padding, batch_size=len(genes), time_step=0, return_np=False)


@needs_scgpt
@pytest.mark.parametrize("max_len, n_layers", [(201, 2), (1200, 1)])   # some cells sampled down to 200 genes; none
def test_scgpt_embeddings_equal_its_own_encode_batch(pbmc, tmp_path, max_len, n_layers):
    from scfoundation.published import load_scgpt, random_scgpt, scgpt_vocab
    folder = random_scgpt(tmp_path / "scgpt", list(pbmc.var_names), n_layers=n_layers, max_len=max_len, seed=2)
    model = load_scgpt(folder, verbose=False)
    _, batch = next(iter_batches(pbmc, model.tokenizer, batch_size=40))
    lengths = batch["attention_mask"].sum(1) - 1
    assert lengths.min() < lengths.max() <= max_len - 1
    source = scgpt_vocab(json.loads((folder / "vocab.json").read_text()))[1]
    torch.testing.assert_close(model.embed(batch), scgpt_peer(folder, batch, source), atol=1e-5, rtol=1e-5)
    model.attention = "jagged"
    torch.testing.assert_close(model.embed(batch), scgpt_peer(folder, batch, source), atol=1e-5, rtol=1e-5)


@needs_scgpt
def test_scgpt_folders_are_checked(pbmc, tmp_path):
    from scfoundation.published import load_scgpt, random_scgpt
    folder = random_scgpt(tmp_path / "scgpt", list(pbmc.var_names))
    args = json.loads((folder / "args.json").read_text())
    (folder / "args.json").write_text(json.dumps({**args, "input_emb_style": "category"}))
    with pytest.raises(PublishedModelError, match="input_emb_style='category'"): load_scgpt(folder)
    torch.save({"weights": ad.AnnData(np.zeros((1, 1)))}, folder / "best_model.pt")
    with pytest.raises(PublishedModelError, match="not a plain state dict"): load_scgpt(folder)
    (folder / "vocab.json").unlink()
    with pytest.raises(PublishedModelError, match="vocab.json not found"): load_scgpt(folder)


@needs_scgpt
def test_cli_embeds_with_a_scgpt_folder(tmp_path):
    from scfoundation.published import load_scgpt, random_scgpt
    folder = random_scgpt(tmp_path / "scgpt", list(load_pbmc68k().var_names), max_len=300)
    out = tmp_path / "embedded.h5ad"
    result = subprocess.run([sys.executable, "-m", "scfoundation", "embed", f"scgpt:{folder}", "pbmc68k", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    written = ad.read_h5ad(out)
    model = load_scgpt(folder, verbose=False)
    _, batch = next(iter_batches(map_genes(load_pbmc68k()[written.obs_names[:16]]), model.tokenizer, batch_size=16))
    np.testing.assert_allclose(written.obsm["X_scf"][:16], model.embed(batch).numpy(), atol=1e-5)
