"""benchmarks/bench_scale.py at tiny sizes: its data, its exact search, its report (10M: `make bench-scale`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from retrocli.db.index import auto_spec

from .conftest import REPO, load_benchmark

SCRIPT = REPO / "benchmarks/bench_scale.py"


def _module():
    return load_benchmark("bench_scale")


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """The script on 4,000 then 10,000 vectors, in blocks of 3,000 (so a growth step starts mid-block)."""
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "4000,10000", "--train", "4000",
                           "--queries", "100", "--recall-queries", "50", "--block-size", "3000",
                           "--json", str(out), *args], capture_output=True, text=True, timeout=300)
    return proc, json.loads(out.read_text()) if out.exists() else {}


def test_blocks_are_clustered_unit_vectors_regenerated_alike():
    bs = _module()
    gen = bs.ClusteredVectors(seed=3, n_centres=16, block_size=1000)
    streamed = np.concatenate([x for _, x in gen.rows(0, 2500)])
    assert streamed.shape == (2500, bs.DIM) and streamed.dtype == np.float32
    assert np.allclose(np.linalg.norm(streamed, axis=1), 1.0, atol=1e-5)
    # any block is a function of (seed, block) alone: a later span starting mid-block gives the same rows
    assert np.array_equal(np.concatenate([x for _, x in gen.rows(1500, 2500)]), streamed[1500:])
    assert np.array_equal(bs.ClusteredVectors(seed=3, n_centres=16, block_size=1000).block(2)[:500], streamed[2000:])
    # clustered: every vector lies near one of the 16 centres (cosine ~0.7); a random direction's best of 16
    # would be ~0.1 (cosines of random directions in 384 dimensions have sd 1/sqrt(384) = 0.05)
    nearest = (streamed @ gen.centres.T).max(axis=1)
    assert np.median(nearest) > 0.6 and nearest.min() > 0.3
    assert not np.array_equal(gen.queries(10), streamed[:10]), "queries come from their own stream"


def test_running_top_k_equals_exact_search_over_all_blocks():
    bs = _module()
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1000, 8)).astype(np.float32)
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    top = bs.RunningTopK(queries, k=10)
    for start in range(0, 1000, 96):  # uneven blocks, one shorter than k at the end
        top.update(start, vectors[start:start + 96])
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    assert np.array_equal(top.ids, truth)
    assert bs.recall_at(top.ids, truth) == 1.0
    assert bs.recall_at(top.ids[:, ::-1], truth) == 1.0, "recall ignores order within the top k"
    assert bs.recall_at(np.full_like(truth, -1), truth) == 0.0


def test_default_lists_are_auto_specs():
    bs = _module()
    assert bs.default_nlist(10_000_000) == 16384 and "IVF16384" in auto_spec(10_000_000)
    assert f"IVF{bs.default_nlist(50_000)}," in auto_spec(50_000)


def test_exhaustive_probe_gives_exact_recall_and_every_field(tmp_path):
    # 64 lists, all probed, uncompressed: the index answers exactly, so recall must come out 1.0
    proc, result = _run(tmp_path, "--spec", "IVF64_HNSW32,Flat", "--nprobe", "64", "--sweep-nprobe", "1,64",
                        "--rerank", "30", "--store-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r["vectors"] for r in result["sizes"]] == [4000, 10000]
    assert [r["added"] for r in result["sizes"]] == [4000, 6000]
    for r in result["sizes"]:
        assert r["add_per_s"] > 0 and r["queries_per_s"] > 0 and r["latency_ms"] > 0
        assert r["recall_at_10"] == 1.0
        assert r["bytes_per_vector"] >= 4 * 384 + 8  # float32 vector and int64 id
        assert 0 < r["peak_rss_gib"] < 4
        one, every = r["sweep"]  # nprobe 1 of 64 lists misses neighbours; all 64 are exact, re-ranked or not
        assert one["recall_at_10"] < 1.0 and every["recall_at_10"] == 1.0
        assert every["reranked"]["30"]["recall_at_10"] == 1.0  # (JSON keys) from the float16 blocks
        assert one["reranked"]["30"]["recall_at_10"] >= one["recall_at_10"]
        assert one["queries_per_s"] > 0 and every["queries_per_s"] > 0 and one["reranked"]["30"]["queries_per_s"] > 0
    assert result["sweep_block_size"] == 1000  # gcd of 4,000, 10,000 and the 3,000 generated at a time
    assert not list(tmp_path.glob("bench-scale-*")), "the stored blocks are removed at the end"
    assert result["peak_rss_gib"] >= result["sizes"][-1]["peak_rss_gib"]
    assert result["train_vectors"] == 4000 and result["nprobe"] == 64
    assert "recall@10" in proc.stdout and "peak RSS" in proc.stdout


def test_compressed_index_and_the_memory_limit(tmp_path):
    proc, result = _run(tmp_path, "--spec", "IVF64_HNSW32,SQ8", "--nprobe", "4", "--max-rss-gib", "0.001",
                        "--sweep-nprobe", "")
    assert proc.returncode == 1 and "exceeds --max-rss-gib 0.001" in proc.stderr
    for r in result["sizes"]:  # the report is written before the limit fails the run
        assert 0.0 <= r["recall_at_10"] <= 1.0 and r["queries_per_s"] > 0
        assert 384 <= r["bytes_per_vector"] < 4 * 384  # 1 byte a dimension, plus ids and centroids
