"""Can a checkpoint copy from its own context? The probe behind "the model cannot read yet".

Reading a retrieved passage, an SFT context or a neighbour needs the circuit a GPT forms after enough tokens
(induction heads): find an earlier occurrence of the current token and predict what followed it. This probe
measures it directly, with no retrieval and no data beyond the workspace's chunk store. A segment of L
tokens is shown twice in a row; the mean loss (nats per token) on its second copy is compared with the first:

  random   L token ids drawn uniformly from the vocabulary (nothing to predict but by copying)
  text     L consecutive tokens of a validation document of the database

A model that copies predicts the second copy almost perfectly (loss near 0 for random tokens); one that does
not scores both copies alike ("drop" near 0). Retro checkpoints run with retrieval off for these two, and
are also asked to copy from their neighbours:

  nbr-random, nbr-text   a sequence of seq_length + 1 tokens shown once, while each chunk's first neighbour
                         holds that chunk and its continuation; "first" is the loss without neighbours,
                         "repeat" with them, on the tokens the neighbours hold

    python benchmarks/copy_probe.py --recipe recipes/small-cpu.toml --runs pretrain,gpt [--json FILE]
    python benchmarks/copy_probe.py --recipe R --checkpoint WS/checkpoints/pretrain/step-000500 ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from retrocli.config import load_config  # noqa: E402
from retrocli.db.database import Database, workspace_of  # noqa: E402
from retrocli.db.store import ChunkStore  # noqa: E402
from retrocli.train.checkpoint import load_model, resolve_checkpoint  # noqa: E402


def segments(kind: str, store: ChunkStore, vocab_size: int, length: int, batch: int, seed: int) -> torch.Tensor:
    """(batch, length) token ids: uniform random ids, or spans of validation documents at least `length` long."""
    g = np.random.default_rng(seed)
    if kind == "random":
        return torch.from_numpy(g.integers(0, vocab_size, (batch, length), dtype=np.int64))
    docs = store.docs[store.docs["valid"] & (store.docs["num_tokens"] >= length)]
    if not len(docs):
        docs = store.docs[store.docs["num_tokens"] >= length]  # a database without a validation split
    if not len(docs):
        sys.exit(f"no document of the database has {length} tokens: pass a smaller --length")
    rows = []
    for d in docs[g.integers(0, len(docs), batch)]:
        start = int(d["token_start"]) + int(g.integers(0, int(d["num_tokens"]) - length + 1))
        rows.append(np.asarray(store.tokens[start : start + length], dtype=np.int64))
    return torch.from_numpy(np.stack(rows))


@torch.no_grad()
def probe(model, seg: torch.Tensor) -> dict[str, float]:
    """Mean NLL of the first copy (its tokens 2..L) and of the second copy (all L tokens) of `seg` shown twice."""
    length = seg.shape[1]
    x = torch.cat([seg, seg], 1)  # (b, 2L)
    logits = model(x[:, :-1], retrieval=False)  # (b, 2L-1, v)
    nll = F.cross_entropy(logits.transpose(1, 2).float(), x[:, 1:], reduction="none")  # (b, 2L-1)
    first, second = nll[:, : length - 1].mean().item(), nll[:, length - 1 :].mean().item()
    return {"first": first, "repeat": second, "drop": first - second}


@torch.no_grad()
def probe_neighbours(model, seg: torch.Tensor) -> dict[str, float]:
    """A Retro checkpoint's reading of its neighbours: `seg` (b, n + 1) shown once, while the first neighbour
    of each chunk j holds seg[j*m : j*m + r] (the chunk and its continuation, as a perfect retrieval returns
    it; the other slots are padding). Mean NLL of the targets the neighbours hold (positions m-1 on, after
    the causal shift), without neighbours ("first") and with them ("repeat")."""
    b, m, r, k = seg.shape[0], model.chunk_length, model.retrieved_length, model.cfg.num_neighbors
    n = seg.shape[1] - 1
    nbr = torch.full((b, n // m, k, r), model.pad_id, dtype=torch.long)
    for j in range(n // m):
        held = seg[:, j * m : j * m + r]
        nbr[:, j, 0, : held.shape[1]] = held
    out = {}
    for name, kwargs in (("first", {"retrieval": False}), ("repeat", {"neighbours": nbr})):
        logits = model(seg[:, :-1], **kwargs)
        nll = F.cross_entropy(logits.transpose(1, 2).float(), seg[:, 1:], reduction="none")  # (b, n)
        out[name] = nll[:, m - 1 :].mean().item()
    return {**out, "drop": out["first"] - out["repeat"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--runs", default="pretrain", help="checkpoint runs of the workspace (their latest step)")
    ap.add_argument("--checkpoint", action="append", default=[], help="a step folder (repeatable); replaces --runs")
    ap.add_argument("--length", type=int, default=100, help="tokens in the repeated segment (2 x length <= seq)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    cfg = load_config(Path(a.recipe))
    ws = workspace_of(cfg)
    store = Database.open(ws, cfg.db.chunk_length).store
    paths = [Path(p) for p in a.checkpoint] or [resolve_checkpoint(ws, None, r) for r in a.runs.split(",")]
    results = []
    print(f"{'checkpoint':<48} {'probe':<10} {'first':>7} {'repeat':>7} {'drop':>7}  (nats per token)")
    for path in paths:
        model, meta = load_model(ws, path)
        if 2 * a.length > model.cfg.seq_length + 1:
            sys.exit(f"--length {a.length}: two copies exceed the model's seq_length {model.cfg.seq_length}")
        kinds = ["random", "text"] + (["nbr-random", "nbr-text"] if model.retro_layers else [])
        for kind in kinds:
            if kind.startswith("nbr-"):
                seg = segments(kind[4:], store, model.cfg.vocab_size, model.cfg.seq_length + 1, a.batch, a.seed)
                found = probe_neighbours(model, seg)
            else:
                found = probe(model, segments(kind, store, model.cfg.vocab_size, a.length, a.batch, a.seed))
            r = {"checkpoint": str(path), "step": meta.get("step"), "probe": kind, **found}
            results.append(r)
            name = f"{path.parent.name}/{path.name}"
            print(f"{name:<48} {kind:<10} {r['first']:7.3f} {r['repeat']:7.3f} {r['drop']:7.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"length": a.length, "batch": a.batch, "results": results}, indent=1))


if __name__ == "__main__":
    main()
