"""Corpus files -> documents.

Inputs (each may be gzip-compressed, `.gz`):
  .txt    one document per file (id: the path relative to the TOML file, title: the file name)
  .jsonl  one document per line: text under `corpus.text_key`, optional `id` and `title`
  .json   a list of such objects
  builtin:tiny         ~0.5 MB of English shipped with Python itself (no download): the language
                       reference topics of `pydoc_data` (~2,000 chunks of 64 tokens)
  builtin:stdlib-docs  ~0.5 MB more: the docstrings of a fixed set of standard-library modules
Bad input (non-UTF-8 bytes, a damaged .gz, an empty file, a line that is not a JSON object with text) is an
error naming the file and line, or skipped and counted when `corpus.on_bad_line = "skip"`. Documents are streamed: the
corpus is never held in memory.
"""

from __future__ import annotations

import ast
import glob
import gzip
import hashlib
import json
import os
import re
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from ..config import CorpusConfig
from ..errors import UserError

BUILTIN_TINY = "builtin:tiny"
BUILTIN_STDLIB = "builtin:stdlib-docs"
BUILTINS = (BUILTIN_TINY, BUILTIN_STDLIB)


@dataclass
class Document:
    id: str
    text: str
    title: str = ""
    source: str = ""


@dataclass
class CorpusStats:
    """Counts of what reading skipped (only where `on_bad_line = "skip"`), shown after the stage."""

    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


def corpus_files(cfg: CorpusConfig, base_dir: Path, key: str = "corpus.train") -> list[str]:
    """The corpus files (absolute paths, sorted within each glob) or builtin names, in TOML order. `key`: what
    the user gave them as, for the errors (`retro db add` takes them on its command line)."""
    if not cfg.train:
        raise UserError(f"{key} is empty: list corpus files or globs, e.g. train = [\"data/*.jsonl.gz\"]")
    files: list[str] = []
    for pattern in cfg.train:
        if pattern.startswith("builtin:"):
            if pattern not in BUILTINS:
                raise UserError(f"{key}: unknown builtin corpus {pattern!r} (known: {', '.join(BUILTINS)})")
            files.append(pattern)
            continue
        full = pattern if os.path.isabs(pattern) else str(base_dir / pattern)
        matches = sorted(glob.glob(os.path.expanduser(full), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise UserError(f"{key}: {pattern!r} matches no file (looked in {base_dir})")
        for m in matches:
            if _kind(m) is None:
                raise UserError(f"{key}: {m} is not .txt, .jsonl or .json (optionally .gz)")
        files.extend(matches)
    return files


def fingerprint(files: list[str]) -> list[list]:
    """What identifies the corpus: each file's name, size and SHA-256 of its bytes (not its modification
    time, so a corpus copied to another machine or restored from a backup still matches its workspace)."""
    out = []
    for f in files:
        if f.startswith("builtin:"):
            out.append([f, 0, ""])
            continue
        digest = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        out.append([os.path.basename(f), os.path.getsize(f), digest.hexdigest()])
    return out


def _kind(path: str) -> str | None:
    name = path[:-3] if path.endswith(".gz") else path
    for ext in (".txt", ".jsonl", ".json"):
        if name.endswith(ext):
            return ext
    return None


# Reading a damaged .gz raises one of these (zlib.error: a valid header followed by data that is not deflate).
GZIP_ERRORS = (OSError, EOFError, zlib.error)

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_LONG_INTEGER = re.compile(r"[0-9]{4301,}")


def loads_json(text: str) -> object:
    """json.loads for readers that report bad input by file and line: every failure is a json.JSONDecodeError
    whose `msg` says why. Besides malformed JSON, Python's reader raises ValueError for an integer of more than
    4,300 digits and RecursionError for nesting deeper than about 1,000 levels, and it accepts a \\uD800-\\uDFFF
    escape that is not half of a pair: a string that cannot be written as UTF-8, which no tokenizer can read."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("arrays or objects nested too deeply", text, 0) from None
    except ValueError:
        long = _LONG_INTEGER.search(text)
        raise json.JSONDecodeError("an integer of more than 4,300 digits", text, long.start() if long else 0) from None
    escape = _SURROGATE_ESCAPE.search(text)
    if escape and _has_surrogate(obj):
        raise json.JSONDecodeError("a \\uD800-\\uDFFF escape that is not half of a surrogate pair", text,
                                   escape.start())
    return obj


def _has_surrogate(obj: object) -> bool:
    """Whether a string anywhere in a parsed JSON value (keys too) holds a lone surrogate. A loop, not
    recursion: the value may be nested almost as deeply as the recursion limit."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _open_binary(path: str) -> IO[bytes]:
    try:
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read corpus file {path}: {e}") from None


class _Reader:
    def __init__(self, cfg: CorpusConfig, base_dir: Path, stats: CorpusStats):
        self.cfg, self.base_dir, self.stats = cfg, base_dir, stats

    def bad(self, where: str, why: str) -> None:
        if self.cfg.on_bad_line == "skip":
            self.stats.skip(why)
            return
        raise UserError(f"{where}: {why} (set corpus.on_bad_line = \"skip\" to skip such input and count it)")

    def rel(self, path: str) -> str:
        try:
            return os.path.relpath(path, self.base_dir)
        except ValueError:
            return path

    def read_all(self, path: str) -> bytes | None:
        try:
            with _open_binary(path) as f:
                return f.read()
        except GZIP_ERRORS as e:
            self.bad(path, f"cannot read ({e})")
            return None

    def txt(self, path: str) -> Iterator[Document]:
        data = self.read_all(path)
        if data is None:
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            return self.bad(f"{path}:{line}", "bytes that are not UTF-8")
        if not text.strip():
            return self.bad(path, "empty file")
        name = os.path.basename(path)
        yield Document(id=self.rel(path), text=text, title=name.split(".")[0], source=self.rel(path))

    def record(self, obj: object, where: str, default_id: str, source: str) -> Document | None:
        if not isinstance(obj, dict):
            self.bad(where, f"expected a JSON object, got {type(obj).__name__}")
            return None
        text = obj.get(self.cfg.text_key)
        if not isinstance(text, str):
            self.bad(where, f"no string under the key {self.cfg.text_key!r} (corpus.text_key)")
            return None
        if not text.strip():
            self.stats.skip("empty documents")
            return None
        doc_id = obj.get("id", default_id)
        title = obj.get("title", "")
        return Document(id=str(doc_id), text=text, title=str(title) if title is not None else "", source=source)

    def jsonl(self, path: str) -> Iterator[Document]:
        rel = self.rel(path)
        seen = 0
        try:
            with _open_binary(path) as f:
                for lineno, raw in enumerate(f, 1):
                    where = f"{path}:{lineno}"
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        self.bad(where, "bytes that are not UTF-8")
                        continue
                    if not line.strip():
                        continue
                    seen += 1
                    try:
                        obj = loads_json(line)
                    except json.JSONDecodeError as e:
                        self.bad(where, f"not JSON ({e.msg})")
                        continue
                    doc = self.record(obj, where, f"{rel}:{lineno}", rel)
                    if doc is not None:
                        yield doc
        except GZIP_ERRORS as e:
            return self.bad(path, f"cannot read ({e})")  # counted once, not also as an empty file
        if seen == 0:
            self.bad(path, "empty file")

    def json(self, path: str) -> Iterator[Document]:
        data = self.read_all(path)
        if data is None:
            return
        if not data.strip():
            return self.bad(path, "empty file")
        try:
            items = loads_json(data.decode("utf-8"))
        except UnicodeDecodeError:
            return self.bad(path, "bytes that are not UTF-8")
        except json.JSONDecodeError as e:
            return self.bad(f"{path}:{e.lineno}", f"not JSON ({e.msg})")
        if not isinstance(items, list):
            return self.bad(path, "expected a JSON list of document objects")
        rel = self.rel(path)
        for i, obj in enumerate(items):
            doc = self.record(obj, f"{path}[{i}]", f"{rel}:{i}", rel)
            if doc is not None:
                yield doc


def iter_documents(cfg: CorpusConfig, base_dir: Path, files: list[str], stats: CorpusStats) -> Iterator[Document]:
    """Every document of the corpus, in file order and then in file order within a file."""
    reader = _Reader(cfg, base_dir, stats)
    for path in files:
        if path == BUILTIN_TINY:
            yield from tiny_corpus()
            continue
        if path == BUILTIN_STDLIB:
            yield from stdlib_docs_corpus()
            continue
        kind = _kind(path)
        if kind == ".txt":
            yield from reader.txt(path)
        elif kind == ".jsonl":
            yield from reader.jsonl(path)
        else:
            yield from reader.json(path)


def is_valid(doc_id: str, seed: int, valid_fraction: float) -> bool:
    """Train/valid split by a seeded hash of the document id: stable under reordering or added files."""
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < valid_fraction


# ------------------------------------------------------------------------------------- the tiny corpus

# Standard-library modules whose docstrings make `builtin:stdlib-docs` (~0.5 MB of English).
TINY_MODULES = (
    "argparse", "asyncio/events", "asyncio/tasks", "base64", "bisect", "calendar", "collections/__init__",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email/message", "enum", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "heapq", "hmac", "http/client", "http/cookiejar", "imaplib", "inspect", "ipaddress", "json/__init__",
    "locale", "logging/__init__", "mailbox", "mimetypes", "multiprocessing/pool", "netrc", "nntplib",
    "optparse", "os", "pathlib", "pickle", "pdb", "platform", "plistlib", "poplib", "pprint", "queue",
    "random", "shlex", "shutil", "smtplib", "socket", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "turtle", "typing",
    "unittest/case", "urllib/parse", "urllib/request", "uuid", "warnings", "weakref", "zipfile",
)


def _module_docstrings(path: Path) -> str:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = []
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80 and (node is tree or not node.name.startswith("_")):
                parts.append(doc if node is tree else f"{node.name}: {doc}")
    return "\n\n".join(dict.fromkeys(parts))


def tiny_corpus() -> Iterator[Document]:
    """~0.5 MB of English that every Python install already has: no download, deterministic per Python."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield Document(id=f"pydoc:{name}", text=text, title=name, source="builtin:tiny/pydoc_data.topics")


def stdlib_docs_corpus() -> Iterator[Document]:
    """The docstrings of TINY_MODULES, one document per module."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for mod in TINY_MODULES:
        path = stdlib / f"{mod}.py"
        if not path.exists():  # a module removed in some Python version: skip it
            continue
        text = _module_docstrings(path)
        if text:
            name = mod.replace("/__init__", "").replace("/", ".")
            yield Document(id=f"stdlib:{name}", text=text, title=name, source=f"{BUILTIN_STDLIB}/{name}")


# ------------------------------------------------------------------------------ builtin QA: tiny cloze

BUILTIN_QA = ("builtin:tiny-cloze-train", "builtin:tiny-cloze-test")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"])")
_WORD = re.compile(r"(?<![\w-])[A-Za-z][A-Za-z-]{3,}(?![\w-])")  # a whole word of 4+ letters (hyphens inside)
CLOZE_BLANK = "_____"


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running text: no headings (underlined with * = -), no indented code or grammar."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        code = any(ln.startswith((" ", "\t", ">>>")) for ln in lines)
        if code or any(set(ln.strip()) <= set("*=-~") for ln in lines):
            continue
        para = " ".join(ln.strip() for ln in lines).strip()
        if len(para.split()) >= 12:
            out.append(para)
    return out


def tiny_cloze() -> dict[str, dict]:
    """Fill-in-the-blank questions over `builtin:tiny`, as two SQuAD files (train and test, disjoint
    sentences of the same topics). Each question is a sentence of the corpus with its rarest word (4+
    letters, by how many topics use it) blanked; the answer is that word; the context is the paragraph.
    With the paragraph (from the file or retrieved from the database) the answer can be read; closed book
    it must be remembered from pretraining. Deterministic for a given Python version."""
    docs = list(tiny_corpus())
    paragraphs = {d.title: _prose_paragraphs(d.text) for d in docs}
    df: dict[str, int] = {}
    for paras in paragraphs.values():
        for w in {w.lower() for p in paras for w in _WORD.findall(p)}:
            df[w] = df.get(w, 0) + 1
    splits: dict[str, list] = {"train": [], "test": []}
    n = 0
    for title, paras in paragraphs.items():
        articles = {"train": [], "test": []}
        for para in paras:
            qas = {"train": [], "test": []}
            for sentence in _SENTENCE_END.split(para):
                words = sentence.split()
                if not 8 <= len(words) <= 40:
                    continue
                candidates = [m for m in _WORD.finditer(sentence) if df.get(m.group().lower(), 0) <= 3]
                if not candidates:
                    continue
                pick = min(candidates, key=lambda m: (df[m.group().lower()], m.start()))
                question = sentence[: pick.start()] + CLOZE_BLANK + sentence[pick.end() :]
                split = "test" if n % 5 == 4 else "train"
                start = para.find(sentence) + pick.start()
                qas[split].append({"id": f"tiny-cloze-{n}", "question": f"Fill in the blank: {question}",
                                   "answers": [{"text": pick.group(), "answer_start": start}]})
                n += 1
            for split in qas:
                if qas[split]:
                    articles[split].append({"context": para, "qas": qas[split]})
        for split in articles:
            if articles[split]:
                splits[split].append({"title": title, "paragraphs": articles[split]})
    return {split: {"version": "builtin:tiny-cloze", "data": data} for split, data in splits.items()}


def builtin_qa_file(name: str, folder: Path) -> Path:
    """The file of a builtin QA set (`builtin:tiny-cloze-train` / `-test`), written into `folder` once."""
    if name not in BUILTIN_QA:
        raise UserError(f"unknown builtin QA set {name!r} (known: {', '.join(BUILTIN_QA)})")
    split = name.rsplit("-", 1)[1]
    path = folder / f"tiny-cloze-{split}.json"
    if not path.is_file():
        from ..workspace import write_text_atomic

        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(tiny_cloze()[split]))
    return path


def data_file(path: str, base_dir: Path, workspace_root: Path) -> Path:
    """A dataset path as written in a TOML or on the command line: a builtin QA set's name (its file is
    written into WORKSPACE/builtin/), else a path relative to `base_dir` (the TOML's folder)."""
    if path.startswith("builtin:"):
        return builtin_qa_file(path, workspace_root / "builtin")
    p = Path(path).expanduser()
    return p if p.is_absolute() else base_dir / p
