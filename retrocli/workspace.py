"""Every artefact path of a workspace, its metadata files, and atomic writes.

Layout (one folder per stage; each has a `meta.json` saying what made it):

    <workspace>/db/tokenizer/   tokenizer.model                       (or a reference to a loaded one)
    <workspace>/db/chunks/      tokens.npy docs.npy chunks.npy docs.jsonl
    <workspace>/db/embed/       block-000000.npy ...                  (float16, one file per block)
    <workspace>/db/index/       index.faiss
    <workspace>/db/neighbours/  block-000000.npy ...                  (int64 chunk ids, -1 = none)

A stage writes `meta.json` with `"complete": false` and its settings before it starts, and rewrites it with
`"complete": true` and its counts at the end. A rerun with the same settings resumes (block files that
exist are finished: they were renamed into place); a rerun with other settings is an error naming both
values, so finished work is never silently reused or destroyed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import UserError

META_VERSION = 1
DB_STAGES = ("tokenizer", "chunks", "embed", "index", "neighbours")


# ------------------------------------------------------------------------------------------ atomic writes


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    On any error the temporary file is removed and `path` keeps its previous content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
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


def load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """Load a .npy file (memory-mapped by default); a damaged file is a UserError naming it."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: run `retro db build` to (re)create it") from None
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path} is damaged ({e}); delete it and rerun `retro db build`") from None


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
        self.file.write(rows.tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        self.file.seek(0)
        self.file.write(self._header(self.rows))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
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


# -------------------------------------------------------------------------------------------- the layout


class Workspace:
    """Paths of one workspace. Nothing else in the package builds artefact paths by hand."""

    def __init__(self, root: Path):
        self.root = root

    @property
    def db(self) -> Path:
        return self.root / "db"

    def stage_dir(self, stage: str) -> Path:
        assert stage in DB_STAGES, stage
        return self.db / stage

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

    def neighbour_block(self, i: int) -> Path:
        return self.stage_dir("neighbours") / f"block-{i:06d}.npy"

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
        if meta is None:
            write_json_atomic(self.meta_path(stage), {"version": META_VERSION, "stage": stage, "complete": False,
                                                      "settings": settings, "started": time.time()})
        return None

    def finish(self, stage: str, counts: dict[str, Any]) -> dict[str, Any]:
        meta = self.read_meta(stage)
        assert meta is not None, stage
        meta.update(complete=True, counts=counts, finished=time.time())
        meta["fingerprint"] = hash_obj([meta["settings"], counts])
        write_json_atomic(self.meta_path(stage), meta)
        return meta


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
                arr = np.load(path, mmap_mode="r")
                if row_shape_ok(arr, e - s):
                    continue
            except (ValueError, OSError, EOFError):
                pass
            path.unlink()
        todo.append((i, s, e))
    return todo
