"""The deployable file: quantized weights as bit-packed integer codes, everything else as plain tensors.

Layout of `model.mq` (docs/export.md is the full spec): 8 bytes magic `MQSAM2PK`, the header length as a
little-endian uint64, the UTF-8 JSON header, the payload, then the SHA-256 of everything before it. Byte ranges
`[offset, nbytes, crc32]` in the header point into the payload (offsets from its start, no padding) and carry
the CRC-32 of their bytes, so a damaged file is refused and the damaged tensor named. The header names the SAM2
config and the quantization config with its bit plan, so the loader rebuilds the exact module tree and fills
it; weights are restored as `(code - Z) * S`, the values the fake-quant forward produces, so outputs are
identical. Version 1 files (no checksums) still load.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import torch
from torch import nn

from mqsam2.errors import MQSAM2Error
from mqsam2.export.card import ExportBytes, build_card, write_card
from mqsam2.export.pack import pack_codes, unpack_codes
from mqsam2.files import atomic_output
from mqsam2.models import build_architecture, matching_configs
from mqsam2.quant.affine import dequantize_affine
from mqsam2.quant.checkpoint import model_spec, quant_config_dict, quant_config_from_dict
from mqsam2.quant.log2 import Log2Quantizer
from mqsam2.quant.quantizer import ActQuantizer, FakeQuantizer
from mqsam2.quant.swap import is_quantized, quantize, quantized_layers

MAGIC = b"MQSAM2PK"
FORMAT, VERSION = "mqsam2-packed", 2
READABLE_VERSIONS = (1, 2)  # version 1: no checksums
_PREFIX = struct.Struct("<8sQ")
_DIGEST = hashlib.sha256().digest_size  # the trailer
_REEXPORT = "copy it again, or export it again (python -m mqsam2.export)"
_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32)
} | {"uint8": torch.uint8, "bool": torch.bool}


class _Payload:
    """Appends raw tensor bytes and hands back their `[offset, nbytes, crc32]` range."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, tensor: torch.Tensor) -> list[int]:
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        self.chunks.append(data)
        self.size += len(data)
        return [self.size - len(data), len(data), zlib.crc32(data)]


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise MQSAM2Error(f"cannot export tensors of dtype {dtype}")
    return name


def _weight_entry(name: str, layer: nn.Module, payload: _Payload) -> dict:
    quantizer = layer.weight_quantizer
    if not quantizer.initialized:
        raise MQSAM2Error(f"layer {name} was quantized but never calibrated: calibrate before exporting")
    if quantizer.alpha is not None:
        raise MQSAM2Error(
            f"layer {name} still holds soft AdaRound rounding: finish its reconstruction unit (hardening) "
            "before exporting"
        )
    return {
        "bits": quantizer.bits,
        "shape": list(layer.weight.shape),
        "codes": payload.add(pack_codes(quantizer.codes(layer.weight.detach()), quantizer.bits)),
        "scale": payload.add(quantizer.scale.detach().float()),
        "zero_point": payload.add(_integer_zero_point(name, quantizer.zero_point)),
    }


def _integer_zero_point(name: str, zero_point: torch.Tensor) -> torch.Tensor:
    """Zero-points are integers in 0..2^b-1 by construction (Eq. 1); stored as uint8."""
    zero_point = zero_point.detach()
    if not torch.equal(zero_point, zero_point.round()) or zero_point.min() < 0 or zero_point.max() > 255:
        raise MQSAM2Error(f"{name}: zero-points must be integers in 0..255 to export")
    return zero_point.to(torch.uint8)


def _quantizer_keys(model: nn.Module) -> set[str]:
    return {
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, FakeQuantizer)
        for key in module.state_dict()
    }


def export_model(
    model: nn.Module,
    path: str | Path,
    card_extra: dict | None = None,
    float_dtype: torch.dtype = torch.float32,
    fp_bytes: int | None = None,
) -> dict:
    """Write `path` (model.mq) and its model card next to it; returns the card.

    Float tensors that stay float (float layers, norms, embeddings, biases) are stored in `float_dtype`:
    float32 keeps outputs identical, float16 halves them at the cost of exactness. `fp_bytes` is the float
    checkpoint's size for the card (computed when not given).
    """
    if not is_quantized(model):
        config = getattr(model, "mqsam2_config", type(model).__name__)
        raise MQSAM2Error(
            f"cannot export {config}: the model is a float SAM2 (no quantized layers), and the export needs a "
            "quantized, calibrated one (mqsam2.quant.quantize + calibration, or python -m mqsam2.fit)"
        )
    if not hasattr(model, "mqsam2_config"):
        raise MQSAM2Error(
            "cannot export: the model does not record its SAM2 config; build it with build_sam2"
        )
    log2 = [name for name, m in model.named_modules() if isinstance(m, Log2Quantizer)]
    if log2:
        raise MQSAM2Error(
            f"cannot export {log2[0]} and {len(log2) - 1} other log2 attention quantizer(s) (PTQ4SAM): the packed "
            "format stores uniform quantizers only; save the model with mqsam2.quant.checkpoint.save_quantized"
        )
    payload = _Payload()
    weights = {name: _weight_entry(name, layer, payload) for name, layer in quantized_layers(model).items()}
    consumed = _quantizer_keys(model) | {f"{name}.weight" for name in weights}
    activations = {}
    for name, quantizer in model.named_modules():
        if isinstance(quantizer, ActQuantizer):
            activations[name] = {
                "bits": quantizer.bits,
                "scale": float(quantizer.scale),
                "zero_point": int(_integer_zero_point(name, quantizer.zero_point)),
                "initialized": bool(quantizer.initialized),
            }
    tensors = {}
    for key, tensor in model.state_dict().items():
        if key in consumed:
            continue
        stored = tensor.to(float_dtype) if tensor.dtype == torch.float32 else tensor
        tensors[key] = {
            "dtype": _dtype_name(stored.dtype),
            "shape": list(stored.shape),
            "data": payload.add(stored),
        }
    header = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_spec(model),
        "quant": quant_config_dict(model),
        "float_dtype": _dtype_name(float_dtype),
        "weights": weights,
        "activations": activations,
        "tensors": tensors,
        "payload_bytes": payload.size,
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    path = Path(path)
    digest = hashlib.sha256()
    with atomic_output(path) as stream:
        for part in (_PREFIX.pack(MAGIC, len(header_bytes)), header_bytes, *payload.chunks):
            digest.update(part)
            stream.write(part)
        stream.write(digest.digest())
    sizes = ExportBytes(
        framing=_PREFIX.size + _DIGEST,
        header=len(header_bytes),
        codes=sum(entry["codes"][1] for entry in weights.values()),
        weight_params=sum(entry["scale"][1] + entry["zero_point"][1] for entry in weights.values()),
        float_tensors=sum(entry["data"][1] for entry in tensors.values()),
    )
    card = build_card(model, path, f"{FORMAT} v{VERSION}", sizes, fp_bytes, card_extra)
    write_card(card, path)
    return card


def read_header(path: str | Path) -> tuple[dict, memoryview]:
    """The header and the payload bytes of an export, with clear errors for files that are not one or that
    were damaged after they were written (checksums)."""
    path = Path(path)
    if not path.is_file():
        raise MQSAM2Error(f"export not found: {path}")
    data = memoryview(path.read_bytes())
    if len(data) < _PREFIX.size or bytes(data[:8]) != MAGIC:
        raise MQSAM2Error(f"{path} is not an mqsam2 export (expected the {MAGIC.decode()} magic bytes)")
    intact = len(data) > _DIGEST and hashlib.sha256(data[:-_DIGEST]).digest() == bytes(data[-_DIGEST:])
    _, header_len = _PREFIX.unpack(data[: _PREFIX.size])
    try:
        header = json.loads(bytes(data[_PREFIX.size : _PREFIX.size + header_len]))
    except ValueError as exc:
        damage = "not readable" if intact else "damaged (the file's checksum does not match)"
        raise MQSAM2Error(f"{path}: the export header is {damage} ({exc}); {_REEXPORT}") from None
    if header.get("format") != FORMAT or header.get("version") not in READABLE_VERSIONS:
        raise MQSAM2Error(
            f"{path} is {header.get('format')} v{header.get('version')}; this mqsam2 reads {FORMAT} "
            f"v{', v'.join(map(str, READABLE_VERSIONS))}"
        )
    checked = header["version"] >= 2
    payload = data[_PREFIX.size + header_len : len(data) - (_DIGEST if checked else 0)]
    if checked and not intact:
        raise MQSAM2Error(f"{path} is damaged: {_first_damage(header, payload)}; {_REEXPORT}")
    if len(payload) != header["payload_bytes"]:
        raise MQSAM2Error(
            f"{path} is truncated or padded: payload of {len(payload)} bytes, header says {header['payload_bytes']}"
        )
    return header, payload


def _spans(header: dict):
    """(name, [offset, nbytes, crc32]) of every byte range the header points to."""
    for name, entry in header["weights"].items():
        for part in ("codes", "scale", "zero_point"):
            yield f"{name} ({part})", entry[part]
    for name, entry in header["tensors"].items():
        yield name, entry["data"]


def _first_damage(header: dict, payload: memoryview) -> str:
    """Where a file whose SHA-256 does not match went wrong: the first tensor whose CRC-32 fails, if any."""
    if len(payload) != header["payload_bytes"]:
        return f"payload of {len(payload)} bytes, header says {header['payload_bytes']} (truncated or padded)"
    for name, (offset, nbytes, crc) in _spans(header):
        if zlib.crc32(payload[offset : offset + nbytes]) != crc:
            return f"the bytes of {name} do not match their checksum"
    return "its checksum does not match (the header or the trailer changed)"


def _tensor(payload: memoryview, span: list[int], dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    offset, nbytes = span[:2]
    data = payload[offset : offset + nbytes]
    if len(span) > 2 and zlib.crc32(data) != span[2]:
        raise MQSAM2Error(
            f"the export's bytes {offset}..{offset + nbytes} do not match their checksum; {_REEXPORT}"
        )
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def _check_architecture(model: nn.Module, header: dict, path: Path) -> None:
    """The stored tensors must fit the float architecture the header's SAM2 config builds; name both sides
    (and the config they do fit) when they do not."""
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    stored = {key: tuple(entry["shape"]) for key, entry in header["tensors"].items()}
    stored |= {f"{name}.weight": tuple(entry["shape"]) for name, entry in header["weights"].items()}
    if expected == stored:
        return
    config = header["model"]["sam2_config"]
    key = (
        sorted(expected.keys() ^ stored.keys()) or sorted(k for k in expected if expected[k] != stored[k])
    )[0]
    fits = matching_configs({k: torch.empty(s, device="meta") for k, s in stored.items()})
    raise MQSAM2Error(
        f"{path}: its tensors do not fit its SAM2 config {config} (e.g. {key}: "
        f"{list(stored[key]) if key in stored else 'absent'} in the export, "
        f"{list(expected[key]) if key in expected else 'absent'} in {config}); they fit "
        f"{', '.join(fits) if fits else 'no packaged SAM2 config'}"
    )


def _quantizer_state(prefix: str, scale: torch.Tensor, zero_point: torch.Tensor, initialized: bool) -> dict:
    return {
        f"{prefix}.scale": scale,
        f"{prefix}.zero_point": zero_point,
        f"{prefix}.initialized": torch.tensor(initialized),
    }


def load_export(
    path: str | Path,
    device: str | torch.device = "cpu",
    memory_policy: str = "fifo",
    sam2_config: str | None = None,
) -> nn.Module:
    """The quantized SAM2 video predictor stored in an export (`TensorImagePredictor(model)` for images).

    `sam2_config`, when given, is the SAM2 config the caller expects; an export made for another is refused.
    """
    path = Path(path)
    header, payload = read_header(path)
    spec = header["model"]
    if sam2_config is not None and sam2_config != spec["sam2_config"]:
        raise MQSAM2Error(
            f"{path} holds a quantized {spec['sam2_config']}, but {sam2_config} was requested: "
            "load it without sam2_config or export the model you want"
        )
    model = build_architecture(
        spec["sam2_config"], spec["image_size"], spec["video"], memory_policy=memory_policy
    )
    _check_architecture(model, header, path)
    quantize(model, quant_config_from_dict(header["quant"]))
    expected = model.state_dict()
    state = {
        key: _tensor(payload, entry["data"], _DTYPES[entry["dtype"]], entry["shape"]).to(expected[key].dtype)
        for key, entry in header["tensors"].items()
    }
    for name, entry in header["weights"].items():
        channels = entry["shape"][0]
        scale = _tensor(payload, entry["scale"], torch.float32, [channels])
        zero_point = _tensor(payload, entry["zero_point"], torch.uint8, [channels]).float()
        numel = torch.Size(entry["shape"]).numel()
        codes = unpack_codes(_tensor(payload, entry["codes"], torch.uint8, [-1]), entry["bits"], numel)
        state[f"{name}.weight"] = dequantize_affine(codes.reshape(entry["shape"]), scale, zero_point, axis=0)
        state |= _quantizer_state(f"{name}.weight_quantizer", scale, zero_point, True)
    for name, entry in header["activations"].items():
        state |= _quantizer_state(
            name, torch.tensor(entry["scale"]), torch.tensor(float(entry["zero_point"])), entry["initialized"]
        )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
