"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models").

A fixed, parameter-free function of the token id picks each token's k
experts: expert e gets the score h(id, e) = fmix32(fmix32(id ^ s) ^ c * (e + 1)),
a 32-bit integer mix (MurmurHash3's finaliser) keyed by the seed s, and the k
highest scores win. It is the same on every run, process and device, and
uniform over experts when ids are uniform. Combine weights are 1/k
(hash_weights="uniform") or the softmax of a learned router's logits over the
k hashed experts (hash_weights="router").
"""

from __future__ import annotations

import torch

from moekit.config import MoEConfig
from moekit.routers.base import LinearRouter
from moekit.routers.scores import router_scores, selected_weights
from moekit.routing import Routing, router_dtype

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for x in [0, 2^32), exact in int64 (no overflow)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hash_experts(token_ids_T: torch.Tensor, num_experts: int, top_k: int, seed: int = 0) -> torch.Tensor:
    """[T] non-negative integer ids -> [T, K] int64 distinct expert ids."""
    key_T = _fmix32((token_ids_T.to(torch.int64) & _MASK32) ^ _mul32(torch.tensor(seed + 1), 0x9E3779B9))
    experts_E = torch.arange(1, num_experts + 1, device=token_ids_T.device, dtype=torch.int64)
    score_TE = _fmix32(key_T[:, None] ^ _mul32(experts_E, 0x27D4EB2F)[None, :])
    return score_TE.topk(top_k, dim=-1).indices


class HashRouter(LinearRouter):
    """Holds a learned ``weight`` only with hash_weights="router"."""

    cannot_replay = ("fixes each token's experts by its token id, so there is nothing to "
                     "replay")

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        if config.hash_weights == "uniform":
            self.weight = self.bias = self.noise_weight = None

    def reset_parameters(self) -> None:
        if self.weight is not None:
            super().reset_parameters()

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        """x_TD: [T, D], token_ids_T: [T] int -> Routing with K = top_k."""
        c = self.config
        if token_ids_T is None:
            raise ValueError("router='hash' needs token_ids: call moe(x, token_ids=ids) with ids "
                             "shaped like x's leading dims")
        ids_TK = hash_experts(token_ids_T, c.num_experts, c.top_k, c.hash_seed)
        if self.weight is None:
            dtype = router_dtype(x_TD.dtype)
            shape = (x_TD.shape[0], c.num_experts)
            logits_TE = x_TD.new_zeros(shape, dtype=dtype)
            probs_TE = x_TD.new_full(shape, 1.0 / c.num_experts, dtype=dtype)
            weights_TK = x_TD.new_full(ids_TK.shape, c.route_scale / c.top_k, dtype=dtype)
            return Routing(ids_TK, weights_TK, probs_TE, logits_TE)
        logits_TE = self.compute_logits(x_TD)
        scores_TE, probs_TE = router_scores(logits_TE, "softmax")
        weights_TK = selected_weights(scores_TE, ids_TK, True, c.route_scale)
        return Routing(ids_TK, weights_TK, probs_TE, logits_TE)
