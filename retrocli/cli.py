"""The `retro` command: a registry of verbs. Each verb loads the workspace TOML and calls its stage module."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from .allocator import tune_allocator
from .config import load_config
from .errors import UserError
from .runtime import console

_ARGV: list[str] = []  # the command line main() was given, for relaunching it under torchrun

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown",
                  help="retro: retrieval-enhanced language models (RETRO / InstructRetro) from a corpus to a "
                       "scored, instruction-tuned model.")
db_app = typer.Typer(no_args_is_help=True, rich_markup_mode="markdown",
                     help="The retrieval database: build it, query it, inspect it.")
app.add_typer(db_app, name="db")

ConfigOpt = typer.Option(None, "-c", "--config", help="workspace TOML (default: ./retro.toml)")
SetOpt = typer.Option(None, "--set", help="override a TOML value: --set db.nprobe=32 (repeatable)")


def _config(config: Optional[Path], sets: Optional[List[str]]):
    import os

    cfg = load_config(config, sets or [])
    os.environ.setdefault("RETRO_DIST_BACKEND", cfg.launch.backend)  # for a torchrun started by hand too
    return cfg


def _writing(cfg, command: str):
    """The workspace's writer lock, held for `command` (one writer at a time; readers never wait)."""
    from .workspace import writer_lock

    return writer_lock(cfg.resolve(cfg.workspace.dir), command)


# ----------------------------------------------------------------------------------------------- init


@app.command()
def init(directory: Path = typer.Argument(..., help="folder for the new workspace"),
         recipe: str = typer.Option("tiny", "--recipe", help="recipe to start from (see recipes/)")):
    """Write a commented workspace TOML (every key documented) for you to edit."""
    from .recipes import write_workspace

    path = write_workspace(directory, recipe)
    console.print(f"wrote {path}; next: retro db build -c {path}")


# ------------------------------------------------------------------------------------------------- db


@db_app.command("build")
def db_build(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
             rebuild: Optional[str] = typer.Option(None, "--rebuild", metavar="STAGE",
                                                   help="discard STAGE (tokenizer, chunks, embed, index, "
                                                        "neighbours) and everything after it, then build")):
    """Corpus -> tokenizer -> 64-token chunks -> embeddings -> Faiss index -> neighbours of every chunk.

    Each stage is skipped when it is complete with the same settings and resumes block by block after a
    crash. With `[launch] nproc_per_node` > 1, or under `torchrun --nproc_per_node N -m retrocli db build ...`,
    the processes share the embed and neighbour stages.

    Embedders (db.embedder): "all-MiniLM-L6-v2" (default, packaged, offline; ~30 chunks/s on 2 CPU cores),
    a local Hugging Face encoder folder, or "lexical": model-free, IDF-weighted hashing of the tokenizer's
    pieces, thousands of chunks/s, for smoke tests and large corpora on a CPU; it matches pieces, not
    meaning, so its recall on paraphrases is lower."""
    from . import db
    from .runtime import relaunch_under_torchrun

    cfg = _config(config, set_)
    with _writing(cfg, "db build"):
        relaunch_under_torchrun(cfg.launch, _ARGV)  # [launch] nproc_per_node > 1: ranks share embed + neighbours
        metas = db.build(cfg, rebuild)
    from .runtime import dist

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


@db_app.command("query")
def db_query(text: Optional[List[str]] = typer.Argument(None, help="query text(s)"),
             config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
             k: int = typer.Option(5, "-k", help="neighbours to show"),
             file: Optional[Path] = typer.Option(None, "--file", help="a file of queries, one a line"),
             as_json: bool = typer.Option(False, "--json", help="print JSON for scripts")):
    """Embed text, search the database, show the nearest chunks with their continuation and source."""
    from . import db

    texts = list(text or [])
    if file is not None:
        if not file.is_file():
            raise UserError(f"--file {file}: no such file")
        texts += [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise UserError("give a query text, or --file with one query a line")
    from .config import MAX_SEARCH_K

    if not 1 <= k <= MAX_SEARCH_K:
        raise UserError(f"-k must be in 1..{MAX_SEARCH_K}, got {k}")
    results = db.query(_config(config, set_), texts, k)
    if as_json:
        out = results[0] if len(texts) == 1 and file is None else \
            [{"query": t, "results": r} for t, r in zip(texts, results)]
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


@db_app.command("info")
def db_info(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
            as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Documents, chunks, tokens, the index, which stages are complete and the settings they used."""
    from . import db

    info = db.info(_config(config, set_))
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


@db_app.command("verify")
def db_verify(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
              fraction: float = typer.Option(0.05, "--fraction", help="share of the blocks to checksum and to "
                                             "compute again (at least one of each)"),
              repair: bool = typer.Option(False, "--repair", help="make the damaged files again (same settings)"),
              as_json: bool = typer.Option(False, "--json", help="print the report as JSON")):
    """Check the finished database: every file's recorded size; the sha256 of each single-file artefact and
    of a random share of the blocks; and that share of the embedding and neighbour blocks computed again and
    compared with what is stored. Exit code 2 when something is damaged or differs (`--repair` fixes damage).

    `retro db build` checks sizes on every run and makes truncated or missing files again by itself; a file
    damaged in place (same size) is found only here."""
    from . import db

    cfg = _config(config, set_)
    if repair:
        with _writing(cfg, "db verify --repair"):
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


@db_app.command("add")
def db_add(files: List[str] = typer.Argument(..., help="files or globs to add (.txt, .jsonl, .json, .gz), "
                                             "read like corpus.train"),
           config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
           retrain: bool = typer.Option(False, "--retrain", help="also train the index afresh on every chunk now "
                                        "in the database (time grows with the database; searches then use it)")):
    """Add documents to the built database without rebuilding it: tokenized, chunked and embedded as the
    corpus was, added to the trained index, with their neighbours. A document already present (same id or
    same text) is not added again. Killed halfway, the database stays as it was.

    The index keeps the quantizer it was trained with unless `--retrain`: right when the new text is like the
    old; retrain when much of the database is new text of another kind."""
    from . import edits

    cfg = _config(config, set_)
    with _writing(cfg, "db add"):
        s = edits.add(cfg, list(files), retrain)
    if "segment" in s:
        console.print(f"added {s['documents']:,} document(s), {s['chunks']:,} chunks ({s['indexed']:,} indexed) as "
                      f"{s['segment']} in {s['seconds']:.1f} s; {len(s['duplicates']):,} already present")
    if s.get("retrained"):
        console.print(f"retrained the index on {s['retrained']['train_samples']:,} chunks and added all "
                      f"{s['retrained']['ntotal']:,} in {s['seconds_retrain']:.1f} s ({s['retrained']['name']})")


@db_app.command("remove")
def db_remove(doc: Optional[List[str]] = typer.Option(None, "--doc", help="a document id (repeatable)"),
              source: Optional[List[str]] = typer.Option(None, "--source", help="every document of this source "
                                                         "file (repeatable)"),
              config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Remove documents from the database: their chunks are never retrieved again (by `db query`, ppl,
    generate, or as pretraining neighbours). Nothing is rebuilt; chunk ids keep their meaning."""
    from . import edits

    cfg = _config(config, set_)
    with _writing(cfg, "db remove"):
        s = edits.remove(cfg, list(doc or []), list(source or []))
    console.print(f"removed {s['removed_documents']:,} document(s), {s['removed_chunks']:,} chunks")


# ------------------------------------------------------------------------------------ pretrain, ppl


@app.command()
def pretrain(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Train the Retro model on the database's training documents and their neighbours ([pretrain] keys).

    Checkpoints go to WORKSPACE/checkpoints/pretrain/step-NNNNNN/; rerun the same command to continue from
    the latest complete one. With `[launch] nproc_per_node` > 1 (or `nnodes` > 1) it starts itself through
    torchrun (DDP, or FSDP with `pretrain.fsdp`); running it under torchrun yourself works the same."""
    from . import pretrain as pretrain_mod

    _train("pretrain", pretrain_mod.run, config, set_)


def _train(phase: str, run, config: Optional[Path], set_: Optional[List[str]]) -> None:
    """Load the config, relaunch under torchrun when [launch] asks, run the phase, print its summary."""
    from .runtime import dist, relaunch_under_torchrun

    cfg = _config(config, set_)
    with _writing(cfg, phase):
        relaunch_under_torchrun(cfg.launch, _ARGV)
        summary = run(cfg)
    if dist().main:
        eval_part = f", eval loss {summary['eval_loss']:.4f}" if summary.get("eval_loss") is not None else ""
        loss_part = f", loss {summary['loss']:.4f}" if summary.get("loss") is not None else ""
        console.print(f"{phase}: step {summary['step']}{loss_part}{eval_part}; checkpoints in {summary['run_dir']}")


@app.command()
def ppl(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="a step-NNNNNN folder (default: the "
                                                  "latest complete pretraining checkpoint of the workspace)"),
        no_retrieval: bool = typer.Option(False, "--no-retrieval", help="neighbours replaced by padding (CCA off)"),
        data: Optional[Path] = typer.Option(None, "--data", help="a .txt/.jsonl/.json file to evaluate instead of "
                                            "the validation documents (neighbours retrieved on the fly)"),
        as_json: bool = typer.Option(False, "--json", help="print the result as JSON on stdout")):
    """Perplexity and bits per byte on the validation documents (or --data), with or without retrieval."""
    from . import ppl as ppl_mod
    from .runtime import dist

    result = ppl_mod.run(_config(config, set_), checkpoint, retrieval=not no_retrieval, data=data)
    if not dist().main:
        return
    if as_json:
        keys = ("perplexity", "bits_per_byte", "tokens", "retrieval", "checkpoint")
        sys.stdout.write(json.dumps({k: result[k] for k in keys}) + "\n")
        return
    from rich.table import Table

    table = Table(title="retro ppl")
    for col in ("data", "checkpoint", "retrieval", "tokens", "bytes", "perplexity", "bits/byte"):
        table.add_column(col, overflow="fold")
    table.add_row(Path(result["data"]).name, Path(result["checkpoint"]).name, "on" if result["retrieval"] else "off",
                  f"{result['tokens']:,}", f"{result['bytes']:,}", f"{result['perplexity']:.3f}",
                  f"{result['bits_per_byte']:.4f}")
    console.print(table)
    console.print(f"wrote {result['json_path']}")


# ------------------------------------------------------------------------------------------------- sft


@app.command()
def sft(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Instruction-tune a pretrained checkpoint on the weighted blend of `[[sft.blend]]` datasets ([sft] keys).

    Formats: squad (SQuAD JSON), qed / nq (JSONL), instructretro (JSON list with ctxs), chat (Human /
    Assistant text, or messages), self_instruct, qa. The loss covers the answer and its end-of-sequence
    token only; contexts are cut to fit the sequence, answers never. Starts from `sft.init_from`, else the
    latest pretraining checkpoint; checkpoints go to WORKSPACE/checkpoints/sft/ and a rerun resumes.
    `sft.neighbors`: "none" (encoder gated off, as InstructRetro), "context" or "database"."""
    from . import sft as sft_mod

    _train("sft", sft_mod.run, config, set_)


# -------------------------------------------------------------------------------------------- generate


@app.command()
def generate(
    task: Optional[str] = typer.Argument(None, help="questions: a SQuAD JSON, NQ-open / QED / qa JSONL, "
                                         "InstructRetro JSON (with ctxs) or chat file, or builtin:tiny-cloze-test; "
                                         "'-': prompts on stdin, one per line"),
    config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", help="answer this prompt (repeatable) and print "
                                               "the answer"),
    fmt: str = typer.Option("auto", "--format", help="format of TASK: auto (from its first record), squad, qed, "
                                                     "nq, instructretro, qa, chat, self_instruct"),
    out: Optional[Path] = typer.Option(None, "--out", help="the answers' JSON lines (default: "
                                       "WORKSPACE/generate/TASK.CONTEXTS.RUN.STEP.jsonl, RUN/STEP: the checkpoint's)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="a step or run folder (default: "
                                              "generate.checkpoint, else the latest SFT, else pretraining one)"),
    skip_bad: bool = typer.Option(False, "--skip-bad-records", help="skip malformed records (counted) instead "
                                  "of stopping at the first"),
    limit: int = typer.Option(0, "--limit", help="answer only the first N questions of TASK; 0: all"),
):
    """Answer every question of TASK (or --prompt / stdin prompts) with the model, retrieving as it writes.

    Prompts are built as in SFT, with `generate.contexts` = file | database (the question as the query) |
    none (closed book). Decoding keeps a KV cache; whenever the text crosses a chunk boundary the new chunk's
    neighbours are retrieved for the CCA (`generate.neighbors`). Greedy by default; temperature, top_k,
    top_p, stop strings and max_new_tokens in [generate]. A rerun after a kill continues; under torchrun
    (`[launch]`) the questions are shared among the ranks. Score the output with `retro score`."""
    from . import generate as gen
    from .runtime import dist, relaunch_under_torchrun

    cfg = _config(config, set_)
    prompts = list(prompt) if prompt else None
    if task == "-":
        prompts = [line.strip() for line in sys.stdin if line.strip()]
        if not prompts:
            raise UserError("no prompts on stdin")
    elif task is None and prompts is None:
        raise UserError("give a task file, '-' for prompts on stdin, or --prompt TEXT")
    if prompts is None:
        relaunch_under_torchrun(cfg.launch, _ARGV)
    summary = gen.run(cfg, task if task != "-" else None, prompts, fmt, out, checkpoint, skip_bad, limit)
    if not dist().main:
        return
    if "answers" in summary:
        for a in summary["answers"]:
            sys.stdout.write(a["prediction"] + "\n")
        return
    rate = summary["tokens"] / max(summary["seconds"], 1e-9)
    console.print(f"generate: {summary['questions']:,} questions ({summary['resumed']:,} from an earlier run), "
                  f"{summary['tokens']:,} tokens in {summary['seconds']:.1f} s ({rate:,.0f} tokens/s); contexts "
                  f"{summary['contexts']}, neighbours {summary['neighbors']}, {summary['too_long']:,} prompts too "
                  f"long; answers in {summary['out']}")


# ----------------------------------------------------------------------------------------------- score


@app.command()
def score(
    predictions: List[Path] = typer.Argument(..., help="one or more prediction files (one task each): our "
                                             "generator's JSONL (id, prediction, gold) or SQuAD's prediction "
                                             "JSON {question id: answer}"),
    gold: Optional[Path] = typer.Option(None, "--gold", help="gold answers: every question of this file is "
                                        "scored (a missing prediction scores 0); default: the JSONL's gold"),
    gold_format: str = typer.Option("squad", "--gold-format", help="format of --gold: squad, qed, nq, "
                                    "instructretro or qa"),
    first_gold: bool = typer.Option(False, "--first-gold", help="InstructRetro's variant: score the first gold "
                                    "answer only (default: the max over gold answers, as SQuAD's script)"),
    regex: bool = typer.Option(False, "--regex", help="the gold answers are regular expressions (CuratedTREC): "
                               "EM = the pattern matches the start of the prediction, ignoring case; F1 = EM. "
                               "JSONL records with 'gold_regex' are scored so without it"),
    rouge: bool = typer.Option(False, "--rouge", help="also ROUGE-1/2/L and their geometric mean"),
    as_json: bool = typer.Option(False, "--json", help="print the scores as JSON on stdout (one object; with "
                                 "several files, one per file keyed by path)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the scores here (default: "
                                       "PREDICTIONS.scores.json beside each file; only with one file)"),
):
    """Exact match and F1 with SQuAD's official normalisation (lowercase, no punctuation, no a/an/the),
    as percentages, one table row per prediction file; with SQuAD's prediction JSON and `--gold` a SQuAD
    file the numbers are those of SQuAD's v1.1 evaluation script."""
    from rich.table import Table

    from . import score as score_mod
    from .workspace import write_json_atomic

    if out is not None and len(predictions) > 1:
        raise UserError("--out takes one prediction file; with several, each gets PREDICTIONS.scores.json")
    golds = score_mod.load_gold(gold, gold_format) if gold is not None else None
    results = {}
    for path in predictions:
        result = score_mod.score(score_mod.read_predictions(path), golds, first_gold=first_gold, rouge=rouge,
                                 regex=regex)
        result.update(predictions=str(path), gold=str(gold) if gold else None,
                      variant="first gold answer" if first_gold else "max over gold answers")
        target = out or path.with_name(path.name + ".scores.json")
        write_json_atomic(target, result)
        results[str(path)] = result
    if as_json:
        print(json.dumps(next(iter(results.values())) if len(results) == 1 else results))
        return
    table = Table(title="retro score" + (f" (gold: {gold.name})" if gold else ""))
    rouge_cols = ("ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE gm") if rouge else ()
    for col in ("task", "questions", "EM", "F1", "missing", "unknown", "regex") + rouge_cols:
        table.add_column(col, justify="left" if col == "task" else "right", overflow="fold")
    for path, result in results.items():
        row = [Path(path).name, f"{result['count']:,}", f"{result['exact_match']:.2f}", f"{result['f1']:.2f}",
               f"{result['missing']:,}", f"{result['unknown']:,}", f"{result['regex']:,}"]
        if rouge:
            row += [f"{result[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL", "rouge_gm")]
        table.add_row(*row)
    console.print(table)
    console.print("written to " + ", ".join(str(out or Path(p).with_name(Path(p).name + ".scores.json"))
                                            for p in results))


# ------------------------------------------------------------------------------------------- reproduce


@app.command()
def reproduce(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Run a recipe end to end: db build, pretrain (and the GPT baseline), ppl, sft, generate, score; then
    WORKSPACE/report.md with every figure and the command that produced it (and loss.png with matplotlib).

    Each stage is skipped when its outputs are complete, so rerunning after a failure continues. What runs
    is set in [reproduce] (baseline, sft, qa_task, qa_limit, contexts, ppl_data)."""
    from . import reproduce as reproduce_mod

    path = config or Path("retro.toml")
    cfg = _config(config, set_)  # report a bad TOML before anything runs
    with _writing(cfg, "reproduce"):  # its stages run under this lock
        reproduce_mod.run(path, list(set_ or []))


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run the CLI: user errors print one message and exit 2; bugs keep their traceback (exit 1)."""
    global _ARGV
    _ARGV = list(sys.argv[1:] if argv is None else argv)
    tune_allocator()  # CPU steps re-faulted their largest tensors every time (retrocli/allocator.py)
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        console.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted: finished blocks are kept; rerun the same command to continue")
        return 130
    except OSError as e:
        from .workspace import WRITE_ERRNOS, write_failed

        if e.errno not in WRITE_ERRNOS:
            raise
        where = Path(e.filename) if e.filename else Path("(a file)")
        console.print(f"[bold red]error:[/bold red] {escape(str(write_failed(where, e)))}", highlight=False,
                      soft_wrap=True)
        return 2
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # click's usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return 2
        if isinstance(e, click.exceptions.Abort):
            return 130
        raise
    return 0
