"""Corpus formats, gzip, bad input (error naming file and line, or skipped and counted), the split."""

import gzip
import json
from pathlib import Path

import pytest

from retrocli.config import CorpusConfig
from retrocli.data.corpus import CorpusStats, corpus_files, is_valid, iter_documents, stdlib_docs_corpus, tiny_corpus
from retrocli.errors import UserError


def read(tmp_path: Path, **kw) -> tuple[list, CorpusStats]:
    cfg = CorpusConfig(**kw)
    stats = CorpusStats()
    return list(iter_documents(cfg, tmp_path, corpus_files(cfg, tmp_path), stats)), stats


def test_formats_and_gzip(tmp_path: Path):
    (tmp_path / "a.txt").write_text("plain text document")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": "x1", "title": "T", "body": "first"}) + "\n\n")
        f.write(json.dumps({"body": "second"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"body": "third", "title": "C"}]))
    docs, _ = read(tmp_path, train=["a.txt", "*.jsonl.gz", "c.json"], text_key="body", on_bad_line="skip")
    # a.txt has no 'body' key problem: .txt files are whole documents
    assert [d.text for d in docs] == ["plain text document", "first", "second", "third"]
    assert docs[0].id == "a.txt" and docs[1].id == "x1" and docs[1].title == "T"
    assert docs[2].id == "b.jsonl.gz:3"  # file:line when there is no id
    assert docs[3].title == "C"


@pytest.mark.parametrize("name, content, needle", [
    ("bad.jsonl", b'{"text": "ok"}\nnot json\n', "bad.jsonl:2: not JSON"),
    ("utf.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', "utf.jsonl:2: bytes that are not UTF-8"),
    ("shape.jsonl", b'[1, 2]\n', "shape.jsonl:1: expected a JSON object"),
    ("key.jsonl", b'{"body": "x"}\n', "key.jsonl:1: no string under the key 'text'"),
    ("empty.txt", b"", "empty.txt: empty file"),
    ("empty.jsonl", b"\n\n", "empty.jsonl: empty file"),
    ("utf.txt", b"line one\nline \xc3\x28 two\n", "utf.txt:2: bytes that are not UTF-8"),
    ("list.json", b'{"text": "x"}', "list.json: expected a JSON list"),
])
def test_bad_input_names_file_and_line(tmp_path: Path, name, content, needle):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError) as e:
        read(tmp_path, train=[name])
    assert needle in str(e.value)


def test_skip_counts_bad_lines(tmp_path: Path):
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "good"}\nnope\n{"text": ""}\n{"text": "also good"}\n')
    docs, stats = read(tmp_path, train=["d.jsonl"], on_bad_line="skip")
    assert [d.text for d in docs] == ["good", "also good"]
    assert sum(stats.skipped.values()) == 2 and stats.skipped["empty documents"] == 1


def test_globs_that_match_nothing_and_empty_corpus(tmp_path: Path):
    with pytest.raises(UserError, match="matches no file"):
        read(tmp_path, train=["*.jsonl"])
    with pytest.raises(UserError, match="corpus.train is empty"):
        read(tmp_path, train=[])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="not .txt, .jsonl or .json"):
        read(tmp_path, train=["x.csv"])


def test_split_is_seeded_and_proportional():
    ids = [f"doc-{i}" for i in range(20000)]
    valid = [is_valid(i, 1, 0.1) for i in ids]
    assert 0.09 < sum(valid) / len(ids) < 0.11
    assert valid == [is_valid(i, 1, 0.1) for i in ids]  # deterministic
    assert valid != [is_valid(i, 2, 0.1) for i in ids]  # seeded
    assert not any(is_valid(i, 1, 0.0) for i in ids[:100])


def test_builtin_corpora_are_real_english():
    tiny, stdlib = list(tiny_corpus()), list(stdlib_docs_corpus())
    assert len(tiny) > 50 and len(stdlib) > 50
    assert sum(len(d.text) for d in tiny) > 300_000 and sum(len(d.text) for d in stdlib) > 300_000
    ids = [d.id for d in tiny + stdlib]
    assert len(set(ids)) == len(ids)
    assert "The \"if\" statement" in " ".join(d.text for d in tiny)
