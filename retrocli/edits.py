"""`retro db add | remove`: edit the retrieval database in place, without rebuilding it or training again.

Beside the stages `retro db build` writes:

    db/edits/manifest.json   the live segments, the removed documents, the sources added (file, ids, hash)
    db/edits/trained.faiss   the base index emptied: its trained quantizer, for new segments to add into
    db/edits/add-000001/     one segment per `db add`: a chunk store of the new documents (as chunks.py
                             writes it), their embeddings, a Faiss index of the base's trained type holding
                             their chunks, and their chunks' neighbours (for pretraining on them)

Rows continue the base store's: segment i's first document row is the base's document count plus those
of the segments before it; the same for chunks and tokens, so every id in the base index and in the
precomputed neighbours keeps its meaning. A removed document stays in the store (rows never move) and
its chunks are filtered out of every search (`EditedIndex`) and of the neighbours pretraining reads.

Crash safety: a segment is written under a temporary name and renamed, then the manifest is replaced
atomically, so a kill leaves the database as before the command or as after it (a half-written segment
is ignored, and cleared by the next edit). Readers read the manifest once: a `db query` during a
`db add` sees one of the two states.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from . import index as faiss_index
from .chunks import STORE_FILES, ChunkStore, JoinedTokens, build_chunks
from .config import Config, DBConfig, min_chunk_tokens
from .corpus import CorpusStats, corpus_files, iter_documents
from .errors import UserError
from .neighbours import search_excluding
from .runtime import fault_point, log
from .workspace import DB_STAGES, Workspace, load_npy, save_npy_atomic, sha256_file, write_json_atomic

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


# ----------------------------------------------------------------------------------------- reading


def _segment_store(folder: Path, chunk_length: int) -> ChunkStore:
    tokens, docs, chunks, info = (folder / name for name in STORE_FILES)
    return ChunkStore(load_npy(tokens), load_npy(docs), load_npy(chunks), [(info, 0)], chunk_length)


def with_edits(ws: Workspace, base: ChunkStore) -> ChunkStore:
    """The base store followed by every added segment, with the removed documents listed."""
    manifest = read_manifest(ws)
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


def with_edited_index(ws: Workspace, d: DBConfig, base: faiss.Index, store: ChunkStore) -> faiss.Index | EditedIndex:
    """The index as of the edits `store` was opened with (one manifest read for both: a `db add` finishing
    in between cannot pair a store without a segment with an index that has it)."""
    manifest = store.manifest or empty_manifest(ws)
    if not manifest["segments"] and not manifest["removed"]:
        return base
    parts = [base]
    for seg in manifest["segments"]:
        part = faiss_index.load(edits_dir(ws) / seg["name"] / "index.faiss")
        faiss_index.set_search_params(part, d.nprobe, d.ef_search)
        parts.append(part)
    return EditedIndex(parts, removed_chunks(store))


# ----------------------------------------------------------------------------------------- writing


def _require_database(ws: Workspace) -> None:
    for stage in DB_STAGES:
        if (ws.read_meta(stage) or {}).get("complete") is not True:
            raise UserError(f"`retro db add` / `remove` edit a built database, but its '{stage}' stage is not "
                            f"complete in {ws.db}: run `retro db build` first")


def _token_hash(ids: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def _trained_empty(ws: Workspace) -> faiss.Index:
    """The base index's trained, empty copy (written once, so later adds do not read the whole index)."""
    path = edits_dir(ws) / "trained.faiss"
    if not path.is_file():
        index = faiss_index.load(ws.index_file)
        index.reset()
        faiss_index.save(index, path)
    return faiss_index.load(path)


def add(cfg: Config, files: list[str]) -> dict[str, Any]:
    """Tokenize, chunk, embed, index and find the neighbours of the documents of `files` (paths or globs,
    relative to the current folder), as a new segment. Documents already present (same id, or the same
    tokens) are skipped and counted."""
    from .db import Retriever, open_tokenizer, workspace_of

    ws = workspace_of(cfg)
    _require_database(ws)
    d, m = cfg.db, cfg.db.chunk_length
    started = time.time()
    tok = open_tokenizer(ws)
    manifest = read_manifest(ws)
    folder = edits_dir(ws)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-*"):  # a segment a killed `db add` left unfinished
        shutil.rmtree(stale, ignore_errors=True)
    store = ChunkStore.open(ws, m)
    live = np.ones(len(store.docs), dtype=bool)
    live[store.removed_docs] = False
    seen_ids = {info["id"] for row, info in store.iter_doc_info() if live[row]}
    seen_hashes = {_token_hash(store.tokens[int(r["token_start"]) : int(r["token_start"] + r["num_tokens"])])
                   for r, ok in zip(store.docs, live) if ok}

    corpus = dataclasses.replace(cfg.corpus, train=list(files))
    paths = corpus_files(corpus, Path.cwd())
    stats = CorpusStats()
    docs = list(iter_documents(corpus, Path.cwd(), paths, stats))
    new, duplicates = [], []
    for doc, ids in zip(docs, tok.encode([doc.text for doc in docs]) if docs else []):
        h = _token_hash(np.asarray(ids))
        if not ids:
            continue
        if doc.id in seen_ids or h in seen_hashes:
            duplicates.append(doc.id)
            continue
        seen_ids.add(doc.id)
        seen_hashes.add(h)
        new.append(doc)
    summary: dict[str, Any] = {"files": paths, "documents": len(new), "duplicates": duplicates, "chunks": 0}
    if duplicates:
        log(f"{len(duplicates):,} document(s) already in the database, not added again: "
            f"{', '.join(duplicates[:5])}{' ...' if len(duplicates) > 5 else ''}")
    if not new:
        log("nothing new to add")
        return summary

    number = max([int(s["name"].split("-")[1]) for s in manifest["segments"]], default=0) + 1
    name = f"add-{number:06d}"
    tmp = folder / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir(parents=True)
    counts = build_chunks(tmp, new, tok, m, cfg.workspace.seed, valid_fraction=0.0)
    seg = _segment_store(tmp, m)
    first_chunk, first_doc = store.num_chunks, len(store.docs)
    retriever = Retriever(cfg, ws, store)
    texts = [tok.decode(seg.chunk_ids(i).tolist()) for i in range(seg.num_chunks)]
    t_embed = time.time()
    vectors = retriever.embed(texts)
    t_embed = time.time() - t_embed
    save_npy_atomic(tmp / "embeddings.npy", vectors)
    index = _trained_empty(ws)
    eligible = np.flatnonzero(np.asarray(seg.chunks["length"]) >= min_chunk_tokens(d))
    if len(eligible):
        index.add_with_ids(vectors[eligible], (eligible + first_chunk).astype(np.int64))
    faiss_index.save(index, tmp / "index.faiss")
    # the new chunks' neighbours, over the database as it will be (base, earlier segments, this one)
    faiss_index.set_search_params(index, d.nprobe, d.ef_search)
    searched = EditedIndex([*_parts(retriever.index), index], removed_chunks(store))
    chunk_docs = np.concatenate([store.chunks["doc"], np.asarray(seg.chunks["doc"]) + first_doc])
    t_search = time.time()
    ids, _ = search_excluding(searched, vectors, chunk_docs[first_chunk:], chunk_docs, d.num_neighbors_query)
    t_search = time.time() - t_search
    save_npy_atomic(tmp / "neighbours.npy", ids)
    fault_point("add:segment")
    tmp.rename(folder / name)
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    manifest["segments"].append({"name": name, "documents": counts["documents"], "chunks": counts["chunks"],
                                 "tokens": counts["tokens"], "added": now})
    by_source: dict[str, list[str]] = {}
    for doc in new:
        by_source.setdefault(doc.source, []).append(doc.id)
    for source, ids_ in by_source.items():
        path = next((p for p in paths if os.path.abspath(p).endswith(source) or p == source), None)
        manifest["sources"].append({"source": source, "segment": name, "documents": ids_, "added": now,
                                    "sha256": sha256_file(path) if path and os.path.isfile(path) else None})
    write_json_atomic(folder / "manifest.json", manifest)
    summary.update(segment=name, chunks=counts["chunks"], tokens=counts["tokens"], indexed=int(len(eligible)),
                   seconds=round(time.time() - started, 2), seconds_embed=round(t_embed, 2),
                   seconds_neighbours=round(t_search, 2))
    return summary


def _parts(index: faiss.Index | EditedIndex) -> list[faiss.Index]:
    return list(index.parts) if isinstance(index, EditedIndex) else [index]


def remove(cfg: Config, doc_ids: list[str], sources: list[str]) -> dict[str, Any]:
    """Remove documents (by id, or every document of a source file) from every later search."""
    from .db import workspace_of

    if not doc_ids and not sources:
        raise UserError("say what to remove: --doc ID or --source FILE (each may be repeated)")
    ws = workspace_of(cfg)
    _require_database(ws)
    manifest = read_manifest(ws)
    store = ChunkStore.open(ws, cfg.db.chunk_length)
    already = set(store.removed_docs.tolist())
    wanted_ids = set(doc_ids)
    wanted_sources = set(sources) | {os.path.abspath(s) for s in sources}
    rows, found_ids, found_sources = [], set(), set()
    for row, info in store.iter_doc_info():
        src = info.get("source", "")
        hit_src = src in wanted_sources or os.path.abspath(src) in wanted_sources
        if info["id"] in wanted_ids or hit_src:
            found_ids.add(info["id"])
            if hit_src:
                found_sources.add(src)
            if row not in already:
                rows.append(row)
    missing = sorted(wanted_ids - found_ids)
    if missing or (sources and not found_sources):
        what = f"document id(s) {missing}" if missing else f"source(s) {sorted(sources)}"
        raise UserError(f"no {what} in the database of {ws.db} (see `retro db info` for the sources)")
    if not rows:
        log("already removed: nothing to do")
        return {"removed_documents": 0, "removed_chunks": 0}
    manifest["removed"].append({"rows": rows, "ids": sorted(found_ids), "sources": sorted(found_sources),
                                "removed": time.strftime("%Y-%m-%dT%H:%M:%S")})
    fault_point("remove:manifest")
    edits_dir(ws).mkdir(parents=True, exist_ok=True)
    write_json_atomic(edits_dir(ws) / "manifest.json", manifest)
    n_chunks = int(store.docs["num_chunks"][rows].sum())
    return {"removed_documents": len(rows), "removed_chunks": n_chunks}


def describe(ws: Workspace) -> dict[str, Any]:
    """For `retro db info`: the sources added and the documents removed, with their times."""
    manifest = read_manifest(ws)
    return {"segments": manifest["segments"], "sources": manifest["sources"],
            "removed": [{k: e[k] for k in ("ids", "sources", "removed")} | {"documents": len(e["rows"])}
                        for e in manifest["removed"]]}
