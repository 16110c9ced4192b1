"""Where in the calibration videos a recorded unit call comes from: (clip, frame).

Losses that compare a frame with earlier frames of the same clip (Q-MiniSAM2's hierarchy-based video loss) need
each cached sample's place in time. SAM2's video predictor fetches a frame's image features right before it
runs memory attention and the memory encoder on that frame (`_get_image_feature(state, frame_idx, ...)` in
both `_run_single_frame_inference` and `_run_memory_encoder`), so the frame of the last fetch is the frame
of every unit call that follows it. The workload marks each clip it tracks; the unit recorder reads the
position at call time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

from torch import nn

Position = tuple[int, int]  # (clip index in the workload, frame index in the clip)

_CLIP: ContextVar[int | None] = ContextVar("mqsam2_clip", default=None)
_FRAME: ContextVar[int | None] = ContextVar("mqsam2_frame", default=None)
# (clip, frame) of each batch row of the batched tracker's call in progress (`mqsam2.memory.batched`)
_ROWS: ContextVar[tuple[Position, ...] | None] = ContextVar("mqsam2_batch_rows", default=None)


def current_rows() -> tuple[Position, ...] | None:
    """(clip, frame) of every batch row of the batched tracking call in progress, or None outside one: recorders
    split such a call into the per-object calls of the one-object-at-a-time tracker, and per-input quantizers
    take one range per row."""
    return _ROWS.get()


@contextlib.contextmanager
def batch_rows(rows: Sequence[Position]) -> Iterator[None]:
    """Inside the block, each batch row of SAM2's calls is the track at (clip, frame) `rows[i]`."""
    token = _ROWS.set(tuple(rows))
    try:
        yield
    finally:
        _ROWS.reset(token)


def current_position() -> Position | None:
    """(clip, frame) of the SAM2 call in progress, or None outside a tracked clip (images, encoder passes)."""
    clip, frame = _CLIP.get(), _FRAME.get()
    return None if clip is None or frame is None else (clip, frame)


@contextlib.contextmanager
def tracking_clip(model: nn.Module, clip: int) -> Iterator[None]:
    """While `model` tracks clip number `clip`, unit calls are tagged with (clip, frame being processed).

    The frame is read off the predictor's own image-feature fetch, wrapped on this instance only for the block.
    """
    fetch = model._get_image_feature

    def tagged_fetch(state, frame_idx, batch_size):
        _FRAME.set(int(frame_idx))
        return fetch(state, frame_idx, batch_size)

    clip_token, frame_token = _CLIP.set(clip), _FRAME.set(None)
    model._get_image_feature = tagged_fetch
    try:
        yield
    finally:
        del model._get_image_feature
        _FRAME.reset(frame_token)
        _CLIP.reset(clip_token)
