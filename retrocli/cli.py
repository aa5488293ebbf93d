"""The `retro` command: a registry of verbs. Each verb loads the workspace TOML and calls its stage module."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer import _click as click  # typer vendors click: its exceptions are these, not the `click` package's

from .allocator import tune_allocator
from .config import load_config
from .errors import UserError
from .runtime import console

_ARGV: list[str] = []  # the command line main() was given, for relaunching it under torchrun


def _bare_flags(params: list) -> list:
    for p in params:
        if getattr(p, "is_flag", False):
            p.metavar = ""  # typer writes `<bool>` after a flag in --help, as if it took a value
    return params


class _Command(typer.core.TyperCommand):
    def get_params(self, ctx):
        return _bare_flags(super().get_params(ctx))


class _Group(typer.core.TyperGroup):
    def get_params(self, ctx):
        return _bare_flags(super().get_params(ctx))


def _typer(help: str, completion: bool = False) -> typer.Typer:
    return typer.Typer(cls=_Group, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="markdown",
                       context_settings={"help_option_names": ["-h", "--help"]}, help=help,
                       add_completion=completion)


app = _typer("retro: retrieval-enhanced language models (RETRO / InstructRetro) from a corpus to a scored, "
             "instruction-tuned model.\n\nStart with `retro init my-ws`, then `retro db build -c my-ws/retro.toml`; "
             "`retro VERB -h` shows each verb with examples.", completion=True)
db_app = _typer("The retrieval database: build it, query it, inspect it, edit it.")
app.add_typer(db_app, name="db")
config_app = _typer("The workspace TOML as `retro` reads it: show it with the origin of every value, or check it.")
app.add_typer(config_app, name="config")


def _print_version(value: bool) -> None:
    if not value:
        return
    import platform
    from importlib.metadata import version

    import faiss
    import torch

    cuda = (f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
            if torch.cuda.is_available() else "no CUDA device")
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    for line in (f"retro {version('retrocli')}", f"python {platform.python_version()} ({sys.executable})",
                 f"torch {torch.__version__} ({cuda}; {os.cpu_count()} CPU cores)",
                 f"faiss {faiss.__version__} ({gpus} GPU(s) for Faiss)",
                 f"transformers {version('transformers')}, typer {version('typer')}"):
        sys.stdout.write(line + "\n")
    raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print the versions of retro, python, torch (and its device), faiss "
                                            "and transformers, then exit")):
    pass


ConfigOpt = typer.Option(None, "-c", "--config", metavar="TOML", help="workspace TOML (default: ./retro.toml)")
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE", help="override a TOML value: --set db.nprobe=32 "
                      "(repeatable; the value is read as TOML, a bare word as a string)")


def _config(config: Optional[Path], sets: Optional[List[str]]):
    cfg = load_config(config, sets or [])
    os.environ.setdefault("RETRO_DIST_BACKEND", cfg.launch.backend)  # for a torchrun started by hand too
    return cfg


def _writing(cfg, command: str):
    """The workspace's writer lock, held for `command` (one writer at a time; readers never wait)."""
    from .workspace import writer_lock

    return writer_lock(cfg.resolve(cfg.workspace.dir), command)


# ----------------------------------------------------------------------------------------------- init


@app.command(cls=_Command)
def init(directory: Optional[Path] = typer.Argument(None, help="folder for the new workspace (made if needed)"),
         recipe: str = typer.Option("tiny", "--recipe", help="recipe to start from: a name from --list, or a TOML "
                                    "file"),
         list_: bool = typer.Option(False, "--list", help="name the recipes with their descriptions, then exit")):
    """Write DIR/retro.toml, a commented workspace TOML (every key documented) for you to edit; every artefact
    of the workspace (database, checkpoints, answers) then goes into DIR.

    **Examples**

    ```
    retro init my-ws                       # the tiny recipe: the whole chain on a CPU in minutes
    retro init --list
    retro init big-ws --recipe copy-cpu
    ```"""
    from .recipes import list_recipes, write_workspace

    if list_:
        from rich.table import Table

        table = Table(title="recipes (retro init DIR --recipe NAME)")
        table.add_column("name")
        table.add_column("what it is", overflow="fold")
        for name, text in list_recipes():
            table.add_row(name, text)
        Console().print(table)
        return
    if directory is None:
        raise UserError("give a folder for the new workspace: retro init DIR [--recipe NAME] (`retro init --list` "
                        "names the recipes)")
    path = write_workspace(directory, recipe)
    console.print(f"wrote {path}; next: retro db build -c {path}", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------- config


@config_app.command("show", cls=_Command)
def config_show(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Print the workspace TOML as `retro` reads it: every key of every section, each value followed by where it
    came from (default, file, `extends FILE`, `--set`). The output is valid TOML.

    **Examples**

    ```
    retro config show -c my-ws/retro.toml
    retro config show -c my-ws/retro.toml --set db.nprobe=32 | grep nprobe
    ```"""
    from .config import to_annotated_toml

    sys.stdout.write(to_annotated_toml(_config(config, set_)))


@config_app.command("check", cls=_Command)
def config_check(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Check a workspace TOML without running anything: types, ranges, unknown keys and the checks across keys,
    every problem at once. Exit code 0 when it is valid, 2 when not (for the CI of your own recipes).

    **Examples**

    ```
    retro config check -c my-ws/retro.toml
    for f in recipes/*.toml; do retro config check -c "$f" || exit 1; done
    ```"""
    cfg = _config(config, set_)
    given = sum(src != "--set" for src in cfg.origins.values())
    sets = sum(src == "--set" for src in cfg.origins.values())
    console.print(f"{cfg.source}: valid ({given} keys from the file{'s' if given != 1 else ''}, {sets} from --set, "
                  "the rest defaults)", highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------------- db


@db_app.command("build", cls=_Command)
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
    meaning, so its recall on paraphrases is lower.

    **Examples**

    ```
    retro db build -c my-ws/retro.toml
    retro db build -c my-ws/retro.toml --set db.embedder=lexical     # fast, model-free
    retro db build -c my-ws/retro.toml --rebuild index
    ```"""
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


@db_app.command("query", cls=_Command)
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
    from . import db

    texts = list(text or [])
    if any(not t.strip() for t in texts):
        raise UserError("a query text is empty: give the words to search for, e.g. retro db query \"sailing boats\"")
    if file is not None:
        if not file.is_file():
            raise UserError(f"--file {file}: no such file")
        texts += [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise UserError("give a query text, or --file with one query a line" + (f" ({file} has none)" if file else ""))
    from .config import MAX_SEARCH_K

    if not 1 <= k <= MAX_SEARCH_K:
        raise UserError(f"-k must be in 1..{MAX_SEARCH_K}, got {k}")
    results = db.query(_config(config, set_), texts, k)
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


@db_app.command("info", cls=_Command)
def db_info(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
            as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Documents, chunks, tokens, the index, which stages are complete and the settings they used.

    **Examples**

    ```
    retro db info -c my-ws/retro.toml
    retro db info -c my-ws/retro.toml --json
    ```"""
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


@db_app.command("verify", cls=_Command)
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


@db_app.command("add", cls=_Command)
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


@db_app.command("remove", cls=_Command)
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
    from . import edits

    cfg = _config(config, set_)
    with _writing(cfg, "db remove"):
        s = edits.remove(cfg, list(doc or []), list(source or []))
    console.print(f"removed {s['removed_documents']:,} document(s), {s['removed_chunks']:,} chunks")


# ------------------------------------------------------------------------------------ pretrain, ppl


@app.command(cls=_Command)
def pretrain(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Train the Retro model on the database's training documents and their neighbours ([pretrain] keys).

    Checkpoints go to WORKSPACE/checkpoints/pretrain/step-NNNNNN/; rerun the same command to continue from
    the latest complete one. With `[launch] nproc_per_node` > 1 (or `nnodes` > 1) it starts itself through
    torchrun (DDP, or FSDP with `pretrain.fsdp`); running it under torchrun yourself works the same.

    **Examples**

    ```
    retro pretrain -c my-ws/retro.toml
    retro pretrain -c my-ws/retro.toml --set model.retro_layers=[] --set pretrain.run=gpt   # the GPT baseline
    retro pretrain -c my-ws/retro.toml --set launch.nproc_per_node=8
    ```"""
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


@app.command(cls=_Command)
def ppl(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="a step-NNNNNN folder (default: the "
                                                  "latest complete pretraining checkpoint of the workspace)"),
        no_retrieval: bool = typer.Option(False, "--no-retrieval", help="neighbours replaced by padding (CCA off)"),
        data: Optional[Path] = typer.Option(None, "--data", help="a .txt/.jsonl/.json file to evaluate instead of "
                                            "the validation documents (neighbours retrieved on the fly)"),
        as_json: bool = typer.Option(False, "--json", help="print the result as JSON on stdout")):
    """Perplexity and bits per byte on the validation documents (or --data), with or without retrieval.

    **Examples**

    ```
    retro ppl -c my-ws/retro.toml
    retro ppl -c my-ws/retro.toml --no-retrieval --json
    retro ppl -c my-ws/retro.toml --data wiki.test.txt --checkpoint my-ws/checkpoints/pretrain/step-000500
    ```"""
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


@app.command(cls=_Command)
def sft(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Instruction-tune a pretrained checkpoint on the weighted blend of `[[sft.blend]]` datasets ([sft] keys).

    Formats: squad (SQuAD JSON), qed / nq (JSONL), instructretro (JSON list with ctxs), chat (Human /
    Assistant text, or messages), self_instruct, qa. The loss covers the answer and its end-of-sequence
    token only; contexts are cut to fit the sequence, answers never. Starts from `sft.init_from`, else the
    latest pretraining checkpoint; checkpoints go to WORKSPACE/checkpoints/sft/ and a rerun resumes.
    `sft.neighbors`: "none" (encoder gated off, as InstructRetro), "context" or "database".

    **Examples**

    ```
    retro sft -c my-ws/retro.toml
    retro sft -c my-ws/retro.toml --set sft.neighbors=context --set sft.train_steps=200
    ```"""
    from . import sft as sft_mod

    _train("sft", sft_mod.run, config, set_)


# -------------------------------------------------------------------------------------------- generate


@app.command(cls=_Command)
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
    (`[launch]`) the questions are shared among the ranks. Score the output with `retro score`.

    **Examples**

    ```
    retro generate -c my-ws/retro.toml squad_dev.json --set generate.contexts=database
    retro generate -c my-ws/retro.toml --prompt "What does a with statement do?"
    retro generate -c my-ws/retro.toml - < prompts.txt
    ```"""
    from . import generate as gen
    from .config import SFT_FORMATS
    from .runtime import dist, relaunch_under_torchrun

    if fmt not in ("auto", *SFT_FORMATS):
        raise UserError(f"--format {fmt!r}: expected auto or one of {', '.join(SFT_FORMATS)}")
    if task is not None and prompt:
        raise UserError("give a task file (or '-' for prompts on stdin) or --prompt, not both")
    if limit < 0:
        raise UserError(f"--limit {limit}: expected 0 (all questions) or a positive number")
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
        for a in summary["answers"]:  # a terminal shows an empty answer; a pipe gets the exact text
            empty = not a["prediction"] and sys.stdout.isatty()
            sys.stdout.write(("(empty answer)" if empty else a["prediction"]) + "\n")
        return
    rate = summary["tokens"] / max(summary["seconds"], 1e-9)
    console.print(f"generate: {summary['questions']:,} questions ({summary['resumed']:,} from an earlier run), "
                  f"{summary['tokens']:,} tokens in {summary['seconds']:.1f} s ({rate:,.0f} tokens/s); contexts "
                  f"{summary['contexts']}, neighbours {summary['neighbors']}, {summary['too_long']:,} prompts too "
                  f"long; answers in {summary['out']}")


# ----------------------------------------------------------------------------------------------- score


@app.command(cls=_Command)
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
    rouge: bool = typer.Option(False, "--rouge", help="also ROUGE-1/2/L/Lsum F-measures (Google's rouge-score) "
                               "and the geometric mean of ROUGE-1, 2 and L"),
    rouge_stem: bool = typer.Option(False, "--rouge-stem", help="ROUGE on Porter-stemmed words (rouge-score's "
                                    "use_stemmer); implies --rouge"),
    as_json: bool = typer.Option(False, "--json", help="print the scores as JSON on stdout (one object; with "
                                 "several files, one per file keyed by path)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the scores here (default: "
                                       "PREDICTIONS.scores.json beside each file; only with one file)"),
):
    """Exact match and F1 with SQuAD's official normalisation (lowercase, no punctuation, no a/an/the),
    as percentages, one table row per prediction file; with SQuAD's prediction JSON and `--gold` a SQuAD
    file the numbers are those of SQuAD's v1.1 evaluation script.

    **Examples**

    ```
    retro score my-ws/generate/squad_dev.database.sft.step-000100.jsonl
    retro score predictions.json --gold squad_dev.json --json
    ```"""
    from rich.table import Table

    from . import score as score_mod
    from .workspace import write_json_atomic

    if out is not None and len(predictions) > 1:
        raise UserError("--out takes one prediction file; with several, each gets PREDICTIONS.scores.json")
    golds = score_mod.load_gold(gold, gold_format) if gold is not None else None
    rouge = rouge or rouge_stem
    results = {}
    for path in predictions:
        result = score_mod.score(score_mod.read_predictions(path), golds, first_gold=first_gold, rouge=rouge,
                                 regex=regex, rouge_stem=rouge_stem)
        result.update(predictions=str(path), gold=str(gold) if gold else None,
                      variant="first gold answer" if first_gold else "max over gold answers")
        target = out or path.with_name(path.name + ".scores.json")
        write_json_atomic(target, result)
        results[str(path)] = result
    if as_json:
        print(json.dumps(next(iter(results.values())) if len(results) == 1 else results))
        return
    table = Table(title="retro score" + (f" (gold: {gold.name})" if gold else ""))
    rouge_cols = ("ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum", "ROUGE gm") if rouge else ()
    for col in ("task", "questions", "EM", "F1", "missing", "unknown", "no answer", "regex") + rouge_cols:
        table.add_column(col, justify="left" if col == "task" else "right", overflow="fold")
    for path, result in results.items():
        row = [Path(path).name, f"{result['count']:,}", f"{result['exact_match']:.2f}", f"{result['f1']:.2f}",
               f"{result['missing']:,}", f"{result['unknown']:,}", f"{result['unanswerable']:,}",
               f"{result['regex']:,}"]
        if rouge:
            row += [f"{result[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum", "rouge_gm")]
        table.add_row(*row)
    console.print(table)
    console.print("written to " + ", ".join(str(out or Path(p).with_name(Path(p).name + ".scores.json"))
                                            for p in results))


# ------------------------------------------------------------------------------------------- reproduce


@app.command(cls=_Command)
def reproduce(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Run a recipe end to end: db build, pretrain (and the GPT baseline), ppl, sft, generate, score; then
    WORKSPACE/report.md with every figure and the command that produced it (and loss.png with matplotlib).

    Each stage is skipped when its outputs are complete, so rerunning after a failure continues. What runs
    is set in [reproduce] (baseline, sft, qa_task, qa_limit, contexts, ppl_data).

    **Examples**

    ```
    retro reproduce -c recipes/tiny.toml
    DATA_DIR=/data retro reproduce -c recipes/copy-cpu.toml
    ```"""
    from . import reproduce as reproduce_mod

    path = config or Path("retro.toml")
    cfg = _config(config, set_)  # report a bad TOML before anything runs
    with _writing(cfg, "reproduce"):  # its stages run under this lock
        reproduce_mod.run(path, list(set_ or []))


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. A usage mistake or a `UserError` prints one message and exits 2; SIGINT / SIGTERM exit
    130 / 143 saying what was kept; anything else is a bug and keeps its traceback (exit 1)."""
    global _ARGV
    from .runtime import Interrupted, install_interrupt_handlers, kept_note

    _ARGV = list(sys.argv[1:] if argv is None else argv)
    tune_allocator()  # CPU steps re-faulted their largest tensors every time (retrocli/allocator.py)
    install_interrupt_handlers()
    try:
        code = app(args=argv, prog_name="retro", standalone_mode=False)
    except UserError as e:
        return _error(str(e))
    except Interrupted as e:
        console.print(f"interrupted ({e.name}): {kept_note()}; rerun the same command to continue",
                      highlight=False, soft_wrap=True)
        return 128 + e.signum
    except OSError as e:
        from .workspace import WRITE_ERRNOS, write_failed

        if e.errno not in WRITE_ERRNOS:
            raise
        return _error(str(write_failed(Path(e.filename) if e.filename else Path("(a file)"), e)))
    except click.exceptions.NoArgsIsHelpError as e:  # bare `retro` / `retro db`: the help, as a usage mistake
        console.file.write(e.ctx.get_help() + "\n")
        return 2
    except click.exceptions.ClickException as e:  # usage mistakes: unknown verb or option, bad value, missing one
        ctx = getattr(e, "ctx", None)
        hint = f"\n(see `{ctx.command_path} --help`)" if ctx is not None else ""
        return _error(e.format_message() + hint)
    except typer.Abort:  # end of input at a prompt
        return 130
    except SystemExit as e:  # typer's own exits (a closed stdout: exit 1)
        return e.code if isinstance(e.code, int) else 1
    return code if isinstance(code, int) else 0


def _error(message: str) -> int:
    console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    return 2
