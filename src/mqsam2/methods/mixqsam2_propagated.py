"""Mix-QSAM2 with the propagated error model: each layer's measured relative output error at each width,
weighted by how much of it reaches the masks (its downstream gain, measured by noise injection,
`mqsam2.propagation`) instead of by Eq. 4's importance. Weights and inputs are allocated separately under
their own budgets (parameters and activation elements), so the row spends no more than uniform WbAb on
either; then QDrop reconstruction."""

from mqsam2.methods.registry import Method, register

MIXQSAM2_PROPAGATED = register(
    Method(
        "mixqsam2-propagated",
        "Avg-b, Eq. 6 with measured errors x downstream gains, separate W/A budgets, QDrop",
        mixed=True,
        error="propagated",
        activations="separate",
        weight_observer="mse",
        act_observer="mse",
        reconstruction="qdrop",
    )
)
