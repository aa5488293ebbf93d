"""Hugging Face model folders: a local causal LM imported as the decoder of a Retro, and a Retro's decoder
exported as one.

    HF_DIR/
        config.json                          the decoder's shape (`architectures` names the family)
        model.safetensors                    the weights; or model-0000N-of-0000M.safetensors shards listed by
                                             model.safetensors.index.json. PyTorch pickles (*.bin) are refused.
        tokenizer.json, tokenizer_config.json, ...   the model's own tokenizer: the workspace tokenizer
        retro.safetensors, retro_config.json only in a folder `retro export` wrote: the encoder and CCA weights,
                                             and the Retro keys (retro layers, neighbours, chunk length)

Each family's names and layouts are mapped onto retro's decoder (model/retro.py) by one table of `Tensor`
entries, read in both directions: importing concatenates a family's tensors (transposed first for GPT-2's
Conv1D) and splits the result into retro's; exporting concatenates retro's and splits into the family's.
Retro fuses what families keep apart: keys and values in one `kv_proj`, SwiGLU's gate and up projections in
one `up` (gate first), GPT-2's fused query/key/value in `q_proj` + `kv_proj`.

Weights are read tensor by tensor from the safetensors files (memory-mapped) into a model built on the meta
device, in the checkpoint's own dtype unless asked otherwise: importing a bf16 model of N parameters takes
about 2N bytes, never an fp32 copy. The parameters the folder does not hold (a retrofit's encoder and CCA) are
then made as a new model's, in fp32, with each CCA's output projection zeroed (`zero_retrieval_output`), so
the Retro computes exactly the imported model's logits until it has trained.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..config import ModelConfig, head_dim, kv_heads
from ..errors import UserError
from ..model.retro import RetroModel, ffn_width
from ..workspace import sha256_file, write_text_atomic

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
RETRO_WEIGHTS, RETRO_CONFIG = "retro.safetensors", "retro_config.json"
# `architectures` entry -> family
FAMILIES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
            "Qwen3ForCausalLM": "qwen3", "GPT2LMHeadModel": "gpt2", "GPTNeoXForCausalLM": "gpt_neox",
            "StableLmForCausalLM": "stablelm"}
# the biases a family's modeling code always has (zeros where a retro model has none)
ALWAYS_BIASED = {"gpt2": {"qkv_bias": True, "out_bias": True, "mlp_bias": True}, "gpt_neox": {"mlp_bias": True}}
# the [model] keys that are not the decoder's, which a Hugging Face folder does not decide
RETRIEVAL_KEYS = ("seq_length", "dropout", "retro_layers", "encoder_layers", "num_neighbors", "retrieved_length")


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder (config.json), not a retro checkpoint (meta.json)."""
    return path.is_dir() and (path / CONFIG).is_file() and not (path / "meta.json").exists()


def supported() -> str:
    return ", ".join(f"{a} ({f})" for a, f in FAMILIES.items())


# ------------------------------------------------------------------------------------------ the folder


@dataclass
class HFFolder:
    """A Hugging Face causal LM folder, read: its family, the decoder keys its config.json fixes, where each
    tensor is, and the Retro keys of a folder `retro export` wrote (or None)."""

    path: Path
    family: str
    config: Any  # transformers' PretrainedConfig of config.json
    decoder: dict[str, Any]  # ModelConfig keys (all but RETRIEVAL_KEYS)
    files: dict[str, Path]  # tensor name -> the safetensors file holding it
    retro: dict[str, Any] | None  # retro_config.json

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.files.values()))


def open_folder(path: Path) -> HFFolder:
    """Read a Hugging Face folder's config.json and weight index; every problem a UserError naming the file."""
    import transformers

    if not (path / CONFIG).is_file():
        raise UserError(f"{path} is not a Hugging Face model folder: it has no {CONFIG}")
    try:
        raw = json.loads((path / CONFIG).read_text(encoding="utf-8"))
        names = list(raw.get("architectures") or [])
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as e:
        raise UserError(f"{path / CONFIG} is not a model configuration ({e})") from None
    family = next((FAMILIES[a] for a in names if a in FAMILIES), None)
    if family is None:
        raise UserError(f"{path / CONFIG}: architectures {names or '(none)'} is not one retro imports; supported: "
                        f"{supported()}")
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its warnings about token ids are about generation, not weights
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # whatever transformers makes of a config it cannot take: the file is the problem
        raise UserError(f"cannot read {path / CONFIG}: {type(e).__name__}: {e}") from None
    finally:
        transformers.logging.set_verbosity(level)
    retro = None
    if (path / RETRO_CONFIG).is_file():
        try:
            retro = json.loads((path / RETRO_CONFIG).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path / RETRO_CONFIG} is damaged ({e}): export the model again") from None
    decoder = decoder_keys(family, config, path)
    if retro is not None:  # retro's export: biases the family always has and the model had not are zeros
        decoder.update({k: False for k in ("qkv_bias", "out_bias", "mlp_bias")
                        if retro.get("model", {}).get(k) is False})
    return HFFolder(path, family, config, decoder, weight_files(path), retro)


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file: model.safetensors, or the shards model.safetensors.index.json lists."""
    from safetensors import SafetensorError, safe_open

    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path / INDEX} is not a safetensors index ({e})") from None
        found = {name: path / file for name, file in weight_map.items()}
    elif (path / WEIGHTS).is_file():
        found = {}
    else:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        if pickles:
            raise UserError(f"{path} holds its weights only as PyTorch pickles ({', '.join(pickles[:3])}), which "
                            f"retro never unpickles (loading one can run any code): convert them once where you "
                            f"trust the file, e.g. AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, "
                            f"safe_serialization=True), or download the model's safetensors files")
        raise UserError(f"{path} has no weights: expected {WEIGHTS} or {INDEX} with its shards")
    for file in sorted(set(found.values())) or [path / WEIGHTS]:
        if not file.is_file():
            raise UserError(f"{file} is missing (listed in {path / INDEX}): download it again")
        try:
            with safe_open(str(file), "pt") as f:
                if file == path / WEIGHTS:
                    found = {name: file for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{file} is not a readable safetensors file ({e}): it may be truncated; download it "
                            f"again") from None
    return found


def _rope(config: Any) -> dict[str, Any]:
    """The RoPE keys of a config, as transformers 5 (`rope_parameters`) or 4 (`rope_theta`, `rope_scaling`)
    keeps them."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or getattr(config, "rotary_emb_base", None)
                       or scaling.get("rope_theta", 10000.0))
    source = params if params.get("rope_type", "default") != "default" else scaling
    kind = source.get("rope_type", source.get("type", "default")) or "default"
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "linear":
        out.update(rope_scaling="linear", rope_factor=float(source["factor"]))
    elif kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=float(source["factor"]),
                   rope_low_freq_factor=float(source["low_freq_factor"]),
                   rope_high_freq_factor=float(source["high_freq_factor"]),
                   rope_original_length=int(source["original_max_position_embeddings"]))
    elif kind != "default":
        raise ValueError(f"RoPE scaling {kind!r} (retro applies 'linear' and 'llama3')")
    return out


def decoder_keys(family: str, c: Any, path: Path) -> dict[str, Any]:
    """The [model] keys a family's config fixes; a UserError for what retro does not compute."""
    try:
        if family == "gpt_neox":
            if getattr(c, "use_parallel_residual", True):
                raise ValueError("use_parallel_residual (attention and MLP side by side, as in Pythia)")
            params = dict(getattr(c, "rope_parameters", None) or {})
            act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(c.hidden_act)
            if act is None:
                raise ValueError(f"hidden_act {c.hidden_act!r}")
            bias = bool(getattr(c, "attention_bias", True))
            return {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "heads": c.num_attention_heads,
                    "kv_heads": c.num_attention_heads, "head_dim": c.hidden_size // c.num_attention_heads,
                    "ffn_hidden": c.intermediate_size, "vocab_size": c.vocab_size, "position": "rope",
                    "rotary_percent": float(params.get("partial_rotary_factor", getattr(c, "rotary_pct", 0.25))),
                    **_rope(c), "norm": "layernorm", "norm_eps": c.layer_norm_eps, "mlp": act,
                    "tie_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
                    "qkv_bias": bias, "out_bias": bias, "mlp_bias": True}
        if family == "gpt2":
            act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(
                c.activation_function)
            if act is None:
                raise ValueError(f"activation_function {c.activation_function!r}")
            if getattr(c, "scale_attn_by_inverse_layer_idx", False) or not getattr(c, "scale_attn_weights", True):
                raise ValueError("attention scaled otherwise than by 1/sqrt(head dimension)")
            return {"layers": c.n_layer, "hidden": c.n_embd, "heads": c.n_head, "kv_heads": c.n_head,
                    "head_dim": c.n_embd // c.n_head, "ffn_hidden": c.n_inner or 4 * c.n_embd,
                    "vocab_size": c.vocab_size, "position": "learned", "max_positions": c.n_positions,
                    "norm": "layernorm", "norm_eps": c.layer_norm_epsilon, "mlp": act,
                    "tie_embeddings": bool(getattr(c, "tie_word_embeddings", True)),
                    "qkv_bias": True, "out_bias": True, "mlp_bias": True}
        if c.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {c.hidden_act!r} (retro's SwiGLU is silu)")
        heads = c.num_attention_heads
        if family == "stablelm":  # the Llama layout with LayerNorm (biases) and RoPE on part of each head
            if getattr(c, "use_parallel_residual", False) or getattr(c, "qk_layernorm", False):
                raise ValueError("use_parallel_residual or qk_layernorm")
            params = dict(getattr(c, "rope_parameters", None) or {})
            return {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "heads": heads,
                    "kv_heads": getattr(c, "num_key_value_heads", None) or heads, "head_dim": c.hidden_size // heads,
                    "ffn_hidden": c.intermediate_size, "vocab_size": c.vocab_size, "position": "rope",
                    "rotary_percent": float(params.get("partial_rotary_factor",
                                                       getattr(c, "partial_rotary_factor", 0.25))),
                    **_rope(c), "norm": "layernorm", "norm_eps": c.layer_norm_eps, "mlp": "swiglu",
                    "tie_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
                    "qkv_bias": bool(getattr(c, "use_qkv_bias", False)), "out_bias": False, "mlp_bias": False}
        attention_bias = bool(getattr(c, "attention_bias", False))
        window = 0
        if family == "mistral" or getattr(c, "use_sliding_window", False):
            window = int(getattr(c, "sliding_window", None) or 0)
        return {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "heads": heads,
                "kv_heads": getattr(c, "num_key_value_heads", None) or heads,
                "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads,
                "ffn_hidden": c.intermediate_size, "vocab_size": c.vocab_size, "position": "rope",
                "rotary_percent": float(getattr(c, "partial_rotary_factor", None) or 1.0), **_rope(c),
                "norm": "rmsnorm", "norm_eps": c.rms_norm_eps, "mlp": "swiglu", "sliding_window": window,
                "tie_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
                "qkv_bias": family == "qwen2" or attention_bias,
                "out_bias": family != "qwen2" and attention_bias,
                "mlp_bias": bool(getattr(c, "mlp_bias", False)), "qk_norm": family == "qwen3"}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path / CONFIG}: retro cannot compute this {family} model ({e})") from None


def check_tokenizer(folder: HFFolder, tok_ref: dict[str, Any]) -> None:
    """The workspace tokenizer (checkpoint.tokenizer_ref) must be the model's own: the same files as the folder's
    tokenizer (when it ships one), and no more token ids than the embedding matrix has rows."""
    from ..data.tokenizer import content_sha256, hf_tokenizer_files

    rows = folder.decoder["vocab_size"]
    if tok_ref["vocab_size"] > rows:
        raise UserError(f"the workspace tokenizer {tok_ref['path']} has {tok_ref['vocab_size']:,} tokens, but the "
                        f"embedding matrix of {folder.path} has {rows:,} rows: use the model's own tokenizer "
                        f"(tokenizer.type = \"hf\", tokenizer.path = the model folder) and rebuild the database")
    sp_model = folder.path / "tokenizer.model"  # a SentencePiece workspace's model, as `retro export` ships it
    if tok_ref.get("type") == "sentencepiece" and sp_model.is_file() and sha256_file(sp_model) == tok_ref["sha256"]:
        return
    if hf_tokenizer_files(folder.path):
        theirs = content_sha256("hf", folder.path)
        if theirs != tok_ref["sha256"]:
            raise UserError(f"the database was chunked with the tokenizer {tok_ref['path']} (sha256 "
                            f"{str(tok_ref['sha256'])[:16]}), not with the tokenizer of {folder.path} (sha256 "
                            f"{theirs[:16]}): token ids would mean other words to the model. Set tokenizer.type = "
                            f"\"hf\" and tokenizer.path = \"{folder.path}\", then rebuild the database "
                            f"(`retro db build`)")


def model_config(folder: HFFolder, given: ModelConfig, set_keys: set[str]) -> ModelConfig:
    """The workspace's [model] with the folder's decoder keys: a key the workspace sets (`set_keys`, e.g.
    {"layers"}) must agree with the folder, else a UserError naming both values. A folder `retro export`
    wrote also brings its Retro keys (retro layers, encoder, neighbours) unless the workspace sets them."""
    theirs = dict(folder.decoder)
    if folder.retro is not None:
        theirs.update({k: v for k, v in folder.retro.get("model", {}).items() if k in RETRIEVAL_KEYS
                       and k != "seq_length" and f"model.{k}" not in {f"model.{s}" for s in set_keys}})
    ours, clashes = dataclasses.asdict(given), []
    for k, v in list(theirs.items()):
        if k not in set_keys or k not in folder.decoder or ours[k] == v:
            continue
        if _effective(given, k) == _effective(dataclasses.replace(given, **{k: v}), k) or \
                (k == "vocab_size" and ours[k] == 0):
            theirs[k] = ours[k]  # the same value, derived (0) in the workspace: kept as the workspace writes it
        else:
            clashes.append(f"model.{k} = {ours[k]!r} in the workspace, {v!r} in {folder.path / CONFIG}")
    if clashes:
        raise UserError("the workspace's [model] contradicts the model it starts from: " + "; ".join(clashes)
                        + ". Remove those keys from [model] (the folder decides them)")
    return dataclasses.replace(given, **theirs)


def _effective(cfg: ModelConfig, key: str) -> Any:
    """A [model] key's value as the model uses it (0 resolved for the keys where 0 means "derived")."""
    derived = {"kv_heads": kv_heads, "head_dim": head_dim, "ffn_hidden": ffn_width,
               "max_positions": lambda c: c.max_positions or c.seq_length}
    return derived[key](cfg) if key in derived else getattr(cfg, key)


# ------------------------------------------------------------------------------------- the name tables


@dataclass
class Tensor:
    """retro's tensors `ours` (state-dict names) <-> the family's `theirs`, concatenated along the first
    dimension. `layout`: how theirs differ beyond that: "conv1d" (GPT-2's Conv1D stores (in, out): transposed),
    "per_head" (GPT-NeoX's fused query_key_value holds each head's query, key and value together)."""

    ours: list[str]
    theirs: list[str]
    layout: str = ""

    def to_ours(self, whole: torch.Tensor, heads: int) -> torch.Tensor:
        """The family's tensors, concatenated as stored -> retro's, concatenated (a "conv1d" entry has one)."""
        if self.layout == "conv1d":
            whole = _t(whole)
        if self.layout == "per_head":  # (h 3 e) ... -> (3 h e) ...: every query, then every key, every value
            whole = whole.unflatten(0, (heads, 3, -1)).transpose(0, 1).flatten(0, 2)
        return whole

    def to_theirs(self, whole: torch.Tensor, heads: int) -> list[torch.Tensor]:
        """retro's tensors, concatenated -> the family's."""
        if self.layout == "per_head":
            whole = whole.unflatten(0, (3, heads, -1)).transpose(0, 1).flatten(0, 2)
        parts = whole.chunk(len(self.theirs))
        return [(_t(t) if self.layout == "conv1d" else t).contiguous() for t in parts]


def name_table(family: str, cfg: ModelConfig, prefix: str) -> list[Tensor]:
    """Every decoder tensor of the family, for a model of `cfg`; `prefix`: what the folder's names begin with."""
    T, p = Tensor, prefix
    table: list[Tensor] = []
    if family == "gpt2":
        table += [T(["embed.weight"], [f"{p}wte.weight"]), T(["pos_embed.weight"], [f"{p}wpe.weight"]),
                  T(["norm.weight"], [f"{p}ln_f.weight"]), T(["norm.bias"], [f"{p}ln_f.bias"])]
        for i in range(cfg.layers):
            h, o = f"{p}h.{i}.", f"layers.{i}."
            for w in ("weight", "bias"):
                table += [T([f"{o}norm_attn.{w}"], [f"{h}ln_1.{w}"]), T([f"{o}norm_mlp.{w}"], [f"{h}ln_2.{w}"])]
            for w in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                table.append(T([f"{o}attn.q_proj.{w}", f"{o}attn.kv_proj.{w}"], [f"{h}attn.c_attn.{w}"], "conv1d"))
            for w in ("weight", "bias") if cfg.out_bias else ("weight",):
                table.append(T([f"{o}attn.out_proj.{w}"], [f"{h}attn.c_proj.{w}"], "conv1d"))
            for w in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                table += [T([f"{o}mlp.up.{w}"], [f"{h}mlp.c_fc.{w}"], "conv1d"),
                          T([f"{o}mlp.down.{w}"], [f"{h}mlp.c_proj.{w}"], "conv1d")]
    elif family == "gpt_neox":
        table += [T(["embed.weight"], [f"{p}embed_in.weight"])]
        for w in ("weight", "bias"):
            table.append(T([f"norm.{w}"], [f"{p}final_layer_norm.{w}"]))
        for i in range(cfg.layers):
            h, o = f"{p}layers.{i}.", f"layers.{i}."
            biased = ["weight", "bias"]
            for w in biased:
                table += [T([f"{o}norm_attn.{w}"], [f"{h}input_layernorm.{w}"]),
                          T([f"{o}norm_mlp.{w}"], [f"{h}post_attention_layernorm.{w}"])]
            for w in biased if cfg.mlp_bias else ["weight"]:
                table += [T([f"{o}mlp.up.{w}"], [f"{h}mlp.dense_h_to_4h.{w}"]),
                          T([f"{o}mlp.down.{w}"], [f"{h}mlp.dense_4h_to_h.{w}"])]
            for w in biased if cfg.qkv_bias else ["weight"]:
                table.append(T([f"{o}attn.q_proj.{w}", f"{o}attn.kv_proj.{w}"],
                               [f"{h}attention.query_key_value.{w}"], "per_head"))
            for w in biased if cfg.out_bias else ["weight"]:
                table.append(T([f"{o}attn.out_proj.{w}"], [f"{h}attention.dense.{w}"]))
    else:  # the Llama layout: Llama, Mistral, Qwen2, Qwen3; StableLM's norms have biases
        norm = ("weight", "bias") if family == "stablelm" else ("weight",)
        table += [T(["embed.weight"], [f"{p}embed_tokens.weight"])]
        table += [T([f"norm.{w}"], [f"{p}norm.{w}"]) for w in norm]
        for i in range(cfg.layers):
            h, o = f"{p}layers.{i}.", f"layers.{i}."
            for w in norm:
                table += [T([f"{o}norm_attn.{w}"], [f"{h}input_layernorm.{w}"]),
                          T([f"{o}norm_mlp.{w}"], [f"{h}post_attention_layernorm.{w}"])]
            table += [T([f"{o}attn.q_proj.weight"], [f"{h}self_attn.q_proj.weight"]),
                      T([f"{o}attn.kv_proj.weight"], [f"{h}self_attn.k_proj.weight", f"{h}self_attn.v_proj.weight"]),
                      T([f"{o}attn.out_proj.weight"], [f"{h}self_attn.o_proj.weight"]),
                      T([f"{o}mlp.up.weight"], [f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight"]),
                      T([f"{o}mlp.down.weight"], [f"{h}mlp.down_proj.weight"])]
            if cfg.qkv_bias:
                table += [T([f"{o}attn.q_proj.bias"], [f"{h}self_attn.q_proj.bias"]),
                          T([f"{o}attn.kv_proj.bias"], [f"{h}self_attn.k_proj.bias", f"{h}self_attn.v_proj.bias"])]
            if cfg.out_bias:
                table.append(T([f"{o}attn.out_proj.bias"], [f"{h}self_attn.o_proj.bias"]))
            if cfg.mlp_bias:
                table += [T([f"{o}mlp.up.bias"], [f"{h}mlp.gate_proj.bias", f"{h}mlp.up_proj.bias"]),
                          T([f"{o}mlp.down.bias"], [f"{h}mlp.down_proj.bias"])]
            if cfg.qk_norm:
                table += [T([f"{o}attn.q_norm.weight"], [f"{h}self_attn.q_norm.weight"]),
                          T([f"{o}attn.k_norm.weight"], [f"{h}self_attn.k_norm.weight"])]
    if not cfg.tie_embeddings:
        table.append(T(["lm_head.weight"], ["embed_out.weight" if family == "gpt_neox" else "lm_head.weight"]))
    return table


def _t(t: torch.Tensor) -> torch.Tensor:
    """A Conv1D weight (in, out) as a Linear's (out, in); a bias as it is."""
    return t.T if t.dim() == 2 else t


def _prefix(family: str, names: set[str]) -> str:
    """What the folder's decoder names begin with: GPT-2 folders come with and without `transformer.`."""
    if family == "gpt2":
        return "transformer." if "transformer.wte.weight" in names else ""
    return "gpt_neox." if family == "gpt_neox" else "model."


# ---------------------------------------------------------------------------------------------- import

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _layout(file: Path) -> dict[str, tuple[int, torch.dtype, list[int]]]:
    """Tensor name -> (where its bytes begin in the file, dtype, shape), from the safetensors header: an 8-byte
    little-endian length, then that many bytes of JSON, whose data_offsets count from its end."""
    with open(file, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    unknown = {h["dtype"] for name, h in header.items() if name != "__metadata__"} - set(SAFETENSORS_DTYPES)
    if unknown:
        raise UserError(f"{file} holds tensors of dtype {', '.join(sorted(unknown))}, which retro does not import")
    return {name: (8 + size + h["data_offsets"][0], SAFETENSORS_DTYPES[h["dtype"]], h["shape"])
            for name, h in header.items() if name != "__metadata__"}


def _read_rows(found: list[tuple[Path, int, torch.dtype, list[int]]]) -> torch.Tensor:
    """The tensors `found` ((file, start, dtype, shape), `_layout`'s) concatenated along their first dimension,
    each read by plain reads straight into its rows. Not through safetensors: it maps a file whole and keeps the
    mapping for as long as any tensor taken from it lives (the model's), so the pages of a tensor that load only
    copies would stay resident beside the copy (1.46x a bf16 Llama's weights, benchmarks/bench_import.py)."""
    dtypes, rows = {f[2] for f in found}, {tuple(f[3][1:]) for f in found}
    if len(dtypes) > 1 or len(rows) > 1:
        raise UserError(f"{found[0][0].parent}: tensors of dtypes {sorted(map(str, dtypes))} and shapes "
                        f"{[tuple(f[3]) for f in found]} that retro concatenates: the weights are not this family's")
    whole = torch.empty((sum(f[3][0] for f in found), *rows.pop()), dtype=dtypes.pop())
    buf, at = memoryview(whole.view(-1).view(torch.uint8).numpy()), 0  # bf16 has no numpy dtype; bytes do
    for file, start, _, shape in found:
        end = at + math.prod(shape) * whole.element_size()
        with open(file, "rb", buffering=0) as f:
            f.seek(start)
            while at < end:  # one read returns at most ~2 GiB
                n = f.readinto(buf[at:end])
                if not n:
                    raise OSError(f"{file} ends inside a tensor")
                at += n
    return whole


def load(path: Path, cfg: ModelConfig, chunk_length: int, pad_id: int,
         dtype: torch.dtype | None = None) -> tuple[RetroModel, HFFolder]:
    """The Retro of `cfg` (model_config's) with the folder's decoder weights, tensor by tensor, in their own
    dtype (or `dtype`); with the folder's retro.safetensors, if `retro export` wrote one, its encoder and CCA;
    else those made new, their output zeroed (the imported model's logits, exactly, until trained)."""
    from safetensors import safe_open

    folder = open_folder(path)
    with torch.device("meta"):
        model = RetroModel(cfg, chunk_length, pad_id)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    handles: dict[Path, Any] = {}
    layouts: dict[Path, dict[str, tuple[int, torch.dtype, list[int]]]] = {}
    try:
        def locate(name: str) -> tuple[Path, int, torch.dtype, list[int]]:
            file = folder.files.get(name)
            if file is None:
                raise UserError(f"{path} has no tensor {name}, which a {folder.family} model of its {CONFIG} holds: "
                                f"the weights do not belong to this config")
            if file not in layouts:
                layouts[file] = _layout(file)
            return (file, *layouts[file][name])

        for entry in name_table(folder.family, cfg, _prefix(folder.family, set(folder.files))):
            found = [locate(n) for n in entry.theirs]
            file, _, stored, _ = found[0]
            if len(found) == 1 and not entry.layout and dtype in (None, stored):
                # kept as the file holds it: a view of safetensors' mapping, no copy
                if file not in handles:
                    handles[file] = safe_open(str(file), "pt").__enter__()
                whole = handles[file].get_tensor(entry.theirs[0])
            else:  # copied anyway (concatenated, reordered, converted): read into memory of its own
                whole = entry.to_ours(_read_rows(found), cfg.heads)
                whole = whole if dtype is None else whole.to(dtype)
            sizes = [shapes[n][0] for n in entry.ours]
            if whole.shape[0] != sum(sizes) or any(whole.shape[1:] != shapes[n][1:] for n in entry.ours):
                expected = " + ".join(str(tuple(shapes[n])) for n in entry.ours)
                raise UserError(f"{path}: {' + '.join(entry.theirs)} has shape {tuple(whole.shape)}, its "
                                f"{CONFIG} gives {expected}: the weights do not belong to this config")
            for name, part in zip(entry.ours, whole.split(sizes) if len(sizes) > 1 else [whole]):
                state[name] = part.contiguous()  # (no copy where it already is)
            del whole
    except (OSError, RuntimeError) as e:  # a shard cut short after its header
        raise UserError(f"reading the weights in {path} failed ({e}): a file may be truncated; download it "
                        f"again") from None
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    decoder = decoder_names(folder.family, cfg)
    retro_state = _retro_weights(folder, {k: v for k, v in shapes.items() if k not in decoder})
    state.update({k: v if dtype is None else v.to(dtype) for k, v in retro_state.items()})
    model.load_state_dict(state, strict=False, assign=True)
    fresh = model.materialize()
    if fresh and not retro_state:
        model.zero_retrieval_output()
    return model.eval(), folder


def _retro_weights(folder: HFFolder, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The encoder and CCA weights (`shapes`: the model's, by name) of a folder `retro export` wrote (empty when
    it has none, or the model has no retrieval layers): all of them or an error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file, wanted = folder.path / RETRO_WEIGHTS, set(shapes)
    if not file.is_file() or not wanted:
        return {}
    try:
        found = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file} is not a readable safetensors file ({e}): export the model again") from None
    missing = sorted(wanted - set(found))
    bad = sorted(k for k in wanted & set(found) if found[k].shape != shapes[k])
    if missing or bad:
        raise UserError(f"{file} does not fit the model's retrieval layers (missing {missing[:4]}, other shapes "
                        f"{bad[:4]}): set [model]'s retro keys as {RETRO_CONFIG} says, or remove them")
    return {k: found[k] for k in wanted}


# ---------------------------------------------------------------------------------------------- export


def family_for(cfg: ModelConfig) -> str:
    """The family whose computation is the decoder's (a model imported from one goes back to it: a Mistral
    without a sliding window computes as, and goes back as, a Llama); a UserError naming what none computes."""
    why = []
    mha = kv_heads(cfg) == cfg.heads and head_dim(cfg) * cfg.heads == cfg.hidden
    if cfg.position == "rope" and cfg.norm == "layernorm" and cfg.mlp in ("gelu", "gelu_tanh") and mha \
            and cfg.qkv_bias == cfg.out_bias and not cfg.qk_norm and not cfg.sliding_window \
            and cfg.rope_scaling == "none":
        return "gpt_neox"  # retro's own default shape
    plain = not (cfg.qk_norm or cfg.sliding_window or cfg.out_bias or cfg.mlp_bias)
    if cfg.position == "rope" and cfg.norm == "layernorm" and cfg.mlp == "swiglu" and plain \
            and head_dim(cfg) * cfg.heads == cfg.hidden:
        return "stablelm"  # LayerNorm, SwiGLU, RoPE on part of each head: NVIDIA's Megatron Retro decoders too
    if cfg.position == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        if cfg.rotary_percent == 1.0:
            if cfg.qk_norm and cfg.qkv_bias == cfg.out_bias and not cfg.sliding_window and not cfg.mlp_bias:
                return "qwen3"
            if cfg.sliding_window and not (cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias or cfg.qk_norm):
                return "mistral"
            if cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias and not cfg.qk_norm and not cfg.sliding_window:
                return "qwen2"
            if cfg.qkv_bias == cfg.out_bias and not cfg.qk_norm and not cfg.sliding_window:
                return "llama"
        why.append("Llama, Mistral and Qwen rotate every head dimension (model.rotary_percent = 1.0)")
    elif cfg.position == "learned" and cfg.norm == "layernorm" and cfg.mlp in ("gelu", "gelu_tanh") \
            and cfg.tie_embeddings and mha:
        return "gpt2"
    raise UserError(
        "this model has no Hugging Face family to export to: Llama and Qwen2 need position 'rope', norm "
        "'rmsnorm', mlp 'swiglu' (rotary_percent 1.0); GPT-NeoX position 'rope', norm 'layernorm', mlp 'gelu' "
        "and as many key/value heads as heads; GPT-2 position 'learned', norm 'layernorm', mlp "
        f"'gelu' or 'gelu_tanh', tied embeddings; this one has position {cfg.position!r}, norm {cfg.norm!r}, mlp "
        f"{cfg.mlp!r}, rotary_percent {cfg.rotary_percent}" + (f" ({'; '.join(why)})" if why else "")
        + ". Train with one of those shapes to export")


def hf_config(family: str, cfg: ModelConfig, eos_id: int, pad_id: int,
              dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json of the exported decoder."""
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "eos_token_id": eos_id,
              "pad_token_id": pad_id, "torch_dtype": str(dtype).removeprefix("torch.")}
    if family == "gpt_neox":
        return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "num_hidden_layers": cfg.layers,
                "hidden_size": cfg.hidden, "num_attention_heads": cfg.heads, "intermediate_size": ffn_width(cfg),
                "hidden_act": "gelu" if cfg.mlp == "gelu" else "gelu_new", "layer_norm_eps": cfg.norm_eps,
                "max_position_embeddings": cfg.seq_length, "use_parallel_residual": False,
                "attention_bias": cfg.qkv_bias, "rotary_pct": cfg.rotary_percent, "rotary_emb_base": cfg.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                    "partial_rotary_factor": cfg.rotary_percent},
                "hidden_dropout": 0.0, "attention_dropout": 0.0, "bos_token_id": eos_id, **common}
    if family == "stablelm":
        return {"architectures": ["StableLmForCausalLM"], "model_type": "stablelm", "num_hidden_layers": cfg.layers,
                "hidden_size": cfg.hidden, "num_attention_heads": cfg.heads, "num_key_value_heads": kv_heads(cfg),
                "intermediate_size": ffn_width(cfg), "hidden_act": "silu", "layer_norm_eps": cfg.norm_eps,
                "max_position_embeddings": cfg.seq_length, "partial_rotary_factor": cfg.rotary_percent,
                "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                                                  "partial_rotary_factor": cfg.rotary_percent},
                "use_qkv_bias": cfg.qkv_bias, "qk_layernorm": False, "use_parallel_residual": False,
                "hidden_dropout": 0.0, "attention_dropout": 0.0, "bos_token_id": eos_id, **common}
    if family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": cfg.layers,
                "n_embd": cfg.hidden, "n_head": cfg.heads, "n_inner": ffn_width(cfg),
                "n_positions": cfg.max_positions or cfg.seq_length, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu", "bos_token_id": eos_id,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **common}
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}[family]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        rope = {**rope, "rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        rope = {**rope, "rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_length}
    out = {"architectures": [arch], "model_type": family, "num_hidden_layers": cfg.layers,
           "hidden_size": cfg.hidden, "num_attention_heads": cfg.heads, "num_key_value_heads": kv_heads(cfg),
           "head_dim": head_dim(cfg), "intermediate_size": ffn_width(cfg), "hidden_act": "silu",
           "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": max(cfg.seq_length, cfg.rope_original_length
                                                                        if cfg.rope_scaling == "llama3" else 0),
           "rope_parameters": rope, "rope_theta": cfg.rope_theta,
           "rope_scaling": None if rope["rope_type"] == "default" else rope, "attention_dropout": 0.0,
           "bos_token_id": eos_id, **common}
    if family == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if family == "qwen3":
        out.update(attention_bias=cfg.qkv_bias)
    if family in ("mistral", "qwen2", "qwen3"):
        out.update(sliding_window=cfg.sliding_window or None, use_sliding_window=bool(cfg.sliding_window))
    return out


def exported_tensors(model: RetroModel, family: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the family, from the model's decoder (the inverse of `load`'s mapping)."""
    prefix = {"gpt2": "transformer.", "gpt_neox": "gpt_neox."}.get(family, "model.")
    state = model.state_dict()

    def get(name: str) -> torch.Tensor:  # a bias the family always has and the model has not: zeros
        if name in state or not name.endswith(".bias"):
            return state[name]
        weight = state[name.removesuffix("bias") + "weight"]
        return weight.new_zeros(weight.shape[0])

    for entry in name_table(family, dataclasses.replace(model.cfg, **ALWAYS_BIASED.get(family, {})), prefix):
        whole = torch.cat([get(n) for n in entry.ours]) if len(entry.ours) > 1 else get(entry.ours[0])
        yield from zip(entry.theirs, entry.to_theirs(whole, model.cfg.heads))


def decoder_names(family: str, cfg: ModelConfig) -> set[str]:
    """retro's state-dict names that the family's folder holds (the rest: encoder and CCA)."""
    return {n for e in name_table(family, cfg, "") for n in e.ours}


def export(model: RetroModel, out: Path, family: str, eos_id: int, pad_id: int, chunk_length: int,
           tokenizer_files: list[Path], card: str, retro_extra: dict[str, Any]) -> list[str]:
    """Write the model as a Hugging Face folder `out` (config.json, model.safetensors, the tokenizer files,
    README.md, and retro.safetensors + retro_config.json for the encoder and CCA): written into a temporary
    folder beside `out`, then renamed into place. Returns the names of the files written."""
    import os

    from safetensors.torch import save_file

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        decoder = dict(exported_tensors(model, family))
        save_file(decoder, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = hf_config(family, model.cfg, eos_id, pad_id, next(model.parameters()).dtype)
        write_text_atomic(tmp / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_text_atomic(tmp / "generation_config.json", json.dumps(
            {"eos_token_id": eos_id, "pad_token_id": pad_id, "bos_token_id": eos_id}, indent=2) + "\n")
        decoder_state = decoder_names(family, model.cfg)
        retro = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in decoder_state}
        if retro:
            save_file(retro, str(tmp / RETRO_WEIGHTS), metadata={"format": "pt"})
        write_text_atomic(tmp / RETRO_CONFIG, json.dumps(
            {"model": dataclasses.asdict(model.cfg), "chunk_length": chunk_length, "pad_id": pad_id, "family": family,
             **retro_extra}, indent=2, sort_keys=True) + "\n")
        for f in tokenizer_files:
            shutil.copy2(f, tmp / f.name)
        write_text_atomic(tmp / "README.md", card)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(p.name for p in out.iterdir())

