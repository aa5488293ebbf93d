"""Every chunk (training and validation documents) -> the ids of its nearest database chunks.

Chunks of the query's own document are never neighbours (same-document exclusion): otherwise the model
learns to copy its own future. Results are padded with -1 when fewer than requested exist. Pretraining
later drops neighbours from every other document inside a sample too, which is why more are stored
(`db.num_neighbors_query`, 20) than the model reads (`model.num_neighbors`, 2).
"""

from __future__ import annotations

from typing import Callable

import faiss
import numpy as np

from ..config import MAX_SEARCH_K


class Reranked:
    """An index whose top `depth` results are put in exact order by the stored vectors (`db.rerank`).

    Compressed codes (PQ32: 32 bytes for a 384-dimensional vector) find most true neighbours among their top
    few hundred but order them poorly; `vectors_of(ids)`, the embeddings as `retro db build` stored them,
    orders those candidates exactly. Recall@k then equals the share of the true top k among the candidates.
    Quacks like the Faiss index `search_excluding` needs: `search(x, k)`, `ntotal`, `metric_type`."""

    ROWS = 64  # queries re-ranked at a time: ROWS x depth x dim float32 in memory (20 MB at 200 x 384)

    def __init__(self, index, vectors_of: Callable[[np.ndarray], np.ndarray], depth: int):
        self.index, self.vectors_of, self.depth = index, vectors_of, depth
        self.ntotal, self.metric_type = index.ntotal, index.metric_type

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """x (n, dim) float32 -> (D, I), each (n, k): as Faiss returns them (inner products, highest first, or
        squared L2 distances, lowest first), from the top max(k, depth) of the index, -1 padded."""
        _, found = self.index.search(x, max(k, min(self.depth, self.ntotal)))
        ip = self.metric_type == faiss.METRIC_INNER_PRODUCT
        D = np.empty(found.shape, dtype=np.float32)
        for s in range(0, len(x), self.ROWS):
            ids = found[s : s + self.ROWS]                                 # (r, depth), -1 where none
            known, where = np.unique(np.maximum(ids, 0), return_inverse=True)
            v = self.vectors_of(known)[where.reshape(ids.shape)]           # (r, depth, dim)
            q = x[s : s + self.ROWS, :, None]                              # (r, dim, 1)
            d = (v @ q)[..., 0] if ip else ((v - q[:, None, :, 0]) ** 2).sum(-1)
            d[ids < 0] = -np.inf if ip else np.inf
            D[s : s + self.ROWS] = d
        order = np.argsort(-D if ip else D, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(D, order, 1), np.take_along_axis(found, order, 1)


def search_excluding(index: faiss.Index, queries: np.ndarray, query_docs: np.ndarray, chunk_docs: np.ndarray,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids and distances for each query, skipping database chunks whose document equals the query's.

    queries (n, dim) float32; query_docs (n,) document row of each query (-1: none to exclude);
    chunk_docs (num_chunks,) document row of every chunk. Returns ids (n, k) int64 (-1 padded) and
    distances (n, k) float32: 1 - cosine similarity for inner-product indexes, else Faiss' own distance
    (inf where padded). Rows that lose too many hits to the exclusion are searched
    again with a wider k, so a long document cannot crowd out its chunks' neighbours."""
    n = len(queries)
    ids = np.full((n, k), -1, dtype=np.int64)
    dist = np.full((n, k), np.inf, dtype=np.float32)
    if index.ntotal == 0 or n == 0:
        return ids, dist
    rows = np.arange(n)
    kk = min(index.ntotal, 2 * k + 8)
    while len(rows):
        D, I = index.search(np.ascontiguousarray(queries[rows], dtype=np.float32), kk)
        if index.metric_type == faiss.METRIC_INNER_PRODUCT:
            D = 1.0 - D
        ok = I >= 0
        ok &= chunk_docs[np.where(ok, I, 0)] != query_docs[rows, None]
        order = np.argsort(~ok, axis=1, kind="stable")[:, :k]  # valid hits first, in distance order
        got_ids = np.take_along_axis(I, order, 1)
        got_ok = np.take_along_axis(ok, order, 1)
        width = got_ids.shape[1]
        ids[rows, :width] = np.where(got_ok, got_ids, -1)
        dist[rows, :width] = np.where(got_ok, np.take_along_axis(D, order, 1), np.inf)
        # Search again, wider, where hits were lost to the exclusion and the index had more to give.
        short = (got_ok.sum(1) < k) & (I[:, -1] >= 0)
        if kk >= min(index.ntotal, MAX_SEARCH_K) or not short.any():
            break
        rows = rows[short]
        kk = min(index.ntotal, MAX_SEARCH_K, kk * 4)
    return ids, dist
