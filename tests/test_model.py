"""The model chapter's API: config, masking, forward/loss, padding invariance, asymmetric mode,
embeddings, checkpoints and their errors."""
import json
import math
import sys

import pytest
import torch

from scfoundation.genes import CLS_ID, MASK_ID, N_SPECIAL, PAD_ID
from scfoundation.model import (INPUT_KINDS, MASK_VALUE, ModelConfig, ModelError, SCFModel, TokenLayout, count_flops,
                                mask_batch, masked_loss, random_batch, register_extension, uniform_draws)

torch.set_num_threads(1)
KINDS = ("rank", "bins", "continuous")


def small(kind="rank", **overrides):
    return ModelConfig.named("teaching", vocab_size=300, input_kind=kind, d_model=32, n_heads=4, d_ff=64,
                             max_len=256, **overrides)


def masked(config, lengths=(20, 7, 1), seed=0, **kwargs):
    return mask_batch(random_batch(config, list(lengths), seed=seed), config, seed=seed, **kwargs)


def clone(batch):
    return {key: value.clone() for key, value in batch.items()}


def rows(batch, index, width=None):
    "Cells `index` (a slice or a list) of a batch, cut to `width` positions (per-cell tensors such as cell_ids stay whole)."
    return {key: value[index] if value.dim() == 1 or key == "depth" else value[index, :width] for key, value in batch.items()}


def padded(batch, extra):
    "The same cells with `extra` more padding positions (zeros / False: what collate pads with)."
    return {key: value if value.dim() == 1 or key == "depth" else
            torch.cat([value, value.new_zeros(value.shape[0], extra)], dim=1) for key, value in batch.items()}


# ---------------------------------------------------------------- config
def test_config_json_round_trip(tmp_path):
    config = small("bins", asymmetric=True, vocab_version="abc", tokenizer={"kind": "bins", "n_bins": 51})
    assert ModelConfig.from_json(config.to_json()) == config
    config.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == config
    assert json.loads(config.to_json()) == config.to_dict()


def test_named_configs():
    geneformer = ModelConfig.named("geneformer-6l")
    assert (geneformer.n_layers, geneformer.d_model, geneformer.n_heads, geneformer.d_ff) == (6, 256, 4, 512)
    assert 20_000 < geneformer.vocab_size < 30_000 and geneformer.max_len == 2048 and geneformer.activation == "relu"
    assert isinstance(SCFModel(small(activation="relu")).encoder.blocks[0].feed_forward[1], torch.nn.ReLU)
    assert ModelConfig.named("teaching", vocab_size=1234).vocab_size == 1234
    with pytest.raises(ModelError, match="teaching"): ModelConfig.named("gigantic")


@pytest.mark.parametrize("bad, words", [(dict(input_kind="words"), "input_kind"), (dict(pooling="max"), "pooling"),
                                        (dict(d_model=30, n_heads=4), "multiple of n_heads"),
                                        (dict(dropout=1.5), "dropout"), (dict(activation="tanh"), "activation"), (dict(vocab_size=2), "vocab_size")])
def test_config_rejects_bad_values(bad, words):
    with pytest.raises(ModelError, match=words): ModelConfig(**bad)


def test_config_from_json_errors():
    with pytest.raises(ModelError, match="unknown keys.*colour"): ModelConfig.from_json('{"colour": 1}')
    with pytest.raises(ModelError, match="not valid JSON"): ModelConfig.from_json('{"d_model": ')


# ---------------------------------------------------------------- masking
@pytest.mark.parametrize("kind", KINDS)
def test_mask_never_touches_cls_or_padding(kind):
    config = small(kind)
    batch = random_batch(config, [50, 10, 2, 1], seed=1)
    original = clone(batch)
    out = mask_batch(batch, config, mask_prob=0.5, seed=0)
    positions = out["mask_positions"]
    assert positions.dtype == torch.bool and positions.shape == batch["input_ids"].shape
    assert not positions[:, 0].any() and not (positions & ~batch["attention_mask"]).any()
    assert (positions.sum(1) >= 1).all()
    for key in original: assert torch.equal(batch[key], original[key]), f"mask_batch changed the input's {key}"
    if kind == "rank":
        assert (out["input_ids"][positions] == MASK_ID).all() and torch.equal(out["labels"], original["input_ids"])
        assert torch.equal(out["input_ids"][~positions], original["input_ids"][~positions])
    if kind == "bins":
        assert (out["value_ids"][positions] == config.n_bins + 1).all()
        assert torch.equal(out["input_ids"], original["input_ids"])
    if kind == "continuous":
        assert (out["values"][positions] == MASK_VALUE).all() and torch.equal(out["labels"], original["values"])


def test_mask_is_seeded_and_has_the_right_rate():
    config = small()
    batch = random_batch(config, [200] * 32, seed=3)
    first = mask_batch(batch, config, seed=5)["mask_positions"]
    again = mask_batch(batch, config, seed=5)["mask_positions"]
    other = mask_batch(batch, config, seed=6)["mask_positions"]
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert abs(first.float().sum().item() / (32 * 200) - 0.15) < 0.015


def test_bert_style_masking():
    config = small()
    batch = random_batch(config, [200] * 32, seed=3)
    out = mask_batch(batch, config, mask_prob=0.3, seed=0, bert_style=True)
    at_masked = out["input_ids"][out["mask_positions"]]
    share_mask = (at_masked == MASK_ID).float().mean().item()
    share_same = (at_masked == out["labels"][out["mask_positions"]]).float().mean().item()
    assert 0.75 < share_mask < 0.85 and 0.07 < share_same < 0.14
    assert (at_masked != CLS_ID).all() and (at_masked != PAD_ID).all()


@pytest.mark.parametrize("kind, bert_style", [(kind, False) for kind in KINDS] + [("rank", True)])
def test_mask_depends_on_seed_cell_id_and_position_only(kind, bert_style):
    "A cell's mask is the same alone, in another batch order, or padded wider: nothing but (seed, cell id, position) draws it."
    config = small(kind)
    batch = random_batch(config, [40, 12, 25], seed=4)
    batch["cell_ids"] = torch.tensor([70, 11, 5])
    target = config.kind.target_key
    mask = lambda b, seed=3: mask_batch(b, config, 0.3, seed=seed, bert_style=bert_style)
    lengths = batch["attention_mask"].sum(1).tolist()
    def same_cell(got, got_row, row):
        for key in ("mask_positions", "labels", target):
            assert torch.equal(got[key][got_row, :lengths[row]], whole[key][row, :lengths[row]]), (key, row)
    whole = mask(batch)
    for row in range(3): same_cell(mask(rows(batch, [row], lengths[row])), 0, row)            # alone, unpadded
    reordered = mask(rows(batch, [2, 0, 1]))
    for got_row, row in enumerate([2, 0, 1]): same_cell(reordered, got_row, row)
    wider = mask(padded(batch, 9))
    for row in range(3): same_cell(wider, row, row)
    assert not wider["mask_positions"][:, -9:].any()
    assert not torch.equal(mask(batch, seed=4)["mask_positions"], whole["mask_positions"])       # another seed
    renamed = mask(dict(batch, cell_ids=torch.tensor([71, 11, 5])))                              # another cell id
    assert not torch.equal(renamed["mask_positions"][0], whole["mask_positions"][0])
    assert torch.equal(renamed["mask_positions"][1:], whole["mask_positions"][1:])
    plain = {key: value for key, value in batch.items() if key != "cell_ids"}                   # no ids: cells 0 … B-1
    assert torch.equal(mask(plain)["mask_positions"], mask(dict(batch, cell_ids=torch.arange(3)))["mask_positions"])
    draws = uniform_draws(batch, seed=3)
    assert draws.shape == batch["attention_mask"].shape and 0 <= draws.min() and draws.max() < 1
    assert not torch.equal(uniform_draws(batch, seed=3, stream=1), draws)


@pytest.mark.parametrize("name", list(INPUT_KINDS))
def test_input_kind_row_gives_head_size_loss_and_mask_value(name):
    config = small(name, n_bins=11)
    kind = config.kind
    assert kind is INPUT_KINDS[name] and kind.name == name
    model = SCFModel(config).eval()
    assert model.head.out_features == kind.head_size(config)
    assert type(model.embedding.expression) is type(kind.expression(config))
    plain = random_batch(config, [30, 12], seed=1)
    assert set(kind.batch_keys) <= set(plain)
    batch = mask_batch(plain, config, seed=2)
    positions = batch["mask_positions"]
    assert (batch[kind.target_key][positions] == kind.mask_value(config)).all()
    assert torch.equal(batch["labels"], plain[kind.target_key])
    for key in set(kind.batch_keys) - {kind.target_key}: assert torch.equal(batch[key], plain[key]), key
    out = model(batch)
    predictions = model.head(out["hidden"][positions])
    torch.testing.assert_close(out["loss"], kind.loss(predictions.float(), batch["labels"][positions]))
    torch.testing.assert_close(masked_loss(predictions, batch["labels"][positions], name), out["loss"])
    flops = count_flops(config, batch)
    assert flops["head"] == 2 * int(positions.sum()) * config.output_dim * kind.head_size(config)
    for key in kind.batch_keys:
        if key != "attention_mask":
            with pytest.raises(ModelError, match=key): model({k: v for k, v in plain.items() if k != key})


@pytest.mark.parametrize("name", list(INPUT_KINDS))
def test_the_model_reads_its_input_kind_row(name, monkeypatch):
    "Change a row of INPUT_KINDS: the head, the mask value and the loss follow (nothing branches on the kind's name)."
    import dataclasses
    import scfoundation.model as model_module
    row = INPUT_KINDS[name]
    new_mask = {"rank": CLS_ID, "bins": 1, "continuous": -2.0}[name]
    width = row.head_size(small(name))
    changed = dataclasses.replace(row, head_size=lambda config: width + 3, mask_value=lambda config: new_mask,
                                  loss=lambda predictions, targets: 2 * row.loss(predictions[:, :width], targets))
    monkeypatch.setitem(model_module.INPUT_KINDS, name, changed)
    config = small(name)
    model = SCFModel(config).eval()
    assert model.head.out_features == width + 3
    batch = mask_batch(random_batch(config, [30, 12], seed=1), config, seed=2)
    positions = batch["mask_positions"]
    assert (batch[row.target_key][positions] == new_mask).all()
    predictions = model.head(model(batch)["hidden"][positions]).float()
    torch.testing.assert_close(model(batch)["loss"], 2 * row.loss(predictions[:, :width], batch["labels"][positions]))


def test_mask_batch_bad_input():
    config = small("bins")
    batch = random_batch(small(), [5, 3])
    with pytest.raises(ModelError, match="value_ids"): mask_batch(batch, config)
    with pytest.raises(ModelError, match="mask_prob"): mask_batch(random_batch(config, [5]), config, mask_prob=1.5)


# ---------------------------------------------------------------- forward and loss
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("asymmetric", [False, True])
def test_forward_shapes_and_backward(kind, asymmetric):
    config = small(kind, asymmetric=asymmetric, decoder_d_model=32)
    batch = masked(config)
    model = SCFModel(config)
    out = model(batch)
    width = config.decoder_d_model if asymmetric else config.d_model
    assert out["hidden"].shape == (3, 21, width) and out["cell_embedding"].shape == (3, config.d_model)
    assert out["n_masked"] == int(batch["mask_positions"].sum())
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert (out["hidden"][~batch["attention_mask"]] == 0).all()
    out["loss"].backward()
    assert model.embedding.gene.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_no_loss_without_masks():
    config = small()
    out = SCFModel(config)(random_batch(config, [4, 2]))
    assert "loss" not in out and out["cell_embedding"].shape == (2, 32)


def test_initial_rank_loss_is_near_uniform():
    config = small()
    loss = SCFModel(config)(masked(config, lengths=[100] * 8))["loss"].item()
    assert abs(loss - math.log(config.vocab_size)) < 0.3


@pytest.mark.parametrize("kind", KINDS)
def test_loss_reads_only_masked_positions(kind):
    config = small(kind)
    model = SCFModel(config).eval()
    batch = masked(config)
    changed = dict(batch, labels=batch["labels"].masked_fill(~batch["mask_positions"], 3))
    assert torch.equal(model(changed)["loss"], model(batch)["loss"])
    moved = clone(batch)
    moved["labels"][batch["mask_positions"]] = 5 if kind != "continuous" else 9.0
    assert not torch.equal(model(moved)["loss"], model(batch)["loss"])


def test_head_runs_only_on_masked_positions():
    config = small()
    model = SCFModel(config)
    seen = []
    model.head.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    batch = masked(config)
    model(batch)
    assert seen == [int(batch["mask_positions"].sum())]


def test_rejects_masks_on_cls_or_padding():
    config = small()
    batch = masked(config)
    bad = dict(batch, mask_positions=batch["mask_positions"].clone())
    bad["mask_positions"][:, 0] = True
    with pytest.raises(ModelError, match="mask_batch"): SCFModel(config)(bad)


@pytest.mark.parametrize("problem, words", [("too_long", "max_len"), ("vocab", "vocab_size"), ("negative", "vocab_size"), ("no_cls", "<cls>"),
                                            ("mask_dtype", "bool")])
def test_forward_bad_batches(problem, words):
    config = small()
    batch = random_batch(config, [10, 4])
    if problem == "too_long": batch = random_batch(config, [config.max_len])
    if problem == "vocab": batch["input_ids"][0, 1] = config.vocab_size + 5
    if problem == "negative": batch["input_ids"][1, 2] = -3
    if problem == "no_cls": batch["attention_mask"][1, 0] = False
    if problem == "mask_dtype": batch["attention_mask"] = batch["attention_mask"].long()
    with pytest.raises(ModelError, match=words): SCFModel(config)(batch)


# ---------------------------------------------------------------- padding invariance and embeddings
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_invariance(kind, pooling):
    config = small(kind, pooling=pooling)
    model = SCFModel(config).eval()
    batch = random_batch(config, [30, 6], seed=2)
    alone = rows(batch, slice(1, 2), 7)
    padded = model.embed(batch)[1]
    assert torch.allclose(model.embed(alone)[0], padded, atol=1e-5)
    hidden = model(batch)["hidden"][1, :7]
    assert torch.allclose(model(alone)["hidden"][0], hidden, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(kind="rank"), dict(kind="bins"), dict(kind="continuous"),
                                       dict(kind="rank", asymmetric=True), dict(kind="rank", pooling="mean")])
def test_embed_shortcut_equals_the_full_forward(overrides):
    "embed() runs the last layer at <cls> only; the embedding is the full forward's, padding and all."
    torch.manual_seed(0)
    config = small(**overrides)
    model = SCFModel(config).eval()
    batch = random_batch(config, [40, 3, 17, 1], seed=1)
    with torch.no_grad(): full = model(batch)["cell_embedding"]
    torch.testing.assert_close(model.embed(batch), full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- attention backends
@pytest.mark.parametrize("overrides", [dict(kind="rank"), dict(kind="bins"), dict(kind="continuous"),
                                       dict(kind="rank", asymmetric=True, decoder_d_model=32)])
def test_jagged_attention_equals_padded_in_loss_gradients_and_embeddings(overrides):
    "The jagged backend (nested tensors, no padding) computes exactly what the padded grid does, backward included."
    torch.manual_seed(0)
    config = small(**overrides)
    batch = masked(config, lengths=(40, 3, 17, 1))
    results = {}
    for backend in ("padded", "jagged"):
        torch.manual_seed(0)
        model = SCFModel(config).eval()
        model.attention = backend
        model(batch)["loss"].backward()
        results[backend] = (model(batch)["loss"].detach(), {name: p.grad for name, p in model.named_parameters()}, model.embed(batch))
    (loss, grads, embedding), (jagged_loss, jagged_grads, jagged_embedding) = results["padded"], results["jagged"]
    torch.testing.assert_close(jagged_loss, loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(jagged_embedding, embedding, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(jagged_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_attention_backend_is_checked_and_auto_is_padded_on_cpu():
    model = SCFModel(small())
    assert model.attention == "auto"
    keep = torch.tensor([[True, True, True], [True, False, False]])
    assert not TokenLayout.from_keep(keep, "auto").jagged and TokenLayout.from_keep(keep, "jagged").jagged
    with pytest.raises(ModelError, match="use one of"): model.attention = "flash"
    assert model.attention == "auto"
    with pytest.raises(ValueError, match="use one of"): TokenLayout.from_keep(keep, "nested")


def test_embed_shortcut_in_bf16():
    torch.manual_seed(0)
    config = small()
    model = SCFModel(config).eval()
    batch = random_batch(config, [60, 12], seed=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16): full = model(batch)["cell_embedding"].float()
    with torch.autocast("cpu", dtype=torch.bfloat16): fast = model.embed(batch)
    torch.testing.assert_close(fast, full, atol=5e-2, rtol=5e-2)


def test_embed_keeps_mode_and_needs_no_grad():
    config = small(dropout=0.1)
    model = SCFModel(config).train()
    batch = masked(config)
    embedding = model.embed(batch)
    assert model.training and not embedding.requires_grad and embedding.shape == (3, 32)
    assert torch.equal(embedding, model.embed(batch))          # eval mode: no dropout


def test_mean_pooling_differs_from_cls():
    cls_model = SCFModel(small(pooling="cls")).eval()
    mean_model = SCFModel(small(pooling="mean")).eval()
    mean_model.load_state_dict(cls_model.state_dict())
    batch = random_batch(small(), [10, 5])
    assert not torch.allclose(cls_model.embed(batch), mean_model.embed(batch))


def test_token_layout_round_trip():
    keep = torch.tensor([[True, False, True, True], [True, True, False, False], [True, False, False, False]])
    layout = TokenLayout.from_keep(keep)
    rows = torch.randn(int(keep.sum()), 3)
    grid = layout.to_grid(rows)
    assert grid.shape == (3, 3, 3) and torch.equal(layout.from_grid(grid), rows)
    assert grid[2, 1:].abs().sum() == 0 and layout.key_mask[:, 0, 0].tolist() == [[True, True, True], [True, True, False], [True, False, False]]
    assert TokenLayout.from_keep(torch.ones(2, 5, dtype=torch.bool)).key_mask is None


# ---------------------------------------------------------------- asymmetric mode
def test_asymmetric_encoder_sees_only_expressed_unmasked_genes():
    config = small("continuous", asymmetric=True, decoder_d_model=32)
    model = SCFModel(config)
    batch = masked(config, lengths=[60, 40])
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    model(batch)
    visible = batch["expressed_mask"] & ~batch["mask_positions"]
    assert seen == [int(visible.sum()) + 2]                   # + one <cls> per cell


def test_asymmetric_saves_compute():
    symmetric = small("continuous")
    asymmetric = small("continuous", asymmetric=True, decoder_d_model=32, decoder_layers=1)
    symmetric = ModelConfig(**{**symmetric.to_dict(), "n_layers": 4})
    asymmetric = ModelConfig(**{**asymmetric.to_dict(), "n_layers": 4})
    batch = mask_batch(random_batch(symmetric, [250] * 4, seed=0, zero_fraction=0.8), symmetric, seed=0)
    full, light = count_flops(symmetric, batch), count_flops(asymmetric, batch)
    assert light["encoder"] < 0.3 * full["encoder"] and light["total"] < 0.5 * full["total"]
    assert light["decoder"] > 0 and full["decoder"] == 0
    assert count_flops(symmetric, batch, training=False)["total"] * 3 == pytest.approx(full["total"])


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tmp_path, kind):
    config = small(kind, asymmetric=kind == "continuous", vocab_version="v1", tokenizer={"name": kind})
    model = SCFModel(config).eval()
    batch = masked(config)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(path.name for path in (tmp_path / "ckpt").iterdir()) == ["checksums.json", "config.json", "model.safetensors"]
    loaded = SCFModel.from_pretrained(tmp_path / "ckpt", vocab="v1")
    assert loaded.config == config and not loaded.training
    assert torch.equal(loaded(batch)["loss"], model(batch)["loss"])
    assert torch.equal(loaded.embed(batch), model.embed(batch))
    assert loaded.num_parameters() == model.num_parameters() > 0


def tokenized_model(kind, vocab, adata):
    "A tiny model of `kind` with its tokenizer, as pretrain leaves it."
    from scfoundation.tokenization import compute_gene_medians, tokenizer_for
    tokenizer = tokenizer_for(kind, vocab, 64, n_bins=11, gene_medians=lambda: compute_gene_medians(adata, vocab))
    config = ModelConfig(vocab_size=len(vocab), input_kind=kind, n_bins=11, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                         max_len=64, vocab_version=tokenizer.vocab.version, tokenizer=tokenizer.to_dict())
    torch.manual_seed(0)
    model = SCFModel(config).eval()
    model.tokenizer = tokenizer
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trips_the_tokenizer(tmp_path, kind):
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp
    from scfoundation.genes import Vocab
    from scfoundation.tokenization import collate
    genes = [f"G{i}" for i in range(40)]
    counts = np.random.default_rng(0).poisson(1.5, (12, 40)).astype(np.float32) + np.eye(12, 40, dtype=np.float32)
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = genes
    model = tokenized_model(kind, Vocab.from_genes(genes), adata)
    model.save_pretrained(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checksums.json", "config.json", "model.safetensors", "vocab.json"]
    loaded = SCFModel.from_pretrained(tmp_path)
    assert type(loaded.tokenizer) is type(model.tokenizer) and loaded.tokenizer.to_dict() == model.tokenizer.to_dict()
    assert loaded.tokenizer.vocab == model.tokenizer.vocab                      # medians included (rank)
    batch = collate(model.tokenizer.tokenize_adata(adata))
    again = collate(loaded.tokenizer.tokenize_adata(adata))
    assert all(torch.equal(again[key], batch[key]) for key in batch)
    torch.testing.assert_close(loaded.embed(again), model.embed(batch))
    Vocab.from_genes(genes[:30]).save(tmp_path / "vocab.json")                  # another model's vocabulary
    with pytest.raises(ModelError, match="vocab.json in .* do not match checksums.json"): SCFModel.from_pretrained(tmp_path)
    (tmp_path / "checksums.json").unlink()                                       # a folder without checksums: the version says it
    with pytest.raises(ModelError, match="vocab.json has version .* save the model and its vocabulary together"):
        SCFModel.from_pretrained(tmp_path)


def test_checkpoint_errors(tmp_path):
    config = small(vocab_version="v1")
    SCFModel(config).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="vocabulary version"): SCFModel.from_pretrained(tmp_path, vocab="v2")

    class FakeVocab: version = "v2"
    with pytest.raises(ModelError, match="vocabulary version"): SCFModel.from_pretrained(tmp_path, vocab=FakeVocab())
    with pytest.raises(FileNotFoundError, match="save_pretrained"): SCFModel.from_pretrained(tmp_path / "missing")

    (tmp_path / "checksums.json").unlink()                  # the checks below, for folders without checksums (older versions)
    wider = json.loads((tmp_path / "config.json").read_text()); wider["d_ff"] = 128
    (tmp_path / "config.json").write_text(json.dumps(wider))
    with pytest.raises(ModelError, match=r"shape mismatch for encoder\.blocks\.0\.feed_forward"): SCFModel.from_pretrained(tmp_path)

    deeper = dict(wider, d_ff=64, n_layers=3)
    (tmp_path / "config.json").write_text(json.dumps(deeper))
    with pytest.raises(ModelError, match="missing weights"): SCFModel.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(dict(deeper, n_layers=2)))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelError, match="corrupt or truncated"): SCFModel.from_pretrained(tmp_path)
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelError, match="corrupt or truncated"): SCFModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ModelError, match="not valid JSON"): SCFModel.from_pretrained(tmp_path)


def test_save_is_atomic_and_overwrites(tmp_path):
    config = small()
    first, second = SCFModel(config), SCFModel(config)
    torch.nn.init.ones_(second.head.bias)
    first.save_pretrained(tmp_path); second.save_pretrained(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checksums.json", "config.json", "model.safetensors"]
    assert torch.equal(SCFModel.from_pretrained(tmp_path).head.bias, second.head.bias)


# ---------------------------------------------------------------- extensions of the pretrained folder
TOY_MODULE = """
import torch
from scfoundation.model import register_extension

def describe(model): return {"width": model.toy_scale.numel()} if hasattr(model, "toy_scale") else None
def rebuild(model, header, directory): model.toy_scale = torch.nn.Parameter(torch.ones(header["width"]))
register_extension("toy_scale.json", describe, rebuild)
"""


@pytest.fixture
def registry(tmp_path, monkeypatch):
    "The model module with private copies of its extension registries, and an importable toy_scale_module."
    from scfoundation import model as model_module
    (tmp_path / "toy_scale_module.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(model_module, "PRETRAINED_EXTENSIONS", dict(model_module.PRETRAINED_EXTENSIONS))
    monkeypatch.setattr(model_module, "EXTENSION_MODULES", {**model_module.EXTENSION_MODULES, "toy_scale.json": "toy_scale_module"})
    yield model_module
    sys.modules.pop("toy_scale_module", None)


def test_extension_is_written_and_its_module_imported_on_demand(tmp_path, registry):
    import toy_scale_module  # noqa: F401  (registers toy_scale.json)
    model = SCFModel(small())
    model.toy_scale = torch.nn.Parameter(torch.full((3,), 2.0))
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "toy_scale.json").read_text()) == {"width": 3}
    del registry.PRETRAINED_EXTENSIONS["toy_scale.json"], sys.modules["toy_scale_module"]   # a fresh process
    loaded = SCFModel.from_pretrained(tmp_path / "m")
    assert "toy_scale_module" in sys.modules and loaded.toy_scale.tolist() == [2.0, 2.0, 2.0]
    SCFModel(small()).save_pretrained(tmp_path / "m")                 # a model without the part
    assert sorted(path.name for path in (tmp_path / "m").iterdir()) == ["checksums.json", "config.json", "model.safetensors"]


def test_extension_errors(tmp_path, registry):
    SCFModel(small()).save_pretrained(tmp_path)
    registry.EXTENSION_MODULES["missing.json"] = "no_such_module_here"
    (tmp_path / "missing.json").write_text("{}")
    with pytest.raises(ModelError, match="no_such_module_here.*install or upgrade"): SCFModel.from_pretrained(tmp_path)
    registry.EXTENSION_MODULES["missing.json"] = "json"                # imports, registers nothing
    with pytest.raises(ModelError, match="registered none"): SCFModel.from_pretrained(tmp_path)
    (tmp_path / "missing.json").unlink()
    (tmp_path / "toy_scale.json").write_text("{not json")
    with pytest.raises(ModelError, match="toy_scale.json is not valid JSON"): SCFModel.from_pretrained(tmp_path)
    for bad in ("config.json", "sub/x.json", "x.txt"):
        with pytest.raises(ModelError, match="plain"): register_extension(bad, None, None)


def test_failing_extension_leaves_the_folder_as_it_was(tmp_path, registry):
    SCFModel(small()).save_pretrained(tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    def fails(model): raise RuntimeError("cannot describe")
    register_extension("broken.json", fails, None)
    with pytest.raises(RuntimeError, match="cannot describe"): SCFModel(small(n_layers=1)).save_pretrained(tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_training_reduces_the_loss():
    config = small()
    torch.manual_seed(0)
    model = SCFModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = masked(config, lengths=[40] * 8)
    losses = []
    for _ in range(30):
        loss = model(batch)["loss"]
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_autocast_runs():
    config = small()
    model = SCFModel(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(masked(config))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()


@pytest.mark.parametrize("kind", KINDS)
def test_real_collate_batches(kind):
    "The model reads the batches of scfoundation.tokenization.collate on cells of the default data."
    tokenization = pytest.importorskip("scfoundation.tokenization")
    genes = pytest.importorskip("scfoundation.genes")
    from scfoundation.data import load_pbmc68k
    adata = genes.map_genes(load_pbmc68k()[:8].copy())
    vocab = genes.Vocab.from_adata(adata)
    tokenizer = {"rank": lambda: tokenization.RankValueTokenizer(vocab.with_medians(tokenization.compute_gene_medians(adata, vocab)), max_length=128),
                 "bins": lambda: tokenization.BinningTokenizer(vocab, max_length=128, n_bins=51),
                 "continuous": lambda: tokenization.ContinuousTokenizer(vocab, max_length=128)}[kind]()
    batch = tokenization.collate(tokenizer.tokenize_adata(adata))
    config = ModelConfig.named("teaching", vocab_size=len(vocab), input_kind=kind, n_bins=51, max_len=128, d_model=32,
                               d_ff=64, asymmetric=kind == "continuous", decoder_d_model=32, vocab_version=vocab.version)
    out = SCFModel(config)(mask_batch(batch, config, seed=0))
    assert torch.isfinite(out["loss"]) and out["cell_embedding"].shape == (8, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_cells_without_genes(kind):
    "A cell of only <cls> gets no mask, a finite embedding, and a batch of such cells a zero loss."
    config = small(kind, pooling="mean")
    batch = mask_batch(random_batch(config, [0, 0]), config, seed=0)
    assert not batch["mask_positions"].any()
    out = SCFModel(config)(batch)
    assert out["n_masked"] == 0 and out["loss"].item() == 0 and torch.isfinite(out["cell_embedding"]).all()
    mixed = mask_batch(random_batch(config, [6, 0]), config, seed=0)
    assert mixed["mask_positions"][0].any() and not mixed["mask_positions"][1].any()
    assert torch.isfinite(SCFModel(config)(mixed)["loss"])


def test_embed_takes_the_full_path_when_the_last_block_is_watched():
    "A hook on the last block (e.g. an attention recorder) sees every token, and the embedding is unchanged."
    config = small()
    model = SCFModel(config).eval()
    batch = random_batch(config, [30, 9], seed=3)
    fast = model.embed(batch)
    rows = []
    handle = model.encoder.blocks[-1].feed_forward.register_forward_hook(lambda module, inputs, output: rows.append(len(output)))
    try: watched = model.embed(batch)
    finally: handle.remove()
    assert rows == [int(batch["attention_mask"].sum())]
    torch.testing.assert_close(watched, fast, atol=1e-5, rtol=1e-5)


def test_checksums_catch_damage_safetensors_does_not(tmp_path):
    "Issue 18, case 5: flipped bytes inside the tensor data loaded silently; checksums.json now names the damaged file."
    model = SCFModel(small()).eval()
    model.save_pretrained(tmp_path)
    recorded = json.loads((tmp_path / "checksums.json").read_text())
    assert recorded["format"] == "scf-checksums-1" and sorted(recorded["sha256"]) == ["config.json", "model.safetensors"]
    weights = tmp_path / "model.safetensors"
    damaged = bytearray(weights.read_bytes()); damaged[-4] ^= 0x7F; weights.write_bytes(bytes(damaged))
    with pytest.raises(ModelError, match="model.safetensors in .* do not match checksums.json"):
        SCFModel.from_pretrained(tmp_path)
    (tmp_path / "checksums.json").unlink()                              # without checksums the damage loads as numbers
    loaded = SCFModel.from_pretrained(tmp_path).state_dict()
    assert any(not torch.equal(loaded[key], value) for key, value in model.state_dict().items())
    (tmp_path / "checksums.json").write_text("{not json")
    with pytest.raises(ModelError, match="not a readable checksum file"): SCFModel.from_pretrained(tmp_path)
