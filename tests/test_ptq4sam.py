"""PTQ4SAM: Bimodal Integration leaves the float model's outputs unchanged, the log2 quantizer follows its
formula, and its (tau, s) search finds the least attention-output error."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from sam2.modeling.backbones.hieradet import MultiScaleAttention
from sam2.modeling.sam.transformer import Attention, RoPEAttention

from mqsam2.api import Recipe, quant_config, quantize_calibrated
from mqsam2.bimodal import BimodalTest, eligible_attention, flip_query_key_channels, integrate_bimodal
from mqsam2.errors import MQSAM2Error
from mqsam2.memory.predictor import Prompt
from mqsam2.methods import get_method
from mqsam2.quant import QuantAttentionMixin
from mqsam2.quant.log2 import SCALE_GRID, TAUS, Log2Quantizer


def _random_signs(channels: int, generator: torch.Generator, pairs: bool = False) -> torch.Tensor:
    count = channels // 2 if pairs else channels
    signs = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
    return signs.repeat_interleave(2) if pairs else signs


def _attention_cases():
    """(module, inputs, keyword inputs, channels, RoPE) for every SAM2 attention form."""
    g = torch.Generator().manual_seed(0)
    return {
        "decoder attention (downsampled, kv_in_dim)": (
            Attention(32, 2, downsample_rate=2, kv_in_dim=24),
            (
                torch.randn(2, 5, 32, generator=g),
                torch.randn(2, 7, 24, generator=g),
                torch.randn(2, 7, 24, generator=g),
            ),
            {},
            16,
            False,
        ),
        "RoPE self-attention": (
            RoPEAttention(32, 1, feat_sizes=(4, 4)),
            (torch.randn(2, 16, 32, generator=g),) * 3,
            {},
            32,
            True,
        ),
        "RoPE cross-attention to memories and object pointers": (
            RoPEAttention(32, 1, feat_sizes=(4, 4), rope_k_repeat=True, kv_in_dim=24),
            (
                torch.randn(2, 16, 32, generator=g),
                torch.randn(2, 36, 24, generator=g),
                torch.randn(2, 36, 24, generator=g),
            ),
            {"num_k_exclude_rope": 4},
            32,
            True,
        ),
        "Hiera attention (fused qkv)": (
            MultiScaleAttention(16, 32, 2),
            (torch.randn(2, 4, 4, 16, generator=g),),
            {},
            32,
            False,
        ),
    }


@pytest.mark.parametrize("case", list(_attention_cases()))
def test_flipping_query_key_channels_leaves_attention_output_unchanged(case):
    """Negation is exact in floating point and (-q)(-k) = qk term by term, so the outputs are bit-identical."""
    module, args, kwargs, channels, rope = _attention_cases()[case]
    reference = module(*args, **kwargs)
    signs = _random_signs(channels, torch.Generator().manual_seed(1), pairs=rope)
    assert (signs < 0).any() and (signs > 0).any()
    flip_query_key_channels(module, signs)
    assert torch.equal(module(*args, **kwargs), reference)


def test_rope_pairs_must_flip_together():
    module, args, kwargs, channels, _ = _attention_cases()[
        "RoPE cross-attention to memories and object pointers"
    ]
    reference = module(*args, **kwargs)
    single = torch.ones(channels)
    single[4] = -1.0
    with pytest.raises(MQSAM2Error, match="pairs"):
        flip_query_key_channels(module, single)
    changed = copy.deepcopy(module)
    with torch.no_grad():  # what an unpaired flip would do: RoPE mixes channels 4 and 5, so the output moves
        for proj in (changed.q_proj, changed.k_proj):
            proj.weight[4] *= -1
            proj.bias[4] *= -1
    assert (changed(*args, **kwargs) - reference).abs().max() > 1e-4


def test_query_pooling_hiera_blocks_are_not_eligible():
    pooled = MultiScaleAttention(16, 32, 2, q_pool=torch.nn.MaxPool2d(2, 2))
    assert eligible_attention(torch.nn.ModuleList([pooled])) == {}
    with pytest.raises(MQSAM2Error, match="max-pools"):
        flip_query_key_channels(pooled, torch.ones(32))


def test_bimodality_test_separates_two_modes_from_one():
    g = torch.Generator().manual_seed(0)
    one_mode = torch.randn(20_000, generator=g)
    two_modes = torch.cat([torch.randn(10_000, generator=g) - 8, torch.randn(10_000, generator=g) + 8])
    skewed = torch.distributions.Gamma(2.0, 1.0).sample((20_000,))
    test = BimodalTest()
    assert test.is_bimodal(two_modes)
    assert not test.is_bimodal(one_mode)
    assert not test.is_bimodal(skewed)


def test_integration_folds_planted_bimodal_keys_and_keeps_the_output():
    """Keys with half the channels near +8 and half near -8 (the pattern PTQ4SAM found in SAM's decoder):
    after integration every channel mean is positive, the keys' range halves and they test unimodal."""
    g = torch.Generator().manual_seed(0)
    module = Attention(32, 2)
    with torch.no_grad():
        module.k_proj.weight.mul_(0.1)
        module.k_proj.bias.copy_(torch.where(torch.arange(32) % 3 == 0, -8.0, 8.0))
    inputs = [torch.randn(2, 64, 32, generator=g) for _ in range(3)]
    reference = [module(x, x, x) for x in inputs]
    keys_before = torch.cat([module.k_proj(x) for x in inputs]).flatten()
    flipped = integrate_bimodal(module, lambda: [module(x, x, x) for x in inputs])
    assert list(flipped) == [""]
    keys_after = torch.cat([module.k_proj(x) for x in inputs])
    assert (keys_after.mean(dim=(0, 1)) > 0).all()
    assert keys_after.max() - keys_after.min() < 0.6 * (keys_before.max() - keys_before.min())
    assert not BimodalTest().is_bimodal(keys_after.detach().flatten())
    for x, expected in zip(inputs, reference, strict=True):
        assert torch.equal(module(x, x, x), expected)


def _decoder_logits(model, frames, prompts):
    logits = []
    handle = model.sam_mask_decoder.register_forward_hook(lambda _m, _a, out: logits.append(out[0].clone()))
    try:
        model.track_clip(frames, (256, 256), prompts)
    finally:
        handle.remove()
    return logits


class _AlwaysBimodal(BimodalTest):
    def is_bimodal(self, values):
        return True


def test_bimodal_integration_keeps_sam2_outputs(tiny_video_model, square_clip):
    """Every eligible attention module of SAM2 (Hiera, memory attention with RoPE, mask decoder) flipped where
    its keys' channel means are negative: the image features and every mask logit of a tracked clip stay the
    same. Reordering-free negation keeps them bit-identical up to kernel nondeterminism; 1e-5 of the logits'
    scale allows for that and nothing else."""
    frames, masks = square_clip
    frames = frames[:3]
    prompts = {1: Prompt.from_mask(0, masks[0])}
    model = tiny_video_model
    features = model.forward_image(frames[:1])["vision_features"]
    reference = _decoder_logits(model, frames, prompts)
    flipped = integrate_bimodal(
        model, lambda: model.track_clip(frames, (256, 256), prompts), _AlwaysBimodal()
    )
    families = {name.split(".")[0] for name in flipped}
    assert families == {"image_encoder", "memory_attention", "sam_mask_decoder"}
    assert any(isinstance(model.get_submodule(n), RoPEAttention) for n in flipped)
    assert torch.allclose(model.forward_image(frames[:1])["vision_features"], features, rtol=0, atol=1e-5)
    for after, before in zip(_decoder_logits(model, frames, prompts), reference, strict=True):
        assert torch.allclose(after, before, rtol=0, atol=1e-5 * before.abs().max().item())


def _reference_log2(p: np.ndarray, scale: float, tau: int, bits: int) -> np.ndarray:
    """The documented formula, element by element in float64 (numpy rounds half to even like torch)."""
    top = 2**bits - 1
    out = np.empty_like(p)
    for i, value in enumerate(p.flat):
        code = top if value == 0 else int(np.clip(np.round(-tau * math.log2(value / scale)), 0, top))
        out.flat[i] = 0.0 if code == top else scale * 2.0 ** (-code / tau)
    return out


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("tau", TAUS)
def test_log2_quantizer_follows_its_formula(bits, tau):
    g = torch.Generator().manual_seed(bits * 10 + tau)
    probs = torch.cat(
        [
            torch.rand(500, generator=g, dtype=torch.float64) ** 6,
            torch.tensor([0.0, 1.0, 0.3, 1e-30], dtype=torch.float64),
        ]
    )
    quantizer = Log2Quantizer(bits)
    with torch.no_grad():
        quantizer.scale.fill_(0.25)
        quantizer.tau.fill_(float(tau))
        quantizer.initialized.fill_(True)
    scale = float(quantizer.scale)
    out = quantizer(probs)
    expected = _reference_log2(probs.numpy(), scale, tau, bits)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=0)
    # b bits hold the zero and 2^b - 1 powers (counted on the codes: the CPU's vector and scalar exp2 may
    # differ in the last bit for one power)
    assert len(torch.unique(quantizer.codes(probs))) <= 2**bits
    single = probs.float()
    assert torch.equal(quantizer.dequantize(quantizer.codes(single)), quantizer(single))


def test_log2_search_finds_the_least_attention_output_error():
    """Brute force over the same grid with the reference formula: the chosen (tau, s) has the least summed
    |Q(P) V - P V|^p over two calibration calls (small enough that every row is scored)."""
    g = torch.Generator().manual_seed(0)
    calls = []
    for _ in range(2):
        logits = 3 * torch.randn(2, 8, 16, generator=g)
        calls.append((torch.softmax(logits, dim=-1), torch.randn(2, 16, 4, generator=g)))
    quantizer = Log2Quantizer(3)
    quantizer.attach_observer("mse", p=2.4)
    quantizer.observing = True
    for probs, values in calls:
        quantizer(probs, values)
    assert quantizer.finish_observing()

    def loss(tau, scale):
        total = 0.0
        for probs, values in calls:
            p = probs.double().numpy()
            q = _reference_log2(p, scale, tau, 3)
            total += float(np.sum(np.abs(q @ values.double().numpy() - p @ values.double().numpy()) ** 2.4))
        return total

    losses = {(tau, float(s)): loss(tau, float(s)) for tau in TAUS for s in SCALE_GRID}
    chosen = loss(int(quantizer.tau), float(quantizer.scale))
    assert chosen <= min(losses.values()) * (1 + 1e-6)


def test_ptq4sam_quantizes_attention_with_log2_probabilities(tiny_video_model, square_clip):
    """Through the registry: BIG then quantization; every attention module gets a log2 probability quantizer,
    calibrated on the clip, with tau in {1, 2, 4}."""
    from mqsam2.allocation import Allocation
    from mqsam2.quant import quantizable_layers

    frames, masks = square_clip
    frames = frames[:2]
    prompts = {1: Prompt.from_mask(0, masks[0])}

    class ClipWorkload:
        def run_full(self, model):
            model.track_clip(frames, (256, 256), prompts)

    names = tuple(
        n for n in quantizable_layers(tiny_video_model) if "mask_downscaling" not in n
    )  # images only
    allocation = Allocation("uniform", 8, (8,), names, (8,) * len(names), 0.0, 8.0, 0.0)
    # the registered method with MinMax observers: OMSE's per-channel weight search takes minutes on 2 cores
    method = dataclasses.replace(get_method("ptq4sam"), weight_observer="minmax", act_observer="minmax")
    recipe = Recipe(method=method, bits=8)
    model = quantize_calibrated(tiny_video_model, quant_config(recipe, allocation), ClipWorkload(), method)
    attention = [m for m in model.modules() if isinstance(m, QuantAttentionMixin)]
    assert len(attention) == 27
    assert all(isinstance(m.attn_quantizer, Log2Quantizer) for m in attention)
    calibrated = [m.attn_quantizer for m in attention if m.attn_quantizer.initialized]
    assert calibrated and all(int(q.tau) in TAUS for q in calibrated)
    assert model.track_clip(frames, (256, 256), prompts).shape == (1, 2, 256, 256)


@pytest.mark.gpu
def test_log2_search_and_key_statistics_agree_on_cuda():
    """The device paths (search on the probabilities' device, key samples kept on k's device) pick the same
    (tau, s) and the same flips as on the CPU."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(4, 8, 32, 64, generator=g), dim=-1)
    values = torch.randn(4, 8, 64, 16, generator=g)
    chosen = {}
    for device in ("cpu", "cuda"):
        quantizer = Log2Quantizer(4).to(device)
        quantizer.attach_observer("mse", p=2.4)
        quantizer.observing = True
        quantizer(probs.to(device), values.to(device))
        quantizer.finish_observing()
        chosen[device] = (float(quantizer.tau), float(quantizer.scale))
    assert chosen["cpu"] == chosen["cuda"]
    planted = Attention(32, 2)
    with torch.no_grad():
        planted.k_proj.bias.copy_(torch.where(torch.arange(32) % 3 == 0, -8.0, 8.0))
    x = torch.randn(2, 64, 32, generator=g)
    flips = {}
    for device in ("cpu", "cuda"):
        module, inputs = copy.deepcopy(planted).to(device), x.to(device)
        flips[device] = integrate_bimodal(module, lambda m=module, i=inputs: m(i, i, i))[""].cpu()
    assert torch.equal(flips["cpu"], flips["cuda"])
