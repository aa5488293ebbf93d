"""`retro score`: exact match, F1 and ROUGE of an answers file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError
from ..runtime import console


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
    """Exact match and F1 of prediction files (and ROUGE with --rouge), one table row per file.

    Exact match and F1 use SQuAD's official normalisation (lowercase, no punctuation, no a/an/the),
    as percentages, one table row per prediction file; with SQuAD's prediction JSON and `--gold` a SQuAD
    file the numbers are those of SQuAD's v1.1 evaluation script.

    **Examples**

    ```
    retro score my-ws/generate/squad_dev.database.sft.step-000100.jsonl
    retro score predictions.json --gold squad_dev.json --json
    ```"""
    from rich.table import Table

    from ..eval import score as score_mod
    from ..workspace import write_json_atomic

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
