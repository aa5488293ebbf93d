"""The workspace tokenizer: SentencePiece BPE trained on the corpus, a SentencePiece model file, or a local
Hugging Face tokenizer folder. Every stage that needs tokens loads it through `load_tokenizer`."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Protocol

from ..errors import UserError
from ..workspace import write_bytes_atomic

# Special ids of tokenizers trained here.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int  # what ends a training sample (a document, an SFT answer)
    eos_ids: frozenset[int]  # what ends generation: eos_id and any other end token of the model (Llama 3's <|eot_id|>)
    pad_id: int
    chat_template: str | None  # a Hugging Face tokenizer's chat template (Jinja), when it has one

    def encode(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    def __init__(self, path: Path):
        import sentencepiece as spm

        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise UserError(f"cannot load the SentencePiece model {path}: {e}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        self.eos_ids = frozenset({self.eos_id})
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.chat_template = None

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class HFTokenizer:
    def __init__(self, path: Path):
        from transformers import AutoTokenizer

        self.path = path
        try:
            # tokenizer files are data (JSON, vocabularies, SentencePiece protos); code a folder ships is not run
            self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the Hugging Face tokenizer in {path}: {e}") from None
        self.vocab_size = len(self.tok)
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id
        if eos is None:
            raise UserError(f"the tokenizer in {path} has no end-of-sequence (or separator) token")
        self.eos_id = eos
        self.eos_ids = frozenset({eos, *model_eos_ids(path)})
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else eos
        chat = self.tok.chat_template  # a Jinja string, or named templates of which "default" is the chat's
        self.chat_template: str | None = (chat.get("default") if isinstance(chat, dict) else chat) or None

    def encode(self, texts: list[str]) -> list[list[int]]:
        # no special tokens added: a chat template writes its own BOS text, which encodes as the BOS token
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def chat_prompt(self, messages: list[dict[str, str]], template: str) -> str:
        """`messages` ({"role", "content"}) as the chat template `template` writes them, up to where the
        assistant's answer begins (the generation prompt); the tokenizer gives its special tokens' text."""
        from jinja2 import TemplateError

        try:
            return self.tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                add_generation_prompt=True)
        except TemplateError as e:  # e.g. a template that takes no system message (raise_exception)
            raise UserError(f"the chat template of the tokenizer in {self.path} cannot write the prompt: {e}. Set "
                            f"sft.system = \"\" if it takes no system message, or sft.chat_template = \"never\" for "
                            f"InstructRetro's prompt") from None


def model_eos_ids(folder: Path) -> list[int]:
    """The `eos_token_id` of a model folder's generation_config.json and config.json (an id or a list of ids:
    Llama 3 ends a turn with <|eot_id|>, the text with <|end_of_text|>); none where the files or the key are absent."""
    ids: list[int] = []
    for path in (folder / "generation_config.json", folder / "config.json"):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        value = data.get("eos_token_id") if isinstance(data, dict) else None
        values = [] if value is None else value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise UserError(f"{path}: eos_token_id must be a token id or a list of token ids, got {value!r}")
        ids += values
    return ids


def load_tokenizer(kind: str, path: Path) -> Tokenizer:
    if not path.exists():
        raise UserError(f"tokenizer {path} not found: check tokenizer.path, or run `retro db build`")
    return SentencePieceTokenizer(path) if kind == "sentencepiece" else HFTokenizer(path)


# The files of a Hugging Face tokenizer folder that decide its token ids (not model weights or configs).
HF_TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json", "*.model",
                      "*.tiktoken")


def content_sha256(kind: str, path: Path) -> str:
    """What identifies a tokenizer's token ids: the sha256 of a SentencePiece model file (as `sha256sum` prints
    it); for a Hugging Face folder, the sha256 of the `sha256sum`-style listing ("<sha256>  <name>" lines, by
    name) of its tokenizer files (HF_TOKENIZER_FILES). Neither its path nor when it was made takes part."""
    from ..workspace import sha256_file

    if kind == "sentencepiece" or path.is_file():
        return sha256_file(path)
    names = sorted({f.name for pattern in HF_TOKENIZER_FILES for f in path.glob(pattern) if f.is_file()})
    if not names:
        raise UserError(f"the Hugging Face tokenizer folder {path} has no tokenizer files "
                        f"({', '.join(HF_TOKENIZER_FILES)})")
    listing = "".join(f"{sha256_file(path / name)}  {name}\n" for name in names)
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def train_sentencepiece(texts: Iterable[str], out: Path, vocab_size: int, max_bytes: int) -> None:
    """Train a byte-fallback BPE model on at most `max_bytes` of text lines; write `out` atomically.

    Text is streamed to the trainer and the model comes back in memory: no scratch files, and no input
    path stored in the model, so the same corpus gives a byte-identical tokenizer."""
    import sentencepiece as spm

    budget = {"bytes": 0}
    failed: list[Exception] = []

    def limited():
        try:
            for line in _lines(texts):
                budget["bytes"] += len(line) + 1
                yield line
                if budget["bytes"] >= max_bytes:
                    return
        except Exception as e:  # reading the corpus failed (a UserError naming a bad line): raised below as it is,
            failed.append(e)  # not as the RuntimeError, with Python frames in its text, that SentencePiece makes of it

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=limited(), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, byte_fallback=True,
            character_coverage=0.9995, input_sentence_size=2_000_000, shuffle_input_sentence=True,
            max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1,
            minloglevel=2, split_digits=True, allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False, normalization_rule_name="identity",
        )
    except RuntimeError as e:
        if failed:
            raise failed[0] from None
        if budget["bytes"] == 0:
            raise UserError("the corpus has no text to train a tokenizer on") from None
        msg = str(e)
        hint = (" Lower tokenizer.vocab_size or add text." if "too high" in msg else
                " Raise tokenizer.vocab_size (byte fallback alone takes 256 pieces)." if "smaller than" in msg else "")
        raise UserError(f"training the SentencePiece tokenizer failed: {e}.{hint}") from None
    if failed:  # the trainer took the lines read before the failure as the whole corpus
        raise failed[0]
    write_bytes_atomic(out, model.getvalue())


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            if line:
                yield line
