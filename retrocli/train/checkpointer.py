"""The training loop's checkpoints (the folder format is checkpoint.py's): which checkpoint a run resumes from,
restoring the model, optimizer, data position and RNG from it, saving one at a step (atomically, every rank
waiting for it) and pruning the old ones, and what an interruption keeps."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ..errors import UserError
from ..runtime import dist, log, set_kept_note, warn
from . import checkpoint
from .job import Job, TrainSettings


def find_resume(run_dir: Path, s: TrainSettings, phase: str) -> Path | None:
    """The checkpoint to continue from: the latest complete one when {phase}.resume = 'auto'."""
    if s.resume == "never":
        if checkpoint.complete_steps(run_dir):
            raise UserError(f"{phase}.resume = 'never' but {run_dir} already has checkpoints: remove them, "
                            f"use another workspace, or set resume = 'auto' to continue")
        return None
    return checkpoint.latest(run_dir)


def _check_same_model(meta: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    # keys a checkpoint predates take their defaults, the values it was trained with
    theirs, ours = dataclasses.asdict(checkpoint.model_config_of(meta)), current.get("model", {})
    diffs = [f"model.{k}: checkpoint {theirs.get(k)!r}, config {ours.get(k)!r}" for k in sorted(set(theirs) | set(ours))
             if theirs.get(k) != ours.get(k)]
    if meta.get("chunk_length") != current.get("chunk_length"):
        diffs.append(f"db.chunk_length: checkpoint {meta.get('chunk_length')}, config {current.get('chunk_length')}")
    if diffs:
        raise UserError(f"cannot resume from {path}: the model differs (" + "; ".join(diffs) + "). Restore the "
                        "settings, or start a new run in another workspace.dir")
    theirs_trained, ours_trained = meta.get("trained_parameters"), current.get("trained_parameters")
    if theirs_trained is not None and theirs_trained != ours_trained:
        raise UserError(f"cannot resume from {path}: it trained {theirs_trained:,} parameters, this run would "
                        f"train {ours_trained:,} (pretrain.freeze_decoder or sft.neighbors changed). Restore the "
                        "setting, or start a new run (pretrain.run / sft.run)")


@dataclass
class Position:
    """Where a run stands: optimizer steps done, training samples consumed, tokens seen."""

    step: int = 0
    consumed: int = 0
    tokens: int = 0


class Checkpointer:
    """Resumes a job from `resume_from` (or starts it fresh), saves it every `save_interval` steps, at the end and
    when preempted, and keeps the note of what an interruption keeps up to date."""

    def __init__(self, job: Job, s: TrainSettings, resume_from: Path | None):
        self.job, self.s, self.resume_from = job, s, resume_from
        self.saved: int | None = None  # the step of the latest checkpoint
        self._state: dict[str, Any] | None = None

    def load_model(self, model: torch.nn.Module) -> None:
        """Before the model is wrapped: the checkpoint's full weights on every rank (checked to fit the job)."""
        if self.resume_from is None:
            return
        meta = checkpoint.read_meta(self.resume_from)
        _check_same_model(meta, self.job.meta, self.resume_from)
        checkpoint.check_tokenizer(meta, self.job.meta["tokenizer"], self.resume_from)
        model.load_state_dict(checkpoint.load_weights(self.resume_from))  # full weights on every rank, then shard
        self._state = checkpoint.load_trainer_state(self.resume_from)

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Position:
        """After the optimizer is made: its state, the data position and the RNG states of the checkpoint (a fresh
        run: step 0)."""
        state = self._state
        if state is None:
            return Position()
        if "optimizer" in state:
            full = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full)
        else:  # a sharded checkpoint: its optimizer shards, resharded to this run's processes
            checkpoint.load_sharded_optimizer(self.resume_from, model, optimizer)
        at = Position(state["step"], state["data"]["consumed"], state["data"]["tokens"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if state["data"]["num_samples"] != len(self.job.train):
            warn(f"the checkpoint saw {state['data']['num_samples']} training samples, now there are "
                 f"{len(self.job.train)}: the sample order after the resume differs from the original run")
        log(f"resuming {self.job.phase} from {self.resume_from} (step {at.step}, {at.consumed:,} samples consumed)")
        self.saved = at.step
        self._state = None
        return at

    def note(self, step: int) -> None:
        """Say what an interruption at `step` keeps (`retro` prints it when interrupted)."""
        set_kept_note(kept_by(self.job.phase, step, self.saved, self.s.save_interval))

    def due(self, step: int, preempted: bool) -> bool:
        return step % self.s.save_interval == 0 or step == self.s.train_steps or preempted

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, at: Position) -> Path:
        """Write the checkpoint (atomically) and prune old ones; every rank waits for it.

        Unsharded (one process, DDP): rank 0 writes full state dicts, keyed by parameter name, which resume in
        one process, under DDP or under FSDP with any number of ranks. Sharded (FSDP over several ranks): each
        rank writes its own shards (torch.distributed.checkpoint), nothing is gathered on one process, and they
        load into any number of ranks, sharded or not."""
        D, job, s = dist(), self.job, self.s
        path = checkpoint.step_dir(job.run_dir, at.step)
        sharded = s.fsdp and D.world > 1
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        data = {"consumed": at.consumed, "tokens": at.tokens, "num_samples": len(job.train), "seed": s.seed}
        meta = {**job.meta, "phase": job.phase, "consumed": at.consumed, "train_settings": s.recorded()}
        fault = f"{job.phase}:checkpoint"
        if sharded:
            shards = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
            checkpoint.save(job.run_dir, at.step, None, {"step": at.step, "data": data, "rng": rng, **job.extra},
                            meta, job.config_toml, fault, shards=shards)
        else:
            options = StateDictOptions(full_state_dict=True)
            weights = get_model_state_dict(model, options=options)
            optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
            if D.main:
                state = {"optimizer": optimizer_state, "step": at.step, "data": data, "rng": rng, **job.extra}
                checkpoint.save(job.run_dir, at.step, weights, state, meta, job.config_toml, fault)
        if D.main:
            checkpoint.prune(job.run_dir, s.keep_last)
        D.barrier()
        self.saved = at.step
        self.note(at.step)
        return path


def kept_by(phase: str, step: int, saved: int | None, save_interval: int) -> str:
    """What an interruption keeps of a training run at `step` whose latest checkpoint is at `saved`."""
    if saved is None:
        if step == 0:
            return f"{phase}: no step was finished yet"
        return (f"{phase}: no checkpoint yet, so the {_steps(step)} done {'is' if step == 1 else 'are'} lost (one "
                f"is written every {phase}.save_interval = {save_interval} steps)")
    lost = step - saved
    if not lost:
        return f"{phase}: checkpoint step-{saved:06d} is kept, no step is lost"
    return (f"{phase}: checkpoint step-{saved:06d} is kept (the {_steps(lost)} after it "
            f"{'is' if lost == 1 else 'are'} lost)")


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"
