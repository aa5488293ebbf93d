"""`retro init`: a new workspace from a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..errors import UserError
from ..runtime import console


def init(directory: Optional[Path] = typer.Argument(None, help="folder for the new workspace (made if needed)"),
         recipe: Optional[str] = typer.Option(None, "--recipe", help="recipe to start from: a name from --list, or a "
                                              "TOML file (default: tiny; retrofit-hf with --from-hf)"),
         from_hf: Optional[Path] = typer.Option(None, "--from-hf", help="a local Hugging Face model folder (Llama, "
                                                "Qwen2/3, Mistral, GPT-2) to retrofit: its tokenizer and decoder "
                                                "fill the workspace, the decoder frozen"),
         list_: bool = typer.Option(False, "--list", help="name the recipes with their descriptions, then exit")):
    """Write DIR/retro.toml, a commented workspace TOML (every key documented) for you to edit; every artefact
    of the workspace (database, checkpoints, answers) then goes into DIR.

    **Examples**

    ```
    retro init my-ws                       # the tiny recipe: the whole chain on a CPU in minutes
    retro init --list
    retro init big-ws --recipe copy-cpu
    retro init my-retro --from-hf ~/models/SmolLM2-135M   # retrofit a pretrained model into a Retro
    ```"""
    from ..recipes import from_hf as from_hf_model
    from ..recipes import list_recipes, write_workspace

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
    fill = None if from_hf is None else (lambda cfg: from_hf_model(cfg, from_hf))
    path = write_workspace(directory, recipe or ("retrofit-hf" if from_hf else "tiny"), fill)
    console.print(f"wrote {path}; next: retro db build -c {path}", highlight=False, soft_wrap=True)
