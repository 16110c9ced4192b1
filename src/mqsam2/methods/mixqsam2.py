"""Mix-QSAM2 as the paper reads: Eq. 4 importance, Eq. 6 with E(b) = 2^-b solved exactly, a layer's input at its
weight's width, the parameter budget only, then QDrop reconstruction."""

from mqsam2.methods.registry import Method, register

MIXQSAM2 = register(
    Method(
        "mixqsam2",
        "Avg-b, Eq. 6 with 2^-b (paper), shared W/A widths, QDrop",
        mixed=True,
        weight_observer="mse",
        act_observer="mse",
        reconstruction="qdrop",
    )
)
