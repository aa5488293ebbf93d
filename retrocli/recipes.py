"""Recipes (`recipes/*.toml` in the repository) and `retro init`."""

from __future__ import annotations

from pathlib import Path

from .config import load_config, to_commented_toml
from .errors import UserError
from .workspace import write_text_atomic

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def recipe_path(name: str) -> Path:
    path = Path(name) if name.endswith(".toml") else RECIPES_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))) or "none found"
        raise UserError(f"recipe {name!r} not found at {path} (known recipes: {known})")
    return path


def write_workspace(directory: Path, recipe: str) -> Path:
    """DIR/retro.toml: the recipe with every key written out and documented. Never overwrites a file."""
    src = recipe_path(recipe)
    cfg = load_config(src)
    out = directory / "retro.toml"
    if out.exists():
        raise UserError(f"{out} already exists: remove it or choose another folder")
    # Corpus globs stay valid from the new location: rewrite relative ones against the recipe's folder.
    cfg.corpus.train = [p if p.startswith("builtin:") or Path(p).is_absolute() else str(cfg.resolve(p))
                        for p in cfg.corpus.train]
    header = "\n".join(line for line in src.read_text(encoding="utf-8").splitlines() if line.startswith("#"))
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, to_commented_toml(cfg, header + f"\n# written by `retro init` from {src.name}\n"))
    return out
