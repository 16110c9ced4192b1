"""Save and load a fake-quantized SAM2 as one file: enough metadata to rebuild the module tree, then tensors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from mqsam2.errors import MQSAM2Error
from mqsam2.files import load_torch, save_torch
from mqsam2.models import build_architecture
from mqsam2.quant.swap import QuantConfig, bit_plan, is_quantized, quantize

FORMAT = "mqsam2-fakequant-v1"


def model_spec(model: nn.Module) -> dict:
    """What `build_sam2` needs to rebuild the same float architecture."""
    from mqsam2.memory.predictor import VideoPredictor

    return {
        "sam2_config": model.mqsam2_config,
        "image_size": int(model.image_size),
        "video": isinstance(model, VideoPredictor),
    }


def quant_config_dict(model: nn.Module) -> dict:
    """The config that rebuilds the same quantized modules, with the realised per-layer plan."""
    config = dataclasses.replace(model.mqsam2_quant_config, plan=bit_plan(model))
    payload = dataclasses.asdict(config)
    payload["keep_fp"] = list(payload["keep_fp"])
    return payload


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    if not is_quantized(model):
        raise MQSAM2Error("model is not quantized: run mqsam2.quant.quantize and calibration first")
    path = Path(path)
    payload = {
        "format": FORMAT,
        "model": model_spec(model),
        "quant": quant_config_dict(model),
        "state_dict": model.state_dict(),
    }
    return save_torch(payload, path)


def quant_config_from_dict(quant: dict) -> QuantConfig:
    """The inverse of `quant_config_dict`."""
    return QuantConfig(**{**quant, "keep_fp": tuple(quant["keep_fp"])})


def rebuild_quantized(spec: dict, quant: dict, device: str | torch.device = "cpu") -> nn.Module:
    """An uncalibrated quantized model with exactly the saved module tree, ready for `load_state_dict`."""
    model = build_architecture(spec["sam2_config"], spec["image_size"], spec["video"])
    return quantize(model, quant_config_from_dict(quant)).to(device)


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    fix = "give a file written by mqsam2.quant.checkpoint.save_quantized"
    payload = load_torch(path, "quantized model", fix)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise MQSAM2Error(f"{path} is not an mqsam2 quantized model (expected format {FORMAT}); {fix}")
    model = rebuild_quantized(payload["model"], payload["quant"], device)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise MQSAM2Error(
            f"{path}: its tensors do not fit the model it describes ({str(exc).splitlines()[0]})"
        ) from None
    return model
