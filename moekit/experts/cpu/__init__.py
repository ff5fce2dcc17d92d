"""CPU kernels compiled on first use: skinny (decode-size) expert products."""

from moekit.experts.cpu.skinny import available, skinny_grouped, unavailable_reason

__all__ = ["available", "skinny_grouped", "unavailable_reason"]
