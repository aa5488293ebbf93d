"""`retro ppl`: perplexity and bits per byte, with or without retrieval."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..runtime import console
from . import ConfigOpt, SetOpt, load_workspace


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
    from ..eval import ppl as ppl_mod
    from ..runtime import dist

    result = ppl_mod.run(load_workspace(config, set_), checkpoint, retrieval=not no_retrieval, data=data)
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
