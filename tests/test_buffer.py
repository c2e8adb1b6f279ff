"""Batches drawn from cached activation rows (saehook.buffer.epoch_batches)."""

import pytest
import torch

from saehook.buffer import epoch_batches


def test_epoch_batches_every_row_once_per_pass_then_fresh_order():
    rows = torch.arange(10, dtype=torch.float64).unsqueeze(1)  # 10 rows, width 1
    out = list(epoch_batches(rows, tokens=12, batch_tokens=3, seed=1))
    assert [b.shape for b in out] == [(3, 1)] * 4 and all(b.dtype == torch.float32 for b in out)
    first = torch.cat(out[:3]).flatten()
    assert len(set(first.tolist())) == 9  # one pass: 3 batches of distinct rows, the 10th row left over
    second = out[3].flatten().tolist()
    perm0 = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    perm1 = torch.randperm(10, generator=torch.Generator().manual_seed(2))
    assert first.tolist() == perm0[:9].float().tolist() and second == perm1[:3].float().tolist()


def test_epoch_batches_rounds_up_to_whole_batches_and_refuses_a_batch_larger_than_the_cache():
    rows = torch.randn(8, 2)
    assert sum(len(b) for b in epoch_batches(rows, tokens=5, batch_tokens=4)) == 8
    with pytest.raises(ValueError, match="needs at least that many cached rows; the cache has 8"):
        next(epoch_batches(rows, tokens=5, batch_tokens=9))
