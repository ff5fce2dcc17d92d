"""Which torch.func transforms (grad, jvp, vmap, ...) the current call runs under.

The layer refuses vmap (routing gives every sample its own, data-dependent expert groups)
and the backends that cannot run under a transform say so, so "auto" passes them over.
"""

from __future__ import annotations

import torch

try:  # torch's own record of the transform stack (no public accessor yet)
    from torch._C._functorch import peek_interpreter_stack
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
except ImportError:  # pragma: no cover - a torch without torch.func
    peek_interpreter_stack = None


def active_func_transforms() -> frozenset[str]:
    """Names of the active torch.func transforms ("grad", "jvp", "vmap", "functionalize");
    empty outside them and while torch.compile traces (it has its own functionalization)."""
    # no transform (the common case) is one cheap call
    if torch.compiler.is_compiling() or peek_interpreter_stack is None \
            or peek_interpreter_stack() is None:
        return frozenset()
    return frozenset(i.key().name.lower() for i in retrieve_all_functorch_interpreters())


def refuse_vmap() -> None:
    """RuntimeError under torch.func.vmap, naming what to do instead."""
    if "vmap" in active_func_transforms():
        raise RuntimeError(
            "moekit.MoE does not run under torch.func.vmap: each sample's routing makes its own "
            "expert groups, which vmap cannot batch. Pass the whole batch instead (the layer "
            "takes any leading dims), or loop over the samples; torch.func.grad and jvp work "
            "(with experts_backend='auto' or 'loop')")
