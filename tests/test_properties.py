"""Bad input never crashes with a traceback: property-based tests over what users hand to `retro`.

Workspace TOML values and text, corpus files, QA and prediction files, drawn by hypothesis: each bad input gives
a UserError whose message names the file or the key (exit code 2 from the CLI, no traceback), or is skipped and
counted where `corpus.on_bad_line` / `sft.on_bad_record` allows it; and a command that fails on bad input leaves
every finished artefact of the workspace as it was. Examples are derandomized: CI sees the same inputs each run.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrocli.config import SECTIONS, Config, CorpusConfig, load_config, to_commented_toml
from retrocli.data.corpus import CorpusStats, corpus_files, is_valid, iter_documents
from retrocli.data.qa import FORMATS, detect_format, read_records
from retrocli.db import build as db
from retrocli.errors import UserError
from retrocli.eval.score import read_predictions, score

from .conftest import cli_in_process, run_cli, write_jsonl, write_toml

pytestmark = pytest.mark.faults


def examples(n: int) -> settings:
    """n examples, the same ones every run; a shared tmp_path is fine (each example writes its own files)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])


def toml_literal(value: object) -> str:
    """A Python value as a TOML literal (nan, inf and integers past 64 bits included: they must be refused by the
    loader, not by this writer)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):  # a JSON string is a TOML basic string (escapes included)
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_literal(v)}" for k, v in value.items()) + "}"


def numbers_in(value: object):
    if isinstance(value, dict):
        for v in value.values():
            yield from numbers_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers_in(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


# --------------------------------------------------------------------------------------------- TOML values

FIELDS = [(name, f.name) for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]

BAD_NUMBERS = st.sampled_from([0, -1, -7, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30, 10**400,
                               math.nan, math.inf, -math.inf, -0.0, 1e308, -1e-300, 0.5, 1.5])
ANY_VALUE = st.recursive(
    st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | BAD_NUMBERS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=2),
    max_leaves=6,
)


def check_config_error(error: UserError, toml: Path, key: str | None, by_set: bool = False) -> None:
    """A configuration error names the file (or, for a value given on the command line, `--set`), and the key
    when the file parsed."""
    msg = str(error)
    assert str(toml) in msg or (by_set and "--set" in msg), msg
    if key is not None and "is not valid TOML" not in msg:
        assert key in msg, msg


def check_loaded(cfg, section: str, key: str, value: object) -> None:
    """An accepted value is the one written, and every number of the configuration is finite and fits in 64 bits."""
    got = getattr(getattr(cfg, section), key)
    if not isinstance(value, (list, dict)):
        assert got == value, (section, key, got, value)
    for number in numbers_in(cfg.to_dict()):
        assert math.isfinite(number) and -(2**63) <= number < 2**63, (section, key, number)


@examples(60)
@given(field=st.sampled_from(FIELDS), value=BAD_NUMBERS | ANY_VALUE)
def test_toml_values_are_accepted_or_named(tmp_path: Path, field, value):
    section, key = field
    toml = tmp_path / "retro.toml"
    toml.write_text(f"[{section}]\n{key} = {toml_literal(value)}\n", encoding="utf-8")
    try:
        cfg = load_config(toml)
    except UserError as e:
        check_config_error(e, toml, f"{section}.{key}")
    else:
        check_loaded(cfg, section, key, value)


@examples(40)
@given(field=st.sampled_from(FIELDS), value=BAD_NUMBERS | ANY_VALUE)
def test_set_overrides_are_accepted_or_named(tmp_path: Path, field, value):
    section, key = field
    toml = write_toml(tmp_path / "retro.toml", {"db": {"chunk_length": 16}})
    try:
        cfg = load_config(toml, [f"{section}.{key}={toml_literal(value)}"])
    except UserError as e:
        check_config_error(e, toml, f"{section}.{key}", by_set=True)
    else:
        check_loaded(cfg, section, key, value)


NAMES = st.text(min_size=1, max_size=10)


@examples(30)
@given(section=st.sampled_from(sorted(SECTIONS)) | NAMES, key=NAMES)
def test_unknown_sections_and_keys_are_named(tmp_path: Path, section: str, key: str):
    known = section in SECTIONS and key in {f.name for f in dataclasses.fields(SECTIONS[section])}
    toml = tmp_path / "retro.toml"
    quoted = [json.dumps(name, ensure_ascii=False) for name in (section, key)]
    toml.write_text(f"[{quoted[0]}]\n{quoted[1]} = 1\n", encoding="utf-8")
    try:
        load_config(toml)
    except UserError as e:
        check_config_error(e, toml, None)
        if not known and "is not valid TOML" not in str(e):  # (a name with a character TOML wants escaped)
            assert (f"'{section}.{key}'" if section in SECTIONS else f"[{section}]") in str(e), str(e)
    else:
        assert known, f"[{section}] {key} was accepted"


def malformed(valid: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, and a valid file truncated, with a byte changed, or with bytes that are not UTF-8."""
    cut = st.integers(0, len(valid))
    return st.one_of(
        st.binary(max_size=200),
        cut.map(lambda i: valid[:i]),
        st.tuples(cut, st.integers(0, 255)).map(lambda t: valid[: t[0]] + bytes([t[1]]) + valid[t[0] + 1 :]),
        st.tuples(cut, st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])).map(
            lambda t: valid[: t[0]] + t[1] + valid[t[0] :]),
        st.sampled_from([b"a = " + b"[" * 5000, b"[db]\nnprobe = " + b"9" * 5000, b"[db]\nnprobe = 1e999\n",
                         b"[db]\nindex = '\\ud800'\n", b"\xef\xbb\xbf[db]\n", b'extends = "a\\u0000b"\n',
                         b'extends = "."\n', b"extends = 3\n", b'extends = "retro.toml"\n',
                         b'[workspace]\ndir = "${RETRO_NO_SUCH_VARIABLE}"\n', b"[db]\n[db]\n", b"db = 1\n"]),
    )


DEFAULT_TOML = to_commented_toml(Config()).encode()


@examples(60)
@given(data=malformed(DEFAULT_TOML))
def test_malformed_toml_text_is_named(tmp_path: Path, data: bytes):
    toml = tmp_path / "retro.toml"
    toml.write_bytes(data)
    try:
        load_config(toml)
    except UserError as e:
        check_config_error(e, toml, None)


# Paths: the TOML sits two folders down, so that "..", "../.." and "../../x" stay inside this test's tmp_path.
WORKSPACE_DIRS = ["ws", "", ".", "..", "../..", "../../escaped/ws", "retro.toml", "retro.toml/sub",
                  "corpus/docs.jsonl/ws", "a\u0000b", "~no-such-user/ws", "{tmp}/absolute-ws", "sub//ws/"]
CORPUS_GLOBS = ["corpus/*.jsonl", "corpus/*.missing", "../../**/*.jsonl", "{tmp}/nothing/*.txt", "[", "*",
                "retro.toml", "builtin:no-such-corpus", "", "corpus", "a\u0000b", "corpus/docs.jsonl",
                "../../../../../../no/such/*.txt", "~no-such-user/*.jsonl"]
TOKENIZER_PATHS = ["", "corpus", "corpus/docs.jsonl", "no-such.model", "retro.toml", "a\u0000b", "..",
                   "{tmp}/no/such.model", "~no-such-user/tok.model"]


def mostly(good: str, others: list[str]) -> st.SearchStrategy[str]:
    """A usable value half the time, so that examples also get past the config to the stage that uses it."""
    return st.sampled_from([good] * len(others) + others)


@examples(50)
@given(ws_dir=mostly("ws", WORKSPACE_DIRS),
       train=st.lists(mostly("corpus/*.jsonl", CORPUS_GLOBS), min_size=1, max_size=2),
       tok_path=mostly("", TOKENIZER_PATHS))
def test_paths_are_named_by_the_config_or_the_first_stage(tmp_path: Path, ws_dir: str, train: list[str],
                                                          tok_path: str):
    """load_config, then `db build` in-process (the first stage that uses the paths). The corpus file has a bad
    first line, so a build that gets as far as reading it stops there, with that file named."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        folder = Path(tmp) / "a" / "b"
        (folder / "corpus").mkdir(parents=True)
        (folder / "corpus" / "docs.jsonl").write_bytes(b"not json\n" + b'{"text": "a document"}\n')

        def fill(s: str) -> str:
            return s.replace("{tmp}", tmp)

        toml = write_toml(folder / "retro.toml", {
            "workspace": {"dir": fill(ws_dir)}, "corpus": {"train": [fill(g) for g in train]},
            "tokenizer": {"path": fill(tok_path), "vocab_size": 300}, "db": {"embedder": "lexical"}})
        try:
            cfg = load_config(toml)
        except UserError as e:
            check_config_error(e, toml, None)
            assert re.search(r"workspace\.dir|corpus\.train|tokenizer\.path", str(e)), str(e)
            return
        with pytest.raises(UserError) as e:
            db.build(cfg)
        assert re.search(r"workspace\.dir|corpus\.train|tokenizer\.path|docs\.jsonl:1: not JSON|tokenizer\.model",
                         str(e.value)), str(e.value)


# ------------------------------------------------------------------------------------------- corpus files

SFT_KEYS = ["text", "id", "title", "question", "answer", "answers", "ctxs", "data", "paragraphs", "qas", "context",
            "is_impossible", "messages", "role", "content", "instruction", "instances", "input", "output",
            "question_text", "answer_text", "paragraph_text", "title_text", "example_id", "prediction", "gold",
            "gold_regex"]
LONE_SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF).map(lambda c: "word " + c)
TEXT = st.text(min_size=1, max_size=30)  # blank strings come from JSON_VALUES
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT | LONE_SURROGATE
    | st.sampled_from(["", "   ", "a (b|c", "x{99999999999}", "(" * 1200 + ")" * 1200]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(SFT_KEYS) | st.text(max_size=6),
                                                                inner, max_size=4),
    max_leaves=16,
)
# Lines no generator above makes: deep nesting, a 5,000-digit integer, a lone surrogate, NUL, a 1 MB line.
SPECIAL_LINES = st.sampled_from([
    b"", b"   ", b"\xff\xfe\xfd", b"[" * 5000, b'{"text": ' + b"[" * 3000, b'{"text": "x", "id": ' + b"7" * 5000 + b"}",
    b'{"text": "\\ud800 lone"}', b'{"text": "\\ud83d\\ude00 a pair is fine"}', b"\x00\x00", b'{"text": "ok"}',
    b"not json", b'{"text": "' + b"word " * 200_000 + b'"}', b"NaN", b"[]", b"{}", b'"a string"',
])


@st.composite
def mutated(draw, valid: st.SearchStrategy) -> object:
    """A valid JSON value (two times in three), or one with a value somewhere inside replaced by any JSON value,
    or a key dropped."""
    value = draw(valid)
    if draw(st.integers(0, 2)):
        return value
    spots, stack = [], [value]
    while stack:
        item = stack.pop()
        pairs = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for k, v in pairs:
            spots.append((item, k))
            stack.append(v)
    if not spots:
        return draw(JSON_VALUES)
    container, key = draw(st.sampled_from(spots))
    if isinstance(container, list) or draw(st.booleans()):
        container[key] = draw(JSON_VALUES)
    else:
        del container[key]
    return value


def dumps(value: object) -> bytes:
    return json.dumps(value).encode()  # allow_nan: NaN and Infinity literals, which Python reads back


@st.composite
def lines(draw, records: st.SearchStrategy, junk: st.SearchStrategy[bytes]) -> bytes:
    """JSON lines: valid records with one mutation somewhere (or none), and a junk line one time in three."""
    value = draw(mutated(st.lists(records, min_size=1, max_size=4)))
    rows = [dumps(r) for r in (value if isinstance(value, list) else [value])]
    if not draw(st.integers(0, 2)):
        rows.insert(draw(st.integers(0, len(rows))), draw(junk))
    return b"\n".join(rows)


DOCUMENT = st.fixed_dictionaries({"text": TEXT}, optional={"id": TEXT | st.integers(), "title": TEXT})
JUNK_LINE = st.one_of(JSON_VALUES.map(dumps), SPECIAL_LINES, st.binary(max_size=40))
JSONL_FILE = lines(DOCUMENT, JUNK_LINE)
JSON_FILE = st.one_of(mutated(st.lists(DOCUMENT, max_size=4)).map(dumps), JSON_VALUES.map(dumps), SPECIAL_LINES,
                      st.binary(max_size=80), JSONL_FILE)
TXT_FILE = st.one_of(TEXT.map(str.encode), st.binary(max_size=200), SPECIAL_LINES)
GZIP = ["gzip-truncated", "gzip-header-then-garbage", "not-gzip"]


def wrap(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data)
    if how == "gzip-truncated":
        return gzip.compress(data)[:-6]
    if how == "gzip-header-then-garbage":
        return gzip.compress(b"")[:10] + b"this is not deflate data" + data[:20]
    return data  # "none", and "not-gzip": the plain bytes under a .gz name


def encodable(*texts: str) -> bool:
    try:
        for t in texts:
            t.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decodable(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_corpus(folder: Path, name: str, on_bad_line: str):
    cfg = CorpusConfig(train=[name], on_bad_line=on_bad_line)
    stats = CorpusStats()
    return list(iter_documents(cfg, folder, corpus_files(cfg, folder), stats)), stats


@examples(60)
@given(kind=st.sampled_from([".txt", ".jsonl", ".json"]), how=mostly("none", ["gzip", *GZIP]), data=st.data())
def test_corpus_files_give_documents_a_named_error_or_counted_skips(tmp_path: Path, kind: str, how: str, data):
    content = data.draw({".txt": TXT_FILE, ".jsonl": JSONL_FILE, ".json": JSON_FILE}[kind])
    name = "doc" + kind + ("" if how == "none" else ".gz")
    path = tmp_path / name
    path.write_bytes(wrap(content, how))

    docs, stats = read_corpus(tmp_path, name, "skip")  # skip mode never raises
    for d in docs:  # what reaches the tokenizer and the split is text it can read
        assert isinstance(d.text, str) and d.text.strip() and encodable(d.text, d.id, d.title, d.source)
        is_valid(d.id, 1234, 0.5)
    if kind == ".jsonl" and how == "none":  # every line that is not blank is one document or one counted skip
        nonblank = [raw for raw in content.split(b"\n") if not decodable(raw) or raw.decode().strip()]
        assert len(docs) + sum(n for why, n in stats.skipped.items() if why != "empty file") == len(nonblank)

    try:
        strict_docs, strict_stats = read_corpus(tmp_path, name, "error")
    except UserError as e:  # names the file, and the line (:N) or record ([N]) where one is at fault
        assert re.match(rf"{re.escape(str(path))}(:\d+|\[\d+\])?: ", str(e)), str(e)
        assert stats.skipped.keys() - {"empty documents"}, "error mode failed where skip mode skipped nothing"
    else:
        assert strict_docs == docs and strict_stats.skipped == stats.skipped
        assert stats.skipped.keys() <= {"empty documents"}


# ------------------------------------------------------------------------------ QA and prediction files

TEXTS = TEXT | st.lists(TEXT, min_size=1, max_size=3)
CONTEXTS = st.lists(st.fixed_dictionaries({"title": TEXT, "text": TEXT}), max_size=2)
QA_RECORDS = {  # a valid record of each JSON-lines format (valid when the texts drawn are not blank)
    "qa": st.fixed_dictionaries({"question": TEXT, "answer": TEXTS}, optional={"id": TEXT | st.integers()}),
    "qed": st.fixed_dictionaries({"question_text": TEXT, "answer_text": TEXTS},
                                 optional={"paragraph_text": TEXT, "title_text": TEXT, "example_id": st.integers()}),
    "chat": st.builds(lambda turns, a: {"messages": [*turns, {"role": "assistant", "content": a}]}, st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": TEXT}),
        min_size=1, max_size=3), TEXT)
    | st.builds(lambda q, a: {"text": f"### Human: {q} ### Assistant: {a}"}, TEXT, TEXT),
    "self_instruct": st.fixed_dictionaries({"instruction": TEXT, "instances": st.lists(
        st.fixed_dictionaries({"output": TEXT}, optional={"input": TEXT}), min_size=1, max_size=2)}),
}
QA_RECORDS["nq"] = QA_RECORDS["qed"]
INSTRUCTRETRO = st.lists(st.fixed_dictionaries({"question": TEXT, "answers": TEXTS}, optional={"ctxs": CONTEXTS}),
                         min_size=1, max_size=3)
SQUAD = st.fixed_dictionaries({"data": st.lists(st.fixed_dictionaries({"title": TEXT, "paragraphs": st.lists(
    st.fixed_dictionaries({"context": TEXT, "qas": st.lists(st.fixed_dictionaries(
        {"id": TEXT, "question": TEXT, "answers": st.lists(st.fixed_dictionaries({"text": TEXT}), min_size=1,
                                                           max_size=2)},
        optional={"is_impossible": st.booleans()}), min_size=1, max_size=2)}), min_size=1, max_size=2)}),
    min_size=1, max_size=2)})


@st.composite
def qa_files(draw) -> tuple[str, bytes]:
    """(file name, content): a (near-)valid file of some format, or junk, under a name that fits or not."""
    fmt = draw(st.sampled_from(FORMATS))
    if fmt in ("squad", "instructretro"):
        content = dumps(draw(mutated(SQUAD if fmt == "squad" else INSTRUCTRETRO)))
    else:
        content = draw(lines(QA_RECORDS[fmt], JUNK_LINE))
    content = draw(st.one_of(st.just(content), st.just(content), JSON_FILE, st.sampled_from([b"", b"\n \n"])))
    ext = draw(mostly(".json" if fmt in ("squad", "instructretro") else ".jsonl", [".json", ".jsonl", ".txt"]))
    how = draw(mostly("none", ["gzip", *GZIP]))
    return "qa" + ext + ("" if how == "none" else ".gz"), wrap(content, how)


@examples(60)
@given(file=qa_files())
def test_qa_files_give_records_or_a_named_error(tmp_path: Path, file: tuple[str, bytes]):
    path = tmp_path / file[0]
    path.write_bytes(file[1])
    try:
        assert detect_format(path) in FORMATS
    except UserError as e:
        assert str(path) in str(e), str(e)
    for fmt in FORMATS:
        for mode in ("error", "skip"):
            try:
                records, skipped = read_records(path, fmt, mode)
            except UserError as e:
                assert str(path) in str(e), str(e)
                continue
            assert records and skipped >= 0
            for r in records:
                assert r.question.strip() and r.answers and all(a.strip() for a in r.answers)
                assert r.source.startswith(str(path))
                assert encodable(r.id, r.question, *r.answers, *(c["text"] + c["title"] for c in r.contexts))


PATTERNS = st.one_of(TEXT.map(re.escape), st.sampled_from(["(mount )?everest", "k2|everest"]),
                     st.sampled_from(["(", "[z-a]", "x{99999999999}", "(" * 1200 + ")" * 1200]))  # not patterns
PREDICTION = st.fixed_dictionaries({"id": TEXT | st.integers(), "prediction": TEXT, "gold": TEXTS},
                                   optional={"gold_regex": PATTERNS | st.lists(PATTERNS, max_size=2), "question": TEXT})
PREDICTIONS_FILE = st.one_of(*[lines(PREDICTION, JUNK_LINE)] * 3, mutated(st.dictionaries(TEXT, TEXT)).map(dumps),
                             JSON_FILE)


@examples(60)
@given(content=PREDICTIONS_FILE)
def test_prediction_files_score_or_give_a_named_error(tmp_path: Path, content: bytes):
    path = tmp_path / "answers.jsonl"
    path.write_bytes(content)
    try:
        predictions = read_predictions(path)
    except UserError as e:
        assert str(path) in str(e), str(e)
        return
    assert predictions and all(isinstance(p["prediction"], str) for p in predictions.values())
    for regex in (False, True):
        try:
            result = score(predictions, None, regex=regex, rouge=True)
        except UserError as e:  # a prediction without gold answers, or (regex) a pattern that is not one
            assert str(path) in str(e), str(e)
        else:
            assert result["count"] == len(predictions) and 0.0 <= result["f1"] <= 100.0


# -------------------------------------------------------------------------------- artefacts stay untouched


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_input_leaves_a_built_database_untouched(small_workspace, tmp_path: Path, capsys):
    toml = small_workspace(n_docs=20, words=200)
    run_cli("db", "build", "-c", str(toml), check=True)
    before = snapshot(tmp_path / "ws")
    assert any(name.startswith("db/neighbours/block-") for name in before)

    bad_toml = tmp_path / "broken.toml"
    bad_toml.write_bytes(toml.read_bytes()[:-9] + b"\xff = [\n")
    write_jsonl(tmp_path / "corpus" / "more.jsonl", [{"text": "fine"}])
    (tmp_path / "corpus" / "zz-corrupt.jsonl").write_bytes(b'{"text": "ok"}\n\xff\xfe{"text": \n' + b"[" * 5000)
    commands = [  # (arguments, what the message must name)
        (["db", "build", "-c", str(toml), "--set", "db.chunk_length=nan"], "db.chunk_length"),
        (["db", "build", "-c", str(toml), "--set", "workspace.seed=-1"], "workspace.seed"),
        (["db", "build", "-c", str(toml), "--set", "db.num_neighbors_query=1000000000"], "db.num_neighbors_query"),
        (["db", "build", "-c", str(bad_toml)], str(bad_toml)),
        (["db", "build", "-c", str(toml)], "zz-corrupt.jsonl"),  # the corpus now has a corrupt file (and one more)
        (["db", "query", "star", "-c", str(toml), "--set", "db.nprobe=inf"], "db.nprobe"),
        (["pretrain", "-c", str(toml), "--set", "model.layers=100000000"], "model.layers"),  # refused before any
        (["pretrain", "-c", str(toml), "--set", f"model.hidden={6 * 2**40}"], "model.hidden"),  # allocation
    ]
    for i, (args, needle) in enumerate(commands):
        if i == 0:  # one in a process of its own: the real exit code, no traceback
            proc = run_cli(*args)
            code, out = proc.returncode, proc.stdout + proc.stderr
            assert "Traceback" not in out, (args, out)
        else:  # the rest in this one (an exception other than UserError would fail the test here)
            code, out = cli_in_process(capsys, *args)
        out = "".join(out.split())  # rich may wrap a long line
        assert code == 2, (args, out)
        assert "".join(needle.split()) in out, (args, needle, out)
        assert snapshot(tmp_path / "ws") == before, f"retro {' '.join(args)} changed the workspace"


def test_cli_prints_bracketed_names_in_errors(tmp_path: Path):
    toml = tmp_path / "retro.toml"
    toml.write_text("[dbase]\nx = 1\n", encoding="utf-8")
    proc = run_cli("db", "build", "-c", str(toml))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown section [dbase]" in proc.stderr, proc.stderr
