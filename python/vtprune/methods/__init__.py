"""Token-reduction methods, all written against one interface (:class:`Method`, docs/methods.md).

:class:`Method` and the hook contexts (:class:`EncoderContext`, :class:`PruneContext`, :class:`LayerCall`) are
what a method of your own subclasses and receives; :class:`Selection` is what its hooks return.
"""

from vtprune.methods.alvts import ALVTS
from vtprune.methods.base import EncoderContext, Hooks, LayerCall, Method, ModelInfo, PruneContext, Selection
from vtprune.methods.baselines import FastV, PyramidDrop, UniformPool, VisionZip
from vtprune.methods.schedule import EncoderStage, Stage
from vtprune.methods.staged import Plan, StagedMethod
from vtprune.methods.visiondrop import VisionDrop

__all__ = ["Method", "Hooks", "ModelInfo", "Selection", "EncoderContext", "PruneContext", "LayerCall",
           "StagedMethod", "Plan", "VisionDrop", "FastV", "PyramidDrop", "VisionZip", "UniformPool", "ALVTS",
           "EncoderStage", "Stage"]
