"""Q-MiniSAM2's HVQ loss: the triplet term against PyTorch's, the frame windows against brute force, the whole
objective against its formula, and the frame positions a real capture records."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader

from mqsam2.config import ReconstructionConfig
from mqsam2.data import calibration_set, ensure_synth
from mqsam2.errors import MQSAM2Error
from mqsam2.evaluate import clip_prompts
from mqsam2.models import build_sam2
from mqsam2.quant import QuantConfig, calibration
from mqsam2.quant.modules import QuantLinear
from mqsam2.reconstruct.cache import Call, UnitCache, record_calls
from mqsam2.reconstruct.hvq import FrameTimeline, HierarchicalVideoLoss, HVQConfig, triplet_loss
from mqsam2.reconstruct.module import UnitReconstruction
from mqsam2.reconstruct.units import Unit
from mqsam2.workload import Workload

MEMORY_LAYER = "memory_attention.layers.0"


@pytest.mark.parametrize("margin", [0.2, 1.0, 5.0])
def test_triplet_loss_matches_torch(margin):
    """Rows are flattened to vectors; PyTorch adds eps = 1e-6 inside each distance, which moves a distance of
    order 4 (12 standard-normal differences) by at most 1e-6 * sqrt(12): rtol 1e-5 covers it."""
    generator = torch.Generator().manual_seed(0)
    anchor, positive, negative = (torch.randn(16, 3, 4, generator=generator) for _ in range(3))
    negative[:4] = anchor[:4] + 0.01 * negative[:4]  # hard negatives, so the hinge is active on some rows
    expected = F.triplet_margin_loss(
        anchor.flatten(1), positive.flatten(1), negative.flatten(1), margin=margin
    )
    torch.testing.assert_close(
        triplet_loss(anchor, positive, negative, margin), expected, rtol=1e-5, atol=1e-6
    )


def _interleaved_positions(clips=2, objects=2, frames=range(1, 20)):
    """SAM2's order: clip by clip, frame by frame, the objects of a frame one after another."""
    return [(c, t) for c in range(clips) for t in frames for _ in range(objects)]


@pytest.mark.parametrize(("nearest", "farthest"), [(1, 6), (7, 16), (1, 1)])
def test_timeline_candidates_are_the_earlier_frames_of_the_same_object(nearest, farthest):
    positions = [*_interleaved_positions(), None]
    timeline = FrameTimeline(positions)
    for index, position in enumerate(positions):
        if position is None:
            assert timeline.candidates(index, nearest, farthest) == []
            continue
        clip, t = position
        obj = positions[:index].count(position)
        expected = [
            j
            for j, other in enumerate(positions)
            if other is not None
            and other[0] == clip
            and positions[:j].count(other) == obj
            and t - farthest <= other[1] <= t - nearest
        ]
        assert sorted(timeline.candidates(index, nearest, farthest)) == expected


def test_timeline_draws_every_candidate_and_nothing_else():
    timeline = FrameTimeline(_interleaved_positions(clips=1, objects=1))
    index = 15  # frame 16: temporal window holds frames 10..15
    torch.manual_seed(0)
    draws = {timeline.draw(index, 1, 6) for _ in range(200)}
    assert draws == set(timeline.candidates(index, 1, 6)) and len(draws) == 6
    assert timeline.draw(0, 1, 6) is None  # frame 1 has no earlier frame in the list


def _toy_cache(unit: nn.Module, frames: int = 6) -> UnitCache:
    """One clip, one object, frames 0..frames-1 through a toy unit; float targets from a perturbed copy."""
    generator = torch.Generator().manual_seed(1)
    reference = copy.deepcopy(unit)
    with torch.no_grad():
        reference.weight.add_(0.1 * torch.randn(reference.weight.shape, generator=generator))
    quant_calls, float_calls = [], []
    for t in range(frames):
        x = torch.randn(1, 5, generator=generator)
        _, spec = tree_flatten(((x,), {}))
        with torch.no_grad():
            y = reference(x)
        _, out_spec = tree_flatten(y)
        quant_calls.append(Call([x], spec, [], out_spec, (0, t)))
        float_calls.append(Call([x.clone()], spec, [y], out_spec, (0, t)))
    return UnitCache(quant_calls, float_calls, batchable=True, unit_name="memory_encoder")


def test_hvq_objective_is_the_papers_formula():
    """Windows of one frame each (l_short 1, l_long 2) make the partners certain: t-1 and t-2."""
    unit = nn.Linear(5, 3)
    cache = _toy_cache(unit)
    config = HVQConfig(alpha=1.0, beta=0.5, gamma=0.4, l_short=1, l_long=2, margin=2.0)
    loss = HierarchicalVideoLoss(config, cache)

    def run(indices):
        batch = cache.batch(indices)
        return [unit(batch.inputs_q[0])]

    indices = [1, 4, 5]
    batch = cache.batch(indices)
    outputs, targets = run(indices), batch.targets
    rec = (outputs[0] - targets[0]).pow(2).sum(-1).mean()
    got = loss(indices, outputs, targets, rec, run)

    anchor, positive = targets[0], outputs[0]
    temporal = F.triplet_margin_loss(anchor, positive, run([0, 3, 4])[0], margin=2.0)
    semantic = F.triplet_margin_loss(anchor[1:], positive[1:], run([2, 3])[0], margin=2.0)  # frame 1 has none
    expected = 1.0 * temporal + 0.5 * semantic + 0.4 * rec
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got.backward()
    assert unit.weight.grad is not None and unit.weight.grad.abs().sum() > 0


def test_hvq_settings_are_checked():
    with pytest.raises(MQSAM2Error, match="l_short < l_long"):
        HVQConfig(l_short=6, l_long=6)
    with pytest.raises(MQSAM2Error, match="video_loss"):
        ReconstructionConfig(video_loss="triplet")


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    shards = ensure_synth(tmp_path_factory.mktemp("synth"), videos=2, frames=6, size=256, images=2)
    data = calibration_set(shards.videos, shards.images, 2, 5, 2, image_size=256, seed=0)
    return Workload(data.videos, data.images, max_objects=1)


def test_recorded_video_calls_know_their_frame(workload):
    """Memory attention runs on every frame after the prompt frame, the memory encoder on the prompt frame
    too, each call once per (clip, frame); the image passes after the clips have no position."""
    model = build_sam2("t", image_size=256)
    with (
        record_calls(model.memory_attention.layers[0]) as attention,
        record_calls(model.memory_encoder) as encoder,
        record_calls(model.image_encoder.neck) as neck,
    ):
        workload.run_full(model)
    prompt_frames = [next(iter(clip_prompts(c, "box", 1).values())).frame for c in workload.videos]
    for calls, first in ((attention, 1), (encoder, 0)):
        expected = [
            (clip, t)
            for clip, start in enumerate(prompt_frames)
            for t in range(start + first, len(workload.videos[clip].frames))
        ]
        # clips of equal length track in one batch, so their calls interleave frame by frame
        assert sorted(call.position for call in calls) == expected
    images = len(workload.images)
    assert all(call.position is None for call in neck[-images:])
    assert all(call.position is not None for call in neck[:-images])


def test_reconstruction_steps_train_on_the_hvq_objective(tmp_path):
    """A toy video unit (one quantized Linear) fitted for a few steps: every step's loss is the HVQ objective
    of the step's own samples, and learning moves the rounding variables."""
    layer = QuantLinear.from_float(nn.Linear(5, 3), bits=4, act_bits=4)
    module = nn.Sequential(layer)
    cache = _toy_cache(nn.Linear(5, 3))
    with calibration(module, QuantConfig(bits=4)):
        module(torch.cat([c.inputs[0] for c in cache.quant]))
    unit = Unit("memory_encoder", module, {"memory_encoder.0": layer})
    layer.weight_quantizer.start_adaround(layer.weight)
    start = layer.weight_quantizer.alpha.detach().clone()
    hvq = HierarchicalVideoLoss(HVQConfig(l_short=1, l_long=3), cache)
    seen = []

    def objective(indices, *args):
        seen.append(list(indices))
        return hvq(indices, *args)

    fit = UnitReconstruction(unit, cache, max_steps=6, drop_prob=0.0, objective=objective)
    fit.batch_size = 2
    trainer = L.Trainer(
        max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(fit, DataLoader(range(6), batch_size=None))
    assert seen == [cache.indices(step, 2, 0) for step in range(6)]
    assert not torch.equal(layer.weight_quantizer.alpha.detach(), start)
