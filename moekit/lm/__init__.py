"""A small MoE language model: configs, presets, model, byte-level data, trainer, generation.

Needs safetensors and tqdm (installed with moekit); plots need matplotlib
(``pip install moekit[plot]``). ``import moekit`` alone does not import this package.
"""

from .config import LMConfig, TrainConfig
from .model import LMOutput, MoETransformer
from .presets import PRESETS, Preset, get_preset

__all__ = ["LMConfig", "TrainConfig", "MoETransformer", "LMOutput", "PRESETS", "Preset", "get_preset"]
