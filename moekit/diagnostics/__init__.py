"""Routing diagnostics: per-layer load, balance, entropy, drops, co-activation,
stability between checkpoints and specialisation, for any module holding
moekit MoE layers (docs/diagnostics.md)."""

from moekit.diagnostics.hook import RoutingStatsHook, collect_routing_stats
from moekit.diagnostics.plots import plot_report
from moekit.diagnostics.report import build_report, render_report
from moekit.diagnostics.stats import BYTE_CLASSES, LayerStats, routing_stability, specialisation

__all__ = ["BYTE_CLASSES", "LayerStats", "RoutingStatsHook", "build_report", "collect_routing_stats",
           "plot_report", "render_report", "routing_stability", "specialisation"]
