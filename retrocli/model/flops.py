"""Model FLOPs of a RetroModel, the numerator of MFU: what the architecture needs, not what a kernel executes.

Counted from the model's shape alone (no forward is run), so a benchmark credits every implementation of the
same model with the same work, and tests/test_model.py checks the count against torch's FLOP counter.
"""

from __future__ import annotations

import math

from ..config import head_dim, kv_heads
from .retro import RetroModel, ffn_width


def flops_per_sequence(model: RetroModel, n: int, retrieval: bool = True, causal_full: bool = True) -> int:
    """Forward matmul FLOPs (2 per multiply-add) for one sequence of n tokens; x3 for forward + backward.

    Counts every linear layer, attention scores and weighted values, the LM head, and with retrieval the
    encoder over l*k*r neighbour tokens (k = model.num_neighbors, r = retrieved_length) and every CCA
    layer over l*m query positions. Decoder self-attention counts all n*n (query, key) pairs, as PaLM's
    MFU formula does, or with `causal_full=False` only the n(n+1)/2 a causal kernel computes.
    Norms, softmax, activations and embedding lookups are not counted.
    """
    cfg, m = model.cfg, model.chunk_length
    d, f, v = cfg.hidden, ffn_width(cfg), cfg.vocab_size
    inner = cfg.heads * head_dim(cfg)  # query and output width (d unless model.head_dim says otherwise)

    def linear(tokens: int, d_in: int, d_out: int) -> int:
        return 2 * tokens * d_in * d_out

    def attention(queries: int, keys: int, pairs: int, kv_width: int = inner) -> int:
        # q and out projections, fused k/v projection, then QK^T and AV over `pairs` (query, key) pairs
        return 2 * linear(queries, d, inner) + linear(keys, d, 2 * kv_width) + 2 * 2 * pairs * inner

    def mlp(tokens: int) -> int:
        return (3 if cfg.mlp == "swiglu" else 2) * linear(tokens, d, f)

    pairs = n * n if causal_full else n * (n + 1) // 2
    decoder_kv = kv_heads(cfg) * head_dim(cfg)  # grouped-query attention projects fewer keys and values
    total = cfg.layers * (attention(n, n, pairs, decoder_kv) + mlp(n)) + linear(n, d, v)
    if retrieval and model.retro_layers:
        l, k, r = math.ceil(n / m), cfg.num_neighbors, model.retrieved_length
        t = l * k * r  # neighbour tokens per sequence
        total += cfg.encoder_layers * (attention(t, t, l * k * r * r) + mlp(t))
        total += attention(t, l * m, t * m)  # the first encoder layer's cross-attention to its chunk
        total += len(model.retro_layers) * attention(l * m, t, l * m * k * r)
    return total
