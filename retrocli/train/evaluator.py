"""Losses of a model on samples, and the training loop's evaluator: the held-out sets scored every
`eval_interval` steps (and at the end) on their first `eval_steps` global batches.

`token_nll` and `evaluate` are also what `retro ppl` sums (eval/ppl.py)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..runtime import all_sum, autocast, dist, to_device, warn
from .job import TrainSettings
from .samples import collate


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


def eval_indices(num_samples: int, global_batch_size: int, steps: int, rank: int | None = None) -> list[int]:
    """This rank's (or `rank`'s) share of the first `steps` global batches of the validation samples (in
    order, not shuffled), so an evaluation sees the same samples whatever the number of processes."""
    D = dist()
    return list(range(D.rank if rank is None else rank, min(num_samples, steps * global_batch_size), D.world))


def evaluate_set(model: torch.nn.Module, data: Any, s: TrainSettings, device: torch.device) -> tuple[float, float]:
    """(NLL, target tokens) over all ranks of the first `eval_steps` global batches of one held-out set."""
    indices = eval_indices(len(data), s.global_batch_size, s.eval_steps)
    # every rank makes as many forward passes as the busiest one (shares differ by at most one sample): FSDP
    most = -(-len(eval_indices(len(data), s.global_batch_size, s.eval_steps, rank=0)) // s.micro_batch_size)
    nll, tokens = all_sum(evaluate(model, data, indices, s.micro_batch_size, device, s.precision, num_batches=most),
                          device)
    return nll, tokens


class Evaluator:
    """The loop's validation: the held-out sets by name (SFT: one per dataset; pretraining: one, unnamed), the
    empty ones left out (warned about when none is left)."""

    def __init__(self, valid: Any | None, s: TrainSettings, device: torch.device):
        sets = valid if isinstance(valid, dict) else {"": valid} if valid is not None else {}
        self.sets = {name: data for name, data in sets.items() if len(data) > 0}  # the same on every rank
        self.s, self.device = s, device
        if not self.sets:
            warn("no validation samples (corpus.valid_fraction = 0, or too few held-out tokens): no evaluation")

    def due(self, step: int) -> bool:
        return bool(self.sets) and (step % self.s.eval_interval == 0 or step == self.s.train_steps)

    def validate(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        """The metrics record of an evaluation at `step`: loss and perplexity over every set together (and per set
        where they are named)."""
        per_set = {name: evaluate_set(model, data, self.s, self.device) for name, data in self.sets.items()}
        nll_sum, n_tok = sum(v[0] for v in per_set.values()), sum(v[1] for v in per_set.values())
        eval_loss = nll_sum / max(n_tok, 1.0)
        record = {"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50)),
                  "eval_tokens": int(n_tok)}
        if len(per_set) > 1 or "" not in per_set:
            record["eval_loss_by_set"] = {name: v[0] / max(v[1], 1.0) for name, v in per_set.items()}
        return record
