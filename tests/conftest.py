"""Shared fixtures: tiny workspaces written by the tests themselves (no shared data needed)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from retrocli.config import _toml_value

TOPICS = {
    "astronomy": "star planet orbit telescope galaxy comet moon nebula light year solar eclipse",
    "cooking": "flour butter oven recipe sugar bake knead dough salt pepper simmer sauce",
    "sailing": "boat wind sail harbour mast rudder knot tide anchor keel deck crew",
    "music": "violin melody chord rhythm piano orchestra tempo harmony concert note score",
    "geology": "rock mineral volcano sediment fault crystal erosion magma granite quartz layer",
}
REPO = Path(__file__).resolve().parent.parent


def load_benchmark(name: str):
    """benchmarks/NAME.py imported as module NAME (registered in sys.modules: dataclasses look it up there)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


COMMON = "the a of and in to is was for on with as by that it from this were be".split()


def synthetic_documents(n_docs: int = 40, words: int = 300, seed: int = 0) -> list[dict]:
    """Documents on a few topics: each mixes common words with its topic's vocabulary."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    docs = []
    for i in range(n_docs):
        topic = names[i % len(names)]
        vocab = TOPICS[topic].split()
        text = " ".join(rng.choice(vocab) if rng.random() < 0.5 else rng.choice(COMMON) for _ in range(words))
        docs.append({"id": f"doc{i}", "title": f"{topic} {i}", "text": text + "."})
    return docs


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def write_toml(path: Path, sections: dict[str, dict]) -> Path:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def small_sections(**overrides: dict) -> dict[str, dict]:
    """A workspace for a fast database: lexical embedder, small vocabulary, small blocks."""
    sections = {
        "workspace": {"dir": "ws", "seed": 7},
        "corpus": {"train": ["corpus/*.jsonl"], "valid_fraction": 0.1},
        "tokenizer": {"vocab_size": 300},
        "db": {"chunk_length": 16, "embedder": "lexical", "index": "Flat", "block_size": 50,
               "num_neighbors_query": 4},
    }
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    return sections


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A workspace (test_pretrain.make_workspace) with two pretraining checkpoints (steps 1 and 2)."""
    from retrocli.config import load_config
    from retrocli.train.pretrain import run

    from .test_pretrain import make_workspace

    toml = make_workspace(tmp_path_factory.mktemp("trained"), pretrain={"train_steps": 2, "save_interval": 1,
                                                                         "keep_last": 0, "eval_interval": 2})
    run(load_config(toml))
    return toml


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models in one thread: more threads only contend on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_workspace(tmp_path: Path):
    """Factory: a TOML + corpus in tmp_path; returns the TOML path."""

    def make(n_docs: int = 40, words: int = 300, **overrides: dict) -> Path:
        write_jsonl(tmp_path / "corpus" / "docs.jsonl", synthetic_documents(n_docs, words))
        return write_toml(tmp_path / "retro.toml", small_sections(**overrides))

    return make


def run_cli(*args: str, env: dict | None = None, check: bool = False, stdin: str | None = None
            ) -> subprocess.CompletedProcess:
    """`python -m retrocli ARGS` in a subprocess (real exit codes, real process death); `stdin`: its input."""
    full_env = {**os.environ, "COLUMNS": "1000", **(env or {})}  # rich wraps at the width: keep paths whole
    proc = subprocess.run([sys.executable, "-m", "retrocli", *args], capture_output=True, text=True, env=full_env,
                          input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"retro {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli_in_process(capsys, *args: str) -> tuple[int, str]:
    """`retro ARGS` in this process (no interpreter and torch start-up): (exit code, stderr). For error paths,
    which end before any work that needs a process of its own."""
    from retrocli.cli import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err
