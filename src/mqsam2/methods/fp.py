"""The float model itself: the reference row of every table."""

from mqsam2.methods.registry import Method, register

FP = register(Method("fp", "the float model (no quantization)"))
