"""Mix-QSAM2 with the measured error model: Eq. 6's E(b) replaced by each layer's measured relative output
error at each width, weights and inputs allocated separately under their own budgets (parameters and
activation elements), so the row spends no more than uniform WbAb on either; then QDrop reconstruction."""

from mqsam2.methods.registry import Method, register

MIXQSAM2_MEASURED = register(
    Method(
        "mixqsam2-measured",
        "Avg-b, Eq. 6 with measured errors, separate W/A budgets, QDrop",
        mixed=True,
        error="measured",
        activations="separate",
        weight_observer="mse",
        act_observer="mse",
        reconstruction="qdrop",
    )
)
