"""write_hf_tokenizer: a SentencePiece tokenizer as a Hugging Face folder that `AutoTokenizer` loads and that
gives the ids and text SentencePieceTokenizer gives, on the pitfalls of such conversions: the dummy prefix,
runs of spaces (kept: remove_extra_whitespaces=False), newlines, split digits, byte fallback, "<s>" as text."""

from __future__ import annotations

import io
import itertools
import random
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from retrocli.data.corpus import tiny_corpus
from retrocli.data.tokenizer import HFTokenizer, SentencePieceTokenizer, train_sentencepiece, write_hf_tokenizer
from retrocli.errors import UserError

STRINGS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello,  world!   Three   spaces between.",
    "    indented code block",
    " leading space", "trailing space ", "  both sides  ",
    " ", "  ", "     ",
    "line one\nline two\n\nafter a blank line\n",
    "\n", "\n\n\n", "\r\n windows \r\n",
    "\ttab\tseparated\tvalues\t",
    "Numbers: 0 7 42 1234567890 3.14159 -17 1,000,000 2024-05-17 x86_64",
    "Punctuation: (a) [b] {c} <d> \"e\" 'f' `g` ~!@#$%^&*_+=|\\/?;:",
    "naïve café résumé Ωμέγα Привет",
    "emoji 🙂🚀 and a family 👨‍👩‍👧",
    "中文字符和日本語のテキスト、한국어",
    "mixed 中 a 🙂 b",
    "<s> </s> <unk> <pad> written out, and <s>strikethrough</s>",
    "\u2581 the escape character itself \u2581\u2581",
    "zero\u200bwidth and no-break\u00a0space",
    "def f(x):\n    return x ** 2  # squared\n",
    "",
]


def _ids(strings: list[str]) -> list[str]:
    return [repr(s)[:30] for s in strings]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    train_sentencepiece((d.text for d in tiny_corpus()), path, vocab_size=800, max_bytes=200_000)
    return path


@pytest.fixture(scope="module")
def folder(sp_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "tokenizer"
    write_hf_tokenizer(sp_model, out)
    return out


@pytest.fixture(scope="module")
def pair(sp_model, folder):
    return SentencePieceTokenizer(sp_model), AutoTokenizer.from_pretrained(str(folder))


def _user_model(path: Path, **settings) -> Path:
    """A SentencePiece model as a user might bring one: SentencePiece's defaults, except `settings`."""
    lines = [line for d in tiny_corpus() for line in d.text.split("\n") if line.strip()][:3000]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=600,
                                   minloglevel=2, **settings)
    path.write_bytes(model.getvalue())
    return path


def test_writes_a_folder_autotokenizer_loads(sp_model, tmp_path):
    out = tmp_path / "export"
    files = write_hf_tokenizer(sp_model, out)
    assert sorted(f.name for f in files) == sorted(f.name for f in out.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert (out / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.is_fast and len(tok) == spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()
    assert not tok.clean_up_tokenization_spaces and tok.split_special_tokens


@pytest.mark.parametrize("text", STRINGS, ids=_ids(STRINGS))
def test_same_ids_and_text_as_sentencepiece(pair, text):
    sp, hf = pair
    ids = sp.encode([text])[0]
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    # identity normalization: the text comes back whole, but for a "\u2581" of its own, which reads as a space
    assert hf.decode(ids) == sp.decode(ids) == text.replace("\u2581", " ")


def test_byte_fallback_and_split_digits_are_exercised(pair):
    sp, hf = pair
    for text in ("🙂", "中文字符", "한국어"):  # not in a vocabulary learnt from English: UTF-8 bytes
        ids = hf(text, add_special_tokens=False)["input_ids"]
        pieces = [sp.sp.id_to_piece(i) for i in ids]
        assert ids == sp.encode([text])[0] and sum(p.startswith("<0x") for p in pieces) == len(text.encode())
    pieces = hf.convert_ids_to_tokens(hf("1234567890", add_special_tokens=False)["input_ids"])
    assert [p for p in pieces if p != "\u2581"] == list("1234567890")  # one piece a digit


def test_corpus_text_and_random_strings(pair):
    sp, hf = pair
    rng = random.Random(0)
    texts = []
    for doc in list(tiny_corpus())[:30]:
        texts.append(doc.text)
        for _ in range(10):
            start = rng.randrange(len(doc.text))
            texts.append(doc.text[start:start + rng.randrange(1, 300)])
    alphabet = "ab  \u2581\n\t19é中🙂<>s/"
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(30))) for _ in range(500)]
    want = sp.encode(texts)
    assert hf(texts, add_special_tokens=False)["input_ids"] == want  # the batch call retro's HFTokenizer makes
    for text, ids in zip(texts, want):
        assert hf.decode(ids) == sp.decode(ids) == text.replace("\u2581", " ")


def _whole_characters(sp: spm.SentencePieceProcessor, ids: list[int]) -> bool:
    """Whether every run of byte pieces in `ids` spells whole UTF-8 characters."""
    for is_byte, run in itertools.groupby(ids, key=sp.is_byte):
        try:
            bytes(int(sp.id_to_piece(i)[1:-1], 16) for i in run).decode("utf-8") if is_byte else None
        except UnicodeDecodeError:
            return False
    return True


def test_decoding_windows_of_ids(pair):
    """Retro decodes chunks: windows of ids that may start mid-word or end inside a character's bytes."""
    sp, hf = pair
    ids = sp.encode(["Retro 中文 reads  chunks 🙂 of 64 tokens.\nNext line: naïve 한국어."])[0]
    cut = 0
    for width in (1, 2, 3, 7):
        for start in range(len(ids) - width + 1):
            window = ids[start:start + width]
            if _whole_characters(sp.sp, window):
                assert hf.decode(window) == sp.decode(window), window
            else:  # both write U+FFFD for what they cannot read (not always as many: see write_hf_tokenizer)
                cut += 1
                assert "\ufffd" in hf.decode(window) and "\ufffd" in sp.decode(window)
    assert cut > 0


def test_special_tokens(pair):
    sp, hf = pair
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3) == (
        sp.sp.pad_id(), sp.sp.unk_id(), sp.sp.bos_id(), sp.eos_id)
    assert (hf.pad_token, hf.unk_token, hf.bos_token, hf.eos_token) == ("<pad>", "<unk>", "<s>", "</s>")
    assert hf("Hello")["input_ids"] == sp.encode(["Hello"])[0]  # no BOS/EOS even when asked for special tokens
    assert not {0, 1, 2, 3} & set(hf("<s>x</s><unk><pad>")["input_ids"])  # "<s>" in a text is text
    ids = sp.encode(["end"])[0] + [sp.eos_id]
    assert hf.decode(ids, skip_special_tokens=True) == sp.decode(ids) == "end"


def test_retro_reads_the_folder_as_it_read_the_model(sp_model, folder):
    """A model exported and brought back (pretrain.init_from) meets the same tokenizer."""
    sp, hf = SentencePieceTokenizer(sp_model), HFTokenizer(folder)
    assert (hf.vocab_size, hf.eos_id, hf.eos_ids, hf.pad_id) == (sp.vocab_size, sp.eos_id, sp.eos_ids, sp.pad_id)
    assert hf.chat_template is None
    assert hf.encode(STRINGS) == sp.encode(STRINGS)


def test_a_user_model_with_other_settings_and_ids(tmp_path):
    """A user-supplied .model: NFKC, extra whitespace removed, unk 0 / bos 1 / eos 2, no pad piece (EOS pads)."""
    model = _user_model(tmp_path / "user.model", model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
                        eos_id=2, pad_id=-1, normalization_rule_name="nmt_nfkc")
    write_hf_tokenizer(model, tmp_path / "hf")
    sp, hf = SentencePieceTokenizer(model), AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 2) == (
        sp.sp.unk_id(), sp.sp.bos_id(), sp.eos_id, sp.pad_id)
    want = sp.encode(STRINGS)
    assert hf(STRINGS, add_special_tokens=False)["input_ids"] == want
    assert [hf.decode(ids) for ids in want] == [sp.decode(ids) for ids in want]


def test_refuses_a_model_it_cannot_reproduce(tmp_path):
    model = _user_model(tmp_path / "unigram.model", model_type="unigram")
    with pytest.raises(UserError, match="unigram model"):
        write_hf_tokenizer(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
