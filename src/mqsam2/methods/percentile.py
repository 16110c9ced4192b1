"""Uniform WbAb, ranges clipped to a percentile of the calibration values; no reconstruction."""

from mqsam2.methods.registry import Method, register

PERCENTILE = register(
    Method(
        "percentile",
        "uniform, Percentile observers, round to nearest",
        weight_observer="percentile",
        act_observer="percentile",
    )
)
