"""`retro export`: a trained Retro's decoder as a Hugging Face model folder (and its encoder and CCA beside it)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..runtime import console
from . import ConfigOpt, SetOpt, load_workspace


def export(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
           out: Path = typer.Option(..., "--out", help="the folder to write (new, or empty)"),
           checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="a step-NNNNNN or run folder "
                                                     "(default: the latest SFT checkpoint, else the latest "
                                                     "pretraining one)"),
           dtype: str = typer.Option("fp32", "--dtype", help="weights as 'fp32', 'bf16' or 'fp16'")):
    """Write the decoder as a Hugging Face folder (config.json, model.safetensors, the tokenizer, a README card)
    that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads; the encoder and CCA go beside it as
    retro.safetensors + retro_config.json, so `pretrain.init_from = DIR` brings the whole Retro back.

    **Examples**

    ```
    retro export -c my-retro/retro.toml --out my-retro/hf
    retro export -c my-retro/retro.toml --checkpoint my-retro/checkpoints/pretrain --out base-hf --dtype bf16
    ```"""
    from ..train import export as export_mod

    result = export_mod.run(load_workspace(config, set_), checkpoint, out, dtype)
    console.print(f"wrote {result['out']} ({result['family']}, {result['dtype']}; from {result['checkpoint']}): "
                  f"{', '.join(result['files'])}", highlight=False, soft_wrap=True)
