"""`retro db eval`: question -> passage recall, through the installed `retro` executable.

The database holds four known paragraphs of made-up words beside topic filler documents. A question that
repeats its paragraph's words finds it at rank 1 (the lexical embedder matches pieces); one made of the
sailing filler's words finds sailing chunks and never its paragraph. So recall@1 = recall@5 = MRR = 1/2 exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import small_sections, synthetic_documents, write_jsonl, write_toml
from .test_cli import first_line, retro

PARAGRAPHS = {  # title -> text: words found nowhere else in the corpus
    "alpha": "zorblax quintessa vermilune oxtrapod glimmerfen",
    "beta": "drumwhistle pexolan kravunto siltbreaker mornavel",
    "gamma": "ulvastrine jopperwick fendragon quorlassi thimbletop",
    "delta": "wexmoor plintharo caskovel brindlemire zestrovan",
}
SAILING = "boat wind sail harbour mast rudder knot tide anchor keel deck crew"


def squad(path: Path, articles: list[tuple[str, str, list[tuple[str, str]]]]) -> Path:
    """A SQuAD v1.1 file: (title, context, [(question, answer)]) per article (one paragraph each)."""
    data = [{"title": title, "paragraphs": [{"context": context, "qas": [
        {"id": f"{title}-{i}", "question": q, "answers": [{"text": a, "answer_start": 0}]}
        for i, (q, a) in enumerate(qas)]}]} for title, context, qas in articles]
    path.write_text(json.dumps({"version": "1.1", "data": data}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dbeval")
    docs = synthetic_documents(30, 200) + [{"id": t, "title": t, "text": p} for t, p in PARAGRAPHS.items()]
    write_jsonl(root / "corpus" / "docs.jsonl", docs)
    toml = write_toml(root / "retro.toml", small_sections(corpus={"valid_fraction": 0.0}))
    proc = retro("db", "build", "-c", str(toml))
    assert proc.returncode == 0, proc.stderr
    # in the database: alpha and beta asked in their own words (rank 1), gamma and delta in sailing words (never)
    squad(root / "in_db.json", [
        ("alpha", PARAGRAPHS["alpha"], [(PARAGRAPHS["alpha"] + "?", "quintessa")]),
        ("beta", PARAGRAPHS["beta"], [(PARAGRAPHS["beta"] + "?", "kravunto")]),
        ("gamma", PARAGRAPHS["gamma"], [(SAILING + "?", "fendragon")]),
        ("delta", PARAGRAPHS["delta"], [(SAILING + " anchor?", "caskovel")]),
    ])
    # not in the database: answer matching. "quintessa" is in the chunk the question finds, "nowhereword" nowhere
    squad(root / "elsewhere.json", [
        ("other", "a paragraph the database has never seen, about quintessa", [
            (PARAGRAPHS["alpha"] + "?", "Quintessa!"), (PARAGRAPHS["beta"] + "?", "the nowhereword")]),
    ])
    return toml


def evaluate(toml: Path, name: str, *args: str) -> dict:
    proc = retro("db", "eval", "-c", str(toml), str(toml.parent / name), "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_gold_paragraphs_in_the_database_are_matched_by_document(built: Path):
    out = evaluate(built, "in_db.json", "-k", "5,1")
    assert out["match"] == "document" and out["match_reason"].startswith("auto: 4 of 4 sampled")
    assert out["k"] == [1, 5] and out["recall"] == {"1": 0.5, "5": 0.5} and out["mrr"] == 0.5
    assert out["questions"] == 4 and out["skipped"] == {} and out["format"] == "squad"
    assert out["queries_per_second"] > 0
    first_two = evaluate(built, "in_db.json", "-k", "1", "--limit", "2")
    assert first_two["questions"] == 2 and first_two["recall"] == {"1": 1.0}


def test_paragraphs_elsewhere_are_matched_by_answer_and_the_table_says_so(built: Path):
    out = evaluate(built, "elsewhere.json", "-k", "1,5")
    assert out["match"] == "answer" and out["match_reason"].startswith("auto: 0 of 1 sampled")
    assert out["recall"] == {"1": 0.5, "5": 0.5} and out["mrr"] == 0.5 and out["questions"] == 2
    # forced to document matching, no gold paragraph is in the database: nothing to evaluate
    proc = retro("db", "eval", "-c", str(built), str(built.parent / "elsewhere.json"), "--match", "document")
    assert proc.returncode == 2 and "gold passage not in the database: 2" in proc.stderr
    table = retro("db", "eval", "-c", str(built), str(built.parent / "elsewhere.json"))
    assert table.returncode == 0, table.stderr
    shown = table.stdout + table.stderr  # (rich's console writes to stderr; stdout is kept for --json)
    assert "match by answer" in shown and "recall@k" in shown and "queries/s" in shown


def test_document_file_forced_to_answer_matching(built: Path):
    out = evaluate(built, "in_db.json", "--match", "answer", "-k", "1")
    assert out["match"] == "answer" and out["match_reason"] == "--match answer"
    assert out["recall"] == {"1": 0.5}  # alpha's and beta's answers are in the chunks found at rank 1


def test_questions_with_answers_alone_are_matched_by_answer(built: Path):
    """NQ-open's JSON lines carry answers but no passage: recall is by answer, as DPR's top-k accuracy."""
    write_jsonl(built.parent / "open.jsonl", [{"question": PARAGRAPHS["alpha"] + "?", "answer": ["Quintessa!"]},
                                              {"question": PARAGRAPHS["beta"] + "?", "answer": ["nowhereword"]}])
    out = evaluate(built, "open.jsonl", "-k", "1")
    assert out["format"] == "qa" and out["match"] == "answer" and out["recall"] == {"1": 0.5}
    proc = retro("db", "eval", "-c", str(built), str(built.parent / "open.jsonl"), "--match", "document")
    assert proc.returncode == 2 and "--match answer" in first_line(proc.stderr), proc.stderr


def test_mistakes_are_one_message_with_exit_2(built: Path, tmp_path: Path):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "hello"}]}])
    unbuilt = write_toml(tmp_path / "retro.toml", small_sections())
    cases = [
        ([str(built), str(tmp_path / "none.json")], "not found"),
        ([str(built), str(tmp_path / "chat.jsonl")], "carries no gold passage"),
        ([str(built), str(built.parent / "in_db.json"), "-k", "0"], "-k values must be in 1.."),
        ([str(built), str(built.parent / "in_db.json"), "-k", "1,x"], "comma-separated"),
        ([str(built), str(built.parent / "in_db.json"), "--match", "title"], "--match must be one of"),
        ([str(built), str(built.parent / "in_db.json"), "--limit", "0"], "--limit must be positive"),
        ([str(unbuilt), str(built.parent / "in_db.json")], "retro db build"),
    ]
    for (toml, *args), says in cases:
        proc = retro("db", "eval", "-c", toml, *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and says in first_line(proc.stderr), (args, proc.stderr)


def test_help_has_examples():
    proc = retro("db", "eval", "--help")
    assert proc.returncode == 0 and "retro db eval" in proc.stdout.split("Examples", 1)[1]
