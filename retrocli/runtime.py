"""Process-level plumbing shared by every stage: the distributed context (one process or torchrun), the
device and autocast of a rank, console output and progress bars (rank 0 alone draws them).

torch is imported inside the functions that need it, so that commands which never touch a model (`retro
config`, `retro score`) start without it."""

from __future__ import annotations

import functools
import os
import sys
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

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

if TYPE_CHECKING:
    import numpy as np
    import torch

console = Console(stderr=True)
T = TypeVar("T")


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


def all_sum(values: Sequence[float], device: "torch.device") -> list[float]:
    """Sum numbers over ranks (float64)."""
    import torch

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist().world > 1:
        import torch.distributed as td

        td.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------- device / autocast


def device_for_rank() -> "torch.device":
    """This rank's GPU (LOCAL_RANK) where there are GPUs, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", dist().local_rank)
    return torch.device("cpu")


def to_device(batch: "dict[str, np.ndarray]", device: "torch.device") -> "dict[str, torch.Tensor]":
    import numpy as np
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}


def autocast(device: "torch.device", precision: str):
    """The autocast context of `precision` ('fp32': none; 'bf16': bfloat16, with a warning once where a CPU
    would emulate it)."""
    import torch

    if precision == "bf16":
        if device.type == "cpu":
            _warn_slow_cpu_bf16()
        return torch.autocast(device.type, dtype=torch.bfloat16)
    from contextlib import nullcontext

    return nullcontext()


def cpu_flags() -> set[str] | None:
    """The words of /proc/cpuinfo (its flags among them), or None where there is none (not Linux)."""
    try:
        return set(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split())
    except OSError:
        return None


def cpu_has_fast_bf16() -> bool | None:
    """Whether this CPU computes bf16 natively (x86 AVX-512 BF16 / AMX, Arm bf16); else torch emulates it, slower
    than fp32. None where it cannot be told (no /proc/cpuinfo): false as a condition, so callers that want
    bf16 only where it is known to be fast read it as no."""
    flags = cpu_flags()
    if flags is None:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def _warn_slow_cpu_bf16() -> None:
    """Once per process: bf16 on a CPU without bf16 instructions is emulated, far slower than fp32 (a
    training step of recipes/gpu-small.toml's model took over 10x as long on AMD EPYC Zen 3 cores)."""
    if cpu_has_fast_bf16() is False:
        warn("precision 'bf16' on a CPU without bf16 instructions is emulated and much slower than fp32: "
             "set precision = \"fp32\" for CPU runs")


def relaunch_under_torchrun(launch, argv: list[str]) -> None:
    """When `[launch]` asks for several processes and this is not one of them yet, run torchrun with the same
    `retro` command line as a child (each rank then finds RANK set and goes on as one rank), wait for it, and
    exit with its exit code: this process never runs the stage itself.

    This process stays the one a scheduler knows: a SIGINT or SIGTERM sent to it alone is passed on to torchrun,
    which passes it to the ranks (they finish or save as a one-process run does and say what they kept), and it
    exits 130 / 143 as they do. It keeps the workspace's writer lock until the job is over.

    One machine: `--standalone` (a free local port). Several: a c10d rendezvous at `launch.rdzv_endpoint`
    (elastic: torchrun numbers the nodes), or else the static rendezvous of master_addr:port with each
    node's own `launch.node_rank`; the same command runs on every node. On a CPU each rank gets an equal
    share of the cores (OMP_NUM_THREADS) unless it is set already."""
    if "RANK" in os.environ or (launch.nproc_per_node == 1 and launch.nnodes == 1):
        return
    cmd = [sys.executable, "-m", "retrocli.torchrun", *torchrun_args(launch), "-m", "retrocli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.nproc_per_node)))
    env["RETRO_DIST_BACKEND"] = launch.backend
    console.print(f"launching {launch.nproc_per_node} process(es) on each of {launch.nnodes} node(s): "
                  f"{' '.join(cmd[1:])}", highlight=False, soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    code, _, signum = run_child(cmd, env=env)
    # The ranks said what they kept; torchrun reports a signalled job as a failure (1): say it as they exited.
    raise SystemExit(128 + signum if signum else code)


def run_child(cmd: list[str], env: dict | None = None, capture: bool = False) -> tuple[int, str | None, int]:
    """Run `cmd` and wait for it, passing on the SIGINT / SIGTERM this process gets (so that a scheduler that
    signals only this process still lets the child save what it can, instead of it being killed when this one
    exits): (exit code, its stdout when `capture`, the first signal received or 0)."""
    import signal
    import subprocess

    received: list[int] = []
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if capture else None, text=True)

    def forward(signum, frame):
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    before = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        out, _ = child.communicate()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    return child.returncode, out, received[0] if received else 0


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

_FAULT_HITS: dict[tuple[str, str], int] = {}


def fault_point(name: str) -> None:
    """Die abruptly here when RETRO_FAULT names this point: `RETRO_FAULT=embed:block` dies at the first
    hit, `RETRO_FAULT=embed:block:3` at the third; with RETRO_FAULT_RANK=1 only that torchrun rank dies.
    Or stop here once and wait for a signal when RETRO_PAUSE names the point (same form): the process says
    `RETRO_PAUSE: waiting at POINT` on stderr, so a test can send SIGINT / SIGTERM at a known moment.
    Used by tests to prove that a killed or interrupted stage resumes (docs/reliability.md lists the points)."""
    if _hits("RETRO_FAULT", name) >= _nth("RETRO_FAULT"):
        sys.stderr.write(f"RETRO_FAULT: dying at {name} (hit {_FAULT_HITS['RETRO_FAULT', name]})\n")
        sys.stderr.flush()
        os._exit(137)
    if _hits("RETRO_PAUSE", name) == _nth("RETRO_PAUSE"):
        import time

        sys.stderr.write(f"RETRO_PAUSE: waiting at {name}\n")
        sys.stderr.flush()
        while _DEFERRED is None:  # until a signal: its handler raises here, or (SIGTERM in training) records it
            time.sleep(0.02)


def _nth(variable: str) -> int:
    spec = os.environ.get(variable, "")
    return int(spec.rpartition(":")[2]) if spec.count(":") >= 2 else 1


def _hits(variable: str, name: str) -> int:
    """How often this process has reached `name`, when `variable` (POINT or POINT:N) names it for this rank;
    else 0."""
    spec = os.environ.get(variable)
    if not spec:
        return 0
    if os.environ.get("RETRO_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return 0
    if (spec.rpartition(":")[0] if spec.count(":") >= 2 else spec) != name:
        return 0
    _FAULT_HITS[variable, name] = _FAULT_HITS.get((variable, name), 0) + 1
    return _FAULT_HITS[variable, name]


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
    `finally`/`with` blocks then run as for Ctrl-C. A signal within `DUPLICATE_S` of the first is the same one
    arriving twice (sent to the process group, and passed on by the parent `retro` or torchrun) and is ignored;
    a later one ends the process at once, for a user who presses Ctrl-C again (every write that matters is
    atomic, so that loses only the unfinished block). Inside `sigterm_at_step_end()` a SIGTERM is only
    recorded."""
    import signal
    import time

    first: list[float] = []

    def handler(signum, frame):
        global _DEFERRED
        if signum == signal.SIGTERM and _DEFERRING:
            _DEFERRED = signum
            return
        if first:
            if time.monotonic() - first[0] < DUPLICATE_S:
                return
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        first.append(time.monotonic())
        raise Interrupted(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


DUPLICATE_S = 2.0  # a second signal sooner than this after the first is the first one delivered twice


_DEFERRING = False  # inside sigterm_at_step_end()
_DEFERRED: int | None = None  # the signal recorded there, not yet acted on


@contextmanager
def sigterm_at_step_end() -> Iterator[Callable[[], bool]]:
    """Training: a SIGTERM (a scheduler preempting the job, which leaves a grace period before SIGKILL) is only
    recorded, and the function yielded says whether one was. The loop finishes the step under way, writes a
    checkpoint and raises `Interrupted` itself, so the rerun loses no step. SIGINT (Ctrl-C) interrupts at once
    as everywhere else. A further SIGTERM is recorded too, not acted on at once: under torchrun a rank often
    gets the scheduler's SIGTERM twice (sent to the process group, then forwarded by torchrun), and a
    scheduler that will not wait sends SIGKILL. Leaving the block with a SIGTERM recorded and not acted on
    (the run had just finished) raises `Interrupted` then, so nothing after it starts."""
    global _DEFERRING, _DEFERRED
    _DEFERRING, _DEFERRED = True, None
    try:
        yield lambda: _DEFERRED is not None
    finally:
        _DEFERRING = False
        pending, _DEFERRED = _DEFERRED, None
    if pending is not None:
        raise Interrupted(pending)


class Cancelled(Exception):
    """Raised inside background work that its `Prefetcher` has left."""


class Prefetcher:
    """One background thread that prepares the next piece of work while the caller uses the current one (the
    next block's tokens, the next step's batches): `submit(fn, *args)` gives a Future.

    Leaving the `with` on an error or an interruption does not wait for the work in flight: it stops at its
    next `check()` (the work calls it between slices of a few hundred milliseconds at most), so an interrupted
    stage reports at once and the process ends soon after. The thread is not a daemon: the interpreter
    would stop a daemon thread at exit wherever it is, and one inside a C++ tokenizer then aborts the process
    (SIGABRT, seen in about a third of such exits)."""

    def __init__(self, name: str):
        from concurrent.futures import ThreadPoolExecutor

        self._left = threading.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)

    def submit(self, fn: Callable[..., T], *args: Any) -> "Future[T]":
        return self._pool.submit(fn, *args)

    def check(self) -> None:
        """Called by the background work between its slices: it stops once the caller has left."""
        if self._left.is_set():
            raise Cancelled()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, kind, *rest) -> None:
        self._left.set()
        self._pool.shutdown(wait=kind is None, cancel_futures=True)
