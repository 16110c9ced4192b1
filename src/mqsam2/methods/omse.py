"""Uniform WbAb, ranges searched for the least Lp error (OMSE) for weights and activations; no reconstruction."""

from mqsam2.methods.registry import Method, register

OMSE = register(
    Method(
        "omse",
        "uniform, OMSE (Lp search) observers, round to nearest",
        weight_observer="mse",
        act_observer="mse",
    )
)
