"""Hugging Face transformers interop (the optional ``moekit[hf]`` extra).

- ``register()``: moekit as a transformers experts backend,
  ``experts_implementation="moekit"``; choosing it for a model it cannot run
  raises then (``backend_refusals`` says why).
- ``from_hf(block)`` / ``to_hf(moe, block)``: lossless, strict conversion of
  one MoE block.
- ``moe_blocks(model)``: the MoE blocks of a model, found by structure.
- ``patch(model)``: replace every supported MoE block of a model with moekit
  layers in place; ``record_aux(model)`` collects their MoEAux records;
  ``unpatch(model)`` puts transformers blocks back (to save in its format).

Only ``register`` imports transformers; conversion and patching work on the
modules themselves. Supported blocks: ``FAMILIES``; blocks ``patch`` leaves alone by
design (JetMoE's attention experts): ``NOT_FEED_FORWARD``. See docs/hf.md.
"""

from moekit.hf.backend import backend_refusals, moekit_experts_forward, register
from moekit.hf.blocks import moe_blocks
from moekit.hf.convert import config_from_hf, from_hf, to_hf, transfer
from moekit.hf.families import FAMILIES, NOT_FEED_FORWARD, Family, Flattened, family_of
from moekit.hf.patch import MoEBlock, PatchReport, patch, record_aux, unpatch

__all__ = ["FAMILIES", "NOT_FEED_FORWARD", "Family", "Flattened", "MoEBlock", "PatchReport",
           "backend_refusals", "config_from_hf", "family_of", "from_hf", "moe_blocks",
           "moekit_experts_forward", "patch", "record_aux", "register", "to_hf", "transfer",
           "unpatch"]
