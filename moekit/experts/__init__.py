"""Expert backends behind the experts contract (moekit.contract), plus shared experts."""

from moekit.experts.activations import apply_activation
from moekit.experts.backends import BACKENDS, ExpertsBackend, register_backend
from moekit.experts.grouped import grouped_matmul, grouped_mm_supports
from moekit.experts.loop import loop_matmul
from moekit.experts.shared import SharedExperts
from moekit.experts.stacked import Experts

__all__ = ["BACKENDS", "Experts", "ExpertsBackend", "SharedExperts", "apply_activation",
           "grouped_matmul", "grouped_mm_supports", "loop_matmul", "register_backend"]
