"""What the training loop reports: `metrics.jsonl` (and TensorBoard events) in the run folder, and the progress
bar on the terminal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..errors import UserError
from ..runtime import console, dist, show_progress
from ..workspace import write_text_atomic

TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_INSTALL = "pip install 'retrocli[tensorboard]'"


def require_tensorboard(phase: str) -> None:
    """{phase}.tensorboard = true needs the optional package: refused before anything trains."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imports the tensorboard package)
    except ImportError:
        raise UserError(f"{phase}.tensorboard = true needs the tensorboard package, which is not installed: "
                        f"`{TENSORBOARD_INSTALL}`, or set {phase}.tensorboard = false") from None


class Metrics:
    """Where the loop's numbers go: `metrics.jsonl` in the run folder, one JSON record a line, and with
    `tensorboard` the same numbers as TensorBoard scalars in RUN/tensorboard/ (tags train/loss, train/lr,
    ..., eval/loss, eval/ppl, eval/loss_by_set/NAME). Rank 0 writes; on the other ranks it does nothing.

    A fresh run starts both afresh. A resumed one drops what the interrupted run wrote after the resumed step:
    the lines of metrics.jsonl, and (purge_step) the TensorBoard events, so each holds one clean curve."""

    def __init__(self, run_dir: Path, tensorboard: bool, resumed_step: int | None):
        self.main = dist().main
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if not self.main:
            return
        events = run_dir / TENSORBOARD_DIR
        if resumed_step is None:
            self.path.unlink(missing_ok=True)
            shutil.rmtree(events, ignore_errors=True)
        else:
            _rewrite_metrics(self.path, resumed_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(events), purge_step=None if resumed_step is None else resumed_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                if isinstance(value, dict):
                    for name, v in value.items():
                        self.writer.add_scalar(f"{tag}/{name}", v, step)
                elif key != "step":
                    self.writer.add_scalar(tag, value, step)
            self.writer.flush()  # a killed run keeps its events up to its last step, as metrics.jsonl does

    def __enter__(self) -> "Metrics":
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()


def _rewrite_metrics(path: Path, upto_step: int) -> None:
    """Drop metric lines after the resumed step, so the file holds one clean curve."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= upto_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    write_text_atomic(path, "".join(x + "\n" for x in keep))


class ProgressBar:
    """A rich progress bar with loss, lr and tokens/s (drawn as `runtime.progress` bars are)."""

    def __init__(self, phase: str, total: int, done: int):
        show = show_progress()
        self.p = Progress(TextColumn(f"[bold]{phase}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("loss {task.fields[loss]} lr {task.fields[lr]} {task.fields[rate]} tok/s"
                                     " {task.fields[eval]}"),
                          TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                          disable=not show)
        self.task = self.p.add_task(phase, total=total, completed=done, loss="-", lr="-", rate="-", eval="")

    def __enter__(self):
        self.p.__enter__()
        return self

    def __exit__(self, *exc):
        self.p.__exit__(*exc)

    def update(self, **fields) -> None:
        self.p.update(self.task, advance=1 if "loss" in fields else 0, **fields)
