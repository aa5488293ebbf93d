"""The BM25 index of the database's chunks (db.lexical_index = "bm25"), and the fusion of its ranking with the
dense one (db.query_mode = "hybrid").

    chunk store --bm25--> db/bm25/ (bm25s' own numpy and JSON files, chunk-ids.npy, meta.json)

The stage is optional and nothing is built from it, so it sits beside DB_STAGES (which every database has)
rather than among them: `db info`, `db verify` and `--rebuild STAGE` do not list it. It records its settings in
its meta.json as the other stages do, is skipped when complete with the same settings, and is made again when
they change (it is cheap, and no later stage would have to follow) or when its files were damaged.

Only the chunks of the store as built are indexed: documents `retro db add` added are not found by BM25 (dense
search finds them); chunks `retro db remove` removed are left out of every BM25 search.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import bm25s
import numpy as np

from ..config import DBConfig, min_chunk_tokens
from ..errors import UserError
from ..runtime import log
from ..workspace import Workspace, load_npy, save_npy_atomic
from .store import ChunkStore

STAGE = "bm25"
# bm25s' defaults (Lucene's BM25), recorded in the stage's settings: changing one here rebuilds the stage
METHOD, K1, B = "lucene", 1.5, 0.75
STOPWORDS = "en"  # bm25s' English list; no stemmer (it would add PyStemmer for little on chunk text)
RRF_K = 60  # reciprocal rank fusion: score = sum over rankers of 1 / (RRF_K + rank), rank from 1
FUSION_DEPTH = 50  # each ranker contributes its top max(k, FUSION_DEPTH)


class LexicalWorkspace(Workspace):
    """The workspace with the optional bm25 stage's folder, so that `begin`, `finish`, `damaged` and
    `read_meta` serve it as they serve every stage (workspace.py names only the stages every database has)."""

    def stage_dir(self, stage: str) -> Path:
        return self.db / STAGE if stage == STAGE else super().stage_dir(stage)


def tokenize(texts: list[str]) -> list[list[str]]:
    """Words as bm25s splits them (lower case, 2+ word characters, English stop words out): chunks and queries
    alike."""
    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)


def settings_of(d: DBConfig, chunk_meta: dict, tok_meta: dict) -> dict:
    # The text indexed is the chunk alone, not chunk + continuation: a hit is the chunk whose id it returns, the
    # unit the dense index embeds (db/embed), so both rankings that "hybrid" fuses rank the same passages.
    return {"method": METHOD, "k1": K1, "b": B, "stopwords": STOPWORDS, "text": "chunk",
            "min_chunk_tokens": min_chunk_tokens(d), "chunks": chunk_meta["fingerprint"],
            "tokenizer": tok_meta["fingerprint"], "bm25s": bm25s.__version__}


def indexed_rows(store: ChunkStore, d: DBConfig) -> np.ndarray:
    """The chunk rows the dense index holds (training chunks of db.min_chunk_tokens or more): the same here."""
    return np.flatnonzero(store.train_mask() & (store.chunks["length"] >= min_chunk_tokens(d))).astype(np.int64)


def stage_bm25(d: DBConfig, base: Workspace, chunk_meta: dict, tok_meta: dict, tok, rebuild: bool) -> dict:
    """Build (or skip) the BM25 index of the chunk store's chunks; returns the stage's metadata."""
    ws = LexicalWorkspace(base.root)
    settings = settings_of(d, chunk_meta, tok_meta)
    meta = ws.read_meta(STAGE)
    if meta is not None and (meta["settings"] != settings or (meta.get("complete") and ws.damaged(STAGE))):
        rebuild = True  # other settings (or damaged files): made again, not refused; nothing is built from it
    done = ws.begin(STAGE, settings, rebuild)
    if done:
        return done
    started = time.time()
    store = ChunkStore.open(ws, d.chunk_length)
    rows = indexed_rows(store, d)
    if len(rows) == 0:
        raise UserError("no chunk to index for BM25: the database is empty")
    texts = [tok.decode(store.chunk_ids(int(r)).tolist()) for r in rows]
    index = bm25s.BM25(method=METHOD, k1=K1, b=B)
    index.index(bm25s.tokenize(texts, stopwords=STOPWORDS, show_progress=False), show_progress=False)
    # bm25s writes its files one by one: into a scratch folder first, then each renamed into place, so a killed
    # build never leaves a file that looks finished (the stage is complete only once `finish` says so)
    scratch = ws.stage_dir(STAGE) / ".building"
    shutil.rmtree(scratch, ignore_errors=True)
    index.save(scratch, corpus=None, allow_pickle=False, show_progress=False)  # numpy (no pickle) and JSON
    for f in scratch.iterdir():
        os.replace(f, ws.stage_dir(STAGE) / f.name)
    scratch.rmdir()
    save_npy_atomic(ws.stage_dir(STAGE) / "chunk-ids.npy", rows)  # BM25 document i is chunk rows[i]
    seconds = round(time.time() - started, 2)
    log(f"bm25: {len(rows):,} chunks indexed, {len(index.vocab_dict):,} words, {seconds}s")
    return ws.finish(STAGE, {"chunks": int(len(rows)), "vocabulary": len(index.vocab_dict), "seconds": seconds})


class Bm25Index:
    """The finished BM25 stage, for searching free texts: `search(texts, k)` -> (chunk ids, scores), (n, k),
    -1 and 0 where fewer chunks share a word with the text."""

    def __init__(self, ws: Workspace, chunk_meta: dict, removed_chunks: np.ndarray, mode: str):
        ws = LexicalWorkspace(ws.root)
        meta = ws.read_meta(STAGE)
        if meta is None or not meta.get("complete"):
            raise UserError(f"db.query_mode {mode!r} searches the database's BM25 index, which is not built in "
                            f"{ws.stage_dir(STAGE)}: set db.lexical_index = \"bm25\" (in [db], or --set "
                            f"db.lexical_index=bm25) and run `retro db build`, or use db.query_mode \"dense\"")
        if meta["settings"]["chunks"] != chunk_meta["fingerprint"]:
            raise UserError(f"the BM25 index in {ws.stage_dir(STAGE)} was built from another chunk store: run "
                            f"`retro db build` (with db.lexical_index = \"bm25\") to make it again")
        # memory-mapped: one copy per machine, however many processes search it
        self.index = bm25s.BM25.load(ws.stage_dir(STAGE), mmap=True, allow_pickle=False)
        self.chunk_ids = load_npy(ws.stage_dir(STAGE) / "chunk-ids.npy")
        self.mask = None
        if len(removed_chunks):  # removed chunks score 0, and a score of 0 is no hit
            self.mask = (~np.isin(self.chunk_ids, removed_chunks)).astype(np.float32)

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
        best = sorted(fused.items(), key=lambda item: -item[1])[:k]  # (a stable sort)
        for slot, (cid, score) in enumerate(best):
            ids[q, slot], scores[q, slot] = cid, score
    return ids, scores
