"""The retrieval database as every reader sees it: `Database.open(cfg or ws)` reads the edit manifest once and
gives the chunk store as built with the documents `retro db add` added and `retro db remove` removed, its index
over both, its embeddings, its neighbour table, and its tokenizer and embedder as they were built.
`retro db build` (build.py) and `retro db add | remove` (edit.py) write it; everything else reads it through
`Database`.

The edits, beside the stages `retro db build` writes:

    db/edits/manifest.json   the live segments, the removed documents, the sources added (file, ids, hash)
                             (`Manifest`)
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
    db/edits/bm25-000004/    with a BM25 index (db.lexical_index = "bm25"): each `db add` indexes every live
                             chunk again here (bm25.py says why); BM25 searches use it instead of db/bm25/

Rows continue the base store's: segment i's first document row is the base's document count plus those
of the segments before it; the same for chunks and tokens (`PlacedSegment`), so every id in the base index
and in the precomputed neighbours keeps its meaning. A removed document stays in the store (rows never
move) and its chunks are filtered out of every search (`EditedIndex`) and of the neighbours pretraining reads.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np

from ..config import SET, Config, DBConfig, min_chunk_tokens
from ..data.tokenizer import load_tokenizer
from ..errors import UserError
from ..runtime import warn
from ..workspace import DB_STAGES, NpyRows, Workspace, load_npy
from . import index as faiss_index
from .embed import Embedder, make_embedder
from .search import Reranked, search_excluding
from .store import ChunkStore, JoinedTokens

MANIFEST_VERSION = 1


def workspace_of(cfg: Config) -> Workspace:
    return Workspace(cfg.resolve(cfg.workspace.dir))


def edits_dir(ws: Workspace) -> Path:
    return ws.db / "edits"


def require_built(ws: Workspace, stages: Sequence[str] = DB_STAGES, needed_by: str | None = None) -> None:
    """The one check that the database is built: each of `stages` complete, else a UserError naming the stage
    and `retro db build`. `needed_by` (e.g. "`retro db add` edits a built database") opens the message."""
    for stage in stages:
        if needed_by is None:
            ws.require(stage)
        elif (ws.read_meta(stage) or {}).get("complete") is not True:
            raise UserError(f"{needed_by}, but its '{stage}' stage is not complete in {ws.db}: run `retro db build` "
                            f"first")


# ------------------------------------------------------------------------------------------ the manifest


@dataclass(frozen=True)
class Segment:
    """The documents one `db add` added, in edits/<name>/."""

    name: str
    documents: int
    chunks: int
    tokens: int
    added: str  # when, %Y-%m-%dT%H:%M:%S


@dataclass(frozen=True)
class Removal:
    """The documents one `db remove` removed."""

    rows: list[int]  # global document rows
    ids: list[str]
    sources: list[str]
    removed: str


@dataclass(frozen=True)
class Source:
    """A file `db add` read, and the documents of it that it added."""

    source: str
    segment: str
    documents: list[str]
    added: str
    sha256: str | None


@dataclass(frozen=True)
class Retrained:
    """`db add --retrain`: the index in edits/<name>/ that searches use instead of the base index."""

    name: str
    spec: str
    ntotal: int
    train_samples: int
    segments: list[str]  # the segments it holds (later ones are searched beside it)
    trained: str


@dataclass(frozen=True)
class Lexical:
    """The BM25 index in edits/<name>/ that BM25 searches use instead of the `bm25` stage's: made by `db add`
    (and by `db build` where one is missing) over every live chunk, base and segments, so that added documents
    are found and the words' statistics are those of the whole database."""

    name: str
    chunks: int  # the chunks it holds
    segments: list[str]  # the segments it holds: a later one it lacks makes it out of date
    settings: dict[str, Any]  # the bm25 stage's settings it was made with (the same words, the same BM25)
    built: str


@dataclass(frozen=True)
class Refresh:
    """`db build` after removals: the neighbour rows in edits/<name>/ searched again."""

    name: str
    removals: int  # the removals it accounts for
    rows: int
    searched_now: int
    seconds: float
    refreshed: str


@dataclass(frozen=True)
class Manifest:
    """The edits in force (db/edits/manifest.json), as one value: readers read it once."""

    chunks_fingerprint: str | None  # the chunk store the edits were made to
    segments: tuple[Segment, ...] = ()
    removed: tuple[Removal, ...] = ()
    sources: tuple[Source, ...] = ()
    index: Retrained | None = None
    refresh: Refresh | None = None
    bm25: Lexical | None = None

    @classmethod
    def empty(cls, ws: Workspace) -> Manifest:
        return cls((ws.read_meta("chunks") or {}).get("fingerprint"))

    @classmethod
    def read(cls, ws: Workspace) -> Manifest:
        """The edits in force (none: an empty manifest). Edits made to a chunk store that has since been rebuilt
        no longer fit its rows: refused, with what to do."""
        path = edits_dir(ws) / "manifest.json"
        if not path.is_file():
            return cls.empty(ws)
        try:
            manifest = cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{path} is damaged ({e}): restore it, or delete {edits_dir(ws)} to drop every "
                            "edit") from None
        if manifest.chunks_fingerprint != (ws.read_meta("chunks") or {}).get("fingerprint"):
            raise UserError(f"the edits in {edits_dir(ws)} were made to a chunk store that has since been rebuilt: "
                            f"delete {edits_dir(ws)} and `retro db add` the documents again")
        return manifest

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> Manifest:
        return cls(m["base"]["chunks_fingerprint"], tuple(Segment(**s) for s in m["segments"]),
                   tuple(Removal(**r) for r in m["removed"]), tuple(Source(**s) for s in m["sources"]),
                   Retrained(**m["index"]) if m.get("index") else None,
                   Refresh(**m["refresh"]) if m.get("refresh") else None,
                   Lexical(**m["bm25"]) if m.get("bm25") else None)

    def to_json(self) -> dict[str, Any]:
        out = {"version": MANIFEST_VERSION, "base": {"chunks_fingerprint": self.chunks_fingerprint},
               "segments": [dataclasses.asdict(s) for s in self.segments],
               "removed": [dataclasses.asdict(r) for r in self.removed],
               "sources": [dataclasses.asdict(s) for s in self.sources]}
        for key in ("index", "refresh", "bm25"):
            if getattr(self, key) is not None:
                out[key] = dataclasses.asdict(getattr(self, key))
        return out

    @property
    def folders(self) -> set[str]:
        """The edit folders it lists (segments, retrained index, refresh, BM25 index); any other is not live."""
        return {s.name for s in self.segments} | {x.name for x in (self.index, self.refresh, self.bm25)
                                                  if x is not None}

    @property
    def removed_docs(self) -> np.ndarray:
        """The removed document rows, sorted, int64."""
        return np.array(sorted({r for entry in self.removed for r in entry.rows}), dtype=np.int64)


@dataclass(frozen=True)
class PlacedSegment:
    """A segment with the global rows of its first document, chunk and token: those of the base store
    followed by the segments before it."""

    segment: Segment
    folder: Path
    doc: int
    chunk: int
    token: int


def place(segments: Sequence[Segment], folder: Path, base: ChunkStore) -> list[PlacedSegment]:
    """Where each segment's rows start, after `base` and the segments before it (the one place that adds
    up segment offsets)."""
    out, doc, chunk, token = [], len(base.docs), len(base.chunks), len(base.tokens)
    for seg in segments:
        out.append(PlacedSegment(seg, folder / seg.name, doc, chunk, token))
        doc, chunk, token = doc + seg.documents, chunk + seg.chunks, token + seg.tokens
    return out


# ------------------------------------------------------------------------------------------ the database


class Database:
    """The workspace's retrieval database as edited, as of one read of the edit manifest: every part it hands
    out (store, index, embeddings, neighbour table) refers to the same rows, so a `db add` finishing meanwhile
    cannot pair a store without a segment with an index that has it.

    `Database.open(cfg)` for readers that search (the settings are the database's own, `as_built`);
    `Database.open(ws, chunk_length)` for those that only read the store or the neighbour table."""

    def __init__(self, ws: Workspace, manifest: Manifest, chunk_length: int, cfg: Config | None = None,
                 settings: DBConfig | None = None):
        self.ws, self.manifest, self.cfg = ws, manifest, cfg
        if settings is not None:
            self.settings = settings  # (in place of the cached property's)
        base = ChunkStore.open(ws, chunk_length)
        self.segments = place(manifest.segments, edits_dir(ws), base)
        self.store = self._joined(base)

    @classmethod
    def open(cls, where: Config | Workspace, chunk_length: int | None = None, edits: bool = True,
             require: Sequence[str] = (), settings: DBConfig | None = None, cfg: Config | None = None) -> Database:
        """`where`: a config (the workspace it names, and its settings for searching) or a workspace (with `cfg`
        for searching, if it is to search).
        `chunk_length`: default the config's db.chunk_length. `edits=False`: the database as `retro db build`
        wrote it, without reading the edits. `require`: stages that must be complete (`require_built`) before
        anything is read. `settings`: the [db] settings to search with, default `as_built`."""
        ws = workspace_of(where) if isinstance(where, Config) else where
        cfg = where if isinstance(where, Config) else cfg
        require_built(ws, require)
        manifest = Manifest.read(ws) if edits else Manifest.empty(ws)
        return cls(ws, manifest, chunk_length or cfg.db.chunk_length, cfg, settings)

    def edited(self, manifest: Manifest) -> Database:
        """The same database under other edits (a writer's: the database as it will be once `manifest` is
        written)."""
        return Database(self.ws, manifest, self.store.chunk_length, self.cfg, self.__dict__.get("settings"))

    def _joined(self, base: ChunkStore) -> ChunkStore:
        """The base store followed by every segment, with the removed documents listed."""
        removed = self.manifest.removed_docs
        if not self.segments:
            return dataclasses.replace(base, removed_docs=removed)
        tokens, docs, chunks, infos = [base.tokens], [base.docs], [base.chunks], list(base.doc_info_paths)
        for p in self.segments:
            part = ChunkStore.at(p.folder, base.chunk_length)
            d = np.array(part.docs)
            d["token_start"] += p.token
            d["chunk_start"] += p.chunk
            c = np.array(part.chunks)
            c["doc"] += p.doc
            c["token_start"] += p.token
            tokens.append(part.tokens)
            docs.append(d)
            chunks.append(c)
            infos.append((part.doc_info_paths[0][0], p.doc))
        return ChunkStore(JoinedTokens(tokens), np.concatenate(docs), np.concatenate(chunks), infos,
                          base.chunk_length, removed)

    @property
    def base_chunks(self) -> int:
        """The chunks of the store as built (rows below it are the base's, at and above it the segments')."""
        return self.segments[0].chunk if self.segments else self.store.num_chunks

    @cached_property
    def removed_chunks(self) -> np.ndarray:
        """The chunk ids of the removed documents, sorted."""
        if not len(self.store.removed_docs):
            return np.zeros(0, dtype=np.int64)
        d = self.store.docs[self.store.removed_docs]
        return np.sort(np.concatenate([np.arange(s, s + n) for s, n in zip(d["chunk_start"], d["num_chunks"])]))

    # ----------------------------------------------------------------------------------- as built

    @cached_property
    def settings(self) -> DBConfig:
        """The [db] settings to search with: the database's own (`as_built`, which warns where the config
        differs), with the search knobs this run `--set`."""
        if self.cfg is None:
            raise TypeError("Database.open(ws) cannot search: open it with the config (Database.open(cfg))")
        return as_built(self.cfg, self.ws)

    @cached_property
    def tokenizer(self):
        return open_tokenizer(self.ws)

    @cached_property
    def embedder(self) -> Embedder:
        """The embedder the database was built with, for embedding anything compared with its vectors."""
        d = self.settings
        return make_embedder(d.embedder, self.cfg.base_dir, d.embed_batch_size, d.embed_precision,
                             self.ws.lexical_idf(), self.tokenizer.encode)

    def embed(self, texts: list[str]) -> np.ndarray:
        """(n, dim) float32 vectors of the texts, as the database's chunks were embedded (1,024 at a time)."""
        return np.concatenate([self.embedder.forward(self.embedder.prepare(texts[s : s + 1024]))
                               for s in range(0, len(texts), 1024)]).astype(np.float32)

    # ----------------------------------------------------------------------------------- stored vectors

    def embedding_parts(self) -> tuple[EmbeddingStore, list[tuple[int, int, Path]]]:
        """Where the embeddings of the store's chunks lie: the base's blocks (rows from 0) and each segment's
        (first row, chunks, embeddings.npy)."""
        return (EmbeddingStore(self.ws, self.base_chunks),
                [(p.chunk, p.segment.chunks, p.folder / "embeddings.npy") for p in self.segments])

    @cached_property
    def embeddings(self) -> Callable[[np.ndarray], np.ndarray]:
        """A function from chunk rows to their stored embeddings, (n, dim) float32 (`db.rerank`)."""
        base, segments = self.embedding_parts()
        dim = int(self.ws.require("embed")["counts"]["dim"])

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

    # ----------------------------------------------------------------------------------- searching

    def index(self, d: DBConfig | None = None):
        """The index to search, with `d`'s search settings (default: `settings`): the base index (or the one
        `db add --retrain` trained) and the segments it does not hold, removed chunks left out (`EditedIndex`);
        with db.rerank (resolved for the index built) = N > 0 its top N are put in exact order by the stored
        embeddings (`Reranked`)."""
        d = d or self.settings
        depth = faiss_index.rerank_depth(d.rerank, self.ws.require("index")["counts"]["spec"])
        retrained = self.manifest.index
        # memory-mapped: one copy per machine, however many ranks search it
        base = faiss_index.load(edits_dir(self.ws) / retrained.name / "index.faiss" if retrained
                                else self.ws.index_file, mmap=True)
        faiss_index.set_search_params(base, d.nprobe, d.ef_search)
        covered = set(retrained.segments) if retrained else set()
        segments = [p for p in self.segments if p.segment.name not in covered]
        index = base
        if segments or self.manifest.removed:
            parts = [base]
            for p in segments:
                part = faiss_index.load(p.folder / "index.faiss", mmap=True)
                faiss_index.set_search_params(part, d.nprobe, d.ef_search)
                parts.append(part)
            index = EditedIndex(parts, self.removed_chunks)
        return Reranked(index, self.embeddings, depth) if depth else index

    def retriever(self) -> Retriever:
        return Retriever(self)

    def search(self, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """One search of free texts (see `Retriever`), with the database's own settings."""
        return self.retriever().search(texts, k)

    def query(self, texts: list[str], k: int) -> list[list[dict[str, Any]]]:
        """The k nearest database chunks of each text, with continuation and source (`describe_hits`)."""
        self.settings  # noqa: B018 (its warning, before anything is loaded)
        tok = self.tokenizer
        ids, distances = self.search(texts, k)
        return describe_hits(self.store, tok, ids, distances)

    # ----------------------------------------------------------------------------------- pretraining

    @cached_property
    def refreshed(self) -> tuple[np.ndarray, np.ndarray]:
        """The neighbour rows `db build` searched again after removals: (rows (n,) sorted global chunk rows,
        ids (n, num_neighbors_query)); empty when there are none."""
        if self.manifest.refresh is None:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.int64)
        folder = edits_dir(self.ws) / self.manifest.refresh.name
        return load_npy(folder / "rows.npy"), load_npy(folder / "ids.npy")

    def segment_neighbours(self) -> list[tuple[int, np.ndarray]]:
        """(first global chunk row, neighbour ids (n, num_neighbors_query)) of each segment."""
        return [(p.chunk, load_npy(p.folder / "neighbours.npy")) for p in self.segments]

    @cached_property
    def neighbours(self) -> NeighbourBlocks:
        """The neighbour table pretraining reads (num_chunks, num_neighbors_query)."""
        block_size = self.ws.require("neighbours")["settings"]["block_size"]
        return NeighbourBlocks(self.ws, block_size, self.segment_neighbours(), self.refreshed)


def query(cfg: Config, texts: list[str], k: int) -> list[list[dict[str, Any]]]:
    """`retro db query`: the k nearest database chunks of each text, searched as the database was built."""
    # the index stage first: "run `retro db build` first", not a missing file
    return Database.open(cfg, require=("index",)).query(texts, k)


class EditedIndex:
    """The base index and every added segment's index searched as one, removed chunks left out.

    Quacks like the Faiss index `search.search_excluding` needs: `search(x, k)`, `ntotal`, `metric_type`.

    Removed chunks must not slow every search down (asking Faiss for k + removed results and dropping the
    removed ones did, in proportion to the removals). Where Faiss filters at about no cost (IVF, HNSW, flat SQ:
    `faiss_index.filters_cheaply`), an ID selector passed with each search leaves them out inside Faiss.
    IDSelectorBatch (a hash set behind a small bloom filter) costs memory in proportion to the removals; a
    bitmap would cost num_chunks / 8 bytes however few there are. Not `remove_ids`: the indexes are
    memory-mapped, shared by every process of the machine, and stay on disk as built; removing would mean
    reading each index into every reader's memory and editing it at each open. Elsewhere (exact flat search,
    whose BLAS path a selector disables; flat PQ codes, which refuse one) a few more than k are asked for, and
    again wider only for the rows where removed chunks took their places: the same results as asking for
    k + removed at once, at the cost of a search for about 2k."""

    def __init__(self, parts: list[faiss.Index], removed: np.ndarray):
        self.parts, self.removed = parts, removed
        self.metric_type = parts[0].metric_type
        self.ntotal = sum(p.ntotal for p in parts)
        self.worst = -np.inf if self.metric_type == faiss.METRIC_INNER_PRODUCT else np.inf
        self.keep = faiss.IDSelectorNot(faiss.IDSelectorBatch(removed)) if len(removed) else None
        self.params = [faiss_index.search_parameters(p, self.keep)
                       if self.keep is not None and faiss_index.filters_cheaply(p) else None for p in parts]

    def _search_part(self, part: faiss.Index, params, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The part's top min(k, ntotal) live chunks, -1 where fewer exist."""
        if params is not None or self.keep is None:
            return part.search(x, min(k, part.ntotal), params=params)
        width, most = min(k, part.ntotal), min(k + len(self.removed), part.ntotal)
        D = np.full((len(x), width), self.worst, dtype=np.float32)
        I = np.full((len(x), width), -1, dtype=np.int64)
        rows, kk = np.arange(len(x)), min(2 * k + 8, most)
        while len(rows):
            d, i = part.search(np.ascontiguousarray(x[rows]), kk)
            live = (i >= 0) & ~np.isin(i, self.removed)
            order = np.argsort(~live, axis=1, kind="stable")[:, :width]  # live hits first, in Faiss' order
            got = np.take_along_axis(live, order, 1)
            I[rows] = np.where(got, np.take_along_axis(i, order, 1), -1)
            D[rows] = np.where(got, np.take_along_axis(d, order, 1), self.worst)
            short = (got.sum(1) < width) & (i[:, -1] >= 0)  # removed chunks took places, and there are more
            if kk >= most or not short.any():
                break
            rows, kk = rows[short], min(most, kk * 4)
        return D, I

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        found = [self._search_part(p, params, x, k) for p, params in zip(self.parts, self.params) if p.ntotal]
        D, I = np.concatenate([f[0] for f in found], 1), np.concatenate([f[1] for f in found], 1)
        bad = I < 0
        D = np.where(bad, self.worst, D)
        order = np.argsort(-D if self.metric_type == faiss.METRIC_INNER_PRODUCT else D, axis=1, kind="stable")[:, :k]
        I, D = np.take_along_axis(np.where(bad, -1, I), order, 1), np.take_along_axis(D, order, 1)
        if I.shape[1] < k:  # fewer vectors than k: pad as Faiss does
            pad = k - I.shape[1]
            I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
            D = np.pad(D, ((0, 0), (0, pad)), constant_values=self.worst)
        return D, I


def distinct_passages(store: ChunkStore, ids: np.ndarray, scores: np.ndarray, k: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The first k hits of each row of (ids, scores) that are not the continuation of a hit before them."""
    out_ids = np.full((len(ids), k), -1, dtype=np.int64)
    out_scores = np.zeros((len(ids), k), dtype=scores.dtype)
    for q in range(len(ids)):
        shown: set[int] = set()
        slot = 0
        for cid, score in zip(ids[q].tolist(), scores[q].tolist()):
            if slot == k:
                break
            if cid < 0 or cid in shown:
                continue
            out_ids[q, slot], out_scores[q, slot] = cid, score
            slot += 1
            shown.add(cid)
            if (nxt := store.continuation(cid)) is not None:
                shown.add(nxt)
    return out_ids, out_scores


class Retriever:
    """The database's embedder and index, loaded once, for searching free texts (queries, SFT prompts,
    text being generated): `search(texts, k)` -> (ids, distances), each (n, k), -1 where fewer exist.

    The texts belong to no database document, so nothing is excluded. Ids refer to `database.store`."""

    def __init__(self, database: Database):
        require_built(database.ws, ("index",))
        self.database, self.store = database, database.store
        self.embedder: Embedder = database.embedder
        self.index = database.index()
        self.chunk_docs = np.ascontiguousarray(database.store.chunks["doc"])

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.database.embed(texts)

    def search(self, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The one search of free texts by db.query_mode (`db query`, `db eval`, generate's contexts): 'dense'
        -> (ids, distances); 'bm25' -> (ids, BM25 scores); 'hybrid' -> (ids, fused scores, higher better) of the
        dense and BM25 top max(2k, 100) each, fused as db.fusion says (db/bm25.py).

        A hit is shown with its continuation, so a chunk that is the continuation of a better hit is left out
        (its text is shown already) and the next one taken: k passages, none repeating another."""
        d = self.database.settings
        wide = 2 * k  # each hit kept leaves out at most one (its continuation): 2k candidates give k hits
        if d.query_mode == "dense":
            ids, scores = self.dense_search(texts, wide)
        elif d.query_mode == "bm25":
            ids, scores = self.bm25.search(texts, wide)
        else:
            from .bm25 import FUSION_DEPTH, fuse, mix

            depth = max(wide, FUSION_DEPTH)
            dense, distances = self.dense_search(texts, depth)
            lexical, found = self.bm25.search(texts, depth)
            if d.fusion == "rrf":
                ids, scores = fuse([dense, lexical], wide)
            else:  # (the index compares normalised vectors by inner product: distance = 1 - cosine)
                ids, scores = mix([(dense, 1.0 - distances), (lexical, found)],
                                  [d.hybrid_weight, 1.0 - d.hybrid_weight], wide)
        return distinct_passages(self.store, ids, scores, k)

    def dense_search(self, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        vectors = self.embed(texts)
        none = np.full(len(texts), -1, dtype=np.int64)
        return search_excluding(self.index, vectors, none, self.chunk_docs, k)

    @cached_property
    def bm25(self):
        """The BM25 index of the live chunks (db/bm25.py), removed chunks left out; a UserError where it is not
        built or out of date."""
        from .bm25 import Bm25Index

        return Bm25Index(self.database, self.database.settings.query_mode)

    def neighbours(self, tok, chunks: list[list[int]], k: int, r: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest database chunks of each token chunk (searched by its text), as model neighbours:
        tokens (n, k, r) (chunk + continuation, padded with pad_id) and chunk ids (n, k), -1 where missing."""
        tokens = np.full((len(chunks), k, r), pad_id, dtype=np.int64)
        ids = np.full((len(chunks), k), -1, dtype=np.int64)
        if not chunks:
            return tokens, ids
        # dense whatever db.query_mode says: the model was trained on the neighbours the dense index found
        found, _ = self.dense_search([tok.decode(list(c)) for c in chunks], k)
        for i, row in enumerate(found):
            for slot, cid in enumerate(row[row >= 0][:k]):
                toks = neighbour_tokens(self.store, int(cid), r)
                tokens[i, slot, : len(toks)] = toks
                ids[i, slot] = cid
        return tokens, ids


class NeighbourBlocks:
    """The database's neighbour files read as one (num_chunks, num_neighbors_query) int64 table: the blocks
    `db build` wrote, the segments `db add` wrote, and over both the rows searched again after removals
    (`Database.neighbours`)."""

    def __init__(self, ws: Workspace, block_size: int, segments: list[tuple[int, np.ndarray]],
                 refreshed: tuple[np.ndarray, np.ndarray]):
        self.ws, self.block_size = ws, block_size
        self._blocks: dict[int, np.ndarray] = {}
        self._segments, self._refreshed = segments, refreshed

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


# ------------------------------------------------------------------------------------------ as built


def open_tokenizer(ws: Workspace, settings: dict | None = None):
    """The tokenizer as built (for readers that need no more of the database)."""
    settings = settings or ws.require("tokenizer")["settings"]
    return load_tokenizer(settings["type"], tokenizer_source(ws, settings))


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
