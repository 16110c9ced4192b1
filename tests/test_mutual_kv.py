"""Adaptive Mutual-KV: the grouping against its defining property, exactness of the log|G| term for identical
entries through SAM2's own memory attention, and the predictor against stock FIFO when nothing is similar."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mqsam2.api import Recipe, quantize_sam2
from mqsam2.errors import MQSAM2Error
from mqsam2.memory import (
    MutualKVOptions,
    MutualKVVideoPredictor,
    Prompt,
    VideoPredictor,
    set_memory_policy,
)
from mqsam2.memory.mutual_kv import group_frames, shared_memory_kv
from mqsam2.methods import Method
from mqsam2.methods.qminisam2 import QMINISAM2_MKV
from mqsam2.models import build_sam2
from mqsam2.quant import QuantConfig, quantize
from mqsam2.workload import Workload

from .eval_data import EVAL_IMAGE_SIZE, make_clip


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.95])
def test_groups_are_seeded_newest_first_and_hold_only_similar_frames(threshold):
    """Greedy grouping is characterised by: a partition; every member similar to its group's seed (newest
    member) above the threshold; and no frame of an older-seeded group similar to a newer seed."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(3, 16, generator=generator)
    features = torch.stack([base[i % 3] + 0.6 * torch.randn(16, generator=generator) for i in range(12)])
    groups = group_frames(features.view(12, 4, 4), threshold)
    cos = F.cosine_similarity(features[:, None], features[None], dim=-1)
    assert sorted(i for g in groups for i in g) == list(range(12))
    assert groups == sorted(groups) and all(g == sorted(g) for g in groups)
    for group in groups:
        assert all(cos[group[-1], i] > threshold for i in group[:-1])
    for newer in groups:
        for older in groups:
            if older[-1] < newer[-1]:
                assert all(cos[newer[-1], i] <= threshold for i in older)
    assert len(group_frames(features[:0], threshold)) == 0


@pytest.fixture(scope="module")
def model():
    return build_sam2("t", image_size=EVAL_IMAGE_SIZE)


def _memory(model, maps: list[int], pointers: int = 4, seed: int = 0):
    """Memory tokens [N, 1, C] laid out as SAM2 does: maps (map id per slot; equal ids are identical maps with
    identical positional encodings) and then object-pointer tokens; plus the current frame's inputs."""
    generator = torch.Generator().manual_seed(seed)
    tokens, dim = (EVAL_IMAGE_SIZE // 16) ** 2, model.mem_dim
    distinct = {i: torch.randn(2, tokens, 1, dim, generator=generator) for i in set(maps)}
    memory = torch.cat([*(distinct[i][0] for i in maps), torch.randn(pointers, 1, dim, generator=generator)])
    memory_pos = torch.cat(
        [*(distinct[i][1] for i in maps), torch.randn(pointers, 1, dim, generator=generator)]
    )
    curr = torch.randn(tokens, 1, model.hidden_dim, generator=generator)
    curr_pos = torch.randn(tokens, 1, model.hidden_dim, generator=generator)
    return {
        "curr": [curr],
        "curr_pos": [curr_pos],
        "memory": memory,
        "memory_pos": memory_pos,
        "num_obj_ptr_tokens": pointers,
    }, tokens


def test_identical_entries_with_the_log_size_term_attend_as_the_ungrouped_bank(model):
    """A conditioning map, three identical recent maps and a distinct one, then pointer tokens: grouped, the
    three become one key/value set with log 3 on its logits, and every layer's cross-attention gives what the
    ungrouped bank gives. Float32 throughout; the grouped path differs only by the rounding of a mean of equal
    values and of log 3, so 1e-5 bounds the difference."""
    inputs, tokens = _memory(model, maps=[0, 1, 1, 1, 2])
    attention = model.memory_attention.eval()
    keys = []
    handle = attention.layers[0].cross_attn_image.k_proj.register_forward_hook(
        lambda module, args, output: keys.append(output.shape[1])
    )
    with torch.no_grad():
        reference = attention(**copy.deepcopy(inputs))
        with shared_memory_kv(attention, tokens, fixed=1, options=MutualKVOptions(threshold=0.99)):
            grouped = attention(**copy.deepcopy(inputs))
        with shared_memory_kv(attention, tokens, fixed=1, options=MutualKVOptions(0.99, log_size_bias=False)):
            unweighted = attention(**copy.deepcopy(inputs))
    handle.remove()
    assert keys == [5 * tokens + 4, 3 * tokens + 4, 3 * tokens + 4]  # 5 maps fed as 3
    torch.testing.assert_close(grouped, reference, rtol=1e-5, atol=1e-5)
    assert (unweighted - reference).abs().max() > 1e-3  # without log|G| the group is under-weighted


def test_conditioning_maps_are_never_grouped(model):
    inputs, tokens = _memory(model, maps=[1, 1, 1])
    fed = []
    handle = model.memory_attention.register_forward_hook(
        lambda module, args, kwargs, output: fed.append(kwargs["memory"].shape[0]), with_kwargs=True
    )
    with torch.no_grad():
        for fixed in (0, 1, 2):
            with shared_memory_kv(model.memory_attention, tokens, fixed, MutualKVOptions(threshold=0.99)):
                model.memory_attention(**copy.deepcopy(inputs))
    handle.remove()
    assert fed == [tokens + 4, 2 * tokens + 4, 3 * tokens + 4]


def test_policy_equals_stock_fifo_when_nothing_groups_and_feeds_one_map_when_everything_does():
    clip = make_clip(num_frames=6, num_objects=1, seed=2)
    tokens = (EVAL_IMAGE_SIZE // 16) ** 2
    runs, fed = {}, {}
    for name, policy, options in (
        ("fifo", "fifo", {}),
        ("never", "mutual-kv", {"threshold": 1.5}),
        ("always", "mutual-kv", {"threshold": -1.0}),
    ):
        predictor = build_sam2(
            "t", image_size=EVAL_IMAGE_SIZE, memory_policy=policy, memory_overrides=options
        )
        fed[name] = []
        predictor.memory_attention.register_forward_hook(
            lambda m, a, kwargs, out, n=name: fed[n].append(
                (kwargs["memory"].shape[0] - kwargs["num_obj_ptr_tokens"]) // tokens
            ),
            with_kwargs=True,
        )
        state = predictor.init_state_from_frames(clip.frames, clip.orig_size)
        predictor.add_prompt(state, 1, Prompt.from_mask(0, clip.masks[0, 0]))
        runs[name] = [logits.clone() for _, _, logits in predictor.propagate_in_video(state)]
    assert type(predictor) is MutualKVVideoPredictor
    assert all(torch.equal(a, b) for a, b in zip(runs["fifo"], runs["never"], strict=True))
    assert fed["fifo"] == fed["never"] == [1, 2, 3, 4, 5]  # the prompt map + the frames tracked so far
    assert fed["always"] == [1, 2, 2, 2, 2]  # the prompt map + one group


def test_log_size_term_refuses_quantized_attention_matmuls():
    model = build_sam2("t", image_size=EVAL_IMAGE_SIZE)
    quantize(model, QuantConfig(bits=8, quantize_attention=True))
    set_memory_policy(model, "mutual-kv", threshold=0.9)
    with (
        pytest.raises(MQSAM2Error, match="log\\|G\\| term needs float attention matmuls"),
        shared_memory_kv(model.memory_attention, 16, 1, model.memory_options),
    ):
        pass


def test_a_methods_memory_policy_is_applied_after_quantizing_under_fifo(tmp_path):
    """`qminisam2-mkv` is Q-MiniSAM2 with `memory_policy="mutual-kv"`; a method with that field (cheap min-max
    observers here: the registered one's OMSE weight search costs minutes on a CPU) comes back tracking with
    Mutual-KV, the float model untouched."""
    assert QMINISAM2_MKV.memory_policy == "mutual-kv" and QMINISAM2_MKV.video_loss == "hvq"
    float_model = build_sam2("t", image_size=EVAL_IMAGE_SIZE)
    workload = Workload([make_clip(num_frames=3, num_objects=1)], [], max_objects=1)
    method = Method("mkv-probe", "min-max W8A8 tracking with Mutual-KV", memory_policy="mutual-kv")
    recipe = Recipe(method=method, bits=8, learn=False)
    model = quantize_sam2(float_model, workload, recipe, workdir=tmp_path).model
    assert type(model) is MutualKVVideoPredictor and model.memory_options == MutualKVOptions()
    assert type(float_model) is VideoPredictor
