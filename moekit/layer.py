"""MoE: a drop-in replacement for a transformer feed-forward block.

Wires router -> dispatcher -> experts (+ shared experts) and returns the
output with an MoEAux record; the logic lives in those parts.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from moekit.aux import MoEAux, moe_aux
from moekit.config import MoEConfig
from moekit.contract import DispatchPlan
from moekit.dispatch import build_dispatcher
from moekit.experts import Experts, SharedExperts
from moekit.experts.stacked import holds_half_weights
from moekit.func_transforms import refuse_vmap
from moekit.memory import check_layer_fits
from moekit.null_experts import copy_expert_output, real_expert_routing
from moekit.replay import check_expert_indices
from moekit.routers import build_router
from moekit.dispatch.local import GlobalLoad, SideWork
from moekit.routers.bias import recomputing
from moekit.routing import Routing, autocast_off, expert_counts

_FORGOTTEN_STEP = 1000  # micro-batches without router_step before a warning
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class MoE(nn.Module):
    """Mixture-of-Experts feed-forward layer.

    forward(x [..., D], padding_mask [...] bool or None, token_ids [...] int or None,
    expert_indices [T, K] int64 or None) -> (y [..., D], MoEAux).
    y has x's shape and dtype; under torch.autocast the experts compute in the autocast
    dtype, as nn.Linear does, and y has that dtype (the router and the losses stay float32).
    Padded positions (mask False) are not routed,
    produce zeros and take no part in losses, counts or metrics; the MoEAux
    per-token fields then cover only the real tokens, in flattened order.
    token_ids feed router="hash" (other routers ignore them). A sequence, for
    balance_scope="sequence" and capacity_scope="sequence", is the second-to-last
    dim of x (all of x if 2-D).
    expert_indices replays a routing (router="topk" only; see moekit/replay.py): each
    routed token goes to exactly those experts (an earlier aux.expert_indices), with
    combine weights, losses and metrics from the live router; capacity, if any, then
    drops replayed assignments as it drops routed ones.
    With num_null_experts, assignments to null slots run no expert (moekit/null_experts.py).
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        check_layer_fits(config)
        self.config = config
        self.router = build_router(config)
        self.dispatcher = build_dispatcher(config)
        # eval_capacity_fraction: the eval-mode dispatcher (another capacity), else None
        self.eval_dispatcher = None if config.eval_capacity_fraction is None \
            else build_dispatcher(config, training=False)
        self.experts = Experts(config)
        self.shared_experts = SharedExperts(config) if config.num_shared_experts else None
        # output_bias: [D] added once after the combine (JetMoE); zero at init, as there
        self.output_bias = nn.Parameter(torch.zeros(config.dim)) if config.output_bias else None
        # balance_scope="global": counts [E] int64 of the optimizer step's micro-batches so far,
        # over the ranks; moekit.router_step(model) starts them again (empty at every step, so
        # not saved)
        if config.balance_scope == "global":
            self.register_buffer("step_load", torch.zeros(config.num_router_slots,
                                                          dtype=torch.int64), persistent=False)
        else:
            self.step_load = None
        self.micro_batches_in_step = 0

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                token_ids: torch.Tensor | None = None, expert_indices: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, MoEAux]:
        self._check_input(x, padding_mask, token_ids)
        refuse_vmap()
        x_TD = x.reshape(-1, self.config.dim)
        token_ids_T = None if token_ids is None else token_ids.reshape(-1)
        sequence_T, num_sequences = self._sequence_index(x)
        if padding_mask is not None:
            real_T = padding_mask.reshape(-1).nonzero().squeeze(1)
            x_TD = x_TD.index_select(0, real_T)
            token_ids_T = None if token_ids_T is None else token_ids_T.index_select(0, real_T)
            sequence_T = None if sequence_T is None else sequence_T.index_select(0, real_T)
        with autocast_off(x):  # routing math stays float32
            routing = self._route(x_TD, token_ids_T, expert_indices)
        shared = []  # the shared experts' output, computed by the dispatcher's side work
        side_work = None if self.shared_experts is None \
            else (lambda: shared.append(self.shared_experts(x_TD)))
        y_TD, plan = self._run_experts(x_TD, routing, sequence_T, num_sequences, side_work)
        if self.shared_experts is not None:
            (shared_TD,) = shared  # the dispatcher calls side_work exactly once
            y_TD = y_TD + shared_TD
        if self.output_bias is not None:
            y_TD = y_TD + self.output_bias.to(y_TD.dtype)  # autocast: y's dtype, as nn.Linear's bias
        if padding_mask is not None:
            y_TD = y_TD.new_zeros(x.numel() // self.config.dim, self.config.dim) \
                .index_copy(0, real_T, y_TD)
        if self.config.balance_scope != "sequence":  # computed for capacity only
            sequence_T, num_sequences = None, 1
        compute_losses = self.training and torch.is_grad_enabled()
        global_load = None
        if self.training:
            self.router.record_routing(routing)
        with autocast_off(x):  # losses stay float32
            if compute_losses:
                global_load = self.dispatcher.global_load(routing, sequence_T, num_sequences)
                if self.step_load is not None:
                    global_load = self._step_load_so_far(routing, global_load)
            aux = moe_aux(routing, plan, self.config, compute_losses, sequence_T, num_sequences,
                          global_load)
        return y_TD.view(x.shape), aux

    def _route(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None,
               expert_indices: torch.Tensor | None) -> Routing:
        """The router's Routing of x_TD [T, D], or its replay of expert_indices [T, K]."""
        if expert_indices is None:
            return self.router(x_TD, token_ids_T)
        c = self.config
        ids_TK = check_expert_indices(expert_indices, x_TD.shape[0], c.top_k, c.num_router_slots,
                                      x_TD.device)
        return self.router.replay(x_TD, ids_TK)

    def _run_experts(self, x_TD: torch.Tensor, routing: Routing, sequence_T: torch.Tensor | None,
                     num_sequences: int, side_work: SideWork | None = None
                     ) -> tuple[torch.Tensor, DispatchPlan]:
        """(y_TD [T, D], plan): the dispatcher (the eval one of eval_capacity_fraction in eval
        mode) and the experts on the real experts' assignments, scaled by 1 -
        expert_output_dropout in eval mode, plus the copy experts' share with null experts of
        kind "copy". side_work: called once by the dispatcher (while its rows travel, under
        expert parallelism)."""
        c = self.config
        dispatcher = self.dispatcher if self.training or self.eval_dispatcher is None \
            else self.eval_dispatcher
        real = real_expert_routing(routing, c.num_experts) if c.num_null_experts else routing
        y_TD, plan = dispatcher.run_experts(x_TD, real, self.experts, sequence_T, num_sequences,
                                            side_work)
        if not self.training and c.expert_output_dropout > 0:
            y_TD = y_TD * (1 - c.expert_output_dropout)  # its expectation in training
        if c.num_null_experts and c.null_expert_kind == "copy":
            y_TD = y_TD + copy_expert_output(x_TD, routing, c.num_experts).to(y_TD.dtype)
        return y_TD, plan

    def _step_load_so_far(self, routing: Routing, load: GlobalLoad | None) -> GlobalLoad:
        """balance_scope="global": add this micro-batch's counts (over the ranks) to
        step_load, unless activation checkpointing is recomputing it, and have the loss take
        f from the step's micro-batches so far (P stays this micro-batch's)."""
        if load is None:
            counts_E = expert_counts(routing.expert_indices, self.config.num_router_slots,
                                     routing.assignment_mask)
            load = GlobalLoad(counts_E, routing.num_tokens, 0)
        if not recomputing():
            self.step_load += load.counts_E
            self.micro_batches_in_step += 1
            if self.micro_batches_in_step == _FORGOTTEN_STEP:
                warnings.warn(f"balance_scope='global' has summed {_FORGOTTEN_STEP} micro-batches "
                              "without a moekit.router_step(model): call it once per optimizer "
                              "step (or moekit.router_step_before(model, optimizer)), or f keeps "
                              "averaging over the whole run", stacklevel=3)
        return load._replace(counts_E=self.step_load)

    def _sequence_index(self, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """[T] sequence index of every token, and the number of sequences, when
        balance_scope or capacity_scope is "sequence" (else None, 1)."""
        if "sequence" not in (self.config.balance_scope, self.config.capacity_scope):
            return None, 1
        num_tokens = x.numel() // self.config.dim
        seq_len = x.shape[-2] if x.dim() >= 3 else num_tokens
        num_sequences = num_tokens // seq_len if seq_len else 0
        sequence_T = torch.arange(num_tokens, device=x.device) // max(seq_len, 1)
        return sequence_T, num_sequences

    def _check_input(self, x: torch.Tensor, padding_mask: torch.Tensor | None,
                     token_ids: torch.Tensor | None) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"x must be a floating tensor (float16/bfloat16/float32/float64), "
                            f"got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.config.dim:
            raise ValueError(f"x must have shape [..., dim={self.config.dim}], got {tuple(x.shape)}")
        weight_dtype, weight_device = self.experts.dtype, self.experts.device
        if x.device != weight_device:
            raise ValueError(f"x is on {x.device} but the layer's weights are on {weight_device}")
        half_weights = holds_half_weights(self.experts, x.dtype)
        if x.dtype != weight_dtype and not half_weights:
            if weight_dtype in (torch.bfloat16, torch.float16):
                raise TypeError(f"x has dtype {x.dtype} but the layer's expert weights are "
                                f"{weight_dtype}: half-size experts take float32 x (with the rest "
                                f"of the layer float32), or x of their dtype with the whole layer "
                                f"in it (moe.to({weight_dtype})); cast x")
            raise TypeError(f"x has dtype {x.dtype} but the layer's weights are {weight_dtype}; "
                            f"cast one to the other (e.g. moe.to({x.dtype})), or for half-size "
                            "expert weights keep the layer and x float32 and cast only the "
                            "experts (moe.experts.to(torch.bfloat16))")
        if half_weights or x.dtype in (torch.bfloat16, torch.float16):
            # half experts with float32 x: the rest float32; half x: the whole layer in its dtype
            others = {name: p.dtype for name, p in self.named_parameters()
                      if not name.startswith("experts.") and p.dtype != x.dtype}
            if others and half_weights:
                raise TypeError(f"with half-size expert weights ({weight_dtype}) the rest of the "
                                f"layer must have x's dtype {x.dtype}, got {others}; cast it back "
                                f"(moe.float(), then moe.experts.to({weight_dtype})), or give x "
                                f"in {weight_dtype} to run a layer held wholly in it")
            if others:
                raise TypeError(f"x and the experts have dtype {x.dtype}, so the rest of the "
                                f"layer must too (a layer held in {x.dtype}: moe.to({x.dtype})), "
                                f"got {others}; or keep x and the rest float32 and cast only "
                                f"the experts (moe.experts.to({x.dtype}))")
        if self.config.batch_invariant and x.device.type != "cpu":
            raise ValueError(f"batch_invariant=True is verified on CPU only (moekit/batch_invariance.py), "
                             f"got x on {x.device}")
        if x.is_meta:  # after the device check: a meta x with real weights is a plain mismatch
            raise ValueError("x is on the meta device, which holds shapes but no values, and the "
                             "routing needs the values (they decide each expert's share of the "
                             "tokens); the meta device is for building without allocating: "
                             "moe.to_empty(device='cpu') (or cuda) and load the weights to run it")
        if padding_mask is not None:
            if not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool:
                raise TypeError("padding_mask must be a bool tensor (True = real token), got "
                                f"{getattr(padding_mask, 'dtype', type(padding_mask).__name__)}")
            if padding_mask.shape != x.shape[:-1]:
                raise ValueError(f"padding_mask must have shape {tuple(x.shape[:-1])} (x's leading "
                                 f"dims), got {tuple(padding_mask.shape)}")
        if token_ids is not None:
            if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() \
                    or token_ids.is_complex() or token_ids.dtype == torch.bool:
                raise TypeError("token_ids must be an integer tensor, got "
                                f"{getattr(token_ids, 'dtype', type(token_ids).__name__)}")
            if token_ids.shape != x.shape[:-1]:
                raise ValueError(f"token_ids must have shape {tuple(x.shape[:-1])} (x's leading "
                                 f"dims), got {tuple(token_ids.shape)}")
            if token_ids.numel() and int(token_ids.min()) < 0:
                raise ValueError(f"token_ids must be >= 0, got {int(token_ids.min())}")
        if self.config.check_finite and not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).any(-1).sum().item()
            raise ValueError(f"x holds NaN or Inf in {bad} token(s) (check_finite=True)")

    def extra_repr(self) -> str:
        c = self.config
        nulls = f", num_null_experts={c.num_null_experts}" if c.num_null_experts else ""
        return (f"dim={c.dim}, expert_dim={c.expert_dim}, num_experts={c.num_experts}{nulls}, "
                f"top_k={c.top_k}, router={c.router!r}, "
                f"capacity_factor={c.capacity_factor}, activation={c.activation!r}")
