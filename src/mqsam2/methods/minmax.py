"""Uniform WbAb, ranges from the calibration set's minimum and maximum; no reconstruction."""

from mqsam2.methods.registry import Method, register

MINMAX = register(Method("minmax", "uniform, MinMax observers, round to nearest"))
