"""Routing statistics of one MoE layer, accumulated over batches in small CPU tensors.

Shape letters as in moekit.routing: T tokens, K experts per token, E experts,
V vocabulary (token ids), C byte classes. Nothing here holds on to a batch's
tensors: every update reduces them to counts and sums of fixed size.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field

import torch

from moekit.aux import MoEAux, load_imbalance, router_entropy_sum

BYTE_CLASSES = ("lowercase", "uppercase", "digit", "space", "newline", "punctuation",
                "other ASCII", "non-ASCII")


def byte_class_table() -> torch.Tensor:
    """[256] int64: the index in BYTE_CLASSES of every byte value."""
    def of(byte: int) -> str:
        char = chr(byte)
        if byte >= 128:
            return "non-ASCII"
        if char in string.ascii_lowercase:
            return "lowercase"
        if char in string.ascii_uppercase:
            return "uppercase"
        if char in string.digits:
            return "digit"
        if char in " \t":
            return "space"
        if char in "\r\n":
            return "newline"
        if char in string.punctuation:
            return "punctuation"
        return "other ASCII"
    return torch.tensor([BYTE_CLASSES.index(of(b)) for b in range(256)])


@dataclass
class LayerStats:
    """Counts and sums over every token an MoE layer routed. With null experts, E counts
    the router's slots (num_router_slots: the experts, then the null experts, whose
    assignments are never dropped).

    tokens_per_expert:  [E] int64 assignments each expert processed (after capacity).
    routed_per_expert:  [E] int64 assignments the router made (before capacity).
    coactivation:       [E, E] int64 tokens that chose both i and j (diagonal: tokens
                        that chose i).
    token_counts:       [E, V] int64 assignments per expert and token id, when
                        vocab_size is given (E * V * 8 bytes) and token ids are known.
    class_counts:       [E, C] int64 assignments per expert and token class (e.g.
                        moekit.diagnostics.text_classes), when num_classes is given.
    top1:               per batch, [T] int64 top-1 expert of each token (the
                        assignment with the largest combine weight; -1 for a token
                        with none), only with keep_top1 (for routing_stability).
    """

    num_experts: int
    vocab_size: int | None = None
    keep_top1: bool = False
    num_classes: int | None = None
    tokens: int = field(init=False, default=0)
    entropy_sum: float = field(init=False, default=0.0)  # of the per-token router entropies (nats)
    tokens_per_expert: torch.Tensor = field(init=False)
    routed_per_expert: torch.Tensor = field(init=False)
    coactivation: torch.Tensor = field(init=False)
    token_counts: torch.Tensor | None = field(init=False)
    class_counts: torch.Tensor | None = field(init=False)
    top1: list[torch.Tensor] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        for name in ("vocab_size", "num_classes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        E = self.num_experts
        self.tokens_per_expert = torch.zeros(E, dtype=torch.int64)
        self.routed_per_expert = torch.zeros(E, dtype=torch.int64)
        self.coactivation = torch.zeros(E, E, dtype=torch.int64)
        self.token_counts = None if self.vocab_size is None else \
            torch.zeros(E, self.vocab_size, dtype=torch.int64)
        self.class_counts = None if self.num_classes is None else \
            torch.zeros(E, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, aux: MoEAux, token_ids_T: torch.Tensor | None = None,
               class_ids_T: torch.Tensor | None = None) -> None:
        """Add one forward's MoEAux (over its T routed tokens); token_ids_T [T]
        the token id of each routed token, for the specialisation table, and
        class_ids_T [T] its class, for class_counts."""
        ids_TK = aux.expert_indices.detach()
        T, E = ids_TK.shape[0], self.num_experts
        if aux.router_probs.shape[-1] != E:
            raise ValueError(f"the layer has {aux.router_probs.shape[-1]} experts, these "
                             f"statistics {E}")
        chosen_TK = torch.ones_like(ids_TK, dtype=torch.bool) if aux.assignment_mask is None \
            else aux.assignment_mask.detach()
        chose_TE = torch.zeros(T, E, dtype=torch.float64, device=ids_TK.device)
        chose_TE.scatter_(1, ids_TK, chosen_TK.double())
        # Float64 products are exact for counts below 2**53, and run on any device.
        self.coactivation += (chose_TE.t() @ chose_TE).round().long().cpu()
        self.routed_per_expert += chose_TE.sum(0).round().long().cpu()
        kept_E = aux.tokens_per_expert if aux.null_tokens_per_expert is None else \
            torch.cat((aux.tokens_per_expert, aux.null_tokens_per_expert))  # null: never dropped
        self.tokens_per_expert += kept_E.detach().long().cpu()
        self.entropy_sum += router_entropy_sum(aux.router_probs)
        self.tokens += T
        if self.token_counts is not None and token_ids_T is not None:
            self.token_counts += _per_expert_counts(ids_TK, chosen_TK, token_ids_T, self.token_counts,
                                                    "token ids", "vocab_size")
        if self.class_counts is not None and class_ids_T is not None:
            self.class_counts += _per_expert_counts(ids_TK, chosen_TK, class_ids_T, self.class_counts,
                                                    "class ids", "num_classes")
        if self.keep_top1:
            weights_TK = aux.expert_weights.detach().float().masked_fill(~chosen_TK, -math.inf)
            best_T = weights_TK.argmax(1, keepdim=True) if T else ids_TK[:, :1]
            top1_T = ids_TK.gather(1, best_T).squeeze(1)
            self.top1.append(top1_T.masked_fill(~chosen_TK.any(1), -1).cpu())

    def summary(self, top_tokens: int = 3) -> dict:
        """Plain numbers: tokens, tokens_per_expert, load_max_over_mean, load_cv,
        router_entropy (mean per token, nats; at most log E), dropped_fraction,
        coactivation (fraction of the tokens choosing both i and j) and, when
        token ids were counted, specialisation (see ``specialisation``); when classes
        were, class_lift (see ``class_lift``) and class_share (each class's share of all
        assignments)."""
        max_over_mean, cv = load_imbalance(self.tokens_per_expert)
        routed = int(self.routed_per_expert.sum())
        kept = int(self.tokens_per_expert.sum())
        result = {
            "tokens": self.tokens,
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "load_max_over_mean": max_over_mean,
            "load_cv": cv,
            "router_entropy": self.entropy_sum / self.tokens if self.tokens else math.nan,
            "max_router_entropy": math.log(self.num_experts),
            "dropped_fraction": 1.0 - kept / routed if routed else 0.0,
            "coactivation": (self.coactivation.double() / max(self.tokens, 1)).tolist(),
        }
        if self.token_counts is not None and self.token_counts.sum() > 0:
            result["specialisation"] = specialisation(self.token_counts, top_tokens)
        if self.class_counts is not None and self.class_counts.sum() > 0:
            result["class_lift"] = class_lift(self.class_counts)
            result["class_share"] = (self.class_counts.sum(0).double()
                                     / self.class_counts.sum()).tolist()
        return result


def _per_expert_counts(ids_TK: torch.Tensor, chosen_TK: torch.Tensor, values_T: torch.Tensor,
                       like_EN: torch.Tensor, what: str, size_name: str) -> torch.Tensor:
    """[E, N] on the CPU: the chosen assignments of each expert, by the value in [0, N) of
    their token (its id or class)."""
    E, N = like_EN.shape
    values_T = values_T.reshape(-1).to(ids_TK.device)
    if values_T.shape[0] != ids_TK.shape[0]:
        raise ValueError(f"{what} has {values_T.shape[0]} tokens, the layer routed {ids_TK.shape[0]}")
    if values_T.numel() and (int(values_T.min()) < 0 or int(values_T.max()) >= N):
        raise ValueError(f"{what} must lie in [0, {size_name}={N}), got "
                         f"[{int(values_T.min())}, {int(values_T.max())}]")
    flat_A = (ids_TK * N + values_T[:, None])[chosen_TK]
    return torch.bincount(flat_A, minlength=E * N).view(E, N).cpu()


def class_lift(class_counts_EC: torch.Tensor) -> list[list[float]]:
    """[E][C] lift: each expert's share of its assignments in class c over class c's share of
    all assignments (1: no preference; 0 for an expert or class with no assignment)."""
    counts = class_counts_EC.double()
    overall_C = counts.sum(0) / counts.sum().clamp_min(1)
    share_EC = counts / counts.sum(1, keepdim=True).clamp_min(1)
    lift = torch.where(overall_C > 0, share_EC / overall_C.clamp_min(1e-30), 0.0)
    return [[round(v, 4) for v in row] for row in lift.tolist()]


def specialisation(token_counts_EV: torch.Tensor, top_tokens: int = 3) -> list[dict]:
    """Per expert, what it prefers, from token_counts_EV [E, V] (assignments per
    expert and token id). Preference is lift: the expert's share of a token (or
    byte class) over that token's share of all assignments; 1 means no preference.

    Each entry: expert, assignments, top_tokens (up to ``top_tokens`` of
    [token id, assignments, lift] with lift > 1, most assignments beyond the
    expert's fair share first) and, for byte vocabularies (V <= 256),
    top_class / class_share / class_lift over BYTE_CLASSES: the class whose share of the
    expert's assignments most exceeds its share of all assignments (so a class the expert
    barely sees cannot win on lift alone), its share and its lift.
    """
    counts = token_counts_EV.double()
    total_V = counts.sum(0)
    overall_V = total_V / total_V.sum().clamp_min(1)
    entries = []
    for e, row_V in enumerate(counts):
        n = row_V.sum().item()
        entry: dict = {"expert": e, "assignments": int(n), "top_tokens": []}
        if n:
            share_V = row_V / n
            lift_V = torch.where(overall_V > 0, share_V / overall_V.clamp_min(1e-30), 0.0)
            excess_V = row_V - n * overall_V  # assignments beyond the expert's fair share
            preferred = (excess_V > 0).nonzero().squeeze(1)
            ranked = preferred[excess_V[preferred].argsort(descending=True, stable=True)][:top_tokens]
            entry["top_tokens"] = [[int(v), int(row_V[v]), round(lift_V[v].item(), 3)] for v in ranked]
            if counts.shape[1] <= 256:
                classes = byte_class_table()[: counts.shape[1]]
                share_C = torch.zeros(len(BYTE_CLASSES), dtype=torch.float64).index_add_(0, classes, share_V)
                overall_C = torch.zeros_like(share_C).index_add_(0, classes, overall_V)
                lift_C = torch.where(overall_C > 0, share_C / overall_C.clamp_min(1e-30), 0.0)
                best = int((share_C - overall_C).argmax())
                entry.update(top_class=BYTE_CLASSES[best], class_share=round(share_C[best].item(), 4),
                             class_lift=round(lift_C[best].item(), 3))
        entries.append(entry)
    return entries


def routing_stability(before: LayerStats, after: LayerStats) -> float:
    """Fraction of tokens whose top-1 expert differs between two runs of the same
    tokens in the same order (both collected with keep_top1=True)."""
    if not (before.keep_top1 and after.keep_top1):
        raise ValueError("routing_stability needs statistics collected with keep_top1=True")
    a = torch.cat(before.top1) if before.top1 else torch.zeros(0, dtype=torch.int64)
    b = torch.cat(after.top1) if after.top1 else torch.zeros(0, dtype=torch.int64)
    if a.shape != b.shape:
        raise ValueError(f"the two runs saw different tokens ({a.numel()} and {b.numel()})")
    return (a != b).double().mean().item() if a.numel() else math.nan
