"""Observer ranges on hand-built tensors, where the right answer is known without running the code."""

import pytest
import torch

from mqsam2.errors import MQSAM2Error
from mqsam2.quant import MinMaxObserver, MSEObserver, PercentileObserver, fake_quantize, params_from_range


def test_minmax_tracks_extremes_across_batches_per_tensor():
    observer = MinMaxObserver()
    observer.update(torch.tensor([[0.5, -2.0], [1.0, 3.0]]))
    observer.update(torch.tensor([-4.0, 0.0]))
    lo, hi = observer.compute_range(8)
    assert (lo.item(), hi.item()) == (-4.0, 3.0)


def test_minmax_per_channel_uses_the_channel_axis():
    observer = MinMaxObserver(axis=0)
    observer.update(torch.tensor([[1.0, -1.0, 5.0], [0.0, 2.0, -7.0]]))
    lo, hi = observer.compute_range(4)
    assert lo.tolist() == [-1.0, -7.0] and hi.tolist() == [5.0, 2.0]


def test_percentile_clips_a_single_outlier():
    values = torch.cat([torch.linspace(-1, 1, 10001), torch.tensor([1000.0])])
    observer = PercentileObserver(percentile=99.9, sample_size=None)
    observer.update(values)
    lo, hi = observer.compute_range(8)
    expected = torch.quantile(values, torch.tensor([0.001, 0.999]))
    assert lo.item() == pytest.approx(expected[0].item()) and hi.item() == pytest.approx(expected[1].item())
    assert hi.item() < 1.01


def test_percentile_sample_is_uniform_over_all_batches():
    observer = PercentileObserver(percentile=99.0, sample_size=20000)
    generator = torch.Generator().manual_seed(1)
    for shift in range(10):
        observer.update(torch.rand(10000, generator=generator) + shift)
    lo, hi = observer.compute_range(8)
    assert lo.item() == pytest.approx(0.1, abs=0.05) and hi.item() == pytest.approx(9.9, abs=0.05)


def test_mse_range_beats_minmax_in_lp_error_and_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(5000, generator=generator), torch.tensor([40.0])])
    observer = MSEObserver(p=2.4, steps=100, sample_size=None)
    observer.update(values)
    _lo, hi = observer.compute_range(4)

    def lp_error(shrink):
        scale, zero_point = params_from_range(values.min() * shrink, values.max() * shrink, 4)
        return (fake_quantize(values, scale, zero_point, 4) - values).abs().pow(2.4).mean().item()

    candidates = torch.linspace(1.0, 0.01, 100).tolist()
    best = min(candidates, key=lp_error)
    assert hi.item() == pytest.approx(40.0 * best)
    assert lp_error(best) < lp_error(1.0)


def test_per_channel_mse_picks_each_channels_own_best_candidate():
    """Brute force per channel: the candidates a loop from the full range down tries, the first best kept."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(3, 400, generator=generator) * torch.tensor([[0.1], [1.0], [5.0]])
    weight[1, 7] = 30.0  # one channel with an outlier wants a clipped range
    observer = MSEObserver(p=2.4, steps=50, axis=0, sample_size=None)
    observer.update(weight)
    lo, hi = observer.compute_range(4)
    for channel, row in enumerate(weight):
        best, best_error = None, float("inf")
        for shrink in torch.linspace(1.0, 1.0 / 50, 50).tolist():
            scale, zero_point = params_from_range(row.min() * shrink, row.max() * shrink, 4)
            error = (fake_quantize(row, scale, zero_point, 4) - row).abs().pow(2.4).mean().item()
            if error < best_error:
                best, best_error = shrink, error
        assert hi[channel].item() == pytest.approx(row.max().item() * best, rel=1e-5)
        assert lo[channel].item() == pytest.approx(row.min().item() * best, rel=1e-5)


def test_observer_without_data_is_an_error():
    with pytest.raises(MQSAM2Error, match="no data"):
        MinMaxObserver().compute_range(8)
