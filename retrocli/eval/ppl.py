"""`retro ppl`: perplexity and bits per byte of a checkpoint on the validation documents, or on a text /
JSONL / JSON file whose neighbours are retrieved from the database on the fly.

The evaluated text is laid out as in pretraining (samples.py: each document + EOS, padded to chunks), cut
into consecutive windows of the model's seq_length, the last one padded, so every token after the first is
predicted exactly once (EOS included). perplexity = exp(total NLL / target tokens); bits per byte = total NLL
in nats / ln 2 / UTF-8 bytes of the evaluated text, which does not depend on the tokenizer. With
`retrieval=False` no neighbours are passed and the CCA contributes nothing (InstructRetro's ablation).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, CorpusConfig, retrieved_length
from ..data.corpus import CorpusStats, iter_documents
from ..db.database import Database, open_tokenizer, workspace_of
from ..db.store import chunk_spans
from ..errors import UserError
from ..model.retro import RetroModel
from ..runtime import all_sum, device_for_rank, dist, log, to_device
from ..train.checkpoint import load_model, resolve_checkpoint
from ..train.evaluator import evaluate, token_nll
from ..train.samples import Samples, StreamDocs, collate, open_samples
from ..workspace import Workspace, write_json_atomic


def _file_samples(cfg: Config, ws: Workspace, data: Path, tok, model_cfg, m: int, retrieval: bool,
                  pad_id: int, eos_id: int) -> tuple[Samples, int]:
    """Samples over the documents of a file, neighbours retrieved now; and the UTF-8 bytes of its text."""
    if not data.is_file():
        raise UserError(f"--data {data}: no such file")
    if not data.name.removesuffix(".gz").endswith((".txt", ".jsonl", ".json")):
        raise UserError(f"--data {data}: expected a .txt, .jsonl or .json file (optionally .gz)")
    corpus = CorpusConfig(text_key=cfg.corpus.text_key, on_bad_line="error")
    texts = [d.text for d in iter_documents(corpus, cfg.base_dir, [str(data.resolve())], CorpusStats())]
    docs = [ids for ids in tok.encode(texts) if ids]
    if not docs:
        raise UserError(f"--data {data}: no text to evaluate")
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    database = Database.open(ws, m, cfg=cfg)
    store = database.store
    table = None
    if retrieval:
        chunk_texts = [tok.decode(ids[s : s + n]) for ids in docs for s, n in chunk_spans(len(ids), m)]
        # dense, whatever db.query_mode says: the model was trained on the neighbours the dense index found
        table, _ = database.retriever().dense_search(chunk_texts, model_cfg.num_neighbors)
    samples = Samples(StreamDocs.from_token_lists(docs, m), store, table, model_cfg.seq_length, m,
                      model_cfg.num_neighbors, retrieved_length(model_cfg, m), pad_id, eos_id, drop_last=False)
    return samples, nbytes


def evaluation_samples(cfg: Config, ws: Workspace, model: RetroModel, meta: dict[str, Any], tok, retrieval: bool,
                       data: Path | None = None) -> tuple[Samples, int, str]:
    """What `retro ppl` scores: the samples of the validation documents (or of a file, its neighbours
    retrieved now), their UTF-8 bytes, and what they are. The checkpoint's model settings (seq_length, k, r)
    decide the samples, not the current TOML."""
    eos_id = meta.get("eos_id", tok.eos_id)
    if data is not None:
        samples, nbytes = _file_samples(cfg, ws, data, tok, model.cfg, meta["chunk_length"], retrieval, model.pad_id,
                                        eos_id)
        return samples, nbytes, str(data)
    mcfg = dataclasses.replace(cfg, model=model.cfg)
    samples = open_samples(mcfg, ws, "valid", model.pad_id, eos_id, retrieval, drop_last=False)
    if len(samples) == 0:
        raise UserError(f"the workspace has no validation documents (corpus.valid_fraction = "
                        f"{cfg.corpus.valid_fraction} when built): pass --data FILE")
    lengths = samples.docs.lengths
    nbytes = sum(len(tok.decode(samples.docs.tokens_of(d, 0, int(lengths[d])).tolist()).encode("utf-8"))
                 for d in range(len(lengths)))
    return samples, nbytes, "validation documents"


def run(cfg: Config, checkpoint_path: Path | None = None, retrieval: bool = True,
        data: Path | None = None) -> dict[str, Any]:
    ws = workspace_of(cfg)
    for stage in ("tokenizer", "chunks"):
        if (ws.read_meta(stage) or {}).get("complete") is not True:
            raise UserError(f"`retro ppl` needs the retrieval database, but its '{stage}' stage is not complete in "
                            f"{ws.db}: run `retro db build` and `retro pretrain` first")
    path = resolve_checkpoint(ws, checkpoint_path, cfg.pretrain.run)
    model, meta = load_model(ws, path, cfg.model)
    m = meta["chunk_length"]
    if m != cfg.db.chunk_length or ws.require("chunks")["settings"]["chunk_length"] != m:
        raise UserError(f"checkpoint {path} was trained with chunk_length {m}, the database in {ws.db} has "
                        f"{ws.require('chunks')['settings']['chunk_length']}")
    tok = open_tokenizer(ws)
    model_cfg = model.cfg
    use_retrieval = retrieval and bool(model.retro_layers)
    started = time.time()
    samples, nbytes, what = evaluation_samples(cfg, ws, model, meta, tok, use_retrieval, data)
    D = dist()
    device = device_for_rank()
    model.to(device)
    indices = list(range(D.rank, len(samples), D.world))
    nll, tokens = all_sum(evaluate(model, samples, indices, cfg.pretrain.micro_batch_size, device,
                                   cfg.pretrain.precision, retrieval=use_retrieval), device)
    tokens = max(tokens, 1.0)
    result = {"perplexity": math.exp(min(nll / tokens, 700.0)), "bits_per_byte": nll / math.log(2) / max(nbytes, 1),
              "tokens": int(tokens), "retrieval": use_retrieval, "checkpoint": str(path), "nll": nll,
              "bytes": nbytes, "data": what, "seq_length": model_cfg.seq_length, "step": meta.get("step"),
              "seconds": round(time.time() - started, 2)}
    mode = "retrieval" if use_retrieval else "no-retrieval"
    name = f"{path.parent.name}-{path.name}-{'valid' if data is None else Path(data).name}-{mode}"  # run-step-...
    result["json_path"] = str(ws.ppl_result(name))
    if D.main:
        write_json_atomic(Path(result["json_path"]), result)
        if retrieval and not model.retro_layers:
            log(f"checkpoint {path} is a plain GPT (no CCA layers): evaluated without retrieval")
    return result


# ------------------------------------------------------------------------------------ paired per token
# Two runs that share every token still differ by 1-2% in perplexity when they train different weights, so
# a small retrieval effect needs a paired measurement: every model scores the same target tokens, and the
# difference of their per-token losses has a standard error.


@torch.no_grad()
def token_losses(model: RetroModel, samples: Samples, retrieval: bool, device: torch.device | None = None,
                 batch: int = 16) -> np.ndarray:
    """The loss (nats) of every target token of `samples`, in order, padding dropped: the terms `run` sums."""
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval().to(device)
    out = []
    for start in range(0, len(samples), batch):
        b = to_device(collate([samples.get(i) for i in range(start, min(start + batch, len(samples)))]), device)
        out.append(token_nll(model, b, retrieval)[b["loss_mask"].bool()].double().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


def checkpoint_token_losses(cfg: Config, ws: Workspace, tok, path: Path, retrieval: bool = True,
                            data: Path | None = None) -> tuple[np.ndarray, bool]:
    """The per-token losses of checkpoint `path` on what `retro ppl` scores (the validation documents, or
    `data`), and whether retrieval was used (never for a plain GPT)."""
    model, meta = load_model(ws, path, cfg.model)
    retrieval = retrieval and bool(model.retro_layers)
    samples = evaluation_samples(cfg, ws, model, meta, tok, retrieval, data)[0]
    return token_losses(model, samples, retrieval, device_for_rank()), retrieval


def paired_difference(losses: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """losses - reference, token by token: the mean difference in nats per token, its standard error, and the
    perplexity ratio exp(mean). Both must score the same tokens (the same seq_length and data)."""
    if len(losses) != len(reference):
        raise UserError(f"paired losses need the same tokens: {len(losses):,} scored against {len(reference):,} "
                        "(checkpoints of another seq_length?)")
    diff = np.asarray(losses, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    mean = float(diff.mean())
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"diff": mean, "se": se, "ratio": math.exp(mean)}
