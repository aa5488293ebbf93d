"""NVIDIA's legacy Megatron-LM Retro checkpoints: tiny ones written here in the exact legacy layout (tensor
parallelism 1, 2 and 4), imported by `retro import megatron`, and checked against a forward pass written in this
file from Megatron's own code (the `InstructRetro` tag of NVIDIA/Megatron-LM); bad files refused."""

from __future__ import annotations

import argparse
import enum
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from retrocli.data.tokenizer import train_sentencepiece
from retrocli.model.retro import RetroModel
from retrocli.train import checkpoint

from .test_cli import retro, snapshot

L, H, HEADS, FFN, V, M, K = 9, 32, 4, 48, 384, 4, 2  # Retro layers 6 and 9 (Megatron's rule); chunks of 4
HD, R, RETRO_LAYERS, ENC = H // HEADS, 2 * M, [6, 9], 2


def megatron_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a tiny Retro, whole (tensor parallelism 1), under its legacy name."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    def layer(prefix: str, cross: bool) -> dict[str, torch.Tensor]:
        t = {f"{prefix}input_norm.weight": w(H) * 0.3, f"{prefix}input_norm.bias": w(H),  # LayerNorm-1p: gamma = w+1
             f"{prefix}self_attention.query_key_value.weight": w(3 * H, H),  # rows (heads, 3, hd)
             f"{prefix}self_attention.dense.weight": w(H, H),
             f"{prefix}post_attention_norm.weight": w(H) * 0.3, f"{prefix}post_attention_norm.bias": w(H),
             f"{prefix}mlp.dense_h_to_4h.weight": w(2 * FFN, H), f"{prefix}mlp.dense_4h_to_h.weight": w(H, FFN)}
        if cross:
            t.update({f"{prefix}inter_attention.query.weight": w(H, H),
                      f"{prefix}inter_attention.key_value.weight": w(2 * H, H),  # rows (heads, 2, hd)
                      f"{prefix}inter_attention.dense.weight": w(H, H),
                      f"{prefix}post_inter_attention_norm.weight": w(H) * 0.3,
                      f"{prefix}post_inter_attention_norm.bias": w(H)})
        return t

    tensors = {"embedding.word_embeddings.weight": w(V, H), "output_layer.weight": w(V, H),
               "encoder.final_norm.weight": w(H) * 0.3, "encoder.final_norm.bias": w(H)}
    for i in range(L):
        tensors.update(layer(f"encoder.layers.{i}.", i + 1 in RETRO_LAYERS))
    for j in range(ENC):
        tensors.update(layer(f"encoder.layers.{RETRO_LAYERS[0] - 1}.retriever.layers.{j}.", j == 0))
    return tensors


def shard(name: str, t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of a whole tensor, as Megatron's parallel layers hold it (megatron/core/tensor_parallel)."""
    if name.endswith(("norm.weight", "norm.bias")):
        return t.clone()
    if name.endswith(("self_attention.dense.weight", "inter_attention.dense.weight", "dense_4h_to_h.weight")):
        return t.chunk(tp, dim=1)[rank].clone()  # RowParallelLinear
    if name.endswith("dense_h_to_4h.weight"):  # each rank: its gate rows, then its up rows (swiglu on the shard)
        gate, up = t.chunk(2)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    return t.chunk(tp)[rank].clone()  # ColumnParallelLinear / VocabParallelEmbedding: by rows (whole heads)


class ModelType(enum.Enum):  # pickled by reference as megatron.core.enums.ModelType, as Megatron's args hold it
    encoder_or_decoder = 1
    retro_decoder = 4


def write_legacy(folder: Path, tensors: dict[str, torch.Tensor], tp: int, gate: float = 1.0, **args) -> Path:
    """The legacy layout: latest_checkpointed_iteration.txt, release/mp_rank_XX/model_optim_rng.pt, and the
    SentencePiece model beside them."""
    folder.mkdir(parents=True)
    (folder / "latest_checkpointed_iteration.txt").write_text("release")
    namespace = argparse.Namespace(
        num_layers=L, hidden_size=H, num_attention_heads=HEADS, ffn_hidden_size=FFN, seq_length=64,
        max_position_embeddings=64, padded_vocab_size=V, rotary_percent=0.5, position_embedding_type="rope",
        use_rotary_position_embeddings=True, normalization="LayerNorm", norm_epsilon=1e-5, apply_layernorm_1p=True,
        swiglu=True, add_bias_linear=False, untie_embeddings_and_output_weights=True, group_query_attention=False,
        tensor_model_parallel_size=tp, params_dtype=torch.float32, model_type=ModelType.retro_decoder,
        retro_add_retriever=True, retro_encoder_layers=ENC, retro_num_neighbors=K, retro_num_retrieved_chunks=2,
        retro_attention_gate=gate)
    for key, value in args.items():
        setattr(namespace, key, value)
    module = types.ModuleType("megatron.core.enums")
    module.ModelType = ModelType
    ModelType.__module__, ModelType.__qualname__ = "megatron.core.enums", "ModelType"
    stand_ins = {"megatron": types.ModuleType("megatron"), "megatron.core": types.ModuleType("megatron.core"),
                 "megatron.core.enums": module}
    sys.modules.update(stand_ins)  # only while pickling: retro never imports it
    try:
        for rank in range(tp):
            encoder = {k.removeprefix("encoder."): shard(k, t, tp, rank) for k, t in tensors.items()
                       if k.startswith("encoder.")}
            embedding = shard("embed", tensors["embedding.word_embeddings.weight"], tp, rank)
            lm = {"embedding": {"word_embeddings": {"weight": embedding}},
                  "encoder": encoder,
                  "output_layer": {"weight": shard("output", tensors["output_layer.weight"], tp, rank)}}
            path = folder / "release" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
            path.parent.mkdir(parents=True)
            torch.save({"args": namespace, "checkpoint_version": 3.0, "iteration": 0, "model": {"language_model": lm}},
                       path)
    finally:
        for name in stand_ins:
            del sys.modules[name]
    tokenizer = folder / "tokenizer.model"
    text = " ".join(f"retrieval {w} chunk neighbour {i}" for i, w in enumerate("abcdefghijklmnopqrstuvwxyz" * 40))
    train_sentencepiece([text], tokenizer, vocab_size=300, max_bytes=10**6)
    return folder


# ------------------------------------------------------------------------------------ Megatron's forward


def megatron_forward(t: dict[str, torch.Tensor], tokens: torch.Tensor, neighbours: torch.Tensor,
                     gate: float) -> torch.Tensor:
    """Logits as legacy Megatron computes them, written from megatron/model/transformer.py of the InstructRetro tag
    (T) in its own [sequence, batch, hidden] layout: tokens (b, ns), ns a multiple of M; neighbours (b, l, k, r)."""
    b, ns = tokens.shape
    l = ns // M

    def ln(x, prefix):  # LayerNorm-1p: gamma = weight + 1 (megatron/model/fused_layer_norm.py:79), eps 1e-5
        return F.layer_norm(x, (H,), t[f"{prefix}.weight"] + 1, t[f"{prefix}.bias"], 1e-5)

    def rope(x):  # rotate-half on the first hd * 0.5 channels, positions from 0 (rotary_pos_embedding.py:41-167)
        rot = int(HD * 0.5)
        inv = 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)
        freqs = torch.outer(torch.arange(x.shape[0]).float(), inv)
        emb = torch.cat([freqs, freqs], -1)[:, None, None]  # (s, 1, 1, rot)
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        x1, x2 = x_rot.chunk(2, -1)
        return torch.cat([x_rot * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin(), x_pass], -1)

    def attend(q, k, v, causal):  # CoreAttention (T:298-420): softmax(q k^T / sqrt(hd)) v; q (s, B, heads, hd)
        scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(HD)
        if causal:
            scores = scores.masked_fill(torch.ones(q.shape[0], k.shape[0]).triu(1).bool(), float("-inf"))
        return torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v).flatten(2)

    def self_attention(x, prefix, causal, rotary):  # ParallelAttention (T:552-560, 661-696): per head [q, k, v]
        qkv = (x @ t[f"{prefix}.query_key_value.weight"].T).unflatten(-1, (HEADS, 3 * HD))
        q, k, v = qkv.split(HD, dim=-1)
        if rotary:
            q, k = rope(q), rope(k)
        return attend(q, k, v, causal) @ t[f"{prefix}.dense.weight"].T

    def cross_attention(x, kv_in, prefix):  # cross_attn (T:697-709): query, then per head [k, v]; no RoPE, no mask
        q = (x @ t[f"{prefix}.query.weight"].T).unflatten(-1, (HEADS, HD))
        k, v = (kv_in @ t[f"{prefix}.key_value.weight"].T).unflatten(-1, (HEADS, 2 * HD)).split(HD, dim=-1)
        return attend(q, k, v, False) @ t[f"{prefix}.dense.weight"].T

    def mlp(x, prefix):  # swiglu (T:95-122): silu(first half) * second half
        gate_, up = (x @ t[f"{prefix}.dense_h_to_4h.weight"].T).chunk(2, -1)
        return (F.silu(gate_) * up) @ t[f"{prefix}.dense_4h_to_h.weight"].T

    emb = t["embedding.word_embeddings.weight"]
    x = emb[tokens].transpose(0, 1)  # (ns, b, h); no position embedding (rope)
    encoded = None
    for i in range(L):
        p = f"encoder.layers.{i}"
        a = x + self_attention(ln(x, f"{p}.input_norm"), f"{p}.self_attention", True, True)  # T:1159-1200
        n1 = ln(a, f"{p}.post_attention_norm")  # T:1203
        if i + 1 not in RETRO_LAYERS:
            x = a + mlp(n1, f"{p}.mlp")  # T:1205-1207, 1239-1250
            continue
        if encoded is None:  # the retriever, in the first Retro layer (T:1036-1088)
            context = n1.reshape(l, M, b, H).permute(1, 2, 0, 3).reshape(M, b * l, H)  # ns % m == 0: plain chunks
            h = emb[neighbours.reshape(b * l * K, R)].transpose(0, 1)  # (r, b*l*k, h), the decoder's embedding
            for j in range(ENC):
                q = f"{p}.retriever.layers.{j}"
                h1 = h + self_attention(ln(h, f"{q}.input_norm"), f"{q}.self_attention", False, False)
                n = ln(h1, f"{q}.post_attention_norm")
                if j == 0:  # retro_encoder_cross_attention (T:969-1034): each neighbour reads its chunk's m states
                    n = n.reshape(R, b * l, K, H)
                    h2 = h1.reshape(R, b * l, K, H).clone()
                    for kk in range(K):
                        h2[:, :, kk] += cross_attention(n[:, :, kk], context, f"{q}.inter_attention")
                    h2 = h2.reshape(R, b * l * K, H)
                    h = h2 + mlp(ln(h2, f"{q}.post_inter_attention_norm"), f"{q}.mlp")
                else:
                    h = h1 + mlp(n, f"{q}.mlp")
            # no final norm (post_process=False, T:1591); keys of chunk j: its k neighbours' r tokens
            encoded = h.reshape(R, b * l, K, H).permute(0, 2, 1, 3).reshape(R * K, b * l, H)
        pad = (ns - 1) % M  # retro_decoder_cross_attention (T:1090-1135)
        q = F.pad(n1[pad:], (0, 0, 0, 0, 0, M - 1)).reshape(l, M, b, H).permute(1, 2, 0, 3).reshape(M, b * l, H)
        c = cross_attention(q, encoded, f"{p}.inter_attention")
        c = c.reshape(M, b, l, H).permute(2, 0, 1, 3).reshape(l * M, b, H)
        c = F.pad(c, (0, 0, 0, 0, pad, 0))[:ns]
        bb = gate * c + a  # T:1132
        x = bb + mlp(ln(bb, f"{p}.post_inter_attention_norm"), f"{p}.mlp")  # T:1135, 1239-1250
    x = ln(x, "encoder.final_norm")
    return (x @ t["output_layer.weight"].T).transpose(0, 1)  # (b, ns, V)


def imported_model(step: Path) -> RetroModel:
    meta = checkpoint.read_meta(step)
    model = RetroModel(checkpoint.model_config_of(meta), meta["chunk_length"], meta["pad_id"])
    model.load_state_dict(checkpoint.load_weights(step))
    return model.eval()


def import_into(src: Path, out: Path) -> Path:
    proc = retro("import", "megatron", str(src), "--out", str(out), "--chunk-length", str(M))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out / "checkpoints" / "imported" / "step-000000"


@pytest.mark.parametrize("gate", [1.0, 0.0])
def test_imported_logits_equal_megatrons_forward(gate: float, tmp_path: Path) -> None:
    tensors = megatron_tensors()
    step = import_into(write_legacy(tmp_path / "src", tensors, tp=2, gate=gate), tmp_path / "ws")
    model = imported_model(step)
    cfg = model.cfg
    assert (cfg.layers, cfg.hidden, cfg.ffn_hidden, cfg.retro_layers, cfg.retro_gate) == (L, H, FFN, RETRO_LAYERS, gate)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, 300, (2, 5 * M), generator=g)
    neighbours = torch.randint(4, 300, (2, 5, K, R), generator=g)  # no padding (Megatron attends eod padding)
    with torch.no_grad():
        expected = megatron_forward(tensors, tokens, neighbours, gate)
        ours = model(tokens, neighbours)
    assert (ours - expected).abs().max() <= 1e-4
    if gate:  # retrieval changes the logits from the last token of the first chunk on
        with torch.no_grad():
            off = megatron_forward(tensors, tokens, neighbours, 0.0)
        assert (off[:, M - 1 :] - expected[:, M - 1 :]).abs().max() > 1e-3
    toml = (tmp_path / "ws" / "retro.toml").read_text()
    assert 'path = "tokenizer.model"' in toml and "encoder_context = \"cca_query\"" in toml


def test_every_tensor_parallel_size_imports_the_same_weights(tmp_path: Path) -> None:
    tensors = megatron_tensors(seed=3)
    weights = []
    for tp in (1, 2, 4):
        step = import_into(write_legacy(tmp_path / f"tp{tp}", tensors, tp=tp), tmp_path / f"ws{tp}")
        weights.append(checkpoint.load_weights(step))
        meta = json.loads((step / "meta.json").read_text())
        assert meta["megatron"]["tensor_parallel"] == tp and not (step / checkpoint.TRAINER).exists()
    for other in weights[1:]:
        assert other.keys() == weights[0].keys()
        assert all(torch.equal(other[k], weights[0][k]) for k in other)


def expect_refused(args: list[str], *words: str, untouched: Path | None = None) -> None:
    before = snapshot(untouched) if untouched is not None else None
    proc = retro(*args)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in text and all(w in text for w in words), text
    if untouched is not None:
        assert snapshot(untouched) == before


def test_bad_checkpoints_are_refused_naming_the_file(tmp_path: Path) -> None:
    tensors = megatron_tensors()
    src = write_legacy(tmp_path / "src", tensors, tp=2)
    # a pickle that would run a command when loaded
    marker = tmp_path / "ran"
    bad = tmp_path / "malicious"
    write_legacy(bad, tensors, tp=1)

    class Evil:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    torch.save({"args": argparse.Namespace(), "model": {}, "evil": Evil()},
               bad / "release" / "mp_rank_00" / "model_optim_rng.pt")
    expect_refused(["import", "megatron", str(bad), "--out", str(tmp_path / "o1")], "model_optim_rng.pt", "system")
    assert not marker.exists() and not (tmp_path / "o1" / "retro.toml").exists()
    # a missing shard
    missing = tmp_path / "missing"
    write_legacy(missing, tensors, tp=2)
    (missing / "release" / "mp_rank_01" / "model_optim_rng.pt").unlink()
    expect_refused(["import", "megatron", str(missing), "--out", str(tmp_path / "o2")], "mp_rank_01", "missing")
    # shards of different checkpoints (other shapes)
    mixed = tmp_path / "mixed"
    write_legacy(mixed, tensors, tp=2)
    other = tmp_path / "other"
    wide = {k: (torch.cat([v, v], 1) if k.endswith("dense_4h_to_h.weight") else v) for k, v in tensors.items()}
    write_legacy(other, wide, tp=2)
    (mixed / "release" / "mp_rank_01" / "model_optim_rng.pt").write_bytes(
        (other / "release" / "mp_rank_01" / "model_optim_rng.pt").read_bytes())
    expect_refused(["import", "megatron", str(mixed), "--out", str(tmp_path / "o3")], "dense_4h_to_h", "shards")
    # args that contradict the tensors
    liar = write_legacy(tmp_path / "liar", tensors, tp=1, ffn_hidden_size=64)
    expect_refused(["import", "megatron", str(liar), "--out", str(tmp_path / "o4")], "ffn_hidden_size 64",
                   "contradict")
    assert not any((tmp_path / f"o{i}" / "retro.toml").exists() for i in range(1, 5))
    # and an import never writes over a workspace
    import_into(src, tmp_path / "ws")
    expect_refused(["import", "megatron", str(src), "--out", str(tmp_path / "ws")], "already exists",
                   untouched=tmp_path / "ws")


def test_the_imported_decoder_exports_to_transformers(tmp_path: Path) -> None:
    """InstructRetro's decoder alone (the gate at 0), handed to transformers: LayerNorm, SwiGLU and RoPE on half of
    each head are StableLM's computation; the Retro layers' extra norm before the MLP is the one it uses."""
    import transformers

    tensors = megatron_tensors(seed=5)
    import_into(write_legacy(tmp_path / "src", tensors, tp=2, gate=0.0), tmp_path / "ws")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"retrieval chunk neighbour {i} " * 20}) + "\n"
                              for i in range(20)))
    sets = ["--set", f"corpus.train=[{json.dumps(str(corpus))}]", "--set", "corpus.valid_fraction=0.1", "--set",
            'db.embedder="lexical"', "--set", 'db.index="Flat"']
    proc = retro("db", "build", "-c", str(tmp_path / "ws" / "retro.toml"), *sets)  # with NVIDIA's own tokenizer
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = retro("export", "-c", str(tmp_path / "ws" / "retro.toml"), "--out", str(tmp_path / "hf"), *sets)
    assert proc.returncode == 0 and "stablelm" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    # every verb takes the imported model: ppl, generate (retro's KV cache), and pretraining that continues from it
    toml = str(tmp_path / "ws" / "retro.toml")
    for args in (["ppl", "--checkpoint", str(tmp_path / "ws" / "checkpoints" / "imported"), "--json"],
                 ["generate", "--prompt", "retrieval chunk", "--set", "generate.max_new_tokens=4", "--set",
                  'generate.precision="fp32"', "--set", 'generate.contexts="database"'],
                 ["pretrain", "--set", "pretrain.train_steps=1", "--set", "pretrain.micro_batch_size=1", "--set",
                  "pretrain.global_batch_size=1", "--set", 'pretrain.precision="fp32"']):
        proc = retro(*args[:1], "-c", toml, *sets, *args[1:])
        assert proc.returncode == 0, (args[0], proc.stdout + proc.stderr)
    assert "initialised from the retro checkpoint" in proc.stdout + proc.stderr
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tokens = torch.randint(4, 300, (2, 5 * M), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = megatron_forward(tensors, tokens, torch.ones(2, 5, K, R, dtype=torch.long), 0.0)
        assert (theirs(tokens).logits - expected).abs().max() <= 1e-4
