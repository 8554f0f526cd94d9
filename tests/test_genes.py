"""Tests of scfoundation.genes: the gene table, ID mapping, coverage and the vocabulary."""
import json
import warnings

import anndata
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scfoundation.data import DataError
from scfoundation.genes import (CLS_ID, MASK_ID, PAD_ID, SPECIAL_TOKENS, VOCAB_FORMAT_VERSION, GeneError, Vocab,
                                coverage_report, gene_table, gene_version_of, map_genes, match_gene_ids, versions_fit,
                                plot_gene_matches)


def make_adata(ids, counts=None, seed=0, sparse=True):
    "Small AnnData with the given gene ids and random integer counts."
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, size=(6, len(ids))).astype(np.float32) if counts is None else counts
    X = sp.csr_matrix(counts) if sparse else np.asarray(counts)
    obs = pd.DataFrame({"batch": list("aabbcc")[: counts.shape[0]]},
                       index=[f"cell{i}" for i in range(counts.shape[0])])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=list(ids)))


def snapshot(adata):
    "What must stay the same in an input AnnData."
    X = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    return X.copy(), list(adata.var_names), adata.var.copy(), adata.obs.copy(), dict(adata.uns)


def assert_unchanged(adata, before):
    X, var_names, var, obs, uns = before
    now = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    np.testing.assert_array_equal(now, X)
    assert list(adata.var_names) == var_names
    pd.testing.assert_frame_equal(adata.var, var)
    pd.testing.assert_frame_equal(adata.obs, obs)
    assert dict(adata.uns) == uns


# ---------------------------------------------------------------- gene table
def test_gene_table_shape_and_unique_tokens():
    table = gene_table()
    assert len(table) == 77_614
    assert table["token"].is_unique and table["entrez_id"].is_unique
    assert {"entrez_id", "symbol", "ensembl_ids", "aliases", "gene_type"} <= set(table.columns)
    duplicated = table[table["symbol"].duplicated(keep=False) & (table["chromosome"] != "MT")]
    for _, group in duplicated.groupby("symbol"):
        plain = group[group["token"] == group["symbol"]]
        assert len(plain) == 1  # exactly one gene keeps the plain symbol
        ranked = group.assign(nc=group["gene_type"] != "protein-coding").sort_values(["nc", "entrez_id"])
        assert plain.index[0] == ranked.index[0]
        others = group.drop(index=plain.index)
        assert (others["token"] == others["symbol"] + "_" + others["entrez_id"].astype(str)).all()


def test_gene_table_is_a_copy():
    table = gene_table()
    table.loc[table.index[0], "token"] = "CHANGED"
    assert gene_table()["token"].iloc[0] != "CHANGED"


def test_mitochondrial_tokens_use_hgnc_names():
    table = gene_table()
    mito = table[table["chromosome"] == "MT"]
    assert len(mito) == 37 and mito["token"].str.startswith("MT-").all()
    assert {"MT-ND1", "MT-CO1", "MT-CYB", "MT-ATP6", "MT-RNR2"} <= set(mito["token"])


# ---------------------------------------------------------------- matching
@pytest.mark.parametrize("identifier, kind", [
    ("TP53", "symbol"), ("tp53", "symbol"), ("Tp53 ", "symbol"), ("P53", "alias"),
    ("ENSG00000141510", "ensembl"), ("ENSG00000141510.12", "ensembl"), ("ensg00000141510.3", "ensembl"),
    ("7157", "entrez")])
def test_match_each_kind_of_id(identifier, kind):
    row = match_gene_ids([identifier]).iloc[0]
    assert (row["token"], row["entrez_id"], row["match"]) == ("TP53", 7157, kind)


def test_outdated_symbols_map_to_current():
    matched = match_gene_ids(["MARCH1", "SEPT7", "FAM65B", "ND3", "MT-ND3"])
    assert matched["token"].tolist() == ["MARCHF1", "SEPTIN7", "RIPOR2", "MT-ND3", "MT-ND3"]


def test_official_symbol_beats_alias_of_other_gene():
    table = gene_table()
    aliases = table.assign(alias=table["aliases"].str.split(";")).explode("alias")
    clash = aliases[(aliases["alias"] != aliases["symbol"]) & aliases["alias"].isin(table["symbol"])]
    assert len(clash) > 0
    name = clash["alias"].iloc[0]
    owner = table.loc[(table["symbol"] == name)].sort_values("entrez_id")
    assert match_gene_ids([name])["match"].iloc[0] == "symbol"
    assert match_gene_ids([name])["entrez_id"].iloc[0] in set(owner["entrez_id"])


def test_ambiguous_alias_is_not_used():
    table = gene_table()
    aliases = table.assign(alias=table["aliases"].str.split(";")).explode("alias")
    aliases = aliases[~aliases["alias"].str.upper().isin(table["symbol"].str.upper())]
    counts = aliases.groupby(aliases["alias"].str.upper())["entrez_id"].nunique()
    name = counts[counts > 1].index[0]
    row = match_gene_ids([name]).iloc[0]
    assert row["match"] == "ambiguous alias" and pd.isna(row["entrez_id"])


def test_explicit_id_type_and_bad_id_type():
    assert match_gene_ids(["7157"], id_type="symbol")["match"].iloc[0] == "unmapped"
    assert match_gene_ids(["TP53"], id_type="ensembl")["match"].iloc[0] == "unmapped"
    assert match_gene_ids(["7157"], id_type="entrez")["token"].iloc[0] == "TP53"
    with pytest.raises(GeneError, match="id_type"):
        match_gene_ids(["TP53"], id_type="hgnc")


def test_match_keeps_order_and_repeats():
    ids = ["CD3E", "x", "CD3E", "7157"]
    matched = match_gene_ids(ids)
    assert matched["input_id"].tolist() == ids
    assert matched["token"].tolist()[::2] == ["CD3E", "CD3E"]


# ---------------------------------------------------------------- map_genes
def test_map_mixed_ids_sums_duplicates_with_warning():
    ids = ["TP53", "ENSG00000141510.12", "cd3e", "916", "MS4A1", "not_a_gene"]
    adata = make_adata(ids)
    before = snapshot(adata)
    with pytest.warns(UserWarning, match="summed") as record:
        mapped = map_genes(adata)
    assert "TP53" in str(record[0].message) and "CD3E" in str(record[0].message)
    X = before[0]
    assert mapped.var_names.tolist() == ["TP53", "CD3E", "MS4A1"]
    np.testing.assert_array_equal(mapped.X.toarray(),
                                  np.stack([X[:, 0] + X[:, 1], X[:, 2] + X[:, 3], X[:, 4]], axis=1))
    assert sp.isspmatrix_csr(mapped.X)
    assert mapped.var["entrez_id"].tolist() == [7157, 916, 931]
    assert mapped.var.loc["CD3E", "input_id"] == "cd3e;916"
    coverage = mapped.uns["scf_gene_coverage"]
    assert coverage["genes"] == pytest.approx(5 / 6)
    assert coverage["counts"] == pytest.approx(1 - X[:, 5].sum() / X.sum())
    assert coverage["n_summed"] == 2 and coverage["by_match"]["unmapped"] == 1
    assert_unchanged(adata, before)
    pd.testing.assert_frame_equal(mapped.obs, adata.obs)


def test_map_without_duplicates_does_not_warn_and_keeps_values():
    adata = make_adata(["CD3E", "MS4A1", "LYZ"], seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mapped = map_genes(adata)
    np.testing.assert_array_equal(mapped.X.toarray(), adata.X.toarray())


def test_map_dense_layers_obsm_and_copy_false():
    adata = make_adata(["CD3E", "ENSG00000198851", "LYZ"], sparse=False, seed=1)
    adata.layers["counts"] = sp.csr_matrix(adata.X)
    adata.obsm["X_pca"] = np.arange(12, dtype=float).reshape(6, 2)
    adata.uns["note"] = {"a": 1}
    before = snapshot(adata)
    for copy in (True, False):
        with pytest.warns(UserWarning):
            mapped = map_genes(adata, copy=copy)
        assert isinstance(mapped.X, np.ndarray)
        np.testing.assert_array_equal(mapped.X[:, 0], before[0][:, 0] + before[0][:, 1])
        np.testing.assert_array_equal(mapped.layers["counts"].toarray(), mapped.X)
        np.testing.assert_array_equal(mapped.obsm["X_pca"], adata.obsm["X_pca"])
        assert_unchanged(adata, before)
        assert "scf_gene_coverage" not in adata.uns


def test_map_integer_matrix_keeps_dtype():
    adata = make_adata(["CD3E", "LYZ"], counts=np.array([[1, 2], [3, 4]], dtype=np.int64))
    mapped = map_genes(adata)
    assert mapped.X.dtype == np.int64


def test_map_id_column():
    adata = make_adata(["g1", "g2", "g3"])
    adata.var["symbol"] = ["CD3E", "LYZ", "nothing"]
    mapped = map_genes(adata, id_column="symbol")
    assert mapped.var_names.tolist() == ["CD3E", "LYZ"]
    with pytest.raises(GeneError, match="id_column"):
        map_genes(adata, id_column="gene_symbols")


def test_map_anndata_view():
    adata = make_adata(["CD3E", "LYZ", "junk"])
    view = adata[2:, :]
    mapped = map_genes(view)
    np.testing.assert_array_equal(mapped.X.toarray(), adata.X.toarray()[2:, :2])
    assert mapped.obs_names.tolist() == adata.obs_names[2:].tolist()


def test_map_no_gene_matches_errors_and_leaves_input():
    adata = make_adata(["foo", "bar", "Gm12345"])
    before = snapshot(adata)
    with pytest.raises(GeneError, match="no gene matched"):
        map_genes(adata)
    assert_unchanged(adata, before)
    assert issubclass(GeneError, ValueError) and issubclass(GeneError, DataError)


def test_map_bad_inputs():
    with pytest.raises(GeneError, match="AnnData"):
        map_genes(np.zeros((2, 2)))
    with pytest.raises(GeneError, match="no genes"):
        map_genes(ad.AnnData(X=np.zeros((3, 0), dtype=np.float32)))


def test_mapped_result_writes_to_h5ad(tmp_path):
    with pytest.warns(UserWarning):
        mapped = map_genes(make_adata(["TP53", "7157", "CD3E", "junk"]))
    path = tmp_path / "mapped.h5ad"
    mapped.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert back.uns["scf_gene_coverage"]["n_output"] == 2
    assert coverage_report(back).loc["genes", "fraction"] == pytest.approx(0.75)


def test_coverage_report_and_plot():
    mapped = map_genes(make_adata(["CD3E", "junk"], counts=np.array([[3.0, 1.0], [1.0, 0.0]])))
    report = coverage_report(mapped)
    assert report.loc["genes"].tolist() == [1.0, 2.0, 0.5]
    assert report.loc["counts"].tolist() == [4.0, 5.0, pytest.approx(0.8)]
    with pytest.raises(GeneError, match="map_genes"):
        coverage_report(make_adata(["CD3E"]))
    import matplotlib.pyplot as plt
    figure = plot_gene_matches(mapped)
    assert len(figure.axes[0].patches) == 6 and plt.get_fignums() == []
    assert [patch.get_width() for patch in figure.axes[0].patches][::-1] == [1, 0, 0, 0, 0, 1]   # symbol, …, unmapped
    _, ax = plt.subplots()
    assert plot_gene_matches(mapped, ax=ax) is ax.figure                       # onto the caller's axes
    plt.close("all")


@pytest.mark.parametrize("chunk_size", [2, 1000])
def test_map_genes_streamed_to_a_file_equals_in_memory(tmp_path, chunk_size):
    ids = ["TP53", "ENSG00000141510.12", "cd3e", "916", "MS4A1", "not_a_gene"]
    adata = make_adata(ids, counts=np.random.default_rng(4).poisson(3.0, size=(6, 6)).astype(np.float32))
    adata.obsm["X_pos"] = np.arange(12, dtype=np.float32).reshape(6, 2)
    adata.uns["note"] = "kept"
    adata.write_h5ad(tmp_path / "in.h5ad")
    with pytest.warns(UserWarning, match="summed"): expected = map_genes(adata)
    backed = anndata.read_h5ad(tmp_path / "in.h5ad", backed="r")
    with pytest.raises(GeneError, match="out="): map_genes(backed)
    with pytest.warns(UserWarning, match="summed"):
        got = map_genes(backed, out=tmp_path / "mapped.h5ad", chunk_size=chunk_size)
    assert got.isbacked and sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "mapped.h5ad"]
    np.testing.assert_array_equal(got.X[:].toarray(), expected.X.toarray())
    pd.testing.assert_frame_equal(got.var.astype(str), expected.var.astype(str))      # (the file keeps strings as categories)
    pd.testing.assert_frame_equal(got.obs, expected.obs)
    np.testing.assert_array_equal(got.obsm["X_pos"], adata.obsm["X_pos"])
    assert got.uns["note"] == "kept"
    assert coverage_report(got).equals(coverage_report(expected))
    got.file.close(); backed.file.close()


def test_pbmc68k_reduced_raw_coverage():
    scanpy = pytest.importorskip("scanpy")
    source = scanpy.datasets.pbmc68k_reduced()
    raw = ad.AnnData(X=source.raw.X, var=pd.DataFrame(index=source.raw.var_names))
    mapped = map_genes(raw)
    assert raw.n_vars == 765
    assert mapped.uns["scf_gene_coverage"]["genes"] > 0.95
    assert {"MT-ND3", "CD3E", "MS4A1"} <= set(mapped.var_names)


# ---------------------------------------------------------------- Vocab
def test_special_token_ids_are_declared_here_only():
    import scfoundation.model as model
    import scfoundation.tokenization as tokenization
    for module in (model, tokenization):
        assert not {"SPECIAL_TOKENS", "PAD_ID", "MASK_ID", "CLS_ID", "N_SPECIAL"} & set(module.__all__), module.__name__


def test_vocab_special_tokens_and_ids():
    vocab = Vocab.from_genes(["CD3E", "MS4A1", "TP53"])
    assert vocab.tokens[:3] == SPECIAL_TOKENS and (PAD_ID, MASK_ID, CLS_ID) == (0, 1, 2)
    assert len(vocab) == 6 and vocab.genes == ("CD3E", "MS4A1", "TP53")
    assert vocab.token_to_id["TP53"] == 5
    ids = vocab.ids(["TP53", "CD3E", "nope"], unknown="ignore")
    assert ids.dtype == np.int64 and ids.tolist() == [5, 3, -1]
    with pytest.raises(GeneError, match="nope") as error:
        vocab.ids(["TP53", "nope"])
    assert "map_genes" in str(error.value) and "ignore" in str(error.value)
    with pytest.raises(GeneError, match="unknown="):
        vocab.ids(["TP53"], unknown="drop")
    assert vocab.names(vocab.ids(["TP53", "<cls>"])) == ["TP53", "<cls>"]
    with pytest.raises(GeneError):
        vocab.names([99])
    assert vocab.ids([]).tolist() == []


def test_vocab_rejects_bad_gene_lists():
    for genes, message in [(["A", "A"], "repeat"), (["<mask>"], "special"), (["A", ""], "non-empty")]:
        with pytest.raises(GeneError, match=message):
            Vocab.from_genes(genes)


def test_vocab_version_is_content_hash():
    first, same = Vocab.from_genes(["A1BG", "TP53"]), Vocab.from_genes(["A1BG", "TP53"])
    other = Vocab.from_genes(["TP53", "A1BG"])
    assert first.version == same.version != other.version
    first.check_compatible(same.version)
    first.check_compatible(same)
    with pytest.raises(GeneError, match="does not match"):
        first.check_compatible(other.version)


def test_with_medians_copy_and_validation():
    vocab = Vocab.from_genes(["A1BG", "TP53"])
    with_medians = vocab.with_medians(np.array([1.5, np.nan]))
    assert vocab.medians is None and with_medians is not vocab
    assert with_medians.gene_version == vocab.version == vocab.gene_version
    assert with_medians.medians.dtype == np.float32 and len(with_medians.medians) == 5
    assert np.isnan(with_medians.medians[[0, 1, 2, 4]]).all() and with_medians.medians[3] == 1.5
    per_token = vocab.with_medians([np.nan, np.nan, np.nan, 2.0, 3.0])
    assert per_token.medians[3:].tolist() == [2.0, 3.0]
    with pytest.raises(GeneError, match="medians"):
        vocab.with_medians([1.0, 2.0, 3.0])
    with pytest.raises(GeneError, match="non-negative"):
        vocab.with_medians([1.0, np.inf])


def test_vocab_json_round_trip(tmp_path):
    vocab = Vocab.from_genes(["CD3E", "MS4A1", "TP53"]).with_medians([1.0, np.nan, 0.25])
    path = vocab.save(tmp_path / "vocab.json")
    content = json.loads(path.read_text())
    assert content["version"] == vocab.version and content["format_version"] == VOCAB_FORMAT_VERSION
    assert content["medians"][:3] == [None, None, None]
    loaded = Vocab.load(path)
    assert loaded == vocab and loaded.version == vocab.version
    np.testing.assert_array_equal(loaded.medians, vocab.medians)
    plain = Vocab.from_genes(["CD3E"])
    assert Vocab.load(plain.save(tmp_path / "plain.json")).medians is None


@pytest.mark.parametrize("text, message", [
    ("{\"format\": \"scfoundation.vo", "not valid JSON"),
    ("[1, 2, 3]", "not a scfoundation vocabulary"),
    (json.dumps({"format": "other", "tokens": []}), "not a scfoundation vocabulary"),
    (json.dumps({"format": "scfoundation.vocab", "format_version": 99}), "format"),
    (json.dumps({"format": "scfoundation.vocab", "format_version": 1, "tokens": ["A"]}), "tokens")])
def test_vocab_load_corrupt_or_foreign(tmp_path, text, message):
    path = tmp_path / "vocab.json"
    path.write_text(text)
    with pytest.raises(GeneError, match=message):
        Vocab.load(path)


def test_vocab_load_detects_edited_tokens(tmp_path):
    path = Vocab.from_genes(["CD3E", "TP53"]).save(tmp_path / "vocab.json")
    content = json.loads(path.read_text())
    content["tokens"][3] = "CD4"
    path.write_text(json.dumps(content))
    with pytest.raises(GeneError, match="edited or is corrupt"):
        Vocab.load(path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(GeneError, match="not valid JSON"):
        Vocab.load(path)


def test_vocab_version_covers_the_medians():
    "Other medians give other rank-value tokens: they give another version; the genes part stays."
    vocab = Vocab.from_genes(["A1BG", "TP53"])
    first, same, other = (vocab.with_medians(values) for values in ([1.5, np.nan], [1.5, np.nan], [1.5, 2.0]))
    assert first.version == same.version != other.version != vocab.version
    assert first.version.startswith(vocab.version + "-") and first.gene_version == other.gene_version == vocab.version
    assert gene_version_of(first.version) == gene_version_of(vocab.version) == vocab.version
    minus_nan = np.array([1.5, -np.nan], np.float32)                   # another NaN bit pattern: the same medians
    assert vocab.with_medians(minus_nan).version == first.version
    first.check_compatible(first.version)
    first.check_compatible(vocab.version)                              # a genes-only version names no medians
    vocab.check_compatible(first)                                      # no medians: no rank-value tokens to get wrong
    with pytest.raises(GeneError, match="other medians"): first.check_compatible(other.version)
    assert versions_fit(first.version, vocab.version) and versions_fit(vocab.version, first.version)
    assert not versions_fit(first.version, other.version) and not versions_fit("v1", "v2") and versions_fit("v1", "v1")
    with pytest.raises(GeneError, match="other genes"): first.check_compatible(Vocab.from_genes(["TP53", "A1BG"]).version)


def test_vocab_load_refuses_edited_medians(tmp_path):
    "A vocab.json whose medians were changed (its version kept) is refused, and so is a format-1 file with medians."
    vocab = Vocab.from_genes(["CD3E", "TP53"]).with_medians([1.0, 2.0])
    path = vocab.save(tmp_path / "vocab.json")
    content = json.loads(path.read_text())
    path.write_text(json.dumps({**content, "medians": [None, None, None, 1.0, 3.0]}))
    with pytest.raises(GeneError, match="tokens or medians do not match the recorded version"):
        Vocab.load(path)
    path.write_text(json.dumps({**content, "format_version": 1, "version": vocab.gene_version}))
    with pytest.raises(GeneError, match="format-1 vocabulary with medians"):
        Vocab.load(path)
    plain = Vocab.from_genes(["CD3E", "TP53"])
    path.write_text(json.dumps({**json.loads(plain.save(path).read_text()), "format_version": 1}))
    assert Vocab.load(path) == plain                                   # format 1 without medians: the same version


def test_with_medians_leaves_the_callers_array_alone():
    medians = np.array([np.nan, np.nan, np.nan, 1.0, -0.0], np.float32)
    Vocab.from_genes(["CD3E", "TP53"]).with_medians(medians)
    assert medians.flags.writeable and np.signbit(medians[4])


def test_vocab_from_gene_table():
    table = gene_table()
    coding = Vocab.from_gene_table()
    assert list(coding.genes) == table.loc[table["gene_type"] == "protein-coding", "token"].tolist()
    assert len(Vocab.from_gene_table(["tRNA", "rRNA"]).genes) == table["gene_type"].isin(["tRNA", "rRNA"]).sum()
    assert len(Vocab.from_gene_table(None)) == len(table) + 3
    with pytest.raises(GeneError, match="choose from"):
        Vocab.from_gene_table(["coding"])


def test_vocab_from_adata_counts_cells_across_datasets():
    counts_a = np.array([[1, 0, 0], [2, 0, 1]], dtype=np.float32)  # CD3E 2 cells, MS4A1 0, TP53 1
    counts_b = np.array([[0, 0, 4]], dtype=np.float32)  # TP53 one more cell
    first = map_genes(make_adata(["TP53", "MS4A1", "CD3E"][::-1], counts=counts_a))
    second = map_genes(make_adata(["CD3E", "MS4A1", "TP53"], counts=counts_b))
    assert Vocab.from_adata([first, second], min_cells=2).genes == ("CD3E", "TP53")
    assert Vocab.from_adata(first, min_cells=2).genes == ("CD3E",)
    assert Vocab.from_adata([second, first]) == Vocab.from_adata([first, second])
    assert Vocab.from_adata(first, min_cells=0).genes == ("CD3E", "MS4A1", "TP53")
    with pytest.raises(GeneError, match="map_genes"):
        Vocab.from_adata(make_adata(["CD3E", "P53"]))
    with pytest.raises(GeneError, match="min_cells"):
        Vocab.from_adata(first, min_cells=-1)
    with pytest.raises(GeneError, match="AnnData"):
        Vocab.from_adata([])


MOUSE_GENES = ["Actb", "mt-Co1", "Gm42418", "Cd3e", "1700001C19Rik", "Malat1", "Ptprc", "H2-K1"]


def test_mouse_symbols_are_named_once_with_the_homology_path():
    "Mouse symbols would land on human namesakes by their upper case: one warning, examples, the fix."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapped = map_genes(make_adata(MOUSE_GENES))
    messages = [str(warning.message) for warning in caught if "mouse" in str(warning.message)]
    assert len(messages) == 1 and "\n" not in messages[0] and caught[0].category is UserWarning
    assert "Actb, mt-Co1, Gm42418" in messages[0] and "homology_vocab_map" in messages[0]
    assert "ACTB" in mapped.var_names                                   # still mapped: a warning, not an error
    with pytest.warns(UserWarning, match="look like mouse"):
        match_gene_ids(["ENSMUSG00000029580", "ENSMUSG00000064351"])


def test_human_ids_do_not_look_like_mouse():
    from scfoundation.data import load_pbmc68k
    from scfoundation.simulate import SimConfig, simulate
    table = gene_table()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for ids in (table["symbol"], table["token"], table["ensembl_ids"].str.split(";").str[0], load_pbmc68k().var_names,
                    simulate(SimConfig(n_cells=20, n_genes=200, seed=0)).var_names, MOUSE_GENES[:3] + ["TP53", "CD3E", "MS4A1"]):
            match_gene_ids(ids)
