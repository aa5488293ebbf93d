"""What a phase (`retro pretrain`, `retro sft`) hands the training loop (loop.py): the settings of its section and
the job (the model, the samples, the run folder, what to record beside the weights)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import TrainingConfig


@dataclass
class TrainSettings(TrainingConfig):
    """The loop's knobs: the keys [pretrain] and [sft] share (`TrainingConfig`, not listed again here), with
    train_steps resolved from train_tokens, and the workspace seed."""

    seed: int = 1234

    @classmethod
    def from_section(cls, section: TrainingConfig, seed: int, seq_length: int) -> "TrainSettings":
        """The settings of [pretrain] or [sft]; `train_tokens` > 0 becomes train_steps =
        ceil(train_tokens / (global_batch_size x seq_length))."""
        values = {f.name: getattr(section, f.name) for f in dataclasses.fields(TrainingConfig)}
        if section.train_tokens > 0:
            values["train_steps"] = -(-section.train_tokens // (section.global_batch_size * seq_length))
        return cls(**values, seed=seed)

    def recorded(self) -> dict[str, Any]:
        """As a checkpoint's meta.json records them (`train_settings`): train_tokens is in train_steps."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "train_tokens"}


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
