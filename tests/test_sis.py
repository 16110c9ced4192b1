"""SIS: synthesis math on constructed features, the bank, and the predictor against stock SAM2VideoPredictor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from sam2.build_sam import build_sam2_video_predictor
from sam2.utils.misc import load_video_frames

from mqsam2.errors import MQSAM2Error
from mqsam2.memory import (
    MEMORY_POLICIES,
    MemoryBank,
    MemoryEntry,
    Prompt,
    SISVideoPredictor,
    VideoPredictor,
    policy_target,
    set_memory_policy,
    synthesize,
    using_memory_policy,
)
from mqsam2.memory.predictor import state_nbytes
from mqsam2.models import VIDEO_PREDICTOR_TARGET, build_sam2, hydra_overrides

from .eval_data import EVAL_IMAGE_SIZE, make_clip


def with_cosines(cosines: list[float], dim: int = 8, seed: int = 0) -> torch.Tensor:
    """Entries whose cosine to the last (reference) entry is given, with random norms: [len+1, dim]."""
    g = torch.Generator().manual_seed(seed)
    e0, e1 = torch.eye(dim)[0], torch.eye(dim)[1]
    older = [(c * e0 + math.sqrt(1 - c * c) * e1) * (0.5 + torch.rand(1, generator=g)) for c in cosines]
    return torch.stack([*older, 3 * e0])


# ---------------------------------------------------------------------------------------------- synthesize


@pytest.mark.parametrize("tau", [1.0, 0.25])
def test_synthesize_fuses_the_k_most_similar_with_softmax_weights(tau):
    cosines = [0.1, 0.9, -0.5, 0.7, 0.95]
    features = with_cosines(cosines)
    new, selected, weights = synthesize(features, k=3, tau=tau)
    assert selected.tolist() == [4, 1, 3]  # descending similarity to the reference
    expected_w = torch.softmax(torch.tensor([0.95, 0.9, 0.7]) / tau, dim=0)
    torch.testing.assert_close(weights, expected_w)
    fused = sum(w * features[i] for w, i in zip(expected_w, [4, 1, 3], strict=True))
    torch.testing.assert_close(new[0], fused)
    torch.testing.assert_close(new[1:], features[[0, 2, 5]])  # unselected in time order, then t-1
    assert new.shape == (len(features) - 3 + 1, features.shape[1])


def test_synthesize_keeps_dtype_with_fp32_math():
    features = with_cosines([0.2, 0.8, 0.6, 0.4], dim=64).to(torch.bfloat16)
    new, selected, weights = synthesize(features, k=2)
    assert new.dtype == torch.bfloat16 and weights.dtype == torch.float32
    exact = (weights[:, None] * features[selected].float()).sum(0)
    assert torch.equal(new[0], exact.to(torch.bfloat16))


def test_per_location_similarity_ranks_differently_from_flat():
    # Reference: e0 at both positions. A matches at one position and opposes at the other (tiny norm there):
    # flat cosine ~0.7 but per-location mean 0. B has cosine 0.5 at both positions.
    e0, e1 = torch.eye(2)
    ref = torch.stack([e0, e0], dim=-1)[..., None]  # [C=2, H=2, W=1]
    a = torch.stack([e0, -0.01 * e0], dim=-1)[..., None]
    b_vec = 0.5 * e0 + math.sqrt(0.75) * e1
    b = torch.stack([b_vec, b_vec], dim=-1)[..., None]
    features = torch.stack([a, b, ref])
    assert synthesize(features, k=1, similarity="flat")[1].tolist() == [0]
    assert synthesize(features, k=1, similarity="per_location")[1].tolist() == [1]


def test_synthesize_rejects_bad_settings():
    features = with_cosines([0.1, 0.2])
    for kwargs, words in (
        ({"k": 3}, "k < N"),
        ({"k": 1, "tau": 0}, "tau"),
        ({"k": 1, "similarity": "l2"}, "flat, per_location"),
    ):
        with pytest.raises(MQSAM2Error, match=words):
            synthesize(features, **kwargs)


# ---------------------------------------------------------------------------------------------- bank


def entry(frame: int, angle_deg: float) -> MemoryEntry:
    """A 2-D memory at a given angle: cosine similarity between entries is the cosine of their angle gap."""
    a = math.radians(angle_deg)
    return MemoryEntry(torch.tensor([math.cos(a), math.sin(a)]), torch.zeros(1), (frame,))


def test_bank_order_capacity_and_merged_frames():
    bank = MemoryBank(capacity=4, k=2)
    for frame, angle in enumerate([0, 80, 10, 85, 90]):
        bank.add(entry(frame, angle))
        assert len(bank) <= 4
    # Overflow at frame 4 (reference 90 deg): the two closest older entries are frames 3 (85) and 1 (80).
    assert [e.frames for e in bank.entries] == [(1, 3), (0,), (2,), (4,)]
    scores = torch.tensor([math.cos(math.radians(5)), math.cos(math.radians(10))])
    w = torch.softmax(scores, dim=0)
    expected = w[0] * entry(3, 85).features + w[1] * entry(1, 80).features
    torch.testing.assert_close(bank.entries[0].features, expected)
    # Next overflow (reference frame 5 at 5 deg): closest older entries are frame 0 (0) and frame 2 (10).
    bank.add(entry(5, 5))
    assert [e.frames for e in bank.entries] == [(0, 2), (1, 3), (4,), (5,)]


def test_bank_rejects_k_above_capacity():
    with pytest.raises(MQSAM2Error, match="k <= capacity"):
        MemoryBank(capacity=2, k=3)


# ---------------------------------------------------------------------------------------------- predictor


def write_jpegs(clip, folder) -> None:
    from .eval_data import render

    for t, frame in enumerate(render(clip.masks, seed=0)):
        array = (frame.permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(array).save(folder / f"{t:05d}.jpg", quality=95)


def run_prompts(predictor, state, clip) -> list[torch.Tensor]:
    predictor.add_new_points_or_box(state, 0, 1, box=Prompt.from_mask(0, clip.masks[0, 0]).box)
    predictor.add_new_mask(state, 0, 2, clip.masks[1, 0])
    return [logits.clone() for _, _, logits in predictor.propagate_in_video(state)]


@pytest.fixture(scope="module")
def stock_run(tmp_path_factory):
    """Stock SAM2VideoPredictor (sam2's own builder and JPEG loader) on a 12-frame clip; our frames tensor."""
    folder = tmp_path_factory.mktemp("jpegs")
    clip = make_clip(num_frames=12, orig_size=(40, 56), seed=3)
    write_jpegs(clip, folder)
    ours = build_sam2("t", image_size=EVAL_IMAGE_SIZE)
    # sam2's builder with the overrides ours applies (no hole filling: its CUDA extension is absent on CPU)
    extra = [
        *hydra_overrides(EVAL_IMAGE_SIZE, video=False),
        "++model.binarize_mask_from_pts_for_mem_enc=true",
        f"++model.fill_hole_area={ours.fill_hole_area}",
    ]
    stock = build_sam2_video_predictor(
        ours.mqsam2_config, device="cpu", hydra_overrides_extra=extra, apply_postprocessing=False
    )
    stock.load_state_dict(ours.state_dict())
    logits = run_prompts(stock, stock.init_state(str(folder)), clip)
    images, height, width = load_video_frames(
        str(folder), EVAL_IMAGE_SIZE, False, compute_device=torch.device("cpu")
    )
    return ours, clip, images, (height, width), logits


def test_fifo_equals_stock_sam2_bit_for_bit(stock_run):
    ours, clip, images, size, stock_logits = stock_run
    assert type(ours) is VideoPredictor and policy_target("fifo") == VIDEO_PREDICTOR_TARGET
    logits = run_prompts(ours, ours.init_state_from_frames(images, size), clip)
    assert len(logits) == 12
    assert all(torch.equal(a, b) for a, b in zip(logits, stock_logits, strict=True))


def test_sis_equals_stock_until_the_bank_first_overflows(stock_run):
    ours, clip, images, size, stock_logits = stock_run
    sis = build_sam2("t", image_size=EVAL_IMAGE_SIZE, memory_policy="sis")
    assert type(sis) is SISVideoPredictor and sis.memory_options.capacity == 6
    logits = run_prompts(sis, sis.init_state_from_frames(images, size), clip)
    # Frames 1..6 fill the bank (rank encodings equal SAM2's distances); frame 7 enters it on frame 8.
    assert all(torch.equal(logits[t], stock_logits[t]) for t in range(8))
    assert not torch.equal(logits[8], stock_logits[8])
    # The same weights switched to SIS in place give the hydra-built SIS model's outputs.
    with using_memory_policy(ours, "sis") as switched:
        assert type(switched) is SISVideoPredictor
        switched_logits = run_prompts(ours, ours.init_state_from_frames(images, size), clip)
    assert type(ours) is VideoPredictor
    assert all(torch.equal(a, b) for a, b in zip(switched_logits, logits, strict=True))


def test_sis_feeds_conditioning_frames_and_at_most_capacity_memories():
    clip = make_clip(num_frames=10, num_objects=1, seed=5)
    model = build_sam2(
        "t", image_size=EVAL_IMAGE_SIZE, memory_policy="sis", memory_overrides={"capacity": 3, "k": 2}
    )
    tokens_per_map = (EVAL_IMAGE_SIZE // 16) ** 2
    fed = []

    def count(module, args, kwargs, output):
        fed.append((kwargs["memory"].shape[0] - kwargs["num_obj_ptr_tokens"]) // tokens_per_map)

    handle = model.memory_attention.register_forward_hook(count, with_kwargs=True)
    state = model.init_state_from_frames(clip.frames, clip.orig_size)
    model.add_prompt(state, 1, Prompt.from_mask(0, clip.masks[0, 0]))
    model.add_prompt(
        state, 1, Prompt.from_mask(4, clip.masks[0, 4], kind="mask")
    )  # a second conditioning frame
    list(model.propagate_in_video(state))
    handle.remove()
    # Tracked (non-conditioning) frames 1-3, 5-9; before frame t the bank holds min(tracked so far, 3).
    tracked_before = [0, 1, 2, 3, 3, 3, 3, 3]
    assert fed == [2 + min(n, 3) for n in tracked_before]  # both conditioning frames, every time
    bank = state["output_dict_per_obj"][0]["mqsam2_sis_streams"][1].bank
    frames = [f for e in bank.entries for f in e.frames]
    assert len(bank) == 3 and 0 not in frames and 4 not in frames


def test_freeing_keeps_outputs_and_bounds_the_state():
    clip = make_clip(num_frames=12, num_objects=1, seed=6)
    window = 3  # a short object-pointer window and a small bank, so a 12-frame clip reaches the bound
    runs = {}
    for free in (False, True):
        model = build_sam2(
            "t",
            image_size=EVAL_IMAGE_SIZE,
            memory_policy="sis",
            memory_overrides={"max_obj_ptrs_in_encoder": window, "capacity": 3, "k": 2, "free_evicted": free},
        )
        state = model.init_state_from_frames(clip.frames, clip.orig_size)
        model.add_prompt(state, 1, Prompt.from_mask(0, clip.masks[0, 0]))
        outputs = state["output_dict_per_obj"][0]["non_cond_frame_outputs"]
        steps = [
            (lg.clone(), state_nbytes(state), len(outputs)) for _, _, lg in model.propagate_in_video(state)
        ]
        runs[free] = list(zip(*steps, strict=True))
    (keep_logits, keep_bytes, _), (free_logits, free_bytes, free_outputs) = runs[False], runs[True]
    assert all(torch.equal(a, b) for a, b in zip(keep_logits, free_logits, strict=True))
    assert max(free_outputs) == window
    # Bound: the prompted state + `window` per-frame outputs + `capacity` bank maps (bf16 [1, 64, S/16, S/16]).
    per_frame = keep_bytes[1] - keep_bytes[0]
    bank_map = 64 * (EVAL_IMAGE_SIZE // 16) ** 2 * 2
    bound = keep_bytes[0] + window * per_frame + model.memory_options.capacity * bank_map
    assert max(free_bytes) <= bound < keep_bytes[-1]


def test_unknown_policy_and_bad_options_are_clear():
    assert set(MEMORY_POLICIES) == {"fifo", "sis", "mutual-kv"}
    with pytest.raises(MQSAM2Error, match="unknown memory policy 'lru': use one of fifo, sis, mutual-kv"):
        build_sam2("t", image_size=EVAL_IMAGE_SIZE, memory_policy="lru")
    with pytest.raises(MQSAM2Error, match="k <= capacity"):
        build_sam2("t", image_size=EVAL_IMAGE_SIZE, memory_policy="sis", memory_overrides={"k": 9})
    model = build_sam2("t", image_size=EVAL_IMAGE_SIZE)
    with pytest.raises(MQSAM2Error, match="takes no options"):
        set_memory_policy(model, "fifo", k=3)
    set_memory_policy(model, "sis", k=2, tau=0.5, similarity="per_location")
    assert type(model) is SISVideoPredictor and model.memory_options.k == 2
    assert np.isclose(model.memory_options.tau, 0.5) and model.memory_options.capacity == 6


def test_state_nbytes_counts_each_storage_once_and_skips_frames():
    base = torch.zeros(10, 10)  # 400 bytes
    bank = MemoryBank(
        capacity=2, k=2, entries=[MemoryEntry(base[:5], torch.zeros(4), (0,))]
    )  # a view: no bytes
    state = {
        "images": torch.zeros(1000),
        "outputs": {1: {"a": base, "b": [base.T, (torch.zeros(3, dtype=torch.float64),)]}},  # 24 more
        "banks": {1: bank},
    }  # + the bank's own 16-byte pos_enc
    assert state_nbytes(state) == 400 + 24 + 16
