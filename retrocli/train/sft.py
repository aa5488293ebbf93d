"""`retro sft`: instruction tuning of a pretrained Retro (or GPT) checkpoint on a weighted blend of instruction
and QA datasets, with the pretraining loop (loop.py): the same optimizer, schedule, checkpoints, resume,
torchrun and bf16, checkpoints in `<workspace>/checkpoints/sft/`.

    [[sft.blend]] files --qa.read_records--> records --split_records--> train / held-out, per dataset
      --Blend.draw(train_steps x global_batch_size)--> the training order (records too long to fit dropped)
      --qa.encode_sample--> [prompt][answer][EOS][pad], loss on the answer and EOS only; the prompt is written
                            by a Hugging Face tokenizer's chat template when it has one (sft.chat_template), else
                            as InstructRetro's
      --neighbours (sft.neighbors)--> none (encoder gated off, InstructRetro's choice) | the sample's own
                                      contexts | the database's nearest chunks of each of its chunks

The model comes from `sft.init_from`, else the latest complete checkpoint of the pretraining run; its own
configuration (seq_length, k, r) decides the samples, not the current [model] section.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, to_commented_toml
from ..data.corpus import data_file
from ..data.qa import (
    Blend,
    ChatPrompt,
    Prompt,
    Record,
    context_neighbours,
    encode_sample,
    load_blend,
    split_records,
    template_of,
)
from ..db.database import Database, Retriever, open_tokenizer, workspace_of
from ..db.store import ChunkStore
from ..errors import UserError
from ..model.retro import RetroModel
from ..runtime import console, dist, log
from . import checkpoint
from .checkpoint import is_cca_or_encoder
from .checkpointer import find_resume
from .job import Job, TrainSettings
from .loop import train
from .metrics import require_tensorboard

EVAL_RECORDS_PER_SET = 256  # held-out records evaluated per dataset (the first ones, in file order)


class Neighbours:
    """The (l, k, r) neighbour tokens of one SFT sample, by `sft.neighbors`:

    "context": the sample's own contexts (as they appear in the prompt), each cut to r tokens, the same k
    for every chunk; "database": for each chunk of the sample, its k nearest database chunks with their
    continuations (as in pretraining). Missing neighbours are padding, which the model masks out."""

    def __init__(self, mode: str, model: RetroModel, tok, retriever: Retriever | None = None,
                 store: ChunkStore | None = None):
        self.mode, self.tok, self.retriever, self.store = mode, tok, retriever, store
        self.m, self.k, self.r = model.chunk_length, model.cfg.num_neighbors, model.retrieved_length
        self.l, self.pad_id = -(-model.cfg.seq_length // self.m), model.pad_id

    def __call__(self, tokens: np.ndarray, contexts: list[dict]) -> np.ndarray:
        out = np.full((self.l, self.k, self.r), self.pad_id, dtype=np.int64)
        if self.mode == "context":
            out[:] = context_neighbours(self.tok, contexts, self.k, self.r, self.pad_id)
        else:
            chunks = [tokens[j * self.m : (j + 1) * self.m] for j in range(self.l)]
            real = [j for j, c in enumerate(chunks) if (c != self.pad_id).any()]
            found, _ = self.retriever.neighbours(self.tok, [chunks[j].tolist() for j in real], self.k, self.r,
                                                 self.pad_id)
            out[real] = found
        return out


class SFTSamples:
    """len() and get(i) like pretraining's Samples: sample i is records[i] as a prompt + answer sample."""

    def __init__(self, records: list[Record], template: Prompt, tok, seq_length: int, num_contexts: int,
                 neighbours: Neighbours | None):
        self.records, self.template, self.tok = records, template, tok
        self.seq_length, self.num_contexts, self.neighbours = seq_length, num_contexts, neighbours

    def __len__(self) -> int:
        return len(self.records)

    def get(self, i: int) -> dict[str, np.ndarray]:
        sample, _ = encode_sample(self.records[i], self.template, self.tok, self.seq_length, self.num_contexts)
        assert sample is not None, "records that do not fit are dropped when the samples are built"
        contexts = sample.pop("contexts")
        sample["docs"] = np.full(1, -1, dtype=np.int64)
        if self.neighbours is not None:
            sample["neighbours"] = self.neighbours(sample["tokens"], contexts)
        return sample


def fitting(records: list[Record], template: Prompt, tok, seq_length: int,
            num_contexts: int) -> tuple[list[bool], dict[str, int]]:
    """Which records fit seq_length (their answer is never cut), and the totals of what was cut."""
    totals = {"context_tokens_cut": 0, "contexts_dropped": 0, "skipped_too_long": 0}
    fits = []
    for record in records:
        sample, stats = encode_sample(record, template, tok, seq_length, num_contexts)
        fits.append(sample is not None)
        for key in totals:
            totals[key] += stats[key]
    return fits, totals


def load_model(cfg: Config, ws) -> tuple[RetroModel, dict[str, Any], Path]:
    """The checkpoint to fine-tune (sft.init_from, else the latest pretraining checkpoint) as a model."""
    given = cfg.resolve(cfg.sft.init_from) if cfg.sft.init_from else None
    path = checkpoint.resolve_checkpoint(ws, given, cfg.pretrain.run, what="sft.init_from")
    model, meta = checkpoint.load_model(ws, path, cfg.model)
    return model.train(), meta, path


def build(cfg: Config) -> tuple[Job, TrainSettings, Path | None, list[dict[str, Any]]]:
    """The job for the loop, its settings, the checkpoint to resume, and the blend table to print."""
    s = cfg.sft
    if s.tensorboard:
        require_tensorboard("sft")  # before anything is loaded
    if not s.blend:
        raise UserError(f"[sft] in {cfg.source} has no datasets: add [[sft.blend]] tables with name, path, "
                        f"format and weight")
    ws = workspace_of(cfg)
    tok = open_tokenizer(ws)
    tok_ref = checkpoint.tokenizer_ref(ws)
    torch.manual_seed(cfg.workspace.seed)
    model, meta, init_path = load_model(cfg, ws)
    if s.neighbors != "none" and not model.retro_layers:
        raise UserError(f"sft.neighbors = {s.neighbors!r} needs a Retro checkpoint, but {init_path} is a plain GPT: "
                        f"set sft.neighbors = \"none\"")
    if s.neighbors == "none":  # InstructRetro: the encoder is gated off during SFT, its weights kept as they are
        model.cca_gate_off = True
        for name, p in model.named_parameters():
            if is_cca_or_encoder(name):
                p.requires_grad_(False)  # unused: no optimizer state, and DDP does not wait for their gradients
    seq = model.cfg.seq_length
    settings = TrainSettings.from_section(s, cfg.workspace.seed, seq)

    entries = [dataclasses.replace(e, path=str(data_file(e.path, cfg.base_dir, ws.root))) for e in s.blend]
    for e in entries:
        if not Path(e.path).is_file():
            raise UserError(f"sft.blend {e.name!r}: no such file {e.path} (paths are relative to {cfg.source})")
    full, counts = load_blend(entries, s.on_bad_record)
    splits = [split_records(recs, s.valid_fraction, cfg.workspace.seed) for recs in full.records]
    blend = Blend(entries, [train_recs or recs for (train_recs, _), recs in zip(splits, full.records)])
    template = template_of(s, tok)
    if isinstance(template, ChatPrompt):
        log("prompts written by the tokenizer's chat template (sft.chat_template = \"never\": InstructRetro's)")
    draws = blend.draw(settings.train_steps * s.global_batch_size, cfg.workspace.seed)
    order = [blend.records[d][r] for d, r in draws.tolist()]
    unique = {id(rec): rec for rec in order}
    fits, cut = fitting(list(unique.values()), template, tok, seq, s.num_contexts)
    fit_ids = {key for key, ok in zip(unique, fits) if ok}
    train_records = [rec for rec in order if id(rec) in fit_ids]
    if not train_records:
        raise UserError(f"no SFT record fits model.seq_length {seq} (the question and answer alone are longer)")

    retriever = store = None
    if s.neighbors == "database":
        database = Database.open(cfg, model.chunk_length)
        store, retriever = database.store, database.retriever()
    neighbours = Neighbours(s.neighbors, model, tok, retriever, store) if s.neighbors != "none" else None
    valid = {}
    for entry, (_, held_out) in zip(entries, splits):
        held = held_out[:EVAL_RECORDS_PER_SET]
        ok, _ = fitting(held, template, tok, seq, s.num_contexts)
        held = [rec for rec, f in zip(held, ok) if f]
        if held:
            valid[entry.name] = SFTSamples(held, template, tok, seq, s.num_contexts, neighbours)

    table = blend.table(len(draws))
    for row, (_, held_out) in zip(table, splits):
        row.update(held_out=len(held_out), **counts[row["name"]])  # answered, bad_records, unanswerable
    table.append({"name": "(all)", "too_long_dropped": len(order) - len(train_records), **cut})
    train_samples = SFTSamples(train_records, template, tok, seq, s.num_contexts, neighbours)
    job_meta = {**checkpoint.model_meta(model.cfg, model.chunk_length, model.pad_id, tok_ref, model.retro_layers),
                "eos_id": tok.eos_id, "sft": {"init_from": str(init_path), "neighbors": s.neighbors}}
    resolved = dataclasses.replace(cfg, model=model.cfg)
    out = ws.run_dir(s.run)
    job = Job("sft", out, model, train_samples, valid or None, job_meta,
              to_commented_toml(resolved, "# the resolved configuration of this checkpoint"), {"blend": table})
    resume_from = find_resume(out, settings, "sft")
    if resume_from is None:
        log(f"fine-tuning {init_path} ({meta.get('kind', 'retro')}, step {meta.get('step')})")
    return job, settings, resume_from, table


def print_blend_table(rows: list[dict[str, Any]]) -> None:
    """InstructRetro's blend table: per dataset its records, probability, samples and epochs, and what was left
    out (malformed records skipped, questions without a short answer); then what the sequence length cost
    (records dropped as too long, context tokens cut)."""
    from rich.table import Table

    if not dist().main:
        return
    table = Table(title="SFT blend")
    for col in ("dataset", "format", "train records", "held out", "bad records", "no answer", "probability",
                "samples", "epochs"):
        table.add_column(col, justify="left" if col in ("dataset", "format") else "right")
    for r in rows[:-1]:
        table.add_row(r["name"], r["format"], f"{r['records']:,}", f"{r['held_out']:,}", f"{r['bad_records']:,}",
                      f"{r['unanswerable']:,}", f"{r['probability']:.3f}", f"{r['expected_samples']:,.0f}",
                      f"{r['epochs']:.2f}")
    console.print(table)
    for r in rows[:-1]:
        if r["unanswerable"]:
            console.print(f"{r['name']}: {r['answered'] + r['unanswerable']:,} questions, {r['unanswerable']:,} "
                          f"without a short answer left out")
    last = rows[-1]
    console.print(f"{last['too_long_dropped']:,} drawn samples dropped (question + answer longer than the sequence); "
                  f"{last['context_tokens_cut']:,} context tokens cut, {last['contexts_dropped']:,} contexts dropped "
                  f"to fit (answers are never cut)")


def run(cfg: Config) -> dict[str, Any]:
    job, settings, resume_from, table = build(cfg)
    print_blend_table(table)
    summary = train(settings, job, resume_from)
    summary["run_dir"] = str(job.run_dir)
    return summary
