"""Question-to-passage recall of the ways `retro` can search a database with questions, on held-out questions,
and the choices behind db.query_mode = "hybrid": which fusion, which dense weight, and whether BM25 should index
chunks or documents.

The workspace must hold a database with a BM25 stage (db.lexical_index = "bm25") whose documents include the
gold passages of the QA files (e.g. corpus/qa_paragraphs.jsonl.gz of the shared data). Every question is
searched once by each ranker (dense: the workspace's embedder and index; BM25: the bm25 stage), top 100; the
fusions are then computed from those rankings with the product's own functions (`bm25.mix`, `bm25.fuse`),
so each variant costs no search. Hits are matched by document, as `retro db eval --match document` does.

Each file is split into tuning questions, on which the fusion and weight are chosen (the best mean
recall@5 over the files), and test questions, on which the choice is then measured once: the first
--test questions are the test set (what `retro db eval --limit` evaluates), the next --tune the tuning set.

Every ranking of chunks is shown as the product shows it (`database.distinct_passages`: a chunk that is the
continuation of a better hit is left out). BM25 over title + chunk + continuation and over whole documents (with
their titles) are built here in memory with the stage's settings (bm25s, Lucene, stemmed, bm25.K1, bm25.B), and
compared in distinct documents (a ranking of chunks is reduced to the documents in the order they first appear).

    python benchmarks/bench_recall.py -c ws.toml --qa squad_dev_shared.json.gz:2000:2000 \\
        --qa qed_nq_train.jsonl.gz:1000:1000 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import bm25s
import numpy as np

from retrocli.config import DBConfig, load_config, min_chunk_tokens
from retrocli.db import bm25
from retrocli.db import recall as R
from retrocli.db.database import Database, distinct_passages

DEPTH = 100
FUSE_DEPTH = bm25.FUSION_DEPTH
DEPTHS = (20, 50, 100)  # fusion depths compared at each weight
KS = (1, 5, 20)
WEIGHTS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
RRF_KS = (10, 30, 60)
W = DBConfig().hybrid_weight  # the default weight, for the comparisons of BM25's unit


def questions(db: Database, path: Path, n: int) -> tuple[list[str], list[np.ndarray]]:
    """The first n questions of `path` whose gold passage is a searchable database document, and its rows."""
    gold = R.GoldDocuments(db.store, db.tokenizer, min_chunk_tokens(db.settings))
    _, records = R.read_questions(path, None)
    qs, rows = [], []
    for r in records:
        if len(qs) == n:
            break
        if r.contexts and len(found := gold.rows(r.contexts[0]["text"])):
            qs.append(r.question)
            rows.append(found)
    return qs, rows


def recall(ids: np.ndarray, gold: list[np.ndarray], to_doc: np.ndarray | None) -> dict[int, float]:
    """recall@k of rankings `ids` (chunk ids, or document rows when to_doc is None), -1 for none."""
    out = {}
    for k in KS:
        hits = 0
        for row, g in zip(ids, gold):
            row = row[row >= 0]
            docs = to_doc[row] if to_doc is not None else row
            hits += bool(np.isin(docs[:k], g).any())
        out[k] = round(hits / len(gold), 3)
    return out


def distinct_docs(ids: np.ndarray, to_doc: np.ndarray) -> np.ndarray:
    """Each ranking of chunks as the documents in the order they first appear (-1 padded)."""
    out = np.full(ids.shape, -1, dtype=np.int64)
    for q, row in enumerate(ids):
        docs = list(dict.fromkeys(to_doc[row[row >= 0]].tolist()))
        out[q, : len(docs)] = docs
    return out


def index_texts(texts: list[str]) -> bm25s.BM25:
    index = bm25s.BM25(method=bm25.METHOD, k1=bm25.K1, b=bm25.B)
    index.index(bm25.word_ids(bm25.tokenize(texts)), show_progress=False)
    return index


def search_texts(index: bm25s.BM25, ids: np.ndarray, qs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    found, scores = index.retrieve(bm25.tokenize(qs), k=DEPTH, show_progress=False, n_threads=1)
    return np.where(scores > 0, ids[found], -1), scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", type=Path, required=True)
    ap.add_argument("--qa", action="append", required=True, help="FILE:TEST:TUNE (question counts)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = load_config(args.config)
    db = Database.open(cfg, require=("index",))
    retriever, store, tok = db.retriever(), db.store, db.tokenizer
    to_doc = np.asarray(store.chunks["doc"])
    chunk_rows = np.asarray(retriever.bm25.chunk_ids)
    print(f"database: {len(store.docs):,} documents, {len(chunk_rows):,} chunks in BM25", flush=True)

    started = time.time()
    cont = [store.continuation(int(r)) for r in chunk_rows]
    title = {row: info.get("title") or "" for row, info in store.iter_doc_info()}
    with_cont = index_texts([title[int(to_doc[r])] + "\n" + tok.decode(
        store.chunk_ids(int(r)).tolist() + ([] if c is None else store.chunk_ids(c).tolist()))
        for r, c in zip(chunk_rows, cont)])
    doc_rows = np.arange(len(store.docs), dtype=np.int64)
    whole = index_texts([title[int(r)] + "\n" + tok.decode(store.doc_ids(int(r)).tolist()) for r in doc_rows])
    print(f"BM25 over chunk + continuation and over documents: {time.time() - started:.1f}s", flush=True)

    report: dict = {}
    for spec in args.qa:
        path, n_test, n_tune = spec.rsplit(":", 2)
        qs, gold = questions(db, Path(path), int(n_test) + int(n_tune))
        t0 = time.perf_counter()
        dense, dist = retriever.dense_search(qs, DEPTH)
        t1 = time.perf_counter()
        lexical, scores = retriever.bm25.search(qs, DEPTH)
        t2 = time.perf_counter()
        cc, cc_scores = search_texts(with_cont, chunk_rows, qs)
        dd, dd_scores = search_texts(whole, doc_rows, qs)
        sim = 1.0 - dist  # (distance = 1 - cosine)
        name = Path(path).name
        report[name] = {"questions/s": {"dense": round(len(qs) / (t1 - t0), 1), "bm25": round(len(qs) / (t2 - t1), 1)}}
        for part, sl in (("test", slice(0, int(n_test))), ("tune", slice(int(n_test), None))):
            g, d, ds, b, bs = gold[sl], dense[sl], sim[sl], lexical[sl], scores[sl]

            def shown(ids: np.ndarray) -> np.ndarray:
                return distinct_passages(store, ids, np.zeros(ids.shape, np.float32), DEPTH // 2)[0]

            rows: dict[str, dict] = {"dense": recall(shown(d), g, to_doc), "bm25": recall(shown(b), g, to_doc)}
            for k in RRF_KS:
                fused = bm25.fuse([d[:, :FUSE_DEPTH], b[:, :FUSE_DEPTH]], DEPTH, k)[0]
                rows[f"rrf k={k}"] = recall(shown(fused), g, to_doc)
            for w in WEIGHTS:
                for depth in DEPTHS:
                    mixed = bm25.mix([(d[:, :depth], ds[:, :depth]), (b[:, :depth], bs[:, :depth])], [w, 1 - w],
                                     DEPTH)[0]
                    rows[f"linear {w} depth {depth}"] = recall(shown(mixed), g, to_doc)
            # in distinct documents: BM25 over chunks, chunk + continuation, documents; each fused at db's weight
            units = {"chunks": (b, bs), "chunk+continuation": (cc[sl], cc_scores[sl])}
            dense_docs = distinct_docs(d, to_doc)
            for unit, (ids, sc) in units.items():
                rows[f"docs: bm25 {unit}"] = recall(distinct_docs(ids, to_doc), g, None)
                mixed = bm25.mix([(d[:, :FUSE_DEPTH], ds[:, :FUSE_DEPTH]), (ids[:, :FUSE_DEPTH], sc[:, :FUSE_DEPTH])],
                                 [W, 1 - W], DEPTH)[0]
                rows[f"docs: linear {W} + bm25 {unit}"] = recall(distinct_docs(mixed, to_doc), g, None)
            rows["docs: dense"] = recall(dense_docs, g, None)
            rows["docs: bm25 documents"] = recall(dd[sl], g, None)
            # documents fused with the dense ranking reduced to documents (each with its best chunk's score)
            best = np.full(dense_docs.shape, 0.0)
            for q in range(len(d)):
                seen: dict[int, float] = {}
                for cid, s in zip(d[q].tolist(), ds[q].tolist()):
                    if cid >= 0:
                        seen.setdefault(int(to_doc[cid]), s)
                best[q, : len(seen)] = list(seen.values())
            mixed = bm25.mix([(dense_docs[:, :FUSE_DEPTH], best[:, :FUSE_DEPTH]),
                              (dd[sl][:, :FUSE_DEPTH], dd_scores[sl][:, :FUSE_DEPTH])], [W, 1 - W], DEPTH)[0]
            rows[f"docs: linear {W} + bm25 documents"] = recall(mixed, g, None)
            report[name][part] = {"questions": len(g), **rows}
            print(f"\n{name}, {part} ({len(g)} questions): recall@{','.join(map(str, KS))}")
            for label, r in rows.items():
                print(f"  {label:40s} " + "  ".join(f"{r[k]:.3f}" for k in KS))
        print(f"  questions/s: {report[name]['questions/s']}", flush=True)
    labels = [label for label in report[next(iter(report))]["tune"] if label.startswith(("rrf", "linear"))]
    tuned = {label: np.mean([report[f]["tune"][label][5] for f in report]) for label in labels}
    choice = max(tuned, key=tuned.get)
    print(f"\nbest mean recall@5 on the tuning questions: {choice} ({tuned[choice]:.3f}); on the test questions: "
          + ", ".join(f"{f} {report[f]['test'][choice][5]:.3f}" for f in report))
    report["chosen"] = {"fusion": choice, "tuning_mean_recall@5": round(float(tuned[choice]), 3)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
