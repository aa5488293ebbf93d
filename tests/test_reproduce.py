"""`retro reproduce`: the whole chain on a microscopic config (db build -> pretrain Retro and GPT -> ppl ->
sft both -> generate -> score -> showcase -> report), a rerun that skips every finished stage and leaves the
database as it was, the builtin cloze QA set, and ${VAR:-default} in recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from retrocli.config import load_config
from retrocli.data.corpus import builtin_qa_file, tiny_cloze
from retrocli.errors import UserError

from .conftest import cli_in_process, run_cli, write_toml

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
    "reproduce": {"qa_task": "builtin:tiny-cloze-test", "qa_limit": 8, "contexts": ["file"], "showcase": True},
}
ENV = {"OMP_NUM_THREADS": "1", "RETRO_PROGRESS": "0"}


def micro_recipe(root: Path) -> Path:
    toml = write_toml(root / "micro.toml", MICRO)
    with open(toml, "a", encoding="utf-8") as f:
        f.write('[[sft.blend]]\nname = "cloze"\npath = "builtin:tiny-cloze-train"\nformat = "squad"\nweight = 1\n')
    return toml


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> SimpleNamespace:
    """The micro recipe reproduced twice in one workspace, and a `retro db query` of the showcase's questions
    after the second run."""
    from retrocli.reproduce import SHOWCASE_QUERIES

    root = tmp_path_factory.mktemp("reproduce")
    toml = micro_recipe(root)
    first = run_cli("reproduce", "-c", str(toml), env=ENV)
    assert first.returncode == 0, first.stderr[-4000:]
    ws = root / "ws"
    results = json.loads((ws / "reproduce" / "results.json").read_text())
    report = (ws / "report.md").read_text()
    again = run_cli("reproduce", "-c", str(toml), env=ENV)
    assert again.returncode == 0, again.stderr[-4000:]
    rerun = json.loads((ws / "reproduce" / "results.json").read_text())
    query = run_cli("db", "query", "-c", str(toml), "--json", "-k", "3", *SHOWCASE_QUERIES, env=ENV, check=True)
    return SimpleNamespace(toml=toml, ws=ws, first=first, results=results, report=report, again=again, rerun=rerun,
                           queried=json.loads(query.stdout))


def test_the_whole_chain_then_a_rerun_that_skips_what_is_done(chain) -> None:
    stages = chain.results["stages"]
    assert {"db build", "pretrain", "pretrain gpt", "sft", "sft gpt", "generate file sft",
            "generate file sft-gpt"} <= set(stages)
    assert all(st["seconds"] is not None and st["command"].startswith("retro ") for st in stages.values())
    ppl = chain.results["results"]
    assert {"ppl/valid/retrieval", "ppl/valid/no-retrieval", "ppl/valid/gpt"} <= set(ppl)
    assert ppl["ppl/valid/retrieval"]["retrieval"] and not ppl["ppl/valid/gpt"]["retrieval"]
    for model in ("sft", "sft-gpt"):
        for mode in ("file",):
            qa = ppl[f"qa/{mode}/{model}"]
            assert qa["count"] == 8 and 0 <= qa["f1"] <= 100
    report = chain.report
    assert "## Perplexity" in report and "## QA after instruction tuning" in report and "retro pretrain" in report
    assert "Retro | file | 8 |" in report and "GPT | file | 8 |" in report
    # everything done: a rerun trains and generates nothing again
    text = chain.again.stderr.replace("\n", " ")
    for name in ("pretrain", "pretrain gpt", "sft", "sft gpt", "generate file sft", "ppl valid retrieval"):
        assert f"{name}: complete, skipped" in text, name


def test_the_showcase_adds_a_fact_that_is_found_and_removes_it_again(chain) -> None:
    from retrocli.reproduce import FACT, SHOWCASE_K

    fact = chain.results["showcase"]["fact"]
    ids = {step: [h["doc_id"] for h in fact[step]] for step in ("before", "after_add", "after_remove")}
    assert len(ids["before"]) == SHOWCASE_K and FACT["id"] not in ids["before"]
    assert FACT["id"] in ids["after_add"]  # retrieved at once, with no training in between
    assert FACT["id"] not in ids["after_remove"] and fact["after_remove"] == fact["before"]
    assert fact["unchanged_after_remove"] and fact["chunks_added"] == fact["chunks_removed"] > 0
    assert json.loads(Path(fact["file"]).read_text())["id"] == FACT["id"]  # the document the run wrote
    for q in chain.results["showcase"]["queries"]:  # the topic questions find chunks of the corpus, with sources
        assert len(q["hits"]) == SHOWCASE_K and all(h["doc_id"].startswith("pydoc:") for h in q["hits"])
    # the last screen is the showcase, after the table of QA scores; report.md ends with it too
    screen = chain.first.stderr
    assert screen.rindex("EM / F1") < screen.index("what this run shows") < screen.index("db add / db remove")
    assert "copy-cpu.toml" in screen[-1500:] and "gpu-small.toml" in screen[-1500:]
    steps = [line.split() for line in screen.splitlines() if line.startswith(("  before db add", "  after db"))]
    assert [(s[3], s[4] == FACT["id"]) for s in steps] == [("no", False), ("yes", True), ("no", False)], steps
    shown = chain.report[chain.report.index("## What this run shows"):]
    assert f"| after db add | yes | {FACT['id']} |" in shown and "| after db remove | no | pydoc:" in shown


def test_the_showcase_perplexity_carries_the_standard_error_of_the_paired_difference(chain) -> None:
    p = chain.results["showcase"]["perplexity"]
    gpt, on, off = p["rows"]
    assert (gpt["model"], gpt["retrieval"], on["retrieval"], off["retrieval"]) == ("GPT", False, True, False)
    assert gpt["tokens"] == on["tokens"] == off["tokens"] == p["tokens"] > 0  # the same tokens, paired
    measured = chain.results["results"]  # the `retro ppl` stages measured the same perplexities
    for row, key in ((gpt, "gpt"), (on, "retrieval"), (off, "no-retrieval")):
        assert row["perplexity"] == pytest.approx(measured[f"ppl/valid/{key}"]["perplexity"], rel=1e-5)
    for row in (on, off):
        assert row["se"] > 0 and row["ratio"] == pytest.approx(math.exp(row["diff"]))
    assert p["retrieval_effect"]["se"] > 0
    lines = [line.split() for line in chain.first.stderr.splitlines() if line.startswith("  Retro ")]
    assert [line[1:] for line in lines] == [["on", f"{on['perplexity']:.2f}", f"{on['diff']:+.4f}", "+-",
                                            f"{on['se']:.4f}"],
                                           ["off", f"{off['perplexity']:.2f}", f"{off['diff']:+.4f}", "+-",
                                            f"{off['se']:.4f}"]], lines
    assert "Retrieval on against off, the same Retro:" in chain.first.stderr
    assert chain.report.count(" +- ") >= 3


def test_a_second_run_shows_the_same_and_leaves_the_database_as_it_was(chain) -> None:
    first, second = chain.results["showcase"], chain.rerun["showcase"]
    assert second["queries"] == first["queries"]
    assert second["fact"]["before"] == first["fact"]["before"] == second["fact"]["after_remove"]
    assert second["fact"]["found_after_add"] and not second["fact"]["found_after_remove"]
    assert second["perplexity"] == first["perplexity"]
    # what `retro db query` finds after both runs is what the first run's showcase found
    assert [[h["chunk_id"] for h in q["results"]] for q in chain.queried] == \
           [[h["chunk_id"] for h in q["hits"]] for q in first["queries"]]


def test_a_fact_that_a_killed_run_left_in_the_database_is_removed_first(chain) -> None:
    from retrocli.db.database import workspace_of
    from retrocli.reproduce import Showcase

    first = chain.results["showcase"]["fact"]
    run_cli("db", "add", "-c", str(chain.toml), first["file"], env=ENV, check=True)  # killed before db remove
    cfg = load_config(chain.toml)
    _, fact = Showcase(cfg, workspace_of(cfg)).edit()
    assert fact["before"] == first["before"] and not fact["found_before"]
    assert fact["found_after_add"] and not fact["found_after_remove"] and fact["unchanged_after_remove"]


def test_a_failing_stage_names_itself_and_how_to_continue(tmp_path: Path) -> None:
    toml = micro_recipe(tmp_path)
    proc = run_cli("reproduce", "-c", str(toml), "--set", 'corpus.train=["missing/*.txt"]', "--set",
                   "reproduce.showcase=false", env=ENV)
    assert proc.returncode == 2
    assert "stage 'db build' failed" in proc.stderr and "rerun `retro reproduce`" in proc.stderr


def test_the_showcase_needs_the_corpus_its_questions_are_about(tmp_path: Path, capsys) -> None:
    toml = micro_recipe(tmp_path)
    code, err = cli_in_process(capsys, "reproduce", "-c", str(toml), "--set", 'corpus.train=["books/*.txt"]')
    assert code == 2 and "reproduce.showcase = true" in err and "builtin:tiny" in err
    assert not (tmp_path / "ws" / "db").exists()  # refused before any stage ran


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
