"""Copy windows: synthetic pretraining samples that teach the model to copy, mixed into the text samples.

Reading a neighbour (or an SFT context) needs the circuit that finds an earlier occurrence of the current
token and predicts what followed it. Large models form it from text after billions of tokens; a small model
trained on CPU does not form it from text at all (docs/results.md, "Can the circuit be taught"), but forms
it in about a thousand steps from windows of random token ids that repeat with a random period:

    period p (8..128):  a b c ... (p random ids) | a b c ... | a b c ... | ...      (seq_length + 1 tokens)

Each copy window also has neighbours a perfect retrieval would return: for its chunk j, each of the k
slots holds, with probability 1/2, the window's own tokens from chunk j on (the chunk and its continuation,
r tokens, as the database stores a neighbour) and otherwise r random ids (a neighbour that does not match).
Where the period is longer than a chunk, the neighbours tell a Retro model the next chunk before the window
does, so the CCA sees examples of copying from a neighbour whose first chunk matches (few of them: a 20%
share did not teach it that in 600 steps, docs/results.md). A GPT sees the same tokens and ignores the
neighbours, so a Retro run and its GPT baseline still train on the same tokens.

Which training positions are copy windows is fixed by the seed and the position alone: the first
`pretrain.copy_warmup_steps` steps are all copy windows, later steps a `pretrain.copy_share` of them. A
resumed run therefore sees the same windows as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np

PERIODS = (8, 128)  # shortest and longest repeat; the range with which the copy circuit formed on CPU
_STREAM = 0xC0B1  # separates these random streams from every other use of the seed


class CopyWindows:
    """`at(position)`: the copy window at this global sample position, or None where a text sample goes."""

    def __init__(self, seq_length: int, m: int, k: int, r: int, vocab_size: int, reserved: set[int],
                 warmup_samples: int, share: float, seed: int, neighbours: bool):
        self.n, self.m, self.k, self.r = seq_length, m, k, r
        self.l = seq_length // m
        self.ids = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), np.fromiter(reserved, np.int64))
        self.warmup_samples, self.share, self.seed = warmup_samples, share, seed
        self.neighbours = neighbours

    def at(self, position: int) -> dict[str, np.ndarray] | None:
        g = np.random.default_rng([self.seed, _STREAM, position])
        if position >= self.warmup_samples and not g.random() < self.share:
            return None
        period = int(g.integers(PERIODS[0], PERIODS[1] + 1))
        length = self.n + self.r  # the window and the continuation of its last chunk's neighbour
        stream = np.tile(self.ids[g.integers(0, len(self.ids), period)], length // period + 1)[:length]
        out = {"tokens": stream[: self.n], "targets": stream[1 : self.n + 1],
               "loss_mask": np.ones(self.n, dtype=np.float32), "docs": np.zeros(0, dtype=np.int64)}
        if self.neighbours:
            # (l, k, r): the chunk and its continuation where the coin says so, random ids elsewhere
            match = g.random((self.l, self.k)) < 0.5
            noise = self.ids[g.integers(0, len(self.ids), (self.l, self.k, self.r))]
            own = np.stack([stream[j * self.m : j * self.m + self.r] for j in range(self.l)])  # (l, r)
            out["neighbours"] = np.where(match[:, :, None], own[:, None, :], noise)
            out["neighbour_ids"] = np.full((self.l, self.k), -1, dtype=np.int64)
        return out
