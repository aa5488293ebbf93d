"""Recipes (`recipes/*.toml` in the repository, `retrocli/recipe_files/` in an installed wheel) and `retro init`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable

from .config import Config, load_config, rebase_paths, to_commented_toml, validate
from .errors import UserError
from .workspace import write_text_atomic


def recipes_dir() -> Path:
    """Where the recipes are: inside the installed package (a wheel), else at the top of the source checkout
    (a checkout, or an editable install of one)."""
    here = Path(__file__).resolve().parent
    packaged = here / "recipe_files"
    return packaged if packaged.is_dir() else here.parent / "recipes"


def recipe_path(name: str) -> Path:
    path = Path(name) if name.endswith(".toml") else recipes_dir() / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in recipes_dir().glob("*.toml"))) or "none found"
        raise UserError(f"recipe {name!r} not found at {path} (known recipes: {known}; `retro init --list` "
                        "describes them)")
    return path


def describe(path: Path) -> str:
    """A recipe's one-line description: the first sentence of the comment that opens it, less its `name:`."""
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#") or not text:
            break
        words.append(text)
    text = " ".join(words)
    if text.lower().startswith(f"{path.stem.lower()}:"):
        text = text.split(":", 1)[1].strip()
    end = re.search(r"[.:;](\s|$)", text)
    return text[: end.start()] if end else text


def list_recipes() -> list[tuple[str, str]]:
    """(name, one-line description) of every recipe."""
    return [(p.stem, describe(p)) for p in sorted(recipes_dir().glob("*.toml"))]


def from_hf(cfg: Config, model: Path) -> str:
    """Point a workspace at a Hugging Face model folder: its tokenizer, its decoder keys, Megatron's retro layers,
    the decoder frozen; the sequence length cut to what the model computes. Returns a header line."""
    from .model.retro import megatron_retro_layers
    from .train import hf

    path = model.resolve()
    folder = hf.open_folder(path)
    cfg.tokenizer.type, cfg.tokenizer.path = "hf", str(path)
    cfg.pretrain.init_from, cfg.pretrain.freeze_decoder = str(path), True
    keys = dict(folder.decoder)
    limits = [n for n in (keys.get("sliding_window"), keys.get("max_positions")) if n]
    seq_length = min([cfg.model.seq_length, *limits])
    cfg.model = dataclasses.replace(cfg.model, **keys, seq_length=seq_length,
                                    retro_layers=megatron_retro_layers(keys["layers"]) or [keys["layers"]])
    return (f"# the model: {path} ({folder.family}, {keys['layers']} layers, hidden {keys['hidden']}); [model] "
            f"is its config.json, and must stay so")


def workspace_config(directory: Path, recipe: str, fill: Callable[[Config], str] | None = None) -> tuple[Config, str]:
    """The configuration DIR/retro.toml will hold, and its header: the recipe with every artefact inside DIR
    (`workspace.dir = "."`), its paths valid from there; `fill` (e.g. `from_hf`) changes it further and returns a
    header line. Refuses a folder that already has a retro.toml."""
    if directory.suffix == ".toml":
        raise UserError(f"retro init takes a folder, not a TOML file: {directory} (it writes FOLDER/retro.toml; "
                        f"try `retro init {directory.with_suffix('')}`)")
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} exists and is not a folder: give a new or existing folder for the workspace")
    if (directory / "retro.toml").exists():
        raise UserError(f"{directory / 'retro.toml'} already exists: remove it or choose another folder")
    src = recipe_path(recipe)
    cfg = load_config(src)
    rebase_paths(cfg, cfg.base_dir)  # paths stay valid from the new location (data files, checkpoints)
    cfg.workspace.dir = "."  # every artefact inside DIR, beside its retro.toml
    header = "\n".join(line for line in src.read_text(encoding="utf-8").splitlines() if line.startswith("#"))
    if fill is not None:
        header += "\n" + fill(cfg)
        validate(cfg)
    return cfg, header + f"\n# written by `retro` from {src.name}; every artefact of this workspace goes into this " \
                         "folder\n"


def write_workspace(directory: Path, recipe: str, fill: Callable[[Config], str] | None = None) -> Path:
    """DIR/retro.toml (`workspace_config`) with every key written out and documented, so that two workspaces side
    by side share nothing. Never overwrites a file."""
    cfg, header = workspace_config(directory, recipe, fill)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "retro.toml"
    write_text_atomic(out, to_commented_toml(cfg, header))
    return out
