"""BRECQ: block-wise reconstruction, rounding first (activations float), then activation steps."""

from mqsam2.methods.registry import Method, register

BRECQ = register(
    Method(
        "brecq",
        "uniform, BRECQ block reconstruction",
        weight_observer="mse",
        act_observer="mse",
        reconstruction="brecq",
    )
)
