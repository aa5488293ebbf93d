"""Chunking: boundaries, the short last chunk, documents shorter than a chunk, empty documents."""

from pathlib import Path

import pytest

from retrocli.data.corpus import Document
from retrocli.db.database import Database
from retrocli.db.store import build_chunks, chunk_spans
from retrocli.errors import UserError
from retrocli.workspace import Workspace


class WordTokenizer:
    """One token per word: makes chunk boundaries easy to check by hand."""

    vocab_size, eos_id, pad_id = 1000, 3, 0

    def encode(self, texts):
        return [[10 + int(w) for w in t.split()] for t in texts]

    def decode(self, ids):
        return " ".join(str(i - 10) for i in ids)


@pytest.mark.parametrize("n, m, expected", [
    (10, 4, [(0, 4), (4, 4), (8, 2)]),  # short last chunk
    (8, 4, [(0, 4), (4, 4)]),  # exact multiple
    (3, 4, [(0, 3)]),  # shorter than a chunk: one short chunk
    (0, 4, []),  # empty: no chunk
])
def test_chunk_spans(n, m, expected):
    assert chunk_spans(n, m) == expected


def doc(i: int, n: int) -> Document:
    return Document(id=f"d{i}", text=" ".join(str(j) for j in range(n)), title=f"t{i}")


def test_store_round_trip(tmp_path: Path):
    ws = Workspace(tmp_path)
    ws.stage_dir("chunks").mkdir(parents=True)
    docs = [doc(0, 10), doc(1, 3), Document(id="empty", text=" "), doc(2, 8)]
    counts = build_chunks(ws.stage_dir("chunks"), docs, WordTokenizer(), 4, seed=0, valid_fraction=0.0)
    assert counts["documents"] == 3 and counts["empty_after_tokenizing"] == 1
    assert counts["chunks"] == 3 + 1 + 2 and counts["tokens"] == 21
    store = Database.open(ws, 4).store
    assert store.chunks["doc"].tolist() == [0, 0, 0, 1, 2, 2]
    assert store.chunks["length"].tolist() == [4, 4, 2, 3, 4, 4]
    assert WordTokenizer().decode(store.chunk_ids(2).tolist()) == "8 9"
    assert WordTokenizer().decode(store.chunk_ids(3).tolist()) == "0 1 2"
    # continuations stop at the document's end
    assert [store.continuation(r) for r in range(6)] == [1, 2, None, None, 5, None]
    assert store.docs["num_chunks"].tolist() == [3, 1, 2]
    assert store.doc_info([1])[1]["id"] == "d1"
    assert store.train_mask().all()


def test_no_documents_is_an_error_and_leaves_nothing(tmp_path: Path):
    ws = Workspace(tmp_path)
    with pytest.raises(UserError, match="no documents"):
        build_chunks(ws.stage_dir("chunks"), [Document(id="e", text="")], WordTokenizer(), 4, seed=0,
                     valid_fraction=0.0)
    assert not ws.chunk_tokens.exists() and not list(tmp_path.rglob("*.tmp-*"))
