"""`retro pretrain`: the Retro model trained on the database's training documents with their precomputed
neighbours (samples.py), through the shared loop (loop.py), with checkpoints in
`<workspace>/checkpoints/pretrain/step-NNNNNN/` (checkpoint.py).

`pretrain.init_from` starts from another checkpoint: a Retro one loads everything, a GPT one (retro_layers
= []) loads the decoder while the encoder and CCA weights start fresh and the optimizer starts empty
(retro-fitting, InstructRetro); with `pretrain.freeze_decoder` only those train, the decoder kept as loaded
(RETRO's own retrofitting). A Hugging Face model folder (hf.py) is a GPT of that kind whose config.json
decides the decoder's [model] keys. New CCA layers start with their output zeroed, so that the Retro computes
exactly the logits of the model it starts from until it has trained. Resuming (pretrain.resume = "auto") takes
precedence over init_from.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import Config, ModelConfig, retrieved_length, to_commented_toml, validate
from ..db.database import Database, open_tokenizer, require_built, workspace_of
from ..errors import UserError
from ..model.retro import RetroModel, ffn_width, resolve_retro_layers
from ..runtime import log
from . import checkpoint, hf
from .checkpoint import is_cca_or_encoder
from .checkpointer import find_resume
from .curriculum import CopyWindows
from .job import Job, TrainSettings
from .loop import train
from .metrics import require_tensorboard
from .samples import check_seq_length, open_samples

# the [model] keys that are not the decoder's shape: every other one must agree between a checkpoint and the model
# it is loaded into
NOT_DECODER_FIELDS = ("seq_length", "dropout", "retro_layers", "encoder_layers", "num_neighbors", "retrieved_length")
DECODER_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in NOT_DECODER_FIELDS)




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


def new_model(model_cfg: ModelConfig, m: int, pad_id: int) -> RetroModel:
    """A model of random weights, refused before it is built when its weights alone outgrow the memory."""
    check_fits_in_memory(model_cfg)
    try:
        return RetroModel(model_cfg, m, pad_id)
    except (RuntimeError, MemoryError) as e:  # torch: "can't allocate memory", "Storage size calculation overflowed"
        if isinstance(e, RuntimeError) and "allocat" not in str(e) and "overflow" not in str(e):
            raise
        raise UserError(f"the model does not fit in memory: model.layers {model_cfg.layers}, model.hidden "
                        f"{model_cfg.hidden}, model.ffn_hidden {model_cfg.ffn_hidden}, vocabulary "
                        f"{model_cfg.vocab_size}, model.seq_length {model_cfg.seq_length} ({e})") from None


def load_init(model: RetroModel, path: Path, tok_ref: dict[str, Any]) -> None:
    """Load a GPT or Retro checkpoint's weights for a new run; CCA/encoder weights it lacks start fresh."""
    path = checkpoint.in_folder(path, "pretrain.init_from")
    meta = checkpoint.read_meta(path)
    checkpoint.check_tokenizer(meta, tok_ref, path)
    theirs, ours = dataclasses.asdict(checkpoint.model_config_of(meta)), dataclasses.asdict(model.cfg)
    diffs = [f"model.{k}: checkpoint {theirs.get(k)!r}, config {ours[k]!r}" for k in DECODER_FIELDS
             if theirs.get(k) != ours[k]]
    if diffs:
        raise UserError(f"pretrain.init_from {path}: the decoder shapes differ (" + "; ".join(diffs) + ")")
    state = checkpoint.load_weights(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in list(missing) + list(unexpected) if not is_cca_or_encoder(k)]
    if bad:
        raise UserError(f"pretrain.init_from {path}: weights do not fit the model: {', '.join(bad[:8])}")
    if missing:
        model.zero_retrieval_output()
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


def given_keys(cfg: Config, section: str = "model") -> frozenset[str]:
    """The keys of a section that the workspace TOML or --set gives (the others are defaults)."""
    return frozenset(k.split(".", 1)[1] for k in cfg.origins if k.startswith(f"{section}."))


def imported_model(cfg: Config, ws, path: Path, resuming: bool, m: int) -> tuple[RetroModel, dict[str, Any]]:
    """The Retro on a Hugging Face folder's decoder (weights loaded unless the run resumes), with the dtypes
    training keeps: trainable parameters in fp32 (AdamW's master weights); a frozen decoder in its own dtype
    (bf16: half the memory) where precision = "bf16" without FSDP, else in fp32."""
    p = cfg.pretrain
    model, meta = checkpoint.hf_model(ws, path, cfg.model, given_keys(cfg), chunk_length=m, weights=not resuming,
                                      check=lambda c: validate(dataclasses.replace(cfg, model=c)))
    keep = p.freeze_decoder and p.precision == "bf16" and not p.fsdp
    for name, param in model.named_parameters():
        if param.dtype != torch.float32 and not (keep and not is_cca_or_encoder(name)):
            param.data = param.data.float()
    if keep:  # layers that mix a bf16 decoder with fp32 CCA weights take torch's unfused norm: as exact
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    if not resuming:
        log(f"initialised from the {meta['hf']['family']} model in {path} ({meta['hf']['family']} decoder, "
            f"{len(model.retro_layers)} new CCA layers and the encoder, their output zeroed: the Retro computes the "
            f"model's own logits until it has trained)")
    return model, meta


def build(cfg: Config) -> tuple[Job, TrainSettings, Path | None]:
    """Everything `retro pretrain` needs: the job for the loop, its settings, and the checkpoint to resume."""
    if cfg.pretrain.tensorboard:
        require_tensorboard("pretrain")  # before anything is loaded
    ws = workspace_of(cfg)
    require_built(ws, ("tokenizer", "chunks", "neighbours"), needed_by="`retro pretrain` needs the retrieval database")
    tok = open_tokenizer(ws)
    tok_ref = checkpoint.tokenizer_ref(ws)
    m = cfg.db.chunk_length
    built_m = ws.require("chunks")["settings"]["chunk_length"]
    if built_m != m:
        raise UserError(f"the database in {ws.db} was chunked with chunk_length {built_m} but db.chunk_length "
                        f"is now {m}: use the value it was built with, or rebuild it")
    settings = TrainSettings.from_section(cfg.pretrain, cfg.workspace.seed, cfg.model.seq_length)
    out = ws.run_dir(cfg.pretrain.run)
    resume_from = find_resume(out, settings, "pretrain")
    init = cfg.resolve(cfg.pretrain.init_from) if cfg.pretrain.init_from else None
    torch.manual_seed(cfg.workspace.seed)
    imported: dict[str, Any] = {}
    if init is not None and hf.is_hf_folder(init):
        model, imported = imported_model(cfg, ws, init, resume_from is not None, m)
        model_cfg = model.cfg
        check_seq_length(model_cfg.seq_length, m)
    else:
        model_cfg = resolve_model_config(cfg, tok.vocab_size)
        check_seq_length(model_cfg.seq_length, m)
        model = new_model(model_cfg, m, tok.pad_id)
        if resume_from is None and init is not None:
            load_init(model, init, tok_ref)
    retrieval = bool(resolve_retro_layers(model_cfg))
    if cfg.pretrain.freeze_decoder:
        freeze_decoder(model, cfg, resuming=resume_from is not None)
    database = Database.open(ws, m)
    train_samples = open_samples(cfg, ws, "train", tok.pad_id, tok.eos_id, retrieval, database=database)
    valid_samples = open_samples(cfg, ws, "valid", tok.pad_id, tok.eos_id, retrieval, database=database)
    resolved = dataclasses.replace(cfg, model=model_cfg)
    meta = checkpoint.model_meta(model_cfg, m, tok.pad_id, tok_ref, model.retro_layers)
    meta["eos_id"] = tok.eos_id
    if imported:
        meta["hf"] = imported["hf"]
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
