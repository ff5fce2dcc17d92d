"""moekit: Mixture-of-Experts layers for PyTorch."""

from moekit.aux import MoEAux
from moekit.balancing import router_step, router_step_before
from moekit.config import MoEConfig
from moekit.layer import MoE
from moekit.routing import Routing
from moekit.soft_moe import SoftMoE

__version__ = "0.1.0"

__all__ = ["MoE", "MoEAux", "MoEConfig", "Routing", "SoftMoE", "__version__", "router_step",
           "router_step_before"]
