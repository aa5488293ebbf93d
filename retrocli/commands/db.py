"""`retro db build | query | eval | info | verify | add | remove`: the retrieval database."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError
from ..runtime import console
from . import ConfigOpt, SetOpt, argv, load_workspace, writing


def db_build(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
             rebuild: Optional[str] = typer.Option(None, "--rebuild", metavar="STAGE",
                                                   help="discard STAGE (tokenizer, chunks, embed, index, "
                                                        "neighbours) and everything after it, then build; "
                                                        "bm25: the BM25 index alone")):
    """Corpus -> tokenizer -> 64-token chunks -> embeddings -> Faiss index -> neighbours of every chunk.

    Each stage is skipped when it is complete with the same settings and resumes block by block after a
    crash. With `[launch] nproc_per_node` > 1, or under `torchrun --nproc_per_node N -m retrocli db build ...`,
    the processes share the embed and neighbour stages.

    Embedders (db.embedder): "all-MiniLM-L6-v2" (default, packaged, offline; ~30 chunks/s on 2 CPU cores),
    a local Hugging Face encoder folder, or "lexical": model-free, IDF-weighted hashing of the tokenizer's
    pieces, thousands of chunks/s, for smoke tests and large corpora on a CPU; it matches pieces, not
    meaning, so its recall on paraphrases is lower.

    **Examples**

    ```
    retro db build -c my-ws/retro.toml
    retro db build -c my-ws/retro.toml --set db.embedder=lexical     # fast, model-free
    retro db build -c my-ws/retro.toml --rebuild index
    ```"""
    from ..db import build as db
    from ..runtime import relaunch_under_torchrun

    cfg = load_workspace(config, set_)
    with writing(cfg, "db build"):
        relaunch_under_torchrun(cfg.launch, argv())  # [launch] nproc_per_node > 1: ranks share embed + neighbours
        metas = db.build(cfg, rebuild)
    from ..runtime import dist

    if dist().main:
        _print_build_summary(metas)


def _print_build_summary(metas: dict) -> None:
    from rich.table import Table

    table = Table(title="retro db build")
    for col in ("stage", "result", "seconds"):
        table.add_column(col)
    for stage, meta in metas.items():
        counts = meta.get("counts", {})
        detail = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in counts.items()
                           if k not in ("seconds", "skipped") and not isinstance(v, dict))
        table.add_row(stage, detail, str(counts.get("seconds", "")))
    console.print(table)


def db_query(text: Optional[List[str]] = typer.Argument(None, help="query text(s)"),
             config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
             k: int = typer.Option(5, "-k", help="neighbours to show"),
             file: Optional[Path] = typer.Option(None, "--file", help="a file of queries, one a line"),
             as_json: bool = typer.Option(False, "--json", help="print JSON for scripts: a list with one "
                                          "{\"query\", \"results\"} object per query, each result with rank, "
                                          "distance, chunk_id, doc_id, title, text, continuation")):
    """Embed text, search the database, show the nearest chunks with their continuation and source.

    **Examples**

    ```
    retro db query -c my-ws/retro.toml "How are keyword arguments passed?"
    retro db query -c my-ws/retro.toml -k 3 --json --file questions.txt
    ```"""

    texts = list(text or [])
    if any(not t.strip() for t in texts):
        raise UserError("a query text is empty: give the words to search for, e.g. retro db query \"sailing boats\"")
    if file is not None:
        if not file.is_file():
            raise UserError(f"--file {file}: no such file")
        texts += [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise UserError("give a query text, or --file with one query a line" + (f" ({file} has none)" if file else ""))
    from ..config import MAX_SEARCH_K

    if not 1 <= k <= MAX_SEARCH_K:
        raise UserError(f"-k must be in 1..{MAX_SEARCH_K}, got {k}")
    from ..db import database

    results = database.query(load_workspace(config, set_), texts, k)
    if as_json:  # one shape for any number of queries
        out = [{"query": t, "results": r} for t, r in zip(texts, results)]
        sys.stdout.write(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
        return
    from rich.table import Table

    for t, hits in zip(texts, results):
        table = Table(title=f"query: {t[:80]}", show_lines=True)
        for col in ("#", "distance", "chunk", "source", "text", "continuation"):
            table.add_column(col, overflow="fold")
        for h in hits:
            table.add_row(str(h["rank"]), f"{h['distance']:.3f}", str(h["chunk_id"]),
                          f"{h['title'] or ''}\n{h['doc_id']}", h["text"], h["continuation"])
        console.print(table)


def db_eval(qa_file: Path = typer.Argument(..., help="a QA file that carries each question's gold passage: SQuAD "
                                           "JSON, QED / NQ JSON lines with paragraph_text, InstructRetro JSON with "
                                           "ctxs; or question + answer JSON lines (NQ-open), matched by "
                                           "answer (.gz too)"),
            config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
            k: str = typer.Option("1,5,20", "-k", help="the k of recall@k, comma-separated"),
            match: str = typer.Option("auto", "--match", help="how a retrieved chunk counts as a hit: document "
                                      "(its document is the gold passage), answer (a gold answer is in its text "
                                      "and continuation), or auto (document when most gold passages are in the "
                                      "database)"),
            fmt: Optional[str] = typer.Option(None, "--format", help="squad, qed, nq, instructretro or qa "
                                              "(default: told from the file)"),
            limit: Optional[int] = typer.Option(None, "--limit", help="evaluate the first N questions only"),
            as_json: bool = typer.Option(False, "--json", help="print one JSON object: file, format, match, "
                                         "match_reason, k, recall (by k), mrr, questions, skipped (by reason), "
                                         "search_seconds, queries_per_second")):
    """Retrieval recall: search the database with each question of a QA file, as `retro db query` does, and
    report recall@k (its gold passage among the top k), MRR and queries/s.

    A hit is matched by document when the database holds the file's passages as documents (tokens equal to
    the gold passage's), else by answer (a gold answer, SQuAD-normalised, in the chunk and its continuation);
    `--match auto` chooses per file from a sample and says which.

    **Examples**

    ```
    retro db eval -c my-ws/retro.toml squad_dev.json.gz
    retro db eval -c my-ws/retro.toml qed.jsonl.gz -k 1,10,100 --limit 500 --json
    ```"""
    try:
        ks = [int(x) for x in k.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"-k takes comma-separated whole numbers, e.g. -k 1,5,20; got {k!r}") from None
    from ..db import recall

    result = recall.evaluate(load_workspace(config, set_), qa_file, ks, match, limit, fmt)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=1) + "\n")
        return
    from rich.table import Table

    table = Table(title=f"recall, match by {result.match}", min_width=40)
    for col in ("k", "recall@k"):
        table.add_column(col, justify="right")
    for kk in result.ks:
        table.add_row(str(kk), f"{result.recall[kk]:.4f}")
    console.print(table)
    skipped = ", ".join(f"{why} {n:,}" for why, n in result.skipped.items()) or "none"
    console.print(f"{qa_file} ({result.format}): MRR@{result.ks[-1]} {result.mrr:.4f}; questions "
                  f"{result.questions:,}; skipped: {skipped}; {result.queries_per_second:.1f} queries/s\n"
                  f"match: {result.match} ({result.why})")


def db_info(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
            as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Documents, chunks, tokens, the index, which stages are complete and the settings they used.

    **Examples**

    ```
    retro db info -c my-ws/retro.toml
    retro db info -c my-ws/retro.toml --json
    ```"""
    from ..db import build as db

    info = db.info(load_workspace(config, set_))
    if as_json:
        sys.stdout.write(json.dumps(info, indent=1) + "\n")
        return
    from rich.table import Table

    table = Table(title=f"database in {info['workspace']}")
    for col in ("stage", "state", "counts", "settings", "size"):
        table.add_column(col, overflow="fold")
    for stage, s in info["stages"].items():
        counts = ", ".join(f"{k}={v}" for k, v in s["counts"].items())
        settings = ", ".join(f"{k}={v}" for k, v in s["settings"].items() if k not in ("corpus", "trained_on"))
        table.add_row(stage, s["state"], counts, settings, f"{s['bytes'] / 2**20:.1f} MiB")
    console.print(table)
    edits = info.get("edits") or {}
    if edits.get("sources") or edits.get("removed"):
        table = Table(title="edits (`retro db add` / `retro db remove`)")
        for col in ("when", "what", "source", "documents"):
            table.add_column(col, overflow="fold")
        for src in edits["sources"]:
            table.add_row(src["added"], f"added ({src['segment']})", src["source"], f"{len(src['documents']):,}")
        for rem in edits["removed"]:
            table.add_row(rem["removed"], "removed", ", ".join(rem["sources"]) or ", ".join(rem["ids"][:5]),
                          f"{rem['documents']:,}")
        if edits.get("index"):
            ix = edits["index"]
            table.add_row(ix["trained"], f"index retrained ({ix['name']})", ix["spec"], f"{ix['ntotal']:,} chunks")
        if edits.get("refresh"):
            rf = edits["refresh"]
            table.add_row(rf["refreshed"], f"neighbours refreshed ({rf['name']})", "`retro db build`",
                          f"{rf['rows']:,} chunk rows")
        console.print(table)


def db_verify(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
              fraction: float = typer.Option(0.05, "--fraction", help="share of the blocks to checksum and to "
                                             "compute again (at least one of each)"),
              repair: bool = typer.Option(False, "--repair", help="make the damaged files again (same settings)"),
              as_json: bool = typer.Option(False, "--json", help="print the report as JSON")):
    """Check the finished database: every file's recorded size; the sha256 of each single-file artefact and
    of a random share of the blocks; and that share of the embedding and neighbour blocks computed again and
    compared with what is stored. Exit code 2 when something is damaged or differs (`--repair` fixes damage).

    `retro db build` checks sizes on every run and makes truncated or missing files again by itself; a file
    damaged in place (same size) is found only here.

    **Examples**

    ```
    retro db verify -c my-ws/retro.toml
    retro db verify -c my-ws/retro.toml --fraction 1 --repair
    ```"""
    from ..db import build as db

    cfg = load_workspace(config, set_)
    if repair:
        with writing(cfg, "db verify --repair"):
            report = db.verify(cfg, fraction, repair=True)
    else:
        report = db.verify(cfg, fraction)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
    else:
        from rich.table import Table

        table = Table(title="retro db verify")
        for col in ("stage", "files", "sha256 checked", "damaged", "computed again"):
            table.add_column(col)
        for stage, s in report["stages"].items():
            again = report["recomputed"].get(stage)
            redo = "" if again is None else ", ".join(f"{k}={v}" for k, v in again.items())
            table.add_row(stage, str(s.get("files", "-")), str(s.get("sha256_checked", s.get("note", ""))),
                          str(s.get("damaged", "-")), redo)
        console.print(table)
    if report.get("repaired"):
        console.print("repaired: " + ", ".join(f"{st} ({len(p)} file(s))" for st, p in report["damaged"].items()))
        return
    bad = [f"{st}/{name}: {why}" for st, probs in report["damaged"].items() for name, why in probs.items()]
    bad += [f"{st} computed again differs ({r})" for st, r in report["recomputed"].items() if not r["ok"]]
    if bad:
        raise UserError("the database in " + report.get("workspace", str(cfg.resolve(cfg.workspace.dir))) + " failed "
                        "verification:\n  " + "\n  ".join(bad[:20]) + "\nRun `retro db verify --repair` to make "
                        "damaged files again; a block computed again that differs means the embedder or index "
                        "gives other results now (another model file or library version)")


def db_add(files: List[str] = typer.Argument(..., help="files or globs to add (.txt, .jsonl, .json, .gz), "
                                             "read like corpus.train"),
           config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
           retrain: bool = typer.Option(False, "--retrain", help="also train the index afresh on every chunk now "
                                        "in the database (time grows with the database; searches then use it)")):
    """Add documents to the built database without rebuilding it: tokenized, chunked and embedded as the
    corpus was, added to the trained index, with their neighbours. A document already present (same id or
    same text) is not added again. Killed halfway, the database stays as it was.

    The index keeps the quantizer it was trained with unless `--retrain`: right when the new text is like the
    old; retrain when much of the database is new text of another kind.

    **Examples**

    ```
    retro db add -c my-ws/retro.toml news/*.jsonl
    retro db add -c my-ws/retro.toml notes.txt --retrain
    ```"""
    from ..db import edit as edits

    cfg = load_workspace(config, set_)
    with writing(cfg, "db add"):
        s = edits.add(cfg, list(files), retrain)
    if "segment" in s:
        console.print(f"added {s['documents']:,} document(s), {s['chunks']:,} chunks ({s['indexed']:,} indexed) as "
                      f"{s['segment']} in {s['seconds']:.1f} s; {len(s['duplicates']):,} already present")
    if s.get("retrained"):
        console.print(f"retrained the index on {s['retrained']['train_samples']:,} chunks and added all "
                      f"{s['retrained']['ntotal']:,} in {s['seconds_retrain']:.1f} s ({s['retrained']['name']})")


def db_remove(doc: Optional[List[str]] = typer.Option(None, "--doc", help="a document id (repeatable)"),
              source: Optional[List[str]] = typer.Option(None, "--source", help="every document of this source "
                                                         "file (repeatable)"),
              config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Remove documents from the database: their chunks are never retrieved again (by `db query`, ppl,
    generate, or as pretraining neighbours). Nothing is rebuilt; chunk ids keep their meaning.

    **Examples**

    ```
    retro db remove -c my-ws/retro.toml --doc news:1234
    retro db remove -c my-ws/retro.toml --source news/old.jsonl
    ```"""
    from ..db import edit as edits

    cfg = load_workspace(config, set_)
    with writing(cfg, "db remove"):
        s = edits.remove(cfg, list(doc or []), list(source or []))
    console.print(f"removed {s['removed_documents']:,} document(s), {s['removed_chunks']:,} chunks")
