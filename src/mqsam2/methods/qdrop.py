"""QDrop: block-wise AdaRound + LSQ with random activation dropping (the strongest uniform baseline)."""

from mqsam2.methods.registry import Method, register

QDROP = register(
    Method(
        "qdrop",
        "uniform, QDrop block reconstruction",
        weight_observer="mse",
        act_observer="mse",
        reconstruction="qdrop",
    )
)
