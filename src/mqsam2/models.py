"""Build SAM2 from sam2's own hydra configs, with Meta's checkpoints or a seeded random init."""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import torch
from hydra import compose
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor
from torch import Tensor

from mqsam2.errors import MQSAM2Error
from mqsam2.files import load_torch
from mqsam2.memory.policies import policy_target

log = logging.getLogger(__name__)

SIZES = ("t", "s", "b+", "l")
VERSIONS = ("2.1", "2")
_SIZE_ALIASES = {
    "t": "t", "tiny": "t",
    "s": "s", "small": "s",
    "b+": "b+", "b": "b+", "base": "b+", "base_plus": "b+", "base-plus": "b+",
    "l": "l", "large": "l",
}  # fmt: skip
VIDEO_PREDICTOR_TARGET = policy_target("fifo")  # the stock-SAM2 predictor
META_RELEASE = re.compile(
    r"sam2(\.1)?_hiera_(tiny|small|base_plus|large)\.pt"
)  # file names of Meta's checkpoints
META_PAGE = "Meta's SAM2 release page (github.com/facebookresearch/sam2, Model Checkpoints)"


def canonical_size(size: str) -> str:
    """Map user spellings (tiny, b, base_plus, ...) onto sam2's config suffixes."""
    try:
        return _SIZE_ALIASES[size.lower()]
    except KeyError:
        raise MQSAM2Error(f"unknown SAM2 size {size!r}: use one of {', '.join(SIZES)}") from None


def config_name(size: str, version: str = "2.1") -> str:
    """The packaged hydra config of sam2 for a size and release, e.g. configs/sam2.1/sam2.1_hiera_t.yaml."""
    version = str(version)
    if version not in VERSIONS:
        raise MQSAM2Error(f"unknown SAM2 version {version!r}: use 2.1 or 2")
    prefix = "sam2.1" if version == "2.1" else "sam2"
    return f"configs/{prefix}/{prefix}_hiera_{canonical_size(size)}.yaml"


def check_image_size(image_size: int) -> int:
    """SAM2's input size: a multiple of 32 (its feature strides) of at least 64."""
    if image_size % 32 or image_size < 64:
        raise MQSAM2Error(f"image_size {image_size} must be a multiple of 32 and at least 64")
    return image_size


def _cuda_postprocessing_available() -> bool:
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def hydra_overrides(
    image_size: int | None = None,
    video: bool = True,
    memory_overrides: dict | None = None,
    memory_policy: str = "fifo",
) -> list[str]:
    """The overrides sam2's own builders apply, plus ours (input size, predictor class, memory policy)."""
    overrides = [
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
        "++model.compile_image_encoder=false",
    ]
    if image_size is not None:
        feat = check_image_size(image_size) // 16
        overrides += [
            f"++model.image_size={image_size}",
            f"++model.memory_attention.layer.self_attention.feat_sizes=[{feat},{feat}]",
            f"++model.memory_attention.layer.cross_attention.feat_sizes=[{feat},{feat}]",
        ]
    if video:
        # sam2's hole filling needs its CUDA extension; without it sam2 warns on every frame and skips it.
        fill_holes = 8 if _cuda_postprocessing_available() else 0
        overrides += [
            f"++model._target_={policy_target(memory_policy)}",
            "++model.binarize_mask_from_pts_for_mem_enc=true",
            f"++model.fill_hole_area={fill_holes}",
        ]
        for key, value in (memory_overrides or {}).items():
            overrides.append(f"++model.{key}={value}")
    return overrides


def _instantiate(config: str, overrides: list[str]) -> torch.nn.Module:
    cfg = compose(config_name=config, overrides=overrides)
    OmegaConf.resolve(cfg)
    try:
        return instantiate(cfg.model, _recursive_=True)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, MQSAM2Error):  # e.g. invalid memory-policy options: keep our message
            raise exc.__cause__ from None
        raise


@functools.cache
def _expected_shapes(config: str) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a config (a CPU build: sam2's Hiera cannot be built on the meta device)."""
    with torch.random.fork_rng(devices=[]):
        model = _instantiate(config, hydra_overrides(video=False))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def matching_configs(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Every packaged config whose keys and shapes equal the checkpoint's: names the right one on a mismatch."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    return [
        config_name(size, version)
        for version in VERSIONS
        for size in SIZES
        if _expected_shapes(config_name(size, version)) == shapes
    ]


def load_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read Meta's checkpoint format `{"model": state_dict}` with clear errors for the usual mistakes: only a
    file named like one of Meta's releases is sent to Meta's page, any other (a trained model of this project,
    a fine-tune) to its path."""
    path = Path(path)
    meta = META_RELEASE.fullmatch(path.name) is not None
    if not path.is_file():
        fix = (
            f"download it from {META_PAGE}"
            if meta
            else f"check the path (relative paths start at {Path.cwd()})"
        )
        raise MQSAM2Error(f"SAM2 checkpoint not found: {path}; {fix}")
    fix = (
        f"download it again from {META_PAGE}"
        if meta
        else "copy it again, or give a file saved as {'model': state_dict}"
    )
    payload = load_torch(path, "SAM2 checkpoint", fix)
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise MQSAM2Error(f"{path} is not a SAM2 checkpoint: expected Meta's format {{'model': state_dict}}")
    return payload["model"]


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], config: str) -> None:
    """Strict key and shape check; the message names the config that fits the checkpoint, if any."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    if expected == got:
        return
    fits = matching_configs(state_dict)
    hint = f"it fits {', '.join(fits)}" if fits else "it fits no packaged SAM2 config"
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    detail = "; ".join(
        f"{label} {len(keys)} (e.g. {keys[0]})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    )
    raise MQSAM2Error(f"checkpoint does not match {config}: {detail}; {hint}")


def build_architecture(
    config: str,
    image_size: int | None = None,
    video: bool = True,
    seed: int = 0,
    memory_overrides: dict | None = None,
    memory_policy: str = "fifo",
) -> SAM2Base:
    """The float architecture with sam2's seeded default init (weights are expected to be loaded next)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _instantiate(config, hydra_overrides(image_size, video, memory_overrides, memory_policy))
    model.mqsam2_config = config
    return model.eval()


def build_sam2(
    size: str = "t",
    checkpoint: str | Path | None = None,
    image_size: int | None = None,
    video: bool = True,
    seed: int = 0,
    *,
    version: str = "2.1",
    device: str | torch.device = "cpu",
    memory_overrides: dict | None = None,
    memory_policy: str = "fifo",
) -> SAM2Base:
    """The video predictor (`video=True`) or the base model, in eval mode.

    `memory_policy` picks the predictor class (`mqsam2.memory.MEMORY_POLICIES`: fifo = stock SAM2, sis);
    its options (e.g. `{"k": 3, "tau": 1.0}` for sis) go in `memory_overrides` and reach its constructor.

    Without a checkpoint the weights are a seeded random init: fine for tests, fidelity measurements and
    speed, meaningless for accuracy against ground truth.
    """
    config = config_name(size, version)
    state_dict = load_checkpoint_state(checkpoint) if checkpoint is not None else None
    model = build_architecture(config, image_size, video, seed, memory_overrides, memory_policy)
    if state_dict is None:
        log.warning(
            "RANDOM-INIT SAM2 (%s, seed %d): no checkpoint given, masks are meaningless against ground "
            "truth; pass a Meta checkpoint for real accuracy",
            config,
            seed,
        )
    else:
        check_state_dict(model, state_dict, config)
        model.load_state_dict(state_dict)
        log.info("loaded %s into %s", checkpoint, config)
    return model.to(device)


class TensorImagePredictor(SAM2ImagePredictor):
    """sam2's image predictor fed the data layer's tensors ([3, S, S], resized and normalised).

    `set_image` wants a raw uint8 image and resizes/normalises it itself, and sam2 hard-codes the 1024-px
    feature sizes; this runs the already-prepared tensor through the same backbone steps at the model's own
    size and keeps the original size for box transforms and mask upsampling.
    """

    def __init__(self, model: SAM2Base, **kwargs):
        super().__init__(model, **kwargs)
        size = model.image_size
        self._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]

    @torch.inference_mode()
    def set_image_tensor(self, image: Tensor, orig_hw: tuple[int, int]) -> None:
        size = self.model.image_size
        if image.shape != (3, size, size):
            raise MQSAM2Error(
                f"image must be [3, {size}, {size}] (the model's input size), got {list(image.shape)}"
            )
        self.reset_predictor()
        self._orig_hw = [tuple(int(v) for v in orig_hw)]
        image_embed, high_res_feats = image_features(self.model, image[None].to(self.device))
        self._features = {"image_embed": image_embed, "high_res_feats": high_res_feats}
        self._is_image_set = True


def image_features(model: SAM2Base, images: Tensor) -> tuple[Tensor, list[Tensor]]:
    """What sam2's image predictor keeps of prepared images [B, 3, S, S]: the image embedding (the no-memory
    embedding added) and the mask decoder's two high-resolution feature maps, all as [B, C, H, W]."""
    size = model.image_size
    feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
    backbone_out = model.forward_image(images)
    _, vision_feats, _, _ = model._prepare_backbone_features(backbone_out)
    if model.directly_add_no_mem_embed:
        vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
    feats = [
        f.permute(1, 2, 0).reshape(images.shape[0], -1, *hw)
        for f, hw in zip(vision_feats, feat_sizes, strict=True)
    ]
    return feats[-1], feats[:-1]
