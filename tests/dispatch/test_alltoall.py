"""split_between_copies: each expert's kept choices split in order into equal runs, one per copy."""

from __future__ import annotations

import pytest
import torch

from moekit.dispatch.alltoall import split_between_copies


def _split_by_loop(ids_TK, slots_EC, copies_E, kept_TK):
    """The rule, one choice at a time: the i-th kept choice of expert e (in (token, choice)
    order) of n goes to copy i * c_e // n; a choice not kept to copy 0."""
    ids, kept = ids_TK.tolist(), kept_TK.tolist()
    totals = {}
    for row_ids, row_kept in zip(ids, kept):
        for e, k in zip(row_ids, row_kept):
            totals[e] = totals.get(e, 0) + k
    seen, out = {}, []
    for row_ids, row_kept in zip(ids, kept):
        row = []
        for e, k in zip(row_ids, row_kept):
            copy = 0
            if k:
                copy = seen.get(e, 0) * int(copies_E[e]) // totals[e]
                seen[e] = seen.get(e, 0) + 1
            row.append(int(slots_EC[e, copy]))
        out.append(row)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_split_between_copies_matches_the_rule_one_choice_at_a_time(seed):
    generator = torch.Generator().manual_seed(seed)
    num_experts, top_k, num_tokens = 5, 2, [0, 1, 7, 40, 13, 100][seed]
    ids_TK = torch.rand(num_tokens, num_experts, generator=generator).argsort(1)[:, :top_k]
    kept_TK = torch.rand(num_tokens, top_k, generator=generator) < 0.7
    copies_E = torch.tensor([1, 3, 2, 1, 4])
    slots_EC = torch.arange(num_experts * 4).view(num_experts, 4)
    expected = _split_by_loop(ids_TK, slots_EC, copies_E, kept_TK)
    assert split_between_copies(ids_TK, slots_EC, copies_E, kept_TK).tolist() == expected
    everything = torch.ones_like(kept_TK)
    assert split_between_copies(ids_TK, slots_EC, copies_E).tolist() == \
        _split_by_loop(ids_TK, slots_EC, copies_E, everything)


def test_an_expert_with_copies_sends_each_copy_an_equal_share():
    ids_TK = torch.zeros(10, 1, dtype=torch.int64)
    slots = split_between_copies(ids_TK, torch.tensor([[4, 9, 2]]), torch.tensor([3]))
    assert torch.bincount(slots.flatten(), minlength=10)[[4, 9, 2]].tolist() == [4, 3, 3]
