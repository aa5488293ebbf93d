"""The retrieval database as every reader sees it: the chunk store as built, with the documents `retro db add`
added and `retro db remove` removed (one read of the edit manifest), its index over both, its embeddings, its
neighbour table, and its tokenizer and embedder as they were built. `retro db build` (build.py) and
`retro db add | remove` (edit.py) write it; everything else reads it through this module.

The edits, beside the stages `retro db build` writes:

    db/edits/manifest.json   the live segments, the removed documents, the sources added (file, ids, hash)
    db/edits/trained.faiss   the base index emptied: its trained quantizer, for new segments to add into
    db/edits/base-keys.npz   the base documents' keys (hashes of id and of tokens, sorted), made by the first
                             `db add` so that later ones find duplicates without reading the database
    db/edits/add-000001/     one segment per `db add`: a chunk store of the new documents (as store.py
                             writes it), their embeddings, a Faiss index of the base's trained type holding
                             their chunks, their chunks' neighbours (for pretraining on them) and
                             their documents' keys
    db/edits/index-000002/   `db add --retrain`: an index trained afresh on every live chunk and holding them
                             all (base and segments so far); searches use it instead of the base index
    db/edits/refresh-000003/ `db build` after removals: the precomputed neighbour rows that named a removed
                             chunk, searched again (rows.npy, ids.npy); pretraining reads them over the blocks

Rows continue the base store's: segment i's first document row is the base's document count plus those
of the segments before it; the same for chunks and tokens, so every id in the base index and in the
precomputed neighbours keeps its meaning. A removed document stays in the store (rows never move) and
its chunks are filtered out of every search (`EditedIndex`) and of the neighbours pretraining reads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np

from ..config import SET, Config, DBConfig, min_chunk_tokens
from ..data.tokenizer import load_tokenizer
from ..errors import UserError
from ..runtime import warn
from ..workspace import NpyRows, Workspace, load_npy
from . import index as faiss_index
from .embed import Embedder, make_embedder
from .search import Reranked, search_excluding
from .store import STORE_FILES, ChunkStore, JoinedTokens

MANIFEST_VERSION = 1


def edits_dir(ws: Workspace) -> Path:
    return ws.db / "edits"


def empty_manifest(ws: Workspace) -> dict[str, Any]:
    chunks = ws.read_meta("chunks") or {}
    return {"version": MANIFEST_VERSION, "base": {"chunks_fingerprint": chunks.get("fingerprint")},
            "segments": [], "removed": [], "sources": []}


def read_manifest(ws: Workspace) -> dict[str, Any]:
    """The edits in force (none: an empty manifest). Edits made to a chunk store that has since been rebuilt
    no longer fit its rows: refused, with what to do."""
    import json

    path = edits_dir(ws) / "manifest.json"
    if not path.is_file():
        return empty_manifest(ws)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({e}): restore it, or delete {edits_dir(ws)} to drop every edit") from None
    current = (ws.read_meta("chunks") or {}).get("fingerprint")
    if manifest.get("base", {}).get("chunks_fingerprint") != current:
        raise UserError(f"the edits in {edits_dir(ws)} were made to a chunk store that has since been rebuilt: "
                        f"delete {edits_dir(ws)} and `retro db add` the documents again")
    return manifest


def _segment_store(folder: Path, chunk_length: int) -> ChunkStore:
    tokens, docs, chunks, info = (folder / name for name in STORE_FILES)
    return ChunkStore(load_npy(tokens), load_npy(docs), load_npy(chunks), [(info, 0)], chunk_length)


def open_store(ws: Workspace, chunk_length: int) -> ChunkStore:
    """The chunk store as every reader wants it: as built, with the documents added and removed since."""
    return with_edits(ws, ChunkStore.open(ws, chunk_length))


def with_edits(ws: Workspace, base: ChunkStore, manifest: dict[str, Any] | None = None) -> ChunkStore:
    """The base store followed by every added segment, with the removed documents listed (as of `manifest`,
    default: the one in force)."""
    manifest = manifest if manifest is not None else read_manifest(ws)
    removed = np.array(sorted({r for entry in manifest["removed"] for r in entry["rows"]}), dtype=np.int64)
    if not manifest["segments"]:
        return dataclasses.replace(base, removed_docs=removed, manifest=manifest)
    tokens, docs, chunks, infos = [base.tokens], [base.docs], [base.chunks], list(base.doc_info_paths)
    n_tok, n_doc, n_chunk = len(base.tokens), len(base.docs), len(base.chunks)
    for seg in manifest["segments"]:
        part = _segment_store(edits_dir(ws) / seg["name"], base.chunk_length)
        d = np.array(part.docs)
        d["token_start"] += n_tok
        d["chunk_start"] += n_chunk
        c = np.array(part.chunks)
        c["doc"] += n_doc
        c["token_start"] += n_tok
        tokens.append(part.tokens)
        docs.append(d)
        chunks.append(c)
        infos.append((part.doc_info_paths[0][0], n_doc))
        n_tok, n_doc, n_chunk = n_tok + len(part.tokens), n_doc + len(d), n_chunk + len(c)
    return ChunkStore(JoinedTokens(tokens), np.concatenate(docs), np.concatenate(chunks), infos, base.chunk_length,
                      removed, manifest)


def removed_chunks(store: ChunkStore) -> np.ndarray:
    """The chunk ids of the removed documents, sorted."""
    if not len(store.removed_docs):
        return np.zeros(0, dtype=np.int64)
    d = store.docs[store.removed_docs]
    return np.sort(np.concatenate([np.arange(s, s + n) for s, n in zip(d["chunk_start"], d["num_chunks"])]))


def refreshed_rows(ws: Workspace, store: ChunkStore) -> tuple[np.ndarray, np.ndarray]:
    """The neighbour rows `db build` searched again after removals, as of `store`'s edits: (rows (n,) sorted
    global chunk rows, ids (n, num_neighbors_query)); empty when there are none."""
    refresh = (store.manifest or {}).get("refresh")
    if not refresh:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.int64)
    folder = edits_dir(ws) / refresh["name"]
    return load_npy(folder / "rows.npy"), load_npy(folder / "ids.npy")


def segment_neighbours(ws: Workspace, store: ChunkStore) -> list[tuple[int, np.ndarray]]:
    """(first global chunk row, neighbour ids (n, num_neighbors_query)) of each segment `store` was opened
    with (the same manifest read as its rows)."""
    segments = (store.manifest or {}).get("segments", [])
    out, first = [], store.num_chunks - sum(seg["chunks"] for seg in segments)
    for seg in segments:
        table = load_npy(edits_dir(ws) / seg["name"] / "neighbours.npy")
        out.append((first, table))
        first += len(table)
    return out


class EditedIndex:
    """The base index and every added segment's index searched as one, removed chunks left out.

    Quacks like the Faiss index `neighbours.search_excluding` needs: `search(x, k)`, `ntotal`, `metric_type`.
    """

    def __init__(self, parts: list[faiss.Index], removed: np.ndarray):
        self.parts, self.removed = parts, removed
        self.metric_type = parts[0].metric_type
        self.ntotal = sum(p.ntotal for p in parts)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kk = k + len(self.removed)  # enough to fill k after dropping every removed chunk
        found = [p.search(x, min(kk, p.ntotal)) for p in self.parts if p.ntotal]
        D, I = np.concatenate([f[0] for f in found], 1), np.concatenate([f[1] for f in found], 1)
        bad = (I < 0) | np.isin(I, self.removed)
        worst = -np.inf if self.metric_type == faiss.METRIC_INNER_PRODUCT else np.inf
        D = np.where(bad, worst, D)
        order = np.argsort(-D if self.metric_type == faiss.METRIC_INNER_PRODUCT else D, axis=1, kind="stable")[:, :k]
        I, D = np.take_along_axis(np.where(bad, -1, I), order, 1), np.take_along_axis(D, order, 1)
        if I.shape[1] < k:  # fewer vectors than k: pad as Faiss does
            pad = k - I.shape[1]
            I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
            D = np.pad(D, ((0, 0), (0, pad)), constant_values=worst)
        return D, I


def edited_index(ws: Workspace, d: DBConfig, store: ChunkStore) -> faiss.Index | EditedIndex:
    """The index as of the edits `store` was opened with (one manifest read for both: a `db add` finishing
    in between cannot pair a store without a segment with an index that has it): the base index (or the one
    `db add --retrain` trained) and the segments it does not hold, removed chunks left out."""
    manifest = store.manifest or empty_manifest(ws)
    retrained = manifest.get("index")
    base = faiss_index.load(edits_dir(ws) / retrained["name"] / "index.faiss" if retrained else ws.index_file,
                            mmap=True)
    faiss_index.set_search_params(base, d.nprobe, d.ef_search)
    covered = set(retrained["segments"]) if retrained else set()
    segments = [seg for seg in manifest["segments"] if seg["name"] not in covered]
    if not segments and not manifest["removed"]:
        return base
    parts = [base]
    for seg in segments:
        part = faiss_index.load(edits_dir(ws) / seg["name"] / "index.faiss", mmap=True)
        faiss_index.set_search_params(part, d.nprobe, d.ef_search)
        parts.append(part)
    return EditedIndex(parts, removed_chunks(store))


def _embedding_layout(ws: Workspace, store: ChunkStore) -> tuple[Any, list[tuple[int, int, Path]]]:
    """Where the embeddings of `store`'s chunks lie: the base's blocks (db.EmbeddingStore, rows from 0) and
    each added segment's (first row, chunks, embeddings.npy)."""

    segments = (store.manifest or {}).get("segments", [])
    first = store.num_chunks - sum(seg["chunks"] for seg in segments)
    base = EmbeddingStore(ws, first)
    out = []
    for seg in segments:
        out.append((first, seg["chunks"], edits_dir(ws) / seg["name"] / "embeddings.npy"))
        first += seg["chunks"]
    return base, out


def embeddings_of(ws: Workspace, store: ChunkStore) -> Callable[[np.ndarray], np.ndarray]:
    """A function from chunk rows of `store` to their stored embeddings, (n, dim) float32 (`db.rerank`)."""
    base, segments = _embedding_layout(ws, store)
    dim = int(ws.require("embed")["counts"]["dim"])

    def vectors(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), dim), dtype=np.float32)
        sel = rows < base.n
        if sel.any():
            out[sel] = base.take(rows[sel])
        for first, n, path in segments:
            sel = (rows >= first) & (rows < first + n)
            if sel.any():
                out[sel] = load_npy(path)[rows[sel] - first]
        return out

    return vectors


def workspace_of(cfg: Config) -> Workspace:
    return Workspace(cfg.resolve(cfg.workspace.dir))


def _finished_meta(ws: Workspace, stage: str) -> dict | None:
    """The metadata of a complete stage, or None (none, unfinished, or unreadable: a rebuild replaces it)."""
    try:
        meta = ws.read_meta(stage)
    except UserError:
        return None
    return meta if meta and meta.get("complete") else None


def tokenizer_source(ws: Workspace, settings: dict) -> Path:
    """The tokenizer's own file or folder: the workspace copy of a SentencePiece model, a Hugging Face folder."""
    return Path(settings["path"]) if settings["type"] == "hf" else ws.tokenizer_model


def tokenizer_sha256(meta: dict) -> str | None:
    """The content sha256 a finished tokenizer stage recorded (stages finished before it was recorded: the
    sha256 of its SentencePiece file); None where unknown."""
    recorded = meta.get("counts", {}).get("sha256")
    if recorded is None and meta["settings"]["type"] == "sentencepiece":
        recorded = (meta.get("files") or {}).get("tokenizer.model", {}).get("sha256")
    return recorded


def open_tokenizer(ws: Workspace, settings: dict | None = None):
    settings = settings or ws.require("tokenizer")["settings"]
    return load_tokenizer(settings["type"], tokenizer_source(ws, settings))


class EmbeddingStore:
    """Read access to the embedding blocks as if they were one (num_chunks, dim) array. The block size is the
    one the embed stage recorded, whatever db.block_size says now."""

    SCATTERED = 64  # a block with fewer rows wanted is read row by row (NpyRows), else mapped

    def __init__(self, ws: Workspace, num_chunks: int):
        self.ws, self.n = ws, num_chunks
        self.block_size = int(ws.require("embed")["settings"]["block_size"])
        self.scattered = NpyRows()

    def block(self, i: int) -> np.ndarray:
        return load_npy(self.ws.embed_block(i))

    def rows(self, start: int, end: int) -> np.ndarray:
        """(end - start, dim) float32."""
        b0, b1 = start // self.block_size, (end - 1) // self.block_size
        parts = []
        for b in range(b0, b1 + 1):
            lo, hi = max(start, b * self.block_size), min(end, (b + 1) * self.block_size)
            parts.append(self.block(b)[lo - b * self.block_size : hi - b * self.block_size])
        return np.concatenate(parts).astype(np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows in the order given, (n, dim) float32 (read block by block)."""
        rows = np.asarray(rows)
        order = np.argsort(rows, kind="stable")
        out = None
        sorted_rows = rows[order]
        blocks_of = sorted_rows // self.block_size
        bounds = np.flatnonzero(np.diff(blocks_of)) + 1
        for lo, hi in zip([0, *bounds], [*bounds, len(rows)]):  # each block's run of the sorted rows
            b = int(blocks_of[lo])
            local = sorted_rows[lo:hi] - b * self.block_size
            data = (self.scattered.read(self.ws.embed_block(b), local) if len(local) < self.SCATTERED
                    else self.block(b)[local])
            if out is None:
                out = np.empty((len(rows), data.shape[1]), dtype=np.float32)
            out[order[lo:hi]] = data  # (converted to float32 as it is copied)
        return out


def open_index(ws: Workspace, d: DBConfig, edits: bool = True, store: ChunkStore | None = None):
    """The trained index; with edits=True also the segments `retro db add` added and without the chunks
    `retro db remove` removed (edits.EditedIndex), as of the edits `store` was opened with (default: now).
    With db.rerank (resolved for the index built) = N > 0 its top N are put in exact order by the stored
    embeddings (neighbours.Reranked)."""

    depth = faiss_index.rerank_depth(d.rerank, ws.require("index")["counts"]["spec"])
    if edits or depth:
        store = store or (open_store(ws, d.chunk_length) if edits else ChunkStore.open(ws, d.chunk_length))
    if edits:
        index = edited_index(ws, d, store)
    else:
        index = faiss_index.load(ws.index_file, mmap=True)  # one copy per machine, however many ranks search it
        faiss_index.set_search_params(index, d.nprobe, d.ef_search)
    return Reranked(index, embeddings_of(ws, store), depth) if depth else index


def built_db(ws: Workspace) -> dict[str, Any]:
    """The [db] keys as the finished stages recorded them, by key (db.min_chunk_tokens and db.rerank resolved).
    The block sizes are left out: each stage's own is read where its blocks are. The search settings come
    from the neighbours stage, once it is finished (a query may run while it is being built)."""
    chunks, embed, index = (ws.require(stage)["settings"] for stage in ("chunks", "embed", "index"))
    out = {"chunk_length": chunks["chunk_length"], "embedder": embed["embedder"], "index": index["index"],
           "index_train_samples": index["index_train_samples"], "min_chunk_tokens": index["min_chunk_tokens"]}
    nb = ws.read_meta("neighbours") or {}
    if nb.get("complete"):
        out.update({k: nb["settings"][k] for k in ("num_neighbors_query", "nprobe", "ef_search")},
                   rerank=nb["settings"].get("rerank", 0))  # (recorded only when on)
    return out


def config_differences(d: DBConfig, ws: Workspace) -> dict[str, tuple[Any, Any]]:
    """{key: (as built, as the config gives it now)} for each [db] key where they differ."""
    spec = ws.require("index")["counts"]["spec"]
    now = {**dataclasses.asdict(d), "min_chunk_tokens": min_chunk_tokens(d),
           "rerank": faiss_index.rerank_depth(d.rerank, spec)}
    return {k: (v, now[k]) for k, v in built_db(ws).items() if now[k] != v}


SEARCH_KNOBS = ("nprobe", "ef_search", "rerank")  # how hard a search looks: a reader may choose them per run


def as_built(cfg: Config, ws: Workspace, knobs: bool = True) -> DBConfig:
    """The [db] section a reader (db query, db info, db verify, ppl, generate, sft) searches with: the database's
    own settings, whatever the config says now (its embedder above all: a query embedded otherwise would be
    compared with vectors it has nothing in common with). Says so in one warning line where they differ. The
    search knobs (nprobe, ef_search, rerank) given by `--set` are this run's choice and are kept (`knobs`)."""
    chosen = {k: getattr(cfg.db, k) for k in SEARCH_KNOBS if knobs and cfg.origins.get(f"db.{k}") == SET}
    if differs := {k: v for k, v in config_differences(cfg.db, ws).items() if k not in chosen}:
        listed = "; ".join(f"db.{k} {built!r} (the config: {now!r})" for k, (built, now) in differs.items())
        warn(f"the database in {ws.db} was built with {listed}: read as built")
    return dataclasses.replace(cfg.db, **{**built_db(ws), **chosen})


def require_as_built(cfg: Config, ws: Workspace, command: str) -> None:
    """Writers (`db add`) add to what the database holds only with the settings it was built with (as `db build`
    refuses to mix settings): a UserError naming every key that differs, with both values, otherwise."""
    if differs := config_differences(cfg.db, ws):
        listed = "; ".join(f"db.{k}: built with {built!r}, the config now gives {now!r}"
                           for k, (built, now) in differs.items())
        raise UserError(f"`retro {command}` adds to the database in {ws.db}, which was built with other settings "
                        f"({listed}). Restore them in the config (or --set them), or rebuild the database")


def database_embedder(cfg: Config, ws: Workspace, d: DBConfig) -> Embedder:
    """The embedder the database was built with (`d`: `as_built`), for embedding anything compared with its
    vectors."""
    return make_embedder(d.embedder, cfg.base_dir, d.embed_batch_size, d.embed_precision, ws.lexical_idf(),
                         open_tokenizer(ws).encode)


class Retriever:
    """The workspace's embedder and index, loaded once, for searching free texts (queries, SFT prompts,
    text being generated): `search(texts, k)` -> (ids, distances), each (n, k), -1 where fewer exist.

    The texts belong to no database document, so nothing is excluded. Embedded 1,024 at a time."""

    def __init__(self, cfg: Config, ws: Workspace, store: ChunkStore, d: DBConfig | None = None):
        """`store`: the chunk store the results refer to (ChunkStore.open); the index is opened with the same
        edits (one read of the edit manifest), so ids and documents always agree. `d`: the [db] settings to
        search with, by default the database's own (`as_built`)."""
        ws.require("index")
        d = d or as_built(cfg, ws)
        self.embedder: Embedder = database_embedder(cfg, ws, d)
        self.index = open_index(ws, d, store=store)
        self.chunk_docs = np.ascontiguousarray(store.chunks["doc"])

    def embed(self, texts: list[str]) -> np.ndarray:
        """(n, dim) float32 vectors of the texts, as the database's chunks were embedded."""
        return np.concatenate([self.embedder.forward(self.embedder.prepare(texts[s : s + 1024]))
                               for s in range(0, len(texts), 1024)]).astype(np.float32)

    def search(self, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        vectors = self.embed(texts)
        none = np.full(len(texts), -1, dtype=np.int64)
        return search_excluding(self.index, vectors, none, self.chunk_docs, k)


def retrieve_neighbours(retriever: Retriever, store: ChunkStore, tok, chunks: list[list[int]], k: int, r: int,
                        pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest database chunks of each token chunk (searched by its text), as model neighbours:
    tokens (n, k, r) (chunk + continuation, padded with pad_id) and chunk ids (n, k), -1 where missing."""
    tokens = np.full((len(chunks), k, r), pad_id, dtype=np.int64)
    ids = np.full((len(chunks), k), -1, dtype=np.int64)
    if not chunks:
        return tokens, ids
    found, _ = retriever.search([tok.decode(list(c)) for c in chunks], k)
    for i, row in enumerate(found):
        for slot, cid in enumerate(row[row >= 0][:k]):
            toks = neighbour_tokens(store, int(cid), r)
            tokens[i, slot, : len(toks)] = toks
            ids[i, slot] = cid
    return tokens, ids


def search_texts(cfg: Config, ws: Workspace, texts: list[str], store: ChunkStore,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """One search of free texts (see `Retriever`), with the database's own settings."""
    return Retriever(cfg, ws, store).search(texts, k)


def query(cfg: Config, texts: list[str], k: int) -> list[list[dict[str, Any]]]:
    """The k nearest database chunks of each text, with continuation and source, searched as the database was
    built (`as_built`)."""
    ws = workspace_of(cfg)
    ws.require("index")  # before reading the chunk store: "run `retro db build` first", not a missing file
    d = as_built(cfg, ws)
    store = open_store(ws, d.chunk_length)
    tok = open_tokenizer(ws)
    ids, distances = Retriever(cfg, ws, store, d).search(texts, k)
    return describe_hits(store, tok, ids, distances)


def describe_hits(store: ChunkStore, tok, ids: np.ndarray, distances: np.ndarray) -> list[list[dict[str, Any]]]:
    """Search results (n, k) as readable hits: rank, distance, chunk and document ids, title, source file,
    the chunk's text and its continuation."""
    docs = store.doc_info(store.chunks["doc"][ids[ids >= 0]])
    results = []
    for qi in range(len(ids)):
        hits = []
        for rank, (cid, dist_) in enumerate(zip(ids[qi], distances[qi]), 1):
            if cid < 0:
                continue
            doc_row = int(store.chunks["doc"][cid])
            nxt = store.continuation(int(cid))
            info = docs.get(doc_row, {})
            hits.append({"rank": rank, "distance": float(dist_), "chunk_id": int(cid), "doc_id": info.get("id"),
                         "title": info.get("title", ""), "source": info.get("source", ""),
                         "text": tok.decode(store.chunk_ids(int(cid)).tolist()),
                         "continuation": tok.decode(store.chunk_ids(nxt).tolist()) if nxt is not None else ""})
        results.append(hits)
    return results


class NeighbourBlocks:
    """The database's neighbour files read as one (num_chunks, num_neighbors_query) int64 table: the blocks
    `db build` wrote, the segments `db add` wrote, and over both the rows searched again after removals."""

    def __init__(self, ws: Workspace, block_size: int, store: ChunkStore):
        """`store`: the chunk store the rows refer to; the rows of chunks `retro db add` added after the
        build come from the segments it was opened with."""
        self.ws, self.block_size = ws, block_size
        self._blocks: dict[int, np.ndarray] = {}
        self._segments = segment_neighbours(ws, store)
        self._refreshed = refreshed_rows(ws, store)  # rows `db build` searched again after removals

    def _block(self, b: int) -> np.ndarray:
        if b not in self._blocks:
            self._blocks[b] = load_npy(self.ws.neighbour_block(b))  # memory-mapped: cheap to keep open
        return self._blocks[b]

    def _row(self, r: int) -> np.ndarray:
        rows, ids = self._refreshed
        at = int(np.searchsorted(rows, r))
        if at < len(rows) and rows[at] == r:
            return ids[at]
        for first, table in reversed(self._segments):
            if r >= first:
                return table[r - first]
        return self._block(r // self.block_size)[r % self.block_size]

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        return np.stack([self._row(int(r)) for r in rows]) if len(rows) else np.zeros((0, 0), dtype=np.int64)


def neighbour_tokens(store: ChunkStore, cid: int, r: int) -> np.ndarray:
    """A database chunk followed by its continuation within the same document, at most r tokens."""
    toks = store.chunk_ids(cid)
    nxt = store.continuation(cid)
    if nxt is not None and len(toks) < r:
        toks = np.concatenate([toks, store.chunk_ids(nxt)])
    return toks[:r]
