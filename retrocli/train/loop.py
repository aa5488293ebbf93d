"""The training loop shared by `retro pretrain` and `retro sft`: AdamW, warmup + decay schedule, gradient
accumulation. The same code runs in one process and under torchrun (DDP; gloo on CPU, nccl on GPUs).

A phase supplies a `Job` and its `TrainSettings` (job.py): the model, training and validation samples (anything
with `len()` and `get(i)` returning the arrays of `retrocli.train.samples.Samples.get`), the checkpoint
folder, and what to record beside the weights. The loop hands the rest to components it calls: the
`Checkpointer` (exact resume, checkpoints, what an interruption keeps), the `Evaluator` (held-out loss) and
`Metrics` (metrics.jsonl, TensorBoard).

Batches. Every optimizer step consumes `global_batch_size` consecutive positions of the seeded sample order
(`SampleOrder`); rank r's micro-batch a is positions [(a * world + r) * micro, ... + micro), so one process with
accumulation and N processes with less accumulation see the same samples in each step. The loss is the sum of
masked token losses over the whole global batch divided by its number of target tokens, so the gradient does
not depend on how the batch is split either.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..runtime import (
    Interrupted,
    Prefetcher,
    all_sum,
    autocast,
    device_for_rank,
    dist,
    fault_point,
    log,
    sigterm_at_step_end,
    to_device,
)
from .checkpointer import Checkpointer, Position
from .evaluator import Evaluator, batch_nll
from .job import Job, TrainSettings
from .metrics import Metrics, ProgressBar, require_tensorboard
from .samples import SampleOrder, collate

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
    if hasattr(model, "activation_checkpointing"):
        model.activation_checkpointing = s.activation_checkpointing
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


class Batches:
    """This rank's micro-batches of each step, from the seeded sample order (or the job's synthetic samples), the
    next step's assembled by a background thread while this one runs."""

    def __init__(self, job: Job, s: TrainSettings, accum: int, pool: Prefetcher):
        self.job, self.s, self.accum, self.pool = job, s, accum, pool
        self.order = SampleOrder(len(job.train), s.seed)

    def sample_at(self, position: int) -> dict[str, np.ndarray]:
        made = self.job.synthetic(position) if self.job.synthetic is not None else None
        return made if made is not None else self.job.train.get(self.order[position])

    def load_step(self, consumed: int) -> list[dict[str, np.ndarray]]:
        """This rank's micro-batches of the step that starts at sample position `consumed`."""
        D, micro = dist(), self.s.micro_batch_size
        out = []
        for a in range(self.accum):
            self.pool.check()  # an interrupted run stops here rather than assembling the rest
            first = consumed + (a * D.world + D.rank) * micro
            out.append(collate([self.sample_at(p) for p in range(first, first + micro)]))
        return out

    def submit(self, consumed: int):
        return self.pool.submit(self.load_step, consumed)


def train_step(net: torch.nn.Module, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
               batches: list[dict[str, torch.Tensor]], s: TrainSettings, device: torch.device) -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches: (loss of the global batch, gradient norm)."""
    D = dist()
    (global_tokens,) = all_sum([sum(float(b["loss_mask"].sum()) for b in batches)], device)
    global_tokens = max(global_tokens, 1.0)
    local_nll = 0.0
    for a, batch in enumerate(batches):
        sync = a == len(batches) - 1 or D.world == 1 or s.fsdp  # FSDP reduce-scatters every micro-batch
        with nullcontext() if sync else net.no_sync():  # DDP: all-reduce on the last micro-batch only
            with autocast(device, s.precision):
                nll = batch_nll(net, batch)
            # DDP averages gradients over ranks: scale by world so the result is sum / global tokens
            (nll * D.world / global_tokens).backward()
        local_nll += float(nll.detach())
    (total_nll,) = all_sum([local_nll], device)
    grad_norm = _full(torch.nn.utils.clip_grad_norm_(params, s.grad_clip if s.grad_clip > 0 else math.inf))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total_nll / global_tokens, grad_norm


# ------------------------------------------------------------------------------------------------- loop


def train(s: TrainSettings, job: Job, resume_from: Path | None = None) -> dict[str, Any]:
    """Run the loop from step 0 (or from `resume_from`) up to s.train_steps; returns a summary.

    Interrupted: SIGINT stops at once (the steps after the latest checkpoint are lost); SIGTERM, a scheduler's
    preemption, lets the step under way finish, writes a checkpoint at it and then stops, so nothing is lost."""
    D = dist()
    if s.tensorboard:
        require_tensorboard(job.phase)
    device = device_for_rank()
    accum = accumulation(s, job)
    model = job.model.to(device)
    # what the optimizer holds state for (pretrain.freeze_decoder and sft.neighbors = "none" train a part only)
    job.meta["trained_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    checkpointer = Checkpointer(job, s, resume_from)
    checkpointer.load_model(model)
    net = wrap(model, s, device)
    optimizer = make_optimizer(model, s)  # after sharding: FSDP replaces the parameters by shards
    at = checkpointer.restore(model, optimizer)
    if D.main:
        job.run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer.note(at.step)

    params = [p for p in model.parameters() if p.requires_grad]
    summary: dict[str, Any] = {"step": at.step, "loss": None, "eval_loss": None, "checkpoint": None}
    evaluator = Evaluator(job.valid, s, device)
    started = time.time()
    log(f"{job.phase}: {sum(p.numel() for p in params):,} parameters, {len(job.train):,} training samples, "
        f"global batch {s.global_batch_size} = {s.micro_batch_size} x {D.world} process(es) x {accum} accumulation, "
        f"steps {at.step} -> {s.train_steps}")
    net.train()
    metrics = Metrics(job.run_dir, s.tensorboard, None if resume_from is None else at.step)
    D.barrier()
    with (ProgressBar(job.phase, s.train_steps, at.step) as bar, Prefetcher(f"{job.phase}-batches") as pool,
          metrics, sigterm_at_step_end() as sigterm_received):
        batches = Batches(job, s, accum, pool)
        upcoming = batches.submit(at.consumed)
        while at.step < s.train_steps:
            t0 = time.time()
            lr = lr_at(at.step, s)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_batches = [to_device(b, device) for b in upcoming.result()]
            if at.step + 1 < s.train_steps:
                upcoming = batches.submit(at.consumed + s.global_batch_size)
            tokens_per_step = sum(b["tokens"].numel() for b in step_batches) * D.world
            loss, grad_norm = train_step(net, params, optimizer, step_batches, s, device)
            at = Position(at.step + 1, at.consumed + s.global_batch_size, at.tokens + tokens_per_step)
            checkpointer.note(at.step)
            rate = tokens_per_step / max(time.time() - t0, 1e-9)
            metrics.write({"step": at.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": at.tokens,
                           "tokens_per_s": rate, "elapsed": round(time.time() - started, 3)})
            bar.update(loss=f"{loss:.4f}", lr=f"{lr:.2e}", rate=f"{rate:,.0f}")
            summary.update(step=at.step, loss=loss)
            if not math.isfinite(loss):
                raise RuntimeError(f"{job.phase}: the loss is {loss} at step {at.step} (lower pretrain.lr?)")
            fault_point(f"{job.phase}:step")

            if evaluator.due(at.step):
                record = evaluator.validate(model, at.step)
                metrics.write(record)
                eval_loss = record["eval_loss"]
                bar.update(eval=f"eval {eval_loss:.4f}")
                log(f"step {at.step}/{s.train_steps}: loss {loss:.4f}, eval loss {eval_loss:.4f} "
                    f"(ppl {math.exp(min(eval_loss, 50)):.2f}), lr {lr:.2e}, {rate:,.0f} tokens/s")
                summary["eval_loss"] = eval_loss
            # whether any rank has had a SIGTERM: then every rank writes a checkpoint at this step and stops
            (preempted,) = all_sum([float(sigterm_received())], device)
            if checkpointer.due(at.step, preempted):
                summary["checkpoint"] = str(checkpointer.save(model, optimizer, at))
            if preempted:
                raise Interrupted(signal.SIGTERM)
    summary["seconds"] = round(time.time() - started, 2)
    return summary


def accumulation(s: TrainSettings, job: Job) -> int:
    """Micro-batches per rank in each step; refuses a batch that does not split, and a job with no sample."""
    D = dist()
    per_step = s.micro_batch_size * D.world
    if s.global_batch_size % per_step:
        raise UserError(f"{job.phase}.global_batch_size ({s.global_batch_size}) must be a multiple of "
                        f"{job.phase}.micro_batch_size ({s.micro_batch_size}) x processes ({D.world})")
    if len(job.train) == 0:
        raise UserError("no training sample fits: the training documents give fewer tokens than one sequence "
                        "of model.seq_length + 1; lower model.seq_length or add documents")
    return s.global_batch_size // per_step
