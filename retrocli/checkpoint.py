"""Checkpoints: one folder per step, written atomically, verified when read.

    <run>/step-000500/
        model.safetensors   the weights (fp32)
        trainer.pt          optimizer state, data-loader state (samples consumed), RNG states
        config.toml         the resolved workspace configuration (every key documented)
        meta.json           step, model config, chunk length, pad id, tokenizer reference, sha256 of each file

A run sharded with FSDP over several processes writes instead of model.safetensors and the optimizer state
`shards/`: torch.distributed.checkpoint files, each rank its own shard, nothing gathered on one process.
They load into any number of processes, sharded or not (DCP reshards on load), and `load_weights` gives
the full weights in one process for ppl, generate and init_from.

The folder is written under a temporary name (`.step-000500.tmp-PID`) and renamed into place, and
meta.json, which lists every file with its size and sha256, is written last: a folder without a readable
meta.json or whose files do not match it is incomplete or corrupt and is never loaded; `latest` falls back
to the previous complete checkpoint and says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import UserError
from .runtime import fault_point, warn
from .workspace import sha256_file, write_failed

STEP_DIR = re.compile(r"^step-(\d+)$")
WEIGHTS, TRAINER, CONFIG, META = "model.safetensors", "trainer.pt", "config.toml", "meta.json"
SHARDS = "shards"  # torch.distributed.checkpoint files of a sharded (FSDP) run
FORMAT = 1


def step_dir(run: Path, step: int) -> Path:
    return run / f"step-{step:06d}"


def tokenizer_ref(ws) -> dict[str, Any]:
    """What identifies the workspace tokenizer: its file, the fingerprint of its stage, its vocabulary."""
    meta = ws.require("tokenizer")
    return {"path": str(ws.tokenizer_model), "fingerprint": meta["fingerprint"],
            "vocab_size": meta["counts"]["vocab_size"], "type": meta["settings"]["type"]}


def save(run: Path, step: int, weights: dict[str, torch.Tensor] | None, trainer_state: dict[str, Any],
         meta: dict[str, Any], config_toml: str, fault: str = "pretrain:checkpoint",
         shards: dict[str, Any] | None = None) -> Path:
    """Write step-NNNNNN/ atomically; returns its path. `meta` gets step, files and format added.

    One process (rank 0) writes `weights`; or, with `shards` (model and optimizer state dicts of DTensor
    shards), every rank calls this and writes its own shard into the same temporary folder, then rank 0
    finishes it."""
    from safetensors.torch import save_file

    from .runtime import dist

    D = dist()
    final = step_dir(run, step)
    tmp = run / f".{final.name}.tmp-{'sharded' if shards is not None else os.getpid()}"
    try:
        if D.main or shards is None:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        if shards is not None:
            import torch.distributed.checkpoint as dcp

            D.barrier()
            try:
                dcp.save(shards, checkpoint_id=str(tmp / SHARDS))
            except Exception as e:  # a full disk surfaces as DCP's own error type
                raise write_failed(final, e) from None
            D.barrier()
            if not D.main:
                return final
        state = {k: v.detach().contiguous().cpu() for k, v in (weights or {}).items()}
        try:
            if weights is not None:
                save_file(state, str(tmp / WEIGHTS))
            torch.save(trainer_state, tmp / TRAINER)
        except Exception as e:  # safetensors and torch.save report a full disk in their own error types
            raise write_failed(final, e) from None
        fault_point(fault)  # tests die here: what is left is a temporary folder, never a step folder
        (tmp / CONFIG).write_text(config_toml, encoding="utf-8")
        names = [str(f.relative_to(tmp)) for f in sorted(tmp.rglob("*")) if f.is_file()]
        files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in names}
        full = {**meta, "format": FORMAT, "step": step, "files": files, "sharded": shards is not None}
        (tmp / META).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name in [*names, META]:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # a rerun of the same step (e.g. after a crash right after this rename)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(final, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def problem(path: Path) -> str | None:
    """Why the checkpoint folder cannot be loaded, or None when it is complete and intact."""
    meta_path = path / META
    if not meta_path.is_file():
        return "no meta.json (incomplete)"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"meta.json is damaged ({e})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
        return "meta.json is not a retro checkpoint description"
    for name, info in meta["files"].items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, meta.json says {info['bytes']}"
        if sha256_file(f) != info["sha256"]:
            return f"{name} does not match its checksum"
    return None


def read_meta(path: Path) -> dict[str, Any]:
    """The meta.json of a verified checkpoint folder; a UserError naming the problem otherwise."""
    if not path.is_dir():
        raise UserError(f"checkpoint {path} not found (a checkpoint is a step-NNNNNN folder)")
    why = problem(path)
    if why is not None:
        raise UserError(f"checkpoint {path} cannot be loaded: {why}")
    return json.loads((path / META).read_text(encoding="utf-8"))


def complete_steps(run: Path) -> list[Path]:
    """The step folders of a run, newest first (not yet verified)."""
    if not run.is_dir():
        return []
    found = [(int(mt.group(1)), p) for p in run.iterdir() if p.is_dir() and (mt := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def in_folder(path: Path, what: str) -> Path:
    """`path` when it is a step folder; for a run folder, its latest complete checkpoint (`what` names the
    option in the error, e.g. "--checkpoint")."""
    if path.is_dir() and not (path / META).exists() and complete_steps(path):
        found = latest(path)
        if found is None:
            raise UserError(f"{what} {path}: no complete checkpoint in this folder")
        return found
    return path


def latest(run: Path, announce: bool = True) -> Path | None:
    """The newest complete, intact checkpoint of a run; skipped damaged ones are reported."""
    skipped = []
    for path in complete_steps(run):
        why = problem(path)
        if why is None:
            if skipped and announce:
                warn(f"skipping checkpoint(s) {', '.join(skipped)}; falling back to {path.name}")
            return path
        skipped.append(f"{path.name} ({why})")
    if skipped and announce:
        warn(f"no complete checkpoint in {run}: skipped {', '.join(skipped)}")
    return None


def prune(run: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step folders (0: all) and remove temporary folders of dead writers."""
    for p in run.glob(".step-*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    if keep_last > 0:
        for p in complete_steps(run)[keep_last:]:
            shutil.rmtree(p, ignore_errors=True)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights, by parameter name (from a sharded checkpoint: its shards put together)."""
    from safetensors.torch import load_file

    if (path / SHARDS).is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        found = FileSystemReader(str(path / SHARDS)).read_metadata().state_dict_metadata
        weights = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in found.items()
                   if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": weights}, checkpoint_id=str(path / SHARDS))
        return weights
    return load_file(str(path / WEIGHTS))


def load_sharded_optimizer(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Fill the optimizer of `model` (sharded or not, any number of processes) from a sharded checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optim": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path / SHARDS))
    set_optimizer_state_dict(model, optimizer, state["optim"])


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / TRAINER, map_location="cpu", weights_only=False)


def model_config_of(meta: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**meta["model"])


def check_tokenizer(meta: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """A checkpoint must be used with the tokenizer it was trained with: an error naming both otherwise."""
    theirs = meta.get("tokenizer") or {}
    if theirs.get("vocab_size") != current["vocab_size"]:
        raise UserError(f"checkpoint {path} was trained with a tokenizer of vocabulary {theirs.get('vocab_size')} "
                        f"({theirs.get('path')}), but the workspace tokenizer {current['path']} has vocabulary "
                        f"{current['vocab_size']}: use the workspace the checkpoint was trained in, or a checkpoint "
                        f"trained with this tokenizer")
    if theirs.get("fingerprint") != current["fingerprint"]:
        raise UserError(f"checkpoint {path} was trained with tokenizer {theirs.get('path')} (fingerprint "
                        f"{theirs.get('fingerprint')}), but the workspace tokenizer {current['path']} has fingerprint "
                        f"{current['fingerprint']}: the token ids would not mean the same thing")


def model_meta(cfg: ModelConfig, chunk_length: int, pad_id: int, tok_ref: dict[str, Any],
               retro_layers: list[int]) -> dict[str, Any]:
    return {"model": dataclasses.asdict(cfg), "chunk_length": chunk_length, "pad_id": pad_id,
            "tokenizer": tok_ref, "retro_layers": retro_layers, "kind": "retro" if retro_layers else "gpt"}
