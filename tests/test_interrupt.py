"""SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) sent to a running `retro`: exit 130 / 143 with one line
saying what was kept, no traceback, no lock left behind, and the same command run again ends with what an
uninterrupted run makes. The signal is sent from outside, at a known point: RETRO_PAUSE makes the process stop
at a fault point and say so on stderr, and the test sends the signal when it reads that line.

In training a SIGTERM lets the step under way finish and writes a checkpoint at it; a SIGINT stops at once.
Background work (the embed stage's tokenizing, the training loop's batch assembly) stops with the stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retrocli.config import load_config
from retrocli.db import build as db
from retrocli.db import database
from retrocli.train import checkpoint
from retrocli.train.pretrain import run
from retrocli.workspace import LOCK_FILE

from .conftest import small_sections, synthetic_documents, write_jsonl, write_toml
from .test_edits import ZEBRA, hits
from .test_pretrain import make_workspace, metrics
from .test_reliability import artefacts
from .test_sft import sft_workspace

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("one_torch_thread")]

RETRO = Path(sys.executable).with_name("retro")  # the installed executable, as a user or a scheduler runs it
QUIET = {"RETRO_PROGRESS": "0", "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}  # COLUMNS: rich keeps lines whole
GUARD_S = 300  # a process still running after this is killed (a hang guard, not a timing assertion)


def retro(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(RETRO), *args], capture_output=True, text=True,
                          env={**os.environ, **QUIET, **(env or {})}, timeout=GUARD_S)
    assert proc.returncode == 0, f"retro {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def interrupt(*args: str, at: str, sig: signal.Signals, group: bool = False, env: dict | None = None
              ) -> tuple[int, str]:
    """`retro ARGS` stopped at the fault point `at` (POINT:N) and sent `sig` there: (exit code, stderr).
    `group`: the signal goes to the whole process group, as a batch scheduler sends it (torchrun and its ranks)."""
    proc = subprocess.Popen([str(RETRO), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **QUIET, "RETRO_PAUSE": at, **(env or {})}, start_new_session=group)
    guard = threading.Timer(GUARD_S, proc.kill)
    guard.start()
    try:
        said = []
        for line in proc.stderr:
            said.append(line)
            if line.startswith("RETRO_PAUSE: waiting at"):
                os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
                break
        said.append(proc.stderr.read())
        code = proc.wait()
    finally:
        guard.cancel()
    stderr = "".join(said)
    assert "RETRO_PAUSE: waiting at" in stderr, f"never reached {at}:\n{stderr[-3000:]}"
    return code, stderr


def interrupted_line(stderr: str) -> str:
    """The one line that says what was interrupted and kept (and that no traceback came with it)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if x.startswith("interrupted (")]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].endswith("; rerun the same command to continue")
    return lines[0]


# --------------------------------------------------------------------------------------------- db build


def test_a_build_interrupted_in_embed_and_in_neighbours_resumes_to_the_uninterrupted_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "corpus" / "docs.jsonl", synthetic_documents(24, 120))
    reference = write_toml(tmp_path / "retro.toml", small_sections())
    db.build(load_config(reference))
    toml = write_toml(tmp_path / "interrupted.toml", small_sections(workspace={"dir": "ws-interrupted"}))
    ws = database.workspace_of(load_config(toml))
    blocks = len(list((database.workspace_of(load_config(reference)).db / "embed").glob("block-*.npy")))

    code, stderr = interrupt("db", "build", "-c", str(toml), at="embed:block:3", sig=signal.SIGINT)
    assert code == 130
    assert interrupted_line(stderr) == (f"interrupted (SIGINT): db build: tokenizer, chunks finished and kept; "
                                        f"embed: 3 of {blocks} blocks are kept; rerun the same command to continue")
    assert len(list((ws.db / "embed").glob("block-*.npy"))) == 3 and not ws.read_meta("embed")["complete"]
    assert not (ws.root / LOCK_FILE).exists()  # released: the rerun finds no stale lock

    code, stderr = interrupt("db", "build", "-c", str(toml), at="neighbours:block:2", sig=signal.SIGTERM)
    assert code == 143
    assert interrupted_line(stderr) == (f"interrupted (SIGTERM): db build: tokenizer, chunks, embed, index finished "
                                        f"and kept; neighbours: 2 of {blocks} blocks are kept; rerun the same "
                                        f"command to continue")
    embed = ws.read_meta("embed")["counts"]
    assert embed["embedded_now"] == embed["chunks"] - 3 * 50  # the three blocks kept were not embedded again

    done = retro("db", "build", "-c", str(toml))
    assert "stale lock" not in done.stderr
    assert ws.read_meta("neighbours")["complete"]
    assert artefacts(ws.root) == artefacts(database.workspace_of(load_config(reference)).root)


ENDLESS_PREPARATION = """
import os, signal, sys, threading
import numpy as np
from retrocli.db.embed import embed_blocks
from retrocli.runtime import Interrupted, install_interrupt_handlers

class Embedder:  # the second block's preparation never ends (as a huge block's nearly does), unless abandoned
    dim = 4
    def prepare(self, texts, check):
        while texts[0] == "second":
            check()
            threading.Event().wait(0.01)
        return texts
    def forward(self, texts):
        return np.zeros((len(texts), 4), np.float32)

def save(block, vectors):  # the signal comes while the second block is being prepared in the background
    os.kill(os.getpid(), signal.SIGINT)

install_interrupt_handlers()
try:
    embed_blocks(Embedder(), [(0, 0, 10), (1, 10, 20)], lambda s, e: ["first" if s < 10 else "second"] * (e - s), save)
except Interrupted:
    sys.exit(130)
"""


def test_the_embed_stages_background_preparation_does_not_keep_an_interrupted_process_alive() -> None:
    """The next block is prepared in a thread that the interpreter waits for at exit (a daemon thread stopped
    inside a C++ tokenizer aborts the process); interrupted, that preparation stops at its next check. A
    preparation that were waited for would hang here until the guard kills it."""
    proc = subprocess.run([sys.executable, "-c", ENDLESS_PREPARATION], capture_output=True, text=True,
                          timeout=GUARD_S)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------- training


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(step_dir / checkpoint.WEIGHTS))


def assert_same_training(resumed: Path, straight: Path, steps: int) -> None:
    """The same loss at every step (rel 1e-5, as resume is tested elsewhere) and the same final weights."""
    got, want = metrics(resumed), metrics(straight)
    assert sorted(got) == list(range(1, steps + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    a, b = weights(checkpoint.step_dir(resumed, steps)), weights(checkpoint.step_dir(straight, steps))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def pretrain_workspace(tmp_path_factory) -> Path:
    """A database (24 documents) and an uninterrupted 6-step pretraining run (checkpoints every 2 steps)."""
    toml = make_workspace(tmp_path_factory.mktemp("interrupt"))
    run(load_config(toml))
    return toml


@pytest.mark.slow
def test_pretrain_sigint_keeps_the_last_checkpoint_and_sigterm_saves_the_step_under_way(
        pretrain_workspace: Path) -> None:
    toml = pretrain_workspace
    ws = database.workspace_of(load_config(toml))
    straight, resumed = ws.run_dir(), ws.run_dir("interrupted")
    args = ["pretrain", "-c", str(toml), "--set", 'pretrain.run="interrupted"']

    code, stderr = interrupt(*args, at="pretrain:step:3", sig=signal.SIGINT)  # after step 3; step 2 was saved
    assert code == 130
    assert interrupted_line(stderr) == ("interrupted (SIGINT): pretrain: checkpoint step-000002 is kept (the 1 "
                                        "step after it is lost); rerun the same command to continue")
    assert [p.name for p in checkpoint.complete_steps(resumed)] == ["step-000002"]
    assert not list(resumed.glob(".step-*")) and not (ws.root / LOCK_FILE).exists()

    # resumed at step 2; a SIGTERM after step 3 (its first step): step 3 is saved before the process ends
    code, stderr = interrupt(*args, at="pretrain:step:1", sig=signal.SIGTERM)
    assert code == 143
    assert interrupted_line(stderr) == ("interrupted (SIGTERM): pretrain: checkpoint step-000003 is kept, no step "
                                        "is lost; rerun the same command to continue")
    assert checkpoint.latest(resumed).name == "step-000003" and checkpoint.problem(checkpoint.latest(resumed)) is None
    assert 3 in {json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()
                 if "eval_loss" in x}  # the step under way finished with its evaluation

    done = retro(*args)
    assert "resuming pretrain from" in done.stderr and "step-000003" in done.stderr.replace("\n", "")
    assert_same_training(resumed, straight, 6)


@pytest.mark.slow
def test_a_sigterm_to_two_ranks_and_their_torchrun_saves_the_same_step_on_both(pretrain_workspace: Path) -> None:
    """The scheduler signals the process group: each rank gets SIGTERM from it and again from torchrun, which
    forwards it. Both ranks finish the step, write its checkpoint together and stop; `retro`, which started
    torchrun, exits 143 as they do."""
    args = ["pretrain", "-c", str(pretrain_workspace), "--set", 'pretrain.run="ranks"', "--set",
            "launch.nproc_per_node=2"]
    code, stderr = interrupt(*args, at="pretrain:step:3", sig=signal.SIGTERM, group=True,
                             env={"RETRO_FAULT_RANK": "0"})  # rank 0 waits there; rank 1 in the next collective
    assert code == 143, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if x.startswith("interrupted (")]
    assert lines == ["interrupted (SIGTERM): pretrain: checkpoint step-000003 is kept, no step is lost; rerun the "
                     "same command to continue"] * 2, stderr[-3000:]
    run_path = database.workspace_of(load_config(pretrain_workspace)).run_dir("ranks")
    assert checkpoint.latest(run_path).name == "step-000003" and checkpoint.problem(checkpoint.latest(run_path)) is None


def test_pretrain_interrupted_before_its_first_checkpoint_says_that_nothing_is_kept(pretrain_workspace: Path) -> None:
    args = ["pretrain", "-c", str(pretrain_workspace), "--set", 'pretrain.run="early"']
    code, stderr = interrupt(*args, at="pretrain:step:1", sig=signal.SIGINT)
    assert code == 130
    assert "pretrain: no checkpoint yet, so the 1 step done is lost (one is written every pretrain.save_interval " \
           "= 2 steps)" in interrupted_line(stderr)
    assert not checkpoint.complete_steps(database.workspace_of(load_config(pretrain_workspace)).run_dir("early"))


@pytest.fixture(scope="module")
def sft_ready(tmp_path_factory) -> Path:
    """A pretrained model (2 steps) with SQuAD-style and QA files for sft and generate."""
    return sft_workspace(tmp_path_factory.mktemp("interrupt-sft"))


@pytest.mark.slow
def test_sft_sigterm_saves_the_step_under_way_and_the_rerun_continues_the_same_curve(sft_ready: Path) -> None:
    toml = sft_ready
    ws = database.workspace_of(load_config(toml))
    sets = ["--set", "sft.train_steps=4", "--set", "sft.save_interval=4", "--set", "sft.eval_interval=4"]
    retro("sft", "-c", str(toml), *sets, "--set", 'sft.run="sft-straight"')
    args = ["sft", "-c", str(toml), *sets, "--set", 'sft.run="sft-interrupted"']
    code, stderr = interrupt(*args, at="sft:step:2", sig=signal.SIGTERM)
    assert code == 143
    assert interrupted_line(stderr) == ("interrupted (SIGTERM): sft: checkpoint step-000002 is kept, no step is "
                                        "lost; rerun the same command to continue")
    retro(*args)
    assert_same_training(ws.run_dir("sft-interrupted"), ws.run_dir("sft-straight"), 4)


# ----------------------------------------------------------------------------------------- generate, db add


@pytest.mark.slow
def test_generate_interrupted_keeps_its_answers_and_the_rerun_writes_the_uninterrupted_file(sft_ready: Path) -> None:
    toml = sft_ready
    model = database.workspace_of(load_config(toml)).run_dir()  # the pretraining run
    args = ["generate", str(toml.parent / "squad.json"), "-c", str(toml), "--checkpoint", str(model),
            "--limit", "12", "--set", "generate.max_new_tokens=4", "--set", "generate.batch_size=4"]
    straight, resumed = toml.parent / "straight.jsonl", toml.parent / "resumed.jsonl"
    retro(*args, "--out", str(straight))
    code, stderr = interrupt(*args, "--out", str(resumed), at="generate:batch:2", sig=signal.SIGINT)
    assert code == 130
    line = "".join(interrupted_line(stderr).split())  # (a long path)
    assert line.startswith("interrupted(SIGINT):generate:8of12answersarekeptin") and ".partial;" in line
    assert not resumed.exists()
    again = retro(*args, "--out", str(resumed))
    assert "8 of 12 questions were answered" in again.stderr.replace("\n", " ")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    read = lambda path: [json.loads(x) for x in path.read_text().splitlines()]  # noqa: E731
    assert strip(read(resumed)) == strip(read(straight))


def test_db_add_interrupted_leaves_the_database_as_it_was_and_the_rerun_adds(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "corpus" / "docs.jsonl", synthetic_documents(24, 120))
    toml = write_toml(tmp_path / "retro.toml", small_sections())
    db.build(load_config(toml))
    ws = database.workspace_of(load_config(toml))
    new = write_jsonl(tmp_path / "new.jsonl", [{"id": "zebra", "text": ZEBRA}])
    base, answers = artefacts(ws.root), hits(toml)
    code, stderr = interrupt("db", "add", str(new), "-c", str(toml), at="add:segment", sig=signal.SIGTERM)
    assert code == 143
    assert interrupted_line(stderr) == ("interrupted (SIGTERM): db add: the database is as it was before (nothing "
                                        "of this add is live yet); the rerun adds the documents; rerun the same "
                                        "command to continue")
    assert not (ws.db / "edits" / "manifest.json").exists() and not (ws.root / LOCK_FILE).exists()
    assert hits(toml) == answers and "zebra" not in answers  # readers see the database as before
    assert {k: v for k, v in artefacts(ws.root).items() if not k.startswith("db/edits/")} == base
    retro("db", "add", str(new), "-c", str(toml))
    assert "zebra" in hits(toml)
    manifest = json.loads((ws.db / "edits" / "manifest.json").read_text())
    assert [(seg["name"], seg["documents"]) for seg in manifest["segments"]] == [("add-000001", 1)]
    assert not list((ws.db / "edits").glob(".tmp-*"))  # the interrupted add's temporary folder was cleared


# ------------------------------------------------------------------------------------------- TensorBoard


@pytest.mark.slow
def test_tensorboard_events_hold_the_metrics_once_per_step_across_an_interruption(pretrain_workspace: Path) -> None:
    pytest.importorskip("tensorboard", reason="the optional package: pip install 'retrocli[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ws = database.workspace_of(load_config(pretrain_workspace))
    args = ["pretrain", "-c", str(pretrain_workspace), "--set", 'pretrain.run="tb"', "--set",
            "pretrain.tensorboard=true"]
    code, _ = interrupt(*args, at="pretrain:step:3", sig=signal.SIGINT)  # step 3 is written, then lost
    assert code == 130
    retro(*args)
    run_path = ws.run_dir("tb")
    events = EventAccumulator(str(run_path / "tensorboard"))
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]  # the lost step 3 once only
    want = metrics(run_path)
    assert loss == pytest.approx(want, rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [3, 6]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "eval/ppl"} <= set(events.Tags()["scalars"])


HIDE_TENSORBOARD = """
import sys

class HideTensorboard:  # as if the package were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorboard":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, HideTensorboard())
"""


@pytest.mark.parametrize("section", ["pretrain", "sft"])
def test_tensorboard_without_the_package_is_refused_before_training_starts(section: str, request,
                                                                             tmp_path: Path) -> None:
    toml = request.getfixturevalue("pretrain_workspace" if section == "pretrain" else "sft_ready")
    (tmp_path / "sitecustomize.py").write_text(HIDE_TENSORBOARD)
    env = {**os.environ, **QUIET, "PYTHONPATH": str(tmp_path)}
    args = [section, "-c", str(toml), "--set", f'{section}.run="no-tb"', "--set", f"{section}.tensorboard=true"]
    proc = subprocess.run([str(RETRO), *args], capture_output=True, text=True, env=env, timeout=GUARD_S)
    said = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in said
    assert f"{section}.tensorboard = true needs the tensorboard package" in said
    assert "pip install 'retrocli[tensorboard]'" in said
    assert not database.workspace_of(load_config(toml)).run_dir("no-tb").exists()  # nothing trained


@pytest.mark.slow
def test_a_sigterm_to_reproduce_alone_reaches_its_stage_which_saves_and_the_rerun_continues(
        pretrain_workspace: Path) -> None:
    """A scheduler signals only the process it started (`retro reproduce`): the stage running under it gets the
    SIGTERM too, saves its step, and both exit 143 saying what they kept; the rerun resumes that stage."""
    args = ["reproduce", "-c", str(pretrain_workspace), "--set", 'pretrain.run="via-reproduce"', "--set",
            "reproduce.baseline=false", "--set", "reproduce.sft=false"]
    code, stderr = interrupt(*args, at="pretrain:step:3", sig=signal.SIGTERM)
    assert code == 143 and "Traceback" not in stderr, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if x.startswith("interrupted (")]
    assert lines == ["interrupted (SIGTERM): pretrain: checkpoint step-000003 is kept, no step is lost; rerun the "
                     "same command to continue",
                     "interrupted (SIGTERM): reproduce: the stages before 'pretrain' are complete, and it kept what "
                     "it said; rerun the same command to continue"], stderr[-3000:]
    done = retro(*args)
    assert "resuming pretrain from" in done.stderr and "step-000003" in done.stderr.replace("\n", "")
