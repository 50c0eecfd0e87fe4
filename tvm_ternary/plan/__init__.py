"""Quantization planning in numpy: policy, calibration, per-layer quantization, simulation.

The plan is what the Relax passes apply and what the numpy reference pipeline runs.
"""

from .build import QuantPlan, calibration_stats, make_plan, simulate
from .config import LayerDecision, QuantConfig, decide
from .graph import FusedLayer, GraphAnalysis, analyse
from .imported import plan_from_model
from .layer import LayerPlan

__all__ = ["FusedLayer", "GraphAnalysis", "LayerDecision", "LayerPlan", "QuantConfig", "QuantPlan",
           "analyse", "calibration_stats", "decide", "make_plan", "plan_from_model", "simulate"]
