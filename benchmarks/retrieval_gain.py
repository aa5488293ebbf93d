"""What does retrieval buy, token by token? Paired perplexity of checkpoints on the same held-out tokens.

`retro ppl` gives one perplexity per run. Two runs that share every token still differ by 1-2% when they
train different weights (docs/results.md, v4/v5), so a small retrieval effect needs a paired measurement:
every model scores the same target tokens, and the difference of their per-token losses has a standard error.
Each entry is a checkpoint (a step folder, or a run name of the workspace: its latest checkpoint) with
`@on` (retrieval, the default) or `@off` (CCA gated off, as `retro ppl --no-retrieval`). The first entry is
the reference; each other one gets its mean loss difference in nats per token, +- one standard error, and
its perplexity ratio.

    python benchmarks/retrieval_gain.py --recipe recipes/small-cpu.toml gpt rf-v4@on rf-v4@off [--json FILE]
    python benchmarks/retrieval_gain.py --recipe R --data ../shared/data/ppl/wikitext2_test_raw.txt.gz ...
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from retrocli.config import load_config  # noqa: E402
from retrocli.db.database import open_tokenizer, workspace_of  # noqa: E402
from retrocli.errors import UserError  # noqa: E402
from retrocli.eval.ppl import checkpoint_token_losses, paired_difference  # noqa: E402
from retrocli.train.checkpoint import resolve_checkpoint  # noqa: E402


def parse(entry: str, ws) -> tuple[Path, bool]:
    """'RUN_OR_PATH[@on|@off]' -> (checkpoint step folder, retrieval)."""
    name, _, mode = entry.partition("@")
    if mode not in ("", "on", "off"):
        sys.exit(f"{entry}: the mode after @ is 'on' or 'off'")
    given = Path(name)
    path = resolve_checkpoint(ws, given if given.exists() else None, name)
    return path, mode != "off"


def measure(recipe: Path, entries: list[str], data: Path | None = None) -> list[dict]:
    """One row per entry, scored as `retro ppl` scores (retrocli.eval.ppl); against the first entry, the paired
    per-token difference."""
    cfg = load_config(recipe)
    ws = workspace_of(cfg)
    tok = open_tokenizer(ws)
    rows, first = [], None
    for entry in entries:
        path, retrieval = parse(entry, ws)
        nll, retrieval = checkpoint_token_losses(cfg, ws, tok, path, retrieval, data)
        row = {"entry": entry, "checkpoint": str(path), "retrieval": retrieval, "tokens": len(nll),
               "loss": float(nll.mean()), "perplexity": math.exp(float(nll.mean()))}
        if first is None:
            first = nll
        else:
            try:
                paired = paired_difference(nll, first)
            except UserError as e:
                sys.exit(f"{entry} against {entries[0]}: {e}")
            row.update(diff_vs_first=paired["diff"], diff_se=paired["se"], ppl_ratio_vs_first=paired["ratio"])
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=None, help="a text / JSONL file instead of the validation documents")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("entries", nargs="+", help="RUN_OR_CHECKPOINT[@on|@off]; the first is the reference")
    args = ap.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    rows = measure(args.recipe, args.entries, args.data)
    print(f"{'checkpoint':44s} {'retrieval':>9s} {'tokens':>8s} {'ppl':>9s}  loss - first (nats, +- SE)   ppl ratio")
    for r in rows:
        name = f"{Path(r['checkpoint']).parent.name}/{Path(r['checkpoint']).name}"
        diff = (f"{r['diff_vs_first']:+.5f} +- {r['diff_se']:.5f}   {r['ppl_ratio_vs_first']:.4f}"
                if "diff_vs_first" in r else "(reference)")
        print(f"{name:44s} {'on' if r['retrieval'] else 'off':>9s} {r['tokens']:>8,} {r['perplexity']:>9.3f}  {diff}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
