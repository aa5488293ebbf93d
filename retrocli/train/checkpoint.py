"""Checkpoints: one folder per step, written atomically, verified when read.

    <run>/step-000500/
        model.safetensors   the weights (fp32; a decoder imported in bf16 and kept frozen stays bf16)
        trainer.safetensors optimizer state, data-loader state (samples consumed), RNG states: the tensors, and the
                            rest as JSON in its header (checkpoints before it: trainer.pt, read weights-only)
        config.toml         the resolved workspace configuration (every key documented)
        meta.json           step, model config, chunk length, pad id, tokenizer (content sha256), sha256 of each file

Nothing in a checkpoint is unpickled as Python objects: a checkpoint from elsewhere is data, never code
(safetensors and JSON; an old trainer.pt and the sharded `.metadata` through allow-listing unpicklers).

A run sharded with FSDP over several processes writes instead of model.safetensors and the optimizer state
`shards/`: torch.distributed.checkpoint files, each rank its own shard, nothing gathered on one process.
They load into any number of processes, sharded or not (DCP reshards on load), and `load_weights` gives
the full weights in one process for ppl, generate and init_from.

The verbs after training find a checkpoint here too: `resolve_checkpoint` turns a step or run folder (or
nothing: the latest of a run) into a step folder, and `load_model` gives its model, checked against the
workspace tokenizer.

The folder is written under a temporary name (`.step-000500.tmp-PID`) and renamed into place, and
meta.json, which lists every file with its size and sha256, is written last: a folder without a readable
meta.json or whose files do not match it is incomplete or corrupt and is never loaded; `latest` falls back
to the previous complete checkpoint and says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader

from ..config import Config, ModelConfig
from ..errors import UserError
from ..model.retro import RetroModel
from ..runtime import fault_point, warn
from ..workspace import Workspace, sha256_file, write_failed
from . import hf

STEP_DIR = re.compile(r"^step-(\d+)$")
WEIGHTS, TRAINER, CONFIG, META = "model.safetensors", "trainer.safetensors", "config.toml", "meta.json"
OLD_TRAINER = "trainer.pt"  # checkpoints written before trainer.safetensors: a torch pickle, read weights-only
TRAINER_KEY = "retro.trainer_state"  # the safetensors header entry holding the trainer state's JSON
SHARDS = "shards"  # torch.distributed.checkpoint files of a sharded (FSDP) run
FORMAT = 1


def step_dir(run: Path, step: int) -> Path:
    return run / f"step-{step:06d}"


def tokenizer_ref(ws) -> dict[str, Any]:
    """What identifies the workspace tokenizer: the sha256 of its content (`tokenizer.content_sha256`), its
    vocabulary and type; and, for checkpoints written before the content was recorded, the fingerprint of its
    stage (and of earlier identical builds). Its path is recorded for the messages only."""
    from ..data.tokenizer import content_sha256
    from ..db.database import tokenizer_sha256, tokenizer_source

    meta = ws.require("tokenizer")
    settings = meta["settings"]
    source = tokenizer_source(ws, settings)
    # (a Hugging Face tokenizer stage finished before its sha256 was recorded: computed now)
    sha = tokenizer_sha256(meta) or content_sha256(settings["type"], source)
    return {"path": str(source), "sha256": sha, "vocab_size": meta["counts"]["vocab_size"], "type": settings["type"],
            "fingerprint": meta["fingerprint"], "earlier_fingerprints": meta.get("earlier_fingerprints", [])}


def save(run: Path, step: int, weights: dict[str, torch.Tensor] | None, trainer_state: dict[str, Any] | None,
         meta: dict[str, Any], config_toml: str, fault: str = "pretrain:checkpoint",
         shards: dict[str, Any] | None = None, write_weights: Callable[[Path], None] | None = None) -> Path:
    """Write step-NNNNNN/ atomically; returns its path. `meta` gets step, files and format added.

    One process (rank 0) writes `weights` (or `write_weights` writes the file it is given: a converter that
    streams them); or, with `shards` (model and optimizer state dicts of DTensor shards), every rank calls this
    and writes its own shard into the same temporary folder, then rank 0 finishes it. `trainer_state` None: a
    checkpoint that initialises runs but does not resume one (an imported model)."""
    from safetensors.torch import save_file

    from ..runtime import dist

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
            if write_weights is not None:
                write_weights(tmp / WEIGHTS)
            if trainer_state is not None:
                tensors: dict[str, torch.Tensor] = {}
                skeleton = json.dumps(_to_json(trainer_state, tensors, {}))
                save_file(tensors, str(tmp / TRAINER), metadata={TRAINER_KEY: skeleton})
        except Exception as e:  # safetensors reports a full disk in its own error type
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


SAFETENSORS_NAMES = {dtype: name for name, dtype in hf.SAFETENSORS_DTYPES.items()}  # torch dtype -> safetensors'


def write_safetensors(path: Path, specs: list[tuple[str, torch.dtype, torch.Size]],
                      tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file written tensor by tensor, as `tensors` makes them (in the order of `specs`: name, dtype,
    shape), so that a converter holds one tensor at a time, not the model. The layout is safetensors': an 8-byte
    little-endian header length, the JSON header (padded with spaces to 8 bytes), then the tensors' bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for (name, dtype, shape), (made, t) in zip(specs, tensors, strict=True):
            if made != name or t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"made {made} {t.dtype} {tuple(t.shape)}, announced {name} {dtype} {tuple(shape)}")
            f.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))  # the tensor's bytes, no copy


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


def resolve_checkpoint(ws: Workspace, given: Path | None, run: str = "pretrain",
                       what: str = "--checkpoint") -> Path:
    """A step folder: the given one (or the latest complete one inside a given run folder), else the latest
    complete checkpoint of the workspace's run `run` (pretrain.run)."""
    if given is not None:
        return in_folder(given, what)
    found = latest(ws.run_dir(run))
    if found is None:
        raise UserError(f"no complete checkpoint in {ws.run_dir(run)}: run `retro pretrain` first, or pass "
                        "--checkpoint")
    return found


def latest_trained(cfg: Config, ws: Workspace, given: Path | None) -> Path:
    """The model a verb that uses a trained model (generate, export) takes: `given` (a step or run folder), else
    generate.checkpoint, else the latest complete checkpoint of the SFT run, else of the pretraining run."""
    if given is None and cfg.generate.checkpoint:
        given = cfg.resolve(cfg.generate.checkpoint)
    if given is None and latest(ws.run_dir(cfg.sft.run), announce=False) is not None:
        given = ws.run_dir(cfg.sft.run)
    return resolve_checkpoint(ws, given, cfg.pretrain.run, what="--checkpoint")


def load_model(ws: Workspace, path: Path, given: ModelConfig | None = None) -> tuple[RetroModel, dict[str, Any]]:
    """The model of a verified checkpoint, checked against the workspace tokenizer (in eval mode); or of a Hugging
    Face folder (imported in fp32, its retrieval keys from the folder if `retro export` wrote it, else `given`)."""
    if hf.is_hf_folder(path):
        return hf_model(ws, path, given or ModelConfig(), dtype=torch.float32)
    meta = read_meta(path)
    check_tokenizer(meta, tokenizer_ref(ws), path)
    model = RetroModel(model_config_of(meta), meta["chunk_length"], meta["pad_id"])
    model.load_state_dict(load_weights(path))
    return model.eval(), meta


def hf_model(ws: Workspace, path: Path, given: ModelConfig, set_keys: frozenset[str] = frozenset(),
             dtype: torch.dtype | None = None, chunk_length: int | None = None, weights: bool = True,
             check: Callable[[ModelConfig], None] | None = None) -> tuple[RetroModel, dict[str, Any]]:
    """A Retro whose decoder is the Hugging Face model in `path` (hf.load), checked against the workspace
    tokenizer, and the meta a checkpoint of it records. `given`: the workspace's [model], whose keys in
    `set_keys` must agree with the folder; `chunk_length`: the database's (db.chunk_length), which a folder
    `retro export` wrote must have been trained with; `check`: called with the model config before anything
    is loaded. `weights=False`: the model of that config with random weights (a resumed run's)."""
    from ..db.database import open_tokenizer

    folder = hf.open_folder(path)
    tok_ref, tok = tokenizer_ref(ws), open_tokenizer(ws)
    hf.check_tokenizer(folder, tok_ref)
    cfg = hf.model_config(folder, given, set_keys)
    built = ws.require("chunks")["settings"]["chunk_length"]
    m = chunk_length or built
    if folder.retro is not None and folder.retro.get("chunk_length", m) != m:
        raise UserError(f"{path / hf.RETRO_CONFIG}: the Retro was trained with chunks of "
                        f"{folder.retro['chunk_length']} tokens, the database in {ws.db} has {m}: set "
                        f"db.chunk_length = {folder.retro['chunk_length']} and rebuild the database")
    if check is not None:
        check(cfg)
    model = hf.load(path, cfg, m, tok.pad_id, dtype)[0] if weights else RetroModel(cfg, m, tok.pad_id)
    meta = model_meta(cfg, m, tok.pad_id, tok_ref, model.retro_layers)
    meta.update(eos_id=tok.eos_id, hf={"path": str(path), "family": folder.family})
    return model, meta


def is_cca_or_encoder(name: str) -> bool:
    """Whether a parameter (by its state-dict name) belongs to retrieval: the encoder or a CCA layer. These are
    what a GPT checkpoint lacks when it initialises a Retro model (pretrain.init_from), and what trains alone
    with pretrain.freeze_decoder or is frozen with sft.neighbors = "none"."""
    return name.startswith("encoder.") or ".cca." in name or ".norm_cca." in name


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
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        reader = ShardReader(path / SHARDS)
        found = reader.read_metadata().state_dict_metadata
        weights = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in found.items()
                   if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": weights}, storage_reader=reader)
        return weights
    return load_file(str(path / WEIGHTS))


def load_sharded_optimizer(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Fill the optimizer of `model` (sharded or not, any number of processes) from a sharded checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optim": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=ShardReader(path / SHARDS))
    set_optimizer_state_dict(model, optimizer, state["optim"])


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a torch.distributed.checkpoint `.metadata` file, which DCP writes with pickle, allowing only
    what such a file names (DCP's metadata records, torch dtypes, layouts and sizes, paths): any other
    global, such as a function a crafted file would call, is refused before anything runs."""

    ALLOWED = {
        "torch.distributed.checkpoint.metadata": {"ChunkStorageMetadata", "_MEM_FORMAT_ENCODING", "TensorProperties",
                                                  "TensorStorageMetadata", "BytesStorageMetadata", "StorageMeta",
                                                  "Metadata", "MetadataIndex"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
        "collections": {"OrderedDict"},
        "builtins": {"set", "frozenset"},
    }

    def find_class(self, module: str, name: str) -> Any:
        if name in self.ALLOWED.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                             torch.memory_format))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a checkpoint's metadata never holds")


class ShardReader(FileSystemReader):
    """DCP's file reader, but for its `.metadata` pickle: read through `_MetadataUnpickler`. (The tensors are
    raw bytes; DCP reads the few non-tensor values with torch.load(weights_only=True).)"""

    def __init__(self, folder: Path):
        super().__init__(str(folder))
        self.folder = folder

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        file = self.folder / (".metadata" if rank is None else f"__{rank}.metadata")
        try:
            with open(file, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise UserError(f"the sharded checkpoint {self.folder.parent} has no {file.name}") from None
        except Exception as e:  # a refused global, or a damaged file: nothing of it ran
            raise UserError(f"{file} is not the metadata of a sharded checkpoint ({e}); retro does not load it. "
                            f"Use a checkpoint written by retro") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _to_json(value: Any, tensors: dict[str, torch.Tensor], named: dict[int, str]) -> Any:
    """`value` as JSON, each tensor moved to `tensors` and named in its place (`named`: tensor id -> name, so a
    tensor held twice is stored once). Dicts and sequences are tagged, so that tuples and non-string keys
    come back as they were."""
    if isinstance(value, torch.Tensor):
        if id(value) not in named:
            named[id(value)] = f"t{len(tensors)}"
            tensors[named[id(value)]] = value.detach().contiguous().cpu()
        return {"tensor": named[id(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"dict": {k: _to_json(v, tensors, named) for k, v in value.items()}}
        return {"pairs": [[_to_json(k, tensors, named), _to_json(v, tensors, named)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_to_json(v, tensors, named) for v in value]}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"the trainer state holds a {type(value).__name__}, which a checkpoint does not store")


def _from_json(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(value, dict):
        return value
    ((kind, body),) = value.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "dict":
        return {k: _from_json(v, tensors) for k, v in body.items()}
    if kind == "pairs":
        return {_from_json(k, tensors): _from_json(v, tensors) for k, v in body}
    if kind in ("list", "tuple"):
        items = [_from_json(v, tensors) for v in body]
        return items if kind == "list" else tuple(items)
    raise ValueError(f"unknown entry {kind!r}")


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The optimizer, data-loader and RNG state of a verified checkpoint folder. No Python object is unpickled:
    trainer.safetensors holds tensors and JSON; an older trainer.pt is loaded weights-only (tensors and plain
    values), and one holding anything else is refused, since unpickling it could run any code."""
    from safetensors import safe_open

    if (path / TRAINER).is_file():
        try:
            with safe_open(str(path / TRAINER), "pt") as f:
                skeleton = json.loads((f.metadata() or {})[TRAINER_KEY])
                return _from_json(skeleton, {k: f.get_tensor(k) for k in f.keys()})
        except Exception as e:  # not what `save` writes (the file matched meta.json, so it was made so)
            raise UserError(f"{path / TRAINER} is not a retro trainer state ({type(e).__name__}: {e}): move {path} "
                            f"away to resume from the checkpoint before it") from None
    if (path / OLD_TRAINER).is_file():
        try:
            return torch.load(path / OLD_TRAINER, map_location="cpu", weights_only=True)
        except Exception as e:
            found = re.search(r"(Unsupported global[^\n]*|unsupported GLOBAL[^\n]*)", str(e))
            why = found.group(1).strip() if found else str(e).strip().splitlines()[0]
            raise UserError(f"{path / OLD_TRAINER} holds more than tensors and plain values ({why}), and unpickling "
                            f"it could run any code: retro does not load it. Resume from a checkpoint written by "
                            f"retro, or move {path} away") from None
    raise UserError(f"checkpoint {path} has no trainer state ({TRAINER}): it cannot be resumed (it can still "
                    f"initialise a run: pretrain.init_from)")


def model_config_of(meta: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**meta["model"])


def check_tokenizer(meta: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """A checkpoint must be used with a tokenizer of the same content as the one it was trained with (in any
    workspace, built at any time): an error naming both otherwise.

    Checkpoints written before the tokenizer's sha256 was recorded name the fingerprint of the tokenizer stage
    they were trained with; they are accepted where the workspace tokenizer has that fingerprint (the
    workspace they were trained in), or had it before a rebuild that made the same content again."""
    theirs = meta.get("tokenizer") or {}
    if theirs.get("vocab_size") != current["vocab_size"]:
        raise UserError(f"checkpoint {path} was trained with a tokenizer of vocabulary {theirs.get('vocab_size')} "
                        f"({theirs.get('path')}), but the workspace tokenizer {current['path']} has vocabulary "
                        f"{current['vocab_size']}: use the workspace the checkpoint was trained in, or a checkpoint "
                        f"trained with this tokenizer")
    if theirs.get("sha256"):
        if theirs["sha256"] != current.get("sha256"):
            raise UserError(f"checkpoint {path} was trained with tokenizer {theirs.get('path')} (sha256 "
                            f"{theirs['sha256'][:16]}), but the workspace tokenizer {current['path']} has sha256 "
                            f"{str(current.get('sha256'))[:16]}: the token ids would not mean the same thing. Use a "
                            f"workspace whose tokenizer has the same content, or a checkpoint trained with this one")
        return
    if theirs.get("fingerprint") not in {current["fingerprint"], *current.get("earlier_fingerprints", [])}:
        raise UserError(f"checkpoint {path} was trained with tokenizer {theirs.get('path')} (fingerprint "
                        f"{theirs.get('fingerprint')}), but the workspace tokenizer {current['path']} has fingerprint "
                        f"{current['fingerprint']}: the token ids may not mean the same thing. The checkpoint was "
                        f"written before retro recorded a tokenizer's content, so it is accepted only with the "
                        f"tokenizer build it was trained with: use the workspace it was trained in")


def model_meta(cfg: ModelConfig, chunk_length: int, pad_id: int, tok_ref: dict[str, Any],
               retro_layers: list[int]) -> dict[str, Any]:
    return {"model": dataclasses.asdict(cfg), "chunk_length": chunk_length, "pad_id": pad_id,
            "tokenizer": tok_ref, "retro_layers": retro_layers, "kind": "retro" if retro_layers else "gpt"}
