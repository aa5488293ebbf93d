"""Peak memory of `retro import megatron` against the size of one shard and of the whole model.

A synthetic legacy Megatron Retro checkpoint (random bf16 weights, NVIDIA's names and tensor-parallel layout) is
written rank by rank, then imported in a fresh process whose peak RSS is read from getrusage. The import keeps the
shards memory-mapped and streams each converted tensor into model.safetensors, so its peak should be a small
multiple of the largest tensor, not of the model.

    python benchmarks/bench_megatron_import.py [--layers 12 --hidden 1024 --tp 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from retrocli.model.retro import megatron_retro_layers


def legacy_shard(layers: int, h: int, heads: int, ffn: int, vocab: int, tp: int, rank: int) -> dict:
    """Rank `rank`'s tensors of a Retro with Megatron's names and per-rank shapes (random bf16)."""
    g = torch.Generator().manual_seed(rank)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def layer(prefix: str, cross: bool) -> dict:
        t = {f"{prefix}input_norm.weight": w(h), f"{prefix}input_norm.bias": w(h),
             f"{prefix}self_attention.query_key_value.weight": w(3 * h // tp, h),
             f"{prefix}self_attention.dense.weight": w(h, h // tp),
             f"{prefix}post_attention_norm.weight": w(h), f"{prefix}post_attention_norm.bias": w(h),
             f"{prefix}mlp.dense_h_to_4h.weight": w(2 * ffn // tp, h),
             f"{prefix}mlp.dense_4h_to_h.weight": w(h, ffn // tp)}
        if cross:
            t.update({f"{prefix}inter_attention.query.weight": w(h // tp, h),
                      f"{prefix}inter_attention.key_value.weight": w(2 * h // tp, h),
                      f"{prefix}inter_attention.dense.weight": w(h, h // tp),
                      f"{prefix}post_inter_attention_norm.weight": w(h),
                      f"{prefix}post_inter_attention_norm.bias": w(h)})
        return t

    retro = megatron_retro_layers(layers)
    encoder = {"final_norm.weight": w(h), "final_norm.bias": w(h)}
    for i in range(layers):
        encoder.update(layer(f"layers.{i}.", i + 1 in retro))
    for j in range(2):
        encoder.update(layer(f"layers.{retro[0] - 1}.retriever.layers.{j}.", j == 0))
    return {"embedding": {"word_embeddings": {"weight": w(vocab // tp, h)}}, "encoder": encoder,
            "output_layer": {"weight": w(vocab // tp, h)}}


def write(folder: Path, a: argparse.Namespace) -> int:
    (folder / "release").mkdir(parents=True)
    (folder / "latest_checkpointed_iteration.txt").write_text("release")
    args = argparse.Namespace(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads,
                              ffn_hidden_size=a.ffn, seq_length=4096, padded_vocab_size=a.vocab, rotary_percent=0.5,
                              norm_epsilon=1e-5, apply_layernorm_1p=True, swiglu=True, add_bias_linear=False,
                              untie_embeddings_and_output_weights=True, tensor_model_parallel_size=a.tp,
                              retro_encoder_layers=2, retro_num_neighbors=2, retro_num_retrieved_chunks=2,
                              retro_attention_gate=0.0)
    for rank in range(a.tp):
        path = folder / "release" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
        path.parent.mkdir()
        lm = legacy_shard(a.layers, a.hidden, a.heads, a.ffn, a.vocab, a.tp, rank)
        torch.save({"args": args, "iteration": 0, "checkpoint_version": 3.0, "model": {"language_model": lm}}, path)
        del lm
    from retrocli.data.tokenizer import train_sentencepiece

    text = " ".join(f"retrieval {w} chunk neighbour {i}" for i, w in enumerate("abcdefghijklmnopqrstuvwxyz" * 40))
    train_sentencepiece([text], folder / "tokenizer.model", vocab_size=300, max_bytes=10**6)
    return sum(p.stat().st_size for p in (folder / "release").rglob("*.pt"))


def measure(src: Path, out: Path) -> dict:
    """The import in a fresh process: its peak RSS and its RSS before importing anything of retro's."""
    code = f"""
import resource, threading, time
from pathlib import Path
import torch
from retrocli.train.megatron import import_checkpoint

def anon():  # allocated memory (not pages mapped from files), from the kernel's accounting
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

base, base_anon, peak_anon, done = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, anon(), [0], []

def sample():
    while not done:
        peak_anon[0] = max(peak_anon[0], anon())
        time.sleep(0.005)

threading.Thread(target=sample, daemon=True).start()
t = time.time()
import_checkpoint(Path({str(src)!r}), Path({str(out)!r}), 64)
done.append(1)
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, base_anon, peak_anon[0], time.time() - t)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, peak, base_anon, peak_anon, seconds = proc.stdout.split()[-5:]
    return {"rss_before": int(base), "rss_peak": int(peak), "anon_before": int(base_anon),
            "anon_peak": int(peak_anon), "seconds": float(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--json", type=Path)
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        total = write(Path(tmp) / "src", a)
        written = time.time() - started
        r = measure(Path(tmp) / "src", Path(tmp) / "ws")
        out = next((Path(tmp) / "ws" / "checkpoints" / "imported").glob("step-*")) / "model.safetensors"
        result = {"layers": a.layers, "hidden": a.hidden, "ffn": a.ffn, "vocab": a.vocab, "tp": a.tp,
                  "checkpoint_bytes": total, "shard_bytes": total // a.tp,
                  "largest_tensor_bytes": a.vocab * a.hidden * 2,
                  "output_bytes": out.stat().st_size, "write_seconds": round(written, 1), **r}
    grew = result["rss_peak"] - result["rss_before"]
    mb = 1e6
    print(f"synthetic Retro: {a.layers} layers, hidden {a.hidden}, ffn {a.ffn}, vocabulary {a.vocab}, TP {a.tp}, "
          f"bf16: checkpoint {total / mb:,.0f} MB ({total // a.tp / mb:,.0f} MB a shard), largest tensor "
          f"{result['largest_tensor_bytes'] / mb:,.0f} MB")
    print(f"import: {r['seconds']:.1f} s; peak RSS {r['rss_peak'] / mb:,.0f} MB, {grew / mb:,.0f} MB above the "
          f"{r['rss_before'] / mb:,.0f} MB before it = {grew / (total / a.tp):.2f} x a shard, {grew / total:.2f} x the "
          f"model (mapped shard pages included); allocated memory (RssAnon, sampled every 5 ms) peaked "
          f"{(r['anon_peak'] - r['anon_before']) / mb:,.0f} MB above its start = "
          f"{(r['anon_peak'] - r['anon_before']) / result['largest_tensor_bytes']:.1f} x the largest tensor")
    if a.json:
        a.json.write_text(json.dumps({**result, "peak_over_shard": grew / (total / a.tp),
                                      "peak_over_model": grew / total}, indent=2) + "\n")



if __name__ == "__main__":
    main()
