"""The RETRO model: a GPT decoder with chunked cross-attention (CCA) to an encoder of retrieved neighbours.

Architecture only: no I/O, no tokenizer, no distributed code, no loss. The file reads top to bottom: the
shape derived from the config, the decoding cache as the model sees it, norms, rotary embeddings, attention,
MLP, chunked cross-attention, decoder layer, retrieval encoder, model. Beside it: decode.py, the cache a
generator hands to `forward` and `step` (the model only calls it); flops.py, the model FLOPs behind MFU.
The [model] values are checked once, by config.validate, with every problem named at once; the model
trusts the ModelConfig it is given.

Axis legend used in every shape comment and einops pattern:
    b batch            l chunks per sequence (ceil(n / m))    k neighbours per chunk
    r retrieved length m chunk length                          n sequence length
    d width            h heads                                 e head dimension (model.head_dim, or d / h)
    g key/value heads  f MLP width                             v vocabulary
    s, t query / key length of one attention call

Retrieval in brief (RETRO.md section 2): the neighbours (b, l, k, r) are embedded with the decoder's embedding
table and run once through a small bidirectional encoder whose first layer lets each neighbour look at the
decoder's hidden states of the chunk it was retrieved for. Decoder layers listed in `retro_layers` then
cross-attend to the encoded neighbours chunk by chunk, shifted by m-1 so that chunk i's neighbours only reach
positions from the last token of chunk i onward.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig, head_dim, kv_heads, retrieved_length


def megatron_retro_layers(layers: int) -> list[int]:
    """Megatron's Retro layers (1-based): range(6 if layers <= 15 else 9, layers + 1, 3); none below 6 layers."""
    return list(range(6 if layers <= 15 else 9, layers + 1, 3))


def resolve_retro_layers(cfg: ModelConfig) -> list[int]:
    """The 1-based decoder layers that carry CCA. `None`: Megatron's rule, at least one layer; `[]`: plain GPT.
    (config.validate checks that listed layers lie in 1..model.layers.)"""
    if cfg.retro_layers is not None:
        return sorted(set(cfg.retro_layers))
    return megatron_retro_layers(cfg.layers) or [cfg.layers]  # small models: CCA in the last layer, not nowhere


def ffn_width(cfg: ModelConfig) -> int:
    """MLP width: `ffn_hidden`, else 4 x hidden (gelu) or 8/3 x hidden rounded up to a multiple of 64 (swiglu)."""
    if cfg.ffn_hidden > 0:
        return cfg.ffn_hidden
    if cfg.mlp == "swiglu":
        return 64 * math.ceil(int(8 * cfg.hidden / 3) / 64)
    return 4 * cfg.hidden


# -------------------------------------------------------------------------- decoding cache, as the model sees it


class KVCache(Protocol):
    """One decoder layer's slots in a decoding cache (decode.LayerCache)."""

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """New keys and values (b, h, s, e) -> all so far (b, h, t, e) and the key mask (b, t) or None."""
        ...


class Cache(Protocol):
    """What `forward` (the prefill) and `step` read and call of a decoding cache (decode.DecodeCache)."""

    positions: Tensor  # (b,) the position each row's next token takes
    chunk_states: Tensor  # (b, m, d) first CCA layer's inputs over each row's current chunk
    encoded: Tensor  # (b, k, r, d) encoded neighbours of the chunk whose CCA block the next position is in
    encoded_mask: Tensor  # (b, k, r)

    def layer(self, index: int) -> KVCache: ...
    def begin_prefill(self, n: int) -> None: ...
    def keep_retrieval_state(self, x: Tensor, encoded: Tensor, encoded_mask: Tensor) -> None: ...
    def open_slot(self) -> None: ...
    def keep_chunk_state(self, x: Tensor) -> Tensor: ...
    def keep_encoded(self, rows: Tensor, encoded: Tensor, encoded_mask: Tensor) -> None: ...
    def advance(self, n: int) -> None: ...


# ----------------------------------------------------------------------------------------------- norms


def make_norm(kind: str, d: int, eps: float) -> nn.Module:
    return nn.RMSNorm(d, eps=eps) if kind == "rmsnorm" else nn.LayerNorm(d, eps=eps)


# ------------------------------------------------------------------------------------- rotary embedding


def rope_frequencies(cfg: ModelConfig) -> Tensor:
    """The rotation frequencies (rot/2,) of the first rot = model.rotary_percent x e dimensions of a head: base
    model.rope_theta, with model.rope_scaling applied ('linear': all divided by rope_factor; 'llama3': those
    whose wavelength exceeds original_length / low_freq_factor divided by it, those below original_length /
    high_freq_factor kept, a linear ramp in between, as Llama 3.1 was trained)."""
    rot = int(head_dim(cfg) * cfg.rotary_percent) // 2 * 2  # config.validate checks that this is not 0
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > cfg.rope_original_length / low, inv_freq / factor, inv_freq)
        ramp = (cfg.rope_original_length / wavelength - low) / (high - low)  # 0 at the low edge, 1 at the high
        between = (wavelength >= cfg.rope_original_length / high) & (wavelength <= cfg.rope_original_length / low)
        return torch.where(between, (1 - ramp) * scaled / factor + ramp * scaled, scaled)
    return inv_freq


class Rotary(nn.Module):
    """RoPE on the first rot dimensions of each head (rotate-half layout, as in Megatron, NeoX and Llama).

    It takes explicit positions, so a KV-cached generator can ask for positions [past, past + s).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)  # recomputed, never checkpointed

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (s,) -> cos, sin, each (s, rot)."""
        freqs = positions.to(self.inv_freq.dtype)[:, None] * self.inv_freq  # (s, rot/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (s, rot)
        return emb.cos(), emb.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first cos.shape[-1] dimensions of every head; x (b, h, s, e), cos and sin (s, rot).

    Rotate-half: dimension j pairs with j + rot/2, (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). cos and sin
    repeat their first half (Rotary.forward), so only that half is read: one concatenation, no negated copy."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half].to(x.dtype), sin[..., :half].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if 2 * half < x.shape[-1]:
        parts.append(x[..., 2 * half :])  # the dimensions RoPE leaves alone (model.rotary_percent < 1)
    return torch.cat(parts, dim=-1)


# ------------------------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention`: h query heads of e dimensions, and g key/value
    heads (grouped-query attention when g < h: each serves h/g query heads). Options an imported decoder may
    need: biases on the projections, and an RMSNorm of each head's queries and keys before RoPE (`qk_norm_eps`).

    Self-attention when `context` is None, else cross-attention from x to `context`. With a decoding cache
    (`kv`), new keys and values are stored after projection and rotation, and the queries attend to every
    stored one (a key mask instead of `causal` when one new token per row is decoded).
    `key_mask` (b, t) is True for keys that may be attended; a row with no such key outputs exactly zero
    (instead of the NaN a softmax over nothing gives), or with `zero_empty=False` something finite that the
    caller never reads.
    """

    def __init__(self, d: int, heads: int, dropout: float, head_dim: int, kv_heads: int = 0, qkv_bias: bool = False,
                 out_bias: bool = False, qk_norm_eps: float = 0.0):
        super().__init__()
        self.heads, self.kv_heads, self.dropout = heads, kv_heads or heads, dropout
        e = head_dim
        self.q_proj = nn.Linear(d, heads * e, bias=qkv_bias)
        self.kv_proj = nn.Linear(d, 2 * self.kv_heads * e, bias=qkv_bias)  # keys, then values
        self.q_norm = nn.RMSNorm(e, eps=qk_norm_eps) if qk_norm_eps else None
        self.k_norm = nn.RMSNorm(e, eps=qk_norm_eps) if qk_norm_eps else None
        self.out_proj = nn.Linear(heads * e, d, bias=out_bias)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        rope_k: tuple[Tensor, Tensor] | None = None,
        causal: bool = False,
        key_mask: Tensor | None = None,
        zero_empty: bool = True,
        kv: KVCache | None = None,
    ) -> Tensor:
        """x (b, s, d), context (b, t, d) or None -> (b, s, d). `rope` rotates the queries (cos, sin (s, rot),
        or (b, 1, s, rot) for per-row positions) and, unless `rope_k` (cos, sin (t, rot)) is given, the keys too.
        `kv`: this layer's decoding cache; the new keys and values are stored and all cached ones attended."""
        context = x if context is None else context
        q = rearrange(self.q_proj(x), "b s (h e) -> b h s e", h=self.heads)
        k, v = rearrange(self.kv_proj(context), "b t (two g e) -> two b g t e", two=2, g=self.kv_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *(rope if rope_k is None else rope_k))
        if kv is not None:
            k, v, key_mask = kv.append(k, v)  # (b, g, t, e) every key so far; key_mask (b, t) or None
            causal = causal and q.shape[-2] > 1  # one new query per row sees every cached key
        attn_mask, has_key = None, None
        if key_mask is not None:
            has_key = key_mask.any(dim=-1)  # (b,)
            key_mask = key_mask | ~has_key[:, None]  # empty rows attend to everything (finite), zeroed below
            attn_mask = rearrange(key_mask, "b t -> b 1 1 t")  # broadcast over heads and queries
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal,
            enable_gqa=self.kv_heads != self.heads,
        )  # (b, h, s, e)
        y = rearrange(y, "b h s e -> b s (h e)")
        if has_key is not None and zero_empty:
            y = y * rearrange(has_key, "b -> b 1 1").to(y.dtype)  # no key: contributes nothing
        return self.out_proj(y)


# ------------------------------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """GELU MLP (up, gelu, down; 'gelu_tanh': GELU's tanh approximation) or SwiGLU (up to gate and value,
    silu(gate) * value, down)."""

    def __init__(self, d: int, f: int, kind: str, bias: bool = False):
        super().__init__()
        self.swiglu = kind == "swiglu"
        self.approximate = "tanh" if kind == "gelu_tanh" else "none"
        self.up = nn.Linear(d, 2 * f if self.swiglu else f, bias=bias)
        self.down = nn.Linear(f, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)  # (b, s, f) or (b, s, 2f)
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)  # 2 x (b, s, f)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.down(h)


# --------------------------------------------------------------------------------- chunked cross-attention


class ChunkedCrossAttention(nn.Module):
    """CCA with Megatron's causal shift of m-1.

    Query block i is decoder positions [i*m + m-1, i*m + 2m-1); it attends, without a mask between its own
    positions, to all k*r encoded neighbour tokens of chunk i (padding excluded). The first m-1 positions
    of the sequence get no retrieval signal (zeros).

    With RoPE, queries and keys are rotated in the neighbour's own frame: key j of every neighbour sits at
    position j (0..r-1), and query j of a block sits at m + j, the place in a neighbour (chunk, continuation)
    of the token that query predicts. Attending at relative distance 0 then reads "what followed text like
    mine", which a model finds early in training; without the alignment it must learn to locate it by content.
    """

    def __init__(self, cfg: ModelConfig, chunk_length: int):
        super().__init__()
        self.m = chunk_length
        self.attn = retrieval_attention(cfg)

    def forward(
        self, x: Tensor, encoded: Tensor, encoded_mask: Tensor, rope: tuple[Tensor, Tensor, Tensor, Tensor] | None
    ) -> Tensor:
        """x (b, n, d) normed decoder states; encoded (b, l, k, r, d); encoded_mask (b, l, k, r);
        rope: cos, sin of the query positions (m, rot) and of the key positions (k*r, rot), or None -> (b, n, d).
        Decoding (see decode.DecodeCache): x (b, 1, d), encoded (b, k, r, d) and encoded_mask (b, k, r) of the block
        each row's position is in, query rope (b, 1, 1, rot) -> (b, 1, d)."""
        rope_q, rope_k = (None, None) if rope is None else (rope[:2], rope[2:])
        if encoded.dim() == 4:  # decoding: x (b, 1, d), one position per row; encoded (b, k, r, d) of its block
            kv = rearrange(encoded, "b k r d -> b (k r) d")
            return self.attn(x, kv, rope=rope_q, rope_k=rope_k, key_mask=rearrange(encoded_mask, "b k r -> b (k r)"))
        b, n, _ = x.shape
        l, m = encoded.shape[1], self.m
        q = x[:, m - 1 :]  # (b, n - m + 1, d): shift left so block i starts at the last token of chunk i
        q = F.pad(q, (0, 0, 0, l * m - q.shape[1]))  # (b, l*m, d)
        q = rearrange(q, "b (l m) d -> (b l) m d", m=m)
        kv = rearrange(encoded, "b l k r d -> (b l) (k r) d")
        key_mask = rearrange(encoded_mask, "b l k r -> (b l) (k r)")
        y = self.attn(q, kv, rope=rope_q, rope_k=rope_k, key_mask=key_mask)  # ((b l), m, d)
        y = rearrange(y, "(b l) m d -> b (l m) d", b=b)
        return F.pad(y, (0, 0, m - 1, 0))[:, :n]  # shift back: (b, n, d), zeros at the first m-1 positions


# ------------------------------------------------------------------------------------------ decoder layer


def retrieval_attention(cfg: ModelConfig) -> Attention:
    """The attention of CCA and of the encoder: heads of the decoder's size, without the options of an imported
    decoder (biases, grouped keys, q/k norms), which these layers, new in a retrofit, do not need."""
    return Attention(cfg.hidden, cfg.heads, cfg.dropout, head_dim(cfg))


class DecoderLayer(nn.Module):
    """Pre-norm block: causal self-attention, then CCA (retro layers only, its output times model.retro_gate), then
    MLP, each a residual add."""

    def __init__(self, cfg: ModelConfig, chunk_length: int, cca: bool):
        super().__init__()
        d, eps = cfg.hidden, cfg.norm_eps
        self.norm_attn = make_norm(cfg.norm, d, eps)
        self.attn = Attention(d, cfg.heads, cfg.dropout, head_dim(cfg), kv_heads(cfg), cfg.qkv_bias, cfg.out_bias,
                              qk_norm_eps=eps if cfg.qk_norm else 0.0)
        self.norm_cca = make_norm(cfg.norm, d, eps) if cca else None
        self.cca = ChunkedCrossAttention(cfg, chunk_length) if cca else None
        self.gate = cfg.retro_gate
        self.context_is_input = cfg.encoder_context == "layer_input"
        self.norm_mlp = make_norm(cfg.norm, d, eps)
        self.mlp = MLP(d, ffn_width(cfg), cfg.mlp, cfg.mlp_bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        encoded: Tensor | None = None,
        encoded_mask: Tensor | None = None,
        cca_rope: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
        kv: KVCache | None = None,
        encode: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """x (b, n, d) -> (b, n, d). Without `encoded` the CCA contributes exactly nothing (the gate is off).
        `kv`: this layer's decoding cache (Cache.layer). `encode` (the first CCA layer): the encoder, called here
        with the retrieval context (model.encoder_context: x as it enters, or the CCA query) -> encoded, its mask;
        the layer then returns (x, encoded, encoded_mask) for the CCA layers after it."""
        if encode is not None and self.context_is_input:
            encoded, encoded_mask = encode(x)
        x = x + self.drop(self.attn(self.norm_attn(x), rope=rope, causal=True, kv=kv))
        if self.cca is not None and (encoded is not None or encode is not None):
            q = self.norm_cca(x)
            if encode is not None and not self.context_is_input:
                encoded, encoded_mask = encode(q)  # Megatron: the encoder reads the CCA query of this layer
            y = self.drop(self.cca(q, encoded, encoded_mask, cca_rope))
            x = x + (y if self.gate == 1.0 else self.gate * y)
        x = x + self.drop(self.mlp(self.norm_mlp(x)))
        return x if encode is None else (x, encoded, encoded_mask)


# ------------------------------------------------------------------------------------ retrieval encoder


class EncoderLayer(nn.Module):
    """Bidirectional pre-norm block over each neighbour; the first layer also cross-attends to its chunk."""

    def __init__(self, cfg: ModelConfig, cross: bool):
        super().__init__()
        d, eps = cfg.hidden, cfg.norm_eps
        self.norm_attn = make_norm(cfg.norm, d, eps)
        self.attn = retrieval_attention(cfg)
        self.norm_cross = make_norm(cfg.norm, d, eps) if cross else None
        # a context that is the CCA query is normed already (model.encoder_context = "cca_query")
        self.norm_context = make_norm(cfg.norm, d, eps) if cross and cfg.encoder_context == "layer_input" else None
        self.cross = retrieval_attention(cfg) if cross else None
        self.norm_mlp = make_norm(cfg.norm, d, eps)
        self.mlp = MLP(d, ffn_width(cfg), cfg.mlp)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, h: Tensor, key_mask: Tensor, context: Tensor, rope: tuple[Tensor, Tensor] | None, k: int
    ) -> Tensor:
        """h ((b l k), r, d), key_mask ((b l k), r), context ((b l), m, d) -> ((b l k), r, d).
        A neighbour that is all padding gets finite states that nothing reads: CCA masks every one of its tokens."""
        h = h + self.drop(self.attn(self.norm_attn(h), rope=rope, key_mask=key_mask, zero_empty=False))
        if self.cross is not None:
            # the k neighbours of a chunk share its m keys, so fold them into one query sequence of k*r tokens
            q = rearrange(self.norm_cross(h), "(bl k) r d -> bl (k r) d", k=k)
            y = self.cross(q, context if self.norm_context is None else self.norm_context(context))  # ((b l), k*r, d)
            h = h + self.drop(rearrange(y, "bl (k r) d -> (bl k) r d", k=k))
        return h + self.drop(self.mlp(self.norm_mlp(h)))


class RetroEncoder(nn.Module):
    """Encodes the embedded neighbours once per forward; all CCA layers share its output."""

    def __init__(self, cfg: ModelConfig, chunk_length: int):
        super().__init__()
        self.m = chunk_length
        self.layers = nn.ModuleList(EncoderLayer(cfg, cross=i == 0) for i in range(cfg.encoder_layers))
        self.norm = make_norm(cfg.norm, cfg.hidden, cfg.norm_eps) if cfg.encoder_norm else None
        self.activation_checkpointing = False  # set through RetroModel.activation_checkpointing

    def forward(
        self, h: Tensor, mask: Tensor, decoder_states: Tensor, rope: tuple[Tensor, Tensor] | None
    ) -> Tensor:
        """h (b, l, k, r, d) embedded neighbours, mask (b, l, k, r) True on real tokens, decoder_states (b, n, d)
        taken at the input of the first CCA layer -> (b, l, k, r, d)."""
        b, l, k, r, _ = h.shape
        n = decoder_states.shape[1]
        # chunk i's neighbours see chunk i's m decoder states. Padding the last chunk is harmless: when n < l*m
        # the last chunk's neighbours would first reach position l*m - 1 >= n, i.e. no logit at all.
        context = F.pad(decoder_states, (0, 0, 0, l * self.m - n))  # (b, l*m, d)
        context = rearrange(context, "b (l m) d -> (b l) m d", m=self.m)
        h = rearrange(h, "b l k r d -> (b l k) r d")
        key_mask = rearrange(mask, "b l k r -> (b l k) r")
        for layer in self.layers:
            h = recomputed(self.activation_checkpointing, layer, h, key_mask, context, rope, k)
        # normed after the unfolding, so the output is a tensor of its own, not a view: FSDP2 hooks a module's
        # output for backward, and an in-place op on a view would slip past the hook
        h = rearrange(h, "(b l k) r d -> b l k r d", b=b, l=l)
        return h.clone() if self.norm is None else self.norm(h)


def recomputed(enabled: bool, layer: nn.Module, *args) -> Tensor:
    """layer(*args); with activation checkpointing in training, its activations are recomputed in the backward
    pass instead of kept (RNG state restored, so dropout draws the same mask)."""
    if enabled and layer.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


# ----------------------------------------------------------------------------------------------- model


class RetroModel(nn.Module):
    """RETRO decoder, or a plain GPT of the same decoder shape when `resolve_retro_layers(cfg)` is empty.

    `chunk_length` is db.chunk_length (m). `pad_id` marks padding inside neighbours: those tokens are masked
    out of the encoder's self-attention and out of the CCA keys, so an all-padding neighbour contributes
    nothing. Retrieval is switched off (InstructRetro's encoder ablation: CCA output exactly zero, encoder not
    run) by `forward(..., retrieval=False)`, by `model.cca_gate_off = True`, or by passing `neighbours=None`.
    The decoder's parameter names are the same in both modes, so a GPT state_dict loads into a Retro model
    with `strict=False` (only encoder and CCA weights are missing): retro-fitting, after which
    `zero_retrieval_output` makes the new Retro compute exactly the GPT's logits until it has trained.
    """

    def __init__(self, cfg: ModelConfig, chunk_length: int, pad_id: int = 0):
        super().__init__()
        if cfg.vocab_size <= 0:  # 0 is valid in a config ("from the tokenizer"): the caller resolves it first
            raise ValueError(f"model.vocab_size must be resolved (> 0) before building the model, got {cfg.vocab_size}")
        self.cfg = cfg
        self.chunk_length = chunk_length
        self.pad_id = pad_id
        self.retro_layers = resolve_retro_layers(cfg)
        self.retrieved_length = retrieved_length(cfg, chunk_length)
        self.cca_gate_off = False  # True: encoder ablation, the model runs as the plain GPT inside it
        self._checkpointing = False

        d = cfg.hidden
        self.embed = nn.Embedding(cfg.vocab_size, d)  # shared by decoder and neighbours, and the LM head if tied
        self.pos_embed = (nn.Embedding(cfg.max_positions or cfg.seq_length, d) if cfg.position == "learned"
                          else None)
        self.rotary = Rotary(cfg) if cfg.position == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, chunk_length, cca=i + 1 in self.retro_layers) for i in range(cfg.layers)
        )
        self.norm = make_norm(cfg.norm, d, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)
        self.encoder = RetroEncoder(cfg, chunk_length) if self.retro_layers else None
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            self._init_parameter(name, p)

    def _init_parameter(self, name: str, p: Tensor) -> None:
        """normal(0, 0.02); projections that write into the residual stream get 0.02 / sqrt(2 * layers) (GPT-2);
        linear biases zero; norm weights and biases keep the ones and zeros they are made with."""
        if name.endswith(("out_proj.weight", "down.weight")):
            nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.cfg.layers))
        elif p.dim() == 2:  # linear and embedding weights
            nn.init.normal_(p, 0.0, 0.02)
        elif name.endswith(("proj.bias", "up.bias", "down.bias")):  # nn.Linear starts them uniform
            nn.init.zeros_(p)

    def materialize(self) -> list[str]:
        """After weights were assigned to a model built on the meta device: the parameters still there (those the
        weights did not hold, e.g. a retrofit's encoder and CCA) made as a new model's, in fp32, and the
        buffers recomputed. Returns the names of the parameters made."""
        made = []
        for name, p in list(self.named_parameters()):
            if not p.is_meta:
                continue
            fresh = torch.ones(p.shape) if name.endswith("weight") and p.dim() == 1 else torch.zeros(p.shape)
            self._init_parameter(name, fresh)
            module_name, _, leaf = name.rpartition(".")
            setattr(self.get_submodule(module_name), leaf, nn.Parameter(fresh, requires_grad=p.requires_grad))
            made.append(name)
        if self.rotary is not None:
            self.rotary.register_buffer("inv_freq", rope_frequencies(self.cfg), persistent=False)
        return made

    def zero_retrieval_output(self) -> None:
        """Zero every CCA's output projection, so that retrieval adds exactly nothing to the residual stream and
        the model's logits are those of the decoder alone, with retrieval on or off. It still learns: the
        projection's gradient is its input (the attention over the encoded neighbours, not zero) times the
        gradient at the output, so the first step moves it off zero, and the gradients of the CCA's other
        weights and the encoder's, zero while it is, flow from the second step on (as ControlNet's zero
        convolutions and LoRA's zero B do)."""
        for layer in self.layers:
            if layer.cca is not None:
                nn.init.zeros_(layer.cca.attn.out_proj.weight)

    @property
    def activation_checkpointing(self) -> bool:
        """Recompute each decoder and encoder layer in the backward pass (training only) instead of keeping its
        activations."""
        return self._checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        self._checkpointing = on
        if self.encoder is not None:
            self.encoder.activation_checkpointing = on

    def _head(self, x: Tensor) -> Tensor:
        """x (..., d) normed -> logits (..., v): the separate LM head, or the tied embedding matrix."""
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)

    def _check_length(self, end: int) -> None:
        """Refuse positions past the sliding attention window the decoder was pretrained with (full causal
        attention would compute something else there)."""
        window = self.cfg.sliding_window
        if window and end > window:
            raise ValueError(f"{end} positions exceed the model's sliding attention window of {window} "
                             f"(model.sliding_window), which retro does not apply")

    def _embed(self, tokens: Tensor) -> Tensor:
        """tokens (..., s) -> (..., s, d), with learned positions 0..s-1 when configured."""
        x = self.embed(tokens)
        if self.pos_embed is not None:
            s = tokens.shape[-1]
            if s > self.pos_embed.num_embeddings:
                limit = self.pos_embed.num_embeddings
                raise ValueError(f"{s} tokens exceed the {limit} learned positions (model.seq_length {limit})")
            x = x + self.pos_embed(torch.arange(s, device=tokens.device))
        return self.drop(x)

    def _rope(self, s: int, device: torch.device) -> tuple[Tensor, Tensor] | None:
        return None if self.rotary is None else self.rotary(torch.arange(s, device=device))

    @property
    def retrieves(self) -> bool:
        """Whether retrieval can change the output: CCA layers, not gated off (cca_gate_off, model.retro_gate 0)."""
        return self.encoder is not None and not self.cca_gate_off and self.cfg.retro_gate != 0.0

    def _encoder_rope(self, r: int, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """The encoder's self-attention positions 0..r-1 within each neighbour (none: model.retrieval_rope off)."""
        return self._rope(r, device) if self.cfg.retrieval_rope else None

    def _cca_rope(self, k: int, r: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """CCA positions in the neighbour's frame: queries m..2m-1, keys 0..r-1 for each of the k neighbours."""
        if self.rotary is None or not self.cfg.retrieval_rope:
            return None
        m = self.chunk_length
        cos_q, sin_q = self.rotary(torch.arange(m, 2 * m, device=device))  # (m, rot)
        cos_k, sin_k = self.rotary(torch.arange(r, device=device).repeat(k))  # (k*r, rot)
        return cos_q, sin_q, cos_k, sin_k

    def forward(self, tokens: Tensor, neighbours: Tensor | None = None, *, retrieval: bool = True,
                cache: Cache | None = None) -> Tensor:
        """tokens (b, n) and neighbours (b, l, k, r) with l = ceil(n / m), or None -> logits (b, n, v).

        n need not be a multiple of m. Neighbours are ignored by a plain GPT and when retrieval is off.
        With an empty `cache`, this is the prefill of a generator: keys, values and retrieval state are kept
        for `step`.
        """
        b, n = tokens.shape
        self._check_length(n)
        x = self._embed(tokens)  # (b, n, d)
        rope = self._rope(n, tokens.device)

        use_retrieval = retrieval and self.retrieves and neighbours is not None
        encoded = encoded_mask = neighbour_states = cca_rope = None
        if use_retrieval:
            l = math.ceil(n / self.chunk_length)
            if neighbours.dim() != 4 or neighbours.shape[:2] != (b, l):
                raise ValueError(
                    f"neighbours have shape {tuple(neighbours.shape)}, expected (batch {b}, chunks {l}, k, r) for "
                    f"{n} tokens in chunks of {self.chunk_length}"
                )
            encoded_mask = neighbours != self.pad_id  # (b, l, k, r)
            neighbour_states = self._embed(neighbours)  # (b, l, k, r, d)
            cca_rope = self._cca_rope(*neighbours.shape[2:], tokens.device)

        def encode(context: Tensor) -> tuple[Tensor, Tensor]:
            """The neighbours encoded once, conditioned on the first CCA layer's context (b, n, d)."""
            out = self.encoder(neighbour_states, encoded_mask, context, self._encoder_rope(neighbours.shape[-1],
                                                                                          tokens.device))
            if cache is not None:
                cache.keep_retrieval_state(context, out, encoded_mask)
            return out, encoded_mask  # (b, l, k, r, d), (b, l, k, r)

        if cache is not None:
            cache.begin_prefill(n)
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else cache.layer(i)
            if use_retrieval and encoded is None and layer.cca is not None:  # the first CCA layer runs the encoder
                x, encoded, encoded_mask = layer(x, rope, cca_rope=cca_rope, kv=kv, encode=encode)
            elif cache is None:
                x = recomputed(self._checkpointing, layer, x, rope, encoded, encoded_mask, cca_rope)
            else:
                x = layer(x, rope, encoded, encoded_mask, cca_rope, kv=kv)
        if cache is not None:
            cache.advance(n)
        return self._head(self.norm(x))  # (b, n, v)

    @torch.no_grad()
    def step(self, tokens: Tensor, cache: Cache, neighbours: Tensor | None = None) -> Tensor:
        """One new token per row, tokens (b,) at positions cache.positions -> logits (b, v), cache advanced.

        neighbours (b, k, r): for the rows whose new token completes a chunk ((position + 1) % m == 0), the
        neighbours of that chunk (live retrieval); the other rows are not read. The chunk is then encoded,
        conditioned on its decoder states, and serves CCA for the next m positions, as in `forward`.
        None, or a model without retrieval: no CCA.
        """
        m, pos = self.chunk_length, cache.positions  # (b,)
        self._check_length(int(pos.max()) + 1)
        x = self.embed(tokens)[:, None]  # (b, 1, d)
        if self.pos_embed is not None:
            x = x + self.pos_embed(pos)[:, None]  # (b, 1, d)
        rope = None if self.rotary is None else tuple(t[:, None, None] for t in self.rotary(pos))  # (b, 1, 1, rot)
        use_retrieval = self.retrieves and neighbours is not None
        cca_rope = None
        if use_retrieval and self.rotary is not None and self.cfg.retrieval_rope:
            # the query sits at m + j in its neighbours' frame, j its offset in the CCA block (see CCA)
            cos_q, sin_q = self.rotary(m + (pos - (m - 1)) % m)  # (b, rot)
            cos_k, sin_k = self._cca_rope(*neighbours.shape[1:], x.device)[2:]  # (k*r, rot)
            cca_rope = (cos_q[:, None, None], sin_q[:, None, None], cos_k, sin_k)  # queries (b, 1, 1, rot)
        def encode(context: Tensor) -> tuple[Tensor, Tensor]:
            self._encode_completed_chunks(context, cache, neighbours)
            return cache.encoded, cache.encoded_mask

        cache.open_slot()
        for i, layer in enumerate(self.layers):
            if use_retrieval and i + 1 == self.retro_layers[0]:
                x = layer(x, rope, cca_rope=cca_rope, kv=cache.layer(i), encode=encode)[0]
            else:
                encoded = cache.encoded if use_retrieval and layer.cca is not None else None
                x = layer(x, rope, encoded, cache.encoded_mask, cca_rope, kv=cache.layer(i))
        cache.advance(1)
        return self._head(self.norm(x[:, 0]))  # (b, v)

    def _encode_completed_chunks(self, x: Tensor, cache: Cache, neighbours: Tensor) -> None:
        """x (b, 1, d), the first CCA layer's retrieval context (model.encoder_context), kept by the cache as its
        row's chunk state. Where it is the chunk's last position, encode that chunk's neighbours (b', k, r) against
        the chunk's m states."""
        done = cache.keep_chunk_state(x)  # (b',) the rows whose new token completes a chunk
        if len(done) == 0:
            return
        chosen = neighbours[done]  # (b', k, r)
        mask = chosen != self.pad_id
        h = rearrange(self._embed(chosen), "b k r d -> b 1 k r d")  # one chunk per row: l = 1
        states = cache.chunk_states[done].to(x.dtype)  # (b', m, d)
        encoded = self.encoder(h, rearrange(mask, "b k r -> b 1 k r"), states,
                               self._encoder_rope(chosen.shape[-1], x.device))
        cache.keep_encoded(done, rearrange(encoded, "b 1 k r d -> b k r d"), mask)
