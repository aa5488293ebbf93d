"""Inverted lists on disk (db.index_storage = "ondisk"): built block by block, by one process or two torchrun
ranks, merged into one .ivfdata file that searches map. An exhaustive IVF search (nprobe = nlist) finds what
exact search finds; a kill during the block adds or the merge, a torn .ivfdata and a full disk all end in
the same files."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from retrocli.db import index as faiss_index
from retrocli.errors import UserError

from .conftest import (
    cli_in_process,
    load_benchmark,
    run_cli,
    small_sections,
    synthetic_documents,
    write_jsonl,
    write_toml,
)

ONDISK = {"index": "IVF4,Flat", "nprobe": 4, "index_storage": "ondisk"}  # 4 lists, all visited: exact
QUERIES = ["sail boat wind harbour", "flour butter oven", "star planet orbit telescope"]


def index_files(ws: Path) -> dict[str, bytes]:
    """The index and neighbour stages' files (not meta.json, which holds timings) by relative path."""
    return {str(p.relative_to(ws)): p.read_bytes() for stage in ("index", "neighbours")
            for p in sorted((ws / "db" / stage).iterdir()) if p.is_file() and p.name != "meta.json"}


def query(toml: Path) -> list:
    return json.loads(run_cli("db", "query", "-c", str(toml), "--json", "-k", "5", *QUERIES, check=True).stdout)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A corpus with two databases built on it, in one process: exact (Flat, in memory) and on disk."""
    root = tmp_path_factory.mktemp("ondisk")
    write_jsonl(root / "corpus" / "docs.jsonl", synthetic_documents(40, 300))
    write_toml(root / "flat.toml", small_sections(workspace={"dir": "ws-flat"}))
    write_toml(root / "ondisk.toml", small_sections(workspace={"dir": "ws-ondisk"}, db=ONDISK))
    for name in ("flat", "ondisk"):
        run_cli("db", "build", "-c", str(root / f"{name}.toml"), check=True)
    return root


def copy_of(built: Path, tmp_path: Path, name: str) -> Path:
    """A copy of the on-disk workspace for one test, as workspace `name` (TOML path returned)."""
    shutil.copytree(built / "ws-ondisk", tmp_path / name)
    toml = write_toml(tmp_path / f"{name}.toml", small_sections(workspace={"dir": name}, db=ONDISK))
    shutil.copytree(built / "corpus", tmp_path / "corpus")
    return toml


def test_an_exhaustive_ondisk_index_finds_what_exact_search_finds(built: Path) -> None:
    ws = built / "ws-ondisk"
    index = sorted(p.name for p in (ws / "db" / "index").iterdir())
    assert index == ["index.faiss", "index.ivfdata", "meta.json", "trained.faiss"]  # the block files are merged
    meta = json.loads((ws / "db" / "index" / "meta.json").read_text())
    assert meta["settings"]["index_storage"] == "ondisk" and meta["counts"]["storage"] == "ondisk"
    ivfdata = ws / "db" / "index" / "index.ivfdata"
    assert meta["files"]["index.ivfdata"]["bytes"] == ivfdata.stat().st_size
    flat = json.loads((built / "ws-flat" / "db" / "index" / "meta.json").read_text())
    assert "index_storage" not in flat["settings"] and "storage" not in flat["counts"]  # as before the key
    exact = index_files(built / "ws-flat")
    ondisk = index_files(ws)
    neighbours = sorted(n for n in exact if n.startswith("db/neighbours/"))
    assert neighbours and all(ondisk[n] == exact[n] for n in neighbours)
    assert query(built / "ondisk.toml") == query(built / "flat.toml")


def test_two_torchrun_ranks_build_the_same_files_as_one_process(built: Path, tmp_path: Path) -> None:
    shutil.copytree(built / "corpus", tmp_path / "corpus")
    two = write_toml(tmp_path / "two.toml", small_sections(db=ONDISK))

    def torchrun(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", "-m", "retrocli", "db", "build", "-c", str(two)], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=300)

    # rank 1 dies after adding its second block: the ranks share the blocks (rank 1 has the odd ones)
    killed = torchrun(RETRO_FAULT="index:block:2", RETRO_FAULT_RANK="1")
    assert killed.returncode != 0
    folder = tmp_path / "ws" / "db" / "index"
    assert (folder / "block-000001.ivflists").is_file() and (folder / "block-000003.ivflists").is_file()
    assert not (folder / "block-000005.ivflists").exists() and not (folder / "index.ivfdata").exists()
    proc = torchrun()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert index_files(tmp_path / "ws") == index_files(built / "ws-ondisk")
    assert query(two) == query(built / "ondisk.toml")


def test_a_build_killed_in_the_block_adds_and_in_the_merge_ends_with_the_same_files(built: Path,
                                                                                     tmp_path: Path) -> None:
    toml = copy_of(built, tmp_path, "ws-killed")
    ws = tmp_path / "ws-killed"
    for stage in ("index", "neighbours"):
        shutil.rmtree(ws / "db" / stage)
    folder = ws / "db" / "index"
    proc = run_cli("db", "build", "-c", str(toml), env={"RETRO_FAULT": "index:block:3"})
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert sorted(p.name for p in folder.glob("block-*")) == [f"block-00000{i}.ivflists" for i in range(3)]
    proc = run_cli("db", "build", "-c", str(toml), env={"RETRO_FAULT": "index:merge"})
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert list(folder.glob(".index.ivfdata.tmp-*")) and not (folder / "index.ivfdata").exists()
    assert not json.loads((folder / "meta.json").read_text())["complete"]

    # the disk fills during the merge (a file size limit: writes past it fail with EFBIG)
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))  # the blocks' lists fit, not the merge

    full = subprocess.run([sys.executable, "-m", "retrocli", "db", "build", "-c", str(toml)], capture_output=True,
                          text=True, preexec_fn=limit, env={**os.environ, "COLUMNS": "1000"})
    said = "".join(full.stderr.split())
    assert full.returncode == 2 and "Traceback" not in said, full.stderr[-2000:]
    assert f"cannotwrite{folder / 'index.ivfdata'}" in said and "Filetoolarge" in said
    assert not list(folder.glob(".*.tmp-*")) and not (folder / "index.ivfdata").exists()
    assert len(list(folder.glob("block-*"))) == 62  # what was finished is kept

    # killed after the merged index is written, before the blocks are deleted: the rerun only tidies up
    proc = run_cli("db", "build", "-c", str(toml), env={"RETRO_FAULT": "index:merged"})
    assert proc.returncode == 137, proc.stderr[-2000:]
    merged = (folder / "index.ivfdata").stat().st_mtime_ns
    run_cli("db", "build", "-c", str(toml), check=True)
    assert (folder / "index.ivfdata").stat().st_mtime_ns == merged
    assert index_files(ws) == index_files(built / "ws-ondisk")


def test_a_torn_ivfdata_is_named_and_made_again(built: Path, tmp_path: Path) -> None:
    toml = copy_of(built, tmp_path, "ws-torn")
    ivfdata = tmp_path / "ws-torn" / "db" / "index" / "index.ivfdata"
    whole = ivfdata.read_bytes()
    ivfdata.unlink()
    proc = run_cli("db", "query", "-c", str(toml), "--json", "sail boat")
    said = "".join(proc.stderr.split())
    assert proc.returncode == 2 and f"{ivfdata}" in said and "ismissingorunreadable" in said
    assert proc.stdout == ""  # (Faiss prints where it looks for the lists: not into the answer)
    ivfdata.write_bytes(whole[:100_000])
    proc = run_cli("db", "query", "-c", str(toml), "sail boat")
    said = "".join(proc.stderr.split())
    assert proc.returncode == 2 and f"{ivfdata}" in said and "istorn" in said and "Traceback" not in said
    rebuilt = run_cli("db", "build", "-c", str(toml), check=True)
    assert "index.ivfdata" in "".join(rebuilt.stderr.split())
    assert index_files(tmp_path / "ws-torn") == index_files(built / "ws-ondisk")

    # a segment added to the database stays a small index in memory; the merged lists are not touched
    before = ivfdata.read_bytes()
    new = write_jsonl(tmp_path / "new.jsonl", [{"id": "new", "text": "zebra giraffe savanna " * 40}])
    run_cli("db", "add", str(new), "-c", str(toml), check=True)
    assert ivfdata.read_bytes() == before
    hits = json.loads(run_cli("db", "query", "-c", str(toml), "--json", "-k", "1", "zebra giraffe savanna",
                              check=True).stdout)[0]["results"]
    assert hits[0]["doc_id"] == "new"


def test_ondisk_needs_an_ivf_index(small_workspace, capsys) -> None:
    toml = small_workspace(db={"index": "HNSW32", "index_storage": "ondisk"})
    code, err = cli_in_process(capsys, "db", "build", "-c", str(toml))
    text = " ".join(err.split())
    assert code == 2 and "db.index_storage" in text and "db.index 'HNSW32'" in text and "IVF" in text


def test_storage_and_training_sample_rules() -> None:
    # auto: on disk where the lists (codes and ids) would take more than half the memory
    per_vector = 64 * 4 + 8  # IVF,Flat at dim 64
    assert faiss_index.resolve_storage("auto", "IVF16,Flat", 64, 1000, memory=2 * 1000 * per_vector) == "memory"
    assert faiss_index.resolve_storage("auto", "IVF16,Flat", 64, 1001, memory=2 * 1000 * per_vector) == "ondisk"
    assert faiss_index.resolve_storage("auto", "Flat", 64, 10**9, memory=1) == "memory"  # no lists to put on disk
    assert faiss_index.resolve_storage("memory", "IVF16,Flat", 64, 10**9, memory=1) == "memory"
    with pytest.raises(UserError, match="db.index_storage.*db.index is 'HNSW32'"):
        faiss_index.resolve_storage("ondisk", "HNSW32", 64, 10)
    with pytest.raises(UserError, match="db.index is \"auto\", which chose 'Flat' for 5,000 chunks"):
        faiss_index.resolve_storage("ondisk", "Flat", 64, 5000, chosen=True)
    with pytest.raises(UserError, match="all in its inverted lists"):  # a refinement's codes live beside them
        faiss_index.resolve_storage("ondisk", "IVF16,Flat,Refine(Flat)", 64, 10)
    assert faiss_index.resolve_storage("ondisk", "OPQ8_32,IVF16_HNSW32,PQ8", 64, 10) == "ondisk"
    # -1: 39 training vectors per centroid, capped by the training chunks; a number is taken as it is
    assert faiss_index.train_sample_size(-1, "IVF16,Flat", 64, 10**6) == 39 * 16
    assert faiss_index.train_sample_size(-1, "IVF16,PQ8", 64, 10**6) == 39 * 256
    assert faiss_index.train_sample_size(-1, "IVF16,Flat", 64, 100) == 100
    assert faiss_index.train_sample_size(5000, "IVF16,Flat", 64, 10**6) == 5000


def test_a_merge_without_room_on_disk_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    x = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # (inner product: each vector is its own nearest)
    trained = faiss_index.train("IVF4,Flat", x, seed=1)
    faiss_index.save(trained, tmp_path / "trained.faiss")
    trained.add_with_ids(x, np.arange(200, dtype=np.int64))
    faiss_index.save_lists(trained, tmp_path / "block.ivflists")
    lists = [faiss_index.read_lists(tmp_path / "block.ivflists", 200)]
    data = tmp_path / "index.ivfdata"
    monkeypatch.setattr(faiss_index.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**6, 10**6, 1000))
    with pytest.raises(UserError, match=f"cannot write {data}: No space left on device"):
        faiss_index.merge_lists(faiss_index.load(tmp_path / "trained.faiss"), lists, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block.ivflists", "trained.faiss"]
    monkeypatch.undo()
    merged = faiss_index.merge_lists(faiss_index.load(tmp_path / "trained.faiss"), lists, data)
    faiss_index.save(merged, tmp_path / "index.faiss")
    del merged
    index = faiss_index.load(tmp_path / "index.faiss", mmap=True)
    index.nprobe = 4
    _, ids = index.search(x[:5], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists),
                      faiss.OnDiskInvertedLists)


def test_the_storage_benchmark_measures_both_storages_alike(tmp_path: Path) -> None:
    """benchmarks/bench_scale.py --storage at a tiny size: the same recall (same codes) in memory and on disk."""
    bench = load_benchmark("bench_scale")
    rows = {}
    for storage in ("memory", "ondisk"):
        (tmp_path / storage).mkdir()
        rows[storage] = bench.storage_child(storage, 6000, "IVF8,Flat", 16, 2000, 0, 50, 20, 10, 8, tmp_path / storage)
    assert rows["memory"]["recall_at_10"] == rows["ondisk"]["recall_at_10"] == 1.0  # every list probed: exact
    assert sorted(p.name for p in (tmp_path / "ondisk").iterdir()) == ["index.faiss", "index.ivfdata", "trained.faiss"]
    assert rows["ondisk"]["merge_s"] > 0 and rows["memory"]["merge_s"] == 0


def test_blocks_beyond_the_mapping_budget_share_files_and_merge_to_the_same_index(built: Path, tmp_path: Path,
                                                                                    monkeypatch) -> None:
    """The merge maps every file of lists at once, so past MAX_LIST_FILES blocks each file holds several
    consecutive blocks' lists (Linux allows 65,530 mappings a process by default): the same merged index."""
    from retrocli.config import load_config
    from retrocli.db import build as build_module

    toml = copy_of(built, tmp_path, "grouped")
    blocks = json.loads((built / "ws-ondisk" / "db" / "embed" / "meta.json").read_text())["counts"]["blocks"]
    assert blocks > 2
    monkeypatch.setattr(build_module, "MAX_LIST_FILES", 2)
    written = []
    save = faiss_index.save_lists
    monkeypatch.setattr(faiss_index, "save_lists", lambda index, path: (written.append(path.name), save(index, path)))
    build_module.build(load_config(toml), rebuild="index")
    assert written == ["block-000000.ivflists", "block-000001.ivflists"]
    assert index_files(tmp_path / "grouped") == index_files(built / "ws-ondisk")
