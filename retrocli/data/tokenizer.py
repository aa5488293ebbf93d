"""The workspace tokenizer: SentencePiece BPE trained on the corpus, a SentencePiece model file, or a local
Hugging Face tokenizer folder. Every stage that needs tokens loads it through `load_tokenizer`; `retro export`
hands a SentencePiece one to Hugging Face through `write_hf_tokenizer`."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Protocol

from ..errors import UserError, check
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


def hf_tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files of a Hugging Face folder (HF_TOKENIZER_FILES), by name."""
    return sorted({f for pattern in HF_TOKENIZER_FILES for f in folder.glob(pattern) if f.is_file()})


def content_sha256(kind: str, path: Path) -> str:
    """What identifies a tokenizer's token ids: the sha256 of a SentencePiece model file (as `sha256sum` prints
    it); for a Hugging Face folder, the sha256 of the `sha256sum`-style listing ("<sha256>  <name>" lines, by
    name) of its tokenizer files (HF_TOKENIZER_FILES). Neither its path nor when it was made takes part."""
    from ..workspace import sha256_file

    if kind == "sentencepiece" or path.is_file():
        return sha256_file(path)
    names = [f.name for f in hf_tokenizer_files(path)]
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


# ------------------------------------------------------------------ a SentencePiece model as a Hugging Face folder

# Texts on which the written tokenizer must give SentencePiece's ids, checked before anything is written: the
# places where the two libraries differ unless told otherwise (dummy prefix, runs of spaces, newlines, digits,
# byte fallback, control pieces' text).
PROBES = ("Hello, world.", " leading", "trailing ", "  two  spaces  ", "\u2581escaped \u2581", "line\n\nbreaks\n",
          "tab\there 2024-05-17", "3.14159 x 42", "naïve café 🙂 中文", "<s> </s> <unk> <pad>", "")


def write_hf_tokenizer(sp_model: Path, out: Path) -> list[Path]:
    """Write the SentencePiece BPE model `sp_model` into the folder `out` as a Hugging Face tokenizer that
    `AutoTokenizer.from_pretrained(out)` loads: tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    and the model itself as tokenizer.model (for tools that read SentencePiece, e.g. llama.cpp). Returns them.

    Called with `add_special_tokens=False` (nothing is added around a text either way: no BOS, no EOS), it gives
    SentencePieceProcessor.encode's ids for every text, "<s>" in a text staying text, and decodes those ids to
    sp.decode's text. Two decodings differ: a control id shows as its piece ("</s>") unless skip_special_tokens,
    where sp.decode gives ""; and a run of byte pieces that is not whole UTF-8 characters (ids cut inside one)
    becomes one U+FFFD per byte, where sp.decode keeps the whole characters in it."""
    import sentencepiece as spm

    proto = _sp_proto(sp_model)
    check(_unsupported(proto), f"cannot write the SentencePiece model {sp_model} as a Hugging Face tokenizer")
    tok = _hf_backend(proto)
    tok.encode_special_tokens = True  # what split_special_tokens below asks of the loaded tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    for text in PROBES:  # a setting this conversion misses shows up here, not in the user's model
        want, got = sp.encode(text), tok.encode(text, add_special_tokens=False).ids
        if want != got:
            raise UserError(f"cannot write the SentencePiece model {sp_model} as a Hugging Face tokenizer that "
                            f"encodes as it does: {text!r} is {want} for SentencePiece, {got} converted")

    def piece(token_id: int) -> str | None:
        return sp.id_to_piece(token_id) if token_id >= 0 else None

    pad = piece(sp.pad_id()) or piece(sp.eos_id())  # as SentencePieceTokenizer has it: without a pad piece, EOS pads
    special = {name: value for name, value in (("bos_token", piece(sp.bos_id())), ("eos_token", piece(sp.eos_id())),
                                               ("unk_token", piece(sp.unk_id())), ("pad_token", pad)) if value}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as written, whatever the model family
        **special,
        "add_bos_token": False, "add_eos_token": False,
        "split_special_tokens": True,  # "<s>" in a text is text, as in SentencePiece, not the BOS token
        "clean_up_tokenization_spaces": False,  # decode gives sp.decode's text: "a ." stays "a ."
    }
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "tokenizer.json", out / "tokenizer_config.json", out / "special_tokens_map.json",
             out / "tokenizer.model"]
    tok.save(str(files[0]))
    files[1].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    files[2].write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.copyfile(sp_model, files[3])
    return files


def _sp_proto(sp_model: Path):
    """The SentencePiece model file parsed: its pieces with their types and scores, and the trainer and
    normalizer settings, which SentencePieceProcessor does not expose."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # the module sentencepiece ships for this needs protobuf, which it does not require
        raise UserError(f"reading the SentencePiece model {sp_model} needs protobuf ({e}): pip install protobuf") \
            from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(sp_model.read_bytes())
    except (OSError, ValueError) as e:  # protobuf's DecodeError is a ValueError
        raise UserError(f"cannot read the SentencePiece model {sp_model}: {e}") from None
    return proto


# ModelProto.SentencePiece.Type
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED = 1, 2, 3, 4


def _unsupported(proto) -> list[str]:
    """What in the SentencePiece model `proto` _hf_backend does not reproduce."""
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if spec.model_type != 2:
        kind = {1: "unigram", 3: "word", 4: "char"}.get(spec.model_type, str(spec.model_type))
        problems.append(f"it is a {kind} model, and only BPE models (what retro trains) convert")
    if spec.treat_whitespace_as_suffix or not norm.escape_whitespaces:
        problems.append("it does not write a space as a leading \"\u2581\" (treat_whitespace_as_suffix, "
                        "escape_whitespaces)")
    if any(p.type == SP_USER_DEFINED for p in proto.pieces):
        problems.append("it has user-defined pieces, which SentencePiece matches before BPE")
    return problems


def _hf_backend(proto):
    """A `tokenizers.Tokenizer` that encodes and decodes as SentencePiece does with the BPE model `proto`.

    The pipeline transformers' SpmConverter builds, put together here from tokenizers' parts: before transformers
    5 the converters start from a slow tokenizer class and assume its family's settings (Llama's, T5's) instead
    of reading the model's. Spaces
    become "\u2581"; the dummy "\u2581" goes in front of every non-empty text (also one that starts with a space,
    where tokenizers' Metaspace would leave it out); the whole text is one BPE word (a piece holds "\u2581" only in
    front or alone, so no merge crosses a word). Merges rank by the merged piece's score, the order in which
    SentencePiece's BPE applies them; byte pieces spell characters outside the vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    spec, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = list(proto.pieces)
    # every split of a normal piece into two normal pieces is a merge, ranked by the merged piece's score (ties:
    # its id); byte, control and unknown pieces come from no merge, so text never becomes "<s>" or "<0x41>"
    normal = {p.piece: (-p.score, i) for i, p in enumerate(pieces) if p.type == SP_NORMAL}
    ranked = sorted((rank, piece[:k], piece[k:]) for piece, rank in normal.items() for k in range(1, len(piece))
                    if piece[:k] in normal and piece[k:] in normal)
    tok = Tokenizer(models.BPE(vocab={p.piece: i for i, p in enumerate(pieces)},
                               merges=[(left, right) for _, left, right in ranked], unk_token=spec.unk_piece,
                               fuse_unk=False,  # SentencePiece's BPE gives one unknown per character
                               byte_fallback=spec.byte_fallback))

    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:  # spaces only: SentencePiece leaves newlines and tabs alone
        steps += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    steps.append(normalizers.Replace(" ", "\u2581"))
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("\u2581"))  # skips the empty text, as SentencePiece does
    if norm.remove_extra_whitespaces:  # SentencePiece strips the end last, a "\u2581" of the text's own included
        steps.append(normalizers.Replace(Regex("\u2581+\\z"), ""))
    tok.normalizer = normalizers.Sequence(steps)

    steps = [decoders.Replace("\u2581", " ")]
    if spec.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())  # one string, so that Strip takes the dummy prefix off the text, not every piece
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces:  # sp.decode takes a leading space off then
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)

    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in pieces if p.type in (SP_UNKNOWN, SP_CONTROL)])
    return tok
