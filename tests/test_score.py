"""Scoring: SQuAD v1.1 normalisation, EM / F1, max-over-gold vs first-gold, ROUGE (equal to Google's
rouge-score, computed here independently), both prediction file shapes, gold from a SQuAD file (missing and
unknown questions), questions without a short answer (counted, not scored), errors naming the file and line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from retrocli.errors import UserError
from retrocli.eval.score import (
    exact_match,
    f1,
    first_gold,
    load_gold,
    max_over_gold,
    normalize_answer,
    read_predictions,
    regex_match,
    score,
)


@pytest.mark.parametrize("raw, expected", [
    ("The Denver Broncos", "denver broncos"),
    ("An apple a day", "apple day"),
    ("  Quick,   brown-fox!  ", "quick brownfox"),
    ("theater anthem", "theater anthem"),  # articles only as whole words
    ("a.b", "ab"),  # punctuation goes before articles: "a.b" -> "ab", not "b"
    ("THE", ""),
    ("Levi's\tStadium\n", "levis stadium"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match_and_f1_hand_computed():
    assert exact_match("the Denver Broncos", "Denver Broncos") == 1.0
    assert f1("the Denver Broncos", "Denver Broncos") == 1.0
    assert exact_match("Broncos", "Denver Broncos") == 0.0
    assert f1("Broncos", "Denver Broncos") == pytest.approx(2 * (1 * 0.5) / 1.5)
    # P = 2/4, R = 2/3 -> F1 = 2 * (1/2 * 2/3) / (1/2 + 2/3) = 4/7
    assert f1("denver broncos won big", "denver broncos team") == pytest.approx(4 / 7)
    # repeated tokens are clipped by the Counter intersection: P = 1/3, R = 1 -> 0.5
    assert f1("broncos broncos broncos", "broncos") == pytest.approx(0.5)
    assert f1("Santa Clara", "Carolina Panthers") == 0.0
    # v1.1: no shared token -> 0, even when both sides normalise to nothing
    assert exact_match("the", "a") == 1.0
    assert f1("the", "a") == 0.0


def test_max_over_gold_vs_first_gold():
    golds = ["Denver Broncos", "Broncos"]
    assert max_over_gold(exact_match, "Broncos", golds) == 1.0
    assert first_gold(exact_match, "Broncos", golds) == 0.0
    assert max_over_gold(f1, "Broncos", golds) == 1.0
    assert first_gold(f1, "Broncos", golds) == pytest.approx(2 / 3)
    assert max_over_gold(f1, "x", []) == 0.0


ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
# (prediction, gold answers): punctuation, casing, word order, repeats, no bigram, several references (the
# best one counts), an empty prediction, several lines (rougeLsum differs from rougeL), words stemming merges
ROUGE_PAIRS = [
    ("The cat sat on the mat.", ["the cat is on the mat"]),
    ("Denver Broncos", ["Carolina Panthers", "the DENVER broncos!", "Broncos"]),
    ("b a", ["a b"]),
    ("one", ["one"]),
    ("", ["Santa Clara, California"]),
    ("Levi's Stadium, in Santa Clara", ["Levi's Stadium", "Santa Clara"]),
    ("It rained.\nThe match was played anyway.", ["The match was played.\nIt rained all day."]),
    ("running dogs were barking", ["the dog runs and barks", "cats"]),
    ("14 December 1972 UTC", ["December 1972", "14 December 1972"]),
]


def rouge_score_means(pairs: list[tuple[str, list[str]]], stem: bool, first: bool = False) -> dict[str, float]:
    """100 * the mean over questions of rouge-score's F-measures: score_multi takes the best reference per type;
    first: the first reference only."""
    scorer = rouge_scorer.RougeScorer(ROUGE_TYPES, use_stemmer=stem)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, golds in pairs:
        scores = scorer.score(golds[0], pred) if first else scorer.score_multi(golds, pred)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    means = {name: 100 * total / len(pairs) for name, total in totals.items()}
    means["rouge_gm"] = 100 * math.prod(means[k] / 100 for k in ("rouge1", "rouge2", "rougeL")) ** (1 / 3)
    return means


def predictions_of(pairs: list[tuple[str, list[str]]]) -> dict[str, dict]:
    return {f"q{i}": {"id": f"q{i}", "prediction": pred, "gold": golds} for i, (pred, golds) in enumerate(pairs)}


@pytest.mark.parametrize("stem", [False, True])
@pytest.mark.parametrize("first", [False, True])
def test_rouge_equals_rouge_score(stem: bool, first: bool):
    ours = score(predictions_of(ROUGE_PAIRS), rouge=True, rouge_stem=stem, first_gold=first)
    expected = rouge_score_means(ROUGE_PAIRS, stem, first)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    assert ours["rouge_stem"] is stem
    # the cases are not trivial: stemming, the best reference and sentence-level LCS all change the numbers
    assert expected != rouge_score_means(ROUGE_PAIRS, not stem, first)
    assert expected != rouge_score_means(ROUGE_PAIRS, stem, not first)
    assert expected["rougeLsum"] != pytest.approx(expected["rougeL"])


def test_rouge_of_one_pair_by_hand():
    result = score(predictions_of([("The cat sat on the mat.", ["the cat is on the mat"])]), rouge=True)
    # unigrams: the x2, cat, on, mat shared -> 5 of 6 each side; bigrams: the-cat, on-the, the-mat -> 3 of 5;
    # LCS: the cat on the mat -> 5 of 6
    assert result["rouge1"] == pytest.approx(100 * 5 / 6) and result["rouge2"] == pytest.approx(100 * 3 / 5)
    assert result["rougeL"] == pytest.approx(100 * 5 / 6) == pytest.approx(result["rougeLsum"])
    empty = score(predictions_of([("", ["Santa Clara"])]), rouge=True)
    assert all(empty[k] == 0.0 for k in ROUGE_TYPES + ["rouge_gm"])


def test_cli_rouge_through_retro_score(tmp_path: Path):
    from .conftest import run_cli

    path = tmp_path / "generated.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prediction": pred, "gold": golds}) + "\n"
                            for i, (pred, golds) in enumerate(ROUGE_PAIRS)))
    for flags, stem in ((["--rouge"], False), (["--rouge-stem"], True)):
        proc = run_cli("score", str(path), *flags, "--json")
        assert proc.returncode == 0, proc.stderr
        printed = json.loads(proc.stdout)
        for name, value in rouge_score_means(ROUGE_PAIRS, stem).items():
            assert printed[name] == pytest.approx(value, abs=1e-9), (flags, name)
        assert printed["rouge_stem"] is stem and printed["count"] == len(ROUGE_PAIRS)
    table = run_cli("score", str(path), "--rouge")
    assert table.returncode == 0, table.stderr
    assert "ROUGE-Lsum" in table.stderr and f"{rouge_score_means(ROUGE_PAIRS, False)['rougeLsum']:.2f}" in table.stderr


def test_rouge_score_is_imported_only_for_rouge(tmp_path: Path):
    """rouge-score imports nltk (about a second): `retro score` without --rouge does not pay for it."""
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "a", "prediction": "x", "gold": ["x"]}) + "\n")
    probe = ("import sys; from retrocli.cli import main; code = main(sys.argv[1:]); "
             "print(code, 'rouge_score' in sys.modules, 'nltk' in sys.modules)")
    for flags, loaded in (([], "False False"), (["--rouge"], "True True")):
        proc = subprocess.run([sys.executable, "-c", probe, "score", str(path), "--json", *flags],
                              capture_output=True, text=True)
        assert proc.stdout.splitlines()[-1] == f"0 {loaded}", proc.stdout + proc.stderr


def _squad(tmp_path):
    data = {"version": "1.1", "data": [{"title": "Super_Bowl_50", "paragraphs": [{
        "context": "The Denver Broncos defeated the Carolina Panthers at Levi's Stadium in Santa Clara.",
        "qas": [
            {"id": "q1", "question": "Who won?", "answers": [{"text": "Denver Broncos", "answer_start": 4},
                                                            {"text": "Broncos", "answer_start": 11}]},
            {"id": "q2", "question": "Which city?", "answers": [{"text": "Santa Clara", "answer_start": 71}]},
            {"id": "q3", "question": "Which stadium?", "answers": [{"text": "Levi's Stadium", "answer_start": 53}]},
        ]}]}]}
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(data))
    return path


def test_squad_predictions_against_squad_gold(tmp_path):
    gold = load_gold(_squad(tmp_path), "squad")
    assert gold == {"q1": ["Denver Broncos", "Broncos"], "q2": ["Santa Clara"], "q3": ["Levi's Stadium"]}
    pred_path = tmp_path / "predictions.json"
    pred_path.write_text(json.dumps({"q1": "the Denver Broncos", "q2": "Clara", "zz": "unknown question"}))
    preds = read_predictions(pred_path)
    assert {k: v["prediction"] for k, v in preds.items()} == {"q1": "the Denver Broncos", "q2": "Clara",
                                                             "zz": "unknown question"}
    result = score(preds, gold)
    # q1: EM 1, F1 1; q2: EM 0, F1 2/3 (P 1, R 1/2); q3: missing -> 0; zz ignored
    assert result["count"] == 3 and result["missing"] == 1 and result["unknown"] == 1
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert "rouge1" not in result


def test_cli_prints_writes_and_names_bad_input(tmp_path):
    from .conftest import run_cli

    gold = _squad(tmp_path)
    preds = tmp_path / "predictions.json"
    preds.write_text(json.dumps({"q1": "the Denver Broncos", "q2": "Clara"}))
    proc = run_cli("score", str(preds), "--gold", str(gold), "--json")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3) and printed["missing"] == 1
    assert json.loads((tmp_path / "predictions.json.scores.json").read_text())["exact_match"] == printed["exact_match"]
    proc = run_cli("score", str(tmp_path / "absent.jsonl"))
    assert proc.returncode == 2 and "absent.jsonl" in proc.stderr and "Traceback" not in proc.stderr


def test_gold_questions_without_a_short_answer_are_counted_not_scored(tmp_path):
    from .conftest import run_cli

    def qed(i, answers):  # the real QED / NQ shape; unanswerable: answer_text [""], answer_spans [[-1, -1]]
        return {"example_id": i, "question_text": f"question {i}?", "title_text": "T", "paragraph_text": "p",
                "answer_text": answers, "answer_spans": [[0, 1]] if any(answers) else [[-1, -1]]}

    rows = [qed(1, ["Denver Broncos"]), qed(2, [""]), qed(3, ["Santa Clara"]), qed(4, [])]
    gold_path = tmp_path / "qed_dev.jsonl"
    gold_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gold = load_gold(gold_path, "qed")
    assert gold == {"1": ["Denver Broncos"], "2": [], "3": ["Santa Clara"], "4": []}
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": qid, "prediction": p}) + "\n"
                             for qid, p in (("1", "Denver Broncos"), ("2", "no answer"), ("9", "?"))))
    result = score(read_predictions(preds), gold, rouge=True)
    # 1 right, 3 missing; 2 and 4 not scored (the prediction for 2 is not "unknown"); 9 unknown
    assert (result["count"], result["missing"], result["unanswerable"], result["unknown"]) == (2, 1, 2, 1)
    assert result["exact_match"] == pytest.approx(50.0) and result["rouge1"] == pytest.approx(50.0)

    proc = run_cli("score", str(preds), "--gold", str(gold_path), "--gold-format", "qed", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["unanswerable"] == 2 and json.loads(proc.stdout)["count"] == 2
    table = run_cli("score", str(preds), "--gold", str(gold_path), "--gold-format", "qed")
    assert table.returncode == 0 and "no answer" in table.stderr

    with gold_path.open("a") as f:
        f.write(json.dumps({**qed(5, ["x"]), "answer_text": {"text": "x"}}) + "\n")
    proc = run_cli("score", str(preds), "--gold", str(gold_path), "--gold-format", "qed")
    assert proc.returncode == 2 and f"{gold_path}:5: 'answer_text' must be a string" in proc.stderr
    assert "Traceback" not in proc.stderr

    # SQuAD v2: is_impossible questions are counted the same way
    v2 = tmp_path / "dev-v2.json"
    v2.write_text(json.dumps({"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [
        {"id": "a", "question": "q?", "answers": [{"text": "Paris", "answer_start": 0}], "is_impossible": False},
        {"id": "b", "question": "q?", "answers": [], "plausible_answers": [{"text": "Lyon"}], "is_impossible": True},
    ]}]}]}))
    result = score({"a": "Paris", "b": "Lyon"}, load_gold(v2, "squad"))
    assert (result["count"], result["unanswerable"], result["unknown"], result["exact_match"]) == (1, 1, 0, 100.0)

    # a generated file's own empty "gold": the same; a missing "gold" is still an error
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({"id": "a", "prediction": "x", "gold": ["x"]}) + "\n"
                   + json.dumps({"id": "b", "prediction": "y", "gold": [""]}) + "\n")
    result = score(read_predictions(own))
    assert (result["count"], result["unanswerable"], result["exact_match"]) == (1, 1, 100.0)
    only = tmp_path / "only.jsonl"
    only.write_text(json.dumps({"id": "b", "prediction": "y", "gold": []}) + "\n")
    with pytest.raises(UserError, match=rf"all 1 questions have no short answer .*the first at {only}:1"):
        score(read_predictions(only))


def test_first_gold_changes_the_score(tmp_path):
    gold = load_gold(_squad(tmp_path), "squad")
    preds = {"q1": {"id": "q1", "prediction": "Broncos"}, "q2": {"id": "q2", "prediction": "Santa Clara"},
             "q3": {"id": "q3", "prediction": "Levi's Stadium"}}
    best, first = score(preds, gold), score(preds, gold, first_gold=True)
    assert best["exact_match"] == pytest.approx(100.0) and best["f1"] == pytest.approx(100.0)
    assert first["exact_match"] == pytest.approx(200 / 3)
    assert first["f1"] == pytest.approx(100 * (2 / 3 + 1 + 1) / 3)
    assert first["missing"] == 0 and first["unknown"] == 0


def test_jsonl_predictions_with_gold_and_rouge(tmp_path):
    path = tmp_path / "gen.jsonl"
    lines = [
        {"id": "a", "question": "Where?", "prediction": "The cat sat on the mat.", "gold": ["the cat is on the mat"]},
        {"id": 7, "prediction": "Denver Broncos", "gold": "denver broncos"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    preds = read_predictions(path)
    assert list(preds) == ["a", "7"]
    assert preds["a"]["question"] == "Where?" and preds["7"]["gold"] == ["denver broncos"]
    result = score(preds, rouge=True)
    assert result["count"] == 2 and result["missing"] == 0 and result["unknown"] == 0
    assert result["exact_match"] == pytest.approx(50.0)
    # a: normalised "cat sat on mat" vs "cat is on mat": P = R = 3/4
    assert result["f1"] == pytest.approx(100 * (0.75 + 1) / 2)
    expected = rouge_score_means([(x["prediction"], [x["gold"]] if isinstance(x["gold"], str) else x["gold"])
                                  for x in lines], stem=False)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value), name


def test_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_predictions(tmp_path / "nope.jsonl")
    first = '{"id": "a", "prediction": "x"}\n'
    for name, text, message in [
        ("bad.jsonl", first + '{"id": "b", "prediction": \n', r"bad\.jsonl:2: not JSON"),
        ("nopred.jsonl", first + '{"id": "b", "answer": "y"}\n', r"nopred\.jsonl:2: no 'prediction'"),
        ("dup.jsonl", first + '{"id": "a", "prediction": "y"}\n',
         r"dup\.jsonl:2: id 'a' again \(first at .*dup\.jsonl:1\)"),
        ("list.json", '["a", "b"]', "got a JSON list"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=message):
            read_predictions(tmp_path / name)
    squad_bad = tmp_path / "preds.json"
    squad_bad.write_text(json.dumps({"q1": ["not", "a", "string"]}))
    with pytest.raises(UserError, match="question 'q1'"):
        read_predictions(squad_bad)
    nogold = tmp_path / "nogold.jsonl"
    nogold.write_text('{"id": "a", "prediction": "x", "gold": ["x"]}\n{"id": "b", "prediction": "y"}\n')
    with pytest.raises(UserError, match=r"nogold\.jsonl:2: no 'gold'"):
        score(read_predictions(nogold))
    with pytest.raises(UserError, match="not found"):
        load_gold(tmp_path / "missing.json", "squad")


def test_regex_answers_match_the_start_of_the_prediction_ignoring_case(tmp_path):
    assert regex_match("1,000 feet high", r"1,?000\s*(ft|feet)") == 1.0
    assert regex_match("  Mount Everest", r"mount everest|everest") == 1.0  # case and leading space ignored
    assert regex_match("about 1000 feet", r"1,?000") == 0.0  # not at the start
    with pytest.raises(UserError, match="not a valid regular expression"):
        regex_match("x", "(")
    preds = tmp_path / "trec.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "prediction": "Everest", "gold_regex": ["(mount )?everest"]},
        {"id": "b", "prediction": "K2", "gold_regex": "(mount )?everest"},
        {"id": "c", "prediction": "the Nile river", "gold": ["Nile"]},  # ordinary SQuAD rules
    ]))
    result = score(read_predictions(preds))
    assert result["regex"] == 2
    assert result["exact_match"] == pytest.approx(100 / 3)  # a by regex; c's normalised "nile river" != "nile"
    assert result["f1"] == pytest.approx(100 * (1 + 0 + 2 / 3) / 3)  # regex F1 = EM; c: P 1/2, R 1


def test_several_prediction_files_are_several_tasks(tmp_path):
    from .conftest import run_cli

    files = []
    for name, pred in [("nq.jsonl", "Paris"), ("squad.jsonl", "Lyon")]:
        files.append(tmp_path / name)
        files[-1].write_text(json.dumps({"id": "q", "prediction": pred, "gold": ["Paris"]}) + "\n")
    proc = run_cli("score", *map(str, files), "--json")
    assert proc.returncode == 0, proc.stderr
    both = json.loads(proc.stdout)
    assert both[str(files[0])]["exact_match"] == 100.0 and both[str(files[1])]["exact_match"] == 0.0
    table = run_cli("score", *map(str, files))
    assert table.returncode == 0 and "nq.jsonl" in table.stderr and "squad.jsonl" in table.stderr
    assert run_cli("score", *map(str, files), "--out", str(tmp_path / "x.json")).returncode == 2
