"""ALVTS selector factors: SVD initialisation, calibration, save/load (docs/ops.md#lowrank_scores, §4.2).

The method object lives in :mod:`vtprune.methods.alvts`; the ops in :mod:`vtprune.ops`.
"""

from vtprune.alvts.calibrate import calibrate, capture_layer_inputs, selector_loss
from vtprune.alvts.factors import SelectorFactors, bilinear_form, default_rank, init_factors, svd_factors

__all__ = [
    "SelectorFactors",
    "bilinear_form",
    "calibrate",
    "capture_layer_inputs",
    "default_rank",
    "init_factors",
    "selector_loss",
    "svd_factors",
]
