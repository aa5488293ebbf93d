"""Pretraining samples: windows of seq_length + 1 tokens over the documents of one split, each with the
neighbour tokens of its chunks, (seq_length / m, k, r), looked up from the database's precomputed neighbours.

The token stream. Each document's tokens are followed by EOS and padded (pad_id, masked out of the loss) to
a multiple of m, then the documents are laid end to end in chunk-store order:

    doc 0: t t t t | t t EOS pad | doc 1: t t t t | t t t t | EOS pad pad pad | doc 2: ...

so that every m-token chunk of the stream is exactly one database chunk (the first num_chunks chunks of a
document) or padding after the document's end (a chunk holding only EOS and pad: it has no neighbours).
Sample i is stream positions [i*n, i*n + n + 1) with n = seq_length: inputs are the first n, targets the
last n. Its chunk j is stream chunk i*l + j, l = n / m, whose precomputed neighbours apply unchanged.

Neighbours. For each chunk, the first k stored neighbours whose document is not inside the sample (the
database already dropped the chunk's own document); each one's tokens are the neighbour chunk followed by
its continuation (the next chunk of the same document only: it stops at the document end), padded with
pad_id to r (or cut to r). Missing neighbours are all padding, which the model masks out.

Only O(documents) index arrays are held in memory; tokens and neighbour rows are read from the memory-mapped
chunk store and neighbour blocks on demand, so this scales to corpora that do not fit in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..config import Config, retrieved_length
from ..db.database import Database, neighbour_tokens
from ..db.store import ChunkStore
from ..errors import UserError
from ..workspace import Workspace


def check_seq_length(seq_length: int, m: int) -> None:
    """A pretraining sample's chunks are database chunks only when seq_length is a multiple of m."""
    if seq_length % m:
        raise UserError(f"model.seq_length ({seq_length}) must be a multiple of db.chunk_length ({m}) for "
                        f"pretraining: each chunk of a sample is then exactly one database chunk")


@dataclass
class StreamDocs:
    """The documents of one token stream: where their tokens come from and which neighbour rows they use.

    lengths (D,) tokens per document; tokens_of(d, lo, hi) -> tokens [lo, hi) of document d (int64), read
    without touching the rest of a long document;
    doc_keys (D,) the document's row in the chunk store (for excluding in-sample documents; -1: not in the
    database, e.g. an external file); key_start (D,) the neighbour-table row of the document's first chunk
    (its chunk ids for workspace documents), num_keys (D,) how many of its chunks have neighbour rows.
    """

    lengths: np.ndarray
    tokens_of: Callable[[int, int, int], np.ndarray]
    doc_keys: np.ndarray
    key_start: np.ndarray
    num_keys: np.ndarray

    @classmethod
    def from_store(cls, store: ChunkStore, split: str) -> "StreamDocs":
        """The training (`split="train"`, the database documents) or validation documents of the chunk store."""
        valid = np.asarray(store.docs["valid"])
        rows = np.flatnonzero(valid if split == "valid" else ~valid)
        docs = store.docs[rows]
        starts = np.asarray(docs["token_start"], dtype=np.int64)
        lengths = np.asarray(docs["num_tokens"], dtype=np.int64)

        def tokens_of(d: int, lo: int, hi: int) -> np.ndarray:
            return np.asarray(store.tokens[starts[d] + lo : starts[d] + hi], dtype=np.int64)

        return cls(lengths, tokens_of, rows.astype(np.int64), np.asarray(docs["chunk_start"], dtype=np.int64),
                   np.asarray(docs["num_chunks"], dtype=np.int64))

    @classmethod
    def from_token_lists(cls, docs: list[list[int]], m: int) -> "StreamDocs":
        """In-memory documents (not in the database); their chunks' neighbour rows are numbered in order."""
        lengths = np.array([len(t) for t in docs], dtype=np.int64)
        num_keys = -(-lengths // m)
        key_start = np.concatenate([[0], np.cumsum(num_keys)[:-1]]).astype(np.int64)
        arrays = [np.asarray(t, dtype=np.int64) for t in docs]

        def tokens_of(d: int, lo: int, hi: int) -> np.ndarray:
            return arrays[d][lo:hi]

        return cls(lengths, tokens_of, np.full(len(docs), -1, dtype=np.int64), key_start, num_keys)


class Samples:
    """Fixed-length samples over a token stream; `get(i)` returns numpy arrays:

    tokens (n,) int64 inputs; targets (n,) int64; loss_mask (n,) float32, 0 where the target is padding;
    neighbours (l, k, r) int64 (only when `neighbour_table` is given; pad_id where missing);
    neighbour_ids (l, k) their database chunk ids (-1 where missing) and docs, the chunk-store rows of the
    documents inside the sample: diagnostics for tests, not passed to the model.

    `drop_last`: training drops the final partial window; evaluation keeps it (padded, masked) so that every
    token of the stream after the first is a target exactly once.
    """

    def __init__(self, docs: StreamDocs, store: ChunkStore | None, neighbour_table, seq_length: int, m: int,
                 k: int, r: int, pad_id: int, eos_id: int, drop_last: bool = True):
        check_seq_length(seq_length, m)
        self.docs, self.store, self.table = docs, store, neighbour_table
        self.n, self.m, self.k, self.r = seq_length, m, k, r
        self.l = seq_length // m
        self.pad_id, self.eos_id = pad_id, eos_id
        chunks_per_doc = -(-(docs.lengths + 1) // m)  # tokens + EOS, padded to a multiple of m
        self.chunk_offsets = np.concatenate([[0], np.cumsum(chunks_per_doc)]).astype(np.int64)  # (D+1,)
        self.total_tokens = int(self.chunk_offsets[-1]) * m
        usable = max(self.total_tokens - 1, 0)
        self.num_samples = usable // self.n if drop_last else math.ceil(usable / self.n)
        self._chunk_docs = None if store is None else store.chunks["doc"]

    def __len__(self) -> int:
        return self.num_samples

    def _stream(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stream positions [start, end): tokens, real (True on document tokens and EOS), and the stream
        documents touched. Positions past the stream's end are padding."""
        tokens = np.full(end - start, self.pad_id, dtype=np.int64)
        real = np.zeros(end - start, dtype=bool)
        m, off = self.m, self.chunk_offsets
        d0 = int(np.searchsorted(off, start // m, side="right")) - 1
        touched = []
        d = d0
        while d < len(self.docs.lengths) and off[d] * m < end:
            base = int(off[d]) * m  # stream position of the document's first token
            length = int(self.docs.lengths[d])
            lo, hi = max(start, base), min(end, base + length)
            if lo < hi:
                tokens[lo - start : hi - start] = self.docs.tokens_of(d, lo - base, hi - base)
                real[lo - start : hi - start] = True
            eos = base + length
            if start <= eos < end:
                tokens[eos - start] = self.eos_id
                real[eos - start] = True
            touched.append(d)
            d += 1
        return tokens, real, np.array(touched, dtype=np.int64)

    def get(self, i: int) -> dict[str, np.ndarray]:
        assert 0 <= i < self.num_samples, (i, self.num_samples)
        start = i * self.n
        tokens, real, touched = self._stream(start, start + self.n + 1)
        out = {"tokens": tokens[:-1], "targets": tokens[1:], "loss_mask": real[1:].astype(np.float32),
               "docs": self.docs.doc_keys[touched]}
        if self.table is not None:
            out["neighbours"], out["neighbour_ids"] = self._neighbours(i, set(out["docs"].tolist()) - {-1})
        return out

    def _neighbours(self, i: int, in_sample: set[int]) -> tuple[np.ndarray, np.ndarray]:
        """For each chunk of sample i, its first k stored neighbours outside the sample's documents:
        their tokens (l, k, r) and their chunk ids (l, k), -1 where missing."""
        out = np.full((self.l, self.k, self.r), self.pad_id, dtype=np.int64)
        chosen = np.full((self.l, self.k), -1, dtype=np.int64)
        off = self.chunk_offsets
        stream_chunks = np.arange(i * self.l, (i + 1) * self.l)
        d = np.searchsorted(off, stream_chunks, side="right") - 1  # stream document of each chunk
        inside = d < len(self.docs.lengths)
        local = stream_chunks - off[np.minimum(d, len(off) - 2)]
        has_row = inside & (local < self.docs.num_keys[np.minimum(d, len(self.docs.lengths) - 1)])
        if not has_row.any():
            return out, chosen
        js = np.flatnonzero(has_row)
        keys = self.docs.key_start[d[js]] + local[js]
        rows = self.table[keys]  # (len(js), num_neighbors_query)
        excluded = np.fromiter(in_sample, dtype=np.int64, count=len(in_sample))
        if self.store is not None and len(self.store.removed_docs):  # `retro db remove`d: never a neighbour
            excluded = np.concatenate([excluded, self.store.removed_docs])
        for j, row in zip(js, rows):
            ids = row[row >= 0]
            if len(excluded):
                ids = ids[~np.isin(self._chunk_docs[ids], excluded)]
            for slot, cid in enumerate(ids[: self.k]):
                toks = self.neighbour_tokens(int(cid))
                out[j, slot, : len(toks)] = toks
                chosen[j, slot] = cid
        return out, chosen

    def neighbour_tokens(self, cid: int) -> np.ndarray:
        return neighbour_tokens(self.store, cid, self.r)


def open_samples(cfg: Config, ws: Workspace, split: str, pad_id: int, eos_id: int, retrieval: bool,
                 drop_last: bool = True, database: Database | None = None) -> Samples:
    """The pretraining samples of one split ("train" or "valid") of the workspace."""
    database = database or Database.open(ws, cfg.db.chunk_length)
    store = database.store
    table = None
    if retrieval:
        nmeta = ws.require("neighbours")
        stored = nmeta["settings"]["num_neighbors_query"]
        if cfg.model.num_neighbors > stored:
            raise UserError(f"model.num_neighbors ({cfg.model.num_neighbors}) exceeds the {stored} neighbours "
                            f"stored per chunk in {ws.stage_dir('neighbours')} (db.num_neighbors_query when built)")
        table = database.neighbours
    return Samples(StreamDocs.from_store(store, split), store, table, cfg.model.seq_length, cfg.db.chunk_length,
                   cfg.model.num_neighbors, retrieved_length(cfg.model, cfg.db.chunk_length), pad_id, eos_id,
                   drop_last)


def collate(items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack samples into a batch of model inputs (the diagnostics `docs` and `neighbour_ids` are dropped)."""
    return {key: np.stack([it[key] for it in items]) for key in items[0] if key not in ("docs", "neighbour_ids")}


class SampleOrder:
    """Which sample comes at each global position: epoch after epoch, each a seeded permutation.

    Position p is sample perm(epoch = p // N)[p % N]; the data-loader state is just the number of samples
    consumed, so a resumed run continues the exact order."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = num_samples, seed, shuffle
        self._epoch, self._perm = -1, np.arange(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                          else np.arange(self.n))
        return self._perm

    def __getitem__(self, position: int) -> int:
        return int(self._permutation(position // self.n)[position % self.n])
