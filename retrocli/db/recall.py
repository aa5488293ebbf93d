"""`retro db eval`: question -> passage retrieval recall of the workspace database.

Each question of a QA file that carries its gold passage (SQuAD: the question's paragraph; QED / NQ with
paragraph: `paragraph_text`; InstructRetro: the first of `ctxs`) is searched as `retro db query` searches it,
and a retrieved chunk is a hit in one of two ways, chosen per file:

    document  the chunk belongs to a database document that IS the gold passage: the passage's text, tokenized
              by the database's tokenizer, equals the document's tokens (as given, or with its white space
              collapsed). Exact, and blind to how decoded text reads (normalisation, unknown pieces). The gold
              document must be searchable (training split, not removed); a question whose passage the database
              does not hold is skipped and counted.
    answer    a gold answer appears in the chunk's text + continuation, both normalised as SQuAD scores answers
              (lower case, no punctuation or articles, white space collapsed), as DPR's top-k accuracy.

A file of questions and answers without passages (`qa`: NQ-open's JSON lines) is matched by answer.
`auto` looks up a sample of the gold passages (evenly spread over the file) and takes `document` when at least
half are in the database, else `answer`. recall@k: the share of questions with a hit among their top k; MRR:
the mean of 1 / rank of the first hit among the top max(k) (0 without one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import MAX_SEARCH_K, Config, min_chunk_tokens
from ..data.qa import Record, detect_format, read_file
from ..errors import UserError
from ..eval.score import normalize_answer
from .database import Database
from .store import ChunkStore

PASSAGE_FORMATS = ("squad", "qed", "nq", "instructretro")  # the formats whose records carry their gold passage
ANSWER_FORMATS = ("qa",)  # answers without a passage (NQ-open's JSON lines): matched by answer only
MATCHES = ("auto", "document", "answer")
AUTO_SAMPLE = 100  # gold passages looked up to choose the match in `auto`
AUTO_SHARE = 0.5  # ... of which at least this share in the database: `document`
BATCH = 256  # questions searched at a time


@dataclass
class Recall:
    """What `evaluate` measured (`to_json` is the `--json` object)."""

    file: str
    format: str
    match: str  # "document" or "answer"
    why: str  # how the match was chosen, in words
    ks: list[int]
    recall: dict[int, float]
    mrr: float
    questions: int  # evaluated
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> questions
    seconds: float = 0.0  # embedding + search, all questions

    @property
    def queries_per_second(self) -> float:
        return self.questions / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "format": self.format, "match": self.match, "match_reason": self.why,
                "k": self.ks, "recall": {str(k): v for k, v in self.recall.items()}, "mrr": self.mrr,
                "questions": self.questions, "skipped": self.skipped, "search_seconds": round(self.seconds, 3),
                "queries_per_second": round(self.queries_per_second, 2)}


def check_ks(ks: Sequence[int]) -> list[int]:
    """The k values sorted and deduplicated; each must be in 1..MAX_SEARCH_K."""
    bad = [k for k in ks if not 1 <= k <= MAX_SEARCH_K]
    if not ks or bad:
        raise UserError(f"-k values must be in 1..{MAX_SEARCH_K}, got {', '.join(map(str, bad)) or 'none'}")
    return sorted(set(ks))


def read_questions(path: Path, fmt: str | None) -> tuple[str, list[Record]]:
    """(format, every question of the file: answered or not, in file order)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"QA file {path} not found")
    fmt = fmt or detect_format(path)
    if fmt not in PASSAGE_FORMATS + ANSWER_FORMATS:
        raise UserError(f"{path}: the {fmt} format carries no gold passage to find nor answer to look for; "
                        f"`retro db eval` reads {', '.join(PASSAGE_FORMATS + ANSWER_FORMATS)} files")
    got = read_file(path, fmt)
    # in file order (a SQuAD v2 file interleaves answered and unanswerable questions)
    return fmt, sorted(got.records + got.unanswerable, key=_position)


def _position(record: Record) -> int:
    """A record's place in its file, from its source ("path:LINE" or "path:record N")."""
    tail = record.source.rsplit(" ", 1)[-1].rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


# ------------------------------------------------------------------------------------------ gold documents


class GoldDocuments:
    """The searchable database documents whose tokens are a given passage's (`rows(text)`).

    Documents of the passage's length are the candidates (a sorted index of lengths, made once); their first,
    middle and last tokens are compared at once, then the few left token by token."""

    def __init__(self, store: ChunkStore, tok, min_tokens: int):
        self.store, self.tok, self.min_tokens = store, tok, min_tokens
        lengths = np.asarray(store.docs["num_tokens"])
        self.by_length = np.argsort(lengths, kind="stable")
        self.sorted_lengths = lengths[self.by_length]
        self.cache: dict[str, np.ndarray] = {}

    def rows(self, text: str) -> np.ndarray:
        """The rows of the searchable documents that are `text` (empty: none)."""
        if text not in self.cache:
            found = np.zeros(0, dtype=np.int64)
            variants = dict.fromkeys([text, " ".join(text.split())])
            for ids in self.tok.encode(list(variants)):
                found = np.union1d(found, self._equal(np.asarray(ids, dtype=np.int64)))
            self.cache[text] = found[[self._searchable(int(r)) for r in found]] if len(found) else found
        return self.cache[text]

    def _equal(self, ids: np.ndarray) -> np.ndarray:
        n = len(ids)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        lo, hi = np.searchsorted(self.sorted_lengths, [n, n + 1])
        rows = np.sort(self.by_length[lo:hi])
        starts = np.asarray(self.store.docs["token_start"])[rows]
        for p in (0, n // 2, n - 1):  # cheap filters before comparing whole documents
            same = self._tokens_at(starts + p) == ids[p]
            rows, starts = rows[same], starts[same]
        return np.array([r for r in rows if np.array_equal(self.store.doc_ids(int(r)), ids)], dtype=np.int64)

    def _tokens_at(self, positions: np.ndarray) -> np.ndarray:
        tokens = self.store.tokens
        if isinstance(tokens, np.ndarray):
            return np.asarray(tokens[positions], dtype=np.int64)
        return np.array([int(tokens[slice(int(p), int(p) + 1)][0]) for p in positions], dtype=np.int64)

    def _searchable(self, row: int) -> bool:
        """In the index: a training document, not removed, with a chunk of db.min_chunk_tokens or more."""
        d = self.store.docs[row]
        if d["valid"] or row in self.store.removed_docs:
            return False
        chunks = self.store.chunks[int(d["chunk_start"]) : int(d["chunk_start"] + d["num_chunks"])]
        return bool((chunks["length"] >= self.min_tokens).any())


def choose_match(records: list[Record], gold: GoldDocuments, match: str) -> tuple[str, str]:
    """(match, why): `document` or `answer` as asked, or for `auto` by a sample of the gold passages."""
    if match not in MATCHES:
        raise UserError(f"--match must be one of {', '.join(MATCHES)}, got {match!r}")
    if match != "auto":
        return match, "--match " + match
    passages = list(dict.fromkeys(r.contexts[0]["text"] for r in records if r.contexts))
    sample = [passages[int(i)] for i in np.linspace(0, len(passages) - 1, min(AUTO_SAMPLE, len(passages)))]
    found = sum(len(gold.rows(p)) > 0 for p in sample)
    chosen = "document" if sample and found >= AUTO_SHARE * len(sample) else "answer"
    return chosen, f"auto: {found} of {len(sample)} sampled gold passages are database documents"


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(cfg: Config, path: Path, ks: Sequence[int], match: str = "auto", limit: int | None = None,
             fmt: str | None = None) -> Recall:
    """Recall@k and MRR of the database for the questions of `path` (the first `limit`)."""
    ks = check_ks(ks)
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be positive, got {limit}")
    fmt, records = read_questions(path, fmt)
    records = records[:limit] if limit is not None else records
    db = Database.open(cfg, require=("index",))
    gold = GoldDocuments(db.store, db.tokenizer, min_chunk_tokens(db.settings))
    if fmt in ANSWER_FORMATS:
        if match == "document":
            raise UserError(f"{path}: the {fmt} format carries answers but no gold passage to match by document: "
                            "use --match answer (or auto)")
        match, why = "answer", (f"the {fmt} format carries answers, no passage" if match == "auto"
                                else "--match answer")
    else:
        match, why = choose_match(records, gold, match)

    skipped = {"no gold passage": sum(not r.contexts for r in records)} if fmt in PASSAGE_FORMATS else {}
    todo: list[tuple[Record, Any]] = []  # (record, its gold: document rows or normalised answers)
    for r in records:
        if not r.contexts and fmt in PASSAGE_FORMATS:
            continue
        if match == "document":
            rows = gold.rows(r.contexts[0]["text"])
            if len(rows):
                todo.append((r, rows))
            else:
                skipped["gold passage not in the database"] = skipped.get("gold passage not in the database", 0) + 1
        elif answers := [a for a in map(normalize_answer, r.answers) if a]:
            todo.append((r, answers))
        else:
            skipped["no answer"] = skipped.get("no answer", 0) + 1
    skipped = {k: v for k, v in skipped.items() if v}
    if not todo:
        raise UserError(f"{path}: no question to evaluate ({', '.join(f'{k}: {v}' for k, v in skipped.items())})")

    retriever, tok, depth = db.retriever(), db.tokenizer, max(ks)
    first_hit = np.zeros(len(todo), dtype=np.int64)  # rank of the first hit, 0: none in the top max(k)
    seconds = 0.0
    for s in range(0, len(todo), BATCH):
        batch = todo[s : s + BATCH]
        started = time.perf_counter()
        ids, _ = retriever.search([r.question for r, _ in batch], depth)
        seconds += time.perf_counter() - started
        for i, ((_, target), row) in enumerate(zip(batch, ids)):
            hits = (_document_hits(db.store, row, target) if match == "document"
                    else _answer_hits(db.store, tok, row, target))
            first_hit[s + i] = int(np.argmax(hits)) + 1 if hits.any() else 0
    recall = {k: float(((first_hit >= 1) & (first_hit <= k)).mean()) for k in ks}
    mrr = float(np.where(first_hit > 0, 1.0 / np.maximum(first_hit, 1), 0.0).mean())
    return Recall(str(path), fmt, match, why, ks, recall, mrr, len(todo), skipped, seconds)


def _document_hits(store: ChunkStore, ids: np.ndarray, gold_rows: np.ndarray) -> np.ndarray:
    """Per retrieved chunk (-1: none): whether its document is the gold passage's."""
    docs = np.where(ids >= 0, store.chunks["doc"][np.maximum(ids, 0)], -1)
    return np.isin(docs, gold_rows) & (ids >= 0)


def _answer_hits(store: ChunkStore, tok, ids: np.ndarray, answers: list[str]) -> np.ndarray:
    """Per retrieved chunk (-1: none): whether a normalised gold answer is in its normalised text +
    continuation (as a run of whole words)."""
    out = np.zeros(len(ids), dtype=bool)
    for i, cid in enumerate(ids.tolist()):
        if cid < 0:
            continue
        nxt = store.continuation(cid)
        toks = store.chunk_ids(cid).tolist() + (store.chunk_ids(nxt).tolist() if nxt is not None else [])
        text = f" {normalize_answer(tok.decode(toks))} "
        out[i] = any(f" {a} " in text for a in answers)
    return out
