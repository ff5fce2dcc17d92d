"""Routing replay: checking the expert ids handed back to a layer (moe(x, expert_indices=ids)).

A replayed forward routes each token to the given experts instead of the router's top-k,
while the combine weights, the losses and the metrics come from the live router logits
(see the routers' ``replay``). The ids are those of ``aux.expert_indices``: [T, K] int64 for
the T routed tokens (the real ones under a padding mask, in flattened order).
"""

from __future__ import annotations

import torch


def check_expert_indices(ids_TK: object, num_tokens: int, top_k: int, num_slots: int,
                         device: torch.device) -> torch.Tensor:
    """ids_TK itself when it is a valid replayed routing: a [T, K] int64 tensor on ``device``
    with K = top_k, every id in [0, num_slots) (E experts, plus null experts) and distinct
    within a token. TypeError or ValueError naming what is wrong otherwise (one host sync)."""
    if not isinstance(ids_TK, torch.Tensor):
        raise TypeError(f"expert_indices must be a torch.Tensor (aux.expert_indices of a forward), "
                        f"got {type(ids_TK).__name__}")
    if ids_TK.dtype != torch.int64:
        raise TypeError(f"expert_indices must have dtype torch.int64, got {ids_TK.dtype}")
    if tuple(ids_TK.shape) != (num_tokens, top_k):
        raise ValueError(f"expert_indices must have shape [T, K] = [{num_tokens}, {top_k}] (one row "
                         f"per routed token, real tokens only under a padding mask; K = top_k), "
                         f"got {tuple(ids_TK.shape)}")
    if ids_TK.device != device:
        raise ValueError(f"expert_indices is on {ids_TK.device} but x is on {device}")
    if ids_TK.numel() == 0:
        return ids_TK
    low, high = int(ids_TK.min()), int(ids_TK.max())
    if low < 0 or high >= num_slots:
        bad = low if low < 0 else high
        raise ValueError(f"expert_indices must lie in [0, {num_slots}) (the router's slots), "
                         f"got {bad}")
    sorted_TK = ids_TK.sort(dim=1).values
    repeated_T = (sorted_TK[:, 1:] == sorted_TK[:, :-1]).any(dim=1)
    if bool(repeated_T.any()):
        token = int(repeated_T.nonzero()[0, 0])
        raise ValueError(f"expert_indices must name distinct experts per token; token {token} has "
                         f"{ids_TK[token].tolist()}")
    return ids_TK
