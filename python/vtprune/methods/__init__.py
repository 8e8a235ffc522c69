"""Token-reduction methods: VisionDrop, the baselines, and (from :mod:`vtprune.methods.alvts`) ALVTS."""

from vtprune.methods.base import Method
from vtprune.methods.baselines import FastV, PyramidDrop, UniformPool, VisionZip
from vtprune.methods.schedule import EncoderStage, Stage
from vtprune.methods.visiondrop import VisionDrop

__all__ = ["Method", "VisionDrop", "FastV", "PyramidDrop", "VisionZip", "UniformPool", "ALVTS", "EncoderStage",
           "Stage"]


def __getattr__(name):
    # ALVTS lives in its own module, written separately; import it lazily so a missing or broken ALVTS never
    # breaks the other methods, and say so clearly when it is asked for.
    if name == "ALVTS":
        try:
            from vtprune.methods.alvts import ALVTS
        except ModuleNotFoundError as e:
            if e.name != "vtprune.methods.alvts":
                raise
            raise ImportError("ALVTS is not available in this build: vtprune.methods.alvts is missing") from e
        return ALVTS
    raise AttributeError(f"module 'vtprune.methods' has no attribute {name!r}")
