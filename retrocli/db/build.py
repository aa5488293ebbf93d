"""`retro db build | query | info`: the retrieval database, stage by stage.

    corpus --tokenizer--> tokenizer.model --chunks--> chunk store --embed--> embedding blocks
           --index--> index.faiss --neighbours--> neighbour blocks

Each stage records its settings (and the fingerprint of the stage it reads) in its `meta.json`, is
skipped when complete with the same settings, resumes block by block when it was killed, and refuses to
mix with artefacts built under other settings. Under torchrun the embed and neighbour stages share their
blocks across ranks; rank 0 alone does everything else and writes every shared file.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from typing import Any

import numpy as np

from ..config import Config, min_chunk_tokens
from ..data.corpus import CorpusStats, corpus_files, fingerprint, iter_documents
from ..data.tokenizer import content_sha256, train_sentencepiece
from ..errors import UserError
from ..runtime import dist, fault_point, log, progress, set_kept_note, warn
from ..workspace import DB_STAGES, OPTIONAL_STAGES, Workspace, blocks, load_npy, missing_blocks, save_npy_atomic
from . import index as faiss_index
from .database import (
    Database,
    EmbeddingStore,
    as_built,
    open_tokenizer,
    require_built,
    tokenizer_sha256,
    tokenizer_source,
    workspace_of,
)
from .embed import LEXICAL, LEXICAL_SCHEME, embed_blocks, lexical_idf, make_embedder
from .search import search_excluding
from .store import ChunkStore, build_chunks


def begin_shared(ws: Workspace, stage: str, settings: dict, rebuild: bool) -> dict | None:
    """`Workspace.begin` on rank 0, then every rank sees the same state: the finished metadata or None."""
    if dist().main:
        ws.begin(stage, settings, rebuild)
    dist().barrier()
    meta = ws.read_meta(stage)
    return meta if meta and meta.get("complete") else None


def _finished_meta(ws: Workspace, stage: str) -> dict | None:
    """The metadata of a complete stage, or None (none, unfinished, or unreadable: a rebuild replaces it)."""
    try:
        meta = ws.read_meta(stage)
    except UserError:
        return None
    return meta if meta and meta.get("complete") else None


def _note_kept(stage: str, detail: str = "not finished, made again by the rerun") -> None:
    """What an interruption of `db build` during `stage` keeps: the stages before it, and `detail` of it."""
    before = DB_STAGES[: DB_STAGES.index(stage)]
    head = f"db build: {', '.join(before)} finished and kept" if before else "db build: no stage finished yet"
    set_kept_note(f"{head}; {stage}: {detail}")


def _note_blocks(stage: str, kept: int, total: int) -> None:
    share = "" if dist().world == 1 else " of this process's share"
    _note_kept(stage, f"{kept} of {total} blocks{share} are kept")


# ------------------------------------------------------------------------------------------ the stages


def stage_tokenizer(cfg: Config, ws: Workspace, files: list[str], rebuild: bool) -> dict:
    t = cfg.tokenizer
    if t.path:
        src = cfg.resolve(t.path)
        if not src.exists():
            raise UserError(f"tokenizer.path {src} does not exist")
        settings = {"type": t.type, "path": str(src), "source": fingerprint([str(src)]) if src.is_file() else
                    str(src)}
    else:
        settings = {"type": "sentencepiece", "trained_on": fingerprint(files), "vocab_size": t.vocab_size,
                    "train_bytes": t.train_bytes, "seed": cfg.workspace.seed, "text_key": cfg.corpus.text_key}
    previous = _finished_meta(ws, "tokenizer") if rebuild else None  # before `begin` discards it
    done = ws.begin("tokenizer", settings, rebuild)
    if done:
        return done
    _note_kept("tokenizer")
    started = time.time()
    if t.path and t.type == "sentencepiece":
        shutil.copyfile(src, ws.tokenizer_model)  # the workspace keeps its own copy
    elif not t.path:
        log(f"training a SentencePiece BPE tokenizer (vocab {t.vocab_size}) on the corpus")
        stats = CorpusStats()
        train_sentencepiece((d.text for d in iter_documents(cfg.corpus, cfg.base_dir, files, stats)),
                            ws.tokenizer_model, t.vocab_size, t.train_bytes)
    fault_point("tokenizer:trained")
    tok = open_tokenizer(ws, settings)
    sha = content_sha256(settings["type"], tokenizer_source(ws, settings))
    # Identified by its content alone (not by when or where it was made), so a rebuilt identical tokenizer, or
    # one built the same way in another workspace, is the same tokenizer to the chunks and to checkpoints.
    identity = {"type": settings["type"], "sha256": sha, "vocab_size": tok.vocab_size}
    earlier = []
    if previous is not None and tokenizer_sha256(previous) == sha:
        # the same content as before the rebuild: checkpoints that name the earlier build's fingerprint (written
        # before checkpoints recorded the tokenizer's sha256) stay usable
        earlier = [*previous.get("earlier_fingerprints", []), previous["fingerprint"]]
    return ws.finish("tokenizer", {"vocab_size": tok.vocab_size, "sha256": sha,
                                   "seconds": round(time.time() - started, 2)}, identity,
                     earlier_fingerprints=sorted(set(earlier)))


def stage_chunks(cfg: Config, ws: Workspace, files: list[str], tok_meta: dict, rebuild: bool) -> dict:
    c = cfg.corpus
    settings = {"corpus": fingerprint(files), "text_key": c.text_key, "on_bad_line": c.on_bad_line,
                "valid_fraction": c.valid_fraction, "seed": cfg.workspace.seed,
                "chunk_length": cfg.db.chunk_length, "tokenizer": tok_meta["fingerprint"]}
    done = ws.begin("chunks", settings, rebuild)
    if done:
        return done
    _note_kept("chunks")
    started = time.time()
    tok = open_tokenizer(ws)
    stats = CorpusStats()
    with progress("chunks", None, "docs") as bar:
        docs = iter_documents(c, cfg.base_dir, files, stats)
        counts = build_chunks(ws.stage_dir("chunks"), docs, tok, cfg.db.chunk_length, cfg.workspace.seed,
                              c.valid_fraction, bar)
    for why, n in stats.skipped.items():
        warn(f"skipped {n} input(s): {why}")
    counts.update(skipped=stats.skipped, seconds=round(time.time() - started, 2))
    log(f"chunks: {counts['documents']:,} documents ({counts['valid_documents']:,} held out), "
        f"{counts['tokens']:,} tokens, {counts['chunks']:,} chunks ({counts['train_chunks']:,} in the database)")
    return ws.finish("chunks", counts)


def chunk_texts(store: ChunkStore, tok, start: int, end: int) -> list[str]:
    return [tok.decode(store.chunk_ids(r).tolist()) for r in range(start, end)]


def stage_embed(cfg: Config, ws: Workspace, chunk_meta: dict, rebuild: bool) -> dict:
    d = cfg.db
    settings = {"embedder": d.embedder, "block_size": d.block_size, "chunks": chunk_meta["fingerprint"]}
    if d.embedder == LEXICAL:
        settings["lexical"] = LEXICAL_SCHEME  # embeddings of an earlier scheme are refused, not mixed in
    done = begin_shared(ws, "embed", settings, rebuild)
    if done:
        return done
    _note_kept("embed")
    D = dist()
    started = time.time()
    store = ChunkStore.open(ws, d.chunk_length)
    tok = open_tokenizer(ws)
    if d.embedder == LEXICAL and D.main:
        vocab = tok.vocab_size
        if not ws.lexical_idf().exists() or load_npy(ws.lexical_idf()).shape != (vocab,):
            train_rows = np.flatnonzero(store.train_mask())
            with progress("lexical IDF", len(train_rows), "chunks") as bar:
                def token_lists():
                    for r in train_rows:
                        bar.advance()
                        yield store.chunk_ids(int(r))
                save_npy_atomic(ws.lexical_idf(), lexical_idf(token_lists(), vocab))
    D.barrier()
    embedder = make_embedder(d.embedder, cfg.base_dir, d.embed_batch_size, d.embed_precision, ws.lexical_idf(),
                             tok.encode)
    spans = blocks(store.num_chunks, d.block_size)
    dim = embedder.dim
    # Shard first, then look for missing blocks: each rank checks only its own blocks, so a block another
    # rank finishes meanwhile cannot shift the assignment.
    todo = missing_blocks(ws.embed_block, D.shard(spans), lambda a, n: a.shape == (n, dim))
    kept = len(D.shard(spans)) - len(todo)
    _note_blocks("embed", kept, len(D.shard(spans)))
    if D.main and getattr(embedder, "dtype", None) is not None:
        log(f"embedding with {d.embedder} in {str(embedder.dtype).replace('torch.', '')}"
            + (f" (probe cosine to fp32 {embedder.probe_cosine:.4f})" if hasattr(embedder, "probe_cosine") else ""))
    with progress("embed", sum(e - s for _, s, e in todo), "chunks") as bar:
        def save(i: int, vectors: np.ndarray) -> None:
            nonlocal kept
            save_npy_atomic(ws.embed_block(i), vectors)
            kept += 1
            _note_blocks("embed", kept, len(D.shard(spans)))
            fault_point("embed:block")

        embed_blocks(embedder, todo, lambda s, e: chunk_texts(store, tok, s, e), save, bar)
    D.barrier()
    if not D.main:
        return {}
    seconds = time.time() - started
    done_chunks = sum(e - s for _, s, e in todo)
    return ws.finish("embed", {"chunks": store.num_chunks, "dim": dim, "blocks": len(spans),
                               "seconds": round(seconds, 2), "embedded_now": done_chunks,
                               "precision": str(getattr(embedder, "dtype", "float32")).replace("torch.", "")})


def stage_index(cfg: Config, ws: Workspace, embed_meta: dict, rebuild: bool) -> dict:
    """Train the index on a random sample of the database's chunks and add them all. In memory (the default),
    rank 0 alone does both. With the lists on disk (`db.index_storage`), rank 0 trains and writes the trained
    empty index once; then every rank adds its share of the embedding blocks, each into its own file of
    inverted lists (a killed build resumes at the first missing one); then rank 0 merges them into one
    `.ivfdata` file and deletes them (they would double the disk the index takes; a repair adds them again
    from the trained index kept in the stage)."""
    d = cfg.db
    D = dist()
    settings = {"index": d.index, "index_train_samples": d.index_train_samples, "seed": cfg.workspace.seed,
                "min_chunk_tokens": min_chunk_tokens(d), "embeddings": embed_meta["fingerprint"]}
    if d.index_storage != "memory":
        settings["index_storage"] = d.index_storage  # (only when not in memory: older databases keep their settings)
    store = ChunkStore.open(ws, d.chunk_length)
    train_rows = np.flatnonzero(store.train_mask() & (store.chunks["length"] >= min_chunk_tokens(d)))
    if len(train_rows) == 0:
        raise UserError(f"no training chunk has db.min_chunk_tokens ({min_chunk_tokens(d)}) tokens or more: the "
                        "database would be empty; lower db.min_chunk_tokens or add longer documents")
    spec = faiss_index.auto_spec(len(train_rows)) if d.index == "auto" else d.index
    dim = int(embed_meta["counts"]["dim"])
    if d.index_storage == "ondisk":  # refused on every rank alike, before anything is written
        faiss_index.resolve_storage("ondisk", spec, dim, len(train_rows), chosen=d.index == "auto")
    done = begin_shared(ws, "index", settings, rebuild)
    if done:
        return done
    _note_kept("index")
    started = time.time()
    emb = EmbeddingStore(ws, store.num_chunks)
    n_sample = faiss_index.train_sample_size(d.index_train_samples, spec, dim, len(train_rows))
    train_seconds = 0.0
    if D.main and not ws.index_trained.is_file():  # (once there, an interrupted build with lists on disk)
        was_ondisk = ws.index_data.exists() or any(ws.stage_dir("index").glob("block-*"))
        storage = "ondisk" if was_ondisk else faiss_index.resolve_storage(d.index_storage, spec, dim, len(train_rows))
        if storage == "ondisk":
            index = _trained(cfg, emb, train_rows, spec, n_sample)
            train_seconds = time.time() - started
            faiss_index.save(index, ws.index_trained)
    D.barrier()
    if ws.index_trained.is_file():
        return _index_ondisk(ws, emb, train_rows, spec, n_sample, started, train_seconds)
    if not D.main:
        return {}
    index = _trained(cfg, emb, train_rows, spec, n_sample)
    train_seconds = time.time() - started
    with progress("index add", len(train_rows), "chunks") as bar:
        for _, s, e in blocks(store.num_chunks, emb.block_size):
            rows = train_rows[(train_rows >= s) & (train_rows < e)]
            if len(rows):
                index.add_with_ids(emb.rows(s, e)[rows - s], rows.astype(np.int64))
                bar.advance(len(rows))
    faiss_index.save(index, ws.index_file)
    return ws.finish("index", {"spec": spec, "ntotal": int(index.ntotal), "train_samples": int(n_sample),
                               "train_seconds": round(train_seconds, 2),
                               "seconds": round(time.time() - started, 2),
                               "bytes": ws.index_file.stat().st_size})


def _trained(cfg: Config, emb: EmbeddingStore, train_rows: np.ndarray, spec: str, n_sample: int):
    """The trained empty index, on a seeded random sample of the training chunks (only those rows are read)."""
    rng = np.random.default_rng(cfg.workspace.seed)
    sample_rows = np.sort(rng.choice(train_rows, size=n_sample, replace=False))
    log(f"training index {spec!r} on {n_sample:,} random training chunks")
    index = faiss_index.train(spec, emb.take(sample_rows), cfg.workspace.seed)
    fault_point("index:trained")
    return index


# Files of inverted lists the merge maps at once, at most: far below Linux's default vm.max_map_count (65,530
# mappings a process). Up to this many embedding blocks each has its own file; beyond, each file holds the
# lists of several consecutive blocks (at 100B tokens, 1.56B chunks in blocks of 10,000: 39 blocks a file).
MAX_LIST_FILES = 4096


def _list_parts(emb: EmbeddingStore) -> list[tuple[int, int, int]]:
    """(file number, first row, end row) of each file of inverted lists: consecutive embedding blocks, as
    few to a file as MAX_LIST_FILES allows (one, below it)."""
    spans = blocks(emb.n, emb.block_size)
    per = -(-len(spans) // MAX_LIST_FILES)
    return [(p, spans[g][1], spans[min(g + per, len(spans)) - 1][2]) for p, g in enumerate(range(0, len(spans), per))]


def _index_ondisk(ws: Workspace, emb: EmbeddingStore, train_rows: np.ndarray, spec: str, n_sample: int,
                  started: float, train_seconds: float) -> dict:
    """The block adds (every rank its share, as the neighbours stage shares its blocks) and rank 0's merge of
    the lists on disk; see `stage_index`."""
    D = dist()
    spans = _list_parts(emb)
    ends = np.searchsorted(train_rows, [s for _, s, _ in spans] + [emb.n])
    rows_of = {i: train_rows[ends[i] : ends[i + 1]] for i, _, _ in spans}  # (views: train_rows is sorted)
    merged = _merged_ok(ws, len(train_rows))  # killed after the merge: only the clean-up was left
    mine = [] if merged else D.shard(spans)
    # each rank checks only its own blocks (a block another rank finishes meanwhile cannot shift the assignment)
    todo = [(i, s, e) for i, s, e in mine if faiss_index.read_lists(ws.index_block(i), len(rows_of[i])) is None]
    kept = len(mine) - len(todo)
    _note_blocks("index", kept, len(mine))
    index = faiss_index.load(ws.index_trained) if todo else None
    with progress("index add", sum(len(rows_of[i]) for i, _, _ in todo), "chunks") as bar:
        for i, s, e in todo:
            for b in range(s, e, emb.block_size):  # one embedding block at a time
                rows = rows_of[i][(rows_of[i] >= b) & (rows_of[i] < b + emb.block_size)]
                if len(rows):
                    index.add_with_ids(emb.rows(b, min(b + emb.block_size, e))[rows - b], rows.astype(np.int64))
                    bar.advance(len(rows))
            faiss_index.save_lists(index, ws.index_block(i))
            index.reset()  # the lists only: the trained quantizer stays
            kept += 1
            _note_blocks("index", kept, len(mine))
            fault_point("index:block")
    D.barrier()
    if not D.main:
        return {}
    if not merged:
        _note_kept("index", "every block's lists are kept; the merge of them is made again by the rerun")
        lists = [faiss_index.read_lists(ws.index_block(i), len(rows_of[i])) for i, _, _ in spans]
        if missing := [ws.index_block(i) for (i, _, _), b in zip(spans, lists) if b is None]:
            # a rank's share that is not there after every rank finished its adds: something removed it
            raise UserError(f"the inverted lists {missing[0]} (of {len(missing)} block(s)) are missing or torn "
                            "after the adds: rerun `retro db build` to add them again")
        log(f"merging the inverted lists of {len(spans)} blocks into {ws.index_data}")
        index = faiss_index.merge_lists(faiss_index.load(ws.index_trained), lists, ws.index_data)
        faiss_index.save(index, ws.index_file)
        ntotal = int(index.ntotal)
        del index, lists  # (unmapped)
        fault_point("index:merged")
    else:
        ntotal = len(train_rows)
    for i, _, _ in spans:
        ws.index_block(i).unlink(missing_ok=True)
    return ws.finish("index", {"spec": spec, "ntotal": ntotal, "train_samples": int(n_sample), "storage": "ondisk",
                               "train_seconds": round(train_seconds, 2), "seconds": round(time.time() - started, 2),
                               "bytes": ws.index_file.stat().st_size + ws.index_data.stat().st_size})


def _merged_ok(ws: Workspace, ntotal: int) -> bool:
    """Whether the merged index and its lists are there, whole and with every chunk (a build killed after the
    merge, or a repair of the trained index alone)."""
    if not (ws.index_file.is_file() and ws.index_data.is_file()):
        return False
    try:
        return faiss_index.load(ws.index_file).ntotal == ntotal
    except UserError:
        return False


def stage_neighbours(cfg: Config, ws: Workspace, index_meta: dict, rebuild: bool) -> dict:
    d = cfg.db
    settings = {"num_neighbors_query": d.num_neighbors_query, "nprobe": d.nprobe, "ef_search": d.ef_search,
                "block_size": d.block_size, "index": index_meta["fingerprint"]}
    if depth := faiss_index.rerank_depth(d.rerank, index_meta["counts"]["spec"]):
        settings["rerank"] = depth  # (only when on: databases built before the key existed keep their settings)
    done = begin_shared(ws, "neighbours", settings, rebuild)
    if done:
        return done
    _note_kept("neighbours")
    D = dist()
    started = time.time()
    database = Database.open(ws, d.chunk_length, edits=False)  # the edits are not the neighbour blocks' business
    store = database.store
    emb = EmbeddingStore(ws, store.num_chunks)
    index = database.index(d)
    chunk_docs = np.ascontiguousarray(store.chunks["doc"])
    k = d.num_neighbors_query
    spans = blocks(store.num_chunks, d.block_size)
    todo = missing_blocks(ws.neighbour_block, D.shard(spans), lambda a, n: a.shape == (n, k))
    kept = len(D.shard(spans)) - len(todo)
    _note_blocks("neighbours", kept, len(D.shard(spans)))
    with progress("neighbours", sum(e - s for _, s, e in todo), "chunks") as bar:
        for i, s, e in todo:
            ids, _ = search_excluding(index, emb.rows(s, e), chunk_docs[s:e], chunk_docs, k)
            save_npy_atomic(ws.neighbour_block(i), ids)
            kept += 1
            _note_blocks("neighbours", kept, len(D.shard(spans)))
            fault_point("neighbours:block")
            bar.advance(e - s)
    D.barrier()
    if not D.main:
        return {}
    return ws.finish("neighbours", {"chunks": store.num_chunks, "k": k, "blocks": len(spans),
                                    "seconds": round(time.time() - started, 2)})


def build(cfg: Config, rebuild: str | None = None) -> dict[str, dict]:
    """Run every stage in order; returns each stage's metadata. A finished stage whose files were damaged
    since (missing, or of another size than recorded) is made again with the same settings; when the remade
    files equal the recorded ones nothing after it changes, else the stages after it are rebuilt."""
    if rebuild is not None and rebuild not in DB_STAGES + OPTIONAL_STAGES:
        raise UserError(f"--rebuild {rebuild!r}: expected one of {', '.join(DB_STAGES + OPTIONAL_STAGES)}")
    if rebuild == "bm25" and cfg.db.lexical_index != "bm25":
        raise UserError("--rebuild bm25: this database has no BM25 index to rebuild (db.lexical_index is "
                        f"{cfg.db.lexical_index!r}); set db.lexical_index = \"bm25\" to build one")
    first = DB_STAGES.index(rebuild) if rebuild in DB_STAGES else len(DB_STAGES)
    again = {s: i >= first for i, s in enumerate(DB_STAGES)}
    again["bm25"] = rebuild == "bm25" or again["chunks"]  # (built from the chunks, and nothing from it)
    ws = workspace_of(cfg)
    D = dist()
    files = corpus_files(cfg.corpus, cfg.base_dir)
    metas: dict[str, dict] = {}
    repairs: dict[str, tuple[dict, set[str] | None]] = {}

    def check(stage: str) -> None:  # rank 0, before the stage
        meta = ws.read_meta(stage)
        if not D.main or again[stage] or not meta:
            return
        blockwise = stage in ("embed", "neighbours")  # only the damaged blocks are made again
        if meta.get("repair_of"):  # a repair that was interrupted (or asked for by `db verify --repair`)
            repairs[stage] = (meta["repair_of"], set(meta["repairing"]) if blockwise else None)
        elif meta.get("complete") and (problems := ws.damaged(stage)):
            repairs[stage] = (ws.start_repair(stage, problems), set(problems) if blockwise else None)

    def settle(stage: str) -> None:  # rank 0, after the stage
        if stage in repairs:
            old, names = repairs.pop(stage)
            if not ws.end_repair(stage, old, names) and stage in DB_STAGES:
                for later in DB_STAGES[DB_STAGES.index(stage) + 1 :]:
                    again[later] = True
            metas[stage] = ws.require(stage)

    if D.main:
        ws.root.mkdir(parents=True, exist_ok=True)
        check("tokenizer")
        metas["tokenizer"] = stage_tokenizer(cfg, ws, files, again["tokenizer"])
        settle("tokenizer")
        check("chunks")
        metas["chunks"] = stage_chunks(cfg, ws, files, metas["tokenizer"], again["chunks"])
        settle("chunks")
        if cfg.db.lexical_index == "bm25":  # (an optional stage: see db/bm25.py)
            from .bm25 import stage_bm25

            check("bm25")
            metas["bm25"] = stage_bm25(cfg.db, ws, metas["chunks"], metas["tokenizer"], open_tokenizer(ws),
                                       again["bm25"])
            settle("bm25")
        check("embed")
    D.barrier()
    metas["chunks"] = ws.require("chunks")
    metas["embed"] = stage_embed(cfg, ws, metas["chunks"], again["embed"])
    if D.main:
        settle("embed")
        check("index")
    D.barrier()
    metas["embed"] = ws.require("embed")
    metas["index"] = stage_index(cfg, ws, metas["embed"], again["index"])  # (every rank: lists on disk share blocks)
    if D.main:
        settle("index")
        check("neighbours")
    D.barrier()
    metas["index"] = ws.require("index")
    metas["neighbours"] = stage_neighbours(cfg, ws, metas["index"], again["neighbours"])
    if D.main:
        settle("neighbours")
    if D.main and (ws.db / "edits").is_dir() and rebuild is None:
        from .edit import refresh_neighbours

        set_kept_note("db build: every stage finished and kept; the neighbour refresh after `db remove` is made "
                      "again by the rerun")
        refresh_neighbours(cfg, ws)  # after `db remove`: the neighbour rows that named a removed chunk
        if cfg.db.lexical_index == "bm25":
            from .edit import refresh_bm25

            refresh_bm25(cfg, ws)  # documents added before the BM25 stage existed
    return metas


# ----------------------------------------------------------------------------------------------- query


# ---------------------------------------------------------------------------------------------- verify


def verify(cfg: Config, fraction: float, repair: bool = False, seed: int | None = None) -> dict[str, Any]:
    """`retro db verify`: the size of every file each stage recorded; the sha256 of every single-file artefact
    and of a random `fraction` of the blocks; and a random `fraction` of the embedding and neighbour blocks
    computed again and compared with what is stored (as Megatron's --validate did). With `repair`, damaged
    files are made again (`db build` would find only those whose size changed)."""
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction {fraction}: expected a number in (0, 1]")
    ws = workspace_of(cfg)
    require_built(ws, ws.stages())
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"stages": {}, "recomputed": {}, "damaged": {}}
    sampled: dict[str, list[int]] = {}
    for stage in ws.stages():
        recorded = ws.read_meta(stage)["files"]
        block_names = sorted(n for n in recorded if n.startswith("block-"))
        picked = sorted(rng.choice(len(block_names), size=max(1, round(fraction * len(block_names))),
                                   replace=False).tolist()) if block_names else []
        sampled[stage] = [int(block_names[i][6:12]) for i in picked]
        deep = {n for n in recorded if not n.startswith("block-")} | {block_names[i] for i in picked}
        problems = {**ws.damaged(stage), **ws.damaged(stage, deep=True, only=deep)}
        out["stages"][stage] = {"files": len(recorded), "sha256_checked": len(deep), "damaged": len(problems)}
        if problems:
            out["damaged"][stage] = problems
    if out["damaged"] and repair:
        for stage, problems in out["damaged"].items():
            ws.start_repair(stage, problems)
        if "bm25" in out["damaged"]:  # (made again whatever db.lexical_index says now)
            cfg = dataclasses.replace(cfg, db=dataclasses.replace(cfg.db, lexical_index="bm25"))
        build(cfg)
        out["repaired"] = True
        return out
    d = as_built(cfg, ws, knobs=False)  # recomputed as built, whatever [db] or --set say now
    database = Database.open(cfg, d.chunk_length, edits=False, settings=d)
    store = database.store
    emb = EmbeddingStore(ws, store.num_chunks)
    spans = {stage: blocks(store.num_chunks, int(ws.read_meta(stage)["settings"]["block_size"]))
             for stage in ("embed", "neighbours")}  # as built, whatever db.block_size says now
    ok_embed = [b for b in sampled.get("embed", []) if f"block-{b:06d}.npy" not in out["damaged"].get("embed", {})]
    upstream_ok = not out["damaged"].get("tokenizer") and not out["damaged"].get("chunks")
    if ok_embed and upstream_ok:  # recomputing from damaged tokens would compare garbage (or fail to decode)
        tok = open_tokenizer(ws)
        embedder = database.embedder
        worst = 1.0
        for b in ok_embed:
            _, s, e = spans["embed"][b]
            again = np.asarray(embedder.forward(embedder.prepare(chunk_texts(store, tok, s, e))), dtype=np.float32)
            stored = emb.rows(s, e)
            norms = np.linalg.norm(again, axis=1) * np.linalg.norm(stored, axis=1)
            cos = np.where(norms > 0, (again * stored).sum(1) / np.maximum(norms, 1e-12), 1.0)
            worst = min(worst, float(cos.min()))
        out["recomputed"]["embed"] = {"blocks": len(ok_embed), "min_cosine": round(worst, 6), "ok": worst >= 0.999}
    ok_nb = [b for b in sampled.get("neighbours", [])
             if f"block-{b:06d}.npy" not in out["damaged"].get("neighbours", {})]
    if ok_nb and upstream_ok and not out["damaged"].get("embed") and not out["damaged"].get("index"):
        index = database.index()
        chunk_docs = np.ascontiguousarray(store.chunks["doc"])
        k = ws.read_meta("neighbours")["counts"]["k"]
        same = total = 0
        for b in ok_nb:
            _, s, e = spans["neighbours"][b]
            ids, _ = search_excluding(index, emb.rows(s, e), chunk_docs[s:e], chunk_docs, k)
            stored = load_npy(ws.neighbour_block(b))
            same += int((ids == stored).all(1).sum())
            total += e - s
        out["recomputed"]["neighbours"] = {"blocks": len(ok_nb), "rows_identical": round(same / total, 6),
                                           "ok": same / total >= 0.99}
    return out


# ------------------------------------------------------------------------------------------------ info


def info(cfg: Config) -> dict[str, Any]:
    """What each stage holds and the settings it was built with (not those the config gives now: a warning
    line names any that differ)."""
    ws = workspace_of(cfg)
    out: dict[str, Any] = {"workspace": str(ws.root), "stages": {}}
    if all((ws.read_meta(stage) or {}).get("complete") for stage in ("chunks", "embed", "index")):
        as_built(cfg, ws)  # (for its warning)
    optional = tuple(s for s in OPTIONAL_STAGES if s not in ws.stages() and cfg.db.lexical_index == s)
    for stage in ws.stages() + optional:  # (an optional stage the settings ask for shows as missing)
        meta = ws.read_meta(stage)
        size = sum(f.stat().st_size for f in ws.stage_dir(stage).rglob("*") if f.is_file()) \
            if ws.stage_dir(stage).exists() else 0
        out["stages"][stage] = {
            "state": "missing" if meta is None else ("complete" if meta.get("complete") else "incomplete"),
            "settings": meta["settings"] if meta else {}, "counts": (meta or {}).get("counts", {}),
            "bytes": size,
        }
    if (ws.read_meta("chunks") or {}).get("complete"):
        from .edit import describe

        out["edits"] = describe(ws)
    return out

