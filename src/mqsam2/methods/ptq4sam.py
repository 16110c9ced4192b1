"""PTQ4SAM (Lv et al., CVPR 2024): uniform WbAb with the attention matmuls quantized, Bimodal Integration of
the keys before quantization (`mqsam2.bimodal`), Adaptive Granularity log2 quantization of the softmax
probabilities (`mqsam2.quant.log2`), then QDrop block reconstruction (PTQ4SAM builds on BRECQ/QDrop).

Not PTQ4SAM's code: dropping is off at evaluation and every layer of a unit is hardened (our reconstruction
does both); observers are the QDrop row's (OMSE), so this row differs from QDrop by BIG, AGQ and the
quantized attention matmuls alone."""

from torch import nn

from mqsam2.bimodal import integrate_bimodal
from mqsam2.methods.registry import Method, register


def bimodal_integration(model: nn.Module, workload) -> None:
    """Flip the q/k channels of attention modules whose keys are bimodal on the calibration passes."""
    integrate_bimodal(model, lambda: workload.run_full(model))


PTQ4SAM = register(
    Method(
        "ptq4sam",
        "uniform, quantized attention, Bimodal Integration + log2 AGQ softmax, QDrop",
        weight_observer="mse",
        act_observer="mse",
        quantize_attention=True,
        attention_probs="log2",
        reconstruction="qdrop",
        before_quantize=bimodal_integration,
    )
)
