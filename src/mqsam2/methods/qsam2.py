"""Q-SAM2 (Farronato et al.): uniform WbAa for the 2-4-bit regime; Variance-Reduced Calibration of the image
encoder's Linear weights before quantization (`mqsam2.quant.vrc`), then Learnable Statistical Clipping with
learned weights, unit by unit against the float model (`mqsam2.quant.lsc`; the paper trains end to end)."""

from mqsam2.methods.registry import Method, register
from mqsam2.quant.vrc import vrc_before_quantize

QSAM2 = register(
    Method(
        "qsam2",
        "uniform, VRC initialisation, learnable statistical clipping (block-wise)",
        weight_observer="mse",
        act_observer="mse",
        reconstruction="lsc",
        before_quantize=vrc_before_quantize,
    )
)
