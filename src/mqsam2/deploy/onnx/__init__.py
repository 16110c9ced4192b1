"""The ONNX (edge) target: a quantized SAM2 image predictor as two ONNX graphs, and its video tracker as five,
with QDQ nodes and integer codes, run by ONNX Runtime on the CPU (docs/deployment.md)."""

from mqsam2.deploy.onnx.export import OnnxExport, export_image_predictor, export_ready
from mqsam2.deploy.onnx.layers import OnnxExportConfig, OnnxLayerReport
from mqsam2.deploy.onnx.runtime import OnnxImagePredictor
from mqsam2.deploy.onnx.sessions import session
from mqsam2.deploy.onnx.tracker import OnnxVideoTracker, TrackPrompt
from mqsam2.deploy.onnx.video import VideoTrackerExport, export_video_tracker

__all__ = [
    "OnnxExport",
    "OnnxExportConfig",
    "OnnxImagePredictor",
    "OnnxLayerReport",
    "OnnxVideoTracker",
    "TrackPrompt",
    "VideoTrackerExport",
    "export_image_predictor",
    "export_ready",
    "export_video_tracker",
    "session",
]
