"""`make bench-scale`: a database of 10 million synthetic chunk embeddings on 2 CPU cores, in bounded memory.

How do adding and searching cost as the database grows? The script builds one Faiss index and
grows it through the sizes asked (default 1M, 3M, 10M vectors), and at each size measures:

- add rate: vectors/s of `add_with_ids` over this growth step (generation of the vectors not counted);
- search rate: queries/s for a batch of 1,000 queries, top 10, at the repo's nprobe and efSearch
  (`DBConfig` defaults), median of 3 runs; and latency, median ms of 100 single-query searches;
- recall@10 of 100 of those queries against exact search over the same database;
- index bytes per vector (the file `faiss.write_index` writes, over ntotal);
- peak RSS of this process (`ru_maxrss`). Above `--max-rss-gib` (default 4) the script exits with 1;
- the 1-minute load average at the end of the step: on a shared machine, a step that ran beside other
  jobs shows it (2 means both cores busy);
- a sweep (`--sweep-nprobe`, default 16, 64, 256, 1024): at each nprobe, queries/s and recall@10 in the
  index's order and re-ranked at each depth N (`--rerank`, default 50, 100, 200) exactly as `db.rerank`
  does: the product's `neighbours.Reranked` reads the candidates' vectors from float16 blocks written as
  the embed stage writes them (a temporary folder under `--store-dir`, runs/; the page cache may hold them,
  so this is the warm-disk cost).

Data. Chunk embeddings are random but shaped like real ones (`ClusteredVectors`): 4,096 cluster centres
and, around each, offsets of norm ~1, both drawn with one decaying variance profile (91% of it in a
random 192-dimensional subspace whose i-th axis has scale ~ i^-0.3, the rest in every direction), the sum
L2-normalised, because the real pipeline compares normalised vectors by inner product. The profile was
fitted to the books-qa MiniLM embeddings; `--compare runs/books-qa/db/embed` prints both (59,929 of each,
~15 minutes, mostly OPQ training; recall@10 with all 64 lists of an IVF64 probed):

                 top-1 / top-10 cos   random pair cos   variance in top 16 / 64 / 128 PCs   PQ32   OPQ32_64,PQ32
    books-qa       0.631 / 0.502      0.054 +- 0.106          0.27 / 0.56 / 0.77            0.492      0.475
    synthetic      0.586 / 0.471      0.000 +- 0.095          0.28 / 0.57 / 0.80            0.639      0.521

Two simpler shapes failed: isotropic noise around the centres put only 0.22 of the variance in the top 64
directions, so recall@10 at 1M was 0.14; offsets confined to a 64-dimensional subspace around isotropic
centres let OPQ keep the offsets and drop what tells clusters apart (recall 0.01). Every block of vectors
is drawn from its own seeded stream (`default_rng([seed, stream, block])`), so a block can be regenerated
alone and no run ever holds more than one block (100,000 x 384 float32 = 154 MB): the vectors are
generated, added and freed block by block.

Exact neighbours of the recall queries are kept as a running top 10 while the blocks stream past (one
100 x block matmul each, before the block is freed), so the exact answer at each size costs no second
pass and no stored vectors.

Index. `index.auto_spec` picks `IVF16384,SQ8` for 10M vectors and `OPQ32_64,IVF16384_HNSW32,PQ32` beyond.
SQ8 keeps 384 bytes a vector, 3.6 GiB at 10M, which leaves nothing of the 4 GiB budget, and a database of
billions cannot hold it anyway; so this benchmark builds auto_spec's form for more than 10M chunks, with
the number of lists auto_spec gives the largest size (16,384 at 10M), trained as `retro db build` trains
it: `index.train` on `db.index_train_samples` (200,000) vectors. Training is the costly part on 2 cores,
181-254 s measured: OPQ's rotation (50 rounds of PQ k-means on 65,536 vectors) whatever the lists, then
k-means, whose cost is ~ training vectors x lists x 10 iterations. Faiss' preferred 39 vectors per list
(639,000) would triple the k-means of a run meant to take a quarter of an hour, so it is not the default
(`--train` sets it; `--nlist` sets fewer lists when a larger --sizes makes k-means unaffordable). The
output names the index, the lists and why.

    python benchmarks/bench_scale.py                                # 1M, 3M, 10M: ~10 min on 2 cores
    python benchmarks/bench_scale.py --sizes 20000,50000 --train 20000 --spec IVF64_HNSW32,SQ8  # seconds
    python benchmarks/bench_scale.py --compare runs/books-qa/db/embed  # the data against real embeddings
    python benchmarks/bench_scale.py --storage 1000000,3000000      # lists in memory vs on disk: ~4 min
    python benchmarks/bench_scale.py --storage 10000000 --cold      # and searched from a cold page cache

(OPQ's training takes minutes at any size, so a quick check names a spec without it.)

Storage (`--storage SIZES`): the index stage of `retro db build` with `db.index_storage` "memory" and
"ondisk", each size and storage in a process of its own (peak RSS only grows within a process), with the
product's own functions: in memory, every block added into one index, written at the end; on disk, each
block added into the trained empty index and its lists written (`index.save_lists`), then every block's
lists merged into one .ivfdata (`index.merge_lists`). Vectors of `--storage-dim` (64) dimensions in
`--storage-spec` (IVF1024,Flat: exact codes, so recall depends on nprobe alone), trained on 39 per list
(db.index_train_samples = -1). Reported: peak RSS (ru_maxrss, which counts the pages of a mapped file the
process touched: the merge writes the whole .ivfdata through a mapping, pages the kernel may write back and
drop) and the peak of anonymous memory (RssAnon, sampled every 20 ms: what must fit in memory); then the
index opened as searches open it (`index.load(mmap=True)`) and searched at db.nprobe, queries/s of a batch
of 1,000 and recall@10 against exact search, with the files in the page cache (just written).

Cold page cache (`--storage SIZES --cold`): after the warm search, the files the search maps (index.faiss,
and index.ivfdata on disk) are synced and dropped from the page cache with
`posix_fadvise(POSIX_FADV_DONTNEED)` (no root needed; pages a process still maps are not dropped, so the
searcher is closed first), and the share of their pages still cached is printed before and after (mincore
over a fresh mapping, which touches nothing). Then, reopened: one batch of 1,000 queries, timed from the
first touch (with 1,000 x nprobe lists probed it reads nearly every list once), the bytes this process read
from the disk (/proc/self/io), and the median ms of 10 single queries each searched after dropping the files
again and reopening the index (every list it scans comes from the disk). The disk is whatever the machine
has; the figures say nothing of another.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import mmap
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from retrocli.config import DBConfig  # noqa: E402
from retrocli.db import index as faiss_index  # noqa: E402
from retrocli.db.database import EmbeddingStore  # noqa: E402
from retrocli.db.search import Reranked  # noqa: E402
from retrocli.workspace import save_npy_atomic  # noqa: E402

DIM = 384
# seeded streams: one per purpose, so that the database, the queries and the centres never share draws
CENTRES, DATABASE, QUERIES = 0, 1, 2


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


class ClusteredVectors:
    """Unit vectors of dimension `dim` with the spectrum of real sentence embeddings: every direction's
    variance follows one decaying profile (a shared random `rank`-dimensional subspace whose i-th axis has
    scale ~ i^-decay, holding 1 - isotropic^2 of the variance, the rest spread over all dimensions). Both
    the `n_centres` cluster centres and each vector's offset from its centre are drawn with that profile,
    so the directions that hold most of the variance (those OPQ keeps) tell clusters apart as in real data.
    Block b of the database is a pure function of (seed, b), so any block can be regenerated alone."""

    def __init__(self, seed: int, n_centres: int = 4096, rank: int = 192, decay: float = 0.3,
                 isotropic: float = 0.3, noise: float = 1.0, dim: int = DIM, block_size: int = 100_000):
        self.seed, self.dim, self.noise, self.block_size = seed, dim, noise, block_size
        rng = np.random.default_rng([seed, CENTRES])
        basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T          # (rank, dim), orthonormal rows
        scales = np.arange(1, rank + 1) ** -decay
        scales *= math.sqrt(1 - isotropic**2) / np.linalg.norm(scales)       # E|z @ spread|^2 = 1 - isotropic^2
        self.spread = (scales[:, None] * basis).astype(np.float32)           # (rank, dim)
        self.sigma = isotropic / math.sqrt(dim)                              # E|sigma * g|^2 = isotropic^2
        centres = self.shaped(rng, n_centres)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)

    def shaped(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n, dim) float32 Gaussian vectors of the shared profile, expected squared norm 1."""
        x = rng.standard_normal((n, self.dim), dtype=np.float32)
        x *= self.sigma
        x += rng.standard_normal((n, len(self.spread)), dtype=np.float32) @ self.spread
        return x

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n, dim) float32, L2-normalised: a centre plus `noise` times a shaped offset."""
        x = self.shaped(rng, n)
        x *= self.noise
        x += self.centres[rng.integers(0, len(self.centres), n)]
        x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
        return x

    def block(self, b: int) -> np.ndarray:
        """Database rows [b * block_size, (b + 1) * block_size)."""
        return self.draw(np.random.default_rng([self.seed, DATABASE, b]), self.block_size)

    def rows(self, start: int, end: int):
        """Yields (first row, vectors) covering database rows [start, end), one block at a time."""
        b = start // self.block_size
        while b * self.block_size < end:
            lo = b * self.block_size
            x = self.block(b)[max(start - lo, 0): end - lo]
            yield max(start, lo), x
            b += 1

    def queries(self, n: int) -> np.ndarray:
        return self.draw(np.random.default_rng([self.seed, QUERIES]), n)


class RunningTopK:
    """Exact top-k by inner product of fixed queries over vectors that stream past in blocks."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries, self.k = queries, k
        self.scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self.ids = np.full((len(queries), k), -1, dtype=np.int64)

    def update(self, first_id: int, vectors: np.ndarray) -> None:
        s = self.queries @ vectors.T                                  # (q, block)
        k = min(self.k, s.shape[1])
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]               # (q, k) unordered
        scores = np.concatenate([self.scores, np.take_along_axis(s, top, 1)], axis=1)
        ids = np.concatenate([self.ids, top + first_id], axis=1)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :self.k]
        self.scores, self.ids = np.take_along_axis(scores, best, 1), np.take_along_axis(ids, best, 1)


def describe(x: np.ndarray, n_queries: int = 300) -> dict:
    """What makes neighbour search easy or hard on a set of embeddings: the cosine of a query's 1st and 10th
    neighbour and of random pairs, the variance held by the top 16, 64 and 128 principal directions (OPQ32_64
    keeps 64), and recall@10 of PQ32 codes with and without OPQ (IVF64 with all 64 lists probed)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    queries, db = x[:n_queries], x[n_queries:]
    s = queries @ db.T
    top = -np.sort(-s, axis=1)[:, :10]
    centred = db[:20_000] - db[:20_000].mean(0)
    variance = np.cumsum(np.linalg.eigvalsh(centred.T @ centred)[::-1])
    truth = np.argsort(-s, axis=1)[:, :10]
    recall = {}
    for name, spec in (("pq32_recall", "IVF64,PQ32np"), ("opq64_pq32_recall", "OPQ32_64,IVF64,PQ32np")):
        index = faiss_index.new_index(spec, x.shape[1])
        index.train(db[:30_000])
        index.add(db)
        faiss_index.set_search_params(index, 64, 64)
        recall[name] = recall_at(index.search(queries, 10)[1], truth)
    return {"top1_cos": float(top[:, 0].mean()), "top10_cos": float(top[:, 9].mean()),
            "random_cos": float(s.mean()), "random_cos_sd": float(s.std()),
            **{f"variance_top{n}": float(variance[n - 1] / variance[-1]) for n in (16, 64, 128)}, **recall}


def compare(embed_dir: Path, n: int = 60_000) -> None:
    """Print `describe` for a workspace's embeddings (db/embed/*.npy) and for as many synthetic vectors."""
    blocks = sorted(embed_dir.glob("*.npy"))
    if not blocks:
        sys.exit(f"no .npy blocks in {embed_dir}: point --compare at a built workspace's db/embed folder")
    real = np.concatenate([np.load(f).astype(np.float32) for f in blocks])
    real = real[np.random.default_rng(0).permutation(len(real))[:n]]
    synthetic = ClusteredVectors(seed=0, block_size=len(real)).block(0)
    rows = {embed_dir.parent.parent.name or "real": describe(real), "synthetic": describe(synthetic)}
    print(f"{len(real):,} vectors each")
    print(f"{'':>12}" + "".join(f"{k:>18}" for k in rows["synthetic"]))
    for name, row in rows.items():
        print(f"{name:>12}" + "".join(f"{v:>18.3f}" for v in row.values()), flush=True)


def default_nlist(largest: int) -> int:
    """The number of IVF lists `index.auto_spec` chooses for a database of `largest` vectors."""
    m = re.search(r"IVF(\d+)", faiss_index.auto_spec(max(largest, 20_000)))
    return int(m.group(1))


def index_bytes(index: faiss.Index) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.faiss"
        faiss.write_index(index, str(path))
        return path.stat().st_size


def measure_search(index: faiss.Index, queries: np.ndarray, k: int, repeats: int = 3) -> tuple[float, float]:
    """(queries/s for the whole batch, median of `repeats`; median ms of one query searched alone)."""
    index.search(queries[:10], k)  # warm-up: thread pool, first touch of the lists
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        index.search(queries, k)
        rates.append(len(queries) / (time.perf_counter() - t))
    single = []
    for q in queries[:100]:
        t = time.perf_counter()
        index.search(q[None], k)
        single.append(time.perf_counter() - t)
    return float(np.median(rates)), float(np.median(single)) * 1000


def recall_at(got: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(g[:k]) & set(t)) / k for g, t in zip(got, truth)]))


class StoredVectors:
    """The database's vectors as `retro db build` stores embeddings: float16 blocks of `block_size` rows
    (db/embed/block-NNNNNN.npy), read back by the product's own `EmbeddingStore.take`, the reader
    `db.rerank` uses. `block_size` must divide every span written."""

    def __init__(self, folder: Path, block_size: int):
        self.folder, self.block_size = folder, block_size
        self.settings = {"settings": {"block_size": block_size}}

    def require(self, stage: str) -> dict:  # the two Workspace methods EmbeddingStore calls
        return self.settings

    def embed_block(self, i: int) -> Path:
        return self.folder / f"block-{i:06d}.npy"

    def write(self, first: int, x: np.ndarray) -> None:
        assert first % self.block_size == 0 and len(x) % self.block_size == 0, (first, len(x))
        for j in range(0, len(x), self.block_size):
            save_npy_atomic(self.embed_block((first + j) // self.block_size), x[j : j + self.block_size]
                            .astype(np.float16))

    def take(self, size: int):
        return EmbeddingStore(self, size).take


def sweep(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, take, nprobes: list[int],
          depths: list[int], ef_search: int) -> list[dict]:
    """At each nprobe: queries/s for the batch and recall@k, in the index's order and re-ranked at each depth
    (`db.rerank`: the product's `Reranked` over the stored float16 blocks, timed end to end)."""
    k, n = truth.shape[1], len(truth)
    rows = []
    for nprobe in nprobes:
        faiss_index.set_search_params(index, nprobe, ef_search)
        row: dict = {"nprobe": nprobe, "reranked": {}}
        for depth in [0, *depths]:
            searcher = Reranked(index, take, depth) if depth else index
            searcher.search(queries[:10], k)  # warm-up
            t = time.perf_counter()
            got = searcher.search(queries, k)[1]
            rate, recall = len(queries) / (time.perf_counter() - t), recall_at(got[:n], truth)
            if depth:
                row["reranked"][depth] = {"queries_per_s": rate, "recall_at_10": recall}
            else:
                row.update(queries_per_s=rate, recall_at_10=recall)
        rows.append(row)
    return rows


def run(sizes: list[int], train_n: int | None, nlist: int | None, spec: str | None, n_queries: int,
        n_recall: int, k: int, nprobe: int, ef_search: int, block_size: int, seed: int,
        max_rss_gib: float, nprobes: list[int] | None = None, depths: list[int] | None = None,
        store_dir: Path | None = None) -> dict:
    started = time.perf_counter()
    block_size = min(block_size, sizes[0])
    gen = ClusteredVectors(seed, block_size=block_size)
    auto_nlist = default_nlist(sizes[-1])
    nlist = nlist or auto_nlist
    if spec is None:
        spec = f"OPQ32_64,IVF{nlist}_HNSW32,PQ32"
    ivf_lists = int(m.group(1)) if (m := re.search(r"IVF(\d+)", spec)) else 0
    train_n = min(train_n or DBConfig().index_train_samples, sizes[-1])
    why = (f"auto_spec's {auto_nlist} lists for {sizes[-1]:,} vectors" if ivf_lists == auto_nlist
           else f"{ivf_lists} lists, not auto_spec's {auto_nlist}: set by --nlist/--spec")
    print(f"index {spec} ({why}; auto_spec({sizes[-1]:,}) = {faiss_index.auto_spec(sizes[-1])}, whose SQ8 "
          f"codes would take {DIM * sizes[-1] / 2**30:.1f} GiB); faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads", flush=True)

    # Train on the database's first train_n rows: the blocks are i.i.d. draws, so a prefix is a random sample.
    t = time.perf_counter()
    sample = np.concatenate([x for _, x in gen.rows(0, train_n)])
    gen_s = time.perf_counter() - t
    per_list = f", {train_n / ivf_lists:.0f} per list" if ivf_lists else ""
    print(f"training on {train_n:,} vectors ({sample.nbytes / 2**20:.0f} MiB, generated in {gen_s:.1f} s{per_list}) "
          "...", flush=True)
    t = time.perf_counter()
    index = faiss_index.train(spec, sample, seed=seed)
    train_s = time.perf_counter() - t
    del sample
    print(f"  trained in {train_s:.1f} s; peak RSS {peak_rss_gib():.2f} GiB", flush=True)

    # Added as `retro db build` adds (the HNSW quantizer's efSearch as trained, Faiss' 16), searched at
    # db.ef_search: set once for search, a larger efSearch would slow every later add.
    ivf = faiss_index.ivf_of(index)
    quantizer = faiss.downcast_index(ivf.quantizer) if ivf is not None else None
    add_ef = quantizer.hnsw.efSearch if isinstance(quantizer, faiss.IndexHNSW) else None
    queries = gen.queries(n_queries)
    exact = RunningTopK(queries[:n_recall], k)
    stored = None
    if nprobes and store_dir is not None:  # blocks that divide every growth step, at most db.block_size
        stored = StoredVectors(store_dir, math.gcd(math.gcd(*sizes), block_size, DBConfig().block_size))
        print(f"storing the vectors as float16 blocks of {stored.block_size:,} in {store_dir} "
              f"({2 * DIM * sizes[-1] / 1e9:.2f} GB at {sizes[-1]:,}) for the re-ranking sweep", flush=True)
    rows, done = [], 0
    print(f"{'vectors':>12}{'add/s':>10}{'queries/s':>11}{'ms/query':>10}{'recall@10':>11}{'B/vector':>10}"
          f"{'peak RSS GiB':>14}{'step s':>8}{'load':>6}", flush=True)
    for size in sizes:
        step_t = time.perf_counter()
        if add_ef is not None:
            quantizer.hnsw.efSearch = add_ef
        gen_s = add_s = exact_s = store_s = 0.0
        t = time.perf_counter()
        for first, x in gen.rows(done, size):
            gen_s += time.perf_counter() - t
            t = time.perf_counter()
            index.add_with_ids(x, np.arange(first, first + len(x), dtype=np.int64))
            add_s += time.perf_counter() - t
            t = time.perf_counter()
            exact.update(first, x)
            exact_s += time.perf_counter() - t
            if stored is not None:
                t = time.perf_counter()
                stored.write(first, x)
                store_s += time.perf_counter() - t
            if (first + len(x)) // 1_000_000 > first // 1_000_000:
                print(f"  ... {first + len(x):,} vectors, peak RSS {peak_rss_gib():.2f} GiB", flush=True)
            t = time.perf_counter()
        added, done = size - done, size
        faiss_index.set_search_params(index, nprobe, ef_search)
        qps, latency_ms = measure_search(index, queries, k)
        _, got = index.search(queries[:n_recall], k)
        row = {"vectors": size, "added": added, "add_s": add_s, "add_per_s": added / add_s,
               "generate_s": gen_s, "exact_s": exact_s, "store_s": store_s, "queries": n_queries, "queries_per_s": qps,
               "latency_ms": latency_ms, "recall_queries": n_recall, "recall_at_10": recall_at(got, exact.ids),
               "index_bytes": index_bytes(index), "peak_rss_gib": peak_rss_gib(),
               "load_avg_1min": os.getloadavg()[0]}
        row["bytes_per_vector"] = row["index_bytes"] / size
        row["step_s"] = time.perf_counter() - step_t
        rows.append(row)
        print(f"{size:>12,}{row['add_per_s']:>10,.0f}{qps:>11,.0f}{latency_ms:>10.2f}{row['recall_at_10']:>11.3f}"
              f"{row['bytes_per_vector']:>10.1f}{row['peak_rss_gib']:>14.2f}{row['step_s']:>8.0f}"
              f"{row['load_avg_1min']:>6.1f}", flush=True)
        if stored is not None:
            t = time.perf_counter()
            row["sweep"] = sweep(index, queries, exact.ids, stored.take(size), nprobes, depths, ef_search)
            row["sweep_s"] = time.perf_counter() - t
            print(f"{'':>12}{'nprobe':>8}{'queries/s':>11}{'recall@10':>11}"
                  + "".join(f"{f'rerank {d}: q/s':>17}{'recall':>8}" for d in depths), flush=True)
            for r in row["sweep"]:
                print(f"{'':>12}{r['nprobe']:>8}{r['queries_per_s']:>11,.0f}{r['recall_at_10']:>11.3f}"
                      + "".join(f"{r['reranked'][d]['queries_per_s']:>17,.0f}{r['reranked'][d]['recall_at_10']:>8.3f}"
                                for d in depths), flush=True)

    peak = peak_rss_gib()
    result = {"spec": spec, "auto_spec": faiss_index.auto_spec(sizes[-1]), "nlist": ivf_lists, "add_ef_search": add_ef,
              "train_vectors": train_n, "train_s": train_s, "nprobe": nprobe, "ef_search": ef_search, "k": k,
              "dim": DIM, "block_size": block_size, "seed": seed, "threads": faiss.omp_get_max_threads(),
              "faiss": faiss.__version__, "sweep_nprobe": nprobes, "rerank_depths": depths,
              "sweep_block_size": stored.block_size if stored else None, "sizes": rows, "peak_rss_gib": peak,
              "max_rss_gib": max_rss_gib,
              "total_s": time.perf_counter() - started}
    print(f"peak RSS {peak:.2f} GiB (limit {max_rss_gib} GiB); total {result['total_s']:.0f} s", flush=True)
    return result


def _rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakAnon:
    """The largest anonymous resident memory (RssAnon) seen while it runs, sampled every `every` seconds."""

    def __init__(self, every: float = 0.02):
        self.peak, self.every, self.stop = _rss_anon_bytes(), every, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.wait(self.every):
            self.peak = max(self.peak, _rss_anon_bytes())

    def end(self) -> float:
        self.stop.set()
        self.thread.join()
        return max(self.peak, _rss_anon_bytes()) / 2**30


def _read_bytes() -> int:
    """Bytes this process caused to be read from the storage layer (page faults of mapped files included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to drop `path`'s pages from the page cache (synced first: dirty pages are not dropped,
    nor pages some process still maps). No root needed, unlike /proc/sys/vm/drop_caches."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_share(path: Path) -> float:
    """The share of `path`'s pages in the page cache: mincore(2) over a fresh read-only mapping, which maps
    without touching a page (Python's mmap gives no address to pass to mincore, hence libc directly)."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = os.sysconf("SC_PAGE_SIZE")
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
    try:
        vec = ctypes.create_string_buffer((size + page - 1) // page)
        if libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
        return float((np.frombuffer(vec.raw, dtype=np.uint8) & 1).mean())
    finally:
        libc.munmap(addr, size)


def search_cold(path: Path, queries: np.ndarray, truth: np.ndarray, k: int, nprobe: int,
                singles: int = 10) -> dict:
    """`--cold`: the index at `path` searched with its files dropped from the page cache (see the docstring).
    Nothing may hold the index open: mapped pages are not dropped."""
    files = [f for f in (path, faiss_index.lists_file(path)) if f.exists()]
    row = {"cold_files": [f.name for f in files],
           "cached_before_drop": min(cached_share(f) for f in files)}
    for f in files:
        drop_from_page_cache(f)
    row["cached_after_drop"] = max(cached_share(f) for f in files)
    read = _read_bytes()
    searcher = faiss_index.load(path, mmap=True)
    faiss_index.set_search_params(searcher, nprobe, 0)
    t = time.perf_counter()
    _, got = searcher.search(queries, k)
    row["cold_batch_s"] = time.perf_counter() - t
    row["cold_queries_per_s"] = len(queries) / row["cold_batch_s"]
    row["cold_read_gb"] = (_read_bytes() - read) / 1e9
    row["cold_recall_at_10"] = recall_at(got[:len(truth)], truth)
    latencies = []
    for q in queries[:singles]:
        del searcher
        for f in files:
            drop_from_page_cache(f)
        searcher = faiss_index.load(path, mmap=True)
        faiss_index.set_search_params(searcher, nprobe, 0)
        t = time.perf_counter()
        searcher.search(q[None], k)
        latencies.append(time.perf_counter() - t)
    row["cold_latency_ms"] = float(np.median(latencies)) * 1000
    row["cold_single_queries"] = singles
    return row


def storage_child(storage: str, size: int, spec: str, dim: int, block_size: int, seed: int, n_queries: int,
                  n_recall: int, k: int, nprobe: int, folder: Path, cold: bool = False) -> dict:
    """One index stage, lists in memory or on disk, then a search of what it wrote (see the docstring)."""
    anon = PeakAnon()
    gen = ClusteredVectors(seed, rank=min(192, dim // 2), dim=dim, block_size=block_size)
    n_train = faiss_index.train_sample_size(-1, spec, dim, size)
    trained = faiss_index.train(spec, np.concatenate([x for _, x in gen.rows(0, n_train)]), seed=seed)
    queries = gen.queries(n_queries)
    exact = RunningTopK(queries[:n_recall], k)
    path = folder / "index.faiss"
    anon_before = _rss_anon_bytes() / 2**30
    t = time.perf_counter()
    blocks_written = []
    if storage == "memory":
        index = trained
    else:
        faiss_index.save(trained, folder / "trained.faiss")
        index = faiss_index.load(folder / "trained.faiss")
    for first, x in gen.rows(0, size):
        index.add_with_ids(x, np.arange(first, first + len(x), dtype=np.int64))
        exact.update(first, x)
        if storage == "ondisk":
            blocks_written.append((folder / f"block-{first // block_size:06d}.ivflists", len(x)))
            faiss_index.save_lists(index, blocks_written[-1][0])
            index.reset()
    merge_s = 0.0
    if storage == "ondisk":
        merge_s = time.perf_counter()
        lists = [faiss_index.read_lists(p, n) for p, n in blocks_written]
        index = faiss_index.merge_lists(faiss_index.load(folder / "trained.faiss"), lists, folder / "index.ivfdata")
        faiss_index.save(index, path)
        merge_s = time.perf_counter() - merge_s
        del lists
        for p, _ in blocks_written:
            p.unlink()
    else:
        faiss_index.save(index, path)
    del index
    add_s = time.perf_counter() - t
    row = {"storage": storage, "vectors": size, "spec": spec, "dim": dim, "train_vectors": n_train,
           "add_s": add_s, "merge_s": merge_s, "peak_rss_gib": peak_rss_gib(), "peak_anon_gib": anon.end(),
           "anon_before_add_gib": anon_before,
           "bytes": sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("index."))}
    searcher = faiss_index.load(path, mmap=True)
    faiss_index.set_search_params(searcher, nprobe, 0)
    row["queries_per_s"], row["latency_ms"] = measure_search(searcher, queries, k)
    row["recall_at_10"] = recall_at(searcher.search(queries[:n_recall], k)[1], exact.ids)
    row["nprobe"] = nprobe
    if cold:
        del searcher  # its mapped pages would stay in the page cache
        row.update(search_cold(path, queries, exact.ids, k, nprobe))
    return row


def compare_storage(sizes: list[int], spec: str, dim: int, block_size: int, seed: int, n_queries: int,
                    n_recall: int, k: int, nprobe: int, store_dir: Path, cold: bool = False) -> list[dict]:
    """`--storage`: every size in memory and on disk, each in its own process; prints the table."""
    print(f"index stage, lists in memory vs on disk: {spec}, dim {dim}, blocks of {block_size:,}; faiss "
          f"{faiss.__version__}, {faiss.omp_get_max_threads()} threads", flush=True)
    print(f"{'vectors':>12}{'storage':>9}{'add s':>8}{'merge s':>9}{'peak RSS GiB':>14}{'peak anon GiB':>15}"
          f"{'anon before':>13}{'GB on disk':>12}{'queries/s':>11}{'ms alone':>10}{'recall@10':>11}{'load':>6}",
          flush=True)
    rows = []
    for size in sizes:
        for storage in ("memory", "ondisk"):
            with tempfile.TemporaryDirectory(prefix="bench-storage-", dir=store_dir) as tmp:
                args = json.dumps({"storage": storage, "size": size, "spec": spec, "dim": dim,
                                   "block_size": block_size, "seed": seed, "n_queries": n_queries,
                                   "n_recall": n_recall, "k": k, "nprobe": nprobe, "folder": tmp, "cold": cold})
                proc = subprocess.run([sys.executable, __file__, "--storage-child", args], capture_output=True,
                                      text=True)
                if proc.returncode != 0:
                    sys.exit(f"the {storage} run at {size:,} failed:\n{proc.stderr[-3000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{size:>12,}{storage:>9}{row['add_s']:>8.1f}{row['merge_s']:>9.1f}{row['peak_rss_gib']:>14.2f}"
                  f"{row['peak_anon_gib']:>15.2f}{row['anon_before_add_gib']:>13.2f}{row['bytes'] / 1e9:>12.2f}"
                  f"{row['queries_per_s']:>11,.0f}{row['latency_ms']:>10.2f}{row['recall_at_10']:>11.3f}"
                  f"{os.getloadavg()[0]:>6.1f}", flush=True)
            if cold:
                print(f"{'':>12}  cold ({' + '.join(row['cold_files'])} cached {row['cached_before_drop']:.0%} -> "
                      f"{row['cached_after_drop']:.1%} after POSIX_FADV_DONTNEED): batch "
                      f"{row['cold_queries_per_s']:,.0f} queries/s ({row['cold_batch_s']:.1f} s, "
                      f"{row['cold_read_gb']:.2f} GB read from disk), "
                      f"{row['cold_latency_ms']:.1f} ms alone (median of {row['cold_single_queries']}, dropped before "
                      f"each), recall@10 {row['cold_recall_at_10']:.3f}", flush=True)
    return rows


def main() -> None:
    d = DBConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,3000000,10000000",
                    help="database sizes to measure at, ascending, comma-separated")
    ap.add_argument("--train", type=int, default=None,
                    help="training vectors (default: db.index_train_samples, as retro db build)")
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists (default: auto_spec's for the largest size)")
    ap.add_argument("--spec", default=None, help="a Faiss factory string instead of OPQ32_64,IVF<nlist>_HNSW32,PQ32")
    ap.add_argument("--queries", type=int, default=1000, help="queries per timed batch")
    ap.add_argument("--recall-queries", type=int, default=100, help="queries checked against exact search")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nprobe", type=int, default=d.nprobe)
    ap.add_argument("--ef-search", type=int, default=d.ef_search)
    ap.add_argument("--sweep-nprobe", default="16,64,256,1024",
                    help="after each size, recall@10 and queries/s at these nprobe too ('': no sweep)")
    ap.add_argument("--rerank", default="50,100,200",
                    help="in the sweep, also re-rank the index's top N by the stored vectors (db.rerank), each N")
    ap.add_argument("--store-dir", default=str(REPO / "runs"),
                    help="where the sweep's float16 blocks go, in a temporary folder removed at the end: 2 x 384 "
                         "bytes a vector, 7.7 GB at 10M (default: runs/ of the repository, on disk, not a tmpfs)")
    ap.add_argument("--block-size", type=int, default=100_000, help="vectors generated and added at a time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-rss-gib", type=float, default=4.0, help="exit 1 when peak RSS exceeds this")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--compare", default=None, metavar="EMBED_DIR",
                    help="only compare the synthetic vectors with a workspace's embeddings (db/embed), 60k of each")
    ap.add_argument("--storage", default=None, metavar="SIZES",
                    help="only compare the index stage with its lists in memory and on disk at these sizes")
    ap.add_argument("--storage-spec", default="IVF1024,Flat", help="the index of --storage")
    ap.add_argument("--storage-dim", type=int, default=64, help="the vectors' dimensions in --storage")
    ap.add_argument("--cold", action="store_true",
                    help="with --storage: also search after dropping the index's files from the page cache")
    ap.add_argument("--storage-child", default=None, help=argparse.SUPPRESS)  # one run of --storage, as JSON
    args = ap.parse_args()
    if args.compare:
        compare(Path(args.compare))
        return
    if args.storage_child:
        kw = json.loads(args.storage_child)
        print(json.dumps(storage_child(**{**kw, "folder": Path(kw["folder"])})))
        return
    if args.storage:
        sizes = [int(s.replace("_", "")) for s in args.storage.split(",")]
        Path(args.store_dir).mkdir(parents=True, exist_ok=True)
        rows = compare_storage(sizes, args.storage_spec, args.storage_dim, args.block_size, args.seed, args.queries,
                               args.recall_queries, args.k, args.nprobe, Path(args.store_dir), args.cold)
        if args.json:
            Path(args.json).write_text(json.dumps({"storage": rows}, indent=1) + "\n")
        return
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",")]
    if sizes != sorted(set(sizes)) or sizes[0] <= 0:
        ap.error(f"--sizes must be positive and ascending, got {args.sizes}")
    if args.recall_queries > args.queries:
        ap.error("--recall-queries cannot exceed --queries")
    nprobes = [int(x) for x in args.sweep_nprobe.split(",") if x.strip()]
    depths = [int(x) for x in args.rerank.split(",") if x.strip()]
    if nprobes and depths and min(depths) <= args.k:
        ap.error(f"--rerank depths must exceed --k ({args.k}), got {args.rerank!r}")
    with contextlib.ExitStack() as stack:  # the sweep's blocks, in a folder of their own, removed at the end
        store = None
        if nprobes:
            Path(args.store_dir).mkdir(parents=True, exist_ok=True)
            store = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.store_dir)))
        result = run(sizes, args.train, args.nlist, args.spec, args.queries, args.recall_queries, args.k,
                     args.nprobe, args.ef_search, args.block_size, args.seed, args.max_rss_gib, nprobes, depths,
                     store)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if result["peak_rss_gib"] > args.max_rss_gib:
        sys.exit(f"peak RSS {result['peak_rss_gib']:.2f} GiB exceeds --max-rss-gib {args.max_rss_gib}")


if __name__ == "__main__":
    main()
