"""`retro sft`: instruction tuning on a blend of QA and chat data."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from . import ConfigOpt, SetOpt, run_training


def sft(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Instruction-tune a pretrained checkpoint on the weighted blend of `[[sft.blend]]` datasets ([sft] keys).

    Formats: squad (SQuAD JSON), qed / nq (JSONL), instructretro (JSON list with ctxs), chat (Human /
    Assistant text, or messages), self_instruct, qa. The prompt is InstructRetro's, or the chat template of a
    Hugging Face tokenizer that has one (`sft.chat_template`). The loss covers the answer and its
    end-of-sequence token only; contexts are cut to fit the sequence, answers never. Starts from
    `sft.init_from`, else the latest pretraining checkpoint; checkpoints go to WORKSPACE/checkpoints/sft/ and a
    rerun resumes.
    `sft.neighbors`: "none" (encoder gated off, as InstructRetro), "context" or "database".

    **Examples**

    ```
    retro sft -c my-ws/retro.toml
    retro sft -c my-ws/retro.toml --set sft.neighbors=context --set sft.train_steps=200
    ```"""
    from ..train import sft as sft_mod

    run_training("sft", sft_mod.run, config, set_)
