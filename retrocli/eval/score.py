"""Scoring generated answers: exact match and F1 (the SQuAD v1.1 official rules) and ROUGE-1/2/L/Lsum.

Predictions come from a file in one of two shapes:

    JSON lines (our generator): {"id": ..., "prediction": "...", "gold": ["...", ...], "question": "..."}
        per line; "gold" (a string or a list of strings) and "question" are optional.
    SQuAD's prediction file: one JSON object {question_id: answer_text, ...}.

Gold answers come either from each prediction's "gold" field, or from a dataset file read with
`sft_data.read_file` (`load_gold`). With a gold file every gold question is scored: one without a
prediction scores 0 and is counted as `missing`; predictions for ids the gold file lacks are counted as
`unknown` and ignored. Questions without a short answer (SQuAD v2's `is_impossible`, NQ / QED's empty answer
list, a prediction's empty "gold") are not scored: they are counted as `unanswerable`, and a prediction for
one is neither scored nor `unknown`.

Per question, a metric is the best over the gold answers (the SQuAD rule) or, with first_gold=True,
taken on the first gold answer only (InstructRetro's evaluation). Scores are percentages (100 * mean).
ROUGE is Google's `rouge-score` package (the implementation papers cite), F-measures; `rouge_gm` is the
geometric mean of the mean ROUGE-1, ROUGE-2 and ROUGE-L.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Callable

from ..data.corpus import loads_json
from ..data.qa import answer_list, read_file
from ..errors import UserError

Metric = Callable[[str, str], float]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# ------------------------------------------------------------------------------------------- EM / F1


def normalize_answer(s: str) -> str:
    """SQuAD v1.1: lower case, remove punctuation, remove articles (a, an, the), collapse white space."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(pred: str, gold: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def f1(pred: str, gold: str) -> float:
    """Token-overlap F1 of the normalised strings, as SQuAD v1.1: 0.0 when no token is shared (so also when
    either side normalises to nothing, even both)."""
    pred_tokens, gold_tokens = normalize_answer(pred).split(), normalize_answer(gold).split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred_tokens), num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def regex_match(pred: str, pattern: str) -> float:
    """CuratedTREC's rule (as DPR scores it): 1.0 if the pattern matches at the start of the prediction,
    ignoring case. An invalid pattern is a UserError."""
    return float(_compile(pattern).match(pred.strip()) is not None)


def _check_patterns(patterns: list[str], where: str) -> None:
    for pattern in patterns:
        try:
            _compile(pattern)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, flags=re.IGNORECASE | re.UNICODE | re.MULTILINE)
    except (re.error, OverflowError, RecursionError) as e:  # a{99999999999}: OverflowError; (((...))): recursion
        raise UserError(f"gold answer pattern {pattern!r} is not a valid regular expression: {e}") from None


def max_over_gold(metric: Metric, pred: str, golds: list[str]) -> float:
    """The best score of `pred` against any gold answer (0.0 with no gold answer)."""
    return max((metric(pred, g) for g in golds), default=0.0)


def first_gold(metric: Metric, pred: str, golds: list[str]) -> float:
    """The score of `pred` against the first gold answer only (InstructRetro's rule; 0.0 with none)."""
    return metric(pred, golds[0]) if golds else 0.0


# ----------------------------------------------------------------------------------------------- ROUGE


class Rouge:
    """ROUGE-1/2/L/Lsum F-measures of a prediction against one reference, by `rouge_score.RougeScorer`:
    lower-cased [a-z0-9]+ tokens (everything else, accented letters too, separates words, as in Lin's
    original), with stem=True Porter-stemmed (words of more than 3 letters). rougeLsum is the summary-level
    LCS over sentences split at newlines; for one-line answers it equals rougeL."""

    def __init__(self, stem: bool = False):
        from rouge_score import rouge_scorer  # imports nltk, 1-2 s: only when ROUGE is asked for

        self._scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stem)

    def __call__(self, pred: str, ref: str) -> dict[str, float]:
        return {name: s.fmeasure for name, s in self._scorer.score(ref, pred).items()}  # (target, prediction)


# ------------------------------------------------------------------------------------------------ reading


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise UserError(f"{what} file {path} not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: bytes that are not UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: empty file")
    return text


def _gold_list(value: object, where: str, key: str) -> list[str]:
    """The non-empty answers under `key` ([]: a question without a short answer)."""
    try:
        return answer_list(value)
    except ValueError as e:
        raise UserError(f"{where}: {key!r} {e}") from None


def _jsonl_record(obj: object, where: str) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with 'id' and 'prediction', got {type(obj).__name__}")
    for key in ("id", "prediction"):
        if obj.get(key) is None:
            raise UserError(f"{where}: no {key!r}")
    qid = obj["id"]
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise UserError(f"{where}: 'id' must be a string or an integer")
    if not isinstance(obj["prediction"], str):
        raise UserError(f"{where}: 'prediction' is a {type(obj['prediction']).__name__}, not a string")
    record = {"id": str(qid), "prediction": obj["prediction"], "source": where}
    if obj.get("gold") is not None:
        record["gold"] = _gold_list(obj["gold"], where, "gold")
    if obj.get("gold_regex") is not None:  # CuratedTREC-style answers: patterns, scored by regex_match
        record["gold"] = _gold_list(obj["gold_regex"], where, "gold_regex")
        record["regex"] = True
        _check_patterns(record["gold"], where)  # here, where the message can name the file and line
    if obj.get("question") is not None:
        if not isinstance(obj["question"], str):
            raise UserError(f"{where}: 'question' is a {type(obj['question']).__name__}, not a string")
        record["question"] = obj["question"]
    return record


def read_predictions(path: Path | str) -> dict[str, dict]:
    """{id: {"id", "prediction", "source"[, "gold", "question"]}} from a JSON-lines predictions file or a
    SQuAD prediction file ({question_id: answer_text}). Problems are UserErrors naming the file (and line)."""
    path = Path(path)
    text = _read_text(path, "predictions")
    try:
        whole = loads_json(text)
    except json.JSONDecodeError:
        whole = None  # JSON lines (or broken: reported line by line below)
    if isinstance(whole, dict) and "prediction" not in whole:  # SQuAD prediction format
        out = {}
        for qid, answer in whole.items():
            if not isinstance(answer, str):
                raise UserError(f"{path}: the answer for question {qid!r} is a {type(answer).__name__}, not a "
                                "string (a SQuAD prediction file is {\"question_id\": \"answer text\", ...})")
            out[qid] = {"id": qid, "prediction": answer, "source": f"{path}: question {qid!r}"}
        if not out:
            raise UserError(f"{path}: no predictions")
        return out
    if whole is not None and not isinstance(whole, dict):
        raise UserError(f"{path}: expected JSON lines of {{\"id\", \"prediction\"}} objects or a SQuAD prediction "
                        f"object {{\"question_id\": \"answer\"}}, got a JSON {type(whole).__name__}")
    out = {}
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = loads_json(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not JSON ({e.msg})") from None
        record = _jsonl_record(obj, where)
        if record["id"] in out:
            raise UserError(f"{where}: id {record['id']!r} again (first at {out[record['id']]['source']})")
        out[record["id"]] = record
    return out


def load_gold(path: Path | str, fmt: str) -> dict[str, list[str]]:
    """{id: gold answers} of a dataset file in one of sft_data's formats (squad, qed, nq, instructretro, qa);
    a question without a short answer maps to [] (`score` counts it as unanswerable)."""
    got = read_file(Path(path), fmt)
    gold: dict[str, list[str]] = {}
    first: dict[str, str] = {}
    for rec in got.records + got.unanswerable:
        if rec.id in gold:
            raise UserError(f"{rec.source}: question id {rec.id!r} again (first at {first[rec.id]})")
        gold[rec.id], first[rec.id] = list(rec.answers), rec.source
    return gold


# ------------------------------------------------------------------------------------------------ scoring


def score(predictions: dict[str, dict], gold: dict[str, list[str]] | None = None, first_gold: bool = False,
          rouge: bool = False, regex: bool = False, rouge_stem: bool = False) -> dict:
    """EM and F1 (and ROUGE with rouge=True, Porter-stemmed with rouge_stem=True) as percentages, plus count /
    missing / unknown / unanswerable / regex.

    gold=None: each prediction's own "gold" answers are used (a UserError when one has no "gold"). Otherwise
    every gold question is scored (0 when it has no prediction: `missing`); predictions not in gold are
    `unknown`. A question whose gold answers are [] has no short answer: it is counted in `unanswerable`, not
    scored. Regex answers (regex=True for every gold answer, or a prediction record's "gold_regex"): every
    metric is `regex_match` (a pattern has no tokens to overlap); counted in `regex`.
    """
    pick = _first_gold_fn if first_gold else max_over_gold
    pairs: list[tuple[str | None, list[str], bool]] = []  # (prediction or None when missing, golds, regex)
    missing = unknown = unanswerable = 0
    first_unanswerable = ""  # where the first question without a short answer is, for the message below
    if gold is None:
        for qid, rec in predictions.items():
            rec = _as_record(qid, rec)
            if rec.get("gold") is None:
                where = rec.get("source", f"prediction {qid!r}")
                raise UserError(f"{where}: no 'gold' answers; give a gold file to score against")
            if not rec["gold"]:
                unanswerable += 1
                first_unanswerable = first_unanswerable or rec.get("source", f"prediction {qid!r}")
                continue
            if regex:
                _check_patterns(rec["gold"], rec.get("source", f"prediction {qid!r}"))
            pairs.append((rec["prediction"], list(rec["gold"]), regex or bool(rec.get("regex"))))
    else:
        for qid, golds in gold.items():
            if not golds:
                unanswerable += 1
                first_unanswerable = first_unanswerable or f"gold question {qid!r}"
                continue
            if regex:
                _check_patterns(golds, f"the gold answers of question {qid!r}")
            rec = predictions.get(qid)
            if rec is None:
                missing += 1
                pairs.append((None, list(golds), regex))
            else:
                pairs.append((_as_record(qid, rec)["prediction"], list(golds), regex))
        unknown = sum(1 for qid in predictions if qid not in gold)
    if not pairs:
        if unanswerable:
            raise UserError(f"nothing to score: all {unanswerable} questions have no short answer (empty gold "
                            f"answers, the first at {first_unanswerable})")
        raise UserError("nothing to score: no predictions" + ("" if gold is None else " and no gold questions"))

    rouge_of = Rouge(rouge_stem) if rouge else None
    names = ["exact_match", "f1", *(ROUGE_TYPES if rouge else ())]
    totals = dict.fromkeys(names, 0.0)
    for pred, golds, is_regex in pairs:
        if pred is None:
            continue
        if is_regex:
            hit = pick(regex_match, pred, golds)
            for name in names:
                totals[name] += hit
            continue
        totals["exact_match"] += pick(exact_match, pred, golds)
        totals["f1"] += pick(f1, pred, golds)
        if rouge_of is not None:  # each type's best reference on its own, as for EM and F1
            per_gold = [rouge_of(pred, g) for g in (golds[:1] if first_gold else golds)]
            for name in ROUGE_TYPES:
                totals[name] += max((s[name] for s in per_gold), default=0.0)
    n = len(pairs)
    result: dict = {name: 100.0 * total / n for name, total in totals.items()}
    if rouge:
        r1, r2, rl = (result[k] / 100.0 for k in ("rouge1", "rouge2", "rougeL"))
        result["rouge_gm"] = 100.0 * (r1 * r2 * rl) ** (1 / 3)
        result["rouge_stem"] = rouge_stem
    result.update(count=n, missing=missing, unknown=unknown, unanswerable=unanswerable,
                  regex=sum(1 for _, _, is_regex in pairs if is_regex))
    return result


_first_gold_fn = first_gold  # `score` has a parameter of the same name


def _as_record(qid: str, rec: object) -> dict:
    if isinstance(rec, str):
        return {"id": qid, "prediction": rec}
    if not isinstance(rec, dict) or not isinstance(rec.get("prediction"), str):
        raise UserError(f"prediction {qid!r}: expected an object with a string 'prediction'")
    return rec
