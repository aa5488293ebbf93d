"""`make bench-db`: the database stages, measured side by side in one run (ratios, not absolute targets).

1. Embed: the embedder's own forward throughput on pre-tokenised, length-sorted batches, against the
   whole embed stage (decode chunk tokens to text, tokenise in the background thread, forward, save
   blocks) on the same chunks at the same batch size. Target: the stage within 80% of the forward.
2. Index and query: on a workspace's real embeddings (or on synthetic clustered vectors when none is
   built), for several Faiss index types: train and add time, queries/s and recall@10 against exact
   search for the same queries, index bytes per chunk; an index of PQ codes also re-ranked as `db.rerank`
   = -1 does (its top 200 in order by the stored embeddings, read back from the embed blocks).
3. `retro db add`: 1,000 new documents added to synthetic databases of 10,000 and 100,000 chunks (lexical
   embedder, IVF,SQ8): seconds per 1,000 added chunks for each size. Target: proportional to the
   new documents, not to the database (the two figures about equal).
4. Peak memory (max RSS) of this process.

    python benchmarks/bench_db.py [--config recipes/books-qa-db.toml] [--chunks 512] [--queries 2000]
    python benchmarks/bench_db.py --only-edits
    python benchmarks/bench_db.py --only-indexes --specs "auto;IVF1024,PQ32"
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from retrocli.config import load_config  # noqa: E402
from retrocli.db import index as faiss_index  # noqa: E402
from retrocli.db.build import chunk_texts  # noqa: E402
from retrocli.db.database import Database, EmbeddingStore, open_tokenizer, workspace_of  # noqa: E402
from retrocli.db.embed import HFEmbedder, embed_blocks, resolve_embedder_path  # noqa: E402
from retrocli.db.search import Reranked  # noqa: E402
from retrocli.db.store import ChunkStore  # noqa: E402
from retrocli.workspace import save_npy_atomic  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_embed(cfg, store: ChunkStore, tok, n_chunks: int, batch_size: int) -> dict:
    d = cfg.db
    embedder = HFEmbedder(resolve_embedder_path(d.embedder, cfg.base_dir), batch_size=batch_size,
                          precision=d.embed_precision)
    rng = np.random.default_rng(0)
    start = int(rng.integers(0, max(1, store.num_chunks - n_chunks)))
    end = min(store.num_chunks, start + n_chunks)
    texts = chunk_texts(store, tok, start, end)
    # The same blocks for both: the stage sorts chunks by length within a block, so the forward alone
    # gets the very same batches, and the ratio isolates the pipeline around the model.
    step = -(-len(texts) // 4)
    spans = [(i, start + s, min(end, start + s + step)) for i, s in enumerate(range(0, len(texts), step))]
    prepared_blocks = [embedder.prepare(chunk_texts(store, tok, s, e)) for _, s, e in spans]
    embedder.forward(embedder.prepare(texts[:batch_size]))  # warm-up

    def forward_only() -> float:
        t = time.perf_counter()
        for prepared in prepared_blocks:
            embedder.forward(prepared)
        return len(texts) / (time.perf_counter() - t)

    def whole_stage() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            embed_blocks(embedder, spans, lambda s, e: chunk_texts(store, tok, s, e),
                         lambda i, a: save_npy_atomic(Path(tmp) / f"b{i}.npy", a))
            return len(texts) / (time.perf_counter() - t)

    # interleaved, so that load from other processes falls on both alike
    runs = {"forward": [], "stage": []}
    for _ in range(2):
        runs["forward"].append(forward_only())
        runs["stage"].append(whole_stage())
    fwd, stage = float(np.mean(runs["forward"])), float(np.mean(runs["stage"]))
    lengths = [int(b["attention_mask"].sum(1).float().mean()) for p in prepared_blocks for b in p[1]]
    return {"embedder": d.embedder, "precision": str(embedder.dtype).replace("torch.", ""),
            "batch_size": batch_size, "chunks": len(texts), "mean_wordpieces": int(np.mean(lengths)),
            "forward_chunks_per_s": fwd, "stage_chunks_per_s": stage, "stage_over_forward": stage / fwd}


def bench_indexes(vectors: np.ndarray, queries: np.ndarray, specs: list[str], nprobe: int, k: int = 10,
                  take=None) -> list:
    """Each index against exact search; an index of PQ codes also as `db.rerank` = -1 searches it, its top
    RERANK_PQ put in order by `take(positions)`, the stored vectors of those database positions."""
    n, dim = vectors.shape
    ids = np.arange(n, dtype=np.int64)
    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    t = time.perf_counter()
    _, truth = exact.search(queries, k)
    exact_qps = len(queries) / (time.perf_counter() - t)
    rows = [{"index": "Flat (exact)", "train_s": 0.0, "add_s": 0.0, "qps": exact_qps, "recall@10": 1.0,
             "bytes_per_chunk": dim * 4}]
    rng = np.random.default_rng(0)
    for spec in specs:
        sample = vectors[np.sort(rng.choice(n, size=min(n, 200_000), replace=False))]
        t = time.perf_counter()
        index = faiss_index.train(spec, sample, seed=0)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        index.add_with_ids(vectors, ids)
        add_s = time.perf_counter() - t
        faiss_index.set_search_params(index, nprobe, 64)
        with tempfile.NamedTemporaryFile() as f:
            faiss.write_index(index, f.name)
            size = Path(f.name).stat().st_size
        searchers = [(spec, index)]
        if take is not None and faiss_index.stores_pq_codes(spec):
            searchers.append((f"{spec} +rerank {faiss_index.RERANK_PQ}", Reranked(index, take, faiss_index.RERANK_PQ)))
        for name, searcher in searchers:
            t = time.perf_counter()
            _, got = searcher.search(queries, k)
            qps = len(queries) / (time.perf_counter() - t)
            recall = float(np.mean([len(set(g) & set(tr)) / k for g, tr in zip(got, truth)]))
            rows.append({"index": name, "train_s": train_s, "add_s": add_s, "qps": qps, "recall@10": recall,
                         "bytes_per_chunk": size / n})
    return rows


def bench_paraphrases(cfg, path: Path, k: int = 5) -> None:
    """Sentences paraphrased by hand from passages of the corpus: is the passage's chunk in the top k?"""
    from retrocli.db.database import query

    rows = [line.split("\t", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")]
    t = time.perf_counter()
    results = query(cfg, [text for _, text in rows], k)
    seconds = time.perf_counter() - t
    meta = workspace_of(cfg).read_meta("index")
    spec = meta["counts"].get("spec", meta["settings"]["index"])
    print(f"\n== paraphrase queries through `retro db query` (index {spec}, top {k}, {seconds:.1f} s with the "
          "embedder load)")
    found = 0
    for (expected, text), hits in zip(rows, results):
        ranks = [h["rank"] for h in hits if expected in str(h["doc_id"])]
        found += bool(ranks)
        print(f"  {'rank ' + str(ranks[0]) if ranks else 'MISSED':<8} {expected:<28} {text[:70]}")
    print(f"  found {found}/{len(rows)} in the top {k}")


def _synthetic_corpus(path: Path, n_docs: int, words: int, seed: int) -> None:
    import json

    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    vocab = np.array(["".join(syllables[(i // 80**j) % 80] for j in range(1 + i % 3)) for i in range(5000)])
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            zipf = np.minimum(rng.zipf(1.3, words), len(vocab)) - 1
            f.write(json.dumps({"id": f"{path.stem}-{i}", "text": " ".join(vocab[zipf])}) + "\n")


def bench_edits(sizes: tuple[int, ...] = (10_000, 100_000), new_docs: int = 1000) -> list[dict]:
    """Seconds of `edits.add` for `new_docs` short documents into databases of each size (in chunks): the
    first add (which also indexes the keys of the base's documents, once per database) and a second one of
    other documents (what every later add costs)."""
    from retrocli.config import config_from_dict
    from retrocli.db import build as db
    from retrocli.db import edit as edits

    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            # made-up words of 1-3 syllables; ~960 make about 16 chunks of 64 tokens with 2,000 pieces
            _synthetic_corpus(root / "base.jsonl", max(size // 16, 1), 960, 0)
            _synthetic_corpus(root / "new.jsonl", new_docs, 40, 1)  # about one chunk each
            _synthetic_corpus(root / "later.jsonl", new_docs, 40, 2)
            data = {"workspace": {"dir": str(root / "ws"), "seed": 1},
                    "corpus": {"train": [str(root / "base.jsonl")], "valid_fraction": 0.0},
                    "tokenizer": {"vocab_size": 2000},
                    "db": {"chunk_length": 64, "embedder": "lexical", "index": "auto", "block_size": 20000}}
            cfg = config_from_dict(data, source=root / "retro.toml")
            start = time.perf_counter()
            metas = db.build(cfg)
            build_s = time.perf_counter() - start
            start = time.perf_counter()
            edits.add(cfg, [str(root / "new.jsonl")])
            first_s = time.perf_counter() - start
            start = time.perf_counter()
            added = edits.add(cfg, [str(root / "later.jsonl")])
            add_s = time.perf_counter() - start
            rows.append({"database_chunks": metas["chunks"]["counts"]["chunks"], "build_s": build_s,
                         "first_add_s": first_s, "added_documents": added["documents"],
                         "added_chunks": added["chunks"], "add_s": add_s,
                         "s_per_1000_chunks": add_s / max(added["chunks"], 1) * 1000,
                         "embed_s": added["seconds_embed"], "neighbours_s": added["seconds_neighbours"]})
    return rows


def print_edits(rows: list[dict]) -> None:
    print("\n== retro db add (1,000 new documents; lexical embedder, index auto; the second add of two)")
    print(f"  {'database chunks':>16}{'build s':>10}{'first add s':>13}{'added docs':>12}{'added chunks':>14}"
          f"{'add s':>8}{'s / 1k chunks':>15}{'embed s':>9}{'search s':>10}")
    for r in rows:
        print(f"  {r['database_chunks']:>16,}{r['build_s']:>10.1f}{r['first_add_s']:>13.2f}{r['added_documents']:>12,}"
              f"{r['added_chunks']:>14,}{r['add_s']:>8.2f}{r['s_per_1000_chunks']:>15.2f}{r['embed_s']:>9.2f}"
              f"{r['neighbours_s']:>10.2f}")
    if len(rows) > 1:
        print(f"  add time, largest / smallest database: {rows[-1]['add_s'] / rows[0]['add_s']:.2f}x "
              f"for {rows[-1]['database_chunks'] / rows[0]['database_chunks']:.0f}x the chunks (target ~1x)")


def _search_worker(path: str, mmap: bool, queries: np.ndarray, out) -> None:
    index = faiss_index.load(Path(path), mmap=mmap)
    index.search(queries, 10)  # touches every vector of a flat index
    mem = {}
    for line in open("/proc/self/smaps_rollup"):
        key, value = line.split(":", 1)
        if key in ("Rss", "Pss"):
            mem[key.lower()] = int(value.split()[0]) / 1024
    out.put(mem)


def bench_index_sharing(n: int = 1_000_000, dim: int = 128, procs: int = 2) -> list[dict]:
    """`procs` processes search the same flat index of n x dim float32 at once, read into each one's memory
    or memory-mapped (how the neighbour stage's ranks and concurrent queries open it): RSS and PSS (the
    process's share of pages it shares) per process, MiB."""
    import multiprocessing as mp
    import tempfile

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    index.add_with_ids(x, np.arange(n))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "index.faiss")
        faiss.write_index(index, path)
        del index
        ctx = mp.get_context("spawn")
        for mmap in (False, True):
            out = ctx.Queue()
            workers = [ctx.Process(target=_search_worker, args=(path, mmap, x[:100], out)) for _ in range(procs)]
            for w in workers:
                w.start()
            mems = [out.get() for _ in workers]
            for w in workers:
                w.join()
            rows.append({"mmap": mmap, "index_mib": os.path.getsize(path) / 2**20, "procs": procs,
                         "rss_mib": [round(m["rss"]) for m in mems], "pss_mib": [round(m["pss"]) for m in mems]})
    return rows


def print_sharing(rows: list[dict]) -> None:
    print(f"\n== one index, {rows[0]['procs']} processes searching it at once "
          f"({rows[0]['index_mib']:.0f} MiB flat index)")
    for r in rows:
        how = "memory-mapped (retro)" if r["mmap"] else "read into each process"
        print(f"  {how:<24} RSS per process {r['rss_mib']} MiB, PSS (own share) {r['pss_mib']} MiB, "
              f"machine total ~{sum(r['pss_mib'])} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "recipes/books-qa-db.toml"))
    ap.add_argument("--data-dir", default=None, help="(unused: the recipe names its data)")
    ap.add_argument("--chunks", type=int, default=1024, help="chunks for the embed measurement")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--nprobe", type=int, default=None, help="default: db.nprobe of the config")
    ap.add_argument("--specs", default="auto;IVF1024,SQ8;IVF1024,PQ32;IVF1024,PQ32np;HNSW32",
                    help="index factory strings separated by ';' ('auto' = what db.index=auto picks)")
    ap.add_argument("--paraphrases", default=str(REPO / "benchmarks/paraphrases.tsv"),
                    help="expected doc id <TAB> paraphrase, checked on the books-qa workspace")
    ap.add_argument("--only-edits", action="store_true", help="only the `retro db add` measurement")
    ap.add_argument("--only-sharing", action="store_true", help="only the index memory-sharing measurement")
    ap.add_argument("--only-indexes", action="store_true", help="only the index and query measurement")
    args = ap.parse_args()
    if args.only_edits:
        print_edits(bench_edits())
        return
    if args.only_sharing:
        print_sharing(bench_index_sharing())
        return

    cfg = load_config(args.config)
    ws = workspace_of(cfg)
    if not (ws.read_meta("embed") or {}).get("complete"):
        tiny = REPO / "recipes/tiny.toml"
        print(f"{args.config}: embed stage not built; run `retro db build -c {args.config}` for real figures. "
              f"Using {tiny}.")
        cfg = load_config(tiny)
        ws = workspace_of(cfg)
        if not (ws.read_meta("embed") or {}).get("complete"):
            sys.exit(f"build it first: retro db build -c {tiny}")
    store = Database.open(ws, cfg.db.chunk_length).store
    tok = open_tokenizer(ws)
    nprobe = args.nprobe or cfg.db.nprobe
    print(f"workspace {ws.root}: {store.num_chunks:,} chunks; faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads, GPUs {faiss.get_num_gpus()}")

    if not args.only_indexes:
        e = bench_embed(cfg, store, tok, args.chunks, args.batch_size)
        print(f"\n== embed ({e['embedder']}, {e['precision']}, batch {e['batch_size']}, {e['chunks']} chunks, "
              f"~{e['mean_wordpieces']} word pieces each)")
        print(f"  embedder forward alone : {e['forward_chunks_per_s']:8.1f} chunks/s")
        print(f"  whole embed stage      : {e['stage_chunks_per_s']:8.1f} chunks/s")
        print(f"  stage / forward        : {e['stage_over_forward']:8.2f}   (target >= 0.80)")

    emb = EmbeddingStore(ws, store.num_chunks)
    train = np.flatnonzero(store.train_mask())
    vectors = emb.take(train)
    rng = np.random.default_rng(1)
    queries = emb.take(np.sort(rng.choice(store.num_chunks, size=min(args.queries, store.num_chunks),
                                          replace=False)))
    specs = [faiss_index.auto_spec(len(train)) if s == "auto" else s for s in args.specs.split(";")]
    specs = list(dict.fromkeys(specs))
    print(f"\n== index and query ({len(vectors):,} database chunks, {len(queries):,} queries, top 10, "
          f"nprobe {nprobe}; 'auto' -> {faiss_index.auto_spec(len(train))})")
    print(f"  {'index':<30}{'train s':>9}{'add s':>9}{'queries/s':>11}{'recall@10':>11}{'B/chunk':>9}")
    for r in bench_indexes(vectors, queries, [s for s in specs if s != "Flat"], nprobe,
                           take=lambda positions: emb.take(train[positions])):
        print(f"  {r['index']:<30}{r['train_s']:9.2f}{r['add_s']:9.2f}{r['qps']:11.0f}{r['recall@10']:11.3f}"
              f"{r['bytes_per_chunk']:9.0f}")
    if args.only_indexes:
        return
    if args.paraphrases and Path(args.paraphrases).exists() and "books-qa" in str(ws.root):
        bench_paraphrases(cfg, Path(args.paraphrases))
    print_edits(bench_edits())
    print_sharing(bench_index_sharing())
    print(f"\npeak memory (max RSS): {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
