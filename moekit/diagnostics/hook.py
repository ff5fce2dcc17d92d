"""Forward hooks that accumulate LayerStats for every moekit MoE layer inside any module.

Works on any nn.Module that contains ``moekit.MoE`` layers (the language model
of moekit.lm, or a model whose feed-forward blocks were replaced by moekit
layers), in training or evaluation. A hook reduces each forward's MoEAux to
counts right away, so no activation, probability or graph outlives the forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import nn

from moekit.diagnostics.stats import LayerStats
from moekit.layer import MoE


class RoutingStatsHook:
    """Statistics of every MoE layer of ``model``, keyed by module name.

    Token ids, for the specialisation table, come from the layer's own
    ``token_ids`` argument when the model passes it (moekit.lm does), else from
    ``batch_tokens`` (set it to the batch's [B, S] ids before each forward;
    ``collect_routing_stats`` does). With num_classes, ``batch_classes`` [B, S] (each
    token's class, set like batch_tokens) fills LayerStats.class_counts. Use as a context
    manager or call remove().
    """

    def __init__(self, model: nn.Module, vocab_size: int | None = None,
                 keep_top1: bool = False, num_classes: int | None = None) -> None:
        self.layers: dict[str, LayerStats] = {}
        self.batch_tokens: torch.Tensor | None = None
        self.batch_classes: torch.Tensor | None = None
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, MoE):
                self.layers[name] = LayerStats(module.config.num_router_slots, vocab_size, keep_top1,
                                               num_classes)
                self._handles.append(module.register_forward_hook(
                    partial(self._observe, name), with_kwargs=True))
        if not self.layers:
            raise ValueError(f"{type(model).__name__} holds no moekit MoE layer to observe")

    def _observe(self, name: str, module: MoE, args: tuple, kwargs: dict, output) -> None:
        _, aux = output
        padding_mask = kwargs.get("padding_mask", args[1] if len(args) > 1 else None)
        token_ids = kwargs.get("token_ids", args[2] if len(args) > 2 else None)
        token_ids = token_ids if token_ids is not None else self._of_batch(self.batch_tokens, args[0])
        classes = self._of_batch(self.batch_classes, args[0])
        if padding_mask is not None:
            token_ids = None if token_ids is None else token_ids[padding_mask]
            classes = None if classes is None else classes[padding_mask]
        self.layers[name].update(aux, None if token_ids is None else token_ids.reshape(-1),
                                 None if classes is None else classes.reshape(-1))

    @staticmethod
    def _of_batch(per_token: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """per_token [B, S] shaped as the layer's input's leading dims, if it matches them."""
        if per_token is None or per_token.numel() * x.shape[-1] != x.numel():
            return None
        return per_token.reshape(x.shape[:-1])

    def summary(self, top_tokens: int = 3) -> dict[str, dict]:
        """LayerStats.summary() of every layer, by module name."""
        return {name: stats.summary(top_tokens) for name, stats in self.layers.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> RoutingStatsHook:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def collect_routing_stats(model: nn.Module, batches: Iterable[torch.Tensor],
                          vocab_size: int | None = None, keep_top1: bool = False,
                          classes_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          num_classes: int | None = None) -> dict[str, LayerStats]:
    """Run ``model(tokens)`` in eval mode over batches of token ids [B, S] and
    return the statistics of each MoE layer, by module name. classes_of(tokens) [B, S]
    -> classes [B, S] in [0, num_classes) fills LayerStats.class_counts (e.g.
    moekit.diagnostics.text_classes)."""
    if (classes_of is None) != (num_classes is None):
        raise ValueError("give classes_of and num_classes together")
    was_training = model.training
    model.eval()
    try:
        with RoutingStatsHook(model, vocab_size, keep_top1, num_classes) as hook:
            for tokens in batches:
                hook.batch_tokens = tokens
                hook.batch_classes = None if classes_of is None else classes_of(tokens.cpu())
                model(tokens)
    finally:
        model.train(was_training)
    return hook.layers
