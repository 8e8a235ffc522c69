"""vtprune: fused kernels for visual token reduction in vision-language models.

Import never needs CUDA: the compiled extension ``vtprune._C`` and Triton are loaded lazily, only when a
backend that needs them is asked for.
"""

from vtprune import ops
from vtprune._backend import BackendUnavailableError

__version__ = "0.1.0"

__all__ = ["ops", "BackendUnavailableError", "__version__"]
