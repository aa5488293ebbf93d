"""The training loop shared by `retro pretrain` and `retro sft`: AdamW, warmup + decay schedule, gradient
accumulation, evaluation, checkpoints, exact resume, metrics. The same code runs in one process and under
torchrun (DDP; gloo on CPU, nccl on GPUs).

A phase supplies a `Job`: the model, training and validation samples (anything with `len()` and `get(i)`
returning the arrays of `retrocli.train.samples.Samples.get`), the checkpoint folder, and what to record beside
the weights. Batches. Every optimizer step consumes `global_batch_size` consecutive positions of the seeded
sample order (`SampleOrder`); rank r's micro-batch a is positions [(a * world + r) * micro, ... + micro), so
one process with accumulation and N processes with less accumulation see the same samples in each step.
The loss is the sum of masked token losses over the whole global batch divided by its number of target
tokens, so the gradient does not depend on how the batch is split either.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ..errors import UserError
from ..runtime import (
    Interrupted,
    Prefetcher,
    all_sum,
    autocast,
    console,
    device_for_rank,
    dist,
    fault_point,
    log,
    set_kept_note,
    show_progress,
    sigterm_at_step_end,
    to_device,
    warn,
)
from . import checkpoint
from .samples import SampleOrder, collate


@dataclass
class TrainSettings:
    """The knobs of the loop; `from_section` reads them from [pretrain] (or [sft], which has the same keys)."""

    micro_batch_size: int = 8
    global_batch_size: int = 32
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    decay: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    train_steps: int = 1000
    eval_interval: int = 100
    eval_steps: int = 10
    save_interval: int = 500
    keep_last: int = 3
    precision: str = "fp32"
    compile: bool = False
    resume: str = "auto"
    seed: int = 1234
    fsdp: bool = False  # shard the model over the ranks instead of replicating it
    tensorboard: bool = False  # the metrics also as TensorBoard events (Metrics)

    @classmethod
    def from_section(cls, section: Any, seed: int, seq_length: int) -> "TrainSettings":
        """The loop's knobs from [pretrain] or [sft]; `train_tokens` > 0 becomes train_steps =
        ceil(train_tokens / (global_batch_size x seq_length))."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in dataclasses.asdict(section).items() if k in names}
        if section.train_tokens > 0:
            values["train_steps"] = -(-section.train_tokens // (section.global_batch_size * seq_length))
        return cls(**values, seed=seed)


@dataclass
class Job:
    """What a phase hands to the loop."""

    phase: str  # "pretrain" or "sft": names the fault points (`pretrain:step`, `pretrain:checkpoint`)
    run_dir: Path  # checkpoints (step-NNNNNN/) and metrics.jsonl
    model: torch.nn.Module
    train: Any
    valid: Any | None
    meta: dict[str, Any]  # recorded in each checkpoint's meta.json (model config, tokenizer reference, ...)
    config_toml: str  # the resolved workspace configuration, saved beside the weights
    extra: dict[str, Any] = field(default_factory=dict)
    # the sample at a global training position in place of a `train` one, or None (pretrain's copy windows)
    synthetic: Callable[[int], dict[str, np.ndarray] | None] | None = None


# ------------------------------------------------------------------------------------------- schedule


def lr_at(step: int, s: TrainSettings) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to lr, then decay to min_lr."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.decay == "constant":
        return s.lr
    span = max(s.train_steps - s.warmup_steps, 1)
    progress = min((step - s.warmup_steps) / span, 1.0)
    if s.decay == "linear":
        return s.lr + (s.min_lr - s.lr) * progress
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases or the embedding table)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # On a GPU the fused kernel (one launch for every parameter); on a CPU the plain per-parameter loop, whose
    # arithmetic does not depend on how parameters are grouped (1 rank and 2 ranks give the same curve).
    on_gpu = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.adam_beta1, s.adam_beta2), fused=on_gpu, foreach=False)


def wrap(model: torch.nn.Module, s: TrainSettings, device: torch.device) -> torch.nn.Module:
    """The module the loop calls: `model` itself, compiled, and under DDP or (pretrain/sft.fsdp) FSDP.

    FSDP (`fully_shard`, in place) shards every decoder layer, the encoder and the rest, so each rank holds
    1/world of the parameters, gradients and optimizer state and gathers a layer only while it runs."""
    D = dist()
    net: torch.nn.Module = model
    if s.fsdp and D.world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(model, "layers", []):
            fully_shard(layer)
        if getattr(model, "encoder", None) is not None:
            fully_shard(model.encoder)
        fully_shard(model)
    if s.compile:
        net = torch.compile(net)
    if D.world > 1 and not s.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


def _full(t: torch.Tensor) -> float:
    """A float of a tensor that may be an FSDP shard (DTensor)."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


# ----------------------------------------------------------------------------------------------- batches


def token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], retrieval: bool = True) -> torch.Tensor:
    """(b, n) next-token losses (nats, fp32) of a batch, 0 where batch["loss_mask"] is."""
    logits = model(batch["tokens"], batch.get("neighbours"), retrieval=retrieval)  # (b, n, v)
    losses = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), reduction="none")
    return (losses * batch["loss_mask"].flatten().to(losses.dtype)).view(batch["targets"].shape)


def batch_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], retrieval: bool = True) -> torch.Tensor:
    """Sum of the masked next-token losses (nats, fp32) of a batch."""
    return token_nll(model, batch, retrieval).sum()


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Any, indices: Sequence[int], micro_batch_size: int,
             device: torch.device, precision: str = "fp32", retrieval: bool = True,
             num_batches: int = 0) -> tuple[float, float]:
    """(total NLL in nats, target tokens) of the given samples on this rank (sum over ranks yourself).

    `num_batches`: run at least this many forward passes, the extra ones on a sample whose result is
    dropped, so that every rank of a sharded (FSDP) model takes part in the same number of gathers."""
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0.0
    starts = range(0, len(indices), micro_batch_size)
    for s in starts:
        batch = to_device(collate([data.get(int(i)) for i in indices[s : s + micro_batch_size]]), device)
        with autocast(device, precision):
            nll += float(batch_nll(model, batch, retrieval))
        tokens += float(batch["loss_mask"].sum())
    for _ in range(num_batches - len(starts)):
        with autocast(device, precision):
            batch_nll(model, to_device(collate([data.get(0)]), device), retrieval)
    model.train(was_training)
    return nll, tokens


def evaluate_set(model: torch.nn.Module, data: Any, s: TrainSettings, device: torch.device) -> tuple[float, float]:
    """(NLL, target tokens) over all ranks of the first `eval_steps` global batches of one held-out set."""
    indices = eval_indices(len(data), s.global_batch_size, s.eval_steps)
    # every rank makes as many forward passes as the busiest one (shares differ by at most one sample): FSDP
    most = -(-len(eval_indices(len(data), s.global_batch_size, s.eval_steps, rank=0)) // s.micro_batch_size)
    nll, tokens = all_sum(evaluate(model, data, indices, s.micro_batch_size, device, s.precision, num_batches=most),
                          device)
    return nll, tokens


def eval_indices(num_samples: int, global_batch_size: int, steps: int, rank: int | None = None) -> list[int]:
    """This rank's (or `rank`'s) share of the first `steps` global batches of the validation samples (in
    order, not shuffled), so an evaluation sees the same samples whatever the number of processes."""
    D = dist()
    return list(range(D.rank if rank is None else rank, min(num_samples, steps * global_batch_size), D.world))


# ----------------------------------------------------------------------------------------------- resume


def find_resume(run_dir: Path, s: TrainSettings) -> Path | None:
    """The checkpoint to continue from: the latest complete one when resume = 'auto'."""
    if s.resume == "never":
        if checkpoint.complete_steps(run_dir):
            raise UserError(f"pretrain.resume = 'never' but {run_dir} already has checkpoints: remove them, "
                            f"use another workspace, or set resume = 'auto' to continue")
        return None
    return checkpoint.latest(run_dir)


def _check_same_model(meta: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    theirs, ours = meta.get("model", {}), current.get("model", {})
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
    from ..workspace import write_text_atomic

    write_text_atomic(path, "".join(x + "\n" for x in keep))


# ---------------------------------------------------------------------------------------------- metrics

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


# ------------------------------------------------------------------------------------------------- loop


class _Bar:
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


def train(s: TrainSettings, job: Job, resume_from: Path | None = None) -> dict[str, Any]:
    """Run the loop from step 0 (or from `resume_from`) up to s.train_steps; returns a summary.

    Interrupted: SIGINT stops at once (the steps after the latest checkpoint are lost); SIGTERM, a scheduler's
    preemption, lets the step under way finish, writes a checkpoint at it and then stops, so nothing is lost."""
    D = dist()
    if s.tensorboard:
        require_tensorboard(job.phase)
    device = device_for_rank()
    per_step = s.micro_batch_size * D.world
    if s.global_batch_size % per_step:
        raise UserError(f"{job.phase}.global_batch_size ({s.global_batch_size}) must be a multiple of "
                        f"{job.phase}.micro_batch_size ({s.micro_batch_size}) x processes ({D.world})")
    accum = s.global_batch_size // per_step
    if len(job.train) == 0:
        raise UserError("no training sample fits: the training documents give fewer tokens than one sequence "
                        "of model.seq_length + 1; lower model.seq_length or add documents")
    model = job.model.to(device)
    # what the optimizer holds state for (pretrain.freeze_decoder and sft.neighbors = "none" train a part only)
    job.meta["trained_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step, consumed, tokens_seen = 0, 0, 0
    state = None
    if resume_from is not None:
        meta = checkpoint.read_meta(resume_from)
        _check_same_model(meta, job.meta, resume_from)
        checkpoint.check_tokenizer(meta, job.meta["tokenizer"], resume_from)
        model.load_state_dict(checkpoint.load_weights(resume_from))  # full weights on every rank, then shard
        state = checkpoint.load_trainer_state(resume_from)
    net = wrap(model, s, device)
    optimizer = make_optimizer(model, s)  # after sharding: FSDP replaces the parameters by shards
    if state is not None:
        if "optimizer" in state:
            full = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full)
        else:  # a sharded checkpoint: its optimizer shards, resharded to this run's processes
            checkpoint.load_sharded_optimizer(resume_from, model, optimizer)
        step, consumed, tokens_seen = state["step"], state["data"]["consumed"], state["data"]["tokens"]
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if state["data"]["num_samples"] != len(job.train):
            warn(f"the checkpoint saw {state['data']['num_samples']} training samples, now there are "
                 f"{len(job.train)}: the sample order after the resume differs from the original run")
        log(f"resuming {job.phase} from {resume_from} (step {step}, {consumed:,} samples consumed)")
    if D.main:
        job.run_dir.mkdir(parents=True, exist_ok=True)
    saved = None if resume_from is None else step  # the step of the latest checkpoint
    set_kept_note(kept_by(job.phase, step, saved, s.save_interval))

    order = SampleOrder(len(job.train), s.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    summary: dict[str, Any] = {"step": step, "loss": None, "eval_loss": None, "checkpoint": None}
    # held-out sets by name (SFT: one per dataset; pretraining: one, unnamed)
    valid_sets = job.valid if isinstance(job.valid, dict) else {"": job.valid} if job.valid is not None else {}
    valid_sets = {name: data for name, data in valid_sets.items() if len(data) > 0}
    has_valid = bool(valid_sets)  # the same on every rank
    if not has_valid:
        warn("no validation samples (corpus.valid_fraction = 0, or too few held-out tokens): no evaluation")
    started = time.time()
    log(f"{job.phase}: {sum(p.numel() for p in params):,} parameters, {len(job.train):,} training samples, "
        f"global batch {s.global_batch_size} = {s.micro_batch_size} x {D.world} process(es) x {accum} accumulation, "
        f"steps {step} -> {s.train_steps}")

    def sample_at(position: int) -> dict[str, np.ndarray]:
        made = job.synthetic(position) if job.synthetic is not None else None
        return made if made is not None else job.train.get(order[position])

    def load_step(consumed: int) -> list[dict[str, np.ndarray]]:
        """This rank's micro-batches of the step that starts at sample position `consumed`."""
        out = []
        for a in range(accum):
            pool.check()  # an interrupted run stops here rather than assembling the rest
            first = consumed + (a * D.world + D.rank) * s.micro_batch_size
            out.append(collate([sample_at(p) for p in range(first, first + s.micro_batch_size)]))
        return out

    net.train()
    metrics = Metrics(job.run_dir, s.tensorboard, None if resume_from is None else step)
    D.barrier()
    # one background thread assembles the next step's batches (numpy, memory-mapped reads) during this step
    with (_Bar(job.phase, s.train_steps, step) as bar, Prefetcher(f"{job.phase}-batches") as pool, metrics,
          sigterm_at_step_end() as sigterm_received):
        upcoming = pool.submit(load_step, consumed)
        while step < s.train_steps:
            t0 = time.time()
            lr = lr_at(step, s)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [to_device(b, device) for b in upcoming.result()]
            if step + 1 < s.train_steps:
                upcoming = pool.submit(load_step, consumed + s.global_batch_size)
            tokens_per_step = sum(b["tokens"].numel() for b in batches) * D.world
            (global_tokens,) = all_sum([sum(float(b["loss_mask"].sum()) for b in batches)], device)
            global_tokens = max(global_tokens, 1.0)
            local_nll = 0.0
            for a, batch in enumerate(batches):
                sync = a == accum - 1 or D.world == 1 or s.fsdp  # FSDP reduce-scatters every micro-batch
                with nullcontext() if sync else net.no_sync():  # DDP: all-reduce on the last micro-batch only
                    with autocast(device, s.precision):
                        nll = batch_nll(net, batch)
                    # DDP averages gradients over ranks: scale by world so the result is sum / global tokens
                    (nll * D.world / global_tokens).backward()
                local_nll += float(nll.detach())
            (total_nll,) = all_sum([local_nll], device)
            loss = total_nll / global_tokens
            grad_norm = _full(torch.nn.utils.clip_grad_norm_(params, s.grad_clip if s.grad_clip > 0 else math.inf))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            consumed += s.global_batch_size
            set_kept_note(kept_by(job.phase, step, saved, s.save_interval))
            seconds = time.time() - t0
            rate = tokens_per_step / max(seconds, 1e-9)
            tokens_seen += tokens_per_step
            metrics.write({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens": tokens_seen, "tokens_per_s": rate,
                           "elapsed": round(time.time() - started, 3)})
            bar.update(loss=f"{loss:.4f}", lr=f"{lr:.2e}", rate=f"{rate:,.0f}")
            summary.update(step=step, loss=loss)
            if not math.isfinite(loss):
                raise RuntimeError(f"{job.phase}: the loss is {loss} at step {step} (lower pretrain.lr?)")
            fault_point(f"{job.phase}:step")

            if has_valid and (step % s.eval_interval == 0 or step == s.train_steps):
                per_set = {name: evaluate_set(model, data, s, device) for name, data in valid_sets.items()}
                nll_sum, n_tok = sum(v[0] for v in per_set.values()), sum(v[1] for v in per_set.values())
                eval_loss = nll_sum / max(n_tok, 1.0)
                record = {"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50)),
                          "eval_tokens": int(n_tok)}
                if len(per_set) > 1 or "" not in per_set:
                    record["eval_loss_by_set"] = {name: v[0] / max(v[1], 1.0) for name, v in per_set.items()}
                metrics.write(record)
                bar.update(eval=f"eval {eval_loss:.4f}")
                log(f"step {step}/{s.train_steps}: loss {loss:.4f}, eval loss {eval_loss:.4f} "
                    f"(ppl {math.exp(min(eval_loss, 50)):.2f}), lr {lr:.2e}, {rate:,.0f} tokens/s")
                summary["eval_loss"] = eval_loss
            # whether any rank has had a SIGTERM: then every rank writes a checkpoint at this step and stops
            (preempted,) = all_sum([float(sigterm_received())], device)
            if step % s.save_interval == 0 or step == s.train_steps or preempted:
                summary["checkpoint"] = str(save(job, s, model, optimizer, step, consumed, tokens_seen))
                saved = step
                set_kept_note(kept_by(job.phase, step, saved, s.save_interval))
            if preempted:
                raise Interrupted(signal.SIGTERM)
    summary["seconds"] = round(time.time() - started, 2)
    return summary


def save(job: Job, s: TrainSettings, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
         consumed: int, tokens: int) -> Path:
    """Write the checkpoint (atomically) and prune old ones; every rank waits for it.

    Unsharded (one process, DDP): rank 0 writes full state dicts, keyed by parameter name, which resume in
    one process, under DDP or under FSDP with any number of ranks. Sharded (FSDP over several ranks): each
    rank writes its own shards (torch.distributed.checkpoint), nothing is gathered on one process, and they
    load into any number of ranks, sharded or not."""
    D = dist()
    path = checkpoint.step_dir(job.run_dir, step)
    sharded = s.fsdp and D.world > 1
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    data = {"consumed": consumed, "tokens": tokens, "num_samples": len(job.train), "seed": s.seed}
    meta = {**job.meta, "phase": job.phase, "consumed": consumed, "train_settings": dataclasses.asdict(s)}
    fault = f"{job.phase}:checkpoint"
    if sharded:
        shards = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        checkpoint.save(job.run_dir, step, None, {"step": step, "data": data, "rng": rng, **job.extra}, meta,
                        job.config_toml, fault, shards=shards)
    else:
        options = StateDictOptions(full_state_dict=True)
        weights = get_model_state_dict(model, options=options)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
        if D.main:
            state = {"optimizer": optimizer_state, "step": step, "data": data, "rng": rng, **job.extra}
            checkpoint.save(job.run_dir, step, weights, state, meta, job.config_toml, fault)
    if D.main:
        checkpoint.prune(job.run_dir, s.keep_last)
    D.barrier()
    return path
