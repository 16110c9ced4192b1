"""Batched tracking (`mqsam2.memory.batched`) against sam2's own one-object-at-a-time video predictor."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import pytest
import torch

from mqsam2 import workload as workload_module
from mqsam2.evaluate import clip_prompts
from mqsam2.memory.batched import batched_tracking_supported, track_clips
from mqsam2.memory.policies import using_memory_policy
from mqsam2.models import build_sam2
from mqsam2.quant import quantize
from mqsam2.quant.quantizer import ActQuantizer
from mqsam2.quant.swap import QuantConfig, calibration
from mqsam2.reconstruct.capture import record_units
from mqsam2.reconstruct.positions import batch_rows, current_rows
from mqsam2.workload import Workload

from .eval_data import EVAL_IMAGE_SIZE, make_clip

# A random-init model's mask logits sit near zero, so a different batch size (another BLAS path) may flip the odd
# pixel; a trained model's rarely. The bound is far below what any semantic difference (a wrong memory, a
# missing prompt) changes.
PIXEL_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def model():
    return build_sam2("t", image_size=EVAL_IMAGE_SIZE)


def starting_late(clip, frames: int):
    """The clip with every object hidden on its first `frames` frames: its prompts and propagation start there."""
    masks = clip.masks.clone()
    masks[:, :frames] = False
    return dataclasses.replace(clip, masks=masks)


def entering_late(clip, row: int, frames: int):
    """The clip with one object hidden on its first `frames` frames: tracked from the clip's start with only
    its future prompt frame in memory (no object pointer yet), as sam2 does."""
    masks = clip.masks.clone()
    masks[row, :frames] = False
    return dataclasses.replace(clip, masks=masks)


def clips_of_mixed_layouts():
    """Clips of two lengths, one to three objects, one clip whose tracking starts at frame 2, one whose second
    object enters at frame 3 and one of another video size: several batch groups, and groups spanning clips."""
    return [
        entering_late(make_clip("e", num_frames=6, num_objects=2, seed=4), 1, 3),
        make_clip("a", num_frames=6, num_objects=3, seed=0),
        starting_late(make_clip("b", num_frames=6, num_objects=2, seed=1), 2),
        make_clip("c", num_frames=6, num_objects=1, seed=2, orig_size=(40, 56)),
        make_clip("d", num_frames=5, num_objects=2, seed=3),
    ]


def one_at_a_time(model, clip, prompts):
    """sam2's path: `propagate_in_video` tracks each object alone."""
    tracked = model.track_clip(clip.frames, tuple(int(v) for v in clip.orig_size), prompts)
    masks = torch.zeros_like(clip.masks)
    masks[[list(clip.obj_ids).index(obj_id) for obj_id in prompts]] = tracked
    return masks


@pytest.mark.parametrize("kind", ["box", "point"])
def test_batched_masks_equal_one_object_at_a_time(model, kind):
    clips = clips_of_mixed_layouts()
    prompts = [clip_prompts(clip, kind) for clip in clips]
    assert batched_tracking_supported(model, prompts)
    batched = track_clips(model, clips, prompts, batch_objects=4, encoder_batch=3)
    for clip, clip_prompts_, masks in zip(clips, prompts, batched, strict=True):
        reference = one_at_a_time(model, clip, clip_prompts_)
        assert masks.shape == reference.shape and masks.dtype == torch.bool
        assert reference.any(), "the reference must predict something for the comparison to mean anything"
        mismatch = (masks.cpu() != reference).float().mean().item()
        assert mismatch <= PIXEL_TOLERANCE, f"clip {clip.video_id}: {mismatch:.2%} of pixels differ"
        start = min(p.frame for p in clip_prompts_.values())
        assert not masks[:, :start].any(), "frames before a clip's first prompt stay empty"


def test_the_naive_dynamic_quantizer_takes_one_range_per_batch_row():
    """Inside the batched tracker each batch row is quantized with its own range, as the one-object tracker
    quantizes that object's call alone; outside it (or on an input the rows share) the whole input's range."""
    quantizer = ActQuantizer(4)
    quantizer.make_dynamic()
    rows = torch.randn(3, 5, 7) * torch.tensor([0.1, 1.0, 10.0]).view(3, 1, 1)
    with batch_rows([(0, 0), (1, 0), (2, 0)]):
        batched = quantizer(rows)
        shared = quantizer(rows[0, :2])  # dim 0 is not the batch: one range
    alone = torch.cat([quantizer(row[None]) for row in rows])
    torch.testing.assert_close(batched, alone, rtol=0, atol=0)
    torch.testing.assert_close(shared, quantizer(rows[0, :2]), rtol=0, atol=0)
    assert not torch.equal(quantizer(rows), alone), "one range for the whole batch would differ"


def test_every_dynamic_input_in_batched_tracking_is_batched_by_track_or_shared(model):
    """The per-row range above is per object only if every quantized input of a tracking step carries the
    tracks in dim 0: all of them do but the object-pointer time encoding, which every track shares (the image
    encoder, which merges frames and windows in dim 0, encodes one frame per call for such a model)."""
    dynamic = copy.deepcopy(model)
    config = QuantConfig(bits=4, act_observer="dynamic", quantize_attention=True)
    quantize(dynamic, config)
    with calibration(dynamic, config):
        pass
    seen_unbatched = set()

    def check(name):
        def hook(_module, args):
            rows = current_rows()
            if rows is not None and len(rows) > 1 and args[0].shape[0] != len(rows):
                seen_unbatched.add(name)

        return hook

    for name, module in dynamic.named_modules():
        if isinstance(module, ActQuantizer):
            module.register_forward_pre_hook(check(name))
    clips = clips_of_mixed_layouts()
    track_clips(dynamic, clips, [clip_prompts(clip) for clip in clips], encoder_batch=2)
    assert seen_unbatched == {"obj_ptr_tpos_proj.input_quantizer"}


def test_policies_that_couple_objects_or_read_the_bank_track_one_at_a_time(model):
    prompts = [clip_prompts(make_clip(num_frames=4, seed=3))]
    with using_memory_policy(model, "sis"):
        assert not batched_tracking_supported(model, prompts)
    mask_prompts = [clip_prompts(make_clip(num_frames=4, seed=3), "mask")]
    assert not batched_tracking_supported(model, mask_prompts)


def test_recorded_unit_calls_split_per_object_with_their_positions(model, monkeypatch):
    """A calibration pass records the calls the one-object tracker makes: as many, at the same (clip, frame)
    positions, with the same inputs."""
    clips = clips_of_mixed_layouts()[:2]
    workload = Workload(videos=clips, images=[])
    names = ["memory_attention.layers.0", "memory_encoder", "sam_mask_decoder"]
    with record_units(model, names) as batched:
        workload.run_full(model)
    monkeypatch.setattr(workload_module, "batched_tracking_supported", lambda *_: False)
    with record_units(model, names) as single:
        workload.run_full(model)
    for name in names:
        assert len(batched[name]) == len(single[name]) > 0
        assert sorted(c.position for c in batched[name]) == sorted(c.position for c in single[name])
        assert {c.inputs[0].shape[0] for c in batched[name]} == {1}
        unmatched = [c.inputs[0] for c in single[name]]
        for call in batched[name]:
            # the one-object call with the same first input (objects of one position differ in their prompt)
            distances = [
                (call.inputs[0] - x).abs().max().item() if x.shape == call.inputs[0].shape else 1e9
                for x in unmatched
            ]
            best = min(range(len(distances)), key=distances.__getitem__)
            assert distances[best] < 1e-3, f"{name}: a batched call has no one-object counterpart"
            unmatched.pop(best)


def test_a_lazy_clip_set_is_decoded_once_per_clip(model):
    """A validation set decodes a clip on every access (`LazySamples`); tracking 16 frames must not decode it 16
    times (on the GPU that turned a 10-second evaluation into five minutes)."""
    clips = clips_of_mixed_layouts()
    reads = []

    class Lazy(Sequence):
        def __len__(self):
            return len(clips)

        def __getitem__(self, index):
            if index >= len(clips):
                raise IndexError(index)
            reads.append(index)
            return clips[index]

    track_clips(model, Lazy(), [clip_prompts(clip) for clip in clips])
    assert sorted(reads) == list(range(len(clips)))
