"""The naive baseline: weights rounded to nearest (MinMax), each live input quantized with its own min-max
range at run time; nothing calibrated, nothing learned, not exportable."""

from mqsam2.methods.registry import Method, register

DYNAMIC = register(
    Method("dynamic", "uniform, dynamic per-input min-max, round to nearest", act_observer="dynamic")
)
