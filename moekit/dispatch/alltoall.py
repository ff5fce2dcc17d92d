"""Expert-parallel dispatch: tokens travel to the rank that holds their expert and back.

Rank r of a group of W ranks holds S expert slots: by default the block of
experts [r * S, (r + 1) * S) with S = E / W, or any placement (a list per rank of
the S experts it holds, e.g. from a load-balancing planner), where an expert may
have copies on several ranks (S * W = E + extra copies). Internally rows go to
slots, positions in the rank-major placement, so rows for rank r are the slots
[r * S, (r + 1) * S) whatever the placement. An expert with c copies has its
choices on each rank split, in (token, choice) order, into c runs of equal length
(to within one), one per copy (split_between_copies); the copies' gradients are
summed by moekit.parallel.all_reduce_replicated_grads.
One layer call issues, on every rank and in this order whatever its data:

0. capacity mode only: all_gather of every rank's token count and routing
   choices, so that each rank drops exactly what one process would on the
   concatenated tokens (capacity from the global token count)
1. all_to_all_single of the per-slot row counts     [W * S] int64 -> [W, S]
2. all_to_all_single of the rows (differentiable)   [R, D] -> [R_in, D]
3. the local experts on the received rows, grouped by local expert
4. all_to_all_single of the outputs back (differentiable)
5. the local combine (weighted sum over each token's k outputs)
6. training with gradients only: one all_reduce of the routed counts, tokens and sequences
   (global_load), for the losses (the aux-loss-free bias all-reduces its counts once per
   optimizer step, in moekit.balancing.router_step)

With ``overlap_chunks`` N > 1 the rank's tokens are cut into N consecutive chunks and
steps 1-5 are pipelined: one counts exchange for all chunks, every
chunk's rows sent at once (asynchronous functional collectives, not waited yet), then the
layer's side work (the shared experts) while they travel, then per chunk: wait for its rows,
run its experts, send its outputs back without waiting, so a chunk's return trip overlaps
the next chunk's experts; the outputs are waited for only at the combine. Every rank issues
the same collectives in the same order whatever its data. Outputs equal N = 1 up to the
rounding of the experts' products on other row groupings.

Shapes: T local tokens, K choices, R rows this rank sends, R_in rows it receives,
S slots per rank, C most copies of one expert.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from moekit.capacity import capacity_keep_mask
from moekit.dispatch.capacity import CapacityDispatcher, token_scores
from moekit.contract import DispatchPlan, ExpertsContract, rows_plan
from moekit.dispatch.local import GlobalLoad, LocalDispatcher, SideWork, all_reduced_load, plan_dispatch
from moekit.dispatch.permute import combine_rows, dispatch_rows
from moekit.placement import contiguous_placement, validate_placement
from moekit.routing import Routing


def expert_placement(num_experts: int, world_size: int, placement=None) -> list[list[int]]:
    """The validated placement: for each rank the expert ids it holds. None gives
    contiguous blocks; otherwise a list per rank, or a moekit.placement.Placement
    (from plan_placement), with every expert on at least one rank, the same number
    on every rank, none twice on one rank (moekit.placement.validate_placement with
    copies)."""
    if placement is None:
        placement = contiguous_placement(num_experts, world_size)
    placement = getattr(placement, "experts_per_device", placement)
    return validate_placement(placement, num_experts, world_size, allow_copies=True)


def check_overlap_chunks(overlap_chunks: int) -> int:
    """overlap_chunks itself; a TypeError unless it is an int, a ValueError unless >= 1."""
    if isinstance(overlap_chunks, bool) or not isinstance(overlap_chunks, int):
        raise TypeError(f"overlap_chunks must be an int >= 1, got {overlap_chunks!r}")
    if overlap_chunks < 1:
        raise ValueError(f"overlap_chunks must be an int >= 1, got {overlap_chunks!r}")
    return overlap_chunks


def slot_tables(placement: list[list[int]], num_experts: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a validated placement (expert_placement): expert_of_slot [W * S], the expert in
    each slot of the rank-major placement; copies_E [E], how many slots hold each expert;
    slots_EC [E, C], the slot of each expert's copy c in rank order (padded with its first)."""
    expert_of_slot = torch.tensor([e for experts in placement for e in experts])
    copies_E = torch.bincount(expert_of_slot, minlength=num_experts)
    slots = torch.argsort(expert_of_slot, stable=True).split(copies_E.tolist())
    most = int(copies_E.max())
    slots_EC = torch.stack([torch.cat((s, s[:1].expand(most - len(s)))) for s in slots])
    return expert_of_slot, copies_E, slots_EC


def split_between_copies(ids_TK: torch.Tensor, slots_EC: torch.Tensor, copies_E: torch.Tensor,
                         kept_TK: torch.Tensor | None = None) -> torch.Tensor:
    """[T, K] int64 slot of every choice: expert e's kept choices, in (token, choice)
    order, split into copies_E[e] runs of equal length (to within one), run c going to
    slot slots_EC[e, c]. Choices not kept (kept_TK False) go to e's first copy; they
    are not dispatched. slots_EC [E, C]: the slots of each expert's copies (padded);
    copies_E [E] int64 >= 1."""
    num_experts = slots_EC.shape[0]
    ids_A = ids_TK.reshape(-1)
    key_A = ids_A if kept_TK is None else torch.where(kept_TK.reshape(-1), ids_A, num_experts)
    order_A = torch.argsort(key_A, stable=True)
    count_X = torch.bincount(key_A, minlength=num_experts + 1)
    sorted_key_A = key_A.index_select(0, order_A)
    position_A = torch.arange(ids_A.shape[0], device=ids_A.device) - (count_X.cumsum(0) - count_X)[sorted_key_A]
    copies_X = torch.cat((copies_E, copies_E.new_ones(1)))
    copy_A = position_A * copies_X[sorted_key_A] // count_X[sorted_key_A].clamp_min(1)
    copy_A = torch.where(sorted_key_A < num_experts, copy_A, 0)
    slot_A = slots_EC[ids_A.index_select(0, order_A), copy_A]
    return torch.empty_like(ids_A).index_copy(0, order_A, slot_A).view_as(ids_TK)


class AllToAllDispatcher:
    """Wraps a LocalDispatcher (which plans the local sort) for an expert-parallel
    group, with the experts placed as ``placement`` says (see expert_placement)."""

    def __init__(self, local: LocalDispatcher, group: dist.ProcessGroup | None = None,
                 placement=None, overlap_chunks: int = 1) -> None:
        self.local = local
        self.overlap_chunks = check_overlap_chunks(overlap_chunks)
        self.group = group
        # the ranks whose tokens make one batch (capacity, losses): the expert-parallel group,
        # or more when it is replicated over data-parallel ranks (moekit.parallel.fsdp)
        self.batch_group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.placement = expert_placement(local.num_experts, self.world_size, placement)
        self.num_local_experts = len(self.placement[0])  # slots per rank
        self.expert_of_slot, self.copies_E, self.slots_EC = slot_tables(self.placement, local.num_experts)
        self.num_slots = self.expert_of_slot.shape[0]
        self.has_copies = self.num_slots > local.num_experts
        # slot_of_expert[e]: e's (first) slot; None when slot e is expert e, without copies
        self.slot_of_expert = None if torch.equal(self.expert_of_slot, torch.arange(local.num_experts)) \
            else self.slots_EC[:, 0].contiguous()

    @property
    def num_experts(self) -> int:
        return self.local.num_experts

    def global_load(self, routing: Routing, sequence_T: torch.Tensor | None = None,
                    num_sequences: int = 0) -> GlobalLoad:
        """Routed counts, tokens and sequences summed over the batch group (see
        all_reduced_load): one all_reduce, the layer's only one per forward."""
        return all_reduced_load(routing, routing.num_experts, self.batch_group, sequence_T,
                                num_sequences)

    def plan(self, routing: Routing, sequence_T: torch.Tensor | None = None,
             num_sequences: int = 1) -> DispatchPlan:
        """The local dispatch plan, rows and counts_E in slot order (each choice of an
        expert with copies to one copy, see split_between_copies); with capacity, of
        the assignments that survive capacity over every rank's tokens (per-sequence
        capacity is local: a sequence lives on one rank)."""
        global_capacity = isinstance(self.local, CapacityDispatcher) and not self.local.per_sequence
        kept_TK = self._global_keep_mask(routing) if global_capacity \
            else self.local.keep_mask(routing, sequence_T, num_sequences)
        ids_TK = routing.expert_indices
        if self.has_copies:
            device = ids_TK.device
            ids_TK = split_between_copies(ids_TK, self.slots_EC.to(device), self.copies_E.to(device),
                                          kept_TK)
        elif self.slot_of_expert is not None:
            ids_TK = self.slot_of_expert.to(ids_TK.device)[ids_TK]
        return plan_dispatch(ids_TK, routing.expert_weights, self.num_slots, kept_TK,
                             routing.assignment_mask, self.local.renormalize_kept)

    def _global_keep_mask(self, routing: Routing) -> torch.Tensor:
        """bool [T, K]: this rank's rows of capacity_keep_mask over the batch group's tokens."""
        ids_TK, weights_TK, mask_TK = (routing.expert_indices, routing.expert_weights.detach(),
                                       routing.assignment_mask)
        packed_TX = torch.cat((token_scores(routing).double().unsqueeze(1), ids_TK.double(),
                               weights_TK.double()), 1)
        if mask_TK is not None:
            packed_TX = torch.cat((packed_TX, mask_TK.double()), 1)
        all_TX, start = gather_rows(packed_TX, self.batch_group)
        scores_T, all_TX = all_TX[:, 0], all_TX[:, 1:]
        top_k = ids_TK.shape[1]
        all_mask = None if mask_TK is None else all_TX[:, 2 * top_k:].bool()
        capacity = self.local.capacity(all_TX.shape[0], top_k)
        kept = capacity_keep_mask(all_TX[:, :top_k].long(), all_TX[:, top_k:2 * top_k],
                                  self.num_experts, capacity, self.local.drop_policy, all_mask,
                                  token_scores_T=scores_T)
        return kept[start:start + ids_TK.shape[0]]

    def run_experts(self, x_TD: torch.Tensor, routing: Routing, experts: ExpertsContract,
                    sequence_T: torch.Tensor | None = None, num_sequences: int = 1,
                    side_work: SideWork | None = None) -> tuple[torch.Tensor, DispatchPlan]:
        """combine(remote experts(dispatch(x_TD))) -> (y_TD [T, D], plan). ``side_work`` (the
        layer's shared experts) is called once, while the first rows travel."""
        plan = self.plan(routing, sequence_T, num_sequences)
        chunks = token_chunks(plan, self.overlap_chunks)
        rows = [dispatch_rows(x_TD[start:stop], chunk) for (start, stop), chunk in chunks]
        counts_NWS = torch.stack([chunk.counts_E for _, chunk in chunks]).view(
            len(chunks), self.world_size, self.num_local_experts)
        received_NWS = self._exchange_counts(counts_NWS)
        # rows per chunk and rank, read on the host once (the uneven splits of every exchange)
        send_NW, recv_NW = counts_NWS.sum(2).tolist(), received_NWS.sum(2).tolist()
        sent = [self._send(rows_RD, recv_W, send_W) for rows_RD, send_W, recv_W in zip(rows, send_NW, recv_NW)]
        if side_work is not None:
            side_work()
        returned = []
        for in_flight, received_WS, send_W, recv_W in zip(sent, received_NWS, send_NW, recv_NW):
            received_RD = funcol.wait_tensor(in_flight)
            # received rows come grouped by source rank, then local expert: regroup by expert
            by_expert = _source_major_to_expert_major(received_WS)
            out_RD = experts(received_RD.index_select(0, by_expert),
                             rows_plan(received_WS.sum(0), by_expert.shape[0]))
            out_RD = torch.empty_like(out_RD).index_copy(0, by_expert, out_RD)
            returned.append(self._send(out_RD, send_W, recv_W))
        pieces = [combine_rows(funcol.wait_tensor(back_RD), chunk)
                  for back_RD, (_, chunk) in zip(returned, chunks)]
        y_TD = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if self.slot_of_expert is not None:  # report counts per expert id, not per slot
            counts_E = plan.counts_E.new_zeros(self.num_experts).index_add(
                0, self.expert_of_slot.to(plan.counts_E.device), plan.counts_E)
            plan = plan.with_counts(counts_E)
        return y_TD, plan

    def _exchange_counts(self, counts_NWS: torch.Tensor) -> torch.Tensor:
        """[N, W, S] rows this rank sends per chunk, destination rank and slot -> [N, W, S]
        rows it receives per chunk, source rank and local slot: one all_to_all_single."""
        send_WNS = counts_NWS.transpose(0, 1).contiguous()
        received_WNS = torch.empty_like(send_WNS)
        dist.all_to_all_single(received_WNS, send_WNS, group=self.group)
        return received_WNS.transpose(0, 1)

    def _send(self, rows_RD: torch.Tensor, recv_sizes: list[int], send_sizes: list[int]
              ) -> torch.Tensor:
        """Differentiable all_to_all_single of rows with uneven splits, issued and not
        waited for (funcol.wait_tensor waits); the backward sends the gradients back along
        the same routes."""
        group = self.group if self.group is not None else dist.group.WORLD
        return funcol.all_to_all_single_autograd(rows_RD.contiguous(), recv_sizes, send_sizes, group)


def token_chunks(plan: DispatchPlan, num_chunks: int
                 ) -> list[tuple[tuple[int, int], DispatchPlan]]:
    """The plan of T tokens cut into num_chunks consecutive token ranges (sizes within one
    of each other, some empty when T < num_chunks): [((start, stop), plan of tokens
    [start, stop))], the plan itself when num_chunks == 1."""
    num_tokens = plan.ids_TK.shape[0]
    if num_chunks == 1:
        return [((0, num_tokens), plan)]
    bounds = [num_tokens * i // num_chunks for i in range(num_chunks + 1)]

    def part(tensor_TK: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
        return None if tensor_TK is None else tensor_TK[start:stop]

    return [((start, stop), DispatchPlan(plan.ids_TK[start:stop], plan.weights_TK[start:stop],
                                         plan.num_experts, part(plan.kept_TK, start, stop),
                                         part(plan.assigned_TK, start, stop)))
            for start, stop in zip(bounds, bounds[1:])]


def gather_rows(x_TX: torch.Tensor, group: dist.ProcessGroup | None = None
                ) -> tuple[torch.Tensor, int]:
    """Every rank's rows, concatenated in rank order -> ([sum of T over ranks, X],
    index of this rank's first row). Ranks may hold different T (zero included).
    Not differentiable. Two all_gathers (row counts, then rows padded to the longest)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    size = torch.tensor([x_TX.shape[0]], dtype=torch.int64, device=x_TX.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = torch.cat(sizes).tolist()
    padded = x_TX.new_zeros(max(sizes), *x_TX.shape[1:])
    padded[:x_TX.shape[0]] = x_TX
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)]), sum(sizes[:rank])


def _source_major_to_expert_major(counts_WE: torch.Tensor) -> torch.Tensor:
    """Row permutation [R_in] taking rows laid out (source rank, local expert) to
    (local expert, source rank): new row i reads old row result[i]. A stable sort
    of the rows by local expert, without a host round trip per block."""
    num_local_experts = counts_WE.shape[1]
    expert_of_block = torch.arange(num_local_experts, device=counts_WE.device).repeat(counts_WE.shape[0])
    expert_of_row = torch.repeat_interleave(expert_of_block, counts_WE.reshape(-1))
    return torch.argsort(expert_of_row, stable=True)
