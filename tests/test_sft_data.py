"""SFT data: every format to records, questions without a short answer (left out and counted, through
`retro sft` too), bad records (error naming file and line, or skipped and counted), the prompt, the
answer-only loss mask, cutting contexts (never the answer), the weighted blend and the split."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from retrocli.data.qa import (
    DEFAULT_SYSTEM,
    Blend,
    BlendEntry,
    PromptTemplate,
    Record,
    encode_sample,
    load_blend,
    read_file,
    read_records,
    render_prompt,
    split_records,
)
from retrocli.errors import UserError


class WordTok:
    """A stand-in tokenizer: one id per whitespace-separated word, ids given out on first sight."""

    pad_id, eos_id = 0, 1

    def __init__(self):
        self.words = ["<pad>", "<eos>"]
        self.ids = {w: i for i, w in enumerate(self.words)}

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def _id(self, word: str) -> int:
        if word not in self.ids:
            self.ids[word] = len(self.words)
            self.words.append(word)
        return self.ids[word]

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [[self._id(w) for w in t.split()] for t in texts]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[int(i)] for i in ids)


class CharTok:
    """One id per character: its boundaries never line up with words, so budgets are tested for real."""

    pad_id, eos_id, vocab_size = 0, 1, 0x110000

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [[ord(c) for c in t] for t in texts]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(int(i)) for i in ids)


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def squad_data(articles: int = 2, questions: int = 2) -> dict:
    data = []
    for a in range(articles):
        qas = [{"id": f"q{a}_{q}", "question": f"question {q} about {a}?",
                "answers": [{"text": f"answer {a}.{q}", "answer_start": 0}, {"text": f"alt {a}.{q}"}]}
               for q in range(questions)]
        data.append({"title": f"Article {a}", "paragraphs": [{"context": f"context of article {a}", "qas": qas}]})
    return {"version": "v2.0", "data": data}


# ------------------------------------------------------------------------------------------------ formats


def test_squad_v2_gz_skips_unanswerable(tmp_path: Path):
    data = squad_data(articles=2, questions=2)
    data["data"][1]["paragraphs"][0]["qas"].append(
        {"id": "imp", "question": "unanswerable?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "x"}]})
    path = tmp_path / "squad.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(data, f)
    records, skipped = read_records(path, "squad")
    assert skipped == 1
    assert [r.id for r in records] == ["q0_0", "q0_1", "q1_0", "q1_1"]
    r = records[2]
    assert r.question == "question 0 about 1?"
    assert r.answers == ["answer 1.0", "alt 1.0"]
    assert r.contexts == [{"title": "Article 1", "text": "context of article 1"}]
    assert r.group == "Article 1"
    assert r.source == f"{path}:record 3"


def test_qed_and_nq_open(tmp_path: Path):
    qed = write_jsonl(tmp_path / "qed.jsonl", [
        {"example_id": 7358594490286423817, "question_text": "when was the wild card introduced",
         "title_text": "Wild card (sports)", "paragraph_text": "The wild card ... 2010 Green Bay Packers ...",
         "answer_text": ["2010 Green Bay Packers"], "answer_spans": [[296, 318]]},
    ])
    records, skipped = read_records(qed, "qed")
    assert skipped == 0 and len(records) == 1
    r = records[0]
    assert r.id == "7358594490286423817" and r.question == "when was the wild card introduced"
    assert r.answers == ["2010 Green Bay Packers"]
    assert r.contexts == [{"title": "Wild card (sports)", "text": "The wild card ... 2010 Green Bay Packers ..."}]
    assert r.group == "Wild card (sports)"

    nq = write_jsonl(tmp_path / "nq.jsonl", [
        {"question": "when did the last apollo mission land", "answer": ["14 December 1972 UTC", "December 1972"]},
        "",
        {"question": "who wrote hamlet", "answer": "Shakespeare", "id": "n2"},
    ])
    records, _ = read_records(nq, "nq")
    assert [r.answers for r in records] == [["14 December 1972 UTC", "December 1972"], ["Shakespeare"]]
    assert records[0].id == "nq.jsonl:1" and records[1].id == "n2"
    assert records[1].source == f"{nq}:3" and records[0].contexts == [] and records[0].group == ""


def test_instructretro(tmp_path: Path):
    path = tmp_path / "nq_test.json"
    path.write_text(json.dumps([
        {"question": "q one", "answers": ["a1", "b1"], "ctxs": [{"title": "T1", "text": "x1", "score": 3.2},
                                                              {"title": "T2", "text": "x2"}]},
        {"question": "q two", "answer": "a2"},
    ]))
    records, skipped = read_records(path, "instructretro")
    assert skipped == 0
    assert [(r.question, r.answers) for r in records] == [("q one", ["a1", "b1"]), ("q two", ["a2"])]
    assert records[0].contexts == [{"title": "T1", "text": "x1"}, {"title": "T2", "text": "x2"}]
    assert records[1].contexts == [] and records[1].source == f"{path}:record 2"


def test_chat_text_and_messages(tmp_path: Path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"text": "### Human: What is a comet? ### Assistant: A ball of ice and dust."},
        {"text": "### Human: Hi ### Assistant: Hello! ### Human: Name a planet. ### Assistant: Mars."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "Paris."}]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]},
    ])
    records, _ = read_records(path, "chat")
    assert [r.answers for r in records] == [["A ball of ice and dust."], ["Mars."], ["Paris."], ["6"]]
    assert records[0].question == "What is a comet?"
    assert records[1].question == "Hi ### Assistant: Hello! ### Human: Name a planet."
    assert records[2].question == "System: Be brief.\n\nUser: Capital of France?"
    assert records[3].question == "2+2?\n\nAssistant: 4\n\nUser: and 3+3?"


def test_self_instruct_and_qa(tmp_path: Path):
    si = write_jsonl(tmp_path / "si.jsonl", [
        {"id": "seed_task_0", "instruction": "Translate to French.",
         "instances": [{"input": "cat", "output": "chat"}, {"input": "", "output": "Give me a word."}]},
    ])
    records, _ = read_records(si, "self_instruct")
    assert [(r.id, r.question, r.answers) for r in records] == [
        ("seed_task_0#0", "Translate to French.\ncat", ["chat"]),
        ("seed_task_0#1", "Translate to French.", ["Give me a word."]),
    ]
    qa = write_jsonl(tmp_path / "gsm8k.jsonl.gz", [
        {"question": "Natalia sold 48 clips in April ...", "answer": "She sold 48/2 = 24 ...\n#### 72"},
    ], gz=True)
    records, _ = read_records(qa, "qa")
    assert records[0].answers == ["She sold 48/2 = 24 ...\n#### 72"] and records[0].id == "gsm8k.jsonl.gz:1"


# ------------------------------------------------------------------------------ questions without an answer


def _qed(i: int, answers: list[str]) -> dict:
    return {"example_id": i, "question_text": f"question {i}?", "title_text": f"Title {i}",
            "paragraph_text": f"paragraph {i}", "answer_text": answers,
            "answer_spans": [[0, 3]] if any(answers) else [[-1, -1]]}


# Per format: two answerable records, two without a short answer and a malformed one, as each format writes
# them, and how the error names the malformed one. QED's unanswerable shape is the real file's: answer_text
# [""], answer_spans [[-1, -1]].
UNANSWERABLE_CASES = {  # fmt: (answerable, unanswerable, malformed record or raw line, message)
    "qed": ([_qed(1, ["one"]), _qed(3, ["three", "3"])], [_qed(2, [""]), _qed(4, [])],
            {**_qed(5, ["five"]), "answer_text": [5]}, ":5: 'answer_text' must be a string or a list of strings"),
    "nq": ([{"question": "q1", "answer": ["a1"]}, {"question": "q3", "answer": "a3"}],
           [{"question": "q2", "answer": []}, {"question": "q4", "answer": [" ", ""]}],
           '{"question": "q5", "answer": ', ":5: not JSON"),
    "qa": ([{"question": "q1", "answer": "a1"}, {"question": "q3", "answer": ["a3"]}],
           [{"question": "q2", "answer": ""}, {"question": "q4", "answer": []}],
           {"question": "q5"}, ":5: no 'answer' or 'answers'"),
    "instructretro": ([{"question": "q1", "answers": ["a1"]}, {"question": "q3", "answer": "a3"}],
                      [{"question": "q2", "answers": []}, {"question": "q4", "answers": [""]}],
                      {"question": "q5", "answers": {"text": "a5"}},
                      ":record 5: 'answers' must be a string or a list of strings"),
    "squad": ([{"id": "q1", "question": "q1", "answers": [{"text": "a1", "answer_start": 0}], "is_impossible": False},
               {"id": "q3", "question": "q3", "answers": [{"text": "a3"}]}],
              [{"id": "q2", "question": "q2", "answers": [], "is_impossible": True,
                "plausible_answers": [{"text": "p2", "answer_start": 0}]},
               {"id": "q4", "question": "q4", "answers": []}],
              {"id": "q5", "question": 5, "answers": []},
              ":record 5 (data[0].paragraphs[0].qas[4]): 'question' is a int, not a string"),
}


def unanswerable_file(tmp_path: Path, fmt: str, malformed: bool) -> Path:
    """Records 1 and 3 answerable, 2 and 4 without a short answer, 5 (with malformed=True) damaged."""
    answerable, unanswerable, bad, _ = UNANSWERABLE_CASES[fmt]
    rows = [answerable[0], unanswerable[0], answerable[1], unanswerable[1]] + ([bad] if malformed else [])
    if fmt == "squad":
        path = tmp_path / "squad_v2.json"
        path.write_text(json.dumps({"version": "v2.0", "data": [
            {"title": "T", "paragraphs": [{"context": "the context", "qas": rows}]}]}))
        return path
    if fmt == "instructretro":
        path = tmp_path / "ir.json"
        path.write_text(json.dumps(rows))
        return path
    return write_jsonl(tmp_path / f"{fmt}.jsonl.gz", rows, gz=True)


@pytest.mark.parametrize("fmt", sorted(UNANSWERABLE_CASES))
def test_questions_without_an_answer_are_counted_and_left_out(tmp_path: Path, fmt: str):
    path = unanswerable_file(tmp_path, fmt, malformed=False)
    got = read_file(path, fmt)
    assert [r.question for r in got.records] == (["question 1?", "question 3?"] if fmt == "qed" else ["q1", "q3"])
    assert all(r.answers and all(a.strip() for a in r.answers) for r in got.records)
    assert len(got.unanswerable) == 2 and all(r.answers == [] for r in got.unanswerable)
    assert got.malformed == 0
    assert [r.source.removeprefix(str(path)) for r in got.unanswerable] == (
        [":2", ":4"] if fmt not in ("squad", "instructretro") else [":record 2", ":record 4"])
    records, left_out = read_records(path, fmt)  # the total, as `retro generate` reports it
    assert records == got.records and left_out == 2


@pytest.mark.parametrize("fmt", sorted(UNANSWERABLE_CASES))
def test_a_malformed_record_beside_unanswerable_ones_still_names_file_and_line(tmp_path: Path, fmt: str):
    path = unanswerable_file(tmp_path, fmt, malformed=True)
    with pytest.raises(UserError) as err:
        read_file(path, fmt)
    assert f"{path}{UNANSWERABLE_CASES[fmt][3]}" in str(err.value)
    got = read_file(path, fmt, on_bad_record="skip")
    assert (len(got.records), len(got.unanswerable), got.malformed) == (2, 2, 1)


QED_TRAIN = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "qa" / "qed_nq_train.jsonl.gz"


@pytest.mark.skipif(not QED_TRAIN.is_file(), reason=f"the shared QED file {QED_TRAIN} is not here")
def test_the_real_qed_file_reads_with_its_unanswerable_questions_counted():
    got = read_file(QED_TRAIN, "qed")
    assert got.malformed == 0 and len(got.records) + len(got.unanswerable) == 7167
    assert len(got.unanswerable) == 20  # answer_text [""], answer_spans [[-1, -1]]
    assert got.unanswerable[0].source == f"{QED_TRAIN}:155"



# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fmt, name, content, needle", [
    ("qa", "bad.jsonl", '{"question": "q", "answer": "a"}\nnot json\n', "bad.jsonl:2: not JSON"),
    ("qa", "noans.jsonl", '{"question": "q", "answer": "a"}\n\n{"question": "q"}\n', "noans.jsonl:3: no 'answer'"),
    ("qa", "type.jsonl", '{"question": 5, "answer": "a"}\n', "type.jsonl:1: 'question' is a int, not a string"),
    ("qa", "list.jsonl", '[1, 2]\n', "list.jsonl:1: expected a JSON object"),
    ("qed", "noq.jsonl", '{"answer_text": ["a"]}\n', "noq.jsonl:1: no 'question_text' or 'question'"),
    ("qed", "int.jsonl", '{"question_text": "q", "answer_text": [""]}\n{"question_text": "q", "answer_text": 7}\n',
     "int.jsonl:2: 'answer_text' must be a string or a list of strings"),
    ("squad", "imp.json", '{"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q", "answers": [], '
     '"is_impossible": "yes"}]}]}]}', "imp.json:record 1 (data[0].paragraphs[0].qas[0]): 'is_impossible' is a str"),
    ("squad", "noans.json", '{"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q"}]}]}]}',
     "noans.json:record 1 (data[0].paragraphs[0].qas[0]): no 'answers'"),
    ("chat", "chat.jsonl", '{"text": "### Human: hi"}\n', "chat.jsonl:1: 'text' has no '### Assistant:'"),
    ("self_instruct", "si.jsonl", '{"instruction": "do", "instances": [{"input": "x", "output": "y"}, {"input": "x"}]}',
     "si.jsonl:1: instances[1]: no 'output'"),
    ("instructretro", "ir.json", '[{"question": "q", "answers": ["a"]}, {"question": " ", "answers": ["a"]}]',
     "ir.json:record 2: 'question' is empty"),
    ("instructretro", "ctx.json", '[{"question": "q", "answers": ["a"], "ctxs": [{"text": 3}]}]',
     "ctx.json:record 1: ctxs[0]: 'text' is a int"),
    ("squad", "sq.json", '{"data": [{"title": "A", "paragraphs": [{"context": "c", "qas": [{"id": "1"}]}]}]}',
     "sq.json:record 1 (data[0].paragraphs[0].qas[0]): no 'question'"),
    ("instructretro", "lines.json", '{"question": "q", "answers": ["a"]}\n{"question": "q", "answers": ["a"]}\n',
     "lines.json:2: not JSON (Extra data) (the instructretro format is one JSON document"),
])
def test_bad_record_names_file_and_line(tmp_path: Path, fmt: str, name: str, content: str, needle: str):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError) as err:
        read_records(path, fmt)
    assert needle in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_skip_mode_counts_bad_records(tmp_path: Path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"question": "q1", "answer": "a1"}, "{oops", {"question": "q2"}, {"question": "q3", "answer": ["a3"]},
        {"question": "q4", "answer": ""}, {"question": "q5", "answer": 7},
    ])
    with pytest.raises(UserError, match="mixed.jsonl:2"):
        read_records(path, "qa")
    records, skipped = read_records(path, "qa", on_bad_record="skip")
    assert [r.question for r in records] == ["q1", "q3"]
    assert skipped == 4

    si = write_jsonl(tmp_path / "si.jsonl", [
        {"instruction": "do", "instances": [{"output": "ok"}, {"input": "x", "output": ""}, {"output": "ok2"}]}])
    records, skipped = read_records(si, "self_instruct", on_bad_record="skip")
    assert [r.answers[0] for r in records] == ["ok", "ok2"] and skipped == 1


def test_file_level_errors(tmp_path: Path):
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(UserError, match="empty.jsonl: empty file"):
        read_records(tmp_path / "empty.jsonl", "qa")
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(UserError, match="empty.json: empty file"):
        read_records(tmp_path / "empty.json", "squad")
    bad = write_jsonl(tmp_path / "allbad.jsonl", [{"question": "q"}, {"answer": "a"}])
    with pytest.raises(UserError, match=r"allbad.jsonl: no usable qa records \(2 malformed skipped, 0 without"):
        read_records(bad, "qa", on_bad_record="skip")
    none = write_jsonl(tmp_path / "none.jsonl", [{"question": "q", "answer": []}, {"question": "q2", "answer": ""}])
    with pytest.raises(UserError, match=r"none.jsonl: no usable qa records \(0 malformed skipped, 2 without an answer"):
        read_records(none, "qa")
    with pytest.raises(UserError, match="not found"):
        read_records(tmp_path / "missing.jsonl", "qa")
    with pytest.raises(UserError, match="unknown SFT data format 'alpaca'"):
        read_records(bad, "alpaca")
    (tmp_path / "top.json").write_text('{"question": "q"}')
    with pytest.raises(UserError, match="top.json: expected a JSON list"):
        read_records(tmp_path / "top.json", "instructretro")


# ------------------------------------------------------------------------------------------------ prompt


def test_render_prompt_layout():
    rec = Record("r", "Who?", ["Ann"], [{"title": "A", "text": "x y"}, {"title": "B", "text": "z"}])
    tpl = PromptTemplate()
    assert render_prompt(rec, tpl, rec.contexts) == (
        DEFAULT_SYSTEM + "\n\ntitle: A, source: x y\n\ntitle: B, source: z\n\nUser: Who?\n\nAssistant:")
    assert render_prompt(rec, tpl, []) == DEFAULT_SYSTEM + "\n\nUser: Who?\n\nAssistant:"
    assert DEFAULT_SYSTEM.startswith("System: This is a chat between a user and an artificial intelligence "
                                     "assistant. The assistant gives helpful, detailed, and polite answers")
    assert DEFAULT_SYSTEM.endswith("The assistant should also indicate when the answer cannot be found in the context.")
    assert render_prompt(rec, PromptTemplate(system=""), []) == "User: Who?\n\nAssistant:"
    with pytest.raises(UserError, match="unknown field"):
        PromptTemplate(context="{title} {body}")
    with pytest.raises(UserError, match="no {question}"):
        PromptTemplate(user="User: hi")


# ------------------------------------------------------------------------------------------------ samples

SYSTEM_WORDS = len(DEFAULT_SYSTEM.split())
USER_WORDS = 4  # "User: q1 q2 Assistant:"
HEADER_WORDS = 3  # "title: T1, source:"


def ctx(i: int, words: int = 10) -> dict:
    return {"title": f"T{i}", "text": " ".join(f"c{i}w{j}" for j in range(words))}


def test_loss_mask_is_answer_and_eos():
    tok = WordTok()
    rec = Record("r", "q1 q2", ["a1 a2 a3"], [ctx(1, 4)])
    seq = 80
    sample, stats = encode_sample(rec, PromptTemplate(), tok, seq, num_contexts=5)
    assert stats == {"context_tokens_cut": 0, "contexts_dropped": 0, "skipped_too_long": 0}
    assert {k: sample[k].shape for k in ("tokens", "targets", "loss_mask")} == {k: (seq,) for k in
                                                                             ("tokens", "targets", "loss_mask")}
    assert sample["tokens"].dtype == np.int64 and sample["loss_mask"].dtype == np.float32
    mask = sample["loss_mask"] == 1.0
    assert set(np.unique(sample["loss_mask"]).tolist()) == {0.0, 1.0}
    assert tok.decode(sample["targets"][mask]) == "a1 a2 a3 <eos>"
    n = SYSTEM_WORDS + HEADER_WORDS + 4 + USER_WORDS + 3  # prompt + answer: the inputs before padding
    assert tok.decode(sample["tokens"][:n]) == " ".join(render_prompt(rec, PromptTemplate(), rec.contexts).split()
                                                         + ["a1", "a2", "a3"])
    assert np.array_equal(sample["tokens"][1:n], sample["targets"][: n - 1])  # shifted by one
    assert (sample["tokens"][n:] == tok.pad_id).all() and (sample["targets"][n:] == tok.pad_id).all()
    assert sample["targets"][n - 1] == tok.eos_id
    assert np.flatnonzero(mask).tolist() == list(range(n - 4, n))  # targets a1 a2 a3 EOS
    assert sample["contexts"] == [ctx(1, 4)]


def test_contexts_are_cut_before_the_answer_and_counted():
    tok = WordTok()
    rec = Record("r", "q1 q2", ["a1 a2 a3"], [ctx(1), ctx(2), ctx(3)])
    # room for context 1 whole and 5 words of context 2: prompt + answer + EOS = seq_length + 1 exactly
    seq = SYSTEM_WORDS + (HEADER_WORDS + 10) + (HEADER_WORDS + 5) + USER_WORDS + 3
    sample, stats = encode_sample(rec, PromptTemplate(), tok, seq, num_contexts=3)
    assert stats == {"context_tokens_cut": 5 + 10, "contexts_dropped": 1, "skipped_too_long": 0}
    assert sample["contexts"] == [ctx(1), {"title": "T2", "text": " ".join(ctx(2)["text"].split()[:5])}]
    assert tok.decode(sample["targets"][sample["loss_mask"] == 1]) == "a1 a2 a3 <eos>"
    assert sample["targets"][-1] == tok.eos_id  # the sequence is exactly full
    assert rec.contexts == [ctx(1), ctx(2), ctx(3)]  # the record is not modified

    # num_contexts keeps the first ones; leaving them out is not a cut
    sample, stats = encode_sample(rec, PromptTemplate(), tok, 200, num_contexts=2)
    assert sample["contexts"] == [ctx(1), ctx(2)] and stats["contexts_dropped"] == stats["context_tokens_cut"] == 0


def test_long_answer_drops_all_contexts_and_long_question_is_skipped():
    tok = WordTok()
    answer = " ".join(f"a{i}" for i in range(30))
    rec = Record("r", "q1 q2", [answer], [ctx(1), ctx(2)])
    seq = SYSTEM_WORDS + USER_WORDS + 30 + 2  # no room for a context header and one word
    sample, stats = encode_sample(rec, PromptTemplate(), tok, seq, num_contexts=2)
    assert stats == {"context_tokens_cut": 20, "contexts_dropped": 2, "skipped_too_long": 0}
    assert sample["contexts"] == []
    assert tok.decode(sample["targets"][sample["loss_mask"] == 1]) == answer + " <eos>"

    sample, stats = encode_sample(rec, PromptTemplate(), tok, SYSTEM_WORDS + USER_WORDS + 29, num_contexts=2)
    assert sample is None and stats["skipped_too_long"] == 1
    long_q = Record("r", " ".join(["w"] * 500), ["a"], [ctx(1)])
    sample, stats = encode_sample(long_q, PromptTemplate(), tok, 256, num_contexts=1)
    assert sample is None and stats == {"context_tokens_cut": 0, "contexts_dropped": 0, "skipped_too_long": 1}


def test_every_length_fits_with_a_char_tokenizer():
    """Characters: the blank lines between sections count too. The answer is whole whenever a sample exists."""
    tok = CharTok()
    tpl = PromptTemplate(system="Sys.")
    rec = Record("r", "Why?", ["Because."], [ctx(1, 3), ctx(2, 3), ctx(3, 3)])
    full = len(render_prompt(rec, tpl, rec.contexts)) + len(" Because.") + 1
    minimum = len(render_prompt(rec, tpl, [])) + len(" Because.")
    kept = []
    for seq in range(minimum - 3, full + 3):
        sample, stats = encode_sample(rec, tpl, tok, seq, num_contexts=3)
        if seq < minimum:
            assert sample is None and stats["skipped_too_long"] == 1
            continue
        assert tok.decode(sample["targets"][sample["loss_mask"] == 1]) == " Because.\x01"
        real = int((sample["tokens"] != 0).sum())
        prompt = render_prompt(rec, tpl, sample["contexts"])
        assert tok.decode(sample["tokens"][:real]) == prompt + " Because."
        assert real <= seq
        used = sample["contexts"]
        if used and used[-1]["text"] != rec.contexts[len(used) - 1]["text"]:
            assert real == seq  # a truncated context fills the sequence exactly
        kept.append(sum(len(c["text"]) for c in sample["contexts"]))
        assert (stats["context_tokens_cut"] > 0) == (seq < full - 1)
    assert kept == sorted(kept) and kept[0] == 0 and kept[-1] == sum(len(c["text"]) for c in rec.contexts)


# ------------------------------------------------------------------------------------------------- blends


def make_blend(weights=(5.0, 3.0, 2.0), sizes=(7, 11, 13)) -> Blend:
    entries = [BlendEntry(f"d{i}", Path(f"d{i}.jsonl"), "qa", w) for i, w in enumerate(weights)]
    records = [[Record(f"{i}-{j}", "q", ["a"]) for j in range(n)] for i, n in enumerate(sizes)]
    return Blend(entries, records)


def test_blend_probabilities_and_table():
    blend = make_blend()
    assert np.allclose(blend.probabilities, [0.5, 0.3, 0.2])
    draws = blend.draw(10_000, seed=3)
    assert draws.shape == (10_000, 2) and draws.dtype == np.int64
    freq = np.bincount(draws[:, 0], minlength=3) / 10_000
    assert np.abs(freq - [0.5, 0.3, 0.2]).max() < 0.02
    table = blend.table(1000)
    assert [row["name"] for row in table] == ["d0", "d1", "d2"]
    assert [row["records"] for row in table] == [7, 11, 13]
    assert np.allclose([row["expected_samples"] for row in table], [500, 300, 200])
    assert np.allclose([row["epochs"] for row in table], [500 / 7, 300 / 11, 200 / 13])


def test_blend_draws_are_deterministic_and_prefix_stable():
    blend = make_blend()
    a, b = blend.draw(2000, seed=11), blend.draw(2000, seed=11)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, blend.draw(2000, seed=12))
    assert np.array_equal(blend.draw(700, seed=11), a[:700])  # a resumed run sees the same order


def test_blend_visits_each_record_once_per_epoch():
    blend = make_blend()
    draws = blend.draw(3000, seed=5)
    for d, size in enumerate(blend.sizes.tolist()):
        order = draws[draws[:, 0] == d, 1]
        assert len(order) > 3 * size
        epochs = [order[e * size:(e + 1) * size] for e in range(-(-len(order) // size))]
        for epoch in epochs[:-1]:
            assert sorted(epoch.tolist()) == list(range(size))
        assert len(set(epochs[-1].tolist())) == len(epochs[-1])
        assert any(e.tolist() != list(range(size)) for e in epochs)  # shuffled
        assert epochs[0].tolist() != epochs[1].tolist()  # a fresh order each epoch


def test_blend_rejects_bad_entries(tmp_path: Path):
    with pytest.raises(UserError, match="weight must be a positive number"):
        make_blend(weights=(1.0, 0.0, 1.0))
    with pytest.raises(UserError, match="has no records"):
        make_blend(sizes=(3, 0, 2))
    a = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "x"}, {"question": "q"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "answer": "y"}] * 3 + [{"question": "q", "answer": []}])
    blend, counts = load_blend([BlendEntry("a", a, "qa", 1), BlendEntry("b", b, "qa", 3)], on_bad_record="skip")
    assert counts == {"a": {"answered": 1, "bad_records": 1, "unanswerable": 0},
                      "b": {"answered": 3, "bad_records": 0, "unanswerable": 1}}
    assert blend.sizes.tolist() == [1, 3]
    assert np.allclose(blend.probabilities, [0.25, 0.75])


# -------------------------------------------------------------------------------------------------- split


def test_split_keeps_squad_articles_whole(tmp_path: Path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad_data(articles=30, questions=3)))
    records, _ = read_records(path, "squad")
    train, valid = split_records(records, 0.3, seed=1)
    assert train and valid and len(train) + len(valid) == len(records)
    side = {}
    for name, part in (("train", train), ("valid", valid)):
        for r in part:
            assert side.setdefault(r.group, name) == name, f"article {r.group} is on both sides"
    assert 3 <= sum(v == "valid" for v in side.values()) <= 18
    again_train, again_valid = split_records(list(reversed(records)), 0.3, seed=1)
    assert {r.id for r in again_valid} == {r.id for r in valid}
    assert {r.id for r in split_records(records, 0.3, seed=2)[1]} != {r.id for r in valid}


def test_split_without_groups_is_by_id():
    records = [Record(f"id{i}", "q", ["a"]) for i in range(200)]
    train, valid = split_records(records, 0.25, seed=0)
    assert {r.id for r in train}.isdisjoint({r.id for r in valid}) and len(train) + len(valid) == 200
    assert 25 <= len(valid) <= 75
    assert split_records(records, 0.0, seed=0) == (records, [])
    with pytest.raises(UserError, match="valid_fraction"):
        split_records(records, 1.0, seed=0)


# ------------------------------------------------------------------------------------------- through retro sft


@pytest.mark.usefixtures("one_torch_thread")
def test_retro_sft_leaves_unanswerable_questions_out_and_stops_at_a_malformed_one(tmp_path: Path):
    from retrocli.config import load_config
    from retrocli.train.sft import build

    from .conftest import run_cli
    from .test_sft import sft_workspace

    toml = sft_workspace(tmp_path)  # a pretrained tiny Retro and a blend of "squad" and "facts" (qa)
    text = toml.read_text()
    answerable, unanswerable, bad, _ = UNANSWERABLE_CASES["qed"]
    qed = write_jsonl(tmp_path / "qed_train.jsonl.gz", [answerable[0], unanswerable[0], answerable[1],
                                                        unanswerable[1], bad], gz=True)
    facts = 'path = "qa.jsonl"\nformat = "qa"'
    assert facts in text
    toml.write_text(text.replace(facts, f'path = "{qed.name}"\nformat = "qed"'))
    sets = [a for s in ("sft.train_steps=1", "sft.eval_interval=1", "sft.save_interval=1")
            for a in ("--set", s)]
    env = {"OMP_NUM_THREADS": "1"}

    proc = run_cli("sft", "-c", str(toml), *sets, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{qed}:5: 'answer_text' must be a string or a list of strings" in proc.stderr
    assert "Traceback" not in proc.stderr

    write_jsonl(qed, [answerable[0], unanswerable[0], answerable[1], unanswerable[1]], gz=True)
    proc = run_cli("sft", "-c", str(toml), *sets, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "facts: 4 questions, 2 without a short answer left out" in out and "no answer" in out
    _, _, _, table = build(load_config(toml))  # the blend table recorded with the run
    row = {r["name"]: r for r in table}["facts"]
    assert (row["answered"], row["unanswerable"], row["bad_records"]) == (2, 2, 0)
