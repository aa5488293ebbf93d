"""The command line as a new user meets it, through the installed `retro` executable: every usage mistake is one
message naming the problem with exit code 2 and changes no file of the workspace; help, version, completion,
`retro init` and `retro config` keep the README's promises."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO, small_sections, synthetic_documents, write_jsonl, write_toml

RETRO = Path(sys.executable).with_name("retro")  # the console script `make install` puts beside the interpreter


def retro(*args: str, cwd: Path | None = None, env: dict | None = None, stdin: str | None = None
          ) -> subprocess.CompletedProcess:
    assert RETRO.is_file(), f"{RETRO} is missing: install the package (make install)"
    full_env = {**os.environ, "COLUMNS": "200", "RETRO_PROGRESS": "0", **(env or {})}
    return subprocess.run([str(RETRO), *args], capture_output=True, text=True, cwd=cwd, env=full_env, input=stdin,
                          timeout=300)


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `folder`: size, modification time and content hash."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                          hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A workspace with a built database (lexical embedder: seconds); returns its TOML."""
    root = tmp_path_factory.mktemp("cli")
    write_jsonl(root / "corpus" / "docs.jsonl", synthetic_documents(30, 200))
    toml = write_toml(root / "retro.toml", small_sections())
    proc = retro("db", "build", "-c", str(toml))
    assert proc.returncode == 0, proc.stderr
    return toml


def first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


# Each mistake: the arguments ({T}: the built workspace's TOML, {D}: its folder) and words the first line says.
MISTAKES = [
    (["pretrian"], "No such command 'pretrian'. Did you mean 'pretrain'?"),
    (["db", "biuld"], "Did you mean 'build'?"),
    (["--verison"], "No such option: --verison"),
    (["-x"], "No such option: -x"),
    (["init"], "give a folder for the new workspace"),
    (["init", "{D}/new.toml"], "takes a folder, not a TOML file"),
    (["init", "{D}/corpus/docs.jsonl"], "not a folder"),
    (["init", "{D}/fresh", "--recipe", "nope"], "recipe 'nope' not found"),
    (["db", "query", "-c", "{T}", "-k", "abc", "star"], "Invalid value for '-k'"),
    (["db", "query", "-c", "{T}", "-k", "0", "star"], "-k must be in 1.."),
    (["db", "query", "-c", "{T}", ""], "a query text is empty"),
    (["db", "query", "-c", "{T}"], "give a query text"),
    (["db", "query", "-c", "{T}", "--file", "{D}/none.txt"], "--file"),
    (["pretrain", "-c", "{T}", "--set", "db.nprobe=1", "b=2"], "unexpected extra argument"),
    (["pretrain", "--sett", "x"], "No such option: --sett"),
    (["pretrain", "-c"], "requires an argument"),
    (["score", "-c", "x.toml"], "No such option: -c"),
    (["score"], "Missing argument"),
    (["score", "{D}/none.jsonl"], "none.jsonl"),
    (["db", "info", "-c", "{D}/none.toml"], "none.toml not found"),
    (["db", "info", "-c", "{T}", "--set", "nodot=1"], "expected section.key=value"),
    (["db", "info", "-c", "{T}", "--set", "db.nprob=3"], "did you mean 'db.nprobe'?"),
    (["db", "info", "-c", "{T}", "--set", "modle.layers=3"], "did you mean [model]?"),
    (["db", "info", "-c", "{T}", "--set", "corpus.train=foo.txt"], "--set corpus.train='[\"foo.txt\"]'"),
    (["db", "info", "-c", "{T}", "--set", "model.layers=abc"], "'model.layers' must be an integer"),
    (["pretrain", "-c", "{T}", "--set", "pretrain.precision=fp8"], "invalid values"),
    (["db", "build", "-c", "{T}", "--rebuild", "nope"], "--rebuild 'nope'"),
    (["db", "verify", "-c", "{T}", "--fraction", "abc"], "Invalid value for '--fraction'"),
    (["db", "verify", "-c", "{T}", "--fraction", "2"], "--fraction"),
    (["db", "add", "-c", "{T}"], "Missing argument"),
    (["db", "add", "-c", "{T}", "{D}/none.txt"], "retro db add: "),
    (["db", "remove", "-c", "{T}"], "say what to remove"),
    (["generate", "-c", "{T}"], "--prompt"),
    (["generate", "-c", "{T}", "task.json", "--prompt", "hi"], "not both"),
    (["generate", "-c", "{T}", "--format", "xml", "task.json"], "--format 'xml'"),
    (["generate", "-c", "{T}", "--limit", "-1", "task.json"], "--limit"),
    (["ppl", "-c", "{T}", "--checkpoint", "{D}/nope"], "not found"),
    (["config", "check", "-c", "{T}", "--set", "db.nprobe=0"], "db.nprobe must be positive"),
    (["config", "shw"], "Did you mean 'show'?"),
]


@pytest.mark.parametrize("args,says", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_a_usage_mistake_is_one_message_exit_2_and_changes_nothing(built: Path, args: list[str], says: str):
    folder = built.parent
    before = snapshot(folder)
    proc = retro(*[a.replace("{T}", str(built)).replace("{D}", str(folder)) for a in args], cwd=folder)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    line = first_line(proc.stderr)
    assert line.startswith("error: ") and says in line, proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr  # the message (and where help is), no more
    assert snapshot(folder) == before


def test_a_value_given_by_set_is_named_so(built: Path):
    proc = retro("db", "info", "-c", str(built), "--set", "db.nprobe=0")
    assert proc.returncode == 2 and "db.nprobe must be positive, got 0 (given by --set)" in proc.stderr
    assert f"in {built}" not in proc.stderr


def test_bare_retro_and_a_bare_group_show_their_help_with_exit_2():
    for args, verbs in (([], ("init", "pretrain", "db", "config")), (["db"], ("build", "query", "add"))):
        proc = retro(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
        assert "Usage: retro" in proc.stdout + proc.stderr
        assert all(v in proc.stdout + proc.stderr for v in verbs)


VERBS = [["init"], ["db", "build"], ["db", "query"], ["db", "info"], ["db", "verify"], ["db", "add"],
         ["db", "remove"], ["pretrain"], ["ppl"], ["sft"], ["generate"], ["score"], ["reproduce"],
         ["config", "show"], ["config", "check"]]


@pytest.mark.parametrize("verb", VERBS, ids=[" ".join(v) for v in VERBS])
def test_every_verb_has_short_help_with_examples_and_bare_flags(verb: list[str]):
    for flag in ("-h", "--help"):
        proc = retro(*verb, flag)
        assert proc.returncode == 0, proc.stderr
        assert "Examples" in proc.stdout and f"retro {' '.join(verb)}" in proc.stdout.split("Examples", 1)[1]
        assert "<bool>" not in proc.stdout  # a flag takes no value, and --help says so


def test_version_names_the_package_torch_faiss_and_the_device():
    proc = retro("--version")
    assert proc.returncode == 0, proc.stderr
    from importlib.metadata import version

    import faiss
    import torch

    assert f"retro {version('retrocli')}" in proc.stdout
    assert f"torch {torch.__version__}" in proc.stdout and ("CUDA" in proc.stdout)
    assert f"faiss {faiss.__version__}" in proc.stdout


def test_shell_completion_is_enabled():
    proc = retro("--show-completion", "bash")
    assert proc.returncode == 0 and "_RETRO_COMPLETE" in proc.stdout
    proc = retro(env={"_RETRO_COMPLETE": "complete_bash", "COMP_WORDS": "retro db bu", "COMP_CWORD": "2"})
    assert proc.returncode == 0 and proc.stdout.split() == ["build"]
    proc = retro(env={"_RETRO_COMPLETE": "complete_bash", "COMP_WORDS": "retro pre", "COMP_CWORD": "1"})
    assert proc.stdout.split() == ["pretrain"]


# ------------------------------------------------------------------------------------------------ init


def test_init_keeps_every_artefact_inside_its_folder(tmp_path: Path):
    """Two workspaces made beside each other share nothing: each database is built inside its own folder."""
    for name in ("ws1", "ws2"):
        proc = retro("init", name, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert f"retro db build -c {name}/retro.toml" in proc.stderr
    shown = retro("config", "show", "-c", "ws2/retro.toml", cwd=tmp_path)
    assert shown.returncode == 0 and 'dir = "."  # file' in shown.stdout
    for name in ("ws1", "ws2"):
        proc = retro("db", "build", "-c", f"{name}/retro.toml", "--set", "db.embedder=lexical",
                     "--set", "tokenizer.vocab_size=1000", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / name / "db" / "neighbours" / "meta.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws1", "ws2"]  # nothing written beside them
    before = snapshot(tmp_path)
    proc = retro("init", "ws1", cwd=tmp_path)
    assert proc.returncode == 2 and "already exists" in proc.stderr and snapshot(tmp_path) == before


def test_init_from_a_recipe_elsewhere_keeps_its_paths(tmp_path: Path):
    """Relative paths of the recipe (corpus files, SFT data) still point at the same files from the new folder."""
    (tmp_path / "recipes").mkdir()
    recipe = write_toml(tmp_path / "recipes" / "mine.toml", {
        "workspace": {"dir": "../runs/mine"}, "corpus": {"train": ["data/*.jsonl", "builtin:tiny"]},
        "db": {"embedder": "all-MiniLM-L6-v2"}, "reproduce": {"qa_task": "builtin:tiny-cloze-test",
                                                               "ppl_data": ["data/held.txt"]}})
    proc = retro("init", str(tmp_path / "elsewhere" / "ws"), "--recipe", str(recipe))
    assert proc.returncode == 0, proc.stderr
    shown = retro("config", "show", "-c", str(tmp_path / "elsewhere" / "ws" / "retro.toml")).stdout
    data = str(tmp_path / "recipes" / "data")
    assert f'train = ["{data}/*.jsonl", "builtin:tiny"]' in shown
    assert f'ppl_data = ["{data}/held.txt"]' in shown and 'qa_task = "builtin:tiny-cloze-test"' in shown
    assert 'embedder = "all-MiniLM-L6-v2"' in shown and 'dir = "."' in shown


def test_init_lists_the_recipes_with_their_descriptions():
    proc = retro("init", "--list")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.stem for p in (REPO / "recipes").glob("*.toml"))
    assert names and all(n in proc.stdout for n in names)
    assert "copy-cpu" in proc.stdout and "2 CPU cores" in proc.stdout


def test_a_built_wheel_carries_the_recipes_and_init_works_from_it(tmp_path: Path):
    """`pip install .` (not -e): the recipes travel inside the wheel, and `retro init --recipe tiny` finds them."""
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], check=True, capture_output=True)
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"], check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("retrocli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "retrocli/recipe_files/tiny.toml" in names and "retrocli/cli.py" in names
    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import sys, retrocli; from retrocli.cli import main; assert retrocli.__file__.startswith(sys.argv[1]), "
            "retrocli.__file__; sys.exit(main(['init', sys.argv[2], '--recipe', 'tiny']))")
    proc = subprocess.run([sys.executable, "-c", code, str(target), str(tmp_path / "ws")], capture_output=True,
                          text=True, env=env, cwd=tmp_path)  # (not the checkout: `python -c` imports from the cwd)
    assert proc.returncode == 0, proc.stderr
    assert 'train = ["builtin:tiny"]' in (tmp_path / "ws" / "retro.toml").read_text()


# ---------------------------------------------------------------------------------------------- config


def test_config_show_marks_where_each_value_came_from(tmp_path: Path):
    write_toml(tmp_path / "base.toml", {"workspace": {"dir": "runs/x"}, "db": {"nprobe": 8, "ef_search": 9}})
    top = tmp_path / "top.toml"
    top.write_text('extends = "base.toml"\n[db]\nnprobe = 16\n')
    proc = retro("config", "show", "-c", str(top), "--set", "db.ef_search=11")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "nprobe = 16  # file" in lines and "ef_search = 11  # --set" in lines
    assert f'dir = "runs/x"  # extends {tmp_path / "base.toml"}' in lines
    assert "chunk_length = 64  # default" in lines
    import tomllib

    shown = tomllib.loads(proc.stdout)  # valid TOML: it can be saved and used
    assert shown["db"]["nprobe"] == 16 and shown["db"]["ef_search"] == 11


def test_config_check_is_exit_0_or_2_for_every_recipe():
    for recipe in sorted((REPO / "recipes").glob("*.toml")):
        proc = retro("config", "check", "-c", str(recipe), env={"DATA_DIR": "/nonexistent"})
        assert proc.returncode == 0, (recipe, proc.stderr)
        assert "valid" in proc.stderr


# ------------------------------------------------------------------------------------------------ db query


def test_db_query_json_has_one_shape_for_any_number_of_queries(built: Path):
    one = json.loads(retro("db", "query", "-c", str(built), "--json", "-k", "2", "star planet").stdout)
    two = json.loads(retro("db", "query", "-c", str(built), "--json", "-k", "2", "star planet", "boat sail").stdout)
    assert [q["query"] for q in one] == ["star planet"] and [q["query"] for q in two] == ["star planet", "boat sail"]
    assert one[0]["results"] == two[0]["results"] and len(two[1]["results"]) == 2
