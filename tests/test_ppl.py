"""`retro ppl`: JSON output with and without retrieval, on the validation documents and on a file, the
perplexity / bits-per-byte arithmetic, and damaged or mismatched checkpoints."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from retrocli.cli import main
from retrocli.config import load_config
from retrocli.db import database
from retrocli.db.database import Database

from .conftest import write_jsonl

KEYS = {"perplexity", "bits_per_byte", "tokens", "retrieval", "checkpoint"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ppl_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["ppl", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def copy_workspace(toml: Path, dest: Path) -> Path:
    shutil.copytree(toml.parent, dest)
    return dest / toml.name


def test_ppl_json_with_and_without_retrieval(trained: Path, capsys) -> None:
    with_r = ppl_json(capsys, "-c", str(trained))
    without = ppl_json(capsys, "-c", str(trained), "--no-retrieval")
    assert set(with_r) == KEYS and set(without) == KEYS
    assert with_r["retrieval"] is True and without["retrieval"] is False
    assert with_r["checkpoint"].endswith("step-000002")  # the latest complete checkpoint by default
    ws = database.workspace_of(load_config(trained))
    valid = Database.open(ws, 16).store.docs
    valid = valid[valid["valid"]]
    assert with_r["tokens"] == without["tokens"] == int(valid["num_tokens"].sum()) + len(valid) - 1
    assert with_r["perplexity"] != without["perplexity"]  # the trained CCA changes the predictions
    assert 1.0 < with_r["perplexity"] < 400  # below the 300-token vocabulary's uniform guess, roughly
    full = json.loads((ws.root / "ppl" / "pretrain-step-000002-valid-retrieval.json").read_text())
    assert full["perplexity"] == pytest.approx(math.exp(full["nll"] / full["tokens"]))
    assert full["bits_per_byte"] == pytest.approx(full["nll"] / math.log(2) / full["bytes"])


def test_ppl_on_a_file_retrieves_on_the_fly(trained: Path, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "eval.jsonl", [{"text": "the star and the planet orbit the moon of a galaxy " * 6},
                                                 {"text": "flour butter and sugar in the oven"}])
    out = ppl_json(capsys, "-c", str(trained), "--data", str(data))
    off = ppl_json(capsys, "-c", str(trained), "--data", str(data), "--no-retrieval")
    assert out["retrieval"] is True and off["retrieval"] is False and out["tokens"] == off["tokens"] > 0
    assert out["perplexity"] != off["perplexity"]
    assert main(["ppl", "-c", str(trained), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["ppl", "-c", str(trained)]) == 0  # the table
    assert "retro ppl" in capsys.readouterr().err


def test_damaged_checkpoint_falls_back_to_the_previous_one(trained: Path, tmp_path: Path, capsys) -> None:
    toml = copy_workspace(trained, tmp_path / "copy")
    run = database.workspace_of(load_config(toml)).run_dir()
    weights = run / "step-000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10:] = b"0123456789"
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["ppl", "-c", str(toml), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["checkpoint"].endswith("step-000001")
    assert "falling back to step-000001" in captured.err and "checksum" in captured.err
    # asked for by name, the damaged checkpoint is a clear error
    assert main(["ppl", "-c", str(toml), "--checkpoint", str(run / "step-000002")]) == 2
    assert "cannot be loaded" in capsys.readouterr().err
    # a checkpoint made with another tokenizer: an error naming both vocabularies
    meta_path = run / "step-000001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer"]["vocab_size"] = 8000
    meta_path.write_text(json.dumps(meta))
    assert main(["ppl", "-c", str(toml), "--checkpoint", str(run / "step-000001")]) == 2
    err = capsys.readouterr().err
    assert "8000" in err and "300" in err


def test_ppl_without_a_checkpoint_says_what_to_run(trained: Path, tmp_path: Path, capsys) -> None:
    toml = copy_workspace(trained, tmp_path / "copy")
    shutil.rmtree(database.workspace_of(load_config(toml)).run_dir())
    capsys.readouterr()
    assert main(["ppl", "-c", str(toml)]) == 2
    assert "retro pretrain" in capsys.readouterr().err
