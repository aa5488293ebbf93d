"""Documents -> token ids -> consecutive `chunk_length`-token chunks (the last one of a document may be short).

The chunk store, all memory-mapped .npy files (shapes travel inside the files):
  tokens.npy  every document's tokens, concatenated (uint16 when the vocabulary fits, else int32)
  docs.npy    one row per document: token_start, num_tokens, chunk_start, num_chunks, valid
  chunks.npy  one row per chunk: doc (row in docs.npy), token_start, length
  docs.jsonl  one line per document: {"id", "title", "source"}
Chunk rows are the ids the index and the neighbour files use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..data.corpus import Document, is_valid
from ..data.tokenizer import Tokenizer
from ..errors import UserError
from ..runtime import fault_point
from ..workspace import NpyWriter, Workspace, atomic_path, load_npy

DOC_DTYPE = np.dtype([("token_start", "<i8"), ("num_tokens", "<i8"), ("chunk_start", "<i8"),
                      ("num_chunks", "<i8"), ("valid", "?")])
CHUNK_DTYPE = np.dtype([("doc", "<i8"), ("token_start", "<i8"), ("length", "<i4")])


def chunk_spans(num_tokens: int, chunk_length: int) -> list[tuple[int, int]]:
    """(start, length) of each chunk of a document: consecutive, non-overlapping, the last may be short;
    an empty document has none."""
    return [(s, min(chunk_length, num_tokens - s)) for s in range(0, num_tokens, chunk_length)]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<i4")


def _batched(docs: Iterable[Document], n: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


STORE_FILES = ("tokens.npy", "docs.npy", "chunks.npy", "docs.jsonl")


def build_chunks(folder: Path, docs: Iterable[Document], tok: Tokenizer, chunk_length: int,
                 seed: int, valid_fraction: float, bar=None) -> dict[str, int]:
    """Stream documents into a chunk store in `folder` (the chunks stage, or a segment added by `retro db
    add`). Returns the counts recorded in the stage's metadata."""
    dtype = token_dtype(tok.vocab_size)
    tokens_path, docs_path, chunks_path, info_path = (folder / name for name in STORE_FILES)
    writers = [NpyWriter(tokens_path, dtype), NpyWriter(docs_path, DOC_DTYPE), NpyWriter(chunks_path, CHUNK_DTYPE)]
    tokens_w, docs_w, chunks_w = writers
    counts = {"documents": 0, "valid_documents": 0, "chunks": 0, "train_chunks": 0, "tokens": 0,
              "empty_after_tokenizing": 0}
    try:
        with atomic_path(info_path) as info_tmp, open(info_tmp, "w", encoding="utf-8") as info:
            for batch in _batched(docs, 64):
                for doc, ids in zip(batch, tok.encode([d.text for d in batch])):
                    if not ids:
                        counts["empty_after_tokenizing"] += 1
                        continue
                    valid = is_valid(doc.id, seed, valid_fraction)
                    spans = chunk_spans(len(ids), chunk_length)
                    row = counts["documents"]
                    table = np.zeros(len(spans), CHUNK_DTYPE)
                    table["doc"] = row
                    table["token_start"] = [counts["tokens"] + s for s, _ in spans]
                    table["length"] = [n for _, n in spans]
                    docs_w.append(np.array([(counts["tokens"], len(ids), counts["chunks"], len(spans), valid)],
                                           DOC_DTYPE))
                    chunks_w.append(table)
                    tokens_w.append(np.asarray(ids, dtype=dtype))
                    info.write(json.dumps({"id": doc.id, "title": doc.title, "source": doc.source}) + "\n")
                    counts["documents"] += 1
                    counts["valid_documents"] += int(valid)
                    counts["chunks"] += len(spans)
                    counts["train_chunks"] += 0 if valid else len(spans)
                    counts["tokens"] += len(ids)
                if bar is not None:
                    bar.advance(len(batch))
                fault_point("chunks:batch")
            if counts["documents"] == 0:
                raise UserError("the corpus has no documents with text (check corpus.train and corpus.text_key)")
            if counts["train_chunks"] == 0:
                raise UserError(f"every document went to the validation split: lower corpus.valid_fraction "
                                f"(now {valid_fraction})")
            info.flush()
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return counts


class JoinedTokens:
    """Token arrays laid end to end (the base store, then each added segment), sliced as one array. A slice
    never crosses two parts: it always lies inside one document, and a document lives in one part."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, sl: slice) -> np.ndarray:
        i = int(np.searchsorted(self.starts, sl.start, side="right")) - 1
        return self.parts[i][sl.start - self.starts[i] : sl.stop - self.starts[i]]


@dataclass
class ChunkStore:
    """Read access to the chunk store (memory-mapped), with the documents `retro db add` added after it
    (global rows continue the base store's) and the documents `retro db remove` removed (`removed_docs`:
    their chunks are never retrieved)."""

    tokens: np.ndarray | JoinedTokens
    docs: np.ndarray
    chunks: np.ndarray
    doc_info_paths: list[tuple[Path, int]]  # (docs.jsonl, global row of its first document)
    chunk_length: int
    removed_docs: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def open(cls, ws: Workspace, chunk_length: int) -> "ChunkStore":
        """The store as `retro db build` wrote it. Readers want it with the edits since (`Database.store`)."""
        return cls(load_npy(ws.chunk_tokens), load_npy(ws.chunk_docs), load_npy(ws.chunk_table), [(ws.doc_info, 0)],
                   chunk_length)

    @classmethod
    def at(cls, folder: Path, chunk_length: int) -> "ChunkStore":
        """The store `build_chunks` wrote in `folder` (a segment `retro db add` wrote), rows from 0."""
        tokens, docs, chunks, info = (folder / name for name in STORE_FILES)
        return cls(load_npy(tokens), load_npy(docs), load_npy(chunks), [(info, 0)], chunk_length)

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    def chunk_ids(self, row: int) -> np.ndarray:
        c = self.chunks[row]
        return np.asarray(self.tokens[c["token_start"] : c["token_start"] + c["length"]], dtype=np.int64)

    def doc_ids(self, row: int) -> np.ndarray:
        """The token ids of document `row`, int64."""
        d = self.docs[row]
        return np.asarray(self.tokens[int(d["token_start"]) : int(d["token_start"] + d["num_tokens"])], dtype=np.int64)

    def continuation(self, row: int) -> int | None:
        """The chunk that follows `row` in the same document, or None at the document's end."""
        nxt = row + 1
        if nxt < len(self.chunks) and self.chunks[nxt]["doc"] == self.chunks[row]["doc"]:
            return nxt
        return None

    def train_mask(self) -> np.ndarray:
        """Per chunk: True where its document is in the training split (the retrieval database)."""
        return ~self.docs["valid"][self.chunks["doc"]]

    def doc_info(self, rows: Iterable[int]) -> dict[int, dict]:
        """{"id", "title", "source"} of the given document rows (one pass over the docs.jsonl files)."""
        wanted = set(int(r) for r in rows)
        out: dict[int, dict] = {}
        for path, first in self.doc_info_paths:
            if not wanted - out.keys():
                break
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, first):
                    if i in wanted:
                        out[i] = json.loads(line)
        return out

    def iter_doc_info(self) -> Iterator[tuple[int, dict]]:
        """(global row, {"id", "title", "source"}) of every document."""
        for path, first in self.doc_info_paths:
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, first):
                    yield i, json.loads(line)
