"""A kill anywhere in `db build` resumes to the same files; damaged artefacts are found and made again
(by size on every build, by checksum and recomputation in `db verify`); one writer per workspace, with stale
locks cleared; a full disk fails cleanly with the previous artefacts intact."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retrocli.config import load_config
from retrocli.db.database import workspace_of
from retrocli.workspace import DB_STAGES, LOCK_FILE, _start_time

from .conftest import cli_in_process, run_cli, small_sections, synthetic_documents, write_jsonl, write_toml

pytestmark = pytest.mark.faults

# Each point is inside a stage: after the tokenizer is trained, after the first batch of chunks, after the
# third embedding block, after the index is trained, after the second neighbour block.
KILL_POINTS = ["tokenizer:trained", "chunks:batch", "embed:block:3", "index:trained", "neighbours:block:2"]


def artefacts(ws_root: Path) -> dict[str, bytes]:
    """Every finished database file (not meta.json, which holds timings) by relative path."""
    return {str(p.relative_to(ws_root)): p.read_bytes() for p in sorted((ws_root / "db").rglob("*"))
            if p.is_file() and p.name != "meta.json"}


@pytest.fixture(scope="module")
def built_once(tmp_path_factory) -> Path:
    """A folder with a workspace TOML, its corpus and its built database (built once for this file)."""
    root = tmp_path_factory.mktemp("built")
    write_jsonl(root / "corpus" / "docs.jsonl", synthetic_documents(60, 300))
    toml = write_toml(root / "retro.toml", small_sections())
    run_cli("db", "build", "-c", str(toml), check=True)
    return root


@pytest.fixture
def built(built_once: Path, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A copy of the built workspace for one test (copying is much cheaper than building), and its files."""
    root = tmp_path / "copy"
    shutil.copytree(built_once, root)
    toml = root / "retro.toml"
    return toml, artefacts(workspace_of(load_config(toml)).root)


def test_a_build_killed_in_every_stage_in_turn_ends_with_the_uninterrupted_files(built) -> None:
    reference, expected = built
    toml = reference.parent / "killed.toml"
    toml.write_text(reference.read_text().replace('dir = "ws"', 'dir = "ws-killed"'))
    ws_root = workspace_of(load_config(toml)).root
    finished: dict[str, dict] = {}
    for point in KILL_POINTS:
        proc = run_cli("db", "build", "-c", str(toml), env={"RETRO_FAULT": point})
        assert proc.returncode == 137, (point, proc.stderr[-2000:])
        lock = json.loads((ws_root / LOCK_FILE).read_text())  # a kill leaves its lock behind ...
        assert lock["command"] == "db build"
        stage = point.split(":")[0]
        for done in DB_STAGES[: DB_STAGES.index(stage)]:
            meta = json.loads((ws_root / "db" / done / "meta.json").read_text())
            assert meta["complete"]
            # ... and what a stage finished before the kill is never redone by the reruns
            assert finished.setdefault(done, meta) == meta, f"{done} was redone after the kill at {point}"
    done = run_cli("db", "build", "-c", str(toml), check=True)
    assert "clearing a stale lock" in done.stderr  # the dead writer's lock, cleared with a message
    assert not (ws_root / LOCK_FILE).exists()
    assert artefacts(ws_root) == expected
    embed = json.loads((ws_root / "db" / "embed" / "meta.json").read_text())
    assert embed["counts"]["embedded_now"] == embed["counts"]["chunks"] - 3 * 50  # three blocks were kept


def test_damaged_files_are_found_and_made_again(built) -> None:
    toml, expected = built
    ws_root = workspace_of(load_config(toml)).root
    metas = {s: (ws_root / "db" / s / "meta.json").read_text() for s in DB_STAGES}
    db_dir = ws_root / "db"
    # torn and lost files, as a crash of the disk or a careless `rm` leaves them: found by size on every build
    (db_dir / "index" / "index.faiss").write_bytes((db_dir / "index" / "index.faiss").read_bytes()[:1000])
    block = db_dir / "embed" / "block-000001.npy"
    block.write_bytes(block.read_bytes()[:-7])
    (db_dir / "neighbours" / "block-000000.npy").unlink()
    proc = run_cli("db", "build", "-c", str(toml), check=True)
    said = "".join(proc.stderr.split())  # rich wraps long paths anywhere
    for name in ("index/index.faiss", "embed/block-000001.npy", "neighbours/block-000000.npy"):
        assert name in said
    assert said.count("identicaltothosefirstwritten") == 3
    assert artefacts(ws_root) == expected
    assert {s: (ws_root / "db" / s / "meta.json").read_text() for s in DB_STAGES} == metas  # nothing downstream moved

    # damage in place (same size) is not seen by a build, but by `db verify`, which also recomputes blocks
    ok = run_cli("db", "verify", "-c", str(toml), "--fraction", "0.5", "--json", check=True)
    report = json.loads(ok.stdout)
    assert report["recomputed"]["embed"]["ok"] and report["recomputed"]["neighbours"]["rows_identical"] == 1.0
    target = db_dir / "chunks" / "tokens.npy"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    bad = run_cli("db", "verify", "-c", str(toml), "--fraction", "1")  # every block, the damaged tokens' too
    assert bad.returncode == 2 and "tokens.npy" in bad.stderr and "--repair" in bad.stderr
    assert "Traceback" not in bad.stderr
    run_cli("db", "verify", "-c", str(toml), "--repair", check=True)
    assert artefacts(ws_root) == expected
    run_cli("db", "verify", "-c", str(toml), "--fraction", "1", "--set", "db.block_size=7", check=True)


def test_one_writer_at_a_time_and_readers_are_never_blocked(built, capsys) -> None:
    toml, _ = built
    ws_root = workspace_of(load_config(toml)).root
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        lock = {"pid": writer.pid, "host": socket.gethostname(), "command": "pretrain", "token": "other-job",
                "since": "2026-11-27 07:00:00", "started_ticks": _start_time(writer.pid)}
        (ws_root / LOCK_FILE).write_text(json.dumps(lock))
        for args in (["db", "build"], ["db", "add", "x.jsonl"], ["db", "remove", "--doc", "doc1"], ["pretrain"]):
            code, err = cli_in_process(capsys, *args, "-c", str(toml))  # refused before any work
            text = "".join(err.split())
            assert code == 2 and "retropretrain" in text and f"pid{writer.pid}" in text and LOCK_FILE in text, err
        query = run_cli("db", "query", "-c", str(toml), "star planet orbit")  # a reader: not blocked
        assert query.returncode == 0 and "astronomy" in query.stdout + query.stderr
    finally:
        writer.kill()
        writer.wait()
    proc = run_cli("db", "remove", "--doc", "doc1", "-c", str(toml))  # the holder died: its lock is stale
    assert proc.returncode == 0 and "stale lock" in proc.stderr
    assert not (ws_root / LOCK_FILE).exists()


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_fails_cleanly_and_leaves_the_database_as_it_was(built) -> None:
    toml, before = built
    ws_root = workspace_of(load_config(toml)).root
    docs = [{"id": f"new{i}", "text": f"new document {i} about harbours and tides. " * 200} for i in range(20)]
    new = write_jsonl(toml.parent / "new.jsonl", docs)
    proc = subprocess.run([sys.executable, "-m", "retrocli", "db", "add", str(new), "-c", str(toml)],
                          capture_output=True, text=True, preexec_fn=_file_size_limit(20_000))
    assert proc.returncode == 2, proc.stderr[-2000:]
    text = "".join(proc.stderr.split())
    assert "cannotwrite" in text and "Filetoolarge" in text and "Traceback" not in text
    assert artefacts(ws_root) == before  # nothing half-written is left where a reader would find it
    assert run_cli("db", "add", str(new), "-c", str(toml)).returncode == 0  # with room again, it completes


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs mounted at tmp_path/disk (needs root and mount rights: skipped where they are missing)."""
    disk = tmp_path / "disk"
    disk.mkdir()

    def mount(size_kib: int) -> Path:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        return disk

    yield mount
    subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_really_full_disk_and_a_read_only_one(built, small_disk) -> None:
    """ENOSPC on a small tmpfs, then EROFS after remounting it read-only: the same clean failure."""
    toml, _ = built
    used_kib = sum(4 * -(-p.stat().st_size // 4096) if p.is_file() else 4 for p in toml.parent.rglob("*"))
    disk = small_disk(used_kib + 512)
    shutil.copytree(toml.parent, disk / "w")
    toml = disk / "w" / "retro.toml"
    ws_root = workspace_of(load_config(toml)).root
    before = artefacts(ws_root)
    docs = [{"id": f"new{i}", "text": f"new document {i} about harbours and tides. " * 300} for i in range(40)]
    new = write_jsonl(toml.parent.parent.parent / "new.jsonl", docs)  # outside the small disk
    full = run_cli("db", "add", str(new), "-c", str(toml))
    said = "".join(full.stderr.split())
    assert full.returncode == 2 and "Nospaceleftondevice" in said and "Traceback" not in said, full.stderr[-2000:]
    assert artefacts(ws_root) == before
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    ro = run_cli("db", "add", str(new), "-c", str(toml))
    said = "".join(ro.stderr.split())
    assert ro.returncode == 2 and "Read-onlyfilesystem" in said and "Traceback" not in said, ro.stderr[-2000:]
    assert artefacts(ws_root) == before
