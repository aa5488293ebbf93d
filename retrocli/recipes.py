"""Recipes (`recipes/*.toml` in the repository, `retrocli/recipe_files/` in an installed wheel) and `retro init`."""

from __future__ import annotations

import re
from pathlib import Path

from .config import load_config, rebase_paths, to_commented_toml
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


def write_workspace(directory: Path, recipe: str) -> Path:
    """DIR/retro.toml: the recipe with every key written out and documented, and every artefact inside DIR
    (`workspace.dir = "."`), so that two workspaces side by side share nothing. Never overwrites a file."""
    if directory.suffix == ".toml":
        raise UserError(f"retro init takes a folder, not a TOML file: {directory} (it writes FOLDER/retro.toml; "
                        f"try `retro init {directory.with_suffix('')}`)")
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} exists and is not a folder: give a new or existing folder for the workspace")
    out = directory / "retro.toml"
    if out.exists():
        raise UserError(f"{out} already exists: remove it or choose another folder")
    src = recipe_path(recipe)
    cfg = load_config(src)
    rebase_paths(cfg, cfg.base_dir)  # paths stay valid from the new location (data files, checkpoints)
    cfg.workspace.dir = "."  # every artefact inside DIR, beside its retro.toml
    header = "\n".join(line for line in src.read_text(encoding="utf-8").splitlines() if line.startswith("#"))
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, to_commented_toml(cfg, header + f"\n# written by `retro init` from {src.name}; every "
                                                           "artefact of this workspace goes into this folder\n"))
    return out
