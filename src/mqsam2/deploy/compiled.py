"""The whole video tracker compiled the way sam2's `vos_optimized` predictor (`SAM2VideoPredictorVOS`) compiles
it, for any of our predictors (stock memory or SIS) and for deployed quantized models alike.

`SAM2VideoPredictorVOS` does two things: it replaces three methods with versions that clone what the compiled
parts hand out (so CUDA-graph buffers are never aliased), and it compiles the image encoder, memory encoder,
memory attention (dynamic shapes: the number of memories grows), prompt encoder and mask decoder with
`fullgraph=True`. `compile_tracker` does the same on an existing model, so that the quantized layers of
`mqsam2.deploy` (plain PyTorch ops: `IntegerLinear`, tinygemm, torchao) sit inside the compiled graphs and
no layer runs Python per call.
"""

from __future__ import annotations

import types

import torch
from sam2.sam2_video_predictor import SAM2VideoPredictor, SAM2VideoPredictorVOS
from torch import nn

from mqsam2.errors import MQSAM2Error

VOS_METHODS = ("forward_image", "_forward_sam_heads", "_encode_new_memory")
# (component, dynamic shapes): SAM2VideoPredictorVOS._compile_all_components plus sam2's compile_image_encoder
COMPONENTS = (
    ("image_encoder", False),
    ("memory_encoder", False),
    ("memory_attention", True),
    ("sam_prompt_encoder", False),
    ("sam_mask_decoder", False),
)


def compile_tracker(model: nn.Module, mode: str = "max-autotune") -> nn.Module:
    """Compile `model` (a SAM2 video predictor) in place as `vos_optimized` does; returns it. sam2 uses
    mode "max-autotune"; "max-autotune-no-cudagraphs" or "default" compile faster."""
    if not isinstance(model, SAM2VideoPredictor):
        raise MQSAM2Error(
            f"compile_tracker needs a SAM2 video predictor (build_sam2(..., video=True)), got {type(model).__name__}"
        )
    for name in VOS_METHODS:
        setattr(model, name, types.MethodType(getattr(SAM2VideoPredictorVOS, name), model))
    for component, dynamic in COMPONENTS:
        module = getattr(model, component)
        module.forward = torch.compile(module.forward, mode=mode, fullgraph=True, dynamic=dynamic)
    return model
