"""The method registry: every quantization method is one module here plus one import line below.

`get_method(name)` returns its `Method`; `mqsam2.api.quantize_sam2` runs the recipe it declares."""

from mqsam2.methods import (  # noqa: F401  (each module registers its method on import)
    adaround,
    brecq,
    dynamic,
    fp,
    minmax,
    mixqsam,
    mixqsam2,
    mixqsam2_mask,
    mixqsam2_measured,
    mixqsam2_propagated,
    omse,
    percentile,
    ptq4sam,
    qdrop,
    qminisam2,
    qsam2,
)
from mqsam2.methods.registry import METHODS, Method, get_method, register

__all__ = ["METHODS", "Method", "get_method", "register"]
