"""The verbs: each module parses its options, loads the workspace configuration, calls the library and prints.
A verb imports only the library, never another verb; `retrocli/cli.py` registers them. What they share lives
here: the `-c` / `--set` options, loading the configuration, the writer lock, and running a training phase."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from ..config import Config, load_config
from ..runtime import console, dist, relaunch_under_torchrun

ConfigOpt = typer.Option(None, "-c", "--config", metavar="TOML", help="workspace TOML (default: ./retro.toml)")
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE", help="override a TOML value: --set db.nprobe=32 "
                      "(repeatable; the value is read as TOML, a bare word as a string)")

_ARGV: list[str] = []  # the command line `retro` was given, for relaunching it under torchrun


def set_argv(args: list[str]) -> None:
    _ARGV[:] = args


def argv() -> list[str]:
    return list(_ARGV)


def load_workspace(config: Optional[Path], sets: Optional[List[str]]) -> Config:
    cfg = load_config(config, sets or [])
    os.environ.setdefault("RETRO_DIST_BACKEND", cfg.launch.backend)  # for a torchrun started by hand too
    return cfg


def writing(cfg: Config, command: str):
    """The workspace's writer lock, held for `command` (one writer at a time; readers never wait)."""
    from ..workspace import writer_lock  # (numpy: imported by the verbs that write, not at start-up)

    return writer_lock(cfg.resolve(cfg.workspace.dir), command)


def run_training(phase: str, run: Callable[[Config], dict[str, Any]], config: Optional[Path],
                 set_: Optional[List[str]]) -> None:
    """Load the config, relaunch under torchrun when [launch] asks, run the phase, print its summary."""
    cfg = load_workspace(config, set_)
    with writing(cfg, phase):
        relaunch_under_torchrun(cfg.launch, argv())
        summary = run(cfg)
    if dist().main:
        eval_part = f", eval loss {summary['eval_loss']:.4f}" if summary.get("eval_loss") is not None else ""
        loss_part = f", loss {summary['loss']:.4f}" if summary.get("loss") is not None else ""
        console.print(f"{phase}: step {summary['step']}{loss_part}{eval_part}; checkpoints in {summary['run_dir']}")
