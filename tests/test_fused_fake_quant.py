"""The training fake-quant that reconstruction runs on the GPU: every variant a fit feeds it stays compiled."""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mqsam2.quant import quantizer
from mqsam2.quant.affine import fake_quantize


@pytest.fixture
def eager_backend_fused(monkeypatch):
    """The production compiled function, built with Dynamo's `eager` backend: Dynamo's guards and recompile
    budget are the same for every backend, and tracing takes milliseconds where Inductor on a CPU takes
    seconds per variant. Dynamo's state is reset around it, the recompile limit restored to its default."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    monkeypatch.setattr(quantizer.torch, "compile", functools.partial(torch.compile, backend="eager"))
    quantizer.fused_training_fake_quantize.cache_clear()
    torch._dynamo.reset()
    yield quantizer.fused_training_fake_quantize()
    quantizer.fused_training_fake_quantize.cache_clear()
    torch._dynamo.reset()


def test_fused_fake_quant_compiles_every_variant_a_bf16_fit_feeds_it(eager_backend_fused):
    """Regression: under bf16-mixed a fit feeds the compiled fake-quant bf16 and float32 tensors of several
    ranks, with and without gradients (memory attention alone adds four variants to the Hiera blocks'); past
    Dynamo's default budget of 8 ("tensor 'x' dtype mismatch, expected BFloat16, actual Float") it ran
    eagerly for the rest of the process. Twelve variants must all compile and match the eager fake-quant
    (drop rate 0, so the result is deterministic; the same ops run, so equality is exact)."""
    scale = torch.tensor(0.05, requires_grad=True)
    zero_point, upper, no_drop = torch.tensor(7.0), torch.tensor(15.0), torch.tensor(0.0)
    variants = itertools.product(
        (torch.float32, torch.bfloat16), ((6, 16), (2, 6, 16), (2, 3, 6, 16)), (True, False)
    )
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for dtype, shape, grad in variants:
            x = (
                torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
                .to(dtype)
                .requires_grad_(grad)
            )
            out = eager_backend_fused(x, scale, zero_point, upper, no_drop)
            assert out.dtype == dtype
            torch.testing.assert_close(out, fake_quantize(x, scale, zero_point, 4), rtol=0, atol=0)
            out.float().sum().backward()
    assert torch._dynamo.config.recompile_limit >= 12


def test_fused_kernels_match_the_eager_ops_under_the_triton_interpreter():
    """The Triton kernels' own code, run on CPU tensors by Triton's interpreter, in a fresh process (the
    interpreter must be chosen before triton is first imported)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    checks = Path(__file__).with_name("fused_checks.py")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:]


@pytest.mark.gpu
@pytest.mark.parametrize("check", ["activation", "qdrop", "adaround"])
def test_fused_kernels_match_the_eager_ops_on_the_gpu(check):
    from mqsam2.quant import fused
    from tests import fused_checks

    getattr(fused_checks, f"check_{check}")(fused, torch.device("cuda"))
