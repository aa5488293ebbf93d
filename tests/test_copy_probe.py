"""benchmarks/copy_probe.py: its loss split between the two copies of a segment, on models whose answer is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from retrocli.config import load_config
from retrocli.db.database import Database, workspace_of

from .conftest import load_benchmark

VOCAB = 50


def _module():
    return load_benchmark("copy_probe")


class Copier(torch.nn.Module):
    """Predicts, with probability p, the token `lag` positions before the next one (a perfect induction head
    for segments of length `lag` shown twice); the rest of the mass spread uniformly."""

    def __init__(self, lag: int, p: float):
        super().__init__()
        self.lag, self.p = lag, p

    def forward(self, tokens, retrieval=True):
        b, n = tokens.shape
        probs = torch.full((b, n, VOCAB), (1 - self.p) / (VOCAB - 1))
        for t in range(n):
            src = t + 1 - self.lag  # the position `lag` before the target t + 1
            if src >= 0:
                probs[torch.arange(b), t, tokens[:, src]] = self.p
            else:
                probs[:, t, :] = 1.0 / VOCAB
        return probs.log()


@pytest.mark.parametrize("p", [0.9, 0.5])
def test_a_copying_model_pays_only_on_the_first_copy(p):
    cp = _module()
    seg = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    r = cp.probe(Copier(lag=12, p=p), seg)
    assert r["first"] == pytest.approx(math.log(VOCAB), rel=1e-5)
    assert r["repeat"] == pytest.approx(-math.log(p), rel=1e-5)
    assert r["drop"] == pytest.approx(math.log(VOCAB) + math.log(p), rel=1e-5)


def test_a_model_that_copies_from_the_wrong_place_gains_nothing():
    cp = _module()
    seg = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    r = cp.probe(Copier(lag=11, p=0.9), seg)  # off by one: copies the wrong token of the first copy
    assert r["repeat"] > math.log(VOCAB)


class NeighbourCopier(torch.nn.Module):
    """A Retro stand-in that reads the target of position t, with probability p, where a perfect retrieval puts
    it: neighbour slot 0 of chunk j = (t + 1) // m - 1, offset t + 1 - j*m (uniform without neighbours)."""

    chunk_length, retrieved_length, pad_id = 4, 8, 0

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.cfg = type("Cfg", (), {"num_neighbors": 2})()

    def forward(self, tokens, neighbours=None, retrieval=True):
        b, n = tokens.shape
        probs = torch.full((b, n, VOCAB), 1.0 / VOCAB)
        m = self.chunk_length
        for t in range(m - 1, n) if neighbours is not None and retrieval else ():
            j = (t + 1) // m - 1
            probs[:, t, :] = (1 - self.p) / (VOCAB - 1)
            probs[torch.arange(b), t, neighbours[:, j, 0, t + 1 - j * m]] = self.p
        return probs.log()


def test_the_neighbour_probe_puts_each_chunks_continuation_in_its_first_neighbour():
    cp = _module()
    seg = torch.randint(1, VOCAB, (3, 17), generator=torch.Generator().manual_seed(2))  # seq_length 16, m 4
    r = cp.probe_neighbours(NeighbourCopier(p=0.8), seg)
    assert r["first"] == pytest.approx(math.log(VOCAB), rel=1e-5)
    assert r["repeat"] == pytest.approx(-math.log(0.8), rel=1e-5)


def test_the_script_reports_both_probes_for_a_workspace_checkpoint(trained, tmp_path, monkeypatch, capsys):
    cp = _module()
    out = tmp_path / "probe.json"
    monkeypatch.setattr("sys.argv", ["copy_probe.py", "--recipe", str(trained), "--length", "8", "--batch", "4",
                                     "--json", str(out)])
    cp.main()
    report = json.loads(out.read_text())
    assert [r["probe"] for r in report["results"]] == ["random", "text", "nbr-random", "nbr-text"]  # a Retro
    for r in report["results"]:
        assert r["checkpoint"].endswith("step-000002") and r["step"] == 2
        assert r["first"] > 0 and r["repeat"] > 0 and r["drop"] == pytest.approx(r["first"] - r["repeat"])
    assert "pretrain/step-000002" in capsys.readouterr().out


def test_text_segments_are_spans_of_validation_documents(trained):
    cp = _module()
    ws = workspace_of(load_config(trained))
    store = Database.open(ws, 16).store
    seg = cp.segments("text", store, 300, 8, 6, seed=0)
    valid = store.docs[store.docs["valid"]]
    texts = [store.doc_ids(int(i)).tolist() for i in np.flatnonzero(store.docs["valid"])]
    assert len(valid) and seg.shape == (6, 8)
    for row in seg.tolist():
        assert any(row == t[s : s + 8] for t in texts for s in range(len(t) - 7))
