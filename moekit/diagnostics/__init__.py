"""Routing diagnostics: per-layer load, balance, entropy, drops, co-activation,
stability between checkpoints and specialisation, for any module holding
moekit MoE layers (docs/diagnostics.md)."""

from moekit.diagnostics.hook import RoutingStatsHook, collect_routing_stats
from moekit.diagnostics.plots import plot_report
from moekit.diagnostics.report import build_report, render_report
from moekit.diagnostics.stats import (BYTE_CLASSES, LayerStats, class_lift, routing_stability,
                                      specialisation)
from moekit.diagnostics.text_classes import TEXT_CLASSES, text_classes

__all__ = ["BYTE_CLASSES", "TEXT_CLASSES", "LayerStats", "RoutingStatsHook", "build_report",
           "class_lift", "collect_routing_stats", "plot_report", "render_report",
           "routing_stability", "specialisation", "text_classes"]
