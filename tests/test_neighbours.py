"""Neighbour search: same-document exclusion, padding, and approximate search against exact search."""

import faiss
import numpy as np

from retrocli import index as faiss_index
from retrocli.neighbours import search_excluding


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
