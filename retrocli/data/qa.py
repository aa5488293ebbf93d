"""Instruction-tuning (SFT) data: dataset files -> records -> prompts -> token samples, and weighted blends.

The data flow:

    file (squad | qed | nq | instructretro | chat | self_instruct | qa, optionally .gz)
      --read_records-->  [Record(id, question, answers, contexts, source, group)]
      --split_records--> train / held-out records (whole SQuAD articles stay on one side)
      --Blend.draw-->    (dataset, record) pairs: each dataset drawn with probability weight / total, its
                         records visited in a seeded shuffled order, epoch after epoch
      --encode_sample--> {"tokens", "targets", "loss_mask"} (seq_length each) + the contexts used

Prompt layout (InstructRetro): the system line, the contexts as "title: {title}, source: {text}" joined by
blank lines, then "User: {question}\\n\\nAssistant:"; the sections are separated by blank lines and the answer
follows as " " + answer. With a Hugging Face tokenizer that has a chat template (and sft.chat_template =
"auto"), the template writes the prompt instead (ChatPrompt): a system message, then one user message of the
contexts and the question, then the template's generation prompt; the answer follows it directly (the
template's turn ends where the answer's first word begins: no space).
A sample is [prompt][answer][EOS][pad]; the loss covers the answer and its EOS only. When a sample is too long,
context text is cut (whole trailing contexts first, then the tail of the last kept one), never the answer; a
record whose question and answer alone do not fit is skipped and counted.

Questions without a short answer are data, not damage: NQ and QED give them as an empty answer list or [""],
SQuAD v2 as `is_impossible: true` with no answers, the qa and instructretro formats as an empty answer list.
They are left out of SFT and of scoring and counted (`FileRecords.unanswerable`); nothing here trains a model
to answer "unanswerable". The chat and self_instruct formats have no such notion: an empty reply is damage.

Bad input (invalid JSON, a record of the wrong shape, a missing question or answer field, an empty question
or reply, a field of the wrong type) is a UserError naming the file and line ("path:LINE" for JSON lines) or
record ("path:record N", counted from 1, for JSON files), or is skipped and counted with on_bad_record="skip".
"""

from __future__ import annotations

import gzip
import json
import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import numpy as np

from ..config import INSTRUCTRETRO_SYSTEM as DEFAULT_SYSTEM
from ..config import SFT_FORMATS as FORMATS
from ..config import BlendEntry, SFTConfig
from ..errors import UserError
from .corpus import GZIP_ERRORS, is_valid, loads_json
from .tokenizer import HFTokenizer, Tokenizer

JSON_FORMATS = ("squad", "instructretro")  # one JSON document; the others are JSON lines

# InstructRetro's user turn for short-answer QA evaluation (the answer then follows as " " + answer).
QA_USER = "User: Answer the following question with a short span. {question}\n\nAssistant: The answer is"

HUMAN, ASSISTANT = "### Human:", "### Assistant:"


@dataclass
class Record:
    """One instruction example. answers[0] is the training target; more answers serve QA scoring."""

    id: str
    question: str
    answers: list[str]
    contexts: list[dict] = field(default_factory=list)  # [{"title": str, "text": str}, ...]
    source: str = ""  # "path:LINE" or "path:record N", for messages
    group: str = ""  # records of one group stay on one side of a split (the SQuAD article title)


# ------------------------------------------------------------------------------------------------- reading


class _BadRecord(Exception):
    """A record that cannot be used; `why` says what is wrong with it."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


@dataclass
class FileRecords:
    """What reading one dataset file gave."""

    records: list[Record]  # the questions with an answer, in file order
    unanswerable: list[Record] = field(default_factory=list)  # questions without a short answer (answers == [])
    malformed: int = 0  # bad records skipped with on_bad_record="skip"


class _Out:
    """Collects the records of one file and handles bad ones (raise, or skip and count)."""

    def __init__(self, on_bad_record: str):
        self.on_bad_record = on_bad_record
        self.records: list[Record] = []
        self.unanswerable: list[Record] = []
        self.malformed = 0

    def add(self, record: Record) -> None:
        (self.records if record.answers else self.unanswerable).append(record)

    def bad(self, where: str, why: str) -> None:
        if self.on_bad_record == "skip":
            self.malformed += 1
            return
        raise UserError(f"{where}: {why} (skip such records and count them with on_bad_record = \"skip\")")


def read_records(path: Path, fmt: str, on_bad_record: str = "error") -> tuple[list[Record], int]:
    """The questions with an answer in a dataset file, and how many records were left out in all (malformed
    ones skipped in "skip" mode, and questions without a short answer). `read_file` tells the two apart."""
    got = read_file(path, fmt, on_bad_record)
    return got.records, got.malformed + len(got.unanswerable)


def read_file(path: Path, fmt: str, on_bad_record: str = "error") -> FileRecords:
    """The records of a dataset file: those with an answer, those without one (left out of SFT and scoring,
    counted), and the count of malformed ones skipped in "skip" mode. `.gz` files are read compressed."""
    path = Path(path)
    if fmt not in FORMATS:
        raise UserError(f"unknown SFT data format {fmt!r} for {path} (known: {', '.join(FORMATS)})")
    if on_bad_record not in ("error", "skip"):
        raise UserError(f"on_bad_record must be \"error\" or \"skip\", not {on_bad_record!r}")
    if not path.is_file():
        raise UserError(f"SFT data file {path} not found")
    out = _Out(on_bad_record)
    if fmt in JSON_FORMATS:
        data = _load_json(path, fmt)
        (_walk_squad if fmt == "squad" else _walk_instructretro)(data, path, out)
    else:
        _read_jsonl(path, _LINE_PARSERS[fmt], out)
    if not out.records:
        raise UserError(f"{path}: no usable {fmt} records ({out.malformed} malformed skipped, "
                        f"{len(out.unanswerable)} without an answer): check the file and its format")
    return FileRecords(out.records, out.unanswerable, out.malformed)


def detect_format(path: Path) -> str:
    """The format of a QA / instruction file, from its name and first record: a JSON object with "data" is
    SQuAD, a JSON list InstructRetro's; JSON lines by their keys (question_text: qed, text or messages: chat,
    instruction: self_instruct, question: qa)."""
    path = Path(path)
    name = path.name.removesuffix(".gz")
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            if name.endswith(".json"):
                head = f.read(4096).lstrip()
                if head.startswith("["):
                    return "instructretro"
                if head.startswith("{"):
                    return "squad"
            else:
                line = next((ln for ln in f if ln.strip()), "")
                obj = loads_json(line) if line else None
                if isinstance(obj, dict):
                    for key, fmt in (("question_text", "qed"), ("instances", "self_instruct"), ("messages", "chat"),
                                     ("question", "qa"), ("text", "chat")):
                        if key in obj:
                            return fmt
    except (*GZIP_ERRORS, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot tell its format ({e}): pass --format") from None
    raise UserError(f"{path}: cannot tell its format from its first record: pass --format "
                    f"({', '.join(FORMATS)})")


def _read_bytes(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
            return f.read()
    except GZIP_ERRORS as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _load_json(path: Path, fmt: str) -> object:
    data = _read_bytes(path)
    if not data.strip():
        raise UserError(f"{path}: empty file")
    try:
        return loads_json(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: bytes that are not UTF-8") from None
    except json.JSONDecodeError as e:
        hint = (f" (the {fmt} format is one JSON document; this looks like JSON lines)"
                if e.msg == "Extra data" and e.lineno > 1 else "")
        raise UserError(f"{path}:{e.lineno}: not JSON ({e.msg}){hint}") from None


def _read_jsonl(path: Path, parse: Callable[[dict, str, str, _Out], None], out: _Out) -> None:
    data = _read_bytes(path)
    if not data.strip():
        raise UserError(f"{path}: empty file")
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        src = f"{path}:{lineno}"
        try:
            obj = loads_json(raw.decode("utf-8"))
            if not isinstance(obj, dict):
                raise _BadRecord(f"expected a JSON object, got {type(obj).__name__}")
            parse(obj, src, f"{path.name}:{lineno}", out)
        except UnicodeDecodeError:
            out.bad(src, "bytes that are not UTF-8")
        except json.JSONDecodeError as e:
            out.bad(src, f"not JSON ({e.msg})")
        except _BadRecord as e:
            out.bad(src, e.why)


# Field checks: each raises _BadRecord saying what is wrong.


def _text(obj: dict, keys: tuple[str, ...], required: bool = True) -> str:
    """The stripped string under the first of `keys` present; required ones must be non-empty."""
    for key in keys:
        if obj.get(key) is None:
            continue
        value = obj[key]
        if not isinstance(value, str):
            raise _BadRecord(f"{key!r} is a {type(value).__name__}, not a string")
        if required and not value.strip():
            raise _BadRecord(f"{key!r} is empty")
        return value.strip()
    if required:
        raise _BadRecord(f"no {' or '.join(repr(k) for k in keys)}")
    return ""


def _answers(obj: dict, keys: tuple[str, ...]) -> list[str]:
    """A string or a list of strings under the first of `keys` present: the non-empty ones, stripped (none:
    a question without a short answer). The field itself must be there."""
    for key in keys:
        value = obj.get(key)
        if value is None:
            continue
        try:
            return answer_list(value)
        except ValueError as e:
            raise _BadRecord(f"{key!r} {e}") from None
    raise _BadRecord(f"no {' or '.join(repr(k) for k in keys)}")


def answer_list(value: object) -> list[str]:
    """A string or a list of strings -> its non-empty answers, stripped: [] when there is none ("", [], [""]:
    how NQ and QED write a question without a short answer). ValueError for any other type."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(a, str) for a in items):
        raise ValueError("must be a string or a list of strings")
    return [a.strip() for a in items if a.strip()]


def _contexts(obj: dict, key: str) -> list[dict]:
    """[{"title", "text"}] from a list of objects with a string text and an optional string title."""
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _BadRecord(f"{key!r} must be a list of {{\"title\", \"text\"}} objects")
    out = []
    for i, ctx in enumerate(value):
        if not isinstance(ctx, dict):
            raise _BadRecord(f"{key}[{i}] is a {type(ctx).__name__}, not an object")
        try:
            text, title = _text(ctx, ("text",), required=False), _text(ctx, ("title",), required=False)
        except _BadRecord as e:
            raise _BadRecord(f"{key}[{i}]: {e.why}") from None
        if text:
            out.append({"title": title, "text": text})
    return out


def _record_id(obj: dict, keys: tuple[str, ...], default: str) -> str:
    for key in keys:
        if obj.get(key) is not None:
            return str(obj[key])
    return default


# Formats. JSON-lines parsers add the records of one line to `out` (raising _BadRecord for a bad line).


def _parse_qed(obj: dict, src: str, default_id: str, out: _Out) -> None:
    question = _text(obj, ("question_text", "question"))
    answers = _answers(obj, ("answer_text", "answer"))
    paragraph, title = _text(obj, ("paragraph_text",), required=False), _text(obj, ("title_text",), required=False)
    contexts = [{"title": title, "text": paragraph}] if paragraph else []
    out.add(Record(_record_id(obj, ("example_id", "id"), default_id), question, answers, contexts,
                              src, group=title))


def _parse_qa(obj: dict, src: str, default_id: str, out: _Out) -> None:
    question, answers = _text(obj, ("question",)), _answers(obj, ("answer", "answers"))
    out.add(Record(_record_id(obj, ("id",), default_id), question, answers, [], src))


def _parse_chat(obj: dict, src: str, default_id: str, out: _Out) -> None:
    if obj.get("messages") is not None:
        question, answer = _from_messages(obj["messages"])
    else:
        question, answer = _from_text(_text(obj, ("text",)))
    out.records.append(Record(_record_id(obj, ("id",), default_id), question, [answer], [], src))


def _from_text(text: str) -> tuple[str, str]:
    """'### Human: Q ### Assistant: A' -> (Q, A); with several turns, A follows the last assistant marker."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise _BadRecord(f"'text' has no {ASSISTANT!r}")
    question, answer = text[:cut].strip(), text[cut + len(ASSISTANT):].strip()
    if question.startswith(HUMAN):
        question = question[len(HUMAN):].strip()
    if not question:
        raise _BadRecord(f"'text' has no question before {ASSISTANT!r}")
    if not answer:
        raise _BadRecord(f"'text' has no answer after {ASSISTANT!r}")
    return question, answer


def _from_messages(messages: object) -> tuple[str, str]:
    """The last assistant message is the answer; the turns before it make the question (the first user turn
    as it is, later ones as "Role: content", so the prompt reads like the chat)."""
    if not isinstance(messages, list):
        raise _BadRecord("'messages' must be a list of {\"role\", \"content\"} objects")
    turns = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _BadRecord(f"messages[{i}] is a {type(msg).__name__}, not an object")
        try:
            turns.append((_text(msg, ("role",)).lower(), _text(msg, ("content",), required=False)))
        except _BadRecord as e:
            raise _BadRecord(f"messages[{i}]: {e.why}") from None
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=-1)
    if last < 0:
        raise _BadRecord("'messages' has no assistant message")
    if not turns[last][1]:
        raise _BadRecord(f"messages[{last}]: the assistant's answer is empty")
    parts = [content if i == 0 and role == "user" else f"{role.capitalize()}: {content}"
             for i, (role, content) in enumerate(turns[:last]) if content]
    if not parts:
        raise _BadRecord("'messages' has no question before the last assistant message")
    return "\n\n".join(parts), turns[last][1]


def _parse_self_instruct(obj: dict, src: str, default_id: str, out: _Out) -> None:
    """One record per instance; a bad instance is reported (or skipped) on its own."""
    instruction = _text(obj, ("instruction",))
    instances = obj.get("instances")
    if not isinstance(instances, list) or not instances:
        raise _BadRecord("'instances' must be a non-empty list of {\"input\", \"output\"} objects")
    base_id = _record_id(obj, ("id",), default_id)
    for k, inst in enumerate(instances):
        try:
            if not isinstance(inst, dict):
                raise _BadRecord(f"a {type(inst).__name__}, not an object")
            given, output = _text(inst, ("input",), required=False), _text(inst, ("output",))
        except _BadRecord as e:
            out.bad(f"{src}: instances[{k}]", e.why)
            continue
        question = f"{instruction}\n{given}" if given else instruction
        out.records.append(Record(f"{base_id}#{k}", question, [output], [], src))


_LINE_PARSERS: dict[str, Callable[[dict, str, str, _Out], None]] = {
    "qed": _parse_qed, "nq": _parse_qed, "chat": _parse_chat, "self_instruct": _parse_self_instruct,
    "qa": _parse_qa,
}


def _walk_instructretro(data: object, path: Path, out: _Out) -> None:
    """Megatron's QA files: a JSON list of {"question", "answers" | "answer", "ctxs": [{"title", "text"}]}."""
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of {{\"question\", \"answers\", \"ctxs\"}} objects, "
                        f"got a {type(data).__name__}")
    for i, obj in enumerate(data, 1):
        src = f"{path}:record {i}"
        try:
            if not isinstance(obj, dict):
                raise _BadRecord(f"expected a JSON object, got {type(obj).__name__}")
            question, answers = _text(obj, ("question",)), _answers(obj, ("answers", "answer"))
            record = Record(_record_id(obj, ("id",), f"{path.name}:record {i}"), question, answers,
                            _contexts(obj, "ctxs"), src)
        except _BadRecord as e:
            out.bad(src, e.why)
            continue
        out.add(record)


def _walk_squad(data: object, path: Path, out: _Out) -> None:
    """SQuAD v1.1/v2: one record per question; v2's unanswerable ones are kept apart (`out.add`)."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise UserError(f"{path}: expected a SQuAD JSON object {{\"data\": [{{\"title\", \"paragraphs\"}}]}}")
    n = 0
    for i, article in enumerate(data["data"]):
        for j, paragraph, qas in _squad_paragraphs(article, i, path, out):
            for k, qa in enumerate(qas):
                n += 1
                src = f"{path}:record {n}"
                try:
                    record = _squad_question(qa, paragraph, src, f"{path.name}:record {n}")
                except _BadRecord as e:
                    out.bad(f"{src} (data[{i}].paragraphs[{j}].qas[{k}])", e.why)
                    continue
                out.add(record)


def _squad_paragraphs(article: object, i: int, path: Path, out: _Out) -> Iterator[tuple[int, dict, list]]:
    """(index, {"title", "text"}, qas) for each well-formed paragraph of article i."""
    where = f"{path}: data[{i}]"
    if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
        out.bad(where, "expected an article object with a 'paragraphs' list")
        return
    try:
        title = _text(article, ("title",), required=False)
    except _BadRecord as e:
        out.bad(where, e.why)
        return
    for j, par in enumerate(article["paragraphs"]):
        try:
            if not isinstance(par, dict) or not isinstance(par.get("qas"), list):
                raise _BadRecord("expected a paragraph object with 'context' and a 'qas' list")
            context = _text(par, ("context",))
        except _BadRecord as e:
            out.bad(f"{where}.paragraphs[{j}]", e.why)
            continue
        yield j, {"title": title, "text": context}, par["qas"]


def _squad_question(qa: object, paragraph: dict, src: str, default_id: str) -> Record:
    """A question; its answers are [] when v2 marks it `is_impossible` or gives no non-empty answer text."""
    if not isinstance(qa, dict):
        raise _BadRecord(f"expected a question object, got {type(qa).__name__}")
    question = _text(qa, ("question",))
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise _BadRecord(f"'is_impossible' is a {type(impossible).__name__}, not true or false")
    given = qa.get("answers")
    if given is None and not impossible:
        raise _BadRecord("no 'answers'")
    given = given or []
    if not isinstance(given, list) or not all(isinstance(a, dict) for a in given):
        raise _BadRecord("'answers' must be a list of {\"text\"} objects")
    texts = [a.get("text") for a in given]
    if not all(isinstance(t, str) for t in texts):
        raise _BadRecord("an answer has no string 'text'")
    answers = [] if impossible else [t.strip() for t in texts if t.strip()]
    return Record(_record_id(qa, ("id",), default_id), question, answers, [dict(paragraph)], src,
                  group=paragraph["title"])


# -------------------------------------------------------------------------------------------------- prompt


@dataclass
class PromptTemplate:
    """system: a literal line (empty: none); context: formatted with {title} and {text}; user: with {question}.
    Literal braces in `context` and `user` are written {{ and }}."""

    system: str = DEFAULT_SYSTEM
    context: str = "title: {title}, source: {text}"
    user: str = "User: {question}\n\nAssistant:"
    answer_lead: ClassVar[str] = " "  # the answer follows "Assistant:" after a space

    def __post_init__(self) -> None:
        _check_fields("context", self.context, allowed={"title", "text"}, required=set())
        _check_fields("user", self.user, allowed={"question"}, required={"question"})

    def render(self, record: Record, contexts: list[dict], tok: Tokenizer) -> str:
        return render_prompt(record, self, contexts)


@dataclass
class ChatPrompt:
    """The prompt as a Hugging Face tokenizer's chat template writes it: a system message (`system`, when not
    empty), then one user message of the contexts (each formatted with `context`, joined by blank lines) and the
    question after a blank line, up to where the assistant's answer begins."""

    system: str
    context: str
    chat_template: str  # the tokenizer's (Jinja): a field, so that the prompt's settings name the template too
    answer_lead: ClassVar[str] = ""  # the template's generation prompt ends where the answer's first word begins

    def __post_init__(self) -> None:
        _check_fields("context", self.context, allowed={"title", "text"}, required=set())

    def render(self, record: Record, contexts: list[dict], tok: HFTokenizer) -> str:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        user = [render_contexts(self.context, contexts)] if contexts else []
        messages.append({"role": "user", "content": "\n\n".join([*user, record.question])})
        return tok.chat_prompt(messages, self.chat_template)


Prompt = PromptTemplate | ChatPrompt


def template_of(sft: SFTConfig, tok: Tokenizer, user: str = "") -> Prompt:
    """The prompt of [sft], SFT's and generation's alike: the tokenizer's chat template with sft.system and
    sft.context_template when sft.chat_template = "auto" and it has one; else InstructRetro's (system,
    context_template, user_template). `user`: generation's own user turn in place of sft.user_template (the
    InstructRetro prompt only: a chat template writes its own)."""
    if sft.chat_template == "auto" and tok.chat_template:
        return ChatPrompt(system=sft.system, context=sft.context_template, chat_template=tok.chat_template)
    return PromptTemplate(system=sft.system, context=sft.context_template, user=user or sft.user_template)


def _check_fields(name: str, template: str, allowed: set[str], required: set[str]) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise UserError(f"prompt template {name} {template!r}: {e} (write literal braces as {{{{ and }}}})") from None
    unknown, missing = fields - allowed, required - fields
    if unknown or missing:
        problem = f"unknown field(s) {sorted(unknown)}" if unknown else f"no {{{sorted(missing)[0]}}}"
        raise UserError(f"prompt template {name} {template!r}: {problem} (fields: {', '.join(sorted(allowed))})")


def render_prompt(record: Record, template: PromptTemplate, contexts: list[dict]) -> str:
    """System line, the contexts (joined by blank lines), the user turn; sections separated by blank lines."""
    sections = [template.system] if template.system else []
    if contexts:
        sections.append(render_contexts(template.context, contexts))
    sections.append(template.user.format(question=record.question))
    return "\n\n".join(sections)


def render_contexts(context: str, contexts: list[dict]) -> str:
    """Each context formatted with the template `context` ({title}, {text}), joined by blank lines."""
    return "\n\n".join(context.format(title=c.get("title", ""), text=c["text"]) for c in contexts)


# -------------------------------------------------------------------------------------------------- tokens


def context_neighbours(tok: Tokenizer, contexts: list[dict], k: int, r: int, pad_id: int) -> np.ndarray:
    """(k, r): the first k contexts ("title: text", or the text alone), each cut to r tokens, padded: the
    neighbours of every chunk in `context` mode, in SFT and in generation alike."""
    out = np.full((k, r), pad_id, dtype=np.int64)
    texts = [f"{c.get('title', '')}: {c['text']}" if c.get("title") else c["text"] for c in contexts[:k]]
    for slot, ids in enumerate(tok.encode(texts) if texts else []):
        ids = ids[:r]
        out[slot, : len(ids)] = ids
    return out


def encode_sample(record: Record, template: Prompt, tok: Tokenizer, seq_length: int,
                  num_contexts: int) -> tuple[dict | None, dict]:
    """One training sample of seq_length tokens, or None when even the bare question and answer do not fit.

    The token list is prompt + answer + [EOS]; inputs are all but its last token, targets all but its first,
    both padded with pad_id. loss_mask is 1.0 on the targets that are answer tokens or the EOS. The dict also
    holds "contexts", the (possibly cut) contexts in the prompt, for use as neighbours.
    Stats: context_tokens_cut (context text tokens left out, of whole dropped contexts too), contexts_dropped
    (whole contexts left out among the first num_contexts), skipped_too_long (1 when the sample is None)."""
    if seq_length < 1:
        raise UserError(f"seq_length must be positive, got {seq_length}")
    if not record.answers:
        raise UserError(f"{record.source}: the record has no answer to train on")
    stats = {"context_tokens_cut": 0, "contexts_dropped": 0, "skipped_too_long": 0}
    answer_ids = list(tok.encode([template.answer_lead + record.answers[0]])[0])
    budget = seq_length - len(answer_ids)  # prompt tokens that fit: prompt + answer + EOS <= seq_length + 1
    fitted = fit_prompt(record, template, tok, record.contexts[: max(num_contexts, 0)], budget, stats)
    if fitted is None:
        stats["skipped_too_long"] = 1
        return None, stats
    prompt_ids, used = fitted
    full = np.asarray(prompt_ids + answer_ids + [tok.eos_id], dtype=np.int64)
    n = len(full) - 1
    tokens = np.full(seq_length, tok.pad_id, dtype=np.int64)
    targets = np.full(seq_length, tok.pad_id, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    tokens[:n], targets[:n] = full[:-1], full[1:]
    loss_mask[max(len(prompt_ids) - 1, 0) : n] = 1.0
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask, "contexts": used}, stats


def fit_prompt(record: Record, template: Prompt, tok: Tokenizer, contexts: list[dict], budget: int,
               stats: dict) -> tuple[list[int], list[dict]] | None:
    """The prompt ids (at most `budget`) and the contexts in them: all of them when they fit, else the most
    leading contexts with the last one's text cut by tokens. None when the prompt without contexts is too long.
    Every candidate is re-encoded and checked, so tokenizers that merge across boundaries cannot overflow."""

    def encode(ctxs: list[dict]) -> list[int]:
        return list(tok.encode([template.render(record, ctxs, tok)])[0])

    contexts = [dict(c) for c in contexts]
    ids = encode(contexts)
    if len(ids) <= budget:
        return ids, contexts
    if len(encode([])) > budget:
        return None
    text_ids = [list(t) for t in tok.encode([c["text"] for c in contexts])] if contexts else []
    text_lens = [len(t) for t in text_ids]

    def result(ids: list[int], used: list[dict], truncated_by: int) -> tuple[list[int], list[dict]]:
        stats["contexts_dropped"] = len(contexts) - len(used)
        stats["context_tokens_cut"] = sum(text_lens[len(used):]) + truncated_by
        return ids, used

    k = len(contexts)
    while k > 0:  # the most contexts whose last one, with its text emptied, leaves room for some text
        empty = encode(contexts[: k - 1] + [{**contexts[k - 1], "text": ""}])
        if len(empty) < budget:
            break
        k -= 1
    if k > 0:
        last = text_ids[k - 1]
        keep = min(len(last), budget - len(empty))
        while keep > 0:
            text = contexts[k - 1]["text"] if keep >= len(last) else tok.decode(last[:keep])
            used = contexts[: k - 1] + [{**contexts[k - 1], "text": text}]
            ids = encode(used)
            if len(ids) <= budget:
                return result(ids, used, len(last) - keep)
            keep -= max(1, len(ids) - budget)
        k -= 1  # not one token of its text fits: drop it whole
    while k > 0 and len(ids := encode(contexts[:k])) > budget:
        k -= 1
    return result(ids if k > 0 else encode([]), contexts[:k], 0)


# -------------------------------------------------------------------------------------------------- blends


class Blend:
    """Datasets drawn by weight. `records[d][i]` is record i of dataset d, as numbered by `draw`."""

    def __init__(self, entries: list[BlendEntry], records: list[list[Record]]):
        if not entries:
            raise UserError("the SFT blend has no datasets")
        if len(entries) != len(records):
            raise ValueError(f"{len(entries)} blend entries but {len(records)} record lists")
        names = [e.name for e in entries]
        for entry, recs in zip(entries, records):
            if not isinstance(entry.weight, (int, float)) or not math.isfinite(entry.weight) or entry.weight <= 0:
                raise UserError(f"SFT blend dataset {entry.name!r}: weight must be a positive number, "
                                f"got {entry.weight!r}")
            if not recs:
                raise UserError(f"SFT blend dataset {entry.name!r} ({entry.path}) has no records")
            if names.count(entry.name) > 1:
                raise UserError(f"SFT blend: the dataset name {entry.name!r} is used more than once")
        self.entries = list(entries)
        self.records = [list(r) for r in records]
        self.sizes = np.array([len(r) for r in records], dtype=np.int64)

    @property
    def probabilities(self) -> np.ndarray:
        weights = np.array([e.weight for e in self.entries], dtype=np.float64)
        return weights / weights.sum()

    def draw(self, num_samples: int, seed: int) -> np.ndarray:
        """(num_samples, 2) int64 rows (dataset, record). Datasets are drawn independently with their
        probabilities; dataset d's draws walk its records in seeded permutations, one per epoch, so every record
        is seen once per epoch. Deterministic for a seed, and draw(n) is a prefix of draw(n + more)."""
        if num_samples < 0 or seed < 0:
            raise UserError(f"draw: num_samples and seed must be non-negative, got {num_samples} and {seed}")
        u = np.random.default_rng([seed, 0]).random(num_samples)
        cdf = np.cumsum(self.probabilities)
        datasets = np.minimum(np.searchsorted(cdf, u, side="right"), len(self.entries) - 1)
        out = np.empty((num_samples, 2), dtype=np.int64)
        out[:, 0] = datasets
        for d, size in enumerate(self.sizes.tolist()):
            positions = np.flatnonzero(datasets == d)
            out[positions, 1] = self._order(d, size, len(positions), seed)
        return out

    @staticmethod
    def _order(d: int, size: int, count: int, seed: int) -> np.ndarray:
        """The first `count` records of dataset d's visiting order: epoch after epoch of seeded permutations."""
        epochs = -(-count // size)
        perms = [np.random.default_rng([seed, 1, d, e]).permutation(size) for e in range(epochs)]
        return np.concatenate(perms)[:count] if perms else np.zeros(0, dtype=np.int64)

    def table(self, num_samples: int) -> list[dict]:
        """Per dataset: name, format, records, probability, expected_samples, epochs (expected samples /
        records), as in InstructRetro's blend table."""
        rows = []
        for entry, size, p in zip(self.entries, self.sizes.tolist(), self.probabilities.tolist()):
            expected = p * num_samples
            rows.append({"name": entry.name, "format": entry.format, "records": size, "probability": p,
                         "expected_samples": expected, "epochs": expected / size})
        return rows


def load_blend(entries: list[BlendEntry], on_bad_record: str = "error") -> tuple[Blend, dict[str, dict[str, int]]]:
    """Read every entry's file (paths already resolved): the blend of the questions with an answer, and per
    dataset name the counts {"answered": records in the blend, "bad_records": malformed ones skipped,
    "unanswerable": questions without a short answer, left out}."""
    records, counts = [], {}
    for entry in entries:
        got = read_file(Path(entry.path), entry.format, on_bad_record)
        records.append(got.records)
        counts[entry.name] = {"answered": len(got.records), "bad_records": got.malformed,
                              "unanswerable": len(got.unanswerable)}
    return Blend(entries, records), counts


# --------------------------------------------------------------------------------------------------- split


def split_records(records: list[Record], valid_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, valid) by a seeded hash of the record's group when it has one (whole SQuAD articles go to one
    side), else of its id: stable under reordering, and about valid_fraction of groups/ids are held out."""
    if not 0.0 <= valid_fraction < 1.0:
        raise UserError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    train, valid = [], []
    for record in records:
        key = f"group:{record.group}" if record.group else f"id:{record.id}"
        (valid if is_valid(key, seed, valid_fraction) else train).append(record)
    return train, valid
