"""Neighbour search: same-document exclusion, padding, and approximate search against exact search."""

import faiss
import numpy as np

from retrocli.db import index as faiss_index
from retrocli.db.search import Reranked, search_excluding


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def flat(vectors: np.ndarray) -> faiss.Index:
    index = faiss_index.train("Flat", vectors, seed=0)
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    return index


def test_same_document_chunks_are_never_neighbours():
    rng = np.random.default_rng(0)
    # document 0 has 50 near-identical chunks: an unfiltered search would return only its own chunks
    base = rng.normal(size=(1, 16))
    own = unit(base + 0.01 * rng.normal(size=(50, 16)))
    others = unit(rng.normal(size=(30, 16)))
    vectors = np.concatenate([own, others])
    docs = np.array([0] * 50 + list(range(1, 31)))
    index = flat(vectors)
    ids, dist = search_excluding(index, own[:5], docs[:5], docs, k=4)
    assert (ids >= 50).all(), "chunks of the query's own document leaked in"
    exact = np.argsort(-(others @ own[:5].T).T, axis=1)[:, :4] + 50
    assert (ids == exact).all()
    assert (np.diff(dist, axis=1) >= -1e-6).all()


def test_padding_when_too_few_exist():
    vectors = unit(np.random.default_rng(1).normal(size=(6, 8)))
    docs = np.array([0, 0, 0, 0, 1, 1])
    ids, dist = search_excluding(flat(vectors), vectors[:1], docs[:1], docs, k=4)
    assert sorted(ids[0, :2].tolist()) == [4, 5]
    assert ids[0, 2:].tolist() == [-1, -1] and np.isinf(dist[0, 2:]).all()


def test_approximate_index_recall_against_exact():
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(64, 32))
    data = unit(centers[rng.integers(0, 64, 20000)] + 0.3 * rng.normal(size=(20000, 32)))
    queries = unit(centers[rng.integers(0, 64, 300)] + 0.3 * rng.normal(size=(300, 32)))
    ids = np.arange(len(data), dtype=np.int64)
    approx = faiss_index.train("IVF64,SQ8", data, seed=0)
    approx.add_with_ids(data, ids)
    faiss_index.set_search_params(approx, nprobe=8, ef_search=16)
    none = np.full(len(queries), -1)
    docs = np.arange(len(data))
    got, _ = search_excluding(approx, queries, none, docs, 10)
    truth, _ = search_excluding(flat(data), queries, none, docs, 10)
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth)])
    assert recall >= 0.9, recall


def test_bad_factory_string_is_a_user_error():
    import pytest

    from retrocli.errors import UserError

    with pytest.raises(UserError, match="db.index = 'IVFxx,Nope'"):
        faiss_index.new_index("IVFxx,Nope", 16)
    with pytest.raises(UserError, match="needs at least 1024 training vectors"):
        faiss_index.train("IVF1024,Flat", unit(np.ones((100, 16))), seed=0)


def test_reranked_search_orders_the_candidates_exactly_for_both_metrics():
    rng = np.random.default_rng(3)
    data = unit(rng.normal(size=(3000, 32)))
    queries = unit(rng.normal(size=(300, 32)))
    for metric, spec in ((faiss.METRIC_INNER_PRODUCT, "IVF8,PQ4"), (faiss.METRIC_L2, "IVF8,PQ4")):
        coded = faiss.index_factory(32, spec, metric)
        coded.train(data)
        coded.add(data)
        faiss.extract_index_ivf(coded).nprobe = 8  # every list: only the codes' order is approximate
        candidates = coded.search(queries, 100)[1]
        scores = queries @ data.T if metric == faiss.METRIC_INNER_PRODUCT else -((queries[:, None] - data) ** 2).sum(-1)
        truth = np.argsort(-scores, axis=1)[:, :10]
        D, I = Reranked(coded, lambda ids: data[ids], depth=100).search(queries, 10)
        # the top 10 of the 100 candidates by the exact score: every true neighbour among them, in order
        want = np.take_along_axis(candidates, np.argsort(-np.take_along_axis(scores, candidates, 1), axis=1), 1)[:, :10]
        assert (I == want).all()
        sign = 1 if metric == faiss.METRIC_INNER_PRODUCT else -1  # Faiss' convention: similarity, or distance
        assert np.allclose(D, sign * np.take_along_axis(scores, I, 1), atol=1e-5)
        covered = np.mean([len(set(c) & set(t)) for c, t in zip(candidates, truth)]) / 10
        assert np.mean([len(set(i) & set(t)) for i, t in zip(I, truth)]) / 10 == covered
        assert covered > np.mean([len(set(c[:10]) & set(t)) for c, t in zip(candidates, truth)]) / 10 + 0.2
        # fewer vectors than asked for: -1 padded, as Faiss pads
        small = Reranked(flat(data[:5]), lambda ids: data[ids], depth=100)
        assert (small.search(queries[:2], 8)[1][:, 5:] == -1).all()


def test_auto_rerank_is_on_for_pq_codes_only():
    assert faiss_index.rerank_depth(-1, faiss_index.auto_spec(20_000_000)) == faiss_index.RERANK_PQ  # OPQ...,PQ32
    assert faiss_index.rerank_depth(-1, "PQ4x4") == faiss_index.RERANK_PQ
    for spec in (faiss_index.auto_spec(5_000_000), "Flat", "HNSW32", "IVF64,SQ4"):
        assert faiss_index.rerank_depth(-1, spec) == 0, spec
    assert faiss_index.rerank_depth(0, "IVF64,PQ8") == 0 and faiss_index.rerank_depth(50, "Flat") == 50


def test_stored_rows_are_read_alike_scattered_or_mapped_and_damage_is_named(tmp_path):
    """EmbeddingStore.take reads a block with few rows wanted row by row (NpyRows), else maps it: the same
    rows either way, in the order asked; a missing or cut block is a UserError naming the file."""
    from types import SimpleNamespace

    import pytest

    from retrocli.db.database import EmbeddingStore
    from retrocli.errors import UserError
    from retrocli.workspace import save_npy_atomic

    rng = np.random.default_rng(4)
    data = rng.normal(size=(250, 24)).astype(np.float16)
    path = lambda i: tmp_path / f"block-{i:06d}.npy"  # noqa: E731
    for i in range(3):
        save_npy_atomic(path(i), data[i * 100 : (i + 1) * 100])
    ws = SimpleNamespace(require=lambda stage: {"settings": {"block_size": 100}}, embed_block=path)
    store = EmbeddingStore(ws, len(data))
    rows = np.concatenate([rng.permutation(100)[:80], [249, 101, 5, 5, 230]])  # block 0 mapped; 1, 2 by rows
    got = store.take(rows)
    assert got.dtype == np.float32 and np.array_equal(got, data[rows].astype(np.float32))
    path(2).write_bytes(path(2).read_bytes()[:-100])
    with pytest.raises(UserError, match="block-000002.npy is damaged"):
        EmbeddingStore(ws, len(data)).take(np.array([249]))
    path(1).unlink()
    with pytest.raises(UserError, match="block-000001.npy is missing"):
        EmbeddingStore(ws, len(data)).take(np.array([101]))
