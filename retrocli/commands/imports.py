"""`retro import megatron`: NVIDIA's released Retro / InstructRetro checkpoints as a retro workspace."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..runtime import console


def import_megatron(src: Path = typer.Argument(..., help="the downloaded folder: latest_checkpointed_iteration.txt, "
                                               "release/mp_rank_XX/model_optim_rng.pt, the tokenizer's .model"),
                    out: Path = typer.Option(..., "--out", help="the workspace folder to write (new)"),
                    chunk_length: int = typer.Option(64, "--chunk-length", help="the chunk length the model was "
                                                     "trained with (not in the checkpoint; 64 for NVIDIA's)"),
                    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="the SentencePiece model, when "
                                                             "SRC does not hold exactly one *.model"),
                    recipe: str = typer.Option("nvidia-retro-8b", "--recipe", help="the recipe the workspace TOML "
                                               "starts from")):
    """Import a legacy Megatron-LM Retro checkpoint (nvidia/retro-8b-base-4k, retro-8b-instruct-4k, the 48B ones):
    the tensor-parallel shards merged into one retro checkpoint, OUT/retro.toml with [model] from its args, and its
    tokenizer. Nothing in the files runs: they are read weights-only, Megatron's args included.

    **Examples**

    ```
    retro import megatron retro-8b-instruct-4k --out nv8b
    retro db build -c nv8b/retro.toml && retro generate -c nv8b/retro.toml questions.jsonl
    ```"""
    from ..train.megatron import import_checkpoint

    result = import_checkpoint(src, out, chunk_length, tokenizer, recipe)
    console.print(f"imported {src} ({result['parameters']:,} parameters in {result['dtype']}, {result['layers']} "
                  f"layers, hidden {result['hidden']}, CCA in {result['retro_layers']}, gate {result['gate']}): "
                  f"{result['checkpoint']}; next: retro db build -c {result['workspace']}", highlight=False,
                  soft_wrap=True)
