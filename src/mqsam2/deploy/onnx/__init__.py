"""The ONNX (edge) target: a quantized SAM2 image predictor as two ONNX graphs with QDQ nodes and integer
codes, run by ONNX Runtime on the CPU (docs/deployment.md)."""

from mqsam2.deploy.onnx.export import OnnxExport, export_image_predictor, export_ready
from mqsam2.deploy.onnx.layers import OnnxExportConfig, OnnxLayerReport
from mqsam2.deploy.onnx.runtime import OnnxImagePredictor, session

__all__ = [
    "OnnxExport",
    "OnnxExportConfig",
    "OnnxImagePredictor",
    "OnnxLayerReport",
    "export_image_predictor",
    "export_ready",
    "session",
]
