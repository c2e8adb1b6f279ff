"""A shuffling buffer: activation rows from many windows are mixed before they form batches.

Consecutive tokens of one window are correlated; training on them in order biases each step. Rows are
appended as they stream in; once the buffer holds ``capacity + batch`` rows it is permuted and all but
``capacity`` rows leave as batches of exactly ``batch`` rows. With ``capacity = 0`` rows leave in order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


class ShuffleBuffer:
    def __init__(self, d: int, batch: int, capacity: int, seed: int = 0, device=None):
        self.d, self.batch, self.capacity = d, batch, capacity
        self.gen = torch.Generator().manual_seed(seed)
        self.rows: list[Tensor] = []
        self.n = 0
        self.device = device

    def add(self, x: Tensor) -> None:
        """Append rows ``x [N, d]`` (a detached copy is kept)."""
        if len(x):
            self.rows.append(x.detach().reshape(-1, self.d).clone())
            self.n += len(self.rows[-1])

    def ready(self, flush: bool = False) -> int:
        """How many full batches :meth:`batches` would return now."""
        keep = 0 if flush else self.capacity
        return 0 if self.n < keep + self.batch else (self.n - keep) // self.batch

    def head(self, n: int) -> Tensor:
        """The first ``min(n, self.n)`` rows held, ``[m, d]``, without removing them: in the order they were
        added as long as no batch has left (the first :meth:`batches` call permutes what stays)."""
        out, left = [], n
        for r in self.rows:
            if left <= 0:
                break
            out.append(r[:left])
            left -= len(out[-1])
        return torch.cat(out) if out else torch.zeros(0, self.d, device=self.device)

    def batches(self, flush: bool = False, limit: int | None = None) -> list[Tensor]:
        """Full batches ready to train on (at most ``limit``); ``flush`` also drains the mixing reserve."""
        n_batches = self.ready(flush) if limit is None else min(limit, self.ready(flush))
        if n_batches == 0:
            return []
        allrows = torch.cat(self.rows)
        if self.capacity:
            allrows = allrows[torch.randperm(len(allrows), generator=self.gen).to(allrows.device)]
        n_out = n_batches * self.batch
        out = list(allrows[:n_out].split(self.batch))
        rest = allrows[n_out:]
        self.rows, self.n = ([rest] if len(rest) else []), len(rest)
        return out

    def state(self) -> dict[str, Tensor]:
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0, self.d)
        return {"rows": rows.cpu().contiguous(), "rng": self.gen.get_state()}

    def load_state(self, st: dict[str, Tensor]) -> None:
        rows = st["rows"]
        self.rows, self.n = ([rows.to(self.device) if self.device else rows] if len(rows) else []), len(rows)
        self.gen.set_state(st["rng"])


def epoch_batches(rows: Tensor, tokens: int, batch_tokens: int, seed: int = 0) -> Iterator[Tensor]:
    """Batches of ``batch_tokens`` float32 rows drawn from cached activations ``rows [N, d]``, ``tokens`` rows in
    all (rounded up to whole batches): one pass after another, each in a fresh permutation seeded
    ``seed + pass``; the ``N mod batch_tokens`` rows left at a pass's end are skipped in that pass.

    Raises ``ValueError`` when one batch needs more rows than the cache holds.
    """
    if batch_tokens <= 0 or batch_tokens > len(rows):
        raise ValueError(f"a batch of {batch_tokens} rows needs at least that many cached rows; the cache has "
                         f"{len(rows)}: collect more activations or lower batch_tokens")
    done, epoch = 0, 0
    while done < tokens:
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(perm) - batch_tokens + 1, batch_tokens):
            if done >= tokens:
                return
            yield rows[perm[i: i + batch_tokens]].float()
            done += batch_tokens
        epoch += 1
