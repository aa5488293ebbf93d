"""The artefact paths of a workspace, its metadata files, and atomic writes.

Layout (one folder per database stage; each has a `meta.json` saying what made it):

    <workspace>/db/tokenizer/   tokenizer.model                       (or a reference to a loaded one)
    <workspace>/db/chunks/      tokens.npy docs.npy chunks.npy docs.jsonl
    <workspace>/db/embed/       block-000000.npy ...                  (float16, one file per block)
    <workspace>/db/index/       index.faiss                           (ondisk: + index.ivfdata, trained.faiss)
    <workspace>/db/neighbours/  block-000000.npy ...                  (int64 chunk ids, -1 = none)
    <workspace>/db/bm25/        bm25s' numpy and JSON files, chunk-ids.npy  (only with db.lexical_index = "bm25")
    <workspace>/checkpoints/RUN/  step-NNNNNN/ metrics.jsonl          (a training run: pretrain.run, sft.run)
    <workspace>/ppl/            RUN-STEP-DATA-MODE.json               (`retro ppl`)
    <workspace>/generate/       TASK.CONTEXTS.RUN.STEP.jsonl          (`retro generate`)
    <workspace>/reproduce/      results.json                          (`retro reproduce`; its report.md,
                                                                   loss.png and showcase/ sit beside db/)

Every folder above is named here (`Workspace`). Inside two of them the owner lays out its own files: a
checkpoint's files are train/checkpoint.py's, and the database's edits (`db/edits/`, `database.edits_dir`)
are written by db/edit.py.

A stage writes `meta.json` with `"complete": false` and its settings before it starts, and rewrites it with
`"complete": true` and its counts at the end. A rerun with the same settings resumes (block files that
exist are finished: they were renamed into place); a rerun with other settings is an error naming both
values, so finished work is never silently reused or destroyed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import UserError

META_VERSION = 1
DB_STAGES = ("tokenizer", "chunks", "embed", "index", "neighbours")  # every database has them, in this order
# Stages a database has when its settings ask for them; each is built from the chunks and nothing is built from it
# (db/bm25.py: db.lexical_index = "bm25").
OPTIONAL_STAGES = ("bm25",)


# ------------------------------------------------------------------------------------------ atomic writes


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


# What a full disk, a quota, a read-only mount or a file-size limit make a write fail with.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def write_failed(path: Path, e: Exception) -> UserError:
    """The one message for a write the filesystem refused: what, where, and that nothing finished was lost."""
    why = f"{e.strerror} (errno {e.errno})" if getattr(e, "strerror", None) else str(e)
    return UserError(f"cannot write {path}: {why}. Nothing finished was lost: what "
                     f"was being written is discarded and the previous version, if any, is intact. Free space or "
                     f"fix the permissions of {path.parent}, then rerun the same command to continue")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    On any error the temporary file is removed and `path` keeps its previous content; a write the
    filesystem refuses (full, read-only, ...) is a UserError naming `path`."""
    tmp = _tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # every OS error here is about writing `path` (full, read-only, too large, ...)
        tmp.unlink(missing_ok=True)
        raise write_failed(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


@contextmanager
def npy_problems(path: Path) -> Iterator[None]:
    """Reading the .npy file `path` inside: a missing or damaged file becomes one UserError naming it."""
    try:
        yield
    except FileNotFoundError:
        raise UserError(f"{path} is missing: run `retro db build` to (re)create it") from None
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path} is damaged ({e}); delete it and rerun `retro db build`") from None


def load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """Load a .npy file (memory-mapped by default); a damaged file is a UserError naming it."""
    with npy_problems(path):
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)  # arrays only: no code runs


class NpyRows:
    """Chosen rows of 2-D .npy files, read with one pread each: for rows scattered over many files (the
    candidates `db.rerank` orders), where mapping a file costs ~130 us and a read of one row ~8 us. Each
    file's header is parsed once; a missing or short file is a UserError naming it."""

    def __init__(self) -> None:
        self.headers: dict[Path, tuple[int, np.dtype, int, int]] = {}  # offset, dtype, rows, columns

    def header(self, path: Path) -> tuple[int, np.dtype, int, int]:
        if path not in self.headers:
            with npy_problems(path), open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                if fortran or len(shape) != 2:
                    raise ValueError(f"expected a 2-D C-ordered array, found shape {shape}")
                self.headers[path] = (f.tell(), dtype, shape[0], shape[1])
        return self.headers[path]

    def read(self, path: Path, rows: np.ndarray) -> np.ndarray:
        """(len(rows), columns) in the file's dtype."""
        offset, dtype, n, cols = self.header(path)
        size = cols * dtype.itemsize
        if len(rows) and not 0 <= int(rows.min()) <= int(rows.max()) < n:
            raise IndexError(f"rows outside 0..{n - 1} of {path}")
        with npy_problems(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                data = b"".join(os.pread(fd, size, offset + int(r) * size) for r in rows)
            finally:
                os.close(fd)
            if len(data) != size * len(rows):
                raise ValueError("shorter than its header says")
        return np.frombuffer(data, dtype=dtype).reshape(len(rows), cols)


class NpyWriter:
    """Append rows to a .npy file of unknown final length, streaming (bounded memory).

    The header is written with room for any shape and rewritten with the true row count at `close()`;
    the file is built under a temporary name and renamed into place only when complete."""

    HEADER_BYTES = 256  # magic (6) + version (2) + length (2) + dict padded with spaces (total a multiple of 64)

    def __init__(self, path: Path, dtype: Any, row_shape: tuple[int, ...] = ()):
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), tuple(row_shape)
        self.rows = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _tmp_name(path)
        self.file = open(self.tmp, "wb")
        self.file.write(self._header(0))

    def _header(self, rows: int) -> bytes:
        d = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
             "shape": (rows, *self.row_shape)}
        text = repr(d).encode("latin1")
        pad = self.HEADER_BYTES - 10 - len(text) - 1
        assert pad >= 0, "shape too large for the fixed header"
        return b"\x93NUMPY\x01\x00" + (self.HEADER_BYTES - 10).to_bytes(2, "little") + text + b" " * pad + b"\n"

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        assert rows.shape[1:] == self.row_shape, (rows.shape, self.row_shape)
        try:
            self.file.write(rows.tobytes())
        except OSError as e:
            self.abort()
            raise write_failed(self.path, e) from None
        self.rows += len(rows)

    def close(self) -> None:
        try:
            self.file.seek(0)
            self.file.write(self._header(self.rows))
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise write_failed(self.path, e) from None

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # the write that failed already said why
        self.tmp.unlink(missing_ok=True)


def sha256_file(path: Path | str) -> str:
    """The SHA-256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_obj(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------- one writer at a time

LOCK_FILE = "retro.lock"
LOCK_ENV = "RETRO_LOCK_TOKEN"  # inherited by the processes a locked command starts (reproduce's stages, torchrun ranks)


def _start_time(pid: int) -> str | None:
    """When process `pid` started (Linux: /proc/PID/stat field 22), to tell it from a later process that got
    the same pid; None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict[str, Any]) -> bool:
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    started = _start_time(int(owner["pid"]))
    return owner.get("started_ticks") is None or started is None or started == owner["started_ticks"]


@contextmanager
def writer_lock(root: Path, command: str) -> Iterator[None]:
    """Hold `<root>/retro.lock` while `command` writes the workspace: a second writer is refused with who
    holds it. A lock whose process is dead (killed: no chance to remove it) is cleared with a message.
    Readers (`db query`, `db info`, `generate`, `ppl`, `score`) never take it.

    The processes a locked command starts (reproduce's stages, the torchrun ranks it relaunches as) inherit
    its token and go on under its lock, which that command releases when they are done; under a torchrun you
    started yourself, rank 0 takes it."""
    path = root / LOCK_FILE
    held = _read_lock(path)
    if held and held.get("token") and held.get("token") == os.environ.get(LOCK_ENV):
        yield  # part of the job that holds the lock
        return
    if os.environ.get("RANK", "0") != "0":
        yield  # a rank of a torchrun started by hand: rank 0 holds the lock for the job
        return
    token = uuid.uuid4().hex
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "token": token,
             "since": time.strftime("%Y-%m-%d %H:%M:%S"), "started_ticks": _start_time(os.getpid())}
    root.mkdir(parents=True, exist_ok=True)
    unreadable = 0
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _read_lock(path)
            if held is None:
                continue  # removed meanwhile: try again
            if not held and unreadable < 20:  # being written this instant: look again
                unreadable += 1
                time.sleep(0.05)
                continue
            if held.get("host") == socket.gethostname() and not _alive(held):
                from .runtime import warn

                warn(f"clearing a stale lock {path}: `retro {held.get('command')}` (pid {held.get('pid')}, since "
                     f"{held.get('since')}) is no longer running")
                path.unlink(missing_ok=True)
                continue
            raise UserError(f"another command is writing this workspace: `retro {held.get('command')}` (pid "
                            f"{held.get('pid')} on {held.get('host')}, since {held.get('since')}; lock {path}). "
                            f"Wait for it to finish; readers (db query, generate, ppl) may run meanwhile. If it "
                            f"is not running any more, delete {path}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
        break
    previous = os.environ.get(LOCK_ENV)
    os.environ[LOCK_ENV] = token
    try:
        yield
    finally:
        if (_read_lock(path) or {}).get("token") == token:
            path.unlink(missing_ok=True)
        if previous is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = previous


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        held = json.loads(path.read_text(encoding="utf-8"))
        return held if isinstance(held, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written this instant, or damaged: treated as held by an unknown process


# -------------------------------------------------------------------------------------------- the layout


class Workspace:
    """Paths of one workspace: its folders, and the files of each database stage (see the module docstring for
    the files laid out by their owners inside them)."""

    def __init__(self, root: Path):
        self.root = root

    @property
    def db(self) -> Path:
        return self.root / "db"

    def stage_dir(self, stage: str) -> Path:
        assert stage in DB_STAGES or stage in OPTIONAL_STAGES, stage
        return self.db / stage

    def stages(self) -> tuple[str, ...]:
        """The stages of this database: every one of DB_STAGES, and the optional ones it has begun."""
        return DB_STAGES + tuple(s for s in OPTIONAL_STAGES if self.meta_path(s).is_file())

    def meta_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "meta.json"

    # the files of each stage
    @property
    def tokenizer_model(self) -> Path:
        return self.stage_dir("tokenizer") / "tokenizer.model"

    @property
    def chunk_tokens(self) -> Path:
        return self.stage_dir("chunks") / "tokens.npy"

    @property
    def chunk_docs(self) -> Path:
        return self.stage_dir("chunks") / "docs.npy"

    @property
    def chunk_table(self) -> Path:
        return self.stage_dir("chunks") / "chunks.npy"

    @property
    def doc_info(self) -> Path:
        return self.stage_dir("chunks") / "docs.jsonl"

    def embed_block(self, i: int) -> Path:
        return self.stage_dir("embed") / f"block-{i:06d}.npy"

    def lexical_idf(self) -> Path:
        return self.stage_dir("embed") / "lexical-idf.npy"

    @property
    def index_file(self) -> Path:
        return self.stage_dir("index") / "index.faiss"

    # db.index_storage "ondisk": the index file names its inverted lists, merged from one file per block
    @property
    def index_data(self) -> Path:
        return self.stage_dir("index") / "index.ivfdata"

    @property
    def index_trained(self) -> Path:
        return self.stage_dir("index") / "trained.faiss"

    def index_block(self, i: int) -> Path:
        return self.stage_dir("index") / f"block-{i:06d}.ivflists"

    def neighbour_block(self, i: int) -> Path:
        return self.stage_dir("neighbours") / f"block-{i:06d}.npy"

    # training runs and what the verbs after them write
    def run_dir(self, run: str = "pretrain") -> Path:
        """A training run's folder (pretrain.run, sft.run): its step-NNNNNN/ checkpoints and metrics.jsonl."""
        return self.root / "checkpoints" / run

    def ppl_result(self, name: str) -> Path:
        return self.root / "ppl" / f"{name}.json"

    @property
    def generate_dir(self) -> Path:
        return self.root / "generate"

    @property
    def reproduce_results(self) -> Path:
        return self.root / "reproduce" / "results.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def showcase_dir(self) -> Path:
        return self.root / "showcase"

    # metadata
    def read_meta(self, stage: str) -> dict[str, Any] | None:
        path = self.meta_path(stage)
        if not path.exists():
            return None
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is damaged ({e}); rerun with `retro db build --rebuild {stage}`") from None
        if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
            raise UserError(f"{path} was written by another version of retro; rebuild with --rebuild {stage}")
        return meta

    def require(self, stage: str) -> dict[str, Any]:
        """The metadata of a finished stage, or a UserError saying which command makes it."""
        meta = self.read_meta(stage)
        if meta is None or not meta.get("complete"):
            state = "is not built" if meta is None else "is incomplete"
            raise UserError(f"the database stage '{stage}' {state} in {self.stage_dir(stage)}: "
                            f"run `retro db build` first")
        return meta

    def begin(self, stage: str, settings: dict[str, Any], rebuild: bool = False) -> dict[str, Any] | None:
        """Start (or resume) a stage. Returns the finished metadata if the stage is already complete
        with these settings (nothing to do), else None after recording the settings. `rebuild` discards
        whatever the stage had (the user asked for it by name)."""
        if rebuild and self.stage_dir(stage).exists():
            shutil.rmtree(self.stage_dir(stage))
        meta = self.read_meta(stage)
        if meta is not None and _comparable(meta["settings"]) != _comparable(settings):
            produced = [p for p in self.stage_dir(stage).iterdir() if p.name != "meta.json"]
            if meta.get("complete") or produced:
                raise UserError(mismatch_message(stage, self.meta_path(stage), meta["settings"], settings))
            meta = None  # an attempt that failed before producing anything: nothing to keep
        if meta is not None and meta.get("complete"):
            return meta
        for junk in self.stage_dir(stage).glob(".*.tmp-*"):  # what a killed attempt was writing
            junk.unlink(missing_ok=True)
        if meta is None:
            write_json_atomic(self.meta_path(stage), {"version": META_VERSION, "stage": stage, "complete": False,
                                                      "settings": settings, "started": time.time()})
        return None

    def finish(self, stage: str, counts: dict[str, Any], identity: Any = None, **recorded: Any) -> dict[str, Any]:
        """Mark a stage complete with its counts and the size and sha256 of every file it made (so damage is
        found: `damaged`, `retro db verify`); `recorded`: further keys for its meta.json.

        Its fingerprint, which the stages after it record and checkpoints compare, comes from content and
        settings only (`stage_fingerprint`), or from `identity` when given: two builds of the same recipe on
        the same corpus, at other times, in other folders, agree."""
        meta = self.read_meta(stage)
        assert meta is not None, stage
        meta.update(complete=True, counts=counts, finished=time.time(), files=self.file_sums(stage), **recorded)
        meta.pop("repairing", None)
        meta.pop("repair_of", None)
        meta["fingerprint"] = stage_fingerprint(meta["settings"], counts) if identity is None else hash_obj(identity)
        write_json_atomic(self.meta_path(stage), meta)
        return meta

    def stage_files(self, stage: str) -> list[Path]:
        """The artefacts of a stage (not its meta.json, nor what a writer is writing)."""
        folder = self.stage_dir(stage)
        return sorted(p for p in folder.iterdir() if p.is_file() and p.name != "meta.json"
                      and not p.name.startswith(".")) if folder.is_dir() else []

    def file_sums(self, stage: str, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
        paths = self.stage_files(stage) if names is None else [self.stage_dir(stage) / n for n in names]
        return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in paths if p.is_file()}

    def damaged(self, stage: str, deep: bool = False, only: set[str] | None = None) -> dict[str, str]:
        """{file name: what is wrong} for the files a finished stage recorded: missing or of another size, and
        with `deep` (reads them) of another sha256. `only`: check just these names. Stages finished before
        files were recorded check nothing."""
        meta = self.read_meta(stage) or {}
        problems = {}
        for name, rec in (meta.get("files") or {}).items():
            if only is not None and name not in only:
                continue
            path = self.stage_dir(stage) / name
            if not path.is_file():
                problems[name] = "missing"
            elif path.stat().st_size != rec["bytes"]:
                problems[name] = f"{path.stat().st_size:,} bytes where {rec['bytes']:,} were written"
            elif deep and sha256_file(path) != rec["sha256"]:
                problems[name] = "its content does not match the sha256 recorded when it was written"
        return problems

    def start_repair(self, stage: str, problems: dict[str, str]) -> dict[str, Any]:
        """A finished stage has damaged files: remove them and reopen the stage (same settings), so that the
        build makes them again. Returns the old metadata for `end_repair`."""
        from .runtime import warn

        meta = self.read_meta(stage)
        assert meta is not None and meta.get("complete"), stage
        listed = "; ".join(f"{self.stage_dir(stage) / n}: {why}" for n, why in sorted(problems.items())[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        warn(f"the finished '{stage}' stage has damaged files: {listed}{more}. Making them again with the same "
             f"settings")
        for name in problems:
            (self.stage_dir(stage) / name).unlink(missing_ok=True)
        reopened = {k: v for k, v in meta.items() if k not in ("counts", "files", "fingerprint", "finished")}
        # the old metadata rides along, so a repair that is itself killed still ends in `end_repair`
        write_json_atomic(self.meta_path(stage), {**reopened, "complete": False, "repairing": sorted(problems),
                                                  "repair_of": meta})
        return meta

    def end_repair(self, stage: str, old: dict[str, Any], names: set[str] | None = None) -> bool:
        """After the stage ran again: True when the remade files (`names`, default all) are identical to those
        recorded (the old metadata is restored, so nothing built from the stage changes); False when they
        differ (the stages after it must be rebuilt)."""
        from .runtime import log, warn

        remade = {n: rec for n, rec in (old.get("files") or {}).items() if names is None or n in names}
        if self.file_sums(stage, sorted(remade)) == remade:
            write_json_atomic(self.meta_path(stage), old)
            log(f"repaired the '{stage}' stage: the remade files are identical to those first written")
            return True
        warn(f"the remade '{stage}' files differ from those first written: the stages after it are rebuilt")
        return False


# Counts that say how a stage ran rather than what it made: recorded in meta.json, never fingerprinted.
RUN_COUNTS = frozenset({"seconds", "train_seconds", "embedded_now"})


def stage_fingerprint(settings: dict[str, Any], counts: dict[str, Any]) -> str:
    """What identifies a finished stage: its settings (corpus files by name, size and sha256, not by folder) and
    what it made, without its timings (RUN_COUNTS); the start and end times in meta.json are not part of it."""
    return hash_obj([_comparable(settings), {k: v for k, v in counts.items() if k not in RUN_COUNTS}])


def _comparable(value: Any) -> Any:
    """Settings as compared: a corpus file's [name, size, sha256] by its file name alone, so a corpus moved
    to another folder (DATA_DIR) still matches (workspaces before this recorded full paths)."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) == 3 and isinstance(value[0], str) and isinstance(value[1], int) and isinstance(value[2], str):
            return [os.path.basename(value[0]), value[1], value[2]]
        return [_comparable(v) for v in value]
    return value


def mismatch_message(stage: str, path: Path, old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            diffs.append(f"{key}: built with {old.get(key)!r}, the config now gives {new.get(key)!r}")
    return (f"the '{stage}' stage in {path.parent} was built with other settings ("
            + "; ".join(diffs) + "). Use another workspace.dir, restore the old settings, or rerun with "
            f"`--rebuild {stage}` to discard it and everything built from it")


def blocks(n: int, block_size: int) -> list[tuple[int, int, int]]:
    """(block index, start row, end row) covering rows [0, n)."""
    return [(i, s, min(s + block_size, n)) for i, s in enumerate(range(0, n, block_size))]


def missing_blocks(paths: Callable[[int], Path], spans: list[tuple[int, int, int]],
                           row_shape_ok: Callable[[np.ndarray, int], bool]) -> list[tuple[int, int, int]]:
    """The blocks whose file is missing or has the wrong shape (a damaged file is removed and redone)."""
    todo = []
    for i, s, e in spans:
        path = paths(i)
        if path.exists():
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
                if row_shape_ok(arr, e - s):
                    continue
            except (ValueError, OSError, EOFError):
                pass
            path.unlink()
        todo.append((i, s, e))
    return todo
