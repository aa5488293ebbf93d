"""`retro db add | remove`: edit the retrieval database in place, without rebuilding it or training again.

The edits are laid out beside the stages `retro db build` writes as database.py describes; the manifest
(`database.Manifest`) lists what is live.

Crash safety: a segment is written under a temporary name and renamed, then the manifest is replaced
atomically, so a kill leaves the database as before the command or as after it (a folder the manifest does
not list is ignored, and cleared by the next edit). Readers read the manifest once: a `db query` during a
`db add` sees one of the two states.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import faiss
import numpy as np

from ..config import Config, DBConfig, min_chunk_tokens
from ..data.corpus import CorpusStats, corpus_files, iter_documents
from ..errors import UserError
from ..runtime import fault_point, log, progress, set_kept_note, warn
from ..workspace import (
    Workspace,
    atomic_path,
    blocks,
    load_npy,
    save_npy_atomic,
    sha256_file,
    write_json_atomic,
)
from . import bm25
from . import index as faiss_index
from .database import (
    Database,
    Lexical,
    Manifest,
    Refresh,
    Removal,
    Retrained,
    Segment,
    Source,
    edits_dir,
    open_tokenizer,
    require_as_built,
    require_built,
    workspace_of,
)
from .search import search_excluding
from .store import ChunkStore, build_chunks

EDITS_NEED = "`retro db add` / `remove` edit a built database"  # (the opening of require_built's message)


# ------------------------------------------------------------------------------------- document keys
# `db add` refuses a document already present: same id, or same tokens. Every document has two 64-bit keys
# (the first 8 bytes of the sha256 of its id, of its token ids), kept sorted beside its row, one file for the
# base and one per segment, so looking up new documents costs O(new log n) and reads nothing else.


def _key(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


def _id_key(doc_id: str) -> int:
    return _key(doc_id.encode("utf-8", "surrogatepass"))


def _token_key(ids: np.ndarray) -> int:
    return _key(np.asarray(ids, dtype=np.int64).tobytes())


def _make_keys(store: ChunkStore, first_row: int, fingerprint: str = "") -> dict[str, np.ndarray]:
    """The keys of every document of `store` (a base or one segment, whose rows start at `first_row`)."""
    n = len(store.docs)
    id_keys = np.fromiter((_id_key(info["id"]) for _, info in store.iter_doc_info()), dtype=np.uint64, count=n)
    tok_keys = np.fromiter((_token_key(store.doc_ids(row)) for row in range(n)), dtype=np.uint64, count=n)
    rows = np.arange(first_row, first_row + n, dtype=np.int64)
    table = {"fingerprint": np.array(fingerprint)}
    for name, keys in (("id", id_keys), ("tokens", tok_keys)):
        order = np.argsort(keys, kind="stable")
        table[f"{name}_keys"], table[f"{name}_rows"] = keys[order], rows[order]
    return table


def _save_keys(path: Path, table: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **table)


def _read_keys(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:  # arrays only: no code runs
            return {name: z[name] for name in z.files}
    except (OSError, ValueError, KeyError, EOFError):
        return None  # missing or damaged: made again


def _key_tables(database: Database) -> tuple[list[dict[str, np.ndarray]], list[tuple[Path, dict]]]:
    """The key tables of the base and of every segment, and those that had to be made (the base's once per
    database; a segment's is written by the `db add` that made it, and made again if damaged), for
    `_keep_keys` to save once the add has succeeded: a failed add leaves no file behind."""
    ws, m = database.ws, database.store.chunk_length
    fingerprint = database.manifest.chunks_fingerprint or ""
    path = edits_dir(ws) / "base-keys.npz"
    base, made = _read_keys(path), []
    if base is None or str(base["fingerprint"]) != fingerprint:
        base_store = ChunkStore.open(ws, m)
        log(f"indexing the keys of the database's {len(base_store.docs):,} documents (once)")
        base = _make_keys(base_store, 0, fingerprint)
        made.append((path, base))
    tables = [base]
    for p in database.segments:
        table = _read_keys(p.folder / "keys.npz")
        if table is None:  # missing or damaged: a cache, made again
            table = _make_keys(ChunkStore.at(p.folder, m), p.doc)
            made.append((p.folder / "keys.npz", table))
        tables.append(table)
    return tables, made


def _keep_keys(made: list[tuple[Path, dict]]) -> None:
    """Save the key tables an add made; they are a cache, so a failure to write one only costs time later."""
    for path, table in made:
        try:
            _save_keys(path, table)
        except UserError as e:
            warn(f"{e} (a cache of document keys: the next `db add` makes it again)")


def _rows_with_key(tables: list[dict[str, np.ndarray]], kind: str, key: int) -> np.ndarray:
    found = []
    for t in tables:
        keys = t[f"{kind}_keys"]
        lo, hi = np.searchsorted(keys, np.uint64(key), "left"), np.searchsorted(keys, np.uint64(key), "right")
        found.append(t[f"{kind}_rows"][lo:hi])
    return np.concatenate(found)


def _present(tables: list[dict[str, np.ndarray]], store: ChunkStore, doc_id: str, ids: np.ndarray) -> bool:
    """Whether a live document of `store` has this id or these tokens (tokens compared exactly)."""
    live = lambda rows: rows[~np.isin(rows, store.removed_docs)]  # noqa: E731
    if len(live(_rows_with_key(tables, "id", _id_key(doc_id)))):
        return True
    ids = np.asarray(ids, dtype=np.int64)
    return any(np.array_equal(store.doc_ids(int(row)), ids)
               for row in live(_rows_with_key(tables, "tokens", _token_key(ids))))


def _trained_empty(ws: Workspace, manifest: Manifest) -> faiss.Index:
    """The index in force (the base, or the one `--retrain` trained), trained and empty (written once, so later
    adds do not read the whole index). A base whose lists are on disk (db.index_storage) is never emptied: its
    lists are the shared .ivfdata file; the trained empty index its build wrote before the block adds is the
    one copied, so a new segment stays a small index in memory."""
    if manifest.index is not None:
        return faiss_index.load(edits_dir(ws) / manifest.index.name / "trained.faiss")
    if ws.index_trained.is_file():
        return faiss_index.load(ws.index_trained)
    path = edits_dir(ws) / "trained.faiss"
    if not path.is_file():
        index = faiss_index.load(ws.index_file)
        index.reset()
        faiss_index.save(index, path)
    return faiss_index.load(path)


def add(cfg: Config, files: list[str], retrain: bool = False) -> dict[str, Any]:
    """Tokenize, chunk, embed, index and find the neighbours of the documents of `files` (paths or globs,
    relative to the current folder), as a new segment. Documents already present (same id, or the same
    tokens) are skipped and counted. `retrain`: train the index afresh on every chunk now in the database
    (base and added), for when the added text differs from what the index was trained on."""
    ws = workspace_of(cfg)
    require_built(ws, needed_by=EDITS_NEED)
    require_as_built(cfg, ws, "db add")  # new chunks, vectors and neighbours as the database's own
    corpus = dataclasses.replace(cfg.corpus, train=list(files))
    paths = corpus_files(corpus, Path.cwd(), key="retro db add")  # before anything is written
    d, m = cfg.db, cfg.db.chunk_length
    # the new segment goes live only when the manifest lists it, which is the add's last write
    set_kept_note("db add: the database is as it was before (nothing of this add is live yet); the rerun adds the "
                  "documents")
    started = time.time()
    tok = open_tokenizer(ws)
    database = Database.open(cfg)
    manifest, store = database.manifest, database.store
    folder = edits_dir(ws)
    folder.mkdir(parents=True, exist_ok=True)
    _clear_unlisted(folder, manifest)
    tables, made_keys = _key_tables(database)

    stats = CorpusStats()
    docs = list(iter_documents(corpus, Path.cwd(), paths, stats))
    new, duplicates = [], []
    batch_ids, batch_tokens = set(), set()  # duplicates within the files themselves
    for doc, ids in zip(docs, tok.encode([doc.text for doc in docs]) if docs else []):
        if not ids:
            continue
        key = np.asarray(ids, dtype=np.int64).tobytes()
        if doc.id in batch_ids or key in batch_tokens or _present(tables, store, doc.id, ids):
            duplicates.append(doc.id)
            continue
        batch_ids.add(doc.id)
        batch_tokens.add(key)
        new.append(doc)
    summary: dict[str, Any] = {"files": paths, "documents": len(new), "duplicates": duplicates, "chunks": 0}
    if duplicates:
        log(f"{len(duplicates):,} document(s) already in the database, not added again: "
            f"{', '.join(duplicates[:5])}{' ...' if len(duplicates) > 5 else ''}")
    if not new:
        log("nothing new to add")
        _keep_keys(made_keys)
        return summary

    name = f"add-{_next_number(manifest):06d}"
    tmp = folder / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir(parents=True)
    counts = build_chunks(tmp, new, tok, m, cfg.workspace.seed, valid_fraction=0.0)
    seg = ChunkStore.at(tmp, m)
    _save_keys(tmp / "keys.npz", _make_keys(seg, len(store.docs)))
    first_chunk = store.num_chunks
    texts = [tok.decode(seg.chunk_ids(i).tolist()) for i in range(seg.num_chunks)]
    t_embed = time.time()
    vectors = database.embed(texts)
    t_embed = time.time() - t_embed
    save_npy_atomic(tmp / "embeddings.npy", vectors)
    index = _trained_empty(ws, manifest)
    eligible = np.flatnonzero(np.asarray(seg.chunks["length"]) >= min_chunk_tokens(d))
    if len(eligible):
        index.add_with_ids(vectors[eligible], (eligible + first_chunk).astype(np.int64))
    faiss_index.save(index, tmp / "index.faiss")
    fault_point("add:segment")
    tmp.rename(folder / name)  # not live until the manifest lists it

    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    pending = dataclasses.replace(manifest, segments=(*manifest.segments, Segment(
        name, counts["documents"], counts["chunks"], counts["tokens"], now)))
    t_retrain = 0.0
    if retrain:
        t_retrain = time.time()
        pending = dataclasses.replace(pending, index=_retrain(cfg, database.edited(pending),
                                                              f"index-{_next_number(pending):06d}"))
        t_retrain = time.time() - t_retrain
    # the new chunks' neighbours, over the database as it will be (base, earlier segments, this one)
    after = database.edited(pending)
    chunk_docs = np.ascontiguousarray(after.store.chunks["doc"])
    t_search = time.time()
    ids, _ = search_excluding(after.index(d), vectors, chunk_docs[first_chunk:], chunk_docs, d.num_neighbors_query)
    t_search = time.time() - t_search
    save_npy_atomic(folder / name / "neighbours.npy", ids)
    by_source: dict[str, list[str]] = {}
    for doc in new:
        by_source.setdefault(doc.source, []).append(doc.id)
    added = []
    for source, ids_ in by_source.items():
        path = next((p for p in paths if p == source or os.path.relpath(p, Path.cwd()) == source), None)
        added.append(Source(source, name, ids_, now, sha256_file(path) if path and os.path.isfile(path) else None))
    pending = dataclasses.replace(pending, sources=(*pending.sources, *added))
    t_bm25 = time.time()
    pending = _with_bm25(database.edited(pending), pending)
    t_bm25 = time.time() - t_bm25
    fault_point("add:manifest")
    write_json_atomic(folder / "manifest.json", pending.to_json())
    _keep_keys(made_keys)
    summary.update(segment=name, chunks=counts["chunks"], tokens=counts["tokens"], indexed=int(len(eligible)),
                   seconds=round(time.time() - started, 2), seconds_embed=round(t_embed, 2),
                   seconds_neighbours=round(t_search, 2), seconds_bm25=round(t_bm25, 2),
                   retrained=dataclasses.asdict(pending.index) if retrain else None,
                   seconds_retrain=round(t_retrain, 2))
    return summary


def _with_bm25(database: Database, pending: Manifest) -> Manifest:
    """`pending` with a BM25 index of every live chunk (db/bm25.py says why not of the new ones alone), where the
    database has a BM25 stage; as it was otherwise."""
    if not (database.ws.read_meta(bm25.STAGE) or {}).get("complete"):
        return pending
    name = f"bm25-{_next_number(pending):06d}"
    made = bm25.edits_index(database, edits_dir(database.ws) / name)
    return dataclasses.replace(pending, bm25=Lexical(name, **made))


def refresh_bm25(cfg: Config, ws: Workspace) -> None:
    """`db build` with a BM25 stage, on an edited database whose BM25 index lacks added documents (added before
    the stage was built, or under other BM25 settings): index every live chunk again (`_with_bm25`)."""
    database = Database.open(cfg)
    if bm25.in_force(database)[0] is not None:
        return
    _clear_unlisted(edits_dir(ws), database.manifest)
    pending = _with_bm25(database, database.manifest)
    fault_point("bm25:manifest")
    write_json_atomic(edits_dir(ws) / "manifest.json", pending.to_json())


def _next_number(manifest: Manifest) -> int:
    """Edit folders are numbered in one sequence (add-, index-, refresh-, bm25-): the next number."""
    return max([int(n.rsplit("-", 1)[1]) for n in manifest.folders], default=0) + 1


def _clear_unlisted(folder: Path, manifest: Manifest) -> None:
    """Remove what a killed edit left (temporary folders, a renamed folder the manifest never listed) and
    what later edits superseded (an older retrained index or refresh)."""
    listed = manifest.folders
    for path in folder.iterdir() if folder.is_dir() else []:
        if path.is_dir() and path.name not in listed and (
                path.name.startswith(".tmp-") or path.name.split("-")[0] in ("add", "index", "refresh", "bm25")):
            shutil.rmtree(path, ignore_errors=True)


def _live_rows(database: Database, d: DBConfig) -> Iterator[tuple[np.ndarray, Callable]]:
    """The indexable chunks (training split, at least db.min_chunk_tokens tokens, not removed), block by block:
    (global rows, a function giving their (n, dim) float32 embeddings)."""
    store = database.store
    ok = store.train_mask() & (np.asarray(store.chunks["length"]) >= min_chunk_tokens(d))
    ok[database.removed_chunks] = False
    return _rows_where(database, ok)


def _all_rows(database: Database) -> Iterator[tuple[np.ndarray, Callable]]:
    """Every chunk, block by block, as `_live_rows` gives them."""
    return _rows_where(database, np.ones(database.store.num_chunks, dtype=bool))


def _rows_where(database: Database, ok: np.ndarray) -> Iterator[tuple[np.ndarray, Callable]]:
    base, segments = database.embedding_parts()
    for _, s, e in blocks(base.n, base.block_size):
        rows = s + np.flatnonzero(ok[s:e])
        yield rows, (lambda s=s, e=e, rows=rows: base.rows(s, e)[rows - s])
    for first, n, path in segments:
        rows = first + np.flatnonzero(ok[first : first + n])
        yield rows, (lambda path=path, rows=rows, first=first: np.asarray(load_npy(path)[rows - first],
                                                                          dtype=np.float32))


def _retrain(cfg: Config, database: Database, name: str) -> Retrained:
    """`db add --retrain`: an index of the base's type trained afresh on a seeded sample of every live chunk
    of `database` and holding them all, written as edits/<name>/ (the manifest makes it live)."""
    d, ws = cfg.db, database.ws
    spec = ws.require("index")["counts"]["spec"]
    parts = list(_live_rows(database, d))
    every = np.concatenate([rows for rows, _ in parts])
    rng = np.random.default_rng(cfg.workspace.seed)
    n_sample = faiss_index.train_sample_size(d.index_train_samples, spec,
                                              int(ws.require("embed")["counts"]["dim"]), len(every))
    chosen = np.sort(rng.choice(every, size=n_sample, replace=False))
    sample = np.concatenate([vecs()[np.isin(rows, chosen)] for rows, vecs in parts if np.isin(rows, chosen).any()])
    log(f"retraining index {spec!r} on {len(sample):,} of the {len(every):,} chunks now in the database")
    index = faiss_index.train(spec, sample, cfg.workspace.seed)
    with progress("index add", len(every), "chunks") as bar:
        for rows, vecs in parts:
            if len(rows):
                index.add_with_ids(vecs(), rows.astype(np.int64))
                bar.advance(len(rows))
    tmp = edits_dir(ws) / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir(parents=True)
    faiss_index.save(index, tmp / "index.faiss")
    index.reset()
    faiss_index.save(index, tmp / "trained.faiss")
    tmp.rename(edits_dir(ws) / name)
    return Retrained(name, spec, int(len(every)), int(len(sample)), [s.name for s in database.manifest.segments],
                     time.strftime("%Y-%m-%dT%H:%M:%S"))


def refresh_neighbours(cfg: Config, ws: Workspace) -> Refresh | None:
    """`retro db build` on an edited database: search again, over the database as it is now, the precomputed
    neighbour rows (base blocks and segments) that name a chunk removed since the last refresh; the rest stay
    valid and are not touched. Written as edits/refresh-N/ (rows.npy, ids.npy: earlier refreshed rows
    included) and made live by the manifest. Returns the refresh record, or None without removals."""
    require_built(ws, needed_by=EDITS_NEED)
    d = cfg.db
    database = Database.open(ws, d.chunk_length)
    manifest, store = database.manifest, database.store
    if not manifest.removed:
        return None
    if manifest.refresh is not None and manifest.refresh.removals == len(manifest.removed):
        return manifest.refresh  # up to date
    _clear_unlisted(edits_dir(ws), manifest)  # what a killed refresh left, which would block this one's rename
    started = time.time()
    nmeta = ws.require("neighbours")
    gone = database.removed_chunks
    gone_docs = np.zeros(len(store.docs), dtype=bool)
    gone_docs[store.removed_docs] = True
    old_rows, old_ids = database.refreshed
    segments = database.segment_neighbours()
    parts = [(s, lambda i=i: load_npy(ws.neighbour_block(i)))
             for i, s, _ in blocks(database.base_chunks, nmeta["settings"]["block_size"])]
    parts += [(first, lambda t=table: t) for first, table in segments]
    stale = []
    for start, table in parts:  # block by block, vectorised: the rows as pretraining reads them now
        ids = np.array(table())
        rows = np.arange(start, start + len(ids))
        over = (old_rows >= start) & (old_rows < start + len(ids))
        if over.any():
            ids[np.asarray(old_rows)[over] - start] = np.asarray(old_ids)[over]
        hit = np.isin(ids, gone).any(1) & ~gone_docs[store.chunks["doc"][start : start + len(ids)]]
        stale.append(rows[hit])
    stale = np.concatenate(stale) if stale else np.zeros(0, dtype=np.int64)
    k = int(nmeta["counts"]["k"])
    new_ids = np.zeros((0, k), dtype=np.int64)
    if len(stale):
        vectors = {}
        for rows, vecs in _all_rows(database):
            want = rows[np.isin(rows, stale)]
            if len(want):
                got = vecs()
                for r, v in zip(want, got[np.searchsorted(rows, want)]):
                    vectors[int(r)] = v
        chunk_docs = np.ascontiguousarray(store.chunks["doc"])
        x = np.stack([vectors[int(r)] for r in stale])
        with progress("refresh neighbours", len(stale), "chunks") as bar:
            new_ids, _ = search_excluding(database.index(d), x, chunk_docs[stale], chunk_docs, k)
            bar.advance(len(stale))
    keep = ~np.isin(old_rows, stale)
    rows = np.concatenate([np.asarray(old_rows)[keep], stale]).astype(np.int64)
    ids = np.concatenate([np.asarray(old_ids).reshape(-1, k)[keep], new_ids]).astype(np.int64)
    order = np.argsort(rows, kind="stable")
    name = f"refresh-{_next_number(manifest):06d}"
    tmp = edits_dir(ws) / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir(parents=True)
    save_npy_atomic(tmp / "rows.npy", rows[order])
    save_npy_atomic(tmp / "ids.npy", ids[order])
    tmp.rename(edits_dir(ws) / name)
    refresh = Refresh(name, len(manifest.removed), int(len(rows)), int(len(stale)), round(time.time() - started, 2),
                      time.strftime("%Y-%m-%dT%H:%M:%S"))
    fault_point("refresh:manifest")
    write_json_atomic(edits_dir(ws) / "manifest.json", dataclasses.replace(manifest, refresh=refresh).to_json())
    log(f"neighbours: searched again the {len(stale):,} chunk rows that named a removed chunk")
    return refresh


def remove(cfg: Config, doc_ids: list[str], sources: list[str]) -> dict[str, Any]:
    """Remove documents (by id, or every document of a source file) from every later search."""
    if not doc_ids and not sources:
        raise UserError("say what to remove: --doc ID or --source FILE (each may be repeated)")
    ws = workspace_of(cfg)
    require_built(ws, needed_by=EDITS_NEED)
    set_kept_note("db remove: the database is as it was before (a removal goes live in one atomic write of the "
                  "edit manifest)")
    database = Database.open(cfg)
    manifest, store = database.manifest, database.store
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
    removal = Removal(rows, sorted(found_ids), sorted(found_sources), time.strftime("%Y-%m-%dT%H:%M:%S"))
    fault_point("remove:manifest")
    edits_dir(ws).mkdir(parents=True, exist_ok=True)
    write_json_atomic(edits_dir(ws) / "manifest.json",
                      dataclasses.replace(manifest, removed=(*manifest.removed, removal)).to_json())
    n_chunks = int(store.docs["num_chunks"][rows].sum())
    return {"removed_documents": len(rows), "removed_chunks": n_chunks}


def describe(ws: Workspace) -> dict[str, Any]:
    """For `retro db info`: the sources added and the documents removed, with their times; the retrained
    index and the refreshed neighbours, if any."""
    manifest = Manifest.read(ws).to_json()
    return {"segments": manifest["segments"], "sources": manifest["sources"], "index": manifest.get("index"),
            "refresh": manifest.get("refresh"),
            "removed": [{k: e[k] for k in ("ids", "sources", "removed")} | {"documents": len(e["rows"])}
                        for e in manifest["removed"]]}
