"""Deployment of a quantized SAM2: real low-bit kernels in PyTorch (`deploy`, `mqsam2.deploy.kernels`), an
ONNX export run by ONNX Runtime on the CPU (`mqsam2.deploy.onnx`), and the CLI that writes either target's
artefact and report into a run directory (`python -m mqsam2.deploy`)."""

from mqsam2.deploy.kernels import (
    DeployConfig,
    DeployReport,
    Int4Pack,
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    deploy,
    int4_unsupported_reason,
    pack_int4,
    weight_nbytes,
)

__all__ = [
    "DeployConfig",
    "DeployReport",
    "Int4Pack",
    "Int4WeightOnlyLinear",
    "Int8DynamicLinear",
    "deploy",
    "int4_unsupported_reason",
    "pack_int4",
    "weight_nbytes",
]
