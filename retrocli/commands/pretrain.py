"""`retro pretrain`: train the Retro model (or its GPT baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from . import ConfigOpt, SetOpt, run_training


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
    from ..train import pretrain as pretrain_mod

    run_training("pretrain", pretrain_mod.run, config, set_)
