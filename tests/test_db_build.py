"""`retro db build / query / info` end to end: stages, resume after a kill, settings mismatch, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrocli.config import load_config, min_chunk_tokens
from retrocli.db.database import Database, workspace_of
from retrocli.workspace import DB_STAGES

from .conftest import run_cli

REPO = Path(__file__).resolve().parent.parent


def stage_files(ws_root: Path) -> dict[str, bytes]:
    """Every finished artefact (not metadata, which holds timings) by relative path."""
    return {str(p.relative_to(ws_root)): p.read_bytes() for p in sorted(ws_root.rglob("*"))
            if p.is_file() and p.name != "meta.json"}


def test_build_query_info(small_workspace):
    toml = small_workspace()
    run_cli("db", "build", "-c", str(toml), check=True)
    cfg = load_config(toml)
    ws = workspace_of(cfg)
    for stage in DB_STAGES:
        assert ws.require(stage)["complete"]
    store = Database.open(ws, cfg.db.chunk_length).store
    chunk_docs = store.chunks["doc"]
    train = store.train_mask()
    # every chunk of every document has neighbours: database (train) chunks from other documents only
    neighbours = np.concatenate([np.load(p) for p in sorted(ws.stage_dir("neighbours").glob("block-*.npy"))])
    assert neighbours.shape == (store.num_chunks, cfg.db.num_neighbors_query)
    assert (neighbours >= 0).all()
    assert (chunk_docs[neighbours] != chunk_docs[:, None]).all()
    assert train[neighbours].all()
    shortest = min_chunk_tokens(cfg.db)  # 16 // 4
    assert (store.chunks["length"][neighbours] >= shortest).all(), "a short tail was indexed"
    assert (store.chunks["length"] < shortest).any(), "the corpus has no short tail to test"
    assert (~train).any(), "the split held out no document"

    # a chunk's own text finds itself first
    text = run_cli("db", "query", "-c", str(toml), "--json", "-k", "3", "sail boat wind harbour mast keel",
                   check=True).stdout
    (answer,) = json.loads(text)  # one {"query", "results"} object per query
    assert answer["query"] == "sail boat wind harbour mast keel"
    hits = answer["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert set(hits[0]) == {"rank", "distance", "chunk_id", "doc_id", "title", "source", "text", "continuation"}
    assert all(h["title"].startswith("sailing") for h in hits)
    assert hits[0]["distance"] <= hits[1]["distance"] <= hits[2]["distance"]

    info = json.loads(run_cli("db", "info", "-c", str(toml), "--json", check=True).stdout)
    assert all(s["state"] == "complete" for s in info["stages"].values())
    assert info["stages"]["chunks"]["counts"]["chunks"] == store.num_chunks

    # rerun: every stage is skipped, nothing rewritten
    before = {p: p.stat().st_mtime_ns for p in ws.root.rglob("*") if p.is_file()}
    run_cli("db", "build", "-c", str(toml), check=True)
    assert before == {p: p.stat().st_mtime_ns for p in ws.root.rglob("*") if p.is_file()}


def test_changed_settings_are_refused_not_reused(small_workspace):
    toml = small_workspace()
    run_cli("db", "build", "-c", str(toml), check=True)
    ws_root = workspace_of(load_config(toml)).root
    before = stage_files(ws_root)
    proc = run_cli("db", "build", "-c", str(toml), "--set", "db.index=IVF4,Flat")
    assert proc.returncode == 2
    assert "'index' stage" in proc.stderr and "'Flat'" in proc.stderr and "IVF4,Flat" in proc.stderr
    assert stage_files(ws_root) == before, "a refused build changed finished work"
    for verb in (["query", "x"], ["verify", "--fraction", "1"]):  # readers: searched as built, saying so
        proc = run_cli("db", verb[0], "-c", str(toml), "--set", "db.embedder=all-MiniLM-L6-v2", *verb[1:])
        assert proc.returncode == 0, proc.stderr
        assert "db.embedder 'lexical' (the config: 'all-MiniLM-L6-v2'): read as built" in proc.stderr
    # asked for by name, the index and what follows it are rebuilt; earlier stages stay
    run_cli("db", "build", "-c", str(toml), "--set", "db.index=IVF4,Flat", "--rebuild", "index", check=True)
    after = stage_files(ws_root)
    assert all(after[k] == v for k, v in before.items() if k.startswith(("db/chunks", "db/embed")))


def test_a_compressed_index_reranked_by_the_stored_vectors_finds_the_exact_neighbours(small_workspace):
    toml = small_workspace(n_docs=12, words=250)  # ~600 chunks, every one a candidate below
    run_cli("db", "build", "-c", str(toml), check=True)  # db.index = "Flat": exact
    cfg = load_config(toml)
    ws = workspace_of(cfg)
    store = Database.open(ws, cfg.db.chunk_length).store
    vectors = np.concatenate([np.load(p) for p in sorted(ws.stage_dir("embed").glob("block-*.npy"))])

    def neighbours() -> tuple[np.ndarray, np.ndarray]:
        """The stored neighbour ids, and the exact similarity of each to its chunk (ties make ids unstable)."""
        ids = np.concatenate([np.load(p) for p in sorted(ws.stage_dir("neighbours").glob("block-*.npy"))])
        return ids, np.einsum("nd,nkd->nk", vectors, vectors[ids])

    exact_ids, exact = neighbours()
    # 4-byte PQ codes of the 1,024-dimensional vectors: in their own order a third of the neighbours are wrong
    pq = ["--set", 'db.index="PQ4"']
    run_cli("db", "build", "-c", str(toml), *pq, "--set", "db.rerank=0", "--rebuild", "index", check=True)
    pq_ids, coded = neighbours()
    assert np.mean([len(set(a) & set(b)) for a, b in zip(pq_ids, exact_ids)]) / exact_ids.shape[1] < 0.9  # 0.69
    assert "rerank" not in ws.read_meta("neighbours")["settings"]
    # by default (-1) a PQ index is re-ranked at depth 200: better, though not every chunk is a candidate
    run_cli("db", "build", "-c", str(toml), *pq, "--rebuild", "neighbours", check=True)
    assert ws.read_meta("neighbours")["settings"]["rerank"] == 200
    auto = neighbours()[1]  # the k best of candidates that hold the codes' k: better at every rank
    assert (auto >= -np.sort(-coded, axis=1) - 1e-5).all() and auto.mean() > coded.mean()
    # a changed db.rerank is a changed neighbours stage: refused, then rebuilt when asked for
    every = ["--set", f"db.rerank={store.num_chunks}"]  # every chunk a candidate, put in exact order
    proc = run_cli("db", "build", "-c", str(toml), *pq, *every)
    assert proc.returncode == 2 and "'neighbours' stage" in proc.stderr, proc.stderr
    run_cli("db", "build", "-c", str(toml), *pq, *every, "--rebuild", "neighbours", check=True)
    ids, reranked = neighbours()
    assert np.allclose(reranked, exact, atol=1e-5) and not np.allclose(coded, exact, atol=1e-5)
    # verify searches as the stage was built (db.rerank as recorded, not as [db] says now)
    report = json.loads(run_cli("db", "verify", "-c", str(toml), *pq, "--fraction", "1", "--json",
                                check=True).stdout)
    assert report["recomputed"]["neighbours"]["rows_identical"] == 1.0
    # and a query's hits come back in exact order too
    hits = json.loads(run_cli("db", "query", "-c", str(toml), *pq, *every, "--json", "-k", "5",
                              "sail boat wind harbour mast keel", check=True).stdout)[0]["results"]
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)


def test_a_corpus_moved_elsewhere_still_matches_its_database(small_workspace):
    toml = small_workspace()
    run_cli("db", "build", "-c", str(toml), check=True)
    ws_root = workspace_of(load_config(toml)).root
    before = stage_files(ws_root)
    moved = toml.parent / "elsewhere"
    (toml.parent / "corpus").rename(moved)
    proc = run_cli("db", "build", "-c", str(toml), "--set", f'corpus.train=["{moved}/*.jsonl"]')
    assert proc.returncode == 0, proc.stderr
    assert stage_files(ws_root) == before  # same files by name, size and content: nothing rebuilt
    (moved / "docs.jsonl").write_text((moved / "docs.jsonl").read_text().replace("the", "a"))
    changed = run_cli("db", "build", "-c", str(toml), "--set", f'corpus.train=["{moved}/*.jsonl"]')
    assert changed.returncode == 2 and "other settings" in changed.stderr


@pytest.mark.slow
def test_two_rank_torchrun_equals_one_process(small_workspace, tmp_path):
    # a PQ index: each rank's share of the neighbours is also re-ranked by the stored vectors (db.rerank = -1)
    toml = small_workspace(n_docs=50, db={"index": "IVF16,PQ16x4"})
    run_cli("db", "build", "-c", str(toml), check=True, env={"OMP_NUM_THREADS": "1"})  # (k-means: as the ranks)
    assert workspace_of(load_config(toml)).read_meta("neighbours")["settings"]["rerank"] == 200
    two = tmp_path / "two.toml"
    two.write_text(toml.read_text().replace('dir = "ws"', 'dir = "ws-two"'))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "retrocli", "db", "build", "-c", str(two)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_files = stage_files(workspace_of(load_config(toml)).root)
    two_files = stage_files(workspace_of(load_config(two)).root)
    assert one_files.keys() == two_files.keys()
    assert one_files == two_files


@pytest.mark.slow
def test_default_embedder_end_to_end(small_workspace):
    """The packaged all-MiniLM-L6-v2, offline: a paraphrase finds its topic."""
    toml = small_workspace(n_docs=10, words=120, db={"embedder": "all-MiniLM-L6-v2", "embed_batch_size": 32})
    run_cli("db", "build", "-c", str(toml), check=True, env={"HF_HUB_OFFLINE": "1"})
    hits = json.loads(run_cli("db", "query", "-c", str(toml), "--json", "-k", "2",
                              "a cake needs flour, sugar and butter in a hot oven", check=True).stdout)[0]["results"]
    assert hits[0]["title"].startswith("cooking")


def test_tiny_recipe_cli_lexical(tmp_path):
    """The recipe itself, with the fast embedder, in a temporary workspace."""
    ws = tmp_path / "tiny-ws"
    proc = run_cli("db", "build", "-c", str(REPO / "recipes/tiny.toml"), "--set", "db.embedder=lexical",
                   "--set", f"workspace.dir={json.dumps(str(ws))}", check=True)
    assert "neighbours" in proc.stderr
    hits = json.loads(run_cli("db", "query", "-c", str(REPO / "recipes/tiny.toml"), "--set",
                              "db.embedder=lexical", "--set", f"workspace.dir={json.dumps(str(ws))}", "--json",
                              "the if statement is used for conditional execution", check=True).stdout)[0]["results"]
    assert any(h["doc_id"] in ("pydoc:if", "pydoc:else") for h in hits[:3])


def test_stage_before_its_input_is_a_user_error(small_workspace):
    toml = small_workspace()
    proc = run_cli("db", "query", "-c", str(toml), "anything")
    assert proc.returncode == 2 and "run `retro db build` first" in proc.stderr


def test_empty_corpus_and_short_documents(small_workspace, tmp_path):
    toml = small_workspace()
    (tmp_path / "corpus" / "docs.jsonl").write_text("")
    proc = run_cli("db", "build", "-c", str(toml))
    assert proc.returncode == 2 and "docs.jsonl: empty file" in proc.stderr
    # documents shorter than a chunk are one short chunk each, and still get neighbours
    docs = [{"id": f"s{i}", "text": f"word{i} sail boat"} for i in range(30)]
    (tmp_path / "corpus" / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    proc = run_cli("db", "build", "-c", str(toml), "--set", "tokenizer.vocab_size=100")
    assert proc.returncode == 2 and "Raise tokenizer.vocab_size" in proc.stderr
    proc = run_cli("db", "build", "-c", str(toml), "--set", "db.min_chunk_tokens=12")
    assert proc.returncode == 2 and "db.min_chunk_tokens" in proc.stderr  # nothing long enough to index
    proc = run_cli("db", "build", "-c", str(toml), "--set", "db.min_chunk_tokens=1")
    assert proc.returncode == 0, proc.stderr
    store = Database.open(workspace_of(load_config(toml)), 16).store
    assert store.num_chunks == 30 and (store.chunks["length"] < 16).all()


def test_damaged_index_and_changed_tokenizer_are_user_errors(small_workspace, tmp_path):
    toml = small_workspace()
    run_cli("db", "build", "-c", str(toml), check=True)
    ws = workspace_of(load_config(toml))
    good_index = ws.index_file.read_bytes()
    ws.index_file.write_bytes(good_index[: len(good_index) // 3])
    proc = run_cli("db", "query", "-c", str(toml), "sail")
    assert proc.returncode == 2 and "index.faiss is damaged" in proc.stderr and "Traceback" not in proc.stderr
    ws.index_file.write_bytes(good_index)
    # another tokenizer for the same workspace: refused, naming the stage and the key
    other = tmp_path / "other.model"
    other.write_bytes(ws.tokenizer_model.read_bytes())
    proc = run_cli("db", "build", "-c", str(toml), "--set", f"tokenizer.path={json.dumps(str(other))}")
    assert proc.returncode == 2 and "'tokenizer' stage" in proc.stderr and "path" in proc.stderr
