"""Memory policies by name: the predictor class hydra builds, and switching a built model between them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from mqsam2.errors import MQSAM2Error
from mqsam2.memory.mutual_kv import MutualKVVideoPredictor
from mqsam2.memory.predictor import VideoPredictor
from mqsam2.memory.sis import SISVideoPredictor

MEMORY_POLICIES: dict[str, type[VideoPredictor]] = {
    "fifo": VideoPredictor,  # stock SAM2: conditioning frames + the num_maskmem - 1 most recent frames
    "sis": SISVideoPredictor,
    "mutual-kv": MutualKVVideoPredictor,  # FIFO's frames, similar recent ones sharing one key/value (Q-MiniSAM2)
}


def policy_class(name: str) -> type[VideoPredictor]:
    try:
        return MEMORY_POLICIES[name]
    except KeyError:
        raise MQSAM2Error(
            f"unknown memory policy {name!r}: use one of {', '.join(MEMORY_POLICIES)}"
        ) from None


def policy_target(name: str) -> str:
    """The hydra `_target_` of a policy's predictor class."""
    cls = policy_class(name)
    return f"{cls.__module__}.{cls.__qualname__}"


def policy_name(model: VideoPredictor) -> str:
    for name, cls in MEMORY_POLICIES.items():
        if type(model) is cls:
            return name
    raise MQSAM2Error(
        f"{type(model).__name__} is not a memory-policy predictor: build it with mqsam2.models.build_sam2"
    )


def set_memory_policy(model: VideoPredictor, name: str, **options) -> None:
    """Switch a built (e.g. already quantized) predictor to another policy in place, without rebuilding.

    The policies share every module and differ only in how memories are chosen, so this swaps the class (as
    torch.nn.utils.parametrize does) and applies the options; one set of quantized weights can then be
    evaluated with SIS on and off.
    """
    policy_name(model)
    cls = policy_class(name)
    configure = getattr(cls, "configure_memory", None)
    if configure is None and options:
        raise MQSAM2Error(f"memory policy {name!r} takes no options, got {', '.join(options)}")
    model.__class__ = cls
    if configure is not None:
        configure(model, **options)


@contextmanager
def using_memory_policy(model: VideoPredictor, name: str | None, **options) -> Iterator[VideoPredictor]:
    """Run a block under another memory policy and restore the model's own afterwards (None: leave it)."""
    if name is None:
        yield model
        return
    saved_class, saved_options = type(model), getattr(model, "memory_options", None)
    set_memory_policy(model, name, **options)
    try:
        yield model
    finally:
        model.__class__ = saved_class
        if saved_options is not None:
            model.memory_options = saved_options
