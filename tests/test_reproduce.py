"""`retro reproduce`: the whole chain on a microscopic config (db build -> pretrain Retro and GPT -> ppl ->
sft both -> generate -> score -> report), a rerun that skips every finished stage, the builtin cloze QA
set, and ${VAR:-default} in recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrocli.config import load_config
from retrocli.corpus import builtin_qa_file, tiny_cloze
from retrocli.errors import UserError

from .conftest import run_cli, write_toml

MICRO = {
    "workspace": {"dir": "ws", "seed": 3},
    "corpus": {"train": ["builtin:tiny"], "valid_fraction": 0.05},
    "tokenizer": {"vocab_size": 500},
    "db": {"chunk_length": 16, "embedder": "lexical", "index": "Flat", "block_size": 5000, "num_neighbors_query": 4},
    "model": {"layers": 2, "hidden": 32, "heads": 2, "seq_length": 64, "retro_layers": [2], "encoder_layers": 1},
    "pretrain": {"micro_batch_size": 4, "global_batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "train_steps": 6,
                 "eval_interval": 3, "eval_steps": 1, "save_interval": 6},
    "sft": {"micro_batch_size": 4, "global_batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "train_steps": 4,
            "eval_interval": 4, "eval_steps": 1, "save_interval": 4, "num_contexts": 1, "system": ""},
    "generate": {"num_contexts": 1, "max_new_tokens": 3, "batch_size": 8},
    "reproduce": {"qa_task": "builtin:tiny-cloze-test", "qa_limit": 8, "contexts": ["file"]},
}


def micro_recipe(root: Path) -> Path:
    toml = write_toml(root / "micro.toml", MICRO)
    with open(toml, "a", encoding="utf-8") as f:
        f.write('[[sft.blend]]\nname = "cloze"\npath = "builtin:tiny-cloze-train"\nformat = "squad"\nweight = 1\n')
    return toml


def test_the_whole_chain_then_a_rerun_that_skips_what_is_done(tmp_path: Path) -> None:
    toml = micro_recipe(tmp_path)
    env = {"OMP_NUM_THREADS": "1", "RETRO_PROGRESS": "0"}
    proc = run_cli("reproduce", "-c", str(toml), env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ws = tmp_path / "ws"
    results = json.loads((ws / "reproduce" / "results.json").read_text())
    stages = results["stages"]
    assert {"db build", "pretrain", "pretrain gpt", "sft", "sft gpt", "generate file sft",
            "generate file sft-gpt"} <= set(stages)
    assert all(st["seconds"] is not None and st["command"].startswith("retro ") for st in stages.values())
    ppl = results["results"]
    assert {"ppl/valid/retrieval", "ppl/valid/no-retrieval", "ppl/valid/gpt"} <= set(ppl)
    assert ppl["ppl/valid/retrieval"]["retrieval"] and not ppl["ppl/valid/gpt"]["retrieval"]
    for model in ("sft", "sft-gpt"):
        for mode in ("file",):
            qa = ppl[f"qa/{mode}/{model}"]
            assert qa["count"] == 8 and 0 <= qa["f1"] <= 100
    report = (ws / "report.md").read_text()
    assert "## Perplexity" in report and "## QA after instruction tuning" in report and "retro pretrain" in report
    assert "Retro | file | 8 |" in report and "GPT | file | 8 |" in report
    # everything done: a rerun trains and generates nothing again
    again = run_cli("reproduce", "-c", str(toml), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    text = again.stderr.replace("\n", " ")
    for name in ("pretrain", "pretrain gpt", "sft", "sft gpt", "generate file sft", "ppl valid retrieval"):
        assert f"{name}: complete, skipped" in text, name


def test_a_failing_stage_names_itself_and_how_to_continue(tmp_path: Path) -> None:
    toml = micro_recipe(tmp_path)
    proc = run_cli("reproduce", "-c", str(toml), "--set", 'corpus.train=["missing/*.txt"]',
                   env={"OMP_NUM_THREADS": "1", "RETRO_PROGRESS": "0"})
    assert proc.returncode == 2
    assert "stage 'db build' failed" in proc.stderr and "rerun `retro reproduce`" in proc.stderr


def test_builtin_cloze_questions_are_answerable_from_their_context(tmp_path: Path) -> None:
    sets = tiny_cloze()
    ids = {}
    for split, data in sets.items():
        qas = [(p["context"], qa) for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]]
        assert len(qas) > (500 if split == "train" else 100)
        for context, qa in qas:
            answer = qa["answers"][0]
            assert context[answer["answer_start"] :].startswith(answer["text"])  # a span of the paragraph
            sentence = qa["question"].removeprefix("Fill in the blank: ")
            assert sentence.replace("_____", answer["text"], 1) in context  # the blank is where the answer was
        ids[split] = {qa["id"] for _, qa in qas}
    assert not ids["train"] & ids["test"]
    path = builtin_qa_file("builtin:tiny-cloze-test", tmp_path)
    assert json.loads(path.read_text()) == sets["test"]
    with pytest.raises(UserError, match="unknown builtin QA set"):
        builtin_qa_file("builtin:nope", tmp_path)


def test_environment_variables_in_recipes(tmp_path: Path, monkeypatch) -> None:
    toml = tmp_path / "r.toml"
    toml.write_text('[corpus]\ntrain = ["${DATA_DIR:-../data}/corpus/*.jsonl", "${DATA_DIR}/more.txt"]\n')
    monkeypatch.setenv("DATA_DIR", "/mnt/copy")
    assert load_config(toml).corpus.train == ["/mnt/copy/corpus/*.jsonl", "/mnt/copy/more.txt"]
    monkeypatch.delenv("DATA_DIR")
    with pytest.raises(UserError, match=r"corpus.train\[1\] uses \$\{DATA_DIR\}"):
        load_config(toml)
    toml.write_text('[corpus]\ntrain = ["${DATA_DIR:-../data}/corpus/*.jsonl"]\n')
    assert load_config(toml).corpus.train == ["../data/corpus/*.jsonl"]


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).parent.parent / "recipes").glob("*.toml")))
def test_every_recipe_loads(recipe: str) -> None:
    load_config(Path(__file__).parent.parent / "recipes" / recipe)
