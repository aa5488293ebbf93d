"""Embedders: the lexical hashing embedder, the packaged MiniLM loaded offline, a local HF folder."""

import zlib

import numpy as np
import pytest

from retrocli.db.embed import (
    LEXICAL_DIM,
    HFEmbedder,
    LexicalEmbedder,
    embed_texts,
    lexical_idf,
    make_embedder,
    packaged_minilm_dir,
)
from retrocli.db.index import auto_spec
from retrocli.errors import UserError

TEXTS = ["the ship sailed out of the harbour with the tide",
         "a boat left the harbour when the tide turned",
         "bake the bread in a hot oven for forty minutes",
         ""]


def _encode(texts):
    """A stand-in tokenizer: one id per word (a vocabulary of 64)."""
    return [[zlib.crc32(w.encode()) % 64 for w in t.split()] for t in texts]


def test_lexical_is_normalised_deterministic_and_topical():
    idf = lexical_idf(_encode(TEXTS * 3), 64)
    assert idf.shape == (64,)
    assert idf[_encode(["the"])[0][0]] < idf[_encode(["oven"])[0][0]], "a piece in every text weighs least"
    emb = LexicalEmbedder(idf, _encode)
    v = embed_texts(emb, TEXTS)
    assert v.shape == (4, LEXICAL_DIM) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v[:3], axis=1), 1.0, atol=1e-5)
    assert not v[3].any(), "a text without pieces embeds to zero (never anyone's neighbour)"
    assert np.array_equal(v, embed_texts(LexicalEmbedder(idf, _encode), TEXTS))
    assert v[0] @ v[1] > v[0] @ v[2]


def test_unknown_embedder_folder_is_a_user_error(tmp_path):
    (tmp_path / "enc").mkdir()
    with pytest.raises(UserError, match="cannot load the embedder"):
        make_embedder(str(tmp_path / "enc"), tmp_path)
    with pytest.raises(UserError, match="IDF table"):
        make_embedder("lexical", tmp_path, idf_path=tmp_path / "missing.npy")


@pytest.mark.slow
def test_packaged_minilm_offline_and_as_a_local_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    default = make_embedder("all-MiniLM-L6-v2", tmp_path, batch_size=2, precision="fp32")
    v = embed_texts(default, TEXTS)
    assert v.shape == (4, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2, "a paraphrase must be closer than an unrelated sentence"
    # the same model named by its folder (any local HF encoder): same vectors, whatever the batching
    folder = HFEmbedder(str(packaged_minilm_dir()), batch_size=3, precision="fp32")
    assert np.allclose(embed_texts(folder, TEXTS), v, atol=1e-5)
    bf16 = HFEmbedder(str(packaged_minilm_dir()), batch_size=4, precision="bf16")
    cos = np.sum(embed_texts(bf16, TEXTS[:3]) * v[:3], axis=1)
    assert (cos > 0.99).all(), cos


def test_auto_precision_depends_on_the_machine_and_the_model_never_on_a_timing(monkeypatch):
    """Where the CPU computes bf16 natively, `auto` takes bf16 whenever the probe agrees with fp32; a slower bf16
    pass (a busy machine) must not flip the choice, or two builds of one database would embed differently."""
    import time

    import retrocli.db.embed as embed

    calls = iter(range(10**6))
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(calls)) ** 3)  # every later pass looks slower
    monkeypatch.setattr(embed, "cpu_has_fast_bf16", lambda: True)
    chosen = {str(HFEmbedder(str(packaged_minilm_dir()), batch_size=8, precision="auto").dtype) for _ in range(2)}
    assert chosen == {"torch.bfloat16"}
    monkeypatch.setattr(embed, "cpu_has_fast_bf16", lambda: False)
    assert str(HFEmbedder(str(packaged_minilm_dir()), batch_size=8, precision="auto").dtype) == "torch.float32"


def test_auto_index_choice():
    assert auto_spec(5_000) == "Flat"
    assert auto_spec(60_000) == "IVF1024,SQ8"
    spec = auto_spec(100_000)
    nlist = int(spec.split(",")[0][3:])
    assert 39 * nlist <= 100_000 and spec.endswith("SQ8")
    assert auto_spec(1_000_000_000).endswith("PQ32")
