"""Balanced assignment routing (BASE layers, Lewis et al. 2021), generalised to top-k.

In training, the T*k assignments are spread so that every expert gets floor or
ceil of T*k/E of them, each token gets k distinct experts, and the total router
score is maximised. This is a small min-cost flow problem; moekit solves it in
two vectorised steps:
1. greedy rounding: experts get floor(T*k/E) slots, plus one for the
   (T*k mod E) experts with the highest total score; in rounds, every token
   short of k experts proposes to its best experts that still have room, and
   each expert accepts its best proposals up to its room. A token whose only
   open experts are ones it already holds swaps with a token of a full expert
   (such a swap always exists when capacities differ by at most one).
2. cycle cancelling: on the graph of experts, moving the best token from
   expert a to expert b has gain G[a, b]; a cycle of moves (or a path from an
   expert holding ceil to one holding floor) with positive total gain raises
   the total score and keeps the balance. Bellman-Ford finds such cycles until
   none is left, which proves optimality, or until ``max_improvements``.
docs/routing.md gives the measured optimality gap against an exact LP solver.
In eval, routing is plain top-k. Combine weights are the scores of the
assigned experts as in top-k (use score_func="sigmoid" or normalize_topk=False
with top_k=1 so that the router still gets a gradient, as BASE does).
"""

from __future__ import annotations

import torch

from moekit.routers.base import BatchWideRouter
from moekit.routers.scores import router_scores, selected_weights
from moekit.routers.topk import route_topk
from moekit.routing import Routing

MAX_IMPROVEMENTS = 4
_GAIN_TOLERANCE = 1e-12
_TOKEN_CHUNK = 1024


def balanced_capacities(scores_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """[E] int64: floor(T*k/E), plus one for the (T*k mod E) experts of highest total score."""
    num_tokens, num_experts = scores_TE.shape
    base, extra = divmod(num_tokens * top_k, num_experts)
    capacity_E = torch.full((num_experts,), base, dtype=torch.int64)
    if extra:
        capacity_E[scores_TE.sum(0).topk(extra).indices] += 1
    return capacity_E


def _swap_in(assigned_TE: torch.Tensor, room_E: torch.Tensor, scores_TE: torch.Tensor,
             token: int) -> None:
    """Give ``token`` one more expert when every expert with room already has it:
    move some token u from a full expert f (that ``token`` lacks) to an expert e
    with room (that u lacks), and give f's freed slot to ``token``."""
    best = None
    for e in (room_E > 0).nonzero().flatten().tolist():
        valid_TE = assigned_TE & ~assigned_TE[token][None, :] & ~assigned_TE[:, e][:, None]
        gain_TE = scores_TE[token][None, :] + scores_TE[:, e][:, None] - scores_TE
        gain_TE = gain_TE.masked_fill(~valid_TE, float("-inf"))
        flat = int(gain_TE.argmax())
        if valid_TE.view(-1)[flat] and (best is None or gain_TE.view(-1)[flat] > best[0]):
            best = (gain_TE.view(-1)[flat], *divmod(flat, assigned_TE.shape[1]), e)
    if best is None:
        raise RuntimeError("balanced assignment found no swap; capacities must differ by at most 1")
    _, u, f, e = best
    assigned_TE[u, f] = False
    assigned_TE[u, e] = True
    assigned_TE[token, f] = True
    room_E[e] -= 1


def greedy_balanced(scores_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, E] bool assignment: k experts per token, floor/ceil per expert."""
    num_tokens, num_experts = scores_TE.shape
    assigned_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    room_E = balanced_capacities(scores_TE, top_k)
    arange_E = torch.arange(num_experts).expand(num_tokens, -1)
    arange_T = torch.arange(num_tokens)[:, None].expand(-1, num_experts)
    while True:
        need_T = top_k - assigned_TE.sum(1)
        if not bool(need_T.any()):
            return assigned_TE
        open_TE = ~assigned_TE & (room_E > 0)[None, :] & (need_T > 0)[:, None]
        stuck = ((need_T > 0) & ~open_TE.any(1)).nonzero().flatten().tolist()
        for token in stuck:
            _swap_in(assigned_TE, room_E, scores_TE, token)
        if stuck:
            continue
        # Each needy token proposes to its best `need` open experts ...
        candidate_TE = scores_TE.masked_fill(~open_TE, float("-inf"))
        rank_TE = torch.empty_like(arange_E).scatter_(
            1, candidate_TE.argsort(dim=1, descending=True, stable=True), arange_E)
        proposal_TE = open_TE & (rank_TE < need_T[:, None])
        # ... and each expert accepts its best proposals up to its room.
        bids_TE = scores_TE.masked_fill(~proposal_TE, float("-inf"))
        bid_rank_TE = torch.empty_like(arange_T).scatter_(
            0, bids_TE.argsort(dim=0, descending=True, stable=True), arange_T)
        accepted_TE = proposal_TE & (bid_rank_TE < room_E[None, :])
        assigned_TE |= accepted_TE
        room_E -= accepted_TE.sum(0)


def _best_moves(scores_TE: torch.Tensor, assigned_TE: torch.Tensor):
    """gain_EE[a, b], token_EE[a, b]: the best token in a but not in b to move to b."""
    num_experts = scores_TE.shape[1]
    gain_EE = scores_TE.new_full((num_experts, num_experts), float("-inf"))
    token_EE = torch.zeros(num_experts, num_experts, dtype=torch.int64)
    for start in range(0, scores_TE.shape[0], _TOKEN_CHUNK):
        s = scores_TE[start:start + _TOKEN_CHUNK]
        held = assigned_TE[start:start + _TOKEN_CHUNK]
        move_TEE = (s[:, None, :] - s[:, :, None]).masked_fill(
            ~(held[:, :, None] & ~held[:, None, :]), float("-inf"))
        gain, token = move_TEE.max(0)
        better = gain > gain_EE
        gain_EE = torch.where(better, gain, gain_EE)
        token_EE = torch.where(better, token + start, token_EE)
    return gain_EE, token_EE


def _positive_cycle(weight_NN: torch.Tensor) -> list[int] | None:
    """A cycle of positive total weight in a dense graph (Bellman-Ford), or None."""
    n = weight_NN.shape[0]
    cost_NN = -weight_NN
    dist_N = torch.zeros(n, dtype=weight_NN.dtype)
    pred_N = torch.full((n,), -1, dtype=torch.int64)
    updated = None
    for _ in range(n):
        candidate_NN = dist_N[:, None] + cost_NN
        best_N, arg_N = candidate_NN.min(0)
        improve_N = best_N < dist_N - _GAIN_TOLERANCE
        if not bool(improve_N.any()):
            return None
        dist_N = torch.where(improve_N, best_N, dist_N)
        pred_N = torch.where(improve_N, arg_N, pred_N)
        updated = int(improve_N.nonzero()[0])
    node = updated
    for _ in range(n):  # walk back into the cycle
        node = int(pred_N[node])
    cycle, current = [node], int(pred_N[node])
    while current != node:
        cycle.append(current)
        current = int(pred_N[current])
    return cycle[::-1]  # edges cycle[i] -> cycle[i + 1]


def improve_assignment(scores_TE: torch.Tensor, assigned_TE: torch.Tensor,
                       max_improvements: int = MAX_IMPROVEMENTS) -> int:
    """Cancel positive-gain move cycles in place; returns how many were applied
    (fewer than max_improvements means the assignment is optimal)."""
    num_experts = scores_TE.shape[1]
    for step in range(max_improvements):
        gain_EE, token_EE = _best_moves(scores_TE, assigned_TE)
        # Node E is a slack node: a path from an expert at ceil to one at floor
        # closes through it, shifting which experts hold the extra slot.
        load_E = assigned_TE.sum(0)
        weight_NN = scores_TE.new_full((num_experts + 1, num_experts + 1), float("-inf"))
        weight_NN[:num_experts, :num_experts] = gain_EE
        if load_E.max() > load_E.min():
            weight_NN[num_experts, :num_experts][load_E == load_E.max()] = 0.0
            weight_NN[:num_experts, num_experts][load_E == load_E.min()] = 0.0
        cycle = _positive_cycle(weight_NN)
        if cycle is None:
            return step
        moves = [(int(token_EE[a, b]), a, b) for a, b in zip(cycle, cycle[1:] + cycle[:1])
                 if a < num_experts and b < num_experts]
        for token, a, b in moves:
            assigned_TE[token, a] = False
        for token, a, b in moves:
            assigned_TE[token, b] = True
    return max_improvements


@torch.no_grad()
def balanced_assignment(scores_TE: torch.Tensor, top_k: int,
                        max_improvements: int = MAX_IMPROVEMENTS) -> torch.Tensor:
    """[T, E] scores -> [T, K] int64 distinct experts per token, every expert
    getting floor or ceil of T*K/E assignments, ordered best first.
    Runs on the CPU in float64. Not differentiable."""
    device = scores_TE.device
    scores_TE = scores_TE.detach().double().cpu().nan_to_num(nan=-1.0, posinf=2.0, neginf=-1.0)
    assigned_TE = greedy_balanced(scores_TE, top_k)
    improve_assignment(scores_TE, assigned_TE, max_improvements)
    ids_TK = scores_TE.masked_fill(~assigned_TE, float("-inf")).topk(top_k, dim=1).indices
    return ids_TK.to(device)


class BalancedRouter(BatchWideRouter):
    """Balanced over the whole batch's tokens (all ranks' under expert parallelism, see
    BatchWideRouter): every rank solves the same assignment and keeps its own rows."""

    cannot_replay = ("solves one assignment for the whole batch in training, so a token has no "
                     "choice of its own to replay")

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        """x_TD: [T, D] -> Routing with K = top_k (balanced in training, top-k in eval)."""
        c = self.config
        logits_TE = self.compute_logits(x_TD)
        if not self.training:
            return route_topk(logits_TE, c.top_k, c.score_func, c.normalize_topk, c.route_scale)
        scores_TE, probs_TE = router_scores(logits_TE, c.score_func)
        all_scores_TE, start = self.whole_batch(scores_TE.detach())
        ids_TK = balanced_assignment(all_scores_TE, c.top_k)[start:start + x_TD.shape[0]]
        weights_TK = selected_weights(scores_TE, ids_TK, c.normalize_topk, c.route_scale)
        return Routing(ids_TK, weights_TK, probs_TE, logits_TE)
