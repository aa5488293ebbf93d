"""`retro generate`: answers with live retrieval."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError
from ..runtime import console
from . import ConfigOpt, SetOpt, argv, load_workspace


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

    Prompts are built as in SFT (the tokenizer's chat template too), with `generate.contexts` = file |
    database (the question as the query) | none (closed book). Decoding keeps a KV cache; whenever the text
    crosses a chunk boundary the new chunk's neighbours are retrieved for the CCA (`generate.neighbors`).
    An answer ends at any end token of the model (a Hugging Face folder's generation_config.json and
    config.json may list several). Greedy by default; temperature, top_k, top_p, stop strings and
    max_new_tokens in [generate]. A rerun after a kill continues; under torchrun
    (`[launch]`) the questions are shared among the ranks. Score the output with `retro score`.

    **Examples**

    ```
    retro generate -c my-ws/retro.toml squad_dev.json --set generate.contexts=database
    retro generate -c my-ws/retro.toml --prompt "What does a with statement do?"
    retro generate -c my-ws/retro.toml - < prompts.txt
    ```"""
    from ..config import SFT_FORMATS
    from ..eval import generate as gen
    from ..runtime import dist, relaunch_under_torchrun

    if fmt not in ("auto", *SFT_FORMATS):
        raise UserError(f"--format {fmt!r}: expected auto or one of {', '.join(SFT_FORMATS)}")
    if task is not None and prompt:
        raise UserError("give a task file (or '-' for prompts on stdin) or --prompt, not both")
    if limit < 0:
        raise UserError(f"--limit {limit}: expected 0 (all questions) or a positive number")
    cfg = load_workspace(config, set_)
    prompts = list(prompt) if prompt else None
    if task == "-":
        prompts = [line.strip() for line in sys.stdin if line.strip()]
        if not prompts:
            raise UserError("no prompts on stdin")
    elif task is None and prompts is None:
        raise UserError("give a task file, '-' for prompts on stdin, or --prompt TEXT")
    if prompts is None:
        relaunch_under_torchrun(cfg.launch, argv())
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
