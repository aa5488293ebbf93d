"""What retro reads back is what it wrote, and only that: stage fingerprints come from content and settings
(a rebuilt identical tokenizer and an identically built workspace elsewhere keep every checkpoint usable, a
different tokenizer is still refused), checkpoints are data and never code (a crafted pickle is refused before
it runs), and readers search a database with the settings it was built with."""

from __future__ import annotations

import json
import math
import pathlib
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from retrocli.config import load_config
from retrocli.db import build as db
from retrocli.db import database
from retrocli.train import checkpoint
from retrocli.train.pretrain import run
from retrocli.workspace import sha256_file

from .conftest import run_cli, small_sections, synthetic_documents, write_jsonl, write_toml
from .test_pretrain import ONE_THREAD, make_workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRETRAIN = {"train_steps": 2, "save_interval": 2, "keep_last": 0, "eval_interval": 2}


@pytest.fixture(scope="module")
def trained_a(tmp_path_factory) -> Path:
    """Workspace A: a database and a pretraining checkpoint at step 2."""
    toml = make_workspace(tmp_path_factory.mktemp("a"), pretrain=PRETRAIN)
    run(load_config(toml))
    return toml


@pytest.fixture(scope="module")
def built_b(tmp_path_factory) -> Path:
    """Workspace B: built from the same recipe and corpus as A, in another folder, at another time."""
    return make_workspace(tmp_path_factory.mktemp("b"), pretrain=PRETRAIN)


def ws_of(toml: Path):
    return database.workspace_of(load_config(toml))


def step2(toml: Path) -> Path:
    return ws_of(toml).run_dir() / "step-000002"


def copy_workspace(toml: Path, dest: Path) -> Path:
    shutil.copytree(toml.parent, dest)
    return dest / toml.name


def rewrite_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def swap_file(step: Path, old: str, new: str, data: bytes) -> None:
    """Replace `old` by `new` (holding `data`) in a checkpoint folder, with meta.json listing it: what someone
    handing on a checkpoint can do."""
    (step / old).unlink()
    (step / new).parent.mkdir(parents=True, exist_ok=True)
    (step / new).write_bytes(data)

    def relist(meta):
        meta["files"].pop(old)
        meta["files"][new] = {"bytes": len(data), "sha256": sha256_file(step / new)}
    rewrite_json(step / "meta.json", relist)


class Touch:
    """Unpickled, it creates `path`: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


# ---------------------------------------------------------------------------------- content fingerprints


def test_identical_builds_have_identical_fingerprints(trained_a: Path, built_b: Path) -> None:
    """Every stage of two workspaces built from the same recipe and corpus has the same fingerprint (the
    build times are recorded, not fingerprinted); the tokenizer's is its content's."""
    a, b = ws_of(trained_a), ws_of(built_b)
    for stage in db.DB_STAGES:
        ma, mb = a.require(stage), b.require(stage)
        assert ma["fingerprint"] == mb["fingerprint"], stage
        assert "finished" in ma and "seconds" in ma["counts"]
    sha = a.require("tokenizer")["counts"]["sha256"]
    assert sha == sha256_file(a.tokenizer_model) == sha256_file(b.tokenizer_model)


def test_a_checkpoint_works_with_an_identically_built_workspace(trained_a: Path, built_b: Path) -> None:
    """A's checkpoint folder copied into B: `retro ppl` in B uses it."""
    dest = ws_of(built_b).run_dir() / "step-000002"
    shutil.copytree(step2(trained_a), dest)
    proc = run_cli("ppl", "-c", str(built_b), "--json", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["checkpoint"] == str(dest)


def test_rebuilding_the_tokenizer_keeps_the_checkpoints(trained_a: Path, tmp_path: Path) -> None:
    toml = copy_workspace(trained_a, tmp_path / "a")
    before = ws_of(toml).require("tokenizer")
    run_cli("db", "build", "-c", str(toml), "--rebuild", "tokenizer", check=True)
    after = ws_of(toml).require("tokenizer")
    assert after["finished"] != before["finished"]  # it was made again...
    assert after["fingerprint"] == before["fingerprint"]  # ...and is the same tokenizer
    assert run_cli("ppl", "-c", str(toml), "--json", env=ONE_THREAD).returncode == 0


def test_a_workspace_with_another_tokenizer_is_refused_naming_both(trained_a: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "corpus" / "docs.jsonl", synthetic_documents(24, 120, seed=5))
    toml = write_toml(tmp_path / "retro.toml", small_sections())
    db.build(load_config(toml))
    theirs = checkpoint.read_meta(step2(trained_a))["tokenizer"]
    ours = checkpoint.tokenizer_ref(ws_of(toml))
    assert theirs["vocab_size"] == ours["vocab_size"] and theirs["sha256"] != ours["sha256"]
    proc = run_cli("ppl", "-c", str(toml), "--checkpoint", str(step2(trained_a)))
    assert proc.returncode == 2
    assert theirs["sha256"][:16] in proc.stderr and ours["sha256"][:16] in proc.stderr
    assert theirs["path"] in proc.stderr and ours["path"] in proc.stderr


def test_checkpoints_from_before_the_content_sha256_keep_working(trained_a: Path, tmp_path: Path) -> None:
    """A checkpoint that names its tokenizer by stage fingerprint alone (written before the sha256 was
    recorded) is accepted by the workspace tokenizer of that fingerprint, also after a rebuild that makes the
    same content again, and refused elsewhere with what to do."""
    toml = copy_workspace(trained_a, tmp_path / "old")
    ws = ws_of(toml)

    def old_stage(meta):  # as a tokenizer stage finished before: no sha256, a fingerprint with the build time
        meta["counts"].pop("sha256")
        meta.pop("earlier_fingerprints")
        meta["fingerprint"] = "0ld0ld0ld0ld0ld0"
    rewrite_json(ws.meta_path("tokenizer"), old_stage)

    def old_checkpoint(meta):
        meta["tokenizer"] = {k: meta["tokenizer"][k] for k in ("path", "vocab_size", "type")}
        meta["tokenizer"]["fingerprint"] = "0ld0ld0ld0ld0ld0"
    rewrite_json(step2(toml) / "meta.json", old_checkpoint)
    assert run_cli("ppl", "-c", str(toml), "--json", env=ONE_THREAD).returncode == 0

    run_cli("db", "build", "-c", str(toml), "--rebuild", "tokenizer", check=True)
    assert ws.require("tokenizer")["earlier_fingerprints"] == ["0ld0ld0ld0ld0ld0"]
    assert run_cli("ppl", "-c", str(toml), "--json", env=ONE_THREAD).returncode == 0

    rewrite_json(step2(toml) / "meta.json", lambda m: m["tokenizer"].update(fingerprint="e1sewhere0000000"))
    proc = run_cli("ppl", "-c", str(toml))
    assert proc.returncode == 2
    assert "fingerprint e1sewhere0000000" in proc.stderr and ws.require("tokenizer")["fingerprint"] in proc.stderr
    assert "use the workspace it was trained in" in proc.stderr


# ------------------------------------------------------------------------------- checkpoints are data


def test_trainer_state_round_trips_without_pickle(tmp_path: Path) -> None:
    shared = torch.arange(3.0)
    state = {"optimizer": {"state": {"w": {"step": torch.tensor(2.0), "exp_avg": shared}},
                           "param_groups": [{"betas": (0.9, 0.95), "params": ["w"], "lr": 1e-3, "foreach": None}]},
             "step": 2, "rng": {"torch": torch.get_rng_state(), "cuda": None}, "by_id": {3: "x"},
             "again": shared, "nan": math.inf}
    run = tmp_path / "run"
    path = checkpoint.save(run, 2, {"w": torch.ones(2)}, state, {}, "")
    assert not list(path.glob("*.pt"))
    back = checkpoint.load_trainer_state(path)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert back["by_id"] == {3: "x"} and back["step"] == 2 and back["nan"] == math.inf
    assert torch.equal(back["optimizer"]["state"]["w"]["exp_avg"], shared) and torch.equal(back["again"], shared)
    assert torch.equal(back["rng"]["torch"], torch.get_rng_state()) and back["rng"]["torch"].dtype == torch.uint8


def test_a_crafted_trainer_pickle_is_refused_before_it_runs(trained_a: Path, tmp_path: Path) -> None:
    toml = copy_workspace(trained_a, tmp_path / "ws")
    step = step2(toml)
    marker, proof = tmp_path / "pwned", tmp_path / "proof"
    torch.save({"step": 2, "x": Touch(proof)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)  # the payload works where a pickle is trusted
    assert proof.exists()
    torch.save({"step": 2, "x": Touch(marker)}, tmp_path / "evil.pt")
    swap_file(step, checkpoint.TRAINER, checkpoint.OLD_TRAINER, (tmp_path / "evil.pt").read_bytes())
    proc = run_cli("pretrain", "-c", str(toml), "--set", "pretrain.train_steps=3", env=ONE_THREAD)
    assert proc.returncode == 2
    assert not marker.exists()
    said = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(said) == 1 and str(step / "trainer.pt") in said[0] and "Traceback" not in proc.stderr
    assert not (ws_of(toml).run_dir() / "step-000003").exists()


def test_an_old_trainer_pt_still_resumes(trained_a: Path, tmp_path: Path) -> None:
    """A trainer.pt as retro wrote it before (optimizer, data and RNG state) loads weights-only, and the run
    continues from it."""
    toml = copy_workspace(trained_a, tmp_path / "ws")
    step = step2(toml)
    torch.save(checkpoint.load_trainer_state(step), tmp_path / "old.pt")
    swap_file(step, checkpoint.TRAINER, checkpoint.OLD_TRAINER, (tmp_path / "old.pt").read_bytes())
    proc = run_cli("pretrain", "-c", str(toml), "--set", "pretrain.train_steps=3", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert "resuming pretrain" in proc.stdout + proc.stderr
    assert (ws_of(toml).run_dir() / "step-000003" / checkpoint.TRAINER).is_file()


def test_a_crafted_shard_metadata_pickle_is_refused_before_it_runs(trained_a: Path, tmp_path: Path) -> None:
    """A sharded checkpoint's `.metadata` is a pickle written by torch.distributed.checkpoint: it is read
    through an allow-list, so one naming anything else is refused unrun."""
    toml = copy_workspace(trained_a, tmp_path / "ws")
    step = step2(toml)
    marker = tmp_path / "pwned"
    swap_file(step, checkpoint.WEIGHTS, "shards/.metadata", pickle.dumps(Touch(marker)))
    proc = run_cli("ppl", "-c", str(toml))
    assert proc.returncode == 2 and not marker.exists()
    assert str(step / "shards" / ".metadata") in proc.stderr and "pathlib.Path.touch" in proc.stderr


def test_a_real_shard_metadata_loads_through_the_allow_list(tmp_path: Path) -> None:
    """What torch.distributed.checkpoint writes (weights and an AdamW state) passes the allow-list."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=str(tmp_path / "step" / checkpoint.SHARDS))
    weights = checkpoint.load_weights(tmp_path / "step")
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------- readers read as built


def test_readers_use_the_settings_the_database_was_built_with(tmp_path: Path) -> None:
    """Built with `--set db.embedder=lexical` (the TOML names none: MiniLM by default): `db query` without the
    --set searches as built (the same results) and says so in one warning line; `db add`, a writer, refuses."""
    write_jsonl(tmp_path / "corpus" / "docs.jsonl", synthetic_documents(24, 120))
    sections = small_sections()
    del sections["db"]["embedder"]
    toml = write_toml(tmp_path / "retro.toml", sections)
    lexical = ("--set", "db.embedder=lexical")
    run_cli("db", "build", "-c", str(toml), *lexical, check=True)

    asked = run_cli("db", "query", "-c", str(toml), "star planet orbit", "--json", *lexical, check=True)
    plain = run_cli("db", "query", "-c", str(toml), "star planet orbit", "--json", check=True)
    assert json.loads(plain.stdout) == json.loads(asked.stdout) and json.loads(plain.stdout)
    assert "db.embedder" not in asked.stderr
    warned = [line for line in plain.stderr.splitlines() if "db.embedder" in line]
    assert len(warned) == 1 and "'lexical'" in warned[0] and "'all-MiniLM-L6-v2'" in warned[0]
    info = run_cli("db", "info", "-c", str(toml), "--json", check=True)
    assert json.loads(info.stdout)["stages"]["embed"]["settings"]["embedder"] == "lexical"
    assert "db.embedder 'lexical' (the config: 'all-MiniLM-L6-v2')" in info.stderr

    extra = write_jsonl(tmp_path / "more.jsonl", [{"id": "new1", "text": "a comet and a nebula " * 20}])
    added = run_cli("db", "add", "-c", str(toml), str(extra))
    assert added.returncode == 2
    assert "db.embedder" in added.stderr and "'lexical'" in added.stderr and "'all-MiniLM-L6-v2'" in added.stderr
    assert not (database.workspace_of(load_config(toml)).db / "edits" / "manifest.json").exists()


def test_a_reader_may_choose_how_hard_to_search_with_set(tmp_path: Path) -> None:
    """The search knobs (nprobe, ef_search, rerank) given by --set are this run's choice: no warning, and the
    searcher gets them; structural keys (the embedder) still come from the database; verify keeps the built ones."""
    write_jsonl(tmp_path / "corpus" / "docs.jsonl", synthetic_documents(24, 120))
    toml = write_toml(tmp_path / "retro.toml", small_sections(db={"index": "IVF4,Flat", "nprobe": 1}))
    run_cli("db", "build", "-c", str(toml), check=True)
    cfg = load_config(toml, ["db.nprobe=4", "db.embedder=all-MiniLM-L6-v2"])
    ws = database.workspace_of(cfg)
    d = database.as_built(cfg, ws)
    assert (d.nprobe, d.embedder) == (4, "lexical")
    assert database.as_built(cfg, ws, knobs=False).nprobe == 1
    proc = run_cli("db", "query", "-c", str(toml), "--set", "db.nprobe=4", "star planet orbit", check=True)
    assert "db.nprobe" not in proc.stderr
    proc = run_cli("db", "verify", "-c", str(toml), "--set", "db.nprobe=4", "--fraction", "1", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["recomputed"]["neighbours"]["rows_identical"] == 1.0
