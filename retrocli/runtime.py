"""Process-level plumbing shared by every stage: the distributed context (one process or torchrun),
console output and progress bars (rank 0 alone draws them)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def shard(self, items: list) -> list:
        """This rank's share of `items` (round-robin, so work stays balanced when items differ in size)."""
        return items[self.rank :: self.world]


_DIST: Dist | None = None


def dist() -> Dist:
    """The distributed context: under torchrun (RANK in the environment) a process group is started once."""
    global _DIST
    if _DIST is None:
        if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            import torch.distributed as td

            backend = os.environ.get("RETRO_DIST_BACKEND", "auto")  # [launch] backend, passed by the relaunch
            if backend == "auto":
                backend = "nccl" if torch.cuda.is_available() else "gloo"
            if not td.is_initialized():
                td.init_process_group(backend)
            _DIST = Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        else:
            _DIST = Dist()
    return _DIST


def relaunch_under_torchrun(launch, argv: list[str]) -> None:
    """When `[launch]` asks for several processes and this is not one of them yet, replace this process by
    torchrun running the same `retro` command line (which then finds RANK set and goes on as one rank).

    One machine: `--standalone` (a free local port). Several: a c10d rendezvous at `launch.rdzv_endpoint`
    (elastic: torchrun numbers the nodes), or else the static rendezvous of master_addr:port with each
    node's own `launch.node_rank`; the same command runs on every node. On a CPU each rank gets an equal
    share of the cores (OMP_NUM_THREADS) unless it is set already."""
    if "RANK" in os.environ or (launch.nproc_per_node == 1 and launch.nnodes == 1):
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(launch), "-m", "retrocli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.nproc_per_node)))
    env["RETRO_DIST_BACKEND"] = launch.backend
    console.print(f"launching {launch.nproc_per_node} process(es) on each of {launch.nnodes} node(s): "
                  f"{' '.join(cmd[1:])}", highlight=False, soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)


def torchrun_args(launch) -> list[str]:
    """torchrun's options for `[launch]` (before the module it runs)."""
    args = [f"--nproc_per_node={launch.nproc_per_node}"]
    if launch.nnodes == 1 and not launch.rdzv_endpoint:
        return args + ["--standalone"]
    if launch.rdzv_endpoint:
        return args + [f"--nnodes={launch.nnodes}", "--rdzv_backend=c10d",
                       f"--rdzv_endpoint={launch.rdzv_endpoint}", f"--rdzv_id={launch.rdzv_id}"]
    return args + [f"--nnodes={launch.nnodes}", f"--node_rank={launch.node_rank}",
                   f"--master_addr={launch.master_addr}", f"--master_port={launch.master_port}"]


def log(message: str) -> None:
    if dist().main:
        console.print(message)


def warn(message: str) -> None:
    if dist().main:
        console.print(f"[yellow]warning:[/yellow] {escape(message)}")


def show_progress() -> bool:
    """Progress bars are drawn by rank 0 unless RETRO_PROGRESS=0."""
    return dist().main and os.environ.get("RETRO_PROGRESS") != "0"


@contextmanager
def progress(description: str, total: int | None, unit: str = "items") -> Iterator["Bar"]:
    """A progress bar with rate and ETA, drawn by rank 0 (RETRO_PROGRESS=0 hides it). Where stderr is not
    a terminal (a log file), rich prints the finished bar once, as a summary line."""
    show = show_progress()
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not show, transient=False) as p:
        task = p.add_task(description, total=total, rate="")
        yield Bar(p, task, unit)


class Bar:
    def __init__(self, p: Progress, task: int, unit: str):
        self.p, self.task, self.unit = p, task, unit

    def advance(self, n: int = 1) -> None:
        self.p.advance(self.task, n)
        t = self.p.tasks[self.task]
        if t.speed:
            self.p.update(self.task, rate=f"{t.speed:,.0f} {self.unit}/s")

    def set_rate(self, text: str) -> None:
        """Show this instead of the items-per-second rate (e.g. several rates at once)."""
        self.p.update(self.task, rate=text)


# --------------------------------------------------------------------------------------- fault injection

_FAULT_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Die abruptly here when RETRO_FAULT names this point: `RETRO_FAULT=embed:block` dies at the first
    hit, `RETRO_FAULT=embed:block:3` at the third; with RETRO_FAULT_RANK=1 only that torchrun rank dies.
    Used by tests to prove that a killed stage resumes (docs/reliability.md lists the points)."""
    spec = os.environ.get("RETRO_FAULT")
    if not spec:
        return
    if os.environ.get("RETRO_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    point, _, nth = spec.rpartition(":") if spec.count(":") >= 2 else (spec, "", "1")
    if point != name:
        return
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] >= int(nth):
        sys.stderr.write(f"RETRO_FAULT: dying at {name} (hit {_FAULT_HITS[name]})\n")
        sys.stderr.flush()
        os._exit(137)


# ------------------------------------------------------------------------------------------ interruption


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) arrived. A BaseException, like KeyboardInterrupt, so
    no `except Exception` in a stage swallows it; not a KeyboardInterrupt, so typer does not turn it into a bare
    exit code. `retro` exits 128 + signum (130, 143) with one line from `kept_note()`."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        import signal

        return signal.Signals(self.signum).name


_KEPT = "finished blocks and checkpoints are kept"


def set_kept_note(note: str) -> None:
    """What an interruption now keeps (said in the one line `retro` prints when interrupted)."""
    global _KEPT
    _KEPT = note


def kept_note() -> str:
    return _KEPT


def install_interrupt_handlers() -> None:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread (where Python runs signal handlers). The stage's
    `finally`/`with` blocks then run as for Ctrl-C; a second signal while they run ends the process at once
    (every write that matters is atomic, so that loses only the unfinished block)."""
    import signal

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Interrupted(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
