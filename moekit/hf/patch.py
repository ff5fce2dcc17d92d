"""Replace the MoE blocks of a loaded transformers model with moekit layers.

``patch(model)`` swaps every supported block for a :class:`MoEBlock` (a moekit
MoE behind the block's call signature) that computes the same outputs, so the
model gets moekit's routers, diagnostics and expert parallelism.
``record_aux(model)`` collects the moekit layers' MoEAux records of a forward;
``unpatch(model)`` puts transformers blocks back, with the current weights.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from moekit.aux import MoEAux
from moekit.hf.blocks import moe_blocks
from moekit.hf.convert import from_hf, to_hf
from moekit.hf.families import NOT_FEED_FORWARD, family_of
from moekit.layer import MoE
from moekit.routing import Routing

ON_UNSUPPORTED = ("error", "warn")


class MoEBlock(nn.Module):
    """A moekit MoE with a transformers MoE block's call signature:
    forward(hidden_states [..., D]) -> [..., D], or as the replaced block returns
    (``returns``, moekit.hf.families.BLOCK_RETURNS): (y, combine weights [T, K] float32)
    for GPT-OSS, (y, router logits [T, E] float32) for Llama 4. ``moe`` is the moekit
    layer; its MoEAux is returned by ``moe`` (see ``record_aux``), not by this block.
    ``block_class`` and ``block_config`` (the replaced block's class and
    transformers config, no tensors) let ``unpatch`` rebuild it."""

    def __init__(self, moe: MoE, family: str, block_class: type[nn.Module], block_config,
                 sequence_logits: bool = False, returns: str = "output") -> None:
        super().__init__()
        self.moe = moe
        self.family = family
        self.block_class = block_class
        self.block_config = block_config
        self.returns = returns
        # sequence_logits: the router logits pass through this module for transformers to
        # record, shaped [..., E] like the input (Switch Transformers' routers return them
        # so) or flat (NllbMoEBlock)
        self.router_logits = RouterLogits() if sequence_logits else None

    def forward(self, hidden_states: torch.Tensor
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        y, aux = self.moe(hidden_states)
        if self.router_logits is not None:
            self.router_logits(aux.router_logits.view(*hidden_states.shape[:-1], -1))
        if self.returns == "output_and_scores":
            return y, aux.expert_weights
        if self.returns == "output_and_logits":
            return y, aux.router_logits
        return y

    def to_hf(self) -> nn.Module:
        """A new transformers block of the replaced class holding this layer's
        tensors (shared, not copied), in this block's training mode."""
        with torch.device("meta"):  # every tensor is replaced by to_hf
            block = self.new_block()
        to_hf(self.moe, block, copy=False)
        left = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
        if left:
            raise ValueError(f"{self.block_class.__name__} has tensors outside its state dict "
                             f"that cannot be rebuilt: {left}")
        return block.train(self.training)

    def new_block(self) -> nn.Module:
        """An empty block of the replaced class, built from its config."""
        return self.block_class(self.block_config)

    def extra_repr(self) -> str:
        return f"family={self.family!r}"


class NllbMoEBlock(MoEBlock):
    """NLLB-MoE's sparse MLP call: forward(hidden_states [B, S, D], padding_mask) -> [B, S, D],
    where padding_mask is the attention mask its layer passes ([B, 1, S_q, S_k], nonzero =
    masked, or None). As transformers' router does (unless router_ignore_padding_tokens), a
    token is padding where the mask's last query row, flattened, is nonzero at its position
    (the last B * S entries); padding is not routed, takes no capacity and gives zeros. The
    router logits are recorded flat, [B * S, E], zeros at padded positions."""

    def forward(self, hidden_states: torch.Tensor,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        real = self._real_tokens(hidden_states, padding_mask)
        y, aux = self.moe(hidden_states, padding_mask=real)
        if self.router_logits is not None:
            logits = aux.router_logits
            if real is not None:
                positions = real.reshape(-1).nonzero().squeeze(1)
                logits = logits.new_zeros(real.numel(), logits.shape[-1]).index_copy(
                    0, positions, logits)
            self.router_logits(logits)
        return y

    def _real_tokens(self, hidden_states: torch.Tensor,
                     padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        """bool [B, S], True = routed; None: every token."""
        if padding_mask is None or self.block_config.router_ignore_padding_tokens:
            return None
        if padding_mask.dim() != 4:
            raise ValueError("NllbMoeSparseMLP reads padding from a 4-D attention mask "
                             f"[batch, 1, query, key], got shape {tuple(padding_mask.shape)}")
        num_tokens = hidden_states.numel() // hidden_states.shape[-1]
        last_row = padding_mask[:, :, -1, :].reshape(-1)[-num_tokens:]
        if last_row.numel() != num_tokens:
            raise ValueError(f"the attention mask {tuple(padding_mask.shape)} has fewer than "
                             f"the {num_tokens} entries NllbMoeSparseMLP reads")
        real = (last_row == 0).view(hidden_states.shape[:-1])
        fraction = self.moe.config.eval_capacity_fraction
        if not self.moe.training and fraction is not None and fraction < 1 and not real.all():
            raise ValueError(f"moe_eval_capacity_token_fraction={fraction} with padded tokens: "
                             "transformers counts the padded positions in the capacity "
                             "ceil(fraction * T), moekit only the routed tokens")
        return real

    def new_block(self) -> nn.Module:
        return self.block_class(self.block_config, self.moe.config.expert_dim)


class RouterLogits(nn.Module):
    """The identity on router logits: a module for transformers' output_router_logits
    hook to record them from, in the shape the replaced block's router gave them."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


class PatchReport(NamedTuple):
    """What ``patch`` did: replaced {module name: family}, unsupported
    {module name: reason} (left in place, only with on_unsupported="warn"), and
    kept {module name: why}: blocks found by structure that are not feed-forward
    MoE blocks (JetMoE's mixture of attention heads), left in place by design."""

    replaced: dict[str, str]
    unsupported: dict[str, str]
    kept: dict[str, str]

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} MoE block(s)"]
        lines += [f"  {name}: {family}" for name, family in self.replaced.items()]
        if self.unsupported:
            lines.append(f"left {len(self.unsupported)} unsupported block(s)")
            lines += [f"  {name}: {reason}" for name, reason in self.unsupported.items()]
        if self.kept:
            lines.append(f"kept {len(self.kept)} block(s) that are not feed-forward MoE blocks")
            lines += [f"  {name}: {reason}" for name, reason in self.kept.items()]
        return "\n".join(lines)


def patch(model: nn.Module, *, on_unsupported: str = "error", **overrides) -> PatchReport:
    """Replace every supported MoE block of ``model`` in place with a MoEBlock
    sharing its weights (no copy; but converted copies of the tensors transformers stores in
    another layout, GPT-OSS's and Llama 4's experts), outputs unchanged; return a PatchReport.

    An MoE block moekit cannot represent is named in a ValueError, raised
    before anything is replaced (on_unsupported="error"), or in a warning,
    leaving it in place ("warn"). Blocks that are not feed-forward MoE blocks
    (``NOT_FEED_FORWARD``: JetMoE's attention experts) stay, listed in the
    report's ``kept``. overrides: MoEConfig fields the blocks do
    not determine (losses, experts_backend, ...), applied to every layer.
    """
    if on_unsupported not in ON_UNSUPPORTED:
        raise ValueError(f"on_unsupported must be one of {ON_UNSUPPORTED}, got {on_unsupported!r}")
    converted, unsupported, kept = _convert_blocks(model, overrides)
    if unsupported and on_unsupported == "error":
        raise ValueError("unsupported MoE block(s): "
                         + "; ".join(f"{name}: {reason}" for name, reason in unsupported.items()))
    for name, reason in unsupported.items():
        warnings.warn(f"moekit.hf.patch left {name} in place: {reason}", stacklevel=2)
    replaced = {}
    for name, (moe, family, block) in converted.items():
        router = family_of(block).router
        own_logits = router in ("switch", "nllb")  # recorded from the block's own router
        block_type = NllbMoEBlock if router == "nllb" else MoEBlock
        patched = block_type(moe, family, type(block), _block_config(block, model), own_logits,
                             family_of(block).returns)
        patched.train(block.training)
        _replace(model, name, patched)
        if own_logits:
            _expose_router_logits(patched.router_logits, 0)
        else:
            _expose_router_logits(moe.router, Routing._fields.index("router_logits"))
        replaced[name] = family
    return PatchReport(replaced, unsupported, kept)


def unpatch(model: nn.Module) -> list[str]:
    """Undo ``patch``: put a transformers block back in place of every MoEBlock,
    holding the moekit layer's current (possibly trained) tensors, shared; so
    that ``save_pretrained`` writes the transformers format. Returns the names
    restored. A layer that no longer fits its block (experts sharded by expert
    parallelism, say) raises the ValueError of ``to_hf``, before any change."""
    blocks = {name: m.to_hf() for name, m in model.named_modules() if isinstance(m, MoEBlock)}
    for name, block in blocks.items():
        _replace(model, name, block)
    return list(blocks)


def _block_config(block: nn.Module, model: nn.Module):
    """The transformers config a block was built from: its experts' (which keep it),
    else the model's (Switch Transformers', NLLB-MoE's, DBRX's and JetMoE's blocks keep
    none; the encoder and decoder configs of Switch and NLLB-MoE agree on every field the
    block reads, NLLB-MoE's expert width aside, which its MoEBlock passes)."""
    return getattr(getattr(block, "experts", None), "config", None) or model.config


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    model.get_submodule(parent_name).register_module(attribute, module)


def _expose_router_logits(router: nn.Module, index: int) -> None:
    """Let transformers' ``output_router_logits`` (and the aux loss it computes
    from them) record this router's logits, as it records its own routers':
    the same hook transformers installs, on the output at ``index``."""
    try:
        from transformers.utils.output_capturing import install_output_capuring_hook
    except ImportError:
        warnings.warn("this transformers version cannot record the moekit routers' logits: "
                      "output_router_logits will miss them; use moekit.hf.record_aux", stacklevel=3)
        return
    install_output_capuring_hook(router, "router_logits", index)


def _convert_blocks(model: nn.Module, overrides: dict) -> tuple[
        dict[str, tuple[MoE, str, nn.Module]], dict[str, str], dict[str, str]]:
    """({name: (moekit MoE sharing the block's weights, family, block)},
    {name: why not}, {name: why kept (not feed-forward)}) over the model's MoE
    blocks; the model is not changed."""
    converted, unsupported, kept = {}, {}, {}
    for name, block in moe_blocks(model, skip=(MoEBlock,)):  # MoEBlocks: patched already
        if type(block).__name__ in NOT_FEED_FORWARD:
            kept[name] = NOT_FEED_FORWARD[type(block).__name__]
            continue
        family = family_of(block)
        if family is None:
            unsupported[name] = f"{type(block).__name__} is not a supported MoE block"
            continue
        try:
            converted[name] = (from_hf(block, copy=False, **overrides), family.name, block)
        except ValueError as error:
            unsupported[name] = str(error)
    return converted, unsupported, kept


@contextlib.contextmanager
def record_aux(model: nn.Module) -> Iterator[list[MoEAux]]:
    """Within the block, every moekit MoE layer of ``model`` appends the MoEAux
    of each forward to the yielded list (in call order); nothing is kept after.

        with record_aux(model) as auxes:
            loss = model(ids, labels=ids).loss + sum(a.loss for a in auxes)
    """
    records: list[MoEAux] = []
    handles = [m.register_forward_hook(lambda _m, _args, out: records.append(out[1]))
               for m in model.modules() if isinstance(m, MoE)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
