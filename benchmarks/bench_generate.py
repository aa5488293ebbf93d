"""`make bench-generate`: decoding speed with the KV cache against recomputing the whole sequence for every
new token (what Megatron's Retro generator did), for the same model, prompts and settings, in one run.

The model is a randomly initialised Retro of the small-cpu shape (or a checkpoint's, with --checkpoint),
greedy decoding with live retrieval: every chunk the text completes gets neighbours from a fixed function
of its tokens (the database search itself costs the same in both modes and is not measured here; with
the lexical embedder it is ~0.1 ms a chunk). EOS is disabled, so every row writes exactly --new tokens.
The two modes must write the same tokens; the benchmark fails if they do not.

Target: cached tokens/s >= 5x uncached at 256 new tokens on CPU.

    python benchmarks/bench_generate.py [--new 256 --prompt 128 --batch 1 8 --threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from retrocli.allocator import tune_allocator  # noqa: E402
from retrocli.config import ModelConfig  # noqa: E402
from retrocli.eval.generate import Decoding, generate  # noqa: E402
from retrocli.model.retro import RetroModel  # noqa: E402


def build(a) -> RetroModel:
    if a.checkpoint:
        from retrocli.train import checkpoint

        meta = checkpoint.read_meta(Path(a.checkpoint))
        model = RetroModel(checkpoint.model_config_of(meta), meta["chunk_length"], meta["pad_id"])
        model.load_state_dict(checkpoint.load_weights(Path(a.checkpoint)))
        return model.eval()
    torch.manual_seed(0)
    cfg = ModelConfig(layers=a.layers, hidden=a.hidden, heads=a.heads, seq_length=a.prompt + a.new,
                      retro_layers=[2, 4] if a.layers >= 4 else [a.layers], encoder_layers=2, num_neighbors=2,
                      vocab_size=a.vocab)
    return RetroModel(cfg, a.chunk, pad_id=0).eval()


def neighbours_fn(model: RetroModel):
    k, r, v = model.cfg.num_neighbors, model.retrieved_length, model.cfg.vocab_size

    def neighbours_of(rows, chunks):
        toks = np.stack([(np.arange(k * r).reshape(k, r) * 7 + sum(c)) % (v - 1) + 1 for c in chunks])
        return toks.astype(np.int64), np.zeros((len(chunks), k), dtype=np.int64)

    return neighbours_of


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new", type=int, default=256, help="new tokens per answer")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes to measure")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--checkpoint", default="", help="a step folder: its model instead of a random one")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="", help="also write the results here")
    a = p.parse_args()
    tune_allocator()  # as `retro generate` runs
    torch.set_num_threads(a.threads)
    model = build(a)
    rng = np.random.default_rng(0)
    vocab = model.cfg.vocab_size
    d = Decoding(max_new_tokens=a.new)
    rows = []
    print(f"model: {model.cfg.layers} layers, hidden {model.cfg.hidden}, CCA at {model.retro_layers}, chunk "
          f"{model.chunk_length}; prompt {a.prompt} tokens, {a.new} new tokens, greedy, live retrieval, "
          f"{a.threads} threads")
    print(f"{'batch':>5} {'mode':>9} {'seconds':>9} {'tokens/s':>10} {'speed-up':>9}")
    for b in a.batch:
        prompts = [rng.integers(1, vocab - 1, a.prompt).tolist() for _ in range(b)]
        result = {}
        for mode in ("cached", "uncached"):
            start = time.perf_counter()
            answers = generate(model, prompts, d, eos_id=-1, neighbours_of=neighbours_fn(model),
                               use_cache=mode == "cached")
            seconds = time.perf_counter() - start
            result[mode] = (seconds, [x.tokens for x in answers])
        if result["cached"][1] != result["uncached"][1]:
            raise SystemExit("the cached and uncached decoders wrote different tokens")
        for mode in ("cached", "uncached"):
            seconds = result[mode][0]
            speedup = result["uncached"][0] / result["cached"][0]
            rows.append({"batch": b, "mode": mode, "seconds": round(seconds, 3),
                         "tokens_per_s": round(b * a.new / seconds, 1), "speedup": round(speedup, 2)})
            print(f"{b:>5} {mode:>9} {seconds:>9.2f} {b * a.new / seconds:>10,.1f} "
                  f"{(f'{speedup:.1f}x' if mode == 'cached' else ''):>9}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
