"""One dataclass per pipeline stage; the YAML given to `python -m mqsam2.fit` maps onto `FitConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from mqsam2.errors import MQSAM2Error
from mqsam2.quant.swap import QuantConfig
from mqsam2.reconstruct.capture import CAPTURE_MODES
from mqsam2.reconstruct.units import UNIT_MODES


@dataclass
class ModelConfig:
    """SAM2 size (t, s, b+, l), release (2.1 or 2), Meta checkpoint (none: seeded random init)."""

    size: str = "t"
    version: str = "2.1"
    checkpoint: str | None = None
    image_size: int | None = None
    seed: int = 0


@dataclass
class DataConfig:
    """Shards to read (globs or brace patterns); without them, synthetic shards are generated under `root`."""

    root: str = "data/synth"
    video_shards: list[str] | None = None
    image_shards: list[str] | None = None
    val_video_shards: list[str] | None = None
    val_image_shards: list[str] | None = None
    synth_videos: int = 12
    synth_frames: int = 24
    synth_size: int = 256
    synth_images: int = 40
    calib_videos: int = 8
    calib_frames: int = 20
    calib_images: int = 32
    calib_objects: int | None = None
    val_videos: int = 4
    val_frames: int = 24
    val_images: int = 8
    prompt: str = "box"
    seed: int = 0


@dataclass
class AllocationConfig:
    """Eq. 6: `ilp` (exact, PuLP/CBC), `greedy` (the paper's heuristic) or `uniform` (every layer at target)."""

    method: str = "ilp"
    target_avg: float = 4.0
    candidates: list[int] = field(default_factory=lambda: [3, 4, 5])
    error: str = "pow2"


@dataclass
class ReconstructionConfig:
    """Block-wise reconstruction (method.md §5); `iters` per unit, Lightning Trainer settings alongside;
    `units` limits it to the named units (the others keep round-to-nearest); `capture` says how each unit's
    calibration tensors are produced (mqsam2.reconstruct.capture), `cache_*` where they live during its fit
    (mqsam2.reconstruct.placement: `cache_gb` is the GPU budget, default half of the free memory;
    `host_cache_gb` what one capture pass may hold in host memory, default half of the available)."""

    mode: str = "qdrop"
    units: list[str] | None = None
    iters: int = 20_000
    act_iters: int | None = None
    batch_size: int = 8
    lr_rounding: float = 1e-3
    lr_act: float = 4e-5
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    drop_prob: float = 0.5
    checkpoint_every: int = 1000
    check_finite_every: int = 100
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    precision: str = "32-true"
    cache_device: str = "auto"
    cache_gb: float | None = None
    cache_bf16: bool = True
    host_cache_gb: float | None = None
    capture: str = "sequential"
    compile: bool = False
    cuda_graphs: bool = True
    fused_kernels: bool = False

    def __post_init__(self) -> None:
        if self.mode not in UNIT_MODES:
            raise MQSAM2Error(
                f"reconstruction.mode {self.mode!r} is unknown: use one of {', '.join(UNIT_MODES)}"
            )
        if self.capture not in CAPTURE_MODES:
            raise MQSAM2Error(
                f"reconstruction.capture {self.capture!r} is unknown: use one of {', '.join(CAPTURE_MODES)}"
            )
        if self.iters < 1 or self.batch_size < 1:
            raise MQSAM2Error("reconstruction.iters and reconstruction.batch_size must be positive")
        if not 0.0 <= self.drop_prob < 1.0:
            raise MQSAM2Error(f"reconstruction.drop_prob {self.drop_prob} must lie in [0, 1)")


@dataclass
class EvaluationConfig:
    """The validation loop (SIS active) plus a comparison table: float, uniform W{b}A{b} baselines calibrated
    with the same observers (one per entry of `baselines`) and this run's model, under each memory policy."""

    enabled: bool = True
    memory: list[str] = field(default_factory=lambda: ["fifo", "sis"])
    baselines: list[int] = field(default_factory=lambda: [4])
    detections: str | None = None
    images: bool = True
    overlays: int = 2


@dataclass
class LoggingConfig:
    """W&B runs offline unless WANDB_API_KEY (or `wandb login`) is configured; CSV logs always."""

    wandb: bool = True
    project: str = "mqsam2"
    entity: str | None = None


@dataclass
class FitConfig:
    """The whole pipeline: model -> data -> importance -> allocation -> quantize -> reconstruct -> eval -> export."""

    name: str = "demo"
    run_root: str = "runs"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: bool = True
