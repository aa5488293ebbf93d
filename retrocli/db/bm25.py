"""The BM25 index of the database's chunks (db.lexical_index = "bm25"), and the fusion of its ranking with the
dense one (db.query_mode = "hybrid").

    chunk store --bm25--> db/bm25/ (bm25s' own numpy and JSON files, chunk-ids.npy, meta.json)

`bm25` is an optional stage (workspace.OPTIONAL_STAGES): built after the chunks when db.lexical_index asks for
it, checksummed, checked by `db verify` and listed by `db info` like every stage; nothing is built from it, so
when its settings change (or bm25s' version) it is made again rather than refused, and a killed build makes
it again from the start (1.9 s per 35,000 chunks on one core: there is nothing worth resuming).

Edits: BM25 scores carry the whole index's word statistics (each word's document frequency, the mean chunk
length), so the new documents of a `db add` cannot go into an index of their own, as their dense vectors do:
scored by the statistics of a handful of documents (a word in 1 of 1 documents weighs 0.29, in 1 of 35,000
9.9), a new passage would rank below weaker matches of the base. Each `db add` therefore indexes every live
chunk again, into db/edits/bm25-NNNNNN/ (`database.Lexical`), which BM25 searches then use (~40 s per million
chunks on one core); `db build` makes one where the edits lack it (documents added before the stage existed).
Chunks `retro db remove` removed are left out of every BM25 search, as of the dense ones.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

from ..config import DBConfig, min_chunk_tokens
from ..errors import UserError
from ..runtime import fault_point, log
from ..workspace import Workspace, load_npy, save_npy_atomic
from .store import ChunkStore

STAGE = "bm25"
# Recorded in the stage's settings: changing one here rebuilds the stage. Lucene's BM25 with Anserini's passage
# parameters (k1 0.9, b 0.4: they beat bm25s' 1.5 / 0.75 on the tuning questions by 1-1.5 points of recall@5)
METHOD, K1, B = "lucene", 0.9, 0.4
STOPWORDS = "en"  # bm25s' English list
STEMMER = "english"  # Snowball (PyStemmer, bm25s' own choice): +3 to +4 points of recall@5 on questions
RRF_K = 60  # reciprocal rank fusion: score = sum over rankers of 1 / (RRF_K + rank), rank from 1
# each ranker contributes its top max(2k, FUSION_DEPTH) (the search's candidates): for k up to 50 the fused
# ranking is the same whatever k; 100 edged out 50 and 20 on the tuning questions (benchmarks/bench_recall.py)
FUSION_DEPTH = 100
CHUNK_IDS = "chunk-ids.npy"  # BM25 document i is chunk CHUNK_IDS[i]


def tokenize(texts: list[str]) -> list[list[str]]:
    """Words as bm25s splits them (lower case, 2+ word characters, English stop words out), stemmed: chunks and
    queries alike."""
    words = bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)
    unique = sorted({w for ws in words for w in ws})
    stem = dict(zip(unique, Stemmer.Stemmer(STEMMER).stemWords(unique)))
    return [[stem[w] for w in ws] for ws in words]


def word_ids(words: list[list[str]]) -> bm25s.tokenization.Tokenized:
    """Ids in the order words first appear: what an index is built from. (bm25s' own stemming numbers the stems
    in the order of a set, which differs from one process to the next: the index files would too.)"""
    vocab: dict[str, int] = {}
    return bm25s.tokenization.Tokenized(ids=[[vocab.setdefault(w, len(vocab)) for w in ws] for ws in words],
                                        vocab=vocab)


def word_settings() -> dict:
    """The settings that decide how a text's words are counted: an index made with others than these cannot be
    searched with queries split by this code."""
    return {"method": METHOD, "k1": K1, "b": B, "stopwords": STOPWORDS, "stemmer": STEMMER, "text": "title+chunk"}


def settings_of(d: DBConfig, chunk_meta: dict, tok_meta: dict) -> dict:
    # The text indexed is the document's title and the chunk. The title names what a passage is about where the
    # passage itself does not ("Out of the Woods" for a paragraph on its video): with it BM25's recall@5 of NQ
    # questions goes from 0.66 to 0.82. Not the continuation: a hit is the chunk whose id it returns, the unit
    # the dense index embeds, so both rankings that "hybrid" fuses rank the same passages.
    return {**word_settings(),
            "min_chunk_tokens": min_chunk_tokens(d), "chunks": chunk_meta["fingerprint"],
            "tokenizer": tok_meta["fingerprint"], "bm25s": bm25s.__version__}


def indexed_rows(store: ChunkStore, d: DBConfig) -> np.ndarray:
    """The chunk rows the dense index holds (training chunks of db.min_chunk_tokens or more, not removed): the
    same here."""
    rows = np.flatnonzero(store.train_mask() & (np.asarray(store.chunks["length"]) >= min_chunk_tokens(d)))
    if len(store.removed_docs):
        docs = np.asarray(store.chunks["doc"])[rows]
        rows = rows[~np.isin(docs, store.removed_docs)]
    return rows.astype(np.int64)


def write_index(folder: Path, store: ChunkStore, rows: np.ndarray, tok) -> int:
    """Index the texts of chunks `rows` of `store` into `folder`; returns the vocabulary's size. bm25s writes its
    files one by one: into a scratch folder first, then each renamed into place, so a killed write never leaves
    a file that looks finished (the caller marks the index complete afterwards)."""
    if len(rows) == 0:
        raise UserError("no chunk to index for BM25: the database is empty")
    docs = np.asarray(store.chunks["doc"])[rows]
    titles = {row: info.get("title") or "" for row, info in store.doc_info(np.unique(docs)).items()}
    texts = [f"{titles[int(doc)]}\n{tok.decode(store.chunk_ids(int(r)).tolist())}" for r, doc in zip(rows, docs)]
    index = bm25s.BM25(method=METHOD, k1=K1, b=B)
    index.index(word_ids(tokenize(texts)), show_progress=False)
    scratch = folder / ".building"
    shutil.rmtree(scratch, ignore_errors=True)
    index.save(scratch, corpus=None, allow_pickle=False, show_progress=False)  # numpy (no pickle) and JSON
    fault_point("bm25:write")
    for f in sorted(scratch.iterdir()):
        os.replace(f, folder / f.name)
    scratch.rmdir()
    save_npy_atomic(folder / CHUNK_IDS, rows)
    return len(index.vocab_dict)


def stage_bm25(d: DBConfig, ws: Workspace, chunk_meta: dict, tok_meta: dict, tok, rebuild: bool) -> dict:
    """Build (or skip) the BM25 index of the chunk store's chunks; returns the stage's metadata."""
    settings = settings_of(d, chunk_meta, tok_meta)
    meta = ws.read_meta(STAGE)
    if meta is not None and meta["settings"] != settings:
        rebuild = True  # other settings: made again, not refused (nothing is built from it)
    done = ws.begin(STAGE, settings, rebuild)
    if done:
        return done
    started = time.time()
    store = ChunkStore.open(ws, d.chunk_length)
    rows = indexed_rows(store, d)
    vocabulary = write_index(ws.stage_dir(STAGE), store, rows, tok)
    seconds = round(time.time() - started, 2)
    log(f"bm25: {len(rows):,} chunks indexed, {vocabulary:,} words, {seconds}s")
    return ws.finish(STAGE, {"chunks": int(len(rows)), "vocabulary": vocabulary, "seconds": seconds})


def same_words(a: dict, b: dict) -> bool:
    """Whether two BM25 indexes' settings agree on everything but the chunks they hold."""
    return {k: v for k, v in a.items() if k != "chunks"} == {k: v for k, v in b.items() if k != "chunks"}


def edits_index(database, folder: Path) -> dict:
    """Index every live chunk of `database` (as it will be once the caller's manifest is written) into `folder`,
    which must not exist yet (written under a temporary name, then renamed). Returns the `database.Lexical`
    fields but its name."""
    started = time.time()
    rows = indexed_rows(database.store, database.settings)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_index(tmp, database.store, rows, database.tokenizer)
    tmp.rename(folder)
    log(f"bm25: every live chunk indexed again ({len(rows):,}, {time.time() - started:.1f}s)")
    return {"chunks": int(len(rows)), "segments": [s.segment.name for s in database.segments],
            "settings": database.ws.require(STAGE)["settings"], "built": time.strftime("%Y-%m-%dT%H:%M:%S")}


def in_force(database) -> tuple[Path | None, str]:
    """(the folder of the BM25 index searches use, or None where the edits lack an up-to-date one; why not)."""
    ws, manifest = database.ws, database.manifest
    meta = ws.read_meta(STAGE)
    if meta is None or not meta.get("complete"):
        return None, "not built"
    edit = manifest.bm25
    if not manifest.segments and edit is None:
        return ws.stage_dir(STAGE), ""
    if edit is None:
        return None, "the documents `retro db add` added are not in it"
    if edit.segments != [s.name for s in manifest.segments]:
        return None, "documents added since it was made are not in it"
    if not same_words(edit.settings, meta["settings"]):
        return None, "it was made with other BM25 settings than db/bm25/ has now"
    return ws.db / "edits" / edit.name, ""  # (database.edits_dir: bm25 is imported by database, not the reverse)


class Bm25Index:
    """The BM25 index searches use (the stage's, or the edits' after `db add`), for searching free texts:
    `search(texts, k)` -> (chunk ids, scores), (n, k), -1 and 0 where fewer chunks share a word with the text."""

    def __init__(self, database, mode: str):
        ws = database.ws
        meta = ws.read_meta(STAGE)
        if meta is None or not meta.get("complete"):
            raise UserError(f"db.query_mode {mode!r} searches the database's BM25 index, which is not built in "
                            f"{ws.stage_dir(STAGE)}: set db.lexical_index = \"bm25\" (in [db], or --set "
                            f"db.lexical_index=bm25) and run `retro db build`, or use db.query_mode \"dense\"")
        if meta["settings"]["chunks"] != ws.require("chunks")["fingerprint"]:
            raise UserError(f"the BM25 index in {ws.stage_dir(STAGE)} was built from another chunk store: run "
                            f"`retro db build` (with db.lexical_index = \"bm25\") to make it again")
        if any(meta["settings"].get(key) != value for key, value in word_settings().items()):
            raise UserError(f"the BM25 index in {ws.stage_dir(STAGE)} was built by an earlier retro, which counted "
                            f"words otherwise: run `retro db build` (with db.lexical_index = \"bm25\") to make it "
                            f"again")
        folder, why = in_force(database)
        if folder is None:
            raise UserError(f"the BM25 index of {ws.db} is out of date ({why}): run `retro db build` (with "
                            f"db.lexical_index = \"bm25\") to index the added documents")
        # memory-mapped: one copy per machine, however many processes search it
        self.index = bm25s.BM25.load(folder, mmap=True, allow_pickle=False)
        self.chunk_ids = load_npy(folder / CHUNK_IDS)
        self.mask = None
        removed = database.removed_chunks
        if len(removed):  # removed chunks score 0, and a score of 0 is no hit
            self.mask = (~np.isin(self.chunk_ids, removed)).astype(np.float32)

    def search(self, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(texts), k), -1, dtype=np.int64)
        scores = np.zeros((len(texts), k), dtype=np.float32)
        width = min(k, len(self.chunk_ids))
        if not texts or width == 0:
            return ids, scores
        docs, found = self.index.retrieve(tokenize(texts), k=width, show_progress=False, n_threads=1,
                                          weight_mask=self.mask)
        hit = found > 0  # no word in common (or removed): not a hit
        ids[:, :width] = np.where(hit, self.chunk_ids[docs], -1)
        scores[:, :width] = np.where(hit, found, 0.0)
        return ids, scores


def mix(rankings: list[tuple[np.ndarray, np.ndarray]], weights: list[float], k: int
        ) -> tuple[np.ndarray, np.ndarray]:
    """The linear mix of several rankings of the same queries, each (ids, scores) of shape (n, depth), -1 for
    none and higher scores better: each ranking's scores are min-max normalised per query over its hits (all
    equal: 1), and a chunk scores the weighted sum over the rankings that found it. Returns (ids, scores),
    (n, k), the best first; ties keep the order of first meeting, ranking by ranking."""
    n = len(rankings[0][0])
    ids = np.full((n, k), -1, dtype=np.int64)
    out = np.zeros((n, k), dtype=np.float32)
    for q in range(n):
        fused: dict[int, float] = {}
        for (found, scores), weight in zip(rankings, weights):
            hit = found[q] >= 0
            if not hit.any():
                continue
            s = scores[q][hit].astype(np.float64)
            span = s.max() - s.min()
            norm = (s - s.min()) / span if span > 0 else np.ones_like(s)
            for cid, v in zip(found[q][hit].tolist(), norm.tolist()):
                fused[cid] = fused.get(cid, 0.0) + weight * v
        _place(fused, ids[q], out[q])
    return ids, out


def fuse(rankings: list[np.ndarray], k: int, rrf_k: int = RRF_K) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal rank fusion of several rankings of the same queries, each (n, depth) chunk ids (-1: none):
    each chunk scores sum 1 / (rrf_k + rank) over the rankings that found it. Returns (ids, scores), (n, k), the
    best first; equal scores keep the order in which the rankings met them, rank by rank (the first ranking
    first)."""
    n = len(rankings[0])
    ids = np.full((n, k), -1, dtype=np.int64)
    scores = np.zeros((n, k), dtype=np.float32)
    depth = max(r.shape[1] for r in rankings)
    for q in range(n):
        fused: dict[int, float] = {}  # (dicts keep the order of first meeting)
        for rank in range(depth):
            for ranking in rankings:
                if rank < ranking.shape[1] and (cid := int(ranking[q, rank])) >= 0:
                    fused[cid] = fused.get(cid, 0.0) + 1.0 / (rrf_k + rank + 1)
        _place(fused, ids[q], scores[q])
    return ids, scores


def _place(fused: dict[int, float], ids: np.ndarray, scores: np.ndarray) -> None:
    """Write a query's fused chunks, the best first, into its rows `ids` and `scores` (as many as they hold);
    equal scores keep the dict's order (of first meeting: the sort is stable)."""
    best = sorted(fused.items(), key=lambda item: -item[1])[: len(ids)]
    for slot, (cid, score) in enumerate(best):
        ids[slot], scores[slot] = cid, score
