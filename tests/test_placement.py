"""Cache placement: which caches leave the GPU, and streamed batches equal the ones gathered in place."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

from mqsam2.reconstruct.cache import Call, UnitCache
from mqsam2.reconstruct.placement import BatchFeeder, CachePolicy

GIB = 2**30


def test_caches_over_the_gpu_budget_stay_in_host_memory():
    free = 10 * GIB
    assert CachePolicy(budget_gb=1.0).on_device(GIB, free)
    assert not CachePolicy(budget_gb=1.0).on_device(GIB + 1, free)
    assert CachePolicy().on_device(5 * GIB, free)  # default budget: half of the free memory
    assert not CachePolicy().on_device(5 * GIB + 1, free)
    assert not CachePolicy(device="cpu").on_device(1, free)
    assert CachePolicy(device="cuda").on_device(100 * GIB, free)


def test_bf16_placement_halves_floating_tensors_of_a_copy():
    cache = _cache()
    tensors = [x for calls in (cache.quant, cache.float) for c in calls for x in (*c.inputs, *c.outputs)]
    floating = sum(x.nbytes for x in tensors if isinstance(x, torch.Tensor) and x.is_floating_point())
    before = cache.nbytes
    placed = CachePolicy(bf16=True).place(cache, torch.device("cpu"))
    assert placed.quant[0].inputs[0].dtype == torch.bfloat16
    assert placed.quant[0].inputs[1].dtype == torch.int64
    assert placed.nbytes == before - floating // 2
    assert cache.nbytes == before  # the captured cache, which later units derive theirs from, is untouched


def _cache() -> UnitCache:
    """20 samples in two signatures (token counts 5 and 7): a float tensor, an integer one and a constant."""
    generator = torch.Generator().manual_seed(0)
    quant, floats = [], []
    for i in range(20):
        tokens = 5 if i % 3 else 7
        x = torch.randn(1, tokens, 4, generator=generator)
        ids = torch.randint(0, 9, (1, tokens), generator=generator)
        inputs, spec = tree_flatten(((x, ids), {"scale": 2}))
        outputs, out_spec = tree_flatten(x * 2)
        quant.append(Call(inputs, spec, [], out_spec))
        floats.append(Call([t + 1 if t is x else t for t in inputs], spec, outputs, out_spec))
    return UnitCache(quant, floats, batchable=True, unit_name="toy")


def test_streamed_batches_equal_batches_gathered_in_place():
    """The streamed path (rows copied into a batch, the next step's copy made ahead) must hand every step the
    batch a cache in place gives, also when steps jump (a resumed fit) or repeat."""
    cache = _cache()

    def draw(step: int) -> list[int]:
        return cache.indices(step, 4, seed=3)

    feeder = BatchFeeder(cache, torch.device("cpu"), draw, streamed=True)
    for step in (0, 1, 2, 9, 10, 4, 4):
        indices, streamed = feeder(step)
        assert indices == draw(step)
        expected = cache.batch(indices)
        assert streamed.input_spec == expected.input_spec
        for x, y in zip(streamed.tensors(), expected.tensors(), strict=True):
            assert x.dtype == y.dtype
            assert torch.equal(x, y)
        assert streamed.unflatten(streamed.inputs_q)[1] == {"scale": 2}
