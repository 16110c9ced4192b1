"""Run an exported image predictor with ONNX Runtime on the CPU (sessions: `mqsam2.deploy.onnx.sessions`)."""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from mqsam2.deploy.onnx.export import DECODER_FILE, ENCODER_FILE, ENCODER_OUTPUTS
from mqsam2.deploy.onnx.sessions import read_metadata, session
from mqsam2.errors import MQSAM2Error


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class OnnxImagePredictor:
    """sam2's image predictor on ONNX Runtime: `set_image` once, then `predict` per prompt (in the pixel
    coordinates of the S x S input; a box is its two corners with labels 2 and 3, as sam2 feeds it)."""

    def __init__(self, directory: str | Path, threads: int | None = None, optimize: bool = True):
        directory = Path(directory)
        missing = [name for name in (ENCODER_FILE, DECODER_FILE) if not (directory / name).is_file()]
        if missing:
            raise MQSAM2Error(
                f"{directory} holds no exported image predictor ({', '.join(missing)} missing): write one with "
                "mqsam2.deploy.onnx.export_image_predictor or python -m mqsam2.deploy --target onnx"
            )
        self.metadata = read_metadata(directory / ENCODER_FILE)
        self.image_size = int(self.metadata["mqsam2.image_size"])
        self.encoder = session(directory / ENCODER_FILE, threads, optimize)
        self.decoder = session(directory / DECODER_FILE, threads, optimize)
        self.features: dict[str, np.ndarray] | None = None

    def encode(self, image) -> dict[str, np.ndarray]:
        """The encoder's three maps for one prepared image [3, S, S] (or [1, 3, S, S])."""
        image = _numpy(image).astype(np.float32, copy=False).reshape(1, 3, self.image_size, self.image_size)
        return dict(
            zip(ENCODER_OUTPUTS, self.encoder.run(list(ENCODER_OUTPUTS), {"image": image}), strict=True)
        )

    def set_image(self, image) -> None:
        self.features = self.encode(image)

    def predict(self, point_coords, point_labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mask logits [M, S, S], IoU predictions [M], low-res logits [M, S/4, S/4]) for one prompt set."""
        if self.features is None:
            raise MQSAM2Error("call set_image before predict")
        coords = _numpy(point_coords).astype(np.float32).reshape(1, -1, 2)
        labels = _numpy(point_labels).astype(np.int32).reshape(1, -1)
        masks, iou, low_res = self.decoder.run(
            None, {**self.features, "point_coords": coords, "point_labels": labels}
        )
        return masks[0], iou[0], low_res[0]

    def predict_box(self, box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`predict` for a box (x0, y0, x1, y1) in input pixels."""
        return self.predict(_numpy(box).reshape(1, 2, 2), np.array([[2, 3]]))


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _peak_memory(directory: str, threads: int | None, queue) -> None:
    before = _vm_kib("VmRSS")
    predictor = OnnxImagePredictor(directory, threads=threads)
    size = predictor.image_size
    predictor.set_image(np.zeros((3, size, size), np.float32))
    predictor.predict_box(np.array([0.2, 0.2, 0.7, 0.7]) * size)
    queue.put((_vm_kib("VmHWM") - before) / 1024)


def peak_memory_mib(directory: str | Path, threads: int | None = None) -> float:
    """Peak resident memory (MiB) that loading the two sessions and running them once adds to a fresh
    process (Linux: the high-water mark VmHWM, which a new process starts afresh, minus the RSS before)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_memory, args=(str(directory), threads, queue))
    process.start()
    peak = queue.get()
    process.join()
    return peak


@dataclass(frozen=True)
class Timing:
    """Median (and minimum) seconds of the encoder per image and of the decoder per box prompt."""

    encoder_s: float
    encoder_s_min: float
    decoder_s: float

    def as_dict(self) -> dict:
        return {"encoder_s": self.encoder_s, "encoder_s_min": self.encoder_s_min, "decoder_s": self.decoder_s}


def time_predictor(predictor: OnnxImagePredictor, image, repeats: int = 5) -> Timing:
    """One warm-up, then `repeats` timed encoder calls and box prompts."""
    box = np.array([0.2, 0.2, 0.7, 0.7], np.float32) * predictor.image_size
    predictor.set_image(image)
    predictor.predict_box(box)
    encoder, decoder = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.set_image(image)
        encoder.append(time.perf_counter() - start)
        start = time.perf_counter()
        predictor.predict_box(box)
        decoder.append(time.perf_counter() - start)
    return Timing(statistics.median(encoder), min(encoder), statistics.median(decoder))


_QUANTIZED_SUFFIXES = (".codes", ".packed", ".scale", ".scales", ".zero_point", ".zero_points")


def float_equivalent_bytes(paths) -> int:
    """The size the same graphs would take with every quantized weight back in fp32: the files' bytes, less
    the codes and their scales and zero-points, plus 4 bytes per weight (MatMulNBits holds 2 per byte)."""
    total = 0
    for path in paths:
        total += Path(path).stat().st_size
        for init in onnx.load(str(path), load_external_data=False).graph.initializer:
            if not init.name.endswith(_QUANTIZED_SUFFIXES):
                continue
            numel = int(np.prod(init.dims))
            total -= numel * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
            if init.name.endswith(".codes"):
                total += 4 * numel
            elif init.name.endswith(".packed"):
                total += 4 * 2 * numel
    return total


# Where an encoder's time goes: the Linear layers' GEMMs (fp32 Gemm after MatMulAddFusion, the integer
# MatMulIntegerToFloat, MatMulNBits) against attention's activation-by-activation products and softmax.
OP_GROUPS = {
    "Gemm": "linear layers",
    "MatMulIntegerToFloat": "linear layers",
    "MatMulNBits": "linear layers",
    "MatMul": "attention (QK^T, PV, softmax)",
    "FusedMatMul": "attention (QK^T, PV, softmax)",
    "Softmax": "attention (QK^T, PV, softmax)",
    "QuantizeLinear": "activation quantization",
    "Clip": "activation quantization",
}


def profile_encoder(path: str | Path, image, threads: int | None = None) -> dict[str, float]:
    """Milliseconds per op type of one encoder call (after a warm-up), from ONNX Runtime's profiler; the keys
    of `OP_GROUPS` are summed into its groups too (prefixed "group: ")."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        encoder = session(path, threads, profile_prefix=str(Path(tmp) / "profile"))
        feeds = {"image": np.asarray(image, np.float32).reshape(1, 3, *np.shape(image)[-2:])}
        encoder.run(None, feeds)
        encoder.run(None, feeds)
        events = json.loads(Path(encoder.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            per_op[op] = per_op.get(op, 0.0) + event["dur"] / 2e3  # two calls, microseconds -> ms per call
    groups: dict[str, float] = {}
    for op, ms in per_op.items():
        group = f"group: {OP_GROUPS.get(op, 'other')}"
        groups[group] = groups.get(group, 0.0) + ms
    return dict(sorted(per_op.items(), key=lambda item: -item[1])) | groups
