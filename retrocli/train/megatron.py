"""NVIDIA's Retro and InstructRetro checkpoints (legacy Megatron-LM, the `InstructRetro` tag) as retro checkpoints.

    SRC/latest_checkpointed_iteration.txt     "release" (or an iteration number: iter_NNNNNNN/)
    SRC/release/mp_rank_00/model_optim_rng.pt one file per tensor-parallel rank: a torch pickle of
        {"args": argparse.Namespace, "iteration", "checkpoint_version", "model": {"language_model": {
            "embedding": {"word_embeddings": {"weight"}},          (V/t, h)
            "encoder": {"layers.N.<...>", "final_norm.<...>"},     the Retro decoder (flat state_dict)
            "output_layer": {"weight"}}}}                           (V/t, h), untied

Nothing in the files runs: they are read by torch's weights-only unpickler, which rebuilds tensors and plain
containers, with `argparse.Namespace` and inert stand-ins for Megatron's enums (`ModelType`) allowed besides;
any other class is refused, naming it. Tensors stay memory-mapped in the files; each of retro's tensors is made
from its shards and written to the checkpoint at once (`checkpoint.write_safetensors`), so converting takes about
the largest tensor (the embedding) beside the files' pages, never the model twice.

What Megatron computes, mapped onto retro's model (docs/results.md says how it was checked):
- tensor-parallel shards: query_key_value, query, key_value, dense_h_to_4h, word_embeddings and output_layer
  split their rows; the two dense projections back into the residual stream split their columns; norms are
  copies. query_key_value holds (q, k, v) head by head, key_value (k, v) head by head; SwiGLU's dense_h_to_4h
  holds each shard's gate half then up half.
- LayerNorm-1p: gamma = weight + 1, added in the stored dtype (bf16) as Megatron adds it.
- Norms: a plain layer's post_attention_norm feeds its MLP; a Retro layer's feeds the CCA query (and, in the first
  one, the encoder's context: model.encoder_context = "cca_query") and post_inter_attention_norm feeds the MLP.
- The retriever (the encoder) lives under the first Retro layer: encoder.layers.8.retriever.layers.{0,1}; it has
  no final norm and retrieval uses no positions (model.encoder_norm, model.retrieval_rope off); the CCA output is
  scaled by args.retro_attention_gate (model.retro_gate; 1 when the args predate it).
- The chunk length is not in the checkpoint (Megatron kept it in the database's args.json): 64 for NVIDIA's.
Megatron attends neighbour padding (eod tokens); retro masks it: the two agree on neighbours without padding.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..model.retro import megatron_retro_layers

SHARD = "model_optim_rng.pt"


class MegatronEnum:
    """An inert stand-in for Megatron's enum classes in a checkpoint's args: it keeps the value, runs nothing."""

    def __init__(self, value: Any = None):
        self.value = value

    def __repr__(self) -> str:
        return f"MegatronEnum({self.value!r})"


def _allowed() -> list:
    """What a Megatron checkpoint may name besides tensors and containers: its args namespace, Megatron's enums (as
    stand-ins), and the numpy arrays of a saved random state."""
    import numpy as np

    allowed: list = [argparse.Namespace]
    for module in ("megatron.core.enums", "megatron.model.enums"):
        for name in ("ModelType", "AttnMaskType", "AttnType", "LayerType", "PositionEmbeddingType"):
            allowed.append((MegatronEnum, f"{module}.{name}"))
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed.append((reconstruct, f"{module}._reconstruct"))
    return allowed + [np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_shard(path: Path) -> dict[str, Any]:
    """One rank's file, unpickled weights-only (tensors memory-mapped): a UserError naming anything else."""
    if not path.is_file():
        raise UserError(f"{path} is missing: the checkpoint has a shard per tensor-parallel rank; download it again")
    try:
        with torch.serialization.safe_globals(_allowed()):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        text = str(e)
        found = re.search(r"Unsupported (?:global|operand)[^\n]*", text, re.IGNORECASE)
        why = found.group(0).strip() if found else text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise UserError(f"{path} is not a Megatron checkpoint retro can read without running code from it ({why}); "
                        f"retro never unpickles more than tensors, containers and Megatron's args") from None
    if not isinstance(data, dict) or "model" not in data or "args" not in data:
        raise UserError(f"{path} holds no 'model' and 'args': it is not a Megatron checkpoint")
    return data


@dataclass
class Source:
    """A downloaded Megatron checkpoint folder: its iteration, the rank files, and the args of rank 0."""

    folder: Path
    iteration: int
    shards: list[Path]
    args: argparse.Namespace


def open_source(src: Path) -> Source:
    marker = src / "latest_checkpointed_iteration.txt"
    if not marker.is_file():
        raise UserError(f"{src} is not a Megatron checkpoint folder: it has no {marker.name}")
    text = marker.read_text(encoding="utf-8").strip()
    if text == "release":
        folder, iteration = src / "release", 0
    elif text.isdigit():
        folder, iteration = src / f"iter_{int(text):07d}", int(text)
    else:
        raise UserError(f"{marker} says {text!r}: expected 'release' or an iteration number")
    ranks = sorted(p for p in folder.glob("mp_rank_*") if p.is_dir())
    if any(re.fullmatch(r"mp_rank_\d+_\d+", p.name) for p in ranks):
        raise UserError(f"{folder} is split by pipeline stages too (mp_rank_XX_YYY): retro imports tensor-parallel "
                        f"checkpoints only, as NVIDIA released them")
    if not ranks:
        raise UserError(f"{folder} has no mp_rank_XX folders")
    first = read_shard(ranks[0] / SHARD)
    args = first["args"]
    tp = int(getattr(args, "tensor_model_parallel_size", len(ranks)))
    expected = [folder / f"mp_rank_{t:02d}" / SHARD for t in range(tp)]
    missing = [str(p) for p in expected if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]} is missing: args say tensor_model_parallel_size {tp}, so the checkpoint has "
                        f"{tp} shards; download the missing one" + (f" (and {len(missing) - 1} more)"
                                                                   if len(missing) > 1 else ""))
    return Source(src, iteration, expected, args)


def model_config(args: argparse.Namespace, chunk_length: int, where: Path) -> ModelConfig:
    """[model] from the checkpoint's args; a UserError for what retro does not compute."""
    def need(name: str, *alternatives: str) -> Any:
        for key in (name, *alternatives):
            if getattr(args, key, None) is not None:
                return getattr(args, key)
        raise UserError(f"{where}: its args have no {name}: not a Megatron GPT/Retro checkpoint retro knows")

    problems = []
    if not getattr(args, "swiglu", False):
        problems.append("a GELU MLP (args.swiglu false)")
    if getattr(args, "add_bias_linear", False):
        problems.append("linear biases (args.add_bias_linear)")
    if not getattr(args, "untie_embeddings_and_output_weights", False):
        problems.append("a tied output layer")
    if getattr(args, "group_query_attention", False):
        problems.append("grouped-query attention")
    rope = getattr(args, "use_rotary_position_embeddings", False)
    if getattr(args, "position_embedding_type", "rope") != "rope" and not rope:
        problems.append(f"position embeddings {getattr(args, 'position_embedding_type', None)!r}")
    if getattr(args, "normalization", "LayerNorm") != "LayerNorm":
        problems.append(f"normalization {args.normalization!r}")
    if problems:
        raise UserError(f"{where}: retro imports NVIDIA's Retro models; this checkpoint has " + ", ".join(problems))
    layers = int(need("num_layers"))
    retro = bool(getattr(args, "retro_add_retriever", True))
    r = int(getattr(args, "retro_num_retrieved_chunks", 2)) * chunk_length
    return dataclasses.replace(
        ModelConfig(), layers=layers, hidden=int(need("hidden_size")), heads=int(need("num_attention_heads")),
        ffn_hidden=int(need("ffn_hidden_size")), seq_length=int(need("seq_length")),
        vocab_size=int(need("padded_vocab_size")), position="rope", rotary_percent=float(need("rotary_percent")),
        norm="layernorm", norm_eps=float(need("norm_epsilon", "layernorm_epsilon")), mlp="swiglu",
        tie_embeddings=False, retro_layers=megatron_retro_layers(layers) if retro else [],
        encoder_layers=int(getattr(args, "retro_encoder_layers", 2)),
        num_neighbors=int(getattr(args, "retro_num_neighbors", 2)), retrieved_length=r,
        retro_gate=float(getattr(args, "retro_attention_gate", 1.0)), encoder_context="cca_query",
        retrieval_rope=False, encoder_norm=False)


# -------------------------------------------------------------------------------------------- the names


@dataclass
class Entry:
    """retro's tensors `ours` made from the Megatron tensor `key` of every shard, joined as `kind` says: "rows" or
    "cols" (the shards side by side), "copy" (a norm: every shard holds it whole; `one_p`: LayerNorm-1p's weight),
    "qkv" (q, k, v head by head -> q_proj, kv_proj), "kv" (k, v head by head -> kv_proj), "swiglu" (each shard's
    gate half then up half -> up)."""

    ours: list[str]
    key: str
    kind: str
    one_p: bool = False


def name_table(keys: list[str], cfg: ModelConfig, one_p: bool) -> list[Entry]:
    """An entry for each Megatron key (names normalised: `*_layernorm` -> `*_norm`); a UserError for a key retro
    has no place for (a model that is not NVIDIA's Retro)."""
    retro_layers = set(cfg.retro_layers or [])
    table = []
    for key in keys:
        k = key.replace("layernorm", "norm")
        if k == "embedding.word_embeddings.weight":
            table.append(Entry(["embed.weight"], key, "rows"))
        elif k == "output_layer.weight":
            table.append(Entry(["lm_head.weight"], key, "rows"))
        elif m := re.fullmatch(r"encoder\.final_norm\.(weight|bias)", k):
            table.append(Entry([f"norm.{m[1]}"], key, "copy", one_p and m[1] == "weight"))
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.retriever\.layers\.(\d+)\.(.+)", k):
            table.append(_layer_entry(key, f"encoder.layers.{m[2]}.", m[3], "cross", "norm_cross" if m[2] == "0"
                                      else "norm_mlp", one_p))
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", k):
            retro = int(m[1]) + 1 in retro_layers
            table.append(_layer_entry(key, f"layers.{m[1]}.", m[2], "cca.attn", "norm_cca" if retro else "norm_mlp",
                                      one_p))
        else:
            table.append(Entry([], key, "unknown"))
    unknown = [e.key for e in table if e.kind == "unknown" or not e.ours]
    if unknown:
        raise UserError(f"the checkpoint holds tensors retro has no place for ({', '.join(unknown[:4])}): it is not "
                        f"one of NVIDIA's Retro models")
    return table


def _layer_entry(key: str, ours: str, rest: str, cross: str, post_attention: str, one_p: bool) -> Entry:
    """A decoder layer's tensor (`cross`: where its cross-attention goes) or a retriever layer's."""
    norms = {"input_norm": "norm_attn", "post_attention_norm": post_attention, "post_inter_attention_norm": "norm_mlp"}
    name, _, part = rest.rpartition(".")
    if name in norms:
        return Entry([f"{ours}{norms[name]}.{part}"], key, "copy", one_p and part == "weight")
    linear = {"self_attention.query_key_value": ([f"{ours}attn.q_proj.weight", f"{ours}attn.kv_proj.weight"], "qkv"),
              "self_attention.dense": ([f"{ours}attn.out_proj.weight"], "cols"),
              "inter_attention.query": ([f"{ours}{cross}.q_proj.weight"], "rows"),
              "inter_attention.key_value": ([f"{ours}{cross}.kv_proj.weight"], "kv"),
              "inter_attention.dense": ([f"{ours}{cross}.out_proj.weight"], "cols"),
              "mlp.dense_h_to_4h": ([f"{ours}mlp.up.weight"], "swiglu"),
              "mlp.dense_4h_to_h": ([f"{ours}mlp.down.weight"], "cols")}
    if name in linear and part == "weight":
        return Entry(linear[name][0], key, linear[name][1])
    return Entry([], key, "unknown")


def join(entry: Entry, shards: list[torch.Tensor], heads: int) -> list[torch.Tensor]:
    """The entry's tensors of every shard -> retro's tensors."""
    if entry.kind == "copy":
        t = shards[0]
        return [t + 1 if entry.one_p else t]  # LayerNorm-1p, in the stored dtype as Megatron adds it
    if entry.kind == "cols":
        return [torch.cat(shards, dim=1)]
    if entry.kind == "swiglu":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves] + [h[1] for h in halves])]
    whole = torch.cat(shards)
    if entry.kind == "qkv":  # (heads, 3, e, h) -> q (heads e, h), k and v (2 heads e, h)
        qkv = whole.unflatten(0, (heads, 3, -1))
        return [qkv[:, 0].flatten(0, 1), qkv[:, 1:].transpose(0, 1).flatten(0, 2)]
    if entry.kind == "kv":  # (heads, 2, e, h) -> (2 heads e, h)
        return [whole.unflatten(0, (heads, 2, -1)).transpose(0, 1).flatten(0, 2)]
    return [whole]


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": t}} -> {"a.b": t} (the language model's nested dicts and the decoder's flat state_dict)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def converted(source: Source, cfg: ModelConfig, shapes: dict[str, torch.Size]
              ) -> tuple[list[tuple[str, torch.dtype, torch.Size]], Callable[[], Iterator[tuple[str, torch.Tensor]]]]:
    """What the checkpoint becomes: (name, dtype, shape) of each of retro's tensors in the order they are made,
    and a generator that makes them, rank files memory-mapped, one Megatron tensor at a time."""
    trees = [flat(read_shard(p)["model"]["language_model"]) for p in source.shards]
    one_p = bool(getattr(source.args, "apply_layernorm_1p", False))
    keys = list(trees[0])
    for path, tree in zip(source.shards[1:], trees[1:]):
        if set(tree) != set(keys):
            odd = sorted(set(tree) ^ set(keys))[:3]
            raise UserError(f"{path} does not hold the tensors of {source.shards[0]} ({', '.join(odd)}): the shards "
                            f"are of different checkpoints")
    table = name_table(keys, cfg, one_p)
    made = {n for e in table for n in e.ours}
    missing = sorted(set(shapes) - made)
    if missing:
        raise UserError(f"{source.folder}: the checkpoint lacks tensors the model its args describe has "
                        f"({', '.join(missing[:4])}): the args contradict the tensors")
    specs = []
    for e in table:
        parts = [t[e.key] for t in trees]
        if any(p.shape != parts[0].shape for p in parts):
            raise UserError(f"{source.folder}: {e.key} has shapes {[tuple(p.shape) for p in parts]} across the "
                            f"shards: they are of different checkpoints")
        for name in e.ours:
            expected = shapes[name]
            specs.append((name, parts[0].dtype, expected))
        # the shapes the join gives, checked before anything is written
        rows = sum(p.shape[0] for p in parts) if e.kind not in ("copy", "cols") else parts[0].shape[0]
        cols = sum(p.shape[1] for p in parts) if e.kind == "cols" else (parts[0].shape[1] if parts[0].dim() > 1 else 0)
        want_rows = sum(shapes[n][0] for n in e.ours)
        want_cols = shapes[e.ours[0]][1] if len(shapes[e.ours[0]]) > 1 else 0
        if (rows, cols) != (want_rows, want_cols):
            raise UserError(f"{source.folder}: {e.key} joins to {rows} x {cols}, but the model its args describe "
                            f"(num_layers {cfg.layers}, hidden_size {cfg.hidden}, ffn_hidden_size {cfg.ffn_hidden}, "
                            f"padded_vocab_size {cfg.vocab_size}) needs {want_rows} x {want_cols} for "
                            f"{', '.join(e.ours)}: the args contradict the tensors")

    def make() -> Iterator[tuple[str, torch.Tensor]]:
        for e in table:
            for name, t in zip(e.ours, join(e, [tree[e.key] for tree in trees], cfg.heads)):
                yield name, t.contiguous()

    return specs, make


# ---------------------------------------------------------------------------------------------- the import


def find_tokenizer(src: Path, given: Path | None) -> Path:
    """The SentencePiece model NVIDIA ships beside the weights (one *.model in SRC), or `given`."""
    if given is not None:
        if not given.is_file():
            raise UserError(f"--tokenizer {given} is not a file")
        return given
    found = sorted(p for p in src.glob("*.model") if p.is_file())
    if len(found) != 1:
        raise UserError(f"{src} has {len(found)} SentencePiece models (*.model) beside the weights: name the one the "
                        f"model was trained with, --tokenizer FILE")
    return found[0]


def import_checkpoint(src: Path, out: Path, chunk_length: int = 64, tokenizer: Path | None = None,
                      recipe: str = "nvidia-retro-8b") -> dict[str, Any]:
    """`retro import megatron`: SRC converted into the workspace OUT: OUT/tokenizer.model, the checkpoint
    OUT/checkpoints/imported/step-NNNNNN (weights in the stored dtype, no trainer state: it starts runs, it does
    not resume one) and OUT/retro.toml from `recipe`, its [model] the checkpoint's args."""
    from ..config import to_commented_toml
    from ..data.tokenizer import SentencePieceTokenizer, content_sha256
    from ..model.retro import RetroModel
    from ..recipes import workspace_config
    from ..workspace import write_bytes_atomic, write_text_atomic
    from . import checkpoint

    source = open_source(src)
    cfg = model_config(source.args, chunk_length, src)
    sp_file = find_tokenizer(src, tokenizer)
    tok = SentencePieceTokenizer(sp_file)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer {sp_file} has {tok.vocab_size:,} tokens, the checkpoint's embedding "
                        f"{cfg.vocab_size:,} rows: it is not the model's tokenizer")
    run = out / "checkpoints" / "imported"
    step = checkpoint.step_dir(run, source.iteration)

    def fill(ws) -> str:
        ws.model = cfg
        ws.db.chunk_length = chunk_length
        ws.tokenizer.type, ws.tokenizer.path = "sentencepiece", "tokenizer.model"
        ws.pretrain.init_from = ws.sft.init_from = ws.generate.checkpoint = "checkpoints/imported"
        return (f"# imported by `retro import megatron` from {src.resolve()} (iteration {source.iteration}, "
                f"{len(source.shards)} tensor-parallel shards); [model] is its args: keep it")

    ws_cfg, header = workspace_config(out, recipe, fill)
    if step.exists():
        raise UserError(f"{step} already exists: import into a new folder")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in RetroModel(cfg, chunk_length, tok.pad_id).state_dict().items()}
    specs, make = converted(source, cfg, shapes)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "tokenizer.model", sp_file.read_bytes())
    tok_ref = {"path": str((out / "tokenizer.model").resolve()), "type": "sentencepiece",
               "sha256": content_sha256("sentencepiece", out / "tokenizer.model"), "vocab_size": tok.vocab_size,
               "fingerprint": None, "earlier_fingerprints": []}
    meta = checkpoint.model_meta(cfg, chunk_length, tok.pad_id, tok_ref, cfg.retro_layers)
    meta.update(eos_id=tok.eos_id, megatron={"source": str(src.resolve()), "iteration": source.iteration,
                                             "tensor_parallel": len(source.shards)})
    checkpoint.save(run, source.iteration, None, None, meta,
                    to_commented_toml(ws_cfg, "# the configuration this checkpoint was imported with"),
                    fault="import:checkpoint", write_weights=lambda path: checkpoint.write_safetensors(path, specs,
                                                                                                       make()))
    write_text_atomic(out / "retro.toml", to_commented_toml(ws_cfg, header))
    return {"checkpoint": str(step), "workspace": str(out / "retro.toml"), "layers": cfg.layers,
            "hidden": cfg.hidden, "retro_layers": cfg.retro_layers, "gate": cfg.retro_gate,
            "parameters": sum(math.prod(s) for _, _, s in specs), "dtype": str(specs[0][1]).removeprefix("torch.")}
