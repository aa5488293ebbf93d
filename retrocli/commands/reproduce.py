"""`retro reproduce`: a recipe end to end, with its report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from . import ConfigOpt, SetOpt, load_workspace, writing


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
    from .. import reproduce as reproduce_mod

    path = config or Path("retro.toml")
    cfg = load_workspace(config, set_)  # report a bad TOML before anything runs
    with writing(cfg, "reproduce"):  # its stages run under this lock
        reproduce_mod.run(path, list(set_ or []))
