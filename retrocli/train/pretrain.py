"""`retro pretrain`: the Retro model trained on the database's training documents with their precomputed
neighbours (samples.py), through the shared loop (loop.py), with checkpoints in
`<workspace>/checkpoints/pretrain/step-NNNNNN/` (checkpoint.py).

`pretrain.init_from` starts from another checkpoint: a Retro one loads everything, a GPT one (retro_layers
= []) loads the decoder while the encoder and CCA weights start fresh and the optimizer starts empty
(retro-fitting, InstructRetro); with `pretrain.freeze_decoder` only those train, the decoder kept as loaded
(RETRO's own retrofitting). Resuming (pretrain.resume = "auto") takes precedence over init_from.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from ..config import Config, ModelConfig, retrieved_length, to_commented_toml
from ..db.database import Database, open_tokenizer, require_built, workspace_of
from ..errors import UserError
from ..model.retro import RetroModel, ffn_width, resolve_retro_layers
from ..runtime import log
from . import checkpoint
from .checkpoint import is_cca_or_encoder
from .checkpointer import find_resume
from .curriculum import CopyWindows
from .job import Job, TrainSettings
from .loop import train
from .metrics import require_tensorboard
from .samples import check_seq_length, open_samples

# decoder fields that must agree between a checkpoint and the model it is loaded into
DECODER_FIELDS = ("layers", "hidden", "heads", "ffn_hidden", "vocab_size", "position", "rotary_percent", "norm",
                  "mlp")




def resolve_model_config(cfg: Config, vocab_size: int) -> ModelConfig:
    """model.vocab_size 0 -> the tokenizer's; a smaller one than the tokenizer's is an error."""
    m = cfg.model
    if m.vocab_size == 0:
        return dataclasses.replace(m, vocab_size=vocab_size)
    if m.vocab_size < vocab_size:
        raise UserError(f"model.vocab_size ({m.vocab_size}) is smaller than the tokenizer's vocabulary "
                        f"({vocab_size}): set it to 0 to take the tokenizer's")
    return m


def check_fits_in_memory(m: ModelConfig) -> None:
    """Refuse a model whose weights alone outgrow this machine's memory, before building it: built tensor by
    tensor, it would fill the memory for minutes before failing, or wake the OOM killer. The count is a lower
    bound (decoder attention and MLP matrices, embeddings), so a model that fits is never refused."""
    d = m.hidden
    weights = m.layers * (4 * d * d + 2 * d * ffn_width(m)) + m.vocab_size * d
    weights += m.seq_length * d if m.position == "learned" else 0
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): building it will tell
        return
    if 4 * weights > memory:
        raise UserError(f"the model's weights alone take at least {4 * weights / 2**30:,.0f} GiB (model.layers "
                        f"{m.layers}, model.hidden {d}, model.ffn_hidden {ffn_width(m)}, vocabulary {m.vocab_size}, "
                        f"model.seq_length {m.seq_length}), "
                        f"more than this machine's {memory / 2**30:,.0f} GiB: use a smaller model")


def load_init(model: RetroModel, path: Path, tok_ref: dict[str, Any]) -> None:
    """Load a GPT or Retro checkpoint's weights for a new run; CCA/encoder weights it lacks start fresh."""
    path = checkpoint.in_folder(path, "pretrain.init_from")
    meta = checkpoint.read_meta(path)
    checkpoint.check_tokenizer(meta, tok_ref, path)
    theirs, ours = meta["model"], dataclasses.asdict(model.cfg)
    diffs = [f"model.{k}: checkpoint {theirs.get(k)!r}, config {ours[k]!r}" for k in DECODER_FIELDS
             if theirs.get(k) != ours[k]]
    if diffs:
        raise UserError(f"pretrain.init_from {path}: the decoder shapes differ (" + "; ".join(diffs) + ")")
    state = checkpoint.load_weights(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in list(missing) + list(unexpected) if not is_cca_or_encoder(k)]
    if bad:
        raise UserError(f"pretrain.init_from {path}: weights do not fit the model: {', '.join(bad[:8])}")
    kind = meta.get("kind", "retro")
    fresh = f"; {len(missing)} encoder/CCA tensors start fresh (retro-fitting)" if missing else ""
    log(f"initialised from the {kind} checkpoint {path} (weights only, no optimizer state){fresh}")


def freeze_decoder(model: RetroModel, cfg: Config, resuming: bool) -> None:
    """pretrain.freeze_decoder: only the encoder and CCA weights train (no gradients, no optimizer state for the
    rest), so whatever the run changes in the model's predictions, it changes through retrieval."""
    if not cfg.pretrain.init_from and not resuming:
        raise UserError("pretrain.freeze_decoder = true needs pretrain.init_from (the trained decoder to keep): "
                        "a frozen random decoder learns nothing")
    if not model.retro_layers:
        raise UserError("pretrain.freeze_decoder = true leaves nothing to train in a plain GPT (model.retro_layers "
                        "= []): give the model CCA layers")
    for name, p in model.named_parameters():
        p.requires_grad_(is_cca_or_encoder(name))


def build(cfg: Config) -> tuple[Job, TrainSettings, Path | None]:
    """Everything `retro pretrain` needs: the job for the loop, its settings, and the checkpoint to resume."""
    if cfg.pretrain.tensorboard:
        require_tensorboard("pretrain")  # before anything is loaded
    ws = workspace_of(cfg)
    require_built(ws, ("tokenizer", "chunks", "neighbours"), needed_by="`retro pretrain` needs the retrieval database")
    tok = open_tokenizer(ws)
    tok_ref = checkpoint.tokenizer_ref(ws)
    model_cfg = resolve_model_config(cfg, tok.vocab_size)
    m = cfg.db.chunk_length
    check_seq_length(model_cfg.seq_length, m)
    built_m = ws.require("chunks")["settings"]["chunk_length"]
    if built_m != m:
        raise UserError(f"the database in {ws.db} was chunked with chunk_length {built_m} but db.chunk_length "
                        f"is now {m}: use the value it was built with, or rebuild it")
    check_fits_in_memory(model_cfg)
    torch.manual_seed(cfg.workspace.seed)
    try:
        model = RetroModel(model_cfg, m, tok.pad_id)
    except (RuntimeError, MemoryError) as e:  # torch: "can't allocate memory", "Storage size calculation overflowed"
        if isinstance(e, RuntimeError) and "allocat" not in str(e) and "overflow" not in str(e):
            raise
        raise UserError(f"the model does not fit in memory: model.layers {model_cfg.layers}, model.hidden "
                        f"{model_cfg.hidden}, model.ffn_hidden {model_cfg.ffn_hidden}, vocabulary "
                        f"{model_cfg.vocab_size}, model.seq_length {model_cfg.seq_length} ({e})") from None
    retrieval = bool(resolve_retro_layers(model_cfg))
    settings = TrainSettings.from_section(cfg.pretrain, cfg.workspace.seed, model_cfg.seq_length)
    out = ws.run_dir(cfg.pretrain.run)
    resume_from = find_resume(out, settings, "pretrain")
    if resume_from is None and cfg.pretrain.init_from:
        load_init(model, cfg.resolve(cfg.pretrain.init_from), tok_ref)
    if cfg.pretrain.freeze_decoder:
        freeze_decoder(model, cfg, resuming=resume_from is not None)
    database = Database.open(ws, m)
    train_samples = open_samples(cfg, ws, "train", tok.pad_id, tok.eos_id, retrieval, database=database)
    valid_samples = open_samples(cfg, ws, "valid", tok.pad_id, tok.eos_id, retrieval, database=database)
    resolved = dataclasses.replace(cfg, model=model_cfg)
    meta = checkpoint.model_meta(model_cfg, m, tok.pad_id, tok_ref, model.retro_layers)
    meta["eos_id"] = tok.eos_id
    p, synthetic = cfg.pretrain, None
    if p.copy_warmup_steps or p.copy_share:
        synthetic = CopyWindows(model_cfg.seq_length, m, model_cfg.num_neighbors, retrieved_length(model_cfg, m),
                                model_cfg.vocab_size, {tok.pad_id, tok.eos_id},
                                p.copy_warmup_steps * settings.global_batch_size, p.copy_share, settings.seed,
                                neighbours=retrieval).at
        meta["copy_windows"] = {"warmup_steps": p.copy_warmup_steps, "share": p.copy_share}
    job = Job("pretrain", out, model, train_samples, valid_samples, meta,
              to_commented_toml(resolved, "# the resolved configuration of this checkpoint"), synthetic=synthetic)
    return job, settings, resume_from


def run(cfg: Config) -> dict[str, Any]:
    job, settings, resume_from = build(cfg)
    summary = train(settings, job, resume_from)
    summary["run_dir"] = str(job.run_dir)
    return summary
