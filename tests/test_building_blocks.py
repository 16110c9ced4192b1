"""Small pieces added for speed and benchmarks, each against an independent truth."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils._pytree import tree_flatten

from mqsam2.allocation import allocate
from mqsam2.data.loaders import IMAGENET_MEAN, IMAGENET_STD
from mqsam2.data.stream import SyntheticStream
from mqsam2.errors import MQSAM2Error
from mqsam2.importance import LayerImportance
from mqsam2.quant.quantizer import ActQuantizer
from mqsam2.reconstruct.cache import Batch


def test_stream_draws_the_disk_its_mask_describes():
    """Inside the mask every pixel is the disk's colour (normalised as sam2 expects); the centre follows the
    Lissajous formula at t = 100."""
    stream = SyntheticStream(200, image_size=64, video_size=(64, 64), device=torch.device("cpu"))
    mask = stream.mask(100)
    cy, cx = 64 * (0.5 + 0.3 * math.sin(100 / 47)), 64 * (0.5 + 0.35 * math.sin(100 / 29 + 1))
    assert mask[round(cy), round(cx)]
    frame = stream[100] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    inner = (
        mask
        & torch.roll(mask, 1, 0)
        & torch.roll(mask, -1, 0)
        & torch.roll(mask, 1, 1)
        & torch.roll(mask, -1, 1)
    )
    torch.testing.assert_close(frame[:, inner].mean(dim=1), torch.tensor([0.9, 0.2, 0.1]), atol=1e-5, rtol=0)


def test_batch_tensors_refill_in_order():
    """with_tensors(tensors()) gives back the batch; new tensors land where the old ones were, non-tensors stay."""
    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    spec = tree_flatten(((a, 7), {}))[1]
    batch = Batch([a, 7], [b, 7], spec, [c], spec)
    assert [t is x for t, x in zip(batch.tensors(), (a, b, c), strict=True)] == [True] * 3
    new = [torch.full((1,), 5.0), torch.full((2,), 6.0), torch.full((3,), 8.0)]
    refilled = batch.with_tensors(new)
    assert (
        refilled.inputs_q[0] is new[0] and refilled.inputs_fp[0] is new[1] and refilled.targets[0] is new[2]
    )
    assert refilled.inputs_q[1] == 7 and refilled.inputs_fp[1] == 7


def test_layers_per_width_counts_the_plan():
    importance = {f"l{i}": LayerImportance(float(i + 1), 100 * (i + 1)) for i in range(6)}
    allocation = allocate(importance, target_avg=4, candidates=[3, 4, 5])
    assert allocation.layers_per_width == dict(sorted(Counter(allocation.plan.values()).items()))


def test_loading_an_uncalibrated_state_makes_a_quantizer_refuse_again():
    """Readiness is cached on the module; a loaded state dict must re-decide it from its `initialized` flag."""
    quantizer = ActQuantizer(4)
    blank = {k: v.clone() for k, v in quantizer.state_dict().items()}
    quantizer.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    with torch.no_grad():
        quantizer(torch.randn(8))
    quantizer.load_state_dict(blank)
    with pytest.raises(MQSAM2Error, match="never calibrated"), torch.no_grad():
        quantizer(torch.randn(8))
