"""Find the MoE blocks of a transformers model by their structure.

An MoE block is a module with a router and a collection of experts among its
children, whatever its class is called:
- the router: a child holding exactly one weight matrix, [E, D] (a Linear to
  E outputs, or a raw ``weight`` Parameter, possibly inside a wrapper module);
- the experts, for the same E: a transformers experts module (the experts
  interface: ``has_gate`` and ``down_proj``), E sibling modules of one class
  (an ``nn.ModuleList``/``ModuleDict`` of expert MLPs, or a module holding
  ``expert_0`` ... ``expert_{E-1}``), or a custom module holding Parameters
  stacked over the experts on it or its direct children, reading D-wide
  inputs (leading dim E, or E x rows flattened into 2-D as in DBRX).

A module holding a transformers experts module is a block even without a
router of that shape. A block's own submodules are not searched. Plain
``torch.nn`` layers are never experts, so a dense gated MLP (``gate_proj``,
``up_proj``, ``down_proj``, all ``nn.Linear``) is not a block.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from torch import nn


def moe_blocks(module: nn.Module, prefix: str = "", skip: tuple[type, ...] = ()
               ) -> Iterator[tuple[str, nn.Module]]:
    """(name, block) of every MoE block under ``module``, in module order;
    modules of the ``skip`` types and a block's own submodules are not searched."""
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, skip):
            continue
        if is_moe_block(child):
            yield full, child
        else:
            yield from moe_blocks(child, full, skip)


def is_moe_block(module: nn.Module) -> bool:
    """Whether ``module`` has a router and a collection of experts among its children."""
    children = list(module.children())
    if any(is_interface_experts(c) for c in children):
        return True
    for router in children:
        shape = router_shape(router)
        if shape is not None and any(_holds_experts(c, *shape) for c in children if c is not router):
            return True
    return False


def is_interface_experts(module: nn.Module) -> bool:
    """A transformers experts module (``@use_experts_implementation``), whose
    forward goes through transformers' experts registry."""
    return hasattr(module, "has_gate") and hasattr(module, "down_proj")


def interface_experts(block: nn.Module) -> list[nn.Module]:
    """The block's direct children that are transformers experts modules."""
    return [c for c in block.children() if is_interface_experts(c)]


def router_shape(module: nn.Module) -> tuple[int, int] | None:
    """(E, D) if ``module`` holds exactly one weight matrix, of shape [E, D] with
    E >= 2 (an embedding table is not a router)."""
    if isinstance(module, nn.Embedding):
        return None
    matrices = [p for p in module.parameters() if p.dim() >= 2]
    if len(matrices) != 1 or matrices[0].dim() != 2 or matrices[0].shape[0] < 2:
        return None
    return tuple(matrices[0].shape)


def _holds_experts(module: nn.Module, num_experts: int, dim: int) -> bool:
    """E sibling modules of one class with parameters, or Parameters stacked over
    E experts on the module or its direct children, reading D-wide inputs:
    [E, ..., D, ...] (3-D and more) or [E * rows, D] (2-D, rows >= 2). Plain
    torch.nn layers hold no experts."""
    if _is_torch_layer(module):
        return False
    same_class = Counter(type(c) for c in module.children() if any(True for _ in c.parameters()))
    if any(count == num_experts for count in same_class.values()):
        return True
    owners = [module, *(c for c in module.children() if not _is_torch_layer(c))]
    return any(_stacked(p.shape, num_experts, dim)
               for owner in owners for p in owner.parameters(recurse=False))


def _stacked(shape: tuple[int, ...], num_experts: int, dim: int) -> bool:
    if len(shape) >= 3:
        return shape[0] == num_experts and dim in shape[1:]
    return len(shape) == 2 and shape[0] % num_experts == 0 and shape[0] > num_experts \
        and shape[1] == dim


_COLLECTIONS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def _is_torch_layer(module: nn.Module) -> bool:
    """A layer of torch.nn itself (Linear, Conv, norms, Sequential, ...), never
    an experts module; torch.nn's lists and dicts may hold experts."""
    return type(module).__module__.startswith("torch.nn.") and not isinstance(module, _COLLECTIONS)
