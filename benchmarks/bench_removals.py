"""Searches of a database with `retro db remove`d chunks, against the same database without removals, side by
side in one run (a ratio, not an absolute target).

For each index type: a synthetic database is built through the product (lexical embedder), its chunks' own
stored embeddings are searched as `retro db query` searches (`Database.index()` under `search_excluding`,
top 10), then documents holding --removed chunks are removed (`edits.remove`) and the same queries are
searched again: with the removed chunks filtered inside Faiss (what searches do), and with the former
over-fetch (k + removed results asked of Faiss, the removed ones dropped) for comparison. The results of the
two must be the same (ids, or where Faiss chose another of two chunks with the same vector, that vector).
Target: with removals within 10% of without.

    python benchmarks/bench_removals.py [--chunks 60000] [--removed 10000] [--queries 2000]
                                        [--specs "Flat;IVF256,Flat"]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_db import _synthetic_corpus  # noqa: E402
from retrocli.config import config_from_dict  # noqa: E402
from retrocli.db import build as db  # noqa: E402
from retrocli.db import edit as edits  # noqa: E402
from retrocli.db.database import Database  # noqa: E402
from retrocli.db.search import search_excluding  # noqa: E402

K = 10
DOC_CHUNKS = 16  # chunks of 64 tokens in each synthetic document (~960 made-up words)


class OverFetch:
    """The former search of an edited index, the reference the filtered one is compared with (here and in
    tests/test_edits.py): every part asked for k + removed results, the removed dropped, the parts merged by
    distance, padded to k (-1) where fewer were found."""

    def __init__(self, edited):
        self.parts, self.removed = edited.parts, edited.removed
        self.ntotal, self.metric_type = edited.ntotal, edited.metric_type

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        found = [p.search(x, min(k + len(self.removed), p.ntotal)) for p in self.parts if p.ntotal]
        D, I = np.concatenate([f[0] for f in found], 1), np.concatenate([f[1] for f in found], 1)
        bad = (I < 0) | np.isin(I, self.removed)
        ip = self.metric_type == faiss.METRIC_INNER_PRODUCT
        D = np.where(bad, -np.inf if ip else np.inf, D)
        order = np.argsort(-D if ip else D, axis=1, kind="stable")[:, :k]
        I, D = np.take_along_axis(np.where(bad, -1, I), order, 1), np.take_along_axis(D, order, 1)
        pad = k - I.shape[1]
        return (np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf if ip else np.inf),
                np.pad(I, ((0, 0), (0, pad)), constant_values=-1)) if pad > 0 else (D, I)


def timed_search(database: Database, queries: np.ndarray, over_fetch: bool = False,
                 repeats: int = 3) -> tuple[float, np.ndarray]:
    """Best of `repeats` seconds for searching every query as `retro db query` does, and the ids found."""
    index = database.index()
    if over_fetch:
        index = OverFetch(index)
    chunk_docs = np.ascontiguousarray(database.store.chunks["doc"])
    none = np.full(len(queries), -1, dtype=np.int64)
    best, ids = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        ids, _ = search_excluding(index, queries, none, chunk_docs, K)
        best = min(best, time.perf_counter() - start)
    return best, ids


def bench(spec: str, chunks: int, removed: int, n_queries: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _synthetic_corpus(root / "base.jsonl", max(chunks // DOC_CHUNKS, 1), 960, 0)
        data = {"workspace": {"dir": str(root / "ws"), "seed": 1},
                "corpus": {"train": [str(root / "base.jsonl")], "valid_fraction": 0.0},
                "tokenizer": {"vocab_size": 2000},
                "db": {"chunk_length": 64, "embedder": "lexical", "index": spec, "nprobe": 16,
                       "block_size": 20000}}
        cfg = config_from_dict(data, source=root / "retro.toml")
        start = time.perf_counter()
        db.build(cfg)
        build_s = time.perf_counter() - start
        before = Database.open(cfg)
        rng = np.random.default_rng(0)
        rows = np.sort(rng.choice(before.store.num_chunks, size=n_queries, replace=False))
        queries = before.embeddings(rows)
        none_s, _ = timed_search(before, queries)

        docs = before.store.docs
        order = rng.permutation(len(docs))
        take = order[: int(np.searchsorted(np.cumsum(docs["num_chunks"][order]), removed)) + 1]
        ids = [info["id"] for row, info in before.store.doc_info(take.tolist()).items()]
        edits.remove(cfg, ids, [])
        after = Database.open(cfg)
        filtered_s, filtered = timed_search(after, queries)
        over_s, over = timed_search(after, queries, over_fetch=True)
        return {"spec": spec, "chunks": before.store.num_chunks, "removed": len(after.removed_chunks),
                "queries": n_queries, "build_s": build_s, "none_s": none_s, "filtered_s": filtered_s,
                "over_fetch_s": over_s, "identical": bool((filtered == over).all()),
                "same_vectors": bool(np.array_equal(after.embeddings(filtered[filtered >= 0]),
                                                    after.embeddings(over[over >= 0])))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=60_000)
    ap.add_argument("--removed", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--specs", default="Flat;IVF256,Flat")
    args = ap.parse_args()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {os.cpu_count()} CPUs; "
          f"{args.queries:,} queries, top {K}, best of 3")
    print(f"  {'index':<14}{'chunks':>9}{'removed':>9}{'none s':>9}{'removed s':>11}{'ratio':>7}"
          f"{'over-fetch s':>14}{'ratio':>7}{'same ids':>10}{'same vectors':>14}")
    for spec in args.specs.split(";"):
        r = bench(spec, args.chunks, args.removed, args.queries)
        print(f"  {r['spec']:<14}{r['chunks']:>9,}{r['removed']:>9,}{r['none_s']:>9.3f}{r['filtered_s']:>11.3f}"
              f"{r['filtered_s'] / r['none_s']:>7.2f}{r['over_fetch_s']:>14.3f}{r['over_fetch_s'] / r['none_s']:>7.2f}"
              f"{str(r['identical']):>10}{str(r['same_vectors']):>14}")


if __name__ == "__main__":
    main()
