"""`retro sft` on a microscopic workspace: a blend of a SQuAD file and a QA JSONL file fine-tunes a pretrained
tiny Retro; the held-out answer loss falls; per-dataset eval; each neighbour mode; resume after a kill; errors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from retrocli.config import load_config
from retrocli.db import database
from retrocli.train import checkpoint
from retrocli.train.pretrain import run as pretrain
from retrocli.train.sft import build, run

from .conftest import cli_in_process, run_cli
from .test_pretrain import make_workspace, metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLOURS = "red green blue yellow black white orange purple brown grey pink gold".split()
THINGS = "apple river stone cloud horse table window garden bridge candle mirror lantern".split()


def qa_files(root: Path) -> tuple[Path, Path]:
    """A SQuAD file (articles of paragraphs saying what colour each thing is) and a QA JSONL file asking the
    same facts without context: answers are learnable from the context and from the data."""
    rng = random.Random(0)
    colour = {t: rng.choice(COLOURS) for t in THINGS}
    articles = []
    for a in range(6):
        paragraphs = []
        for p in range(4):
            things = rng.sample(THINGS, 3)
            context = " ".join(f"the {t} is {colour[t]}." for t in things)
            qas = [{"id": f"q{a}-{p}-{i}", "question": f"what colour is the {t}?",
                    "answers": [{"text": colour[t], "answer_start": 0}]} for i, t in enumerate(things)]
            paragraphs.append({"context": context, "qas": qas})
        articles.append({"title": f"article {a}", "paragraphs": paragraphs})
    squad = root / "squad.json"
    squad.write_text(json.dumps({"version": "1.1", "data": articles}), encoding="utf-8")
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"the colour of the {t}?", "answer": colour[t]}) + "\n"
                          for t in THINGS * 4), encoding="utf-8")
    return squad, qa


SFT = {"micro_batch_size": 4, "global_batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1,
       "train_steps": 8, "eval_interval": 4, "eval_steps": 2, "save_interval": 4, "keep_last": 0,
       "valid_fraction": 0.3, "system": "", "num_contexts": 2}


def sft_workspace(root: Path, **sft: object) -> Path:
    toml = make_workspace(root, pretrain={"train_steps": 2, "save_interval": 2, "eval_interval": 2},
                          model={"seq_length": 128}, sft={**SFT, **sft})
    pretrain(load_config(toml))
    squad, qa = qa_files(root)
    with open(toml, "a", encoding="utf-8") as f:
        f.write(f'[[sft.blend]]\nname = "squad"\npath = "{squad.name}"\nformat = "squad"\nweight = 3\n'
                f'[[sft.blend]]\nname = "facts"\npath = "{qa.name}"\nformat = "qa"\nweight = 1\n')
    return toml


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return sft_workspace(tmp_path_factory.mktemp("sft"))


def test_sft_trains_on_answers_and_its_held_out_loss_falls(workspace: Path) -> None:
    cfg = load_config(workspace)
    job, settings, resume_from, table = build(cfg)
    assert resume_from is None and job.model.cca_gate_off  # sft.neighbors = "none": encoder gated off
    by_name = {row["name"]: row for row in table}
    assert by_name["squad"]["probability"] == pytest.approx(0.75)
    assert by_name["squad"]["held_out"] > 0 and set(job.valid) == {"squad", "facts"}
    sample = job.train.get(0)
    assert "neighbours" not in sample
    mask = sample["loss_mask"].astype(bool)
    assert mask.any() and sample["targets"][mask][-1] == job.meta["eos_id"]  # the answer, then EOS
    assert not mask[: np.flatnonzero(mask)[0]].any() and mask.sum() < (sample["targets"] != 0).sum()

    summary = run(cfg)
    assert summary["step"] == 8
    ws = database.workspace_of(cfg)
    lines = [json.loads(x) for x in (ws.run_dir("sft") / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert set(evals[0]["eval_loss_by_set"]) == {"squad", "facts"}
    # the same held-out sets evaluated after one step at a negligible learning rate: the starting point
    untrained = run(load_config(workspace, ["sft.run=probe", "sft.train_steps=1", "sft.lr=1e-9", "sft.min_lr=0",
                                            "sft.eval_interval=1"]))
    assert evals[-1]["eval_loss"] < untrained["eval_loss"] - 0.5, (evals, untrained)
    latest = checkpoint.latest(ws.run_dir("sft"))
    meta = checkpoint.read_meta(latest)
    assert meta["sft"]["neighbors"] == "none" and meta["phase"] == "sft"


@pytest.mark.parametrize("mode", ["context", "database"])
def test_neighbour_modes(workspace: Path, mode: str) -> None:
    cfg = load_config(workspace, [f"sft.neighbors={json.dumps(mode)}", f"sft.run={json.dumps('sft-' + mode)}",
                                  "sft.train_steps=2", "sft.eval_interval=2", "sft.save_interval=2"])
    job, *_ = build(cfg)
    assert not job.model.cca_gate_off
    with_context = next(i for i, rec in enumerate(job.train.records) if rec.contexts)  # a SQuAD question
    sample = job.train.get(with_context)
    k, r = job.model.cfg.num_neighbors, job.model.retrieved_length
    nb = sample["neighbours"]
    assert nb.shape == (-(-job.model.cfg.seq_length // job.model.chunk_length), k, r)
    assert (nb != job.model.pad_id).any()
    if mode == "context":  # the same contexts for every chunk
        assert (nb == nb[:1]).all()
    assert run(cfg)["step"] == 2


def test_resume_after_a_kill_continues_the_same_curve(tmp_path: Path) -> None:
    toml = sft_workspace(tmp_path)
    cfg = load_config(toml, ["sft.train_steps=6", "sft.save_interval=3", "sft.eval_interval=6"])
    run(cfg)
    ws = database.workspace_of(cfg)
    straight = metrics(ws.run_dir("sft"))
    args = ["sft", "-c", str(toml), "--set", "sft.train_steps=6", "--set", "sft.save_interval=3",
            "--set", "sft.eval_interval=6"]
    shutil.rmtree(ws.run_dir("sft"))
    proc = run_cli(*args, env={"RETRO_FAULT": "sft:checkpoint:2", "OMP_NUM_THREADS": "1"})  # writing step 6
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert [p.name for p in checkpoint.complete_steps(ws.run_dir("sft"))] == ["step-000003"]
    assert list(ws.run_dir("sft").glob(".step-000006.tmp-*"))  # the torn write is a temporary folder
    run_cli(*args, env={"OMP_NUM_THREADS": "1"}, check=True)
    resumed = metrics(ws.run_dir("sft"))
    assert sorted(resumed) == list(range(1, 7))
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step


def test_errors_name_the_problem(workspace: Path, tmp_path: Path, capsys) -> None:
    text = workspace.read_text()

    def sft_with(old: str, new: str, *sets: str) -> str:
        toml = workspace.parent / "variant.toml"  # beside the original: the same relative paths
        toml.write_text(text.replace(old, new))
        code, err = cli_in_process(capsys, "sft", "-c", str(toml), *[a for s in sets for a in ("--set", s)])
        assert code == 2, err[-2000:]
        return err

    err = sft_with('path = "qa.jsonl"', 'path = "missing.jsonl"')
    assert "no such file" in err and "missing.jsonl" in err
    assert "sft.blend[1] (facts).format" in sft_with('format = "qa"', 'format = "csv"')
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"\n', encoding="utf-8")
    assert "broken.jsonl:2" in sft_with('path = "qa.jsonl"', f'path = "{broken}"')
    pretrain(load_config(workspace, ["pretrain.run=gpt", "model.retro_layers=[]", "pretrain.train_steps=1"]))
    gpt = database.workspace_of(load_config(workspace)).run_dir("gpt")
    assert "plain GPT" in sft_with("", "", 'sft.neighbors="context"', f"sft.init_from={json.dumps(str(gpt))}")
