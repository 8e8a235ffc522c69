"""vtprune: fused kernels for visual token reduction in vision-language models.

Import never needs CUDA: the compiled extension ``vtprune._C`` and Triton are loaded lazily, only when a
backend that needs them is asked for.
"""

from vtprune import ops
from vtprune._backend import BackendUnavailableError
from vtprune.api import Handle, apply
from vtprune.methods import ALVTS, FastV, Method, PyramidDrop, UniformPool, VisionDrop, VisionZip

__version__ = "0.1.0"

__all__ = ["ops", "BackendUnavailableError", "__version__", "apply", "Handle", "Method", "VisionDrop", "ALVTS", "FastV",
           "VisionZip", "PyramidDrop", "UniformPool", "load_method", "to_config"]


def __getattr__(name):
    if name in ("load_method", "to_config"):  # method configs as data (vtprune.config)
        from vtprune import config

        return getattr(config, name)
    raise AttributeError(f"module 'vtprune' has no attribute {name!r}")
