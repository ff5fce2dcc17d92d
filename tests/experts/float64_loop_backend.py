"""A toy expert backend: each expert's FFN in float64, one expert at a time.

It exists to prove the experts contract: a backend is this one file plus one registry line,
``register_backend("float64_loop", Float64LoopBackend())`` (tests/experts/test_toy_backend.py),
after which ``MoEConfig(experts_backend="float64_loop")`` runs the whole layer through it.
"""

from __future__ import annotations

import torch

from moekit.contract import DispatchPlan
from moekit.experts import apply_activation


class Float64LoopBackend:
    def unsupported(self, experts, dtype: torch.dtype) -> str | None:
        return None  # float64 arithmetic runs anywhere torch does

    def __call__(self, experts, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """y_TD [T, D] = sum over the plan's rows r of w_r * FFN_{e(r)}(x_TD[token(r)]), or of
        FFN_{e(r)}(w_r * x_TD[token(r)]) with combine_weights_on="input"."""
        config = experts.config
        biased = config.bias
        rows_RD = x_TD.double().index_select(0, plan.token_R)
        weights_R = None if plan.weights_R is None else plan.weights_R.double()[:, None]
        if weights_R is not None and config.combine_weights_on == "input":
            rows_RD, weights_R = rows_RD * weights_R, None
        outputs = []
        for e, rows in enumerate(rows_RD.split(plan.counts_E.tolist())):
            h = rows @ experts.first_proj[e].double().T
            if biased:
                h = h + experts.first_proj_bias[e].double()
            a = apply_activation(h, config.activation, config.activation_params)
            out = a @ experts.down_proj[e].double().T
            outputs.append(out + experts.down_proj_bias[e].double() if biased else out)
        out_RD = torch.cat(outputs)
        if weights_R is not None:
            out_RD = out_RD * weights_R
        y_TD = out_RD.new_zeros(x_TD.shape).index_add(0, plan.token_R, out_RD)
        return y_TD.to(x_TD.dtype)
