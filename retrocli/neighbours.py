"""Every chunk (training and validation documents) -> the ids of its nearest database chunks.

Chunks of the query's own document are never neighbours (same-document exclusion): otherwise the model
learns to copy its own future. Results are padded with -1 when fewer than requested exist. Pretraining
later drops neighbours from every other document inside a sample too, which is why more are stored
(`db.num_neighbors_query`, 20) than the model reads (`model.num_neighbors`, 2).
"""

from __future__ import annotations

import faiss
import numpy as np

from .config import MAX_SEARCH_K


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
