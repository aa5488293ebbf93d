"""Incremental decoding: what a generator keeps between one-token steps of a RetroModel.

Inference beside the model, not in it (the model only calls the cache it is handed): every decoder layer's
self-attention keys and values, and the retrieval state CCA needs between chunks (the first CCA layer's inputs
over the current chunk, the encoded neighbours of the chunk whose CCA block the next position is in).
Token ids only: no tokenizer, no sampling, no retrieval (retrocli.eval.generate does those).

Axes as in retro.py: b batch, g key/value heads, t slots (key length), e head dimension, m chunk length,
k neighbours per chunk, r retrieved length, d width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import head_dim, kv_heads
from .retro import RetroModel


class LayerCache:
    """One decoder layer's view of a DecodeCache."""

    def __init__(self, cache: "DecodeCache", index: int):
        self.cache, self.index = cache, index

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store new keys and values k, v (b, g, s, e) in the open slots -> every key and value so far
        (b, g, t, e) and the key mask (b, t) (None in a prefill, where every slot is a real token)."""
        c = self.cache
        s, end = k.shape[-2], c.length + k.shape[-2]
        if s > 1 and c.length:
            raise ValueError("a decoding cache takes several tokens only as its first (prefill) call")
        c.keys[self.index, :, :, c.length : end] = k.to(c.keys.dtype)
        c.values[self.index, :, :, c.length : end] = v.to(c.values.dtype)
        keys, values = c.keys[self.index, :, :, :end].to(k.dtype), c.values[self.index, :, :, :end].to(v.dtype)
        return keys, values, (None if s > 1 else c.valid[:, :end])


class DecodeCache:
    """What a generator keeps between decoding steps for a batch of b rows, left-padded to a common length.

    keys, values (layers, b, g, capacity, e): every decoder layer's self-attention keys and values, filled in
    slots [0, length); valid (b, capacity): the slots that hold a row's tokens (row i's tokens fill
    [length - its length, length)); positions (b,): the position the next token of each row takes.
    Retrieval: chunk_states (b, m, d) the first CCA layer's inputs at the positions of each row's current
    chunk; encoded (b, k, r, d) and encoded_mask (b, k, r) the encoded neighbours of the chunk whose CCA block
    the next position is in (all masked before the first chunk completes).

    Filled by `model(tokens, neighbours, cache=DecodeCache(model, b, capacity))` (the prefill of b rows of
    equal length), rows of different lengths joined by `DecodeCache.left_padded`, then one `model.step` per
    new token.
    """

    def __init__(self, model: RetroModel, batch: int, capacity: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        cfg = model.cfg
        h, e = kv_heads(cfg), head_dim(cfg)
        m, k, r = model.chunk_length, cfg.num_neighbors, model.retrieved_length
        self.capacity, self.length = capacity, 0
        self.keys = torch.zeros(cfg.layers, batch, h, capacity, e, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.chunk_states = torch.zeros(batch, m, cfg.hidden, device=device, dtype=dtype)
        self.encoded = torch.zeros(batch, k, r, cfg.hidden, device=device, dtype=dtype)
        self.encoded_mask = torch.zeros(batch, k, r, dtype=torch.bool, device=device)

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)

    def begin_prefill(self, n: int) -> None:
        if self.length:
            raise ValueError("the prefill needs an empty cache")
        if n > self.capacity:
            raise ValueError(f"{n} prompt tokens exceed the cache's capacity of {self.capacity}")
        self.valid[:, :n] = True

    def open_slot(self) -> None:
        if self.length >= self.capacity:
            raise ValueError(f"the decoding cache is full ({self.capacity} tokens)")
        self.valid[:, self.length] = True

    def keep_chunk_state(self, x: Tensor) -> Tensor:
        """In a one-token step: x (b, 1, d) entering the first CCA layer, kept at each row's place in its
        current chunk -> the rows (b',) whose new token completes that chunk (their neighbours are encoded next)."""
        m, pos = self.chunk_states.shape[1], self.positions
        rows = torch.arange(x.shape[0], device=x.device)
        self.chunk_states[rows, pos % m] = x[:, 0].to(self.chunk_states.dtype)
        return torch.nonzero((pos + 1) % m == 0).flatten()

    def keep_encoded(self, rows: Tensor, encoded: Tensor, encoded_mask: Tensor) -> None:
        """The neighbours of the chunks `rows` (b',) just completed, encoded (b', k, r, d) with their mask
        (b', k, r): they serve CCA for the next m positions of those rows."""
        self.encoded[rows] = encoded.to(self.encoded.dtype)
        self.encoded_mask[rows] = encoded_mask

    def advance(self, n: int) -> None:
        self.length += n
        self.positions += n

    def keep_retrieval_state(self, x: Tensor, encoded: Tensor, encoded_mask: Tensor) -> None:
        """In a prefill of n tokens: x (b, n, d) entering the first CCA layer, encoded (b, l, k, r, d).
        Keep the states of the chunk position n falls in, and the encoded chunk whose block position n is in
        (chunk (n - m) // m; a chunk completed by position n itself is encoded by that step)."""
        n, m = x.shape[1], self.chunk_states.shape[1]
        start = n // m * m
        self.chunk_states[:, : n - start] = x[:, start:].to(self.chunk_states.dtype)
        if n >= m:
            self.encoded[:] = encoded[:, (n - m) // m].to(self.encoded.dtype)
            self.encoded_mask[:] = encoded_mask[:, (n - m) // m]

    @classmethod
    def left_padded(cls, model: RetroModel, rows: list["DecodeCache"], capacity: int) -> "DecodeCache":
        """One cache for the rows (each a one-row prefilled cache), their slots right-aligned."""
        first = rows[0]
        out = cls(model, len(rows), capacity, first.keys.device, first.keys.dtype)
        out.length = max(r.length for r in rows)
        if out.length > capacity:
            raise ValueError(f"{out.length} prompt tokens exceed the cache's capacity of {capacity}")
        for i, r in enumerate(rows):
            lo = out.length - r.length
            out.keys[:, i, :, lo : out.length] = r.keys[:, 0, :, : r.length]
            out.values[:, i, :, lo : out.length] = r.values[:, 0, :, : r.length]
            out.valid[i, lo : out.length] = True
            out.positions[i] = r.positions[0]
            out.chunk_states[i], out.encoded[i] = r.chunk_states[0], r.encoded[0]
            out.encoded_mask[i] = r.encoded_mask[0]
        return out
