"""Token-budget batches: every cell once, padded size within the budget, short cells many to a batch."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scsuperweight.data import tokenize_counts
from scsuperweight.data.token_batches import iter_token_batches, token_budget_batches


def _lengths(seed=0, n=300):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(5, 40, n // 2), rng.integers(200, 1200, n - n // 2)])


@pytest.mark.parametrize("seed", range(5))
def test_every_cell_once_and_within_budget(seed):
    L = _lengths(seed)
    budget = 4096
    batches = token_budget_batches(L, budget)
    allc = np.concatenate(batches)
    assert sorted(allc.tolist()) == list(range(len(L)))
    for b in batches:
        assert len(b) * L[b].max() <= budget or len(b) == 1
    # greedy packing: a batch could not have taken the next cell
    for b, nxt in zip(batches, batches[1:]):
        assert (len(b) + 1) * max(L[b].max(), L[nxt[0]]) > budget
    short = [b for b in batches if L[b].max() < 40]
    assert max(len(b) for b in short) >= budget // 40  # short cells go many to a batch
    again = token_budget_batches(L, budget)
    assert len(again) == len(batches) and all(np.array_equal(a, b) for a, b in zip(again, batches))


def test_long_cells_alone_and_caps():
    L = np.array([10, 5000, 10, 20, 7000])
    b = token_budget_batches(L, 100)
    assert [x.tolist() for x in b] == [[0, 2, 3], [1], [4]]
    assert [x.tolist() for x in token_budget_batches(L, 100, max_cells=2)] == [[0, 2], [3], [1], [4]]
    assert [x.tolist() for x in token_budget_batches(L, 100, cells=np.array([3, 4, 0]))] == [[0, 3], [4]]
    with pytest.raises(ValueError, match="max_tokens"):
        token_budget_batches(L, 0)


def test_batches_are_collated_and_masked_reproducibly():
    rng = np.random.default_rng(0)
    X = sp.random(40, 300, density=0.1, random_state=0, data_rvs=lambda n: rng.poisson(3, n) + 1).tocsr()
    tok = tokenize_counts(X.astype(np.float32), np.arange(300), cls_token_id=301, pad_token_id=300, max_seq_len=64)
    a = list(iter_token_batches(tok, 512, mask_ratio=0.3, seed=4))
    b = list(iter_token_batches(tok, 512, mask_ratio=0.3, seed=4))
    assert all(torch.equal(x.values, y.values) and torch.equal(x.mask, y.mask) for x, y in zip(a, b))
    assert all(x.src.numel() <= 512 for x in a)
    assert sorted(np.concatenate([x.cells for x in a]).tolist()) == list(range(40))
    assert all(bool(x.mask.any()) for x in a)
