"""Peak memory of importing a Hugging Face causal LM into retro (`retrocli.train.hf.load`), against the size of
the model's bf16 weights.

A synthetic Llama (random bf16 weights; by default 24 layers, d 1024, 16 heads, 4 key/value heads, MLP 2816,
vocabulary 32,000, untied LM head: 336M parameters, 672 MB) is written into a temporary folder twice, as one
model.safetensors and as --shards shards listed by model.safetensors.index.json, tensor by tensor in the
safetensors format: the writer never holds more than one tensor, and never an fp32 one.

Each import then runs in a fresh process, so that peaks do not mix, under the allocator setting every `retro`
command makes (retrocli/allocator.py; RETRO_MALLOC=system for glibc's defaults):

    retro-decoder         hf.load in the file's dtype (bf16), retro_layers = [] (the decoder alone)
    retro-decoder-shards  the same from the sharded folder
    retro                 hf.load in bf16 with the default retro layers: the encoder and CCA made new, in fp32
    retro-fp32            hf.load(dtype=torch.float32), what the inference verbs load
    transformers          AutoModelForCausalLM.from_pretrained(dtype=torch.bfloat16), for comparison

Peak: ru_maxrss minus the RSS just before the import (torch, transformers and retrocli already imported).
safetensors maps the files: a tensor that nobody has read yet is not resident, so the peak is taken twice,
when the import returns and after every parameter has been read once (as the first forward pass reads them),
which is the size of the model as it is used. "anon" and "file" split the RSS after reading: memory the
process allocated (copies) and pages of the mapped weight files, which stay counted while mapped. The ideal
is the model's own bytes: its parameters times their element sizes (bf16 decoder, fp32 encoder and CCA).
Target: the bf16 decoder's peak ~1.0x its bf16 weights (docs/benchmarks.md has the numbers).

    python benchmarks/bench_import.py [--layers 24 --hidden 1024 --heads 16 --kv-heads 4 --ffn 2816
        --vocab 32000 --shards 2] [--only retro-decoder,transformers] [--tiny] [--dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# worker -> (folder variant, what it runs)
WORKERS = {"retro-decoder": ("single", "hf.load, bf16, retro_layers = []"),
           "retro-decoder-shards": ("shards", "hf.load, bf16, retro_layers = [], sharded folder"),
           "retro": ("single", "hf.load, bf16, default retro layers (encoder + CCA new, fp32)"),
           "retro-fp32": ("single", "hf.load(dtype=torch.float32), default retro layers"),
           "transformers": ("single", "AutoModelForCausalLM.from_pretrained(dtype=torch.bfloat16)")}
CHUNK_LENGTH, PAD_ID = 64, 0


# ----------------------------------------------------------------------------------------- the model folder


def llama_config(a):
    import transformers

    return transformers.LlamaConfig(
        hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads, intermediate_size=a.ffn, vocab_size=a.vocab, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"], dtype="bfloat16")


def llama_tensors(c) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a LlamaForCausalLM of config `c`, in the model's own order."""
    d, f = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    out = [("model.embed_tokens.weight", (c.vocab_size, d))]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, d)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f)), (p + "input_layernorm.weight", (d,)),
                (p + "post_attention_layernorm.weight", (d,))]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (c.vocab_size, d))]


def random_tensor(index: int, shape: tuple[int, ...]):
    """Tensor number `index` of the model, made directly in bf16: normal(0, 0.02) matrices, norm weights one.
    Seeded by its index, so the single file and the shards hold the same values."""
    import torch

    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    return torch.randn(shape, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(index)).mul_(0.02)


def write_safetensors(file: Path, entries: list[tuple[int, str, tuple[int, ...]]]) -> int:
    """Write the tensors `entries` ((index, name, shape), all bf16) as one safetensors file, made and written
    one at a time, in the order safetensors' own writer uses (by name); written to `file`.tmp, then renamed.
    The format: an 8-byte little-endian header length, the JSON header (each tensor's dtype, shape and byte
    range in the data), padded with spaces to 8 bytes, then the data. Returns the data's bytes."""
    import torch

    entries = sorted(entries, key=lambda e: e[1])
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for _, name, shape in entries:
        size = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for index, _, shape in entries:
            f.write(random_tensor(index, shape).view(torch.uint8).numpy().data)  # bf16 has no numpy dtype
    os.replace(tmp, file)
    return offset


def same_model(path: Path, config) -> bool:
    """Whether `path` holds a folder this script wrote for the same shape (--dir: kept between runs)."""
    try:
        theirs = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size")
    weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return weights and all(theirs.get(k) == getattr(config, k) for k in keys)


def make_folder(path: Path, a, shards: int) -> None:
    """A Llama folder of --layers etc.: config.json and model.safetensors (shards <= 1) or `shards` files cut
    in the model's order at equal bytes, with model.safetensors.index.json, as save_pretrained shards."""
    config = llama_config(a)
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("model*.safetensors*"):
        old.unlink()
    config.save_pretrained(str(path))
    tensors = [(i, name, shape) for i, (name, shape) in enumerate(llama_tensors(config))]
    if shards <= 1:
        write_safetensors(path / "model.safetensors", tensors)
        return
    total = sum(math.prod(shape) * 2 for _, _, shape in tensors)
    parts: list[list] = [[] for _ in range(shards)]
    done = 0
    for entry in tensors:
        parts[min(done * shards // total, shards - 1)].append(entry)
        done += math.prod(entry[2]) * 2
    weight_map = {}
    for n, part in enumerate(parts, 1):
        file = f"model-{n:05d}-of-{shards:05d}.safetensors"
        write_safetensors(path / file, part)
        weight_map.update({name: file for _, name, _ in part})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ worker side


def memory() -> dict[str, int]:
    """This process's RSS, RssAnon and RssFile now, in bytes (/proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def peak() -> int:
    """The process's peak RSS so far, in bytes (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def read_every_parameter(model) -> None:
    """Read at least one element of every memory page of every parameter and buffer, so that weights still
    only mapped from the file become resident, as the first forward pass makes them; 1/512 of the elements,
    so the reading itself allocates next to nothing."""
    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.reshape(-1)[::512].float().sum()


def worker(a) -> dict:
    import gc

    import torch
    import transformers  # imported before the baseline: every import pays for it
    import transformers.models.llama.modeling_llama  # noqa: F401

    sys.path.insert(0, str(REPO))
    from retrocli.allocator import tune_allocator
    from retrocli.config import ModelConfig
    from retrocli.train import hf
    from retrocli.train.checkpoint import is_cca_or_encoder

    tuned = tune_allocator()  # as every `retro` command runs
    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    path = Path(a.folder)
    kind = a.worker
    if kind != "transformers":
        folder = hf.open_folder(path)
        cfg = hf.model_config(folder, ModelConfig(retro_layers=[] if kind.startswith("retro-decoder") else None),
                              frozenset())
    gc.collect()
    before = memory()
    start = time.perf_counter()
    if kind == "transformers":
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    else:
        model = hf.load(path, cfg, CHUNK_LENGTH, PAD_ID, dtype=torch.float32 if kind == "retro-fp32" else None)[0]
    seconds = time.perf_counter() - start
    peak_loaded = peak()
    read_every_parameter(model)
    after = memory()
    params = dict(model.named_parameters())
    new = {n for n in params if kind != "transformers" and is_cca_or_encoder(n)}
    tensors = list(params.values()) + list(model.buffers())
    return {"worker": kind, "seconds": seconds, "allocator_tuned": tuned,
            "decoder_params": sum(p.numel() for n, p in params.items() if n not in new),
            "new_params": sum(params[n].numel() for n in new),
            "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params.values()}),
            "model_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "rss_before": before["VmRSS"], "peak_loaded": peak_loaded - before["VmRSS"],
            "peak_read": peak() - before["VmRSS"], "peak_read_abs": peak(),
            "anon_after": after["RssAnon"] - before["RssAnon"], "file_after": after["RssFile"] - before["RssFile"]}


# ------------------------------------------------------------------------------------------ main side


def run_worker(a, kind: str, folder: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--folder", str(folder),
           "--threads", str(a.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker {kind} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(result: dict) -> None:
    mb = 1e6
    m = result["model"]
    print(f"\nmodel: Llama, {m['layers']} layers, d {m['hidden']}, {m['heads']} heads ({m['kv_heads']} key/value), "
          f"MLP {m['ffn']}, vocabulary {m['vocab']}, untied LM head: {m['params']:,} parameters, bf16 weights "
          f"{m['bf16_bytes'] / mb:,.0f} MB; {m['shards']} shards for the sharded folder")
    print(f"{'import':22s} {'decoder params':>15s} {'new fp32':>11s} {'model MB':>9s} {'peak MB':>8s} "
          f"{'read MB':>8s} {'/ bf16':>7s} {'/ model':>8s} {'anon MB':>8s} {'file MB':>8s} {'abs MB':>7s} {'s':>6s}")
    for r in result["rows"]:
        print(f"{r['worker']:22s} {r['decoder_params']:>15,d} {r['new_params']:>11,d} {r['model_bytes'] / mb:>9,.0f} "
              f"{r['peak_loaded'] / mb:>8,.0f} {r['peak_read'] / mb:>8,.0f} "
              f"{r['peak_read'] / m['bf16_bytes']:>7.2f} {r['peak_read'] / r['model_bytes']:>8.2f} "
              f"{r['anon_after'] / mb:>8,.0f} {r['file_after'] / mb:>8,.0f} {r['peak_read_abs'] / mb:>7,.0f} "
              f"{r['seconds']:>6.1f}")
    decoder = next((r for r in result["rows"] if r["worker"] == "retro-decoder"), None)
    if decoder is not None:
        print(f"retro decoder in bf16: read peak / bf16 weights {decoder['peak_read'] / m['bf16_bytes']:.2f} "
              f"(target ~1.0: the weights once, no copy beside them)")
    print("peak: RSS peak - RSS before the import, when it returns; read: after every parameter was read once; "
          "/ bf16: read peak / the bf16 weights; / model: read peak / the model's own bytes; anon, file: the "
          "RSS after reading, allocated and mapped from the weight files; abs: the absolute read peak")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=2816, help="the MLP's width (intermediate_size)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shards", type=int, default=2, help="files of the sharded folder")
    p.add_argument("--only", default="", help=f"comma-separated workers, of {', '.join(WORKERS)}")
    p.add_argument("--tiny", action="store_true",
                   help="a 4-layer model of d 256, to check the script in seconds (its 14 MB are too few for the "
                        "ratios to mean anything: library pages dominate)")
    p.add_argument("--dir", type=Path, help="write the model folders here and keep them (default: a temporary "
                                            "folder, removed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    if a.tiny:
        a.layers, a.hidden, a.heads, a.kv_heads, a.ffn, a.vocab = 4, 256, 4, 2, 704, 8000
    kinds = [k for k in a.only.split(",") if k] or list(WORKERS)
    unknown = [k for k in kinds if k not in WORKERS]
    if unknown:
        raise SystemExit(f"--only: unknown workers {unknown}; known: {', '.join(WORKERS)}")
    config = llama_config(a)
    tensors = llama_tensors(config)
    params = sum(math.prod(shape) for _, shape in tensors)
    model = {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "kv_heads": a.kv_heads, "ffn": a.ffn,
             "vocab": a.vocab, "shards": a.shards, "params": params, "bf16_bytes": 2 * params}
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        root = a.dir or Path(tmp)
        folders = {"single": root / "llama", "shards": root / f"llama-{a.shards}-shards"}
        for variant in sorted({WORKERS[k][0] for k in kinds}):
            if not same_model(folders[variant], config):
                start = time.perf_counter()
                make_folder(folders[variant], a, a.shards if variant == "shards" else 1)
                print(f"wrote {folders[variant]} in {time.perf_counter() - start:.1f} s", flush=True)
        rows = []
        for kind in kinds:
            rows.append(run_worker(a, kind, folders[WORKERS[kind][0]]))
            r = rows[-1]
            print(f"{kind}: read peak {r['peak_read'] / 1e6:,.0f} MB in {r['seconds']:.1f} s", flush=True)
    result = {"model": model, "rows": rows, "cpus": os.cpu_count(), "threads": a.threads}
    report(result)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
