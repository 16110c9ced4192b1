"""Deploy a finished fit run: the run's export (`runs/<name>/export/model.mq`, read with the public
`load_export`) becomes a target's artefact in `runs/<name>/deploy/<target>/`, measured and reported there
(`report.json`, `report.md`) and in the export's model card.

- `onnx`: `encoder.onnx` + `decoder.onnx` (QDQ, integer codes; `mqsam2.deploy.onnx`), run by ONNX Runtime
  on this machine's CPU: seconds per image (encoder) and per box prompt (decoder), the peak memory the
  sessions add, the size of the two files against the same graphs with fp32 weights, and mask IoU against
  the fake-quant model the export holds; and the video tracker in `tracker/` (five graphs and tracker.json,
  `mqsam2.deploy.onnx.video`), which `python -m mqsam2.deploy.onnx.track` runs on a folder of frames.
- `cuda`: the export deployed on the GPU's integer kernels (`deploy(model, DeployConfig(activations=
  "calibrated"))`: fp8 / int8 GEMMs with the calibrated activation steps) and the whole tracker compiled as
  sam2's vos_optimized predictor (`compile_tracker`): images/s of the image encoder, peak GPU memory, the
  bytes of weights held, and mask IoU against the fake-quant model. The artefact is the export itself
  (`model.mq`, device-independent) and `deploy.json`; `load_deployed` rebuilds the deployed tracker.

Fidelity prompts: the run's validation images (or its calibration images when it has none), a box per
object, at most `images` images.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mqsam2.deploy.fidelity import PromptSet, mask_fidelity, prompt_sets, torch_box_predictor
from mqsam2.errors import MQSAM2Error
from mqsam2.export import load_export
from mqsam2.export.card import add_deployment
from mqsam2.rundir import RunDir

TARGETS = ("onnx", "cuda")
TRACKER_DIR = "tracker"  # the onnx target's video tracker, beside the image predictor


@dataclass(frozen=True)
class DeployRunConfig:
    """`threads`: ONNX Runtime intra-op threads (None: its default); `repeats`: timed calls after a warm-up;
    `images`: fidelity images; `low_bit_kernel`: how the ONNX export writes 2-4-bit Linear layers ("int8"
    or "int4"); `compile_mode`: torch.compile mode of the CUDA tracker ("none" keeps it eager)."""

    target: str = "onnx"
    threads: int | None = None
    repeats: int = 5
    images: int = 4
    low_bit_kernel: str = "int8"
    compile_mode: str = "max-autotune"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise MQSAM2Error(f"unknown target {self.target!r}: use one of {', '.join(TARGETS)}")
        if self.repeats < 1 or self.images < 1:
            raise MQSAM2Error("repeats and images must be at least 1")


def deploy_dir(run_dir: Path, target: str) -> Path:
    return RunDir(run_dir).deployment(target)


def _fidelity_prompts(run_dir: Path, image_size: int, images: int) -> list[PromptSet]:
    from mqsam2.pipeline import load_data

    config = RunDir(run_dir).read_config()
    data = load_data(config, image_size)
    samples = (data.val_images or data.calibration.images)[:images]
    prompts = prompt_sets(samples, image_size)
    if not prompts:
        raise MQSAM2Error(f"run {run_dir} has no image with an object box to measure mask fidelity on")
    return prompts


def _deploy_onnx(model: nn.Module, out: Path, prompts: list[PromptSet], config: DeployRunConfig) -> dict:
    import onnxruntime

    from mqsam2.deploy.fidelity import onnx_box_predictor
    from mqsam2.deploy.onnx import OnnxExportConfig, OnnxImagePredictor, export_image_predictor
    from mqsam2.deploy.onnx.runtime import float_equivalent_bytes, peak_memory_mib, time_predictor
    from mqsam2.deploy.onnx.video import export_video_tracker

    export_config = OnnxExportConfig(low_bit_kernel=config.low_bit_kernel)
    export = export_image_predictor(model, out, export_config)
    tracker = export_video_tracker(model, out / TRACKER_DIR, export_config)
    predictor = OnnxImagePredictor(out, threads=config.threads)
    timing = time_predictor(predictor, prompts[0].image, config.repeats)
    fidelity = mask_fidelity(torch_box_predictor(model), onnx_box_predictor(predictor), prompts)
    fp32_bytes = float_equivalent_bytes([export.encoder, export.decoder])
    return {
        "artefact": [
            export.encoder.name,
            export.decoder.name,
            *(f"{TRACKER_DIR}/{path.name}" for path in (*tracker.graphs.values(), tracker.settings)),
        ],
        "runtime": f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, "
        f"{config.threads or 'default'} intra-op threads",
        "machine": platform.processor() or platform.machine(),
        "speed": {
            "encoder_s_per_image": timing.encoder_s,
            "encoder_s_min": timing.encoder_s_min,
            "decoder_ms_per_prompt": 1e3 * timing.decoder_s,
        },
        "memory": {"peak_rss_added_mib": peak_memory_mib(out, config.threads)},
        "size": {
            "bytes": export.nbytes,
            "fp32_weights_bytes": fp32_bytes,
            "ratio": export.nbytes / fp32_bytes,
            "tracker_bytes": tracker.nbytes,
        },
        "fidelity": {"mask_iou_vs_fake_quant": fidelity.as_dict()},
        "layers": export.layers.counts(),
        "fallbacks": export.layers.fallbacks,
    }


def load_deployed(directory: str | Path, device: str = "cuda", compile_mode: str | None = None) -> nn.Module:
    """The tracker a `cuda` deployment describes: its export loaded, deployed with its `deploy.json`, and
    compiled when `compile_mode` (default: the one it was measured with) is not "none"."""
    from mqsam2.deploy.compiled import compile_tracker
    from mqsam2.deploy.kernels import DeployConfig, deploy

    directory = Path(directory)
    settings = json.loads((directory / "deploy.json").read_text())
    model = deploy(load_export(directory / "model.mq", device=device), DeployConfig(**settings["deploy"]))
    mode = compile_mode or settings["compile_mode"]
    return model if mode == "none" else compile_tracker(model, mode)


def _deploy_cuda(model: nn.Module, out: Path, prompts: list[PromptSet], config: DeployRunConfig) -> dict:
    from mqsam2.deploy.compiled import compile_tracker
    from mqsam2.deploy.kernels import DeployConfig, deploy, weight_nbytes

    if not torch.cuda.is_available():
        raise MQSAM2Error("target cuda needs a CUDA device; use --target onnx on a CPU machine")
    deploy_config = DeployConfig(activations="calibrated")
    reference = copy.deepcopy(model).cuda()
    float_bytes = sum(p.numel() * 2 for p in reference.parameters())  # the bf16 weights of the float model
    deployed = deploy(model.cuda(), deploy_config)
    report = deployed.mqsam2_deploy_report
    if config.compile_mode != "none":
        compile_tracker(deployed, config.compile_mode)
    (out / "deploy.json").write_text(
        json.dumps(
            {"deploy": dataclasses.asdict(deploy_config), "compile_mode": config.compile_mode}, indent=1
        )
    )
    images = torch.stack([p.image for p in prompts]).cuda()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(2):  # compilation and warm-up
            deployed.image_encoder(images[:1])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(config.repeats):
            deployed.image_encoder(images[:1])
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / config.repeats
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fidelity = mask_fidelity(torch_box_predictor(reference), torch_box_predictor(deployed), prompts)
    return {
        "artefact": ["model.mq", "deploy.json"],
        "runtime": f"torch {torch.__version__}, {torch.cuda.get_device_name()}, compile {config.compile_mode}",
        "speed": {"encoder_images_per_s": 1 / seconds},
        "memory": {"peak_gpu_mib_encoder_b1": torch.cuda.max_memory_allocated() / 2**20},
        "size": {"weight_bytes": weight_nbytes(deployed), "bf16_weight_bytes": float_bytes},
        "fidelity": {"mask_iou_vs_fake_quant": fidelity.as_dict()},
        "layers": report.counts(),
        "fallbacks": report.fallbacks,
    }


def _markdown(target: str, report: dict) -> str:
    lines = [f"# Deployment: {target}", ""]
    for section, value in report.items():
        if isinstance(value, dict):
            lines += [f"## {section}", "", *(f"- {k}: {v}" for k, v in value.items()), ""]
        else:
            lines += [f"- {section}: {value}"]
    return "\n".join(lines) + "\n"


def card_summary(report: dict) -> dict:
    """The flat lines the model card shows: speed, memory, size, fidelity."""
    summary = {"runtime": report["runtime"]}
    for section in ("speed", "memory", "size"):
        summary |= {k: round(v, 4) if isinstance(v, float) else v for k, v in report[section].items()}
    fidelity = report["fidelity"]["mask_iou_vs_fake_quant"]
    summary["mask_iou_vs_fake_quant"] = f"{fidelity['iou_mean']:.4f} mean, {fidelity['iou_min']:.4f} min"
    return summary


def deploy_run(run_dir: str | Path, config: DeployRunConfig) -> dict:
    """Write the target's artefact and report into `run_dir/deploy/<target>/` and the model card; returns the
    report."""
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    run.read_config()  # a folder that is no fit run is named as such, not sent to the export
    if not run.export.is_file():
        raise MQSAM2Error(
            f"run {run_dir} has no export ({run.export} is missing): python -m mqsam2.export --run {run_dir} "
            f"writes it once the run is finished (python -m mqsam2.fit --config {run.config_file} finishes it)"
        )
    source = run.export
    model = load_export(source)
    prompts = _fidelity_prompts(run_dir, int(model.image_size), config.images)
    out = deploy_dir(run_dir, config.target)
    work = out.with_name(f".{out.name}.partial")  # renamed into place once complete: nothing half-written
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        if config.target == "onnx":
            report = _deploy_onnx(model, work, prompts, config)
        else:
            shutil.copy(source, work / "model.mq")
            report = _deploy_cuda(model, work, prompts, config)
        report = {"target": config.target, "source": str(source), **report}
        (work / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (work / "report.md").write_text(_markdown(config.target, report))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    add_deployment(source, config.target, card_summary(report))
    return report
