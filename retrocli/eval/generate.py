"""`retro generate`: answers for a QA / instruction file (or free prompts), retrieving as it writes.

    task file --read_records--> questions --contexts (file | database | none)--> prompts: the SFT template,
      contexts cut so that max_new_tokens still fit in the model's sequence
      --batches of generate.batch_size--> prefill: each prompt once through the model, the neighbours of
      its complete chunks retrieved, keys and values kept (model.DecodeCache), rows left-padded together
      --step--> one token per row from the cache; when a row's text completes a chunk, that chunk's
      neighbours are retrieved and encoded (live retrieval, as RETRO samples) for the next m positions
      --> one JSON line per question: prediction, gold answers, the contexts and neighbour chunks used

`generate.cache = false` recomputes the whole sequence for every token instead (the old tools' way; the
same tokens, for comparison). Under torchrun each rank answers every world-th question and rank 0 merges
the answers in input order. Finished batches go to a partial file beside the output at once, so a killed
run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection

import numpy as np
import torch

from ..config import Config
from ..data.corpus import data_file
from ..data.qa import ChatPrompt, Record, context_neighbours, detect_format, fit_prompt, read_records, template_of
from ..db.database import Database, Retriever, describe_hits, open_tokenizer, workspace_of
from ..db.store import ChunkStore
from ..errors import UserError
from ..model.decode import DecodeCache
from ..model.retro import RetroModel
from ..runtime import autocast, device_for_rank, dist, fault_point, log, progress, set_kept_note
from ..train import checkpoint
from ..workspace import Workspace, hash_obj, write_text_atomic

# rows, chunks (token lists) -> neighbour tokens (n, k, r) and their database chunk ids (n, k), -1: none
NeighbourFn = Callable[[list[int], list[list[int]]], tuple[np.ndarray, np.ndarray]]


# ------------------------------------------------------------------------------------------------ decoding


@dataclass
class Decoding:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


@dataclass
class Answer:
    tokens: list[int]  # generated, without the EOS
    stopped: str  # "eos", "stop" (a stop string), "length" (max_new_tokens)
    neighbour_ids: list[list[int]]  # database chunk ids retrieved for each complete chunk of prompt + answer
    text: str | None = None  # the tokens as text, cut before a stop string (when `decode` was given)


def pick_next(logits: torch.Tensor, d: Decoding, generators: list[torch.Generator]) -> torch.Tensor:
    """logits (b, v) -> next tokens (b,): argmax when greedy, else a sample after temperature, top-k and
    top-p, drawn with each row's own generator (so a row's tokens do not depend on its batch)."""
    if d.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / d.temperature
    if 0 < d.top_k < logits.shape[-1]:
        kth = logits.topk(d.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if d.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # probability mass ranked above each token
        sorted_p = sorted_p.masked_fill(before >= d.top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    probs = probs.cpu()
    return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)]).to(
        logits.device)


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


class Rows:
    """The rows of one `generate` call: each prompt with the tokens written after it, why it stopped, and the
    neighbours retrieved for its complete chunks."""

    def __init__(self, model: RetroModel, prompts: list[list[int]], neighbours_of: NeighbourFn | None):
        self.m, self.k, self.r = model.chunk_length, model.cfg.num_neighbors, model.retrieved_length
        self.pad = model.pad_id
        self.neighbours_of = neighbours_of
        self.retrieval = neighbours_of is not None and bool(model.retro_layers) and not model.cca_gate_off
        self.b = len(prompts)
        self.seqs = [list(p) for p in prompts]  # prompt + generated
        self.out: list[list[int]] = [[] for _ in range(self.b)]  # generated
        self.stopped: list[str | None] = [None] * self.b
        self.chunk_nbrs: list[list[np.ndarray]] = [[] for _ in range(self.b)]  # (k, r) per complete chunk
        self.chunk_ids: list[list[list[int]]] = [[] for _ in range(self.b)]

    def retrieve(self, rows: list[int]) -> None:
        """Neighbours for every chunk of these rows that is complete and not yet retrieved for."""
        m = self.m
        wanted = [(i, c) for i in rows for c in range(len(self.chunk_nbrs[i]), len(self.seqs[i]) // m)]
        if not self.retrieval or not wanted:
            return
        toks, ids = self.neighbours_of([i for i, _ in wanted], [self.seqs[i][c * m : (c + 1) * m] for i, c in wanted])
        for (i, _), t, row_ids in zip(wanted, toks, ids):
            self.chunk_nbrs[i].append(t)
            self.chunk_ids[i].append([int(x) for x in row_ids])

    def neighbours(self, i: int, length: int) -> np.ndarray:
        """(ceil(length / m), k, r): row i's retrieved chunks, padding after them."""
        out = np.full((-(-length // self.m), self.k, self.r), self.pad, dtype=np.int64)
        if self.chunk_nbrs[i]:
            out[: len(self.chunk_nbrs[i])] = np.stack(self.chunk_nbrs[i])[: len(out)]
        return out

    def step_neighbours(self, live: list[int]) -> np.ndarray:
        """(b, k, r): the rows whose new token completed a chunk get its neighbours; the rest are not read."""
        step_nbrs = np.full((self.b, self.k, self.r), self.pad, dtype=np.int64)
        for i in live:
            if len(self.seqs[i]) % self.m == 0:
                step_nbrs[i] = self.chunk_nbrs[i][len(self.seqs[i]) // self.m - 1]
        return step_nbrs

    def append(self, nxt: list[int], eos_ids: Collection[int], d: Decoding,
               decode: Callable[[list[int]], str] | None) -> list[int]:
        """Add each row's next token (any of the EOS ids and a stop string end a row); the rows still writing."""
        for i, tok in enumerate(nxt):
            if self.stopped[i] is not None:
                continue
            if tok in eos_ids:
                self.stopped[i] = "eos"
                continue
            self.out[i].append(tok)
            self.seqs[i].append(tok)
            if d.stop:
                cut = _stop_at(decode(self.out[i]), d.stop)
                if cut is not None:
                    self.stopped[i] = "stop"
        return [i for i in range(self.b) if self.stopped[i] is None]

    def answers(self, d: Decoding, decode: Callable[[list[int]], str] | None) -> list[Answer]:
        answers = []
        for i in range(self.b):
            text = None
            if decode is not None:
                text = decode(self.out[i])
                text = text[: _stop_at(text, d.stop)] if self.stopped[i] == "stop" else text
            answers.append(Answer(self.out[i], self.stopped[i] or "length", self.chunk_ids[i], text))
        return answers


def full_logits(model: RetroModel, rows: Rows, device: torch.device) -> torch.Tensor:
    """Uncached: the whole sequences (right-padded) through the model, the logits at each row's end."""
    b = rows.b
    lengths = [len(s) for s in rows.seqs]
    n = max(lengths)
    tokens = torch.full((b, n), rows.pad, dtype=torch.long)
    for i, s in enumerate(rows.seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    nbrs = torch.from_numpy(np.stack([rows.neighbours(i, n) for i in range(b)])).to(device) if rows.retrieval else None
    logits = model(tokens.to(device), nbrs)  # (b, n, v)
    return logits[torch.arange(b, device=device), torch.tensor(lengths, device=device) - 1]


def prefill(model: RetroModel, rows: Rows, max_new_tokens: int, device: torch.device
            ) -> tuple[torch.Tensor, DecodeCache]:
    """Each prompt once through the model into its own cache, the caches then left-padded together: the logits
    at each prompt's end (b, v), and the batch's cache."""
    capacity = max(len(s) for s in rows.seqs) + max_new_tokens
    caches, first = [], []
    for i, s in enumerate(rows.seqs):
        row = DecodeCache(model, 1, len(s), device)
        nbrs = torch.from_numpy(rows.neighbours(i, len(s)))[None].to(device) if rows.retrieval else None
        first.append(model(torch.tensor(s, device=device)[None], nbrs, cache=row)[0, -1])
        caches.append(row)
    return torch.stack(first), DecodeCache.left_padded(model, caches, capacity)


def generate(model: RetroModel, prompts: list[list[int]], d: Decoding, eos_id: int | Collection[int],
             neighbours_of: NeighbourFn | None = None, decode: Callable[[list[int]], str] | None = None,
             seeds: list[int] | None = None, use_cache: bool = True, precision: str = "fp32") -> list[Answer]:
    """Continue each prompt (token ids, none empty) until EOS, a stop string or max_new_tokens.

    eos_id: the end-of-sequence id, or the set of them where the model has several (Llama 3 ends a turn with
    <|eot_id|> and the text with <|end_of_text|>): any of them ends a row.

    neighbours_of: retrieval for the model's CCA (None: CCA off). It is asked once for each chunk of a row
    as soon as the chunk is complete, prompt chunks first. `decode` turns tokens into text (needed for stop
    strings). use_cache=False recomputes the full sequences for every token: the reference for the cache."""
    if not prompts:
        return []
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if d.stop and decode is None:
        raise ValueError("stop strings need `decode`")
    model.eval()
    device = next(model.parameters()).device
    rows = Rows(model, prompts, neighbours_of)
    eos_ids = set(eos_id) if isinstance(eos_id, Collection) else {eos_id}
    generators = [torch.Generator().manual_seed(int(s)) for s in (seeds or range(rows.b))]
    with torch.no_grad(), autocast(device, precision):
        rows.retrieve(list(range(rows.b)))
        if use_cache:
            logits, cache = prefill(model, rows, d.max_new_tokens, device)
        else:
            logits = full_logits(model, rows, device)
        for t in range(d.max_new_tokens):
            live = rows.append(pick_next(logits, d, generators).tolist(), eos_ids, d, decode)
            if not live or t == d.max_new_tokens - 1:
                break
            rows.retrieve(live)
            if use_cache:
                nbrs = torch.from_numpy(rows.step_neighbours(live)).to(device) if rows.retrieval else None
                last = torch.tensor([s[-1] for s in rows.seqs], device=device)
                logits = model.step(last, cache, nbrs)
            else:
                logits = full_logits(model, rows, device)
    return rows.answers(d, decode)


# ----------------------------------------------------------------------------------------------- the verb


@dataclass
class Question:
    index: int  # position in the input, for the merge
    record: Record


def default_out(ws, task: Path, contexts: str, checkpoint_path: Path) -> Path:
    """WORKSPACE/generate/TASK.CONTEXTS.RUN.STEP.jsonl: named by the checkpoint too, so that a second model's
    (or a later step's) answers to the same task never overwrite the first's."""
    stem = task.name.split(".")[0]
    return ws.generate_dir / f"{stem}.{contexts}.{checkpoint_path.parent.name}.{checkpoint_path.name}.jsonl"


def neighbour_mode(cfg: Config, model: RetroModel, meta: dict[str, Any], path: Path) -> str:
    """generate.neighbors, with "auto" read as the checkpoint was trained: an SFT checkpoint as its
    sft.neighbors, a pretrained Retro with database neighbours, a GPT with none."""
    mode = cfg.generate.neighbors
    if mode == "auto":
        mode = (meta.get("sft") or {}).get("neighbors") or ("database" if model.retro_layers else "none")
    if mode != "none" and not model.retro_layers:
        raise UserError(f"generate.neighbors = {mode!r} needs a Retro checkpoint, but {path} is a plain GPT: set "
                        f"generate.neighbors = \"none\"")
    return mode


def read_questions(task: Path | None, prompts: list[str] | None, fmt: str, skip_bad: bool,
                   limit: int = 0) -> list[Question]:
    """The questions to answer, numbered in input order; `limit` > 0: the first `limit` only."""
    if prompts is not None:
        return [Question(i, Record(f"prompt-{i + 1}", p, [], [], f"prompt {i + 1}")) for i, p in enumerate(prompts)]
    assert task is not None
    if not task.is_file():
        raise UserError(f"task file {task} not found")
    fmt = detect_format(task) if fmt == "auto" else fmt
    records, skipped = read_records(task, fmt, "skip" if skip_bad else "error")
    if skipped:
        log(f"{task}: {skipped:,} records skipped (malformed, or questions without an answer)")
    return [Question(i, rec) for i, rec in enumerate(records[: limit or None])]


class Prompter:
    """Questions -> prompt token ids, with the contexts of generate.contexts, cut to leave room for the
    answer; and the sources of those contexts, for tracing."""

    def __init__(self, cfg: Config, ws, tok, model: RetroModel, store: ChunkStore | None,
                 retriever: Retriever | None):
        g = cfg.generate
        self.template = template_of(cfg.sft, tok, g.user_template)
        if g.user_template and isinstance(self.template, ChatPrompt):
            log("generate.user_template is not used: the tokenizer's chat template writes the prompt "
                "(sft.chat_template = \"never\": the templates of [sft] and [generate])")
        self.cfg, self.tok, self.store, self.retriever = cfg, tok, store, retriever
        self.budget = model.cfg.seq_length - g.max_new_tokens
        if self.budget < 1:
            raise UserError(f"generate.max_new_tokens ({g.max_new_tokens}) leaves no room for a prompt in the "
                            f"model's {model.cfg.seq_length} tokens (model.seq_length of the checkpoint)")

    def contexts(self, questions: list[Question]) -> list[list[dict]]:
        g = self.cfg.generate
        if g.contexts == "none" or g.num_contexts == 0:
            return [[] for _ in questions]
        if g.contexts == "file":
            return [[{**c, "source": "file"} for c in q.record.contexts[: g.num_contexts]] for q in questions]
        ids, distances = self.retriever.search([q.record.question for q in questions], g.num_contexts)
        return [[{"title": h["title"], "text": (h["text"] + " " + h["continuation"]).strip(), "source": "database",
                  "chunk_id": h["chunk_id"], "doc_id": h["doc_id"]} for h in hits]
                for hits in describe_hits(self.store, self.tok, ids, distances)]

    def __call__(self, question: Question, contexts: list[dict]) -> tuple[list[int] | None, list[dict]]:
        """Prompt ids (None when even the bare question does not fit) and the contexts in it."""
        stats = {"context_tokens_cut": 0, "contexts_dropped": 0}
        fitted = fit_prompt(question.record, self.template, self.tok, contexts, self.budget, stats)
        return (None, []) if fitted is None else fitted


def neighbour_source(mode: str, contexts: list[list[dict]], tok, retriever: Retriever | None,
                     store: ChunkStore | None, model: RetroModel) -> NeighbourFn | None:
    """The CCA's neighbours for the rows of one batch (row i has `contexts[i]` in its prompt): "database"
    retrieves each completed chunk's nearest chunks; "context" gives every chunk the row's contexts, as SFT
    does (qa.context_neighbours); "none": no retrieval."""
    k, r, pad = model.cfg.num_neighbors, model.retrieved_length, model.pad_id
    if mode == "none":
        return None
    if mode == "database":
        return lambda rows, chunks: retriever.neighbours(tok, chunks, k, r, pad)
    per_row = np.stack([context_neighbours(tok, ctxs, k, r, pad) for ctxs in contexts]) if contexts else \
        np.zeros((0, k, r), dtype=np.int64)
    return lambda rows, chunks: (per_row[rows], np.full((len(rows), k), -1, dtype=np.int64))


def _settings_hash(cfg: Config, ws: Workspace, path: Path, mode: str, task: Path | None,
                   database: Database | None, tok, eos_ids: frozenset[int]) -> str:
    """What the answers depend on. With retrieval, that includes the database as edited: answers written
    before a `db add`/`db remove` are not resumed after it."""
    g = dataclasses.asdict(cfg.generate)
    g.pop("batch_size")  # batching does not change what is answered
    edited = None if database is None else {"index": (ws.read_meta("index") or {}).get("files"),
                                            "edits": database.manifest.to_json()}
    return hash_obj({"generate": g, "checkpoint": str(path.resolve()), "neighbors": mode,
                     "task": str(task.resolve()) if task else None, "seed": cfg.workspace.seed,
                     "template": dataclasses.asdict(template_of(cfg.sft, tok)), "database": edited,
                     # a single end token is the checkpoint's own; more come from the model folder's files
                     **({"eos_ids": sorted(eos_ids)} if len(eos_ids) > 1 else {})})[:10]


def _read_partial(paths: list[Path]) -> dict[int, dict]:
    """Answers already written by an earlier (killed) run; a torn last line is ignored."""
    done = {}
    for p in paths:
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[rec["index"]] = rec
    return done


class PartialFiles:
    """The answers to `out` as they are made: each rank appends them to its own partial file beside `out`
    (OUT.SETTINGS.rankR.partial, named by `_settings_hash`), so that a rerun of a killed run skips those already
    answered; at the end rank 0 merges them into `out` in input order and removes them."""

    def __init__(self, out: Path, settings: str):
        self.out = out
        self.pattern = f"{out.name}.{settings}.rank*.partial"
        self.done = _read_partial(sorted(out.parent.glob(self.pattern)))  # by every rank of the earlier run
        self.mine = out.parent / self.pattern.replace("*", str(dist().rank))
        self.mine.parent.mkdir(parents=True, exist_ok=True)
        if self.mine.is_file() and not self.mine.read_bytes().endswith(b"\n"):  # a line torn by a kill: end it
            with open(self.mine, "a", encoding="utf-8") as f:
                f.write("\n")

    @property
    def where(self) -> Path:
        return self.mine if dist().world == 1 else self.out.parent / self.pattern

    def merge(self, questions: list[Question]) -> None:
        """Every rank waits; rank 0 writes `out` from the partial files (all questions answered) and removes them."""
        D = dist()
        D.barrier()
        if D.main:
            merged = _read_partial(sorted(self.out.parent.glob(self.pattern)))
            missing = [q.index for q in questions if q.index not in merged]
            if missing:
                raise UserError(f"{len(missing)} answers are missing from the partial files "
                                f"{self.out.parent / self.pattern}: rerun the same command")
            lines = [json.dumps({key: v for key, v in merged[q.index].items() if key != "index"}) for q in questions]
            write_text_atomic(self.out, "\n".join(lines) + "\n")
            for p in self.out.parent.glob(self.pattern):
                p.unlink()
        D.barrier()


class Answerer:
    """Questions -> answer records (the JSON lines of the output): prompts with their contexts, the CCA's
    neighbours, and the decoding of generate.*; each question's sampling seeded by its index."""

    def __init__(self, cfg: Config, ws, tok, model: RetroModel, mode: str, store: ChunkStore | None,
                 retriever: Retriever | None, eos_ids: frozenset[int]):
        g = cfg.generate
        self.prompter = Prompter(cfg, ws, tok, model, store, retriever)
        self.cfg, self.tok, self.model, self.mode, self.store, self.retriever = cfg, tok, model, mode, store, retriever
        self.eos_ids = eos_ids
        self.decoding = Decoding(g.max_new_tokens, g.temperature, g.top_k, g.top_p, tuple(g.stop))

    def __call__(self, batch: list[Question]) -> list[dict]:
        g = self.cfg.generate
        t0 = time.time()
        contexts = self.prompter.contexts(batch)
        fitted = [self.prompter(q, c) for q, c in zip(batch, contexts)]
        live = [j for j, (ids, _) in enumerate(fitted) if ids]
        source = neighbour_source(self.mode, [fitted[j][1] for j in live], self.tok, self.retriever, self.store,
                                  self.model)
        answers = generate(self.model, [fitted[j][0] for j in live], self.decoding, self.eos_ids, source,
                           self.tok.decode, seeds=[self.cfg.workspace.seed * 1_000_003 + batch[j].index for j in live],
                           use_cache=g.cache, precision=g.precision)
        seconds = time.time() - t0
        by_row = dict(zip(live, answers))
        records = []
        for j, q in enumerate(batch):
            a = by_row.get(j)
            records.append({"index": q.index, "id": q.record.id, "question": q.record.question,
                            "prediction": a.text.strip() if a else "",
                            "gold": q.record.answers,
                            "contexts": [{key: c[key] for key in ("title", "source", "chunk_id", "doc_id") if key in c}
                                         for c in fitted[j][1]],
                            "neighbour_chunks": a.neighbour_ids if a else [],
                            "tokens": len(a.tokens) if a else 0, "stopped": a.stopped if a else "prompt too long",
                            "seconds": round(seconds / len(batch), 4)})
        return records


def answer_all(todo: list[Question], answer: Answerer, batch_size: int, partial: PartialFiles | None,
               total: int, resumed: int) -> tuple[list[dict], int]:
    """Answer `todo` batch by batch, each batch's records appended to this rank's partial file at once:
    (the records, the tokens generated)."""
    answered: list[dict] = []
    started, new_tokens = time.time(), 0

    def note_kept() -> None:
        if partial is None:
            set_kept_note("generate: answers to --prompt are printed at the end, so none is kept")
        else:
            set_kept_note(f"generate: {resumed + len(answered):,} of {total:,} answers are kept in {partial.where}")

    note_kept()
    with progress("generate", total=len(todo), unit="questions") as bar, ExitStack() as stack:
        sink = stack.enter_context(open(partial.mine, "a", encoding="utf-8")) if partial is not None else None
        for s in range(0, len(todo), batch_size):
            batch = todo[s : s + batch_size]
            for rec in answer(batch):
                answered.append(rec)
                new_tokens += rec["tokens"]
                if sink is not None:
                    sink.write(json.dumps(rec) + "\n")
            if sink is not None:
                sink.flush()
            note_kept()
            fault_point("generate:batch")
            bar.advance(len(batch))
            elapsed = max(time.time() - started, 1e-9)
            bar.set_rate(f"{len(answered) / elapsed:.2f} questions/s, {new_tokens / elapsed:,.0f} tokens/s")
    return answered, new_tokens


def run(cfg: Config, task: str | None = None, prompts: list[str] | None = None, fmt: str = "auto",
        out: Path | None = None, checkpoint_path: Path | None = None, skip_bad: bool = False,
        limit: int = 0) -> dict[str, Any]:
    g = cfg.generate
    ws = workspace_of(cfg)
    tok = open_tokenizer(ws)
    path = checkpoint.latest_trained(cfg, ws, checkpoint_path)  # --checkpoint, generate.checkpoint, SFT, pretrain
    model, meta = checkpoint.load_model(ws, path, cfg.model)
    mode = neighbour_mode(cfg, model, meta, path)
    model.cca_gate_off = mode == "none"
    device = device_for_rank()
    model.to(device)
    task = None if task is None else data_file(task, Path.cwd(), ws.root)  # a path, or builtin:tiny-cloze-test
    questions = read_questions(task, prompts, fmt, skip_bad, limit)

    store = retriever = database = None
    if g.contexts == "database" or mode == "database":
        ws.require("index")
        database = Database.open(cfg, model.chunk_length)
        store, retriever = database.store, database.retriever()
    eos_ids = tok.eos_ids | {meta.get("eos_id", tok.eos_id)}  # the checkpoint's, and every end token of the model
    answerer = Answerer(cfg, ws, tok, model, mode, store, retriever, eos_ids)

    if out is None and task is not None:
        out = default_out(ws, task, g.contexts, path)
    partial = None
    if out is not None:  # answers go to this rank's partial file as they are made; a rerun skips them
        partial = PartialFiles(out, _settings_hash(cfg, ws, path, mode, task, database, tok, eos_ids))
    done = partial.done if partial is not None else {}
    if done:
        log(f"resuming: {len(done):,} of {len(questions):,} questions were answered by an earlier run")
    started = time.time()
    todo = dist().shard([q for q in questions if q.index not in done])
    answered, new_tokens = answer_all(todo, answerer, g.batch_size, partial, len(questions), len(done))

    elapsed = time.time() - started
    summary = {"questions": len(questions), "answered_now": len(answered), "resumed": len(done),
               "tokens": new_tokens, "seconds": round(elapsed, 2), "checkpoint": str(path), "neighbors": mode,
               "contexts": g.contexts, "cache": g.cache,
               "too_long": sum(1 for a in answered if a["stopped"] == "prompt too long")}
    if out is None:
        summary["answers"] = answered
        return summary
    partial.merge(questions)
    summary["out"] = str(out)
    return summary
