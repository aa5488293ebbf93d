"""The BM25 stage (db.lexical_index = "bm25") and db.query_mode "bm25" | "hybrid".

A tiny database: topic filler documents and one paragraph of made-up words found nowhere else ("alpha").
"""

from __future__ import annotations

import json
from pathlib import Path

import bm25s
import numpy as np
import pytest
import Stemmer

from retrocli.config import load_config
from retrocli.db import bm25
from retrocli.db.build import build
from retrocli.db.database import Database, open_tokenizer, workspace_of

from .conftest import cli_in_process, small_sections, synthetic_documents, write_jsonl, write_toml
from .test_cli import first_line, retro

ALPHA = "zorblax quintessa vermilune oxtrapod glimmerfen"
MISSPELT = "zorblaxi quintessina vermilunio"  # no word BM25 knows, stemmed or not; the lexical embedder still
# matches its pieces
REPEATED = "quarnel"  # a document of this word alone: many chunks of one text


def workspace(root: Path, **db: object) -> Path:
    docs = synthetic_documents(20, 150) + [{"id": "repeated", "title": "", "text": (REPEATED + " ") * 50},
                                           {"id": "alpha", "title": "alpha", "text": ALPHA}]
    write_jsonl(root / "corpus" / "docs.jsonl", docs)
    return write_toml(root / "retro.toml", small_sections(corpus={"valid_fraction": 0.0}, db=db))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    toml = workspace(tmp_path_factory.mktemp("bm25"), lexical_index="bm25")
    build(load_config(toml))
    return toml


def query(toml: Path, mode: str, *texts: str, k: int = 3) -> list[list[dict]]:
    proc = retro("db", "query", "-c", str(toml), "--set", f"db.query_mode={mode}", "--json", "-k", str(k), *texts)
    assert proc.returncode == 0, proc.stderr
    return [q["results"] for q in json.loads(proc.stdout)]


def test_stage_scores_equal_bm25s_own(built: Path):
    cfg = load_config(built)
    database = Database.open(cfg)
    tok = open_tokenizer(database.ws)
    rows = bm25.indexed_rows(database.store, cfg.db)
    docs = database.store.chunks["doc"][rows]
    titles = database.store.doc_info(docs)
    texts = [titles[int(d)]["title"] + " " + tok.decode(database.store.chunk_ids(int(r)).tolist())
             for r, d in zip(rows, docs)]
    stem = Stemmer.Stemmer(bm25.STEMMER).stemWords
    own = bm25s.BM25(method=bm25.METHOD, k1=bm25.K1, b=bm25.B)
    own.index(bm25s.tokenize(texts, stopwords=bm25.STOPWORDS, stemmer=stem, show_progress=False),
              show_progress=False)
    queries = [ALPHA, "boats winds sailing harbours", "the violin and the piano melody", "quintessa boat", "alpha"]
    want_docs, want_scores = own.retrieve(bm25s.tokenize(queries, stopwords=bm25.STOPWORDS, stemmer=stem,
                                                         return_ids=False, show_progress=False), k=5,
                                          show_progress=False)
    cfg.db.query_mode = "bm25"
    ids, scores = Database.open(cfg).retriever().bm25.search(queries, 5)
    hit = want_scores > 0
    assert hit[:, 0].all()
    np.testing.assert_array_equal(ids, np.where(hit, rows[want_docs], -1))
    np.testing.assert_allclose(scores, np.where(hit, want_scores, 0), rtol=1e-6)
    alpha_chunk = int(database.store.docs["chunk_start"][-1])
    assert ids[4, 0] == alpha_chunk  # "alpha" is the title of that document only, not in its text


def test_search_leaves_out_the_continuation_of_a_better_hit(built: Path):
    """Each hit is shown with its continuation: a chunk shown that way already is not a hit of its own."""
    cfg = load_config(built)
    cfg.db.query_mode = "bm25"
    database = Database.open(cfg)
    store = database.store
    retriever = database.retriever()
    raw, _ = retriever.bm25.search([REPEATED], 12)  # every chunk of the "repeated" document, in a row
    ids, scores = retriever.search([REPEATED], 4)
    follows = [store.continuation(c) for c in raw[0].tolist()]
    assert any(nxt in raw[0].tolist() for nxt in follows)  # the raw ranking shows some chunks twice
    shown = set()
    for cid in ids[0].tolist():
        assert cid >= 0 and cid not in shown and cid in raw[0].tolist()
        shown |= {cid, store.continuation(cid)}
    assert len(set(store.chunks["doc"][ids[0]].tolist())) == 1 and (np.diff(scores[0]) <= 0).all()


def test_query_through_the_executable_bm25_and_hybrid(built: Path):
    assert query(built, "bm25", ALPHA)[0][0]["doc_id"] == "alpha"
    assert query(built, "bm25", MISSPELT) == [[]]  # no word in common: no hit, not a random chunk
    hybrid = query(built, "hybrid", ALPHA)[0]  # first in both rankings: 0.5 x 1 + 0.5 x 1
    assert hybrid[0]["doc_id"] == "alpha" and hybrid[0]["distance"] == pytest.approx(1.0, rel=1e-6)
    rrf = retro("db", "query", "-c", str(built), "--set", "db.query_mode=hybrid", "--set", "db.fusion=rrf", "--json",
                ALPHA)
    assert json.loads(rrf.stdout)[0]["results"][0]["distance"] == pytest.approx(2 / 61, rel=1e-6)


def test_hybrid_ranks_first_a_passage_only_one_ranker_finds(built: Path):
    cfg = load_config(built)
    alpha_chunk = int(Database.open(cfg).store.docs["chunk_start"][-1])
    cfg.db.query_mode = "bm25"
    assert (Database.open(cfg).retriever().search([MISSPELT], 5)[0] == -1).all()  # BM25 finds nothing
    cfg.db.query_mode = "hybrid"
    for fusion, first in (("linear", 0.5), ("rrf", 1 / 61)):  # the dense ranker's first, alone
        cfg.db.fusion = fusion
        ids, scores = Database.open(cfg).retriever().search([MISSPELT], 5)
        assert ids[0, 0] == alpha_chunk and scores[0, 0] == pytest.approx(first)
    # and in the fusions themselves: a passage one ranker alone ranks first stays first over those of rank 2 and 3
    ids, scores = bm25.mix([(np.array([[7, 1, 2]]), np.array([[0.9, 0.5, 0.1]])),
                            (np.array([[-1, -1, -1]]), np.zeros((1, 3)))], [0.6, 0.4], 3)
    assert ids.tolist() == [[7, 1, 2]] and scores[0].tolist() == pytest.approx([0.6, 0.3, 0.0])
    ids, _ = bm25.mix([(np.array([[1, 2, 3]]), np.array([[0.9, 0.8, 0.1]])),
                       (np.array([[9, 3, 2]]), np.array([[12.0, 11.0, 2.0]]))], [0.6, 0.4], 4)
    assert ids.tolist() == [[1, 2, 9, 3]]  # 0.6 x 1, 0.6 x 7/8 + 0.4 x 0, 0.4 x 1, 0.6 x 0 + 0.4 x 9/10
    ids, scores = bm25.fuse([np.array([[7, 1, 2]]), np.array([[-1, -1, -1]])], 3)
    assert ids.tolist() == [[7, 1, 2]] and scores[0, 0] == pytest.approx(1 / 61)
    ids, _ = bm25.fuse([np.array([[1, 2, 3]]), np.array([[9, 3, 2]])], 4)
    assert ids.tolist() == [[2, 3, 1, 9]]  # found by both (1/62 + 1/63, 1/63 + 1/62) before either alone


def test_stage_skipped_when_done_and_rebuilt_when_its_settings_change(tmp_path: Path, monkeypatch):
    toml = workspace(tmp_path, lexical_index="bm25")
    cfg = load_config(toml)
    first = build(cfg)["bm25"]
    meta = workspace_of(cfg).db / "bm25" / "meta.json"
    stamp = meta.stat().st_mtime_ns
    assert build(cfg)["bm25"]["finished"] == first["finished"] and meta.stat().st_mtime_ns == stamp
    monkeypatch.setattr(bm25, "K1", 1.2)
    again = build(cfg)["bm25"]
    assert again["settings"]["k1"] == 1.2 and again["finished"] > first["finished"]
    assert again["files"]["data.csc.index.npy"]["sha256"] != first["files"]["data.csc.index.npy"]["sha256"]


def test_default_builds_no_bm25_and_its_modes_say_how_to_build_it(tmp_path: Path, capsys):
    toml = workspace(tmp_path)
    metas = build(load_config(toml))
    assert "bm25" not in metas and not (workspace_of(load_config(toml)).db / "bm25").exists()
    for mode in ("bm25", "hybrid"):
        code, err = cli_in_process(capsys, "db", "query", "-c", str(toml), "--set", f"db.query_mode={mode}", "x")
        assert code == 2 and "db.lexical_index" in err and "retro db build" in err, err
    proc = retro("db", "query", "-c", str(toml), "--set", "db.query_mode=bm25", "x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert first_line(proc.stderr).startswith("error: db.query_mode 'bm25' searches the database's BM25 index")


def test_db_add_makes_a_passage_findable_by_bm25_and_db_remove_unfindable(tmp_path: Path):
    toml = workspace(tmp_path, lexical_index="bm25")
    build(load_config(toml))
    write_jsonl(tmp_path / "more.jsonl", [{"id": "new", "title": "Fennimorel", "text": "plumquart marrowind " * 20}])
    assert query(toml, "bm25", "plumquart") == [[]]
    proc = retro("db", "add", "-c", str(toml), str(tmp_path / "more.jsonl"))
    assert proc.returncode == 0, proc.stderr
    edits = workspace_of(load_config(toml)).db / "edits"
    lexical = json.loads((edits / "manifest.json").read_text())["bm25"]
    assert lexical["segments"] == ["add-000001"] and (edits / lexical["name"] / bm25.CHUNK_IDS).is_file()
    assert query(toml, "bm25", "plumquart")[0][0]["doc_id"] == "new"  # by BM25 alone
    assert query(toml, "bm25", "fennimorel")[0][0]["doc_id"] == "new"  # and by its title
    assert query(toml, "bm25", ALPHA)[0][0]["doc_id"] == "alpha"  # the base's chunks are in it too
    proc = retro("db", "remove", "-c", str(toml), "--doc", "new", "--doc", "alpha")
    assert proc.returncode == 0, proc.stderr
    for mode in ("bm25", "hybrid"):
        for text in ("plumquart", ALPHA):
            assert all(h["doc_id"] not in ("new", "alpha") for h in query(toml, mode, text, k=10)[0])


def test_documents_added_before_the_stage_are_indexed_by_db_build(tmp_path: Path, capsys):
    toml = workspace(tmp_path)
    build(load_config(toml))
    write_jsonl(tmp_path / "more.jsonl", [{"id": "new", "title": "Fennimorel", "text": "plumquart marrowind " * 20}])
    assert retro("db", "add", "-c", str(toml), str(tmp_path / "more.jsonl")).returncode == 0
    cfg = load_config(toml)
    cfg.db.lexical_index = "bm25"
    build(cfg)
    assert query(toml, "bm25", "plumquart")[0][0]["doc_id"] == "new"
    # an index the edits lack is refused, not silently partial
    manifest = workspace_of(cfg).db / "edits" / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["bm25"]
    manifest.write_text(json.dumps(m))
    code, err = cli_in_process(capsys, "db", "query", "-c", str(toml), "--set", "db.query_mode=bm25", "x")
    assert code == 2 and "out of date" in err and "retro db build" in err, err


def test_a_build_killed_in_the_stage_resumes_to_the_same_files(tmp_path: Path):
    toml = workspace(tmp_path, lexical_index="bm25")
    proc = retro("db", "build", "-c", str(toml), env={"RETRO_FAULT": "bm25:write"})
    assert proc.returncode == 137, proc.stderr
    meta = json.loads((tmp_path / "ws" / "db" / "bm25" / "meta.json").read_text())
    assert meta["complete"] is False
    assert retro("db", "build", "-c", str(toml)).returncode == 0
    resumed = json.loads((tmp_path / "ws" / "db" / "bm25" / "meta.json").read_text())
    assert resumed["complete"] and not (tmp_path / "ws" / "db" / "bm25" / ".building").exists()
    cfg = load_config(toml)
    again = build(cfg, rebuild="bm25")["bm25"]  # an uninterrupted build of the same chunks
    assert again["files"] == resumed["files"] and again["finished"] > resumed["finished"]
    assert query(toml, "bm25", ALPHA)[0][0]["doc_id"] == "alpha"


def test_info_verify_and_repair_know_the_stage(built: Path, tmp_path: Path):
    proc = retro("db", "info", "-c", str(built), "--json")
    assert proc.returncode == 0, proc.stderr
    stage = json.loads(proc.stdout)["stages"]["bm25"]
    assert stage["state"] == "complete" and stage["counts"]["chunks"] > 0
    ws = workspace_of(load_config(built)).db / "bm25"
    victim = ws / "params.index.json"
    good = victim.read_bytes()
    assert str(bm25.K1).encode() in good
    victim.write_bytes(good.replace(str(bm25.K1).encode(), str(bm25.K1 + 1).encode()))  # same size: the sha256 tells
    proc = retro("db", "verify", "-c", str(built), "--json")
    assert proc.returncode != 0 or json.loads(proc.stdout)["damaged"].get("bm25"), proc.stdout
    assert "params.index.json" in proc.stdout + proc.stderr
    proc = retro("db", "verify", "-c", str(built), "--repair")
    assert proc.returncode == 0, proc.stderr
    assert victim.read_bytes() == good
    assert retro("db", "build", "-c", str(built), "--rebuild", "bm25").returncode == 0
    plain = workspace(tmp_path)
    proc = retro("db", "build", "-c", str(plain), "--rebuild", "bm25")
    assert proc.returncode == 2 and "db.lexical_index" in proc.stderr, proc.stderr


def test_an_index_that_counts_words_otherwise_is_refused_until_rebuilt(tmp_path: Path, capsys):
    toml = workspace(tmp_path, lexical_index="bm25")
    build(load_config(toml))
    meta_path = workspace_of(load_config(toml)).db / "bm25" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["settings"].pop("stemmer")  # as an earlier retro wrote it: words not stemmed
    meta_path.write_text(json.dumps(meta))
    code, err = cli_in_process(capsys, "db", "query", "-c", str(toml), "--set", "db.query_mode=hybrid", ALPHA)
    assert code == 2 and "earlier retro" in err and "retro db build" in err, err
    assert build(load_config(toml))["bm25"]["settings"]["stemmer"] == bm25.STEMMER
    assert query(toml, "hybrid", ALPHA)[0][0]["doc_id"] == "alpha"
