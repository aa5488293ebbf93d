"""`retro export`: a trained Retro handed back to the Hugging Face world.

The decoder becomes a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads (the family its
computation is: the one it was imported from; GPT-NeoX for a model of retro's own default shape), with the
workspace's tokenizer (a SentencePiece model written as a Hugging Face tokenizer with the same ids) and a
README card. InstructRetro's finding is that this decoder alone,
the encoder gated off, is a strong GPT. The encoder and CCA go beside it (retro.safetensors, retro_config.json),
so that `pretrain.init_from` or `sft.init_from` = the folder brings the whole Retro back.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..data.tokenizer import hf_tokenizer_files, write_hf_tokenizer
from ..db.database import tokenizer_source, workspace_of
from ..errors import UserError
from . import checkpoint, hf

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def tokenizer_files(ws, scratch: Path) -> list[Path]:
    """The workspace tokenizer's files, to travel with the model: a Hugging Face tokenizer's folder files, or a
    SentencePiece model written as one into `scratch` (the same ids for every text)."""
    meta = ws.require("tokenizer")
    source = tokenizer_source(ws, meta["settings"])
    if meta["settings"]["type"] != "hf":
        return write_hf_tokenizer(source, scratch)
    folder = source if source.is_dir() else source.parent
    names = hf_tokenizer_files(folder)
    extra = [folder / "generation_config.json"] if (folder / "generation_config.json").is_file() else []
    return names + extra


def card(meta: dict[str, Any], family: str, path: Path, dtype: str) -> str:
    """README.md of the exported folder: what it is, how it was trained, how to load it."""
    cfg = checkpoint.model_config_of(meta)
    lines = ["---", "library_name: transformers", "tags: [retro, retrieval, text-generation]", "---", "",
             f"# {path.parent.parent.name} / {path.name} (exported by retro)", "",
             f"The decoder of a Retro (RETRO, Borgeaud et al. 2022; InstructRetro, Wang et al. 2023) as a "
             f"{family} causal LM: {cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads, vocabulary "
             f"{cfg.vocab_size}, weights in {dtype}. With the encoder gated off, as here, it is a plain GPT.", "",
             "## How it was trained", ""]
    base = (meta.get("hf") or {}).get("path")
    lines.append(f"- started from: {base} ({meta['hf']['family']})" if base else "- started from: random weights")
    kind = "instruction-tuned (retro sft)" if "sft" in meta else "pretrained (retro pretrain)"
    settings = meta.get("train_settings") or {}
    lines.append(f"- {kind}: step {meta.get('step')}, global batch {settings.get('global_batch_size', '?')} x "
                 f"{cfg.seq_length} tokens, lr {settings.get('lr', '?')}")
    if "sft" in meta:
        lines.append(f"- SFT from {meta['sft'].get('init_from')}, neighbours: {meta['sft'].get('neighbors')}")
    lines.append(f"- retrieval: chunks of {meta['chunk_length']} tokens, {cfg.num_neighbors} neighbours per chunk, "
                 f"CCA in layers {meta.get('retro_layers')}")
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(PATH)", "tokenizer = AutoTokenizer.from_pretrained(PATH)",
              "```", "",
              f"The Retro's encoder and chunked cross-attention are in `{hf.RETRO_WEIGHTS}` with `{hf.RETRO_CONFIG}`; "
              "`retro` loads the whole Retro back with `pretrain.init_from` (or `sft.init_from`, `generate "
              "--checkpoint`) set to this folder.", ""]
    return "\n".join(lines)


def run(cfg: Config, given: Path | None, out: Path, dtype: str = "fp32") -> dict[str, Any]:
    """Export the checkpoint `given` (a step or run folder; default: generate's, checkpoint.latest_trained) to
    `out`."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    ws = workspace_of(cfg)
    path = checkpoint.latest_trained(cfg, ws, given)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder: give a new folder for the exported model")
    model, meta = checkpoint.load_model(ws, path, cfg.model)
    family = hf.family_for(model.cfg)
    model.to(DTYPES[dtype])
    with tempfile.TemporaryDirectory() as scratch:
        written = hf.export(model, out, family, meta.get("eos_id", model.pad_id), model.pad_id, model.chunk_length,
                            tokenizer_files(ws, Path(scratch)), card(meta, family, path, dtype),
                            {"checkpoint": str(path), "step": meta.get("step"), "dtype": dtype})
    return {"checkpoint": str(path), "out": str(out), "family": family, "files": written, "dtype": dtype}
