"""`retro db add | remove`: new documents are retrieved at once, a document already there is not added twice,
removed documents are never retrieved (nor given to pretraining as neighbours), a kill between writing a
segment and switching the manifest leaves the database as it was, and `db info` lists the edits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrocli.config import load_config, min_chunk_tokens
from retrocli.db import build as db
from retrocli.db import database
from retrocli.db.database import Database
from retrocli.db.store import ChunkStore
from retrocli.eval.generate import _settings_hash
from retrocli.train.pretrain import open_samples
from retrocli.workspace import sha256_file

from .conftest import load_benchmark, run_cli, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ZEBRA = ("The zebra crossing has stripes painted white and black across the road, so that pedestrians may cross "
         "while the traffic waits. ") * 6
QUERY = "stripes painted white and black across the road for pedestrians"


@pytest.fixture
def built(small_workspace) -> Path:
    toml = small_workspace(n_docs=30, words=200)
    db.build(load_config(toml))
    return toml


def hits(toml: Path, text: str = QUERY, k: int = 3) -> list[str]:
    return [h["doc_id"] for h in database.query(load_config(toml), [text], k)[0]]


def test_added_documents_are_retrieved_and_not_added_twice(built: Path) -> None:
    before = hits(built)
    assert "zebra" not in before
    new = write_jsonl(built.parent / "new.jsonl", [{"id": "zebra", "title": "zebras", "text": ZEBRA}])
    proc = run_cli("db", "add", str(new), "-c", str(built), env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert hits(built)[0] == "zebra"
    # re-ranked by the stored vectors (the segment's embeddings.npy and the base's float16 blocks), the exact
    # index answers with the same similarities
    exact, reranked = (database.query(load_config(built, sets), [QUERY], 8)[0] for sets in ([], ["db.rerank=50"]))
    assert reranked[0]["doc_id"] == "zebra" and {h["doc_id"] for h in reranked} == {h["doc_id"] for h in exact}
    assert np.allclose([h["distance"] for h in reranked], [h["distance"] for h in exact], atol=2e-3)
    found = database.query(load_config(built), [QUERY], 1)[0][0]
    assert found["source"].endswith("new.jsonl") and found["text"] in ZEBRA
    again = run_cli("db", "add", str(new), "-c", str(built))  # the same id
    same_text = write_jsonl(built.parent / "copy.jsonl", [{"id": "zebra-copy", "text": ZEBRA}])
    copy = run_cli("db", "add", str(same_text), "-c", str(built))  # the same text under another id
    for p in (again, copy):
        assert p.returncode == 0 and "already in the database" in p.stderr.replace("\n", " ")
    store = Database.open(database.workspace_of(load_config(built)), 16).store
    ids = [info["id"] for _, info in store.iter_doc_info()]
    assert ids.count("zebra") == 1 and "zebra-copy" not in ids
    # pretraining reads the added document and its chunks' neighbours, which exist and are not its own
    cfg = load_config(built)
    samples = open_samples(cfg, database.workspace_of(cfg), "train", 0, 2, retrieval=True)
    zebra_row = ids.index("zebra")
    assert zebra_row in samples.docs.doc_keys
    first = int(store.docs["chunk_start"][zebra_row])
    table = samples.table[np.arange(first, first + int(store.docs["num_chunks"][zebra_row]))]
    assert (table >= 0).all() and not np.isin(store.chunks["doc"][table], [zebra_row]).any()
    info = json.loads(run_cli("db", "info", "-c", str(built), "--json").stdout)
    assert [s["documents"] for s in info["edits"]["sources"]] == [["zebra"]]
    assert info["edits"]["sources"][0]["sha256"] == sha256_file(new)  # the manifest records what was added


def test_duplicates_are_found_by_key_without_reading_the_database(built: Path, monkeypatch) -> None:
    """`db add` looks new documents up in sorted keys (id, tokens): after the first add it reads no document
    of the base store; a removed document may come back; a missing or damaged key file is made again."""
    from retrocli.db import edit as edits

    cfg = load_config(built)
    ws = database.workspace_of(cfg)
    corpus = [json.loads(line) for line in (built.parent / "corpus" / "docs.jsonl").read_text().splitlines()]
    first, second = corpus[0], corpus[1]
    edits.add(cfg, [str(write_jsonl(built.parent / "z.jsonl", [{"id": "zebra", "text": ZEBRA}]))])
    assert (ws.db / "edits" / "base-keys.npz").is_file() and (ws.db / "edits" / "add-000001" / "keys.npz").is_file()

    original = ChunkStore.iter_doc_info

    def guarded(self):  # the base's docs.jsonl must not be read again
        if any(path == ws.doc_info for path, _ in self.doc_info_paths):
            raise AssertionError("db add read every document of the database")
        return original(self)

    monkeypatch.setattr(ChunkStore, "iter_doc_info", guarded)
    batch = [{"id": "renamed", "text": first["text"]},          # a base document's text under a new id
             {"id": second["id"], "text": "something else entirely, about kiwi birds"},  # a base id
             {"id": "zebra", "text": "a new text under the added document's id"},
             {"id": "kiwi", "text": ZEBRA.replace("zebra", "kiwi")},                     # new
             {"id": "kiwi-again", "text": ZEBRA.replace("zebra", "kiwi")}]               # new, twice in one file
    out = edits.add(cfg, [str(write_jsonl(built.parent / "batch.jsonl", batch))])
    assert out["documents"] == 1 and out["duplicates"] == ["renamed", second["id"], "zebra", "kiwi-again"]
    monkeypatch.setattr(ChunkStore, "iter_doc_info", original)

    # a removed document is no longer present: its text may be added again
    edits.remove(cfg, [first["id"]], [])
    back = edits.add(cfg, [str(write_jsonl(built.parent / "back.jsonl", [{"id": "back", "text": first["text"]}]))])
    assert back["documents"] == 1
    # key files are a cache: damaged or missing, they are made again
    (ws.db / "edits" / "base-keys.npz").write_bytes(b"damaged")
    (ws.db / "edits" / "add-000001" / "keys.npz").unlink()
    again = edits.add(cfg, [str(write_jsonl(built.parent / "again.jsonl", [{"id": "zebra2", "text": ZEBRA}]))])
    assert again["documents"] == 0 and again["duplicates"] == ["zebra2"]


def test_removed_documents_are_never_retrieved_again(built: Path) -> None:
    cfg = load_config(built)
    top = hits(built, "the", k=5)
    victim = top[0]
    proc = run_cli("db", "remove", "--doc", victim, "-c", str(built))
    assert proc.returncode == 0, proc.stderr
    for text in ["the", QUERY, "star planet orbit telescope", "flour butter oven"]:
        assert victim not in hits(built, text, k=10)
    # neither as a pretraining neighbour
    ws = database.workspace_of(cfg)
    store = Database.open(ws, 16).store
    samples = open_samples(cfg, ws, "train", 0, 2, retrieval=True)
    row = [r for r, info in store.iter_doc_info() if info["id"] == victim][0]
    for i in range(len(samples)):
        got = samples.get(i)["neighbour_ids"]
        assert not np.isin(store.chunks["doc"][got[got >= 0]], [row]).any()
    # by source: every document of the corpus file
    gone = run_cli("db", "remove", "--source", "corpus/docs.jsonl", "-c", str(built))
    assert gone.returncode == 0, gone.stderr
    assert hits(built, "the") == []
    unknown = run_cli("db", "remove", "--doc", "no-such-doc", "-c", str(built))
    assert unknown.returncode == 2 and "no-such-doc" in unknown.stderr


def test_a_kill_before_the_manifest_switch_leaves_the_database_as_it_was(built: Path) -> None:
    before = hits(built)
    new = write_jsonl(built.parent / "new.jsonl", [{"id": "zebra", "text": ZEBRA}])
    killed = run_cli("db", "add", str(new), "-c", str(built), env={"RETRO_FAULT": "add:segment"})
    assert killed.returncode == 137
    assert hits(built) == before  # the half-written segment is not read
    ok = run_cli("db", "add", str(new), "-c", str(built))
    assert ok.returncode == 0, ok.stderr
    edits = built.parent / "ws" / "db" / "edits"
    assert not list(edits.glob(".tmp-*")) and hits(built)[0] == "zebra"
    # a completed database build is not disturbed by the edits
    rebuilt = run_cli("db", "build", "-c", str(built))
    assert rebuilt.returncode == 0 and hits(built)[0] == "zebra"
    # a remove killed before its manifest switch removed nothing; its rerun removes
    killed = run_cli("db", "remove", "--doc", "zebra", "-c", str(built), env={"RETRO_FAULT": "remove:manifest"})
    assert killed.returncode == 137 and hits(built)[0] == "zebra"
    assert run_cli("db", "remove", "--doc", "zebra", "-c", str(built)).returncode == 0
    assert "zebra" not in hits(built)


def test_edits_need_a_built_database(small_workspace) -> None:
    toml = small_workspace()
    proc = run_cli("db", "add", "x.jsonl", "-c", str(toml))
    assert proc.returncode == 2 and "retro db build" in proc.stderr


def test_answers_cite_what_the_database_holds_after_each_edit(tmp_path: Path) -> None:
    """Knowledge updates without training: a question's retrieved context (and the chunks the CCA reads
    while answering) follow `db add` and `db remove`; the answers say where they came from."""
    from .test_sft import sft_workspace

    toml = sft_workspace(tmp_path)  # a pretrained tiny Retro over the synthetic topics
    task = write_jsonl(tmp_path / "q.jsonl", [{"id": "q1", "question": "The zebra crossing has stripes painted "
                                               "in which colours across the road?", "answer": ["white"]}])
    args = ["generate", str(task), "-c", str(toml), "--set", 'generate.contexts="database"', "--set",
            "generate.num_contexts=1", "--set", "generate.max_new_tokens=4", "--set", 'generate.neighbors="database"']

    def cited(name: str) -> tuple[str, set[int]]:
        out = tmp_path / f"{name}.jsonl"
        proc = run_cli(*args, "--out", str(out), env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        answer = json.loads(out.read_text())
        return answer["contexts"][0]["doc_id"], {c for ids in answer["neighbour_chunks"] for c in ids}

    opened = lambda: Database.open(database.workspace_of(load_config(toml)), 16)  # noqa: E731
    store = lambda: opened().store  # noqa: E731

    def resume_key() -> str:  # answers kept by a killed run are resumed only under the same key
        cfg = load_config(toml)
        ws = database.workspace_of(cfg)
        tok = database.open_tokenizer(ws)
        return _settings_hash(cfg, ws, toml, "database", task, opened(), tok, tok.eos_ids)

    keys = [resume_key()]
    before, _ = cited("before")
    assert not before.startswith("zebra")
    white = write_jsonl(tmp_path / "white.jsonl", [{"id": "zebra-white", "text": ZEBRA}])
    assert run_cli("db", "add", str(white), "-c", str(toml)).returncode == 0
    keys.append(resume_key())
    doc, chunks = cited("added")
    assert doc == "zebra-white"
    s = store()
    rows = {r for r, info in s.iter_doc_info() if info["id"] == "zebra-white"}
    assert any(int(s.chunks["doc"][c]) in rows for c in chunks if c >= 0)  # the CCA read the new document too
    assert run_cli("db", "remove", "--doc", "zebra-white", "-c", str(toml)).returncode == 0
    keys.append(resume_key())
    assert cited("removed")[0] == before
    assert len(set(keys)) == 3  # an edit makes answers written before it stale
    green = write_jsonl(tmp_path / "green.jsonl",
                        [{"id": "zebra-green", "text": ZEBRA.replace("white and black", "green and gold")}])
    assert run_cli("db", "add", str(green), "-c", str(toml)).returncode == 0
    doc, chunks = cited("changed")
    assert doc == "zebra-green"
    s = store()
    removed = {r for r, info in s.iter_doc_info() if info["id"] == "zebra-white"}
    assert not any(int(s.chunks["doc"][c]) in removed for c in chunks if c >= 0)


def test_queries_during_an_add_see_the_database_before_or_after_it(built: Path) -> None:
    """A reader opens the manifest once: while `db add` runs, every query answers from one whole state."""
    import subprocess
    import sys

    before = hits(built)
    new = write_jsonl(built.parent / "new.jsonl", [{"id": f"zebra-{i}", "text": ZEBRA + f" Crossing {i}."}
                                                  for i in range(40)])
    adding = subprocess.Popen([sys.executable, "-m", "retrocli", "db", "add", str(new), "-c", str(built)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    while adding.poll() is None:
        seen.append(hits(built))
    assert adding.wait() == 0, adding.stderr.read()
    assert len(seen) >= 3  # queries ran while the add did
    after = hits(built)
    assert after != before and all(h[0].startswith("zebra-") for h in [after])
    assert all(h == before or h == after for h in seen), seen


def test_a_kill_after_the_segment_is_in_place_but_not_listed_is_cleared_by_the_next_add(built: Path) -> None:
    before = hits(built)
    new = write_jsonl(built.parent / "new.jsonl", [{"id": "zebra", "text": ZEBRA}])
    killed = run_cli("db", "add", str(new), "-c", str(built), env={"RETRO_FAULT": "add:manifest"})
    assert killed.returncode == 137
    edits = built.parent / "ws" / "db" / "edits"
    assert (edits / "add-000001").is_dir() and hits(built) == before  # in place, but not live
    ok = run_cli("db", "add", str(new), "-c", str(built))
    assert ok.returncode == 0, ok.stderr
    assert hits(built)[0] == "zebra"
    assert [s["name"] for s in json.loads((edits / "manifest.json").read_text())["segments"]] == ["add-000001"]


def test_retrain_trains_one_index_over_every_live_chunk(small_workspace) -> None:
    toml = small_workspace(n_docs=30, words=200, db={"index": "IVF4,Flat", "nprobe": 4})
    db.build(load_config(toml))
    cfg = load_config(toml)
    ws = database.workspace_of(cfg)
    victim = hits(toml, "the", k=1)[0]
    assert run_cli("db", "remove", "--doc", victim, "-c", str(toml)).returncode == 0
    first = write_jsonl(toml.parent / "a.jsonl", [{"id": "zebra", "text": ZEBRA}])
    assert run_cli("db", "add", str(first), "-c", str(toml)).returncode == 0
    second = write_jsonl(toml.parent / "b.jsonl", [{"id": "kiwi", "text": ZEBRA.replace("zebra", "kiwi bird")}])
    # the embedding blocks are read at the size they were built with, whatever db.block_size says now
    proc = run_cli("db", "add", str(second), "--retrain", "-c", str(toml), "--set", "db.block_size=7")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((ws.db / "edits" / "manifest.json").read_text())
    retrained = manifest["index"]
    assert retrained["segments"] == ["add-000001", "add-000002"]
    opened = Database.open(cfg)
    store, index = opened.store, opened.index(cfg.db)
    assert not hasattr(index, "parts") or len(index.parts) == 1  # one index, no segment searched beside it
    live = store.train_mask() & (store.chunks["length"] >= min_chunk_tokens(cfg.db))
    live[np.isin(store.chunks["doc"], store.removed_docs)] = False
    assert retrained["ntotal"] == int(live.sum())
    assert {"zebra", "kiwi"} <= set(hits(toml, k=3))
    assert victim not in hits(toml, "the", k=20)
    # a later add goes into the retrained quantizer, and is searched beside it
    third = write_jsonl(toml.parent / "c.jsonl", [{"id": "late", "text": ZEBRA.replace("zebra", "okapi")}])
    assert run_cli("db", "add", str(third), "-c", str(toml)).returncode == 0
    assert "late" in hits(toml, k=5)


def test_db_build_searches_again_only_the_neighbour_rows_that_named_a_removed_chunk(built: Path) -> None:
    cfg = load_config(built)
    ws = database.workspace_of(cfg)
    opened = Database.open(ws, 16)
    store = opened.store
    before = opened.neighbours[np.arange(store.num_chunks)]
    victim_row = int(store.chunks["doc"][before[0, 0]])  # a document some chunk's first neighbour comes from
    victim = store.doc_info([victim_row])[victim_row]["id"]
    assert run_cli("db", "remove", "--doc", victim, "-c", str(built)).returncode == 0
    store = Database.open(ws, 16).store
    gone = np.flatnonzero(store.chunks["doc"] == victim_row)
    named = np.isin(before, gone).any(1) & (store.chunks["doc"] != victim_row)
    killed = run_cli("db", "build", "-c", str(built), env={"RETRO_FAULT": "refresh:manifest"})
    assert killed.returncode == 137  # its refresh folder is in place but not listed: the rerun clears it
    proc = run_cli("db", "build", "-c", str(built))
    assert proc.returncode == 0, proc.stderr
    opened = Database.open(ws, 16)
    store = opened.store
    after = opened.neighbours[np.arange(store.num_chunks)]
    refresh = json.loads((ws.db / "edits" / "manifest.json").read_text())["refresh"]
    assert refresh["searched_now"] == int(named.sum()) > 0
    assert (after[~named] == before[~named]).all()  # the rest are untouched
    assert not np.isin(after[named], gone).any()  # and the searched rows are full again, without the victim
    assert (after[named] >= 0).all() and not (after[named] == before[named]).all()
    again = run_cli("db", "build", "-c", str(built))  # up to date: nothing searched again
    assert again.returncode == 0
    assert json.loads((ws.db / "edits" / "manifest.json").read_text())["refresh"] == refresh
    # a second removal: the next refresh searches the rows naming it, and keeps the first refresh's others
    second_row = int(store.chunks["doc"][after[named][0, 0]])
    second = store.doc_info([second_row])[second_row]["id"]
    assert run_cli("db", "remove", "--doc", second, "-c", str(built)).returncode == 0
    assert run_cli("db", "build", "-c", str(built)).returncode == 0
    opened = Database.open(ws, 16)
    store = opened.store
    final = opened.neighbours[np.arange(store.num_chunks)]
    live = ~np.isin(store.chunks["doc"], [victim_row, second_row])
    gone = np.flatnonzero(~live)  # the chunks of both removed documents
    assert not np.isin(final[live], gone).any()  # no live row names a removed chunk
    untouched = live & ~np.isin(after, gone).any(1)
    assert (final[untouched] == after[untouched]).all()


def test_an_open_database_keeps_the_edits_it_was_opened_with(built: Path) -> None:
    """`Database` reads the manifest once: a `db add` that lands between opening and searching is not seen
    half-way (neither its rows in the store nor its segment in the index), and the next open sees all of it."""
    from retrocli.db import edit as edits
    from retrocli.db.database import Manifest

    cfg = load_config(built)
    opened = Database.open(cfg)
    chunks, before = opened.store.num_chunks, opened.query([QUERY], 3)
    edits.add(cfg, [str(write_jsonl(built.parent / "new.jsonl", [{"id": "zebra", "text": ZEBRA}]))])
    assert opened.store.num_chunks == chunks and not opened.manifest.segments
    assert opened.query([QUERY], 3) == before and opened.neighbours[np.arange(chunks)].shape[0] == chunks
    reopened = Database.open(cfg)
    assert reopened.store.num_chunks > chunks and reopened.query([QUERY], 1)[0][0]["doc_id"] == "zebra"
    # the typed manifest writes what it read
    ws = database.workspace_of(cfg)
    assert Manifest.read(ws).to_json() == json.loads((ws.db / "edits" / "manifest.json").read_text())


@pytest.mark.parametrize("index", ["Flat", "IVF4,Flat", "IVF4,PQ4x4"])
def test_removed_chunks_are_left_out_with_the_results_of_over_fetching(small_workspace, index: str) -> None:
    """Searches leave removed chunks out inside Faiss (an ID selector: IVF) or by asking for a little more
    (exact flat search, whose fast path a selector disables) with the results of asking Faiss for
    k + removed results and dropping the removed ones, as searches did before; re-ranked too (PQ codes).
    Among chunks with the same vector, which one is found is Faiss' choice either way."""
    from retrocli.db import edit as edits
    from retrocli.db.database import EditedIndex
    from retrocli.db.search import Reranked, search_excluding

    toml = small_workspace(n_docs=30, words=200, db={"index": index, "nprobe": 2})
    db.build(load_config(toml))
    cfg = load_config(toml)
    add = write_jsonl(toml.parent / "a.jsonl", [{"id": "zebra", "text": ZEBRA}])
    edits.add(cfg, [str(add)])  # a segment searched beside the base
    store = Database.open(cfg).store
    victims = [info["id"] for _, info in list(store.iter_doc_info())[:25:3]] + ["zebra"]
    edits.remove(cfg, victims, [])
    opened = Database.open(cfg)
    filtered = opened.index()
    edited = filtered.index if isinstance(filtered, Reranked) else filtered
    assert isinstance(edited, EditedIndex) and len(edited.parts) == 2
    assert all((p is None) == (index == "Flat") for p in edited.params)  # a selector for IVF
    over = load_benchmark("bench_removals").OverFetch(edited)  # the former search, as the benchmark times it
    if isinstance(filtered, Reranked):
        over = Reranked(over, opened.embeddings, filtered.depth)
    queries = opened.embeddings(np.arange(opened.store.num_chunks))
    docs = np.ascontiguousarray(opened.store.chunks["doc"])

    def same(got: np.ndarray, want: np.ndarray) -> bool:
        """The same ids, but where two chunks have the same vector (Faiss keeps whichever of equals it meets
        first, so which one depends on how many results are asked for, with or without removals)."""
        differ = got != want
        return bool(np.array_equal(queries[got[differ]], queries[want[differ]]))

    for k in (1, 5, 40):
        got, want = filtered.search(queries, k), over.search(queries, k)
        assert np.array_equal(got[0], want[0]) and same(got[1], want[1])
        assert not np.isin(got[1], opened.removed_chunks).any()
        ids, dist = search_excluding(filtered, queries, docs, docs, k)
        ids_over, dist_over = search_excluding(over, queries, docs, docs, k)
        assert np.array_equal(dist, dist_over) and same(ids, ids_over)
