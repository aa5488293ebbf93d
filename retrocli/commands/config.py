"""`retro config show | check`: the workspace TOML as `retro` reads it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from ..runtime import console
from . import ConfigOpt, SetOpt, load_workspace


def config_show(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Print the workspace TOML as `retro` reads it: every key of every section, each value followed by where it
    came from (default, file, `extends FILE`, `--set`). The output is valid TOML.

    **Examples**

    ```
    retro config show -c my-ws/retro.toml
    retro config show -c my-ws/retro.toml --set db.nprobe=32 | grep nprobe
    ```"""
    from ..config import to_annotated_toml

    sys.stdout.write(to_annotated_toml(load_workspace(config, set_)))


def config_check(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Check a workspace TOML without running anything: types, ranges, unknown keys and the checks across keys,
    every problem at once. Exit code 0 when it is valid, 2 when not (for the CI of your own recipes).

    **Examples**

    ```
    retro config check -c my-ws/retro.toml
    for f in recipes/*.toml; do retro config check -c "$f" || exit 1; done
    ```"""
    cfg = load_workspace(config, set_)
    given = sum(src != "--set" for src in cfg.origins.values())
    sets = sum(src == "--set" for src in cfg.origins.values())
    console.print(f"{cfg.source}: valid ({given} keys from the file{'s' if given != 1 else ''}, {sets} from --set, "
                  "the rest defaults)", highlight=False, soft_wrap=True)
