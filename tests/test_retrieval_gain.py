"""benchmarks/retrieval_gain.py: paired per-token losses that agree with `retro ppl` on every entry."""

from __future__ import annotations

import math

import pytest

from retrocli.config import load_config
from retrocli.db.database import workspace_of
from retrocli.eval import ppl

from .conftest import load_benchmark


def test_paired_losses_match_retro_ppl_and_pair_token_by_token(trained, one_torch_thread):
    rg = load_benchmark("retrieval_gain")
    cfg = load_config(trained)
    step1 = workspace_of(cfg).root / "checkpoints" / "pretrain" / "step-000001"
    rows = rg.measure(trained, ["pretrain@off", "pretrain", f"{step1}@on"])
    assert [r["retrieval"] for r in rows] == [False, True, True]
    assert rows[1]["checkpoint"].endswith("step-000002") and rows[2]["checkpoint"].endswith("step-000001")
    assert len({r["tokens"] for r in rows}) == 1 and rows[0]["tokens"] > 0
    for r, (path, retrieval) in zip(rows, [(None, False), (None, True), (step1, True)]):
        expected = ppl.run(cfg, path, retrieval=retrieval)
        assert r["tokens"] == expected["tokens"]
        assert r["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    for r in rows[1:]:
        assert r["diff_vs_first"] == pytest.approx(r["loss"] - rows[0]["loss"], abs=1e-6)
        assert r["diff_se"] > 0 and r["ppl_ratio_vs_first"] == pytest.approx(math.exp(r["diff_vs_first"]))
    assert rows[1]["diff_vs_first"] != 0  # the neighbours change the step-2 model's predictions


def test_an_unknown_mode_is_refused(trained):
    with pytest.raises(SystemExit, match="'on' or 'off'"):
        load_benchmark("retrieval_gain").measure(trained, ["pretrain@maybe"])
