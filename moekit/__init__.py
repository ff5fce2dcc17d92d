"""moekit: Mixture-of-Experts layers for PyTorch."""

from moekit.aux import MoEAux
from moekit.config import MoEConfig
from moekit.layer import MoE
from moekit.routing import Routing

__version__ = "0.1.0"

__all__ = ["MoE", "MoEAux", "MoEConfig", "Routing", "__version__"]
