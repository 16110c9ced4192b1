"""AdaRound: learned rounding, layer by layer, activations at their calibrated ranges."""

from mqsam2.methods.registry import Method, register

ADAROUND = register(
    Method(
        "adaround",
        "uniform, AdaRound layer-wise rounding",
        weight_observer="mse",
        act_observer="mse",
        reconstruction="adaround",
    )
)
