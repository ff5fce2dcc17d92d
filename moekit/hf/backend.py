"""moekit as a transformers experts backend: ``experts_implementation="moekit"``.

transformers (v5) runs the expert part of every MoE block through a registry
of functions ``forward(experts_module, hidden_states [T, D], top_k_index
[T, K], top_k_weights [T, K]) -> [T, D]``. ``register()`` adds moekit's: the
model's own router decides; moekit plans the dispatch of its choices
(``plan_dispatch``) and runs a moekit ``Experts`` view of the model's own
weights (shared, never copied) on that plan, with the backend "auto" picks
(fused on CPU; grouped_mm where it is exact, else the loop, on CUDA). Experts stored
transposed (is_transposed: GPT-OSS, Aria) or with gate and up interleaved
(is_concatenated=False: GPT-OSS) are converted into moekit's layout at every call, a
differentiable copy of their weights (about one more read and write of them per forward).

A model is checked when moekit is chosen (``backend_refusals``), not at its
first forward: every MoE block must run its experts through transformers'
experts interface, with a layout moekit computes.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.dispatch import plan_dispatch
from moekit.experts import Experts
from moekit.hf.blocks import interface_experts, moe_blocks
from moekit.hf.families import Relaid
from moekit.hf.layouts import experts_layout

BACKEND_NAME = "moekit"
_REGISTERED: set[str] = set()  # the names register() gave moekit's forward


def require_transformers():
    """The transformers module, or an ImportError saying what to install."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError("moekit.hf needs transformers >= 5: pip install 'moekit[hf]'") from error
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ImportError(f"moekit.hf needs transformers >= 5, found {transformers.__version__}: "
                          "pip install -U 'moekit[hf]'")
    return transformers


def register(name: str = BACKEND_NAME) -> None:
    """Register moekit in transformers' experts registry under ``name``, so that
    ``from_pretrained(..., experts_implementation="moekit")`` (or from_config,
    or ``model.set_experts_implementation("moekit")``) uses it. Idempotent.

    From then on, choosing ``name`` for a model whose MoE blocks moekit cannot
    run raises a ValueError (``backend_refusals``) at that moment: in
    from_config/from_pretrained once the modules are built (transformers'
    ``post_init``), in set_experts_implementation before anything changes.
    """
    transformers = require_transformers()
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(name, moekit_experts_forward)
    _REGISTERED.add(name)
    _check_when_chosen(transformers.PreTrainedModel)


def backend_refusals(model: nn.Module) -> dict[str, str]:
    """{MoE block name: why experts_implementation="moekit" cannot run it} over
    the model's MoE blocks (found by structure, see moekit.hf.blocks); empty
    if moekit runs every one."""
    refusals = {}
    for name, block in moe_blocks(model):
        experts = interface_experts(block)
        if not experts:
            refusals[name] = (f"{type(block).__name__}: its experts do not go through transformers' "
                              "experts interface, so no experts_implementation applies to them "
                              "(they always run eager)")
        for module in experts:
            try:
                experts_layout(module)
            except ValueError as error:
                refusals[name] = str(error)
    return refusals


def require_backend_support(model: nn.Module) -> None:
    """ValueError naming every MoE block of ``model`` moekit's backend cannot run."""
    refusals = backend_refusals(model)
    if refusals:
        raise ValueError(f"experts_implementation='moekit' cannot run {type(model).__name__}: "
                         + "; ".join(f"{name}: {why}" for name, why in refusals.items())
                         + ". Use 'eager' or another implementation for it")


def _chooses_moekit(implementation) -> bool:
    values = implementation.values() if isinstance(implementation, dict) else [implementation]
    return any(v in _REGISTERED for v in values)


def _check_when_chosen(model_class: type) -> None:
    """Wrap transformers' PreTrainedModel.post_init and set_experts_implementation
    (once) so that choosing moekit for a model it cannot run raises there."""
    if getattr(model_class, "_moekit_checks", False):
        return
    post_init, set_experts_implementation = model_class.post_init, model_class.set_experts_implementation

    @functools.wraps(post_init)
    def checked_post_init(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        if _chooses_moekit(self.config._experts_implementation):
            require_backend_support(self)

    @functools.wraps(set_experts_implementation)
    def checked_set_experts_implementation(self, experts_implementation, *args, **kwargs):
        if _chooses_moekit(experts_implementation):
            require_backend_support(self)
        return set_experts_implementation(self, experts_implementation, *args, **kwargs)

    model_class.post_init = checked_post_init
    model_class.set_experts_implementation = checked_set_experts_implementation
    model_class._moekit_checks = True


# Experts module -> (config, its parameters, view, {name: Relaid} to convert at each call):
# building a view costs about as much as a decode step's experts, so it is built once per
# module and rebuilt only when the module's layout or parameter objects change. Weak: an
# entry goes with its module.
_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def experts_view(hf_experts: nn.Module) -> Experts:
    """A moekit Experts module computing what hf_experts computes, on its weights: its own
    parameters (shared) where the layout is moekit's; where not (transposed, interleaved), a
    differentiable conversion of them, made again at each call of this function (and dropped
    by release_conversions after moekit's forward).

    Built on the meta device, so nothing is allocated; ValueError if the
    layout is not one moekit computes (see ``experts_layout``) or a shape does not fit it.
    """
    layout = experts_layout(hf_experts)
    first = "gate_up_proj" if getattr(hf_experts, "has_gate", True) else "up_proj"
    has_bias = bool(getattr(hf_experts, "has_bias", False))
    num_experts, *sizes = hf_experts.down_proj.shape
    dim, expert_dim = reversed(sizes) if layout.transposed else sizes
    config = MoEConfig(dim=dim, expert_dim=expert_dim, num_experts=num_experts, top_k=1,
                       activation=layout.activation, swiglu_alpha=layout.params.alpha,
                       swiglu_limit=layout.params.limit, bias=has_bias)
    names = [first, "down_proj"] + ([f"{first}_bias", "down_proj_bias"] if has_bias else [])
    parameters = [getattr(hf_experts, name) for name in names]
    cached = _VIEWS.get(hf_experts)
    if cached is not None and cached[0] == config \
            and all(a is b for a, b in zip(cached[1], parameters, strict=True)):
        view, relaid = cached[2], cached[3]
    else:
        view, relaid = _new_view(config, names, parameters, layout)
        _VIEWS[hf_experts] = (config, parameters, view, relaid)
    for name, conversion in relaid.items():  # a plain attribute, not a parameter of the view
        setattr(view, name, conversion.to_moekit(getattr(hf_experts, name)))
    return view


def _new_view(config: MoEConfig, names: list[str], parameters: list[nn.Parameter],
              layout) -> tuple[Experts, dict[str, Relaid]]:
    with torch.device("meta"):
        view = Experts(config)
    relaid = {}
    for name, parameter in zip(names, parameters, strict=True):
        conversion = Relaid(name, transposed=layout.transposed and not name.endswith("_bias"),
                            interleaved=layout.interleaved and name.startswith("gate_up_proj"))
        expected = tuple(getattr(view, name).shape)
        if conversion.moekit_shape(tuple(parameter.shape)) != expected:
            raise ValueError(f"{type(view).__name__} view: {name} has shape "
                             f"{tuple(parameter.shape)}, which does not fit the layout "
                             f"(is_transposed={layout.transposed}) of experts of this size; "
                             f"moekit's layout is {expected}")
        if conversion.transposed or conversion.interleaved:
            del view._parameters[name]
            relaid[name] = conversion
        else:
            view.register_parameter(name, parameter)
    return view, relaid


def moekit_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """The registered forward: hidden_states [T, D], top_k_index [T, K] int,
    top_k_weights [T, K] -> [T, D] in hidden_states' dtype. Differentiable in
    hidden_states, top_k_weights and the expert weights."""
    if getattr(self, "_is_expert_parallel", False):
        raise ValueError(f"{type(self).__name__}: transformers' expert parallelism is not supported "
                         "by the moekit experts backend; use moekit.parallel on a patched model")
    experts = experts_view(self)
    try:
        plan = plan_dispatch(top_k_index.long(), top_k_weights, experts.num_local_experts)
        return experts(hidden_states, plan).to(hidden_states.dtype)
    finally:
        release_conversions(self)


def release_conversions(hf_experts: nn.Module) -> None:
    """Drop the cached view's converted weights (see experts_view) after a call, so that the
    copy lives only as long as the call and autograd's graph need it."""
    cached = _VIEWS.get(hf_experts)
    for name in cached[3] if cached is not None else ():
        setattr(cached[2], name, None)
