"""Mix-QSAM2 with the mask error model: each layer's cost at each width is the mask KL measured with that
layer alone quantized there (its weights, and separately its input, with the quantizers calibration sets;
`mqsam2.propagation.measure_mask_kl`), so the allocation weighs an error by what it does to the masks rather
than by a proxy of it. Weights and inputs are allocated separately under their own budgets (parameters and
activation elements), so the row spends no more than uniform WbAb on either; then QDrop reconstruction."""

from mqsam2.methods.registry import Method, register

MIXQSAM2_MASK = register(
    Method(
        "mixqsam2-mask",
        "Avg-b, Eq. 6 with each layer's measured mask KL per width, separate W/A budgets, QDrop",
        mixed=True,
        error="mask",
        activations="separate",
        weight_observer="mse",
        act_observer="mse",
        reconstruction="qdrop",
    )
)
