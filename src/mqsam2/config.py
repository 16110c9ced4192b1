"""One dataclass per pipeline stage; the YAML given to `python -m mqsam2.fit` maps onto `FitConfig`.

Choice fields are `Literal`s, so the parser lists the valid values; `__post_init__` checks what types cannot
(ranges, the bit budget), so a config is refused before any work. Fields marked `runtime` (metadata) do not
change a run's artifacts: a run directory may resume under a config that differs in them only.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser
from jsonargparse import ArgumentError as _ArgumentError

from mqsam2.allocation import check_budget, default_candidates
from mqsam2.errors import MQSAM2Error
from mqsam2.methods import get_method
from mqsam2.models import check_image_size, config_name
from mqsam2.quant.affine import check_bits
from mqsam2.quant.lsc import LSCConfig
from mqsam2.quant.swap import QuantConfig
from mqsam2.reconstruct.capture import CAPTURE_MODES
from mqsam2.reconstruct.hvq import HVQConfig
from mqsam2.reconstruct.units import UNIT_MODES

RUNTIME = {"runtime": True}  # field metadata: how a run is executed, not what it computes
VIDEO_LOSSES = ("mse", "hvq")


@dataclass
class ModelConfig:
    """SAM2 size (t, s, b+, l), release (2.1 or 2), Meta checkpoint (none: seeded random init)."""

    size: Literal["t", "s", "b+", "l"] = "t"
    version: str = "2.1"
    checkpoint: str | None = None
    image_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.version = str(self.version)  # YAML reads `version: 2.1` as a number
        config_name(self.size, self.version)
        if self.image_size is not None:
            check_image_size(self.image_size)


# the fewest each count may be: a run needs clips of frames at some size; images may be left out
DATA_COUNTS = {
    "synth_videos": 1,
    "synth_frames": 1,
    "synth_size": 1,
    "synth_images": 0,
    "calib_videos": 1,
    "calib_frames": 1,
    "calib_images": 0,
    "val_videos": 0,
    "val_frames": 1,
    "val_images": 0,
}


def check_count(option: str, value: int, least: int = 1) -> None:
    """A count below `least` (a negative number of clips, zero frames) is refused naming its option."""
    if value < least:
        raise MQSAM2Error(
            f"{option} is {value}: give {'a positive number' if least == 1 else f'at least {least}'}"
        )


@dataclass
class DataConfig:
    """Shards to read (folders, globs, brace patterns or paths, alone or in lists); without them, synthetic
    shards are generated under `root`."""

    root: str = "data/synth"
    video_shards: list[str] | None = None
    image_shards: list[str] | None = None
    val_video_shards: list[str] | None = None
    val_image_shards: list[str] | None = None
    synth_videos: int = 12
    synth_frames: int = 24
    synth_size: int = 256
    synth_images: int = 40
    # objects per synthetic clip, [fewest, most]: the shared trained SAM2 saw clips of 1-3 objects
    synth_objects: list[int] = field(default_factory=lambda: [2, 5])
    calib_videos: int = 8
    calib_frames: int = 20
    calib_images: int = 32
    calib_objects: int | None = None
    val_videos: int = 4
    val_frames: int = 24
    val_images: int = 8
    prompt: Literal["box", "mask", "point"] = "box"
    seed: int = 0

    def __post_init__(self) -> None:
        for key, least in DATA_COUNTS.items():
            check_count(f"data.{key}", getattr(self, key), least)
        if self.calib_objects is not None:
            check_count("data.calib_objects", self.calib_objects)
        objects = list(self.synth_objects)
        if len(objects) != 2 or not 1 <= objects[0] <= objects[1]:
            raise MQSAM2Error(
                f"data.synth_objects must be [fewest, most] with 1 <= fewest <= most, got {objects}"
            )


@dataclass
class AllocationConfig:
    """Eq. 6: `ilp` (exact, PuLP/CBC), `greedy` (the paper's heuristic) or `uniform` (every layer at target)."""

    method: Literal["ilp", "greedy", "uniform"] = "ilp"
    target_avg: float = 4.0
    candidates: list[int] = field(default_factory=lambda: [3, 4, 5])
    error: Literal["pow2", "pow4"] = "pow2"

    def __post_init__(self) -> None:
        for bits in self.candidates:
            check_bits(bits, "allocation.candidates")
        check_budget(self.candidates, self.target_avg, self.error, self.method)


Precision = Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"]


@dataclass
class ReconstructionConfig:
    """Block-wise reconstruction (method.md §5); `iters` per unit, Lightning Trainer settings alongside;
    `units` limits it to the named units (the others keep round-to-nearest); `capture` says how each unit's
    calibration tensors are produced (mqsam2.reconstruct.capture), `cache_*` where they live during its fit
    (mqsam2.reconstruct.placement: `cache_gb` is the GPU budget, default half of the free memory;
    `host_cache_gb` what one capture pass may hold in host memory, default half of the available).
    `video_loss: hvq` trains the memory attention layers and the memory encoder with Q-MiniSAM2's HVQ loss
    (`hvq` settings) instead of the plain output error; mode `lsc` learns Q-SAM2's statistical clipping and
    the weights (`lsc` settings)."""

    mode: Literal["qdrop", "brecq", "adaround", "lsc", "none"] = "qdrop"
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
    # A unit whose narrowest weight is k bits below the model's average width (rounded) learns for
    # iters x (1 + low_bit_iters x k): a mixed allocation's 3-bit layers get the iterations they need
    low_bit_iters: float = 0.0
    checkpoint_every: int = field(default=1000, metadata=RUNTIME)
    check_finite_every: int = field(default=100, metadata=RUNTIME)
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = field(default="auto", metadata=RUNTIME)
    devices: int | Literal["auto"] = field(default="auto", metadata=RUNTIME)
    strategy: str = field(default="auto", metadata=RUNTIME)
    # bf16/16 precisions also turn TF32 on for what runs in float32 during the steps
    precision: Precision = "32-true"
    cache_device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=RUNTIME)
    cache_gb: float | None = field(default=None, metadata=RUNTIME)
    cache_bf16: bool = True
    host_cache_gb: float | None = field(default=None, metadata=RUNTIME)
    capture: Literal["sequential", "shared", "replay"] = "sequential"
    compile: bool = field(default=False, metadata=RUNTIME)
    cuda_graphs: bool = field(default=True, metadata=RUNTIME)
    fused_kernels: bool = field(default=False, metadata=RUNTIME)
    # A unit whose output error ends above max_error_growth x its start stops the run, or with keep_rtn
    # keeps its round-to-nearest weights (recorded in units.jsonl and the model card). They only decide
    # about units still to come, so a stopped run may resume with them changed.
    max_error_growth: float = field(default=2.0, metadata=RUNTIME)
    on_blowup: Literal["stop", "keep_rtn"] = field(default="stop", metadata=RUNTIME)
    video_loss: Literal["mse", "hvq"] = "mse"
    hvq: HVQConfig = field(default_factory=HVQConfig)
    lsc: LSCConfig = field(default_factory=LSCConfig)

    def __post_init__(self) -> None:
        if self.mode not in UNIT_MODES:
            raise MQSAM2Error(
                f"reconstruction.mode {self.mode!r} is unknown: use one of {', '.join(UNIT_MODES)}"
            )
        if self.capture not in CAPTURE_MODES:
            raise MQSAM2Error(
                f"reconstruction.capture {self.capture!r} is unknown: use one of {', '.join(CAPTURE_MODES)}"
            )
        for key in ("iters", "act_iters", "batch_size", "checkpoint_every", "check_finite_every"):
            if getattr(self, key) is not None:
                check_count(f"reconstruction.{key}", getattr(self, key))
        if self.units is not None and not self.units:
            raise MQSAM2Error("reconstruction.units is empty: name units, or leave it out for all of them")
        for key in ("lr_rounding", "lr_act"):
            lr = getattr(self, key)
            if not 0.0 < lr <= 1.0:
                raise MQSAM2Error(
                    f"reconstruction.{key} {lr:g} must lie in (0, 1]: Adam's steps are about lr in size"
                )
        if not self.max_error_growth >= 1.0:
            raise MQSAM2Error(f"reconstruction.max_error_growth {self.max_error_growth:g} must be at least 1")
        if not 0.0 <= self.drop_prob < 1.0:
            raise MQSAM2Error(f"reconstruction.drop_prob {self.drop_prob} must lie in [0, 1)")
        if not self.low_bit_iters >= 0.0:
            raise MQSAM2Error(f"reconstruction.low_bit_iters {self.low_bit_iters:g} must be 0 or more")
        if self.video_loss not in VIDEO_LOSSES:
            raise MQSAM2Error(
                f"reconstruction.video_loss {self.video_loss!r} is unknown: use one of {', '.join(VIDEO_LOSSES)}"
            )


@dataclass
class EvaluationConfig:
    """The validation loop (SIS active) plus a comparison table: float, uniform W{b}A{b} baselines calibrated
    with the same observers (one per entry of `baselines`) and this run's model, under each memory policy."""

    enabled: bool = True
    memory: list[Literal["fifo", "sis", "mutual-kv"]] = field(default_factory=lambda: ["fifo", "sis"])
    baselines: list[int] = field(default_factory=lambda: [4])
    detections: str | None = None
    images: bool = True
    overlays: int = 2

    def __post_init__(self) -> None:
        for bits in self.baselines:
            check_bits(bits, "evaluation.baselines")
        check_count("evaluation.overlays", self.overlays, least=0)


@dataclass
class RecipeConfig:
    """A registered method (`mqsam2.methods`) in place of the paper's recipe that `allocation` spells out, run
    as a compare row runs it: `bits` is a uniform method's width (WbAb; `act_bits` gives the inputs their own,
    WbAa) or a mixed method's Avg-b target over `candidates` ({b-1, b, b+1} unless given), `activations` a
    mixed method's activation mode, `iters` the reconstruction's iterations per unit (0: calibration only)."""

    method: str | None = None
    bits: float = 4
    candidates: list[int] | None = None
    act_bits: int | None = None
    activations: Literal["shared", "fixed", "separate"] | None = None
    iters: int | None = None

    def __post_init__(self) -> None:
        if self.method is None:
            given = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]
            if given:
                raise MQSAM2Error(
                    f"recipe.{given[0]} needs recipe.method: name a registered method, or leave recipe out"
                )
            return
        try:
            method = get_method(self.method)
        except MQSAM2Error as exc:
            raise MQSAM2Error(f"recipe.method: {exc}") from None
        if not method.mixed:
            for key in ("candidates", "activations"):
                if getattr(self, key) is not None:
                    raise MQSAM2Error(f"recipe.{key} applies to mixed methods; {method.name} is uniform")
            if self.bits != int(self.bits):
                raise MQSAM2Error(
                    f"recipe.bits {self.bits:g}: {method.name} is uniform, give a whole width in 2..8"
                )
            check_bits(int(self.bits), "recipe.bits")
            if self.act_bits is not None:
                check_bits(self.act_bits, "recipe.act_bits")
        else:
            if self.act_bits is not None:
                raise MQSAM2Error(
                    f"recipe.act_bits applies to uniform methods; {method.name} allocates input widths itself"
                )
            for bits in self.candidates or []:
                check_bits(bits, "recipe.candidates")
            widths = sorted(self.candidates or default_candidates(self.bits))
            if not widths or not widths[0] <= self.bits <= widths[-1]:
                raise MQSAM2Error(
                    f"recipe.bits {self.bits:g} is not an average {method.name} can reach with candidates "
                    f"{widths}: give recipe.bits in 2..8, or recipe.candidates around it"
                )
            check_budget(widths, self.bits)
        if self.iters is not None:
            check_count("recipe.iters", self.iters, least=0)


@dataclass
class LoggingConfig:
    """W&B runs offline unless WANDB_API_KEY (or `wandb login`) is configured; CSV logs always."""

    wandb: bool = True
    project: str = "mqsam2"
    entity: str | None = None


@dataclass
class FitConfig:
    """The whole pipeline: model -> data -> importance -> allocation -> quantize -> reconstruct -> eval -> export."""

    name: str = field(default="demo", metadata=RUNTIME)
    run_root: str = field(default="runs", metadata=RUNTIME)
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, metadata=RUNTIME)
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata=RUNTIME)
    export: bool = field(default=True, metadata=RUNTIME)

    def __post_init__(self) -> None:
        if not self.name or Path(self.name).name != self.name or self.name in (".", ".."):
            raise MQSAM2Error(f"name {self.name!r} must be a plain directory name (no '/'): runs/<name>/")
        if self.recipe.method is not None:
            check_recipe_run(self)


# what a recipe's method decides, so a recipe run refuses them set: (section, keys; None: all of them)
METHOD_DECIDES = {
    "allocation": None,
    "quant": ("weight_observer", "act_observer"),
    "reconstruction": ("mode", "video_loss"),
}


def check_recipe_run(config: FitConfig) -> None:
    """A recipe run's method decides the allocation, the observers and the reconstruction mode: a config that
    also sets them, or that exports a model the packed format cannot hold, is refused before any work."""
    method = get_method(config.recipe.method)
    if not method.quantizes:
        raise MQSAM2Error(f"recipe.method {method.name} quantizes nothing: name a quantization method")
    for section, keys in METHOD_DECIDES.items():
        changed = [k for k in changed_identity(getattr(config, section)) if keys is None or k in keys]
        if changed:
            raise MQSAM2Error(
                f"{section}.{changed[0]} is decided by recipe.method {method.name}: leave it out, or leave "
                "recipe out to run the paper's recipe"
            )
    if config.export and not method.exportable:
        raise MQSAM2Error(
            f"recipe.method {method.name} makes a model the packed export cannot hold (docs/export.md): "
            "set export: false"
        )


def config_dict(config: FitConfig) -> dict:
    """The config as plain YAML-able data (what config.yaml holds)."""
    payload = dataclasses.asdict(config)
    payload["quant"]["keep_fp"] = list(payload["quant"]["keep_fp"])
    return payload


def resume_identity(config) -> dict:
    """The fields of a config dataclass (recursively) that define a run's artifacts: all but `runtime` ones."""
    identity = {}
    for f in dataclasses.fields(config):
        if not f.metadata.get("runtime"):
            value = getattr(config, f.name)
            identity[f.name] = resume_identity(value) if dataclasses.is_dataclass(value) else value
    return identity


def changed_identity(config) -> dict:
    """`resume_identity` without the fields left at their defaults (recursively): a key of stored results that
    survives new options, since an option added later at its default leaves the results as they were."""
    default = type(config)()
    changed = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("runtime"):
            continue
        if dataclasses.is_dataclass(value):
            nested = changed_identity(value)
            if nested:
                changed[f.name] = nested
        elif value != getattr(default, f.name):
            changed[f.name] = value
    return changed


def parser(prog: str = "python -m mqsam2.fit", description: str | None = None) -> ArgumentParser:
    """FitConfig's command line: every field as --section.key, plus --config files (YAML)."""
    cli = ArgumentParser(prog=prog, description=description, default_env=False, exit_on_error=False)
    cli.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    cli.add_class_arguments(FitConfig, as_group=False)
    return cli


def parse_config(argv: list[str] | None = None, prog: str = "python -m mqsam2.fit") -> FitConfig:
    """A validated FitConfig from command-line arguments (sys.argv[1:] when None); any problem is one
    MQSAM2Error line."""
    values = parse_arguments(parser(prog), argv, prog)
    return FitConfig(**{k: v for k, v in vars(values).items() if k in FitConfig.__dataclass_fields__})


def parse_arguments(cli: ArgumentParser, argv: list[str] | None, prog: str):
    """`cli`'s instantiated namespace for `argv`, or for sys.argv[1:] when None as under `python -m`: the
    --config files are checked first, so a broken file is named with its line, and every parser error is one
    MQSAM2Error line. `cli` must be built with `exit_on_error=False`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    for path in _config_files(argv):
        check_yaml(path)
    try:
        return cli.instantiate(cli.parse_args(argv))
    except _ArgumentError as error:
        raise MQSAM2Error(f"{one_line_parser_error(str(error))} (see {prog} --help)") from None


def load_config(path: str | Path) -> FitConfig:
    """The FitConfig of a YAML file (e.g. a run directory's config.yaml)."""
    return parse_config(["--config", str(path)])


def _config_files(argv: list[str]) -> list[str]:
    files = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    return files + [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]


def check_yaml(path: str | Path) -> None:
    """A config file that is missing, not valid YAML, empty or not a mapping of options is refused naming the
    file (and the line)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise MQSAM2Error(f"cannot read config file {path}: {exc.strerror}; check the path") from None
    try:
        options = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if context is not None and getattr(exc, "context", None):
            problem = f"{exc.context} from line {context.line + 1}: {problem}"
        raise MQSAM2Error(f"{where}: invalid YAML ({problem}); fix the file") from None
    if options is None:
        raise MQSAM2Error(f"{path}: the config file is empty; write options into it (see configs/demo.yaml)")
    if not isinstance(options, dict):
        raise MQSAM2Error(
            f"{path}: a config file holds options as `key: value` lines, not a {type(options).__name__}; "
            "fix the file (see configs/demo.yaml)"
        )


def one_line_parser_error(message: str) -> str:
    """jsonargparse's multi-line messages as one line: the key, the value and what it should be."""
    key = re.match(r'Parser key "([^"]+)":', message)
    expected = re.findall(r"Expected a (?:typing\.)?(.+?)(?:\. Got value: (.*))?$", message, re.MULTILINE)
    given = re.search(r"(?:Got value|Given value): (.*)$", message, re.MULTILINE)
    if key and expected and given:
        choices = [_describe_type(kind) for kind, _ in expected]
        return f"{key.group(1)}: {given.group(1).strip()!r} is not {' or '.join(choices)}"
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _describe_type(kind: str) -> str:
    literal = re.fullmatch(r"Literal\[(.*)\]", kind.strip())
    if literal:
        return f"one of {', '.join(v.strip().strip(chr(39)) for v in literal.group(1).split(','))}"
    simple = re.fullmatch(r"<class '(\w+)'>", kind.strip())
    return f"a{'n' if simple and simple.group(1)[0] in 'aeiou' else ''} {simple.group(1)}" if simple else kind
