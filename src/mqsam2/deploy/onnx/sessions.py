"""ONNX Runtime CPU sessions for the exported graphs (no PyTorch: the ONNX tracker's driver uses them too).

ONNX Runtime's `MatMulAddFusion` (MatMul + bias Add -> Gemm) runs before its QDQ fusions and, on a quantized
graph, leaves the weights to be dequantized on every call and the GEMM in fp32; `session` turns it off for
graphs that carry QDQ nodes, so that DequantizeLinear -> MatMul becomes the integer MatMulIntegerToFloat.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime as ort

QUANTIZED_GRAPH_DISABLED_OPTIMIZERS = ("MatMulAddFusion",)


def has_qdq(path: str | Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(node.op_type == "DequantizeLinear" for node in model.graph.node)


def session(
    path: str | Path, threads: int | None = None, optimize: bool = True, profile_prefix: str | None = None
) -> ort.InferenceSession:
    """A CPU session at full graph optimisation (`optimize=False`: the graph exactly as exported, QDQ nodes
    unfused); `threads` intra-op threads (None: ONNX Runtime's default); `profile_prefix`: write ONNX
    Runtime's per-node profile (JSON) there."""
    options = ort.SessionOptions()
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    disabled = list(QUANTIZED_GRAPH_DISABLED_OPTIMIZERS) if has_qdq(path) else []
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
    )


def read_metadata(path: str | Path) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    return {
        prop.key: json.loads(prop.value) for prop in model.metadata_props if prop.key.startswith("mqsam2.")
    }
