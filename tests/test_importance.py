"""Importance (Eq. 2-4): hand-computed scores, conv patches against the conv itself, streaming against the
concatenated activations, and a real two-rank gloo run against one process on the union of the data."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mqsam2.errors import MQSAM2Error
from mqsam2.importance import (
    ImportanceCollector,
    LayerImportance,
    channel_norms,
    patch_sum_of_squares,
    read_importance,
    weight_activation_score,
    write_importance,
)

FLOAT64_EPS = torch.finfo(torch.float64).eps


def test_linear_score_by_hand():
    # A = (sqrt(3^2 + 0^2), sqrt(0^2 + 4^2)) = (3, 4); H = [[1*3, 2*4], [3*3, 0*4]]; S = (3 + 8 + 9 + 0) / 4.
    x = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    assert channel_norms(x).tolist() == [3.0, 4.0]
    assert weight_activation_score(weight, channel_norms(x)) == 5.0
    layer = nn.Linear(2, 2)
    layer.weight.data = weight
    with ImportanceCollector(nn.Sequential(layer)) as collector:
        layer(x.reshape(1, 2, 1, 2))  # NHWC: the tokens are all leading positions
    assert collector.compute() == {"0": LayerImportance(score=5.0, num_params=4, act_elements=4)}


def test_conv_score_by_hand():
    # A 2x2 kernel with padding 1 over a 2x2 map: every kernel position meets every pixel exactly once, so
    # each A_(c,u,v) = sqrt(1 + 4 + 9 + 16) and S = mean|W| * sqrt(30) = (1 + 1 + 2 + 0) / 4 * sqrt(30).
    conv = nn.Conv2d(1, 1, kernel_size=2, padding=1)
    conv.weight.data = torch.tensor([[[[1.0, -1.0], [2.0, 0.0]]]])
    with ImportanceCollector(conv) as collector:
        conv(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))
    assert collector.compute()[""] == LayerImportance(
        score=pytest.approx(math.sqrt(30)), num_params=4, act_elements=4
    )


@pytest.mark.parametrize(
    "geometry",
    [
        {"kernel_size": 3, "stride": 2, "padding": 1},
        {"kernel_size": (3, 2), "stride": (1, 2), "padding": (2, 0), "dilation": (2, 1)},
        {"kernel_size": 7, "padding": 3, "groups": 4},
        {"kernel_size": 3, "padding": "same", "dilation": 2, "padding_mode": "reflect"},
        {"kernel_size": 4, "stride": 3, "padding": 2, "padding_mode": "circular"},
        {"kernel_size": 2, "padding": "valid"},
    ],
)
def test_patch_sums_equal_the_unfolded_patches(geometry):
    """The truth is the conv itself with an identity kernel: its output channel (c, u, v) is the unfolded
    patch entry (c, u, v) at every output position, with the module's own padding, stride and dilation."""
    conv = nn.Conv2d(4, 8, **geometry)
    probe = nn.Conv2d(
        4, 4 * math.prod(conv.kernel_size), bias=False, dtype=torch.float64, **geometry | {"groups": 1}
    )
    probe.weight.data = torch.eye(probe.out_channels, dtype=torch.float64).reshape(probe.weight.shape)
    x = torch.randn(3, 4, 11, 9)
    truth = probe(x.double()).square().sum((0, 2, 3)).reshape(4, *conv.kernel_size)
    torch.testing.assert_close(patch_sum_of_squares(x, conv), truth, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        patch_sum_of_squares(x[0], conv), probe(x[:1].double()).square().sum((0, 2, 3)).reshape(truth.shape)
    )


def test_grouped_conv_score_reads_each_groups_own_channels():
    conv = nn.Conv2d(6, 4, kernel_size=3, groups=2)
    norms = torch.rand(6, 3, 3, dtype=torch.float64)
    per_group_in = 3
    terms = [
        conv.weight[o, j, u, v].abs().item() * norms[(o // 2) * per_group_in + j, u, v].item()
        for o in range(4)
        for j in range(per_group_in)
        for u in range(3)
        for v in range(3)
    ]
    assert weight_activation_score(conv.weight, norms) == pytest.approx(
        math.fsum(terms) / len(terms), rel=1e-12
    )
    with pytest.raises(ValueError, match="do not fit"):
        weight_activation_score(conv.weight, norms[:5])


class _ConvThenLinear(nn.Module):
    """A conv whose NCHW output feeds a Linear as NHWC, like SAM2's memory-encoder CXBlock. In float64, so
    that the conv gives the Linear the same input whatever the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, kernel_size=3, stride=2, padding=1, dtype=torch.float64)
        self.linear = nn.Linear(5, 2, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.conv(x).permute(0, 2, 3, 1))


def _scores_of_concatenation(model: _ConvThenLinear, x: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        linear_input = model.conv(x).permute(0, 2, 3, 1)
    return {
        "conv": weight_activation_score(model.conv.weight, patch_sum_of_squares(x, model.conv).sqrt()),
        "linear": weight_activation_score(model.linear.weight, channel_norms(linear_input)),
    }


@pytest.mark.parametrize("split", [[6], [1] * 6, [2, 4], [5, 1]])
def test_streamed_scores_equal_the_concatenated_data_for_any_batching(split):
    torch.manual_seed(0)
    model = _ConvThenLinear()
    x = torch.randn(6, 3, 10, 10, dtype=torch.float64)
    with ImportanceCollector(model) as collector:
        for batch in x.split(split):
            model(batch)
    streamed = {name: layer.score for name, layer in collector.compute().items()}
    assert streamed == pytest.approx(_scores_of_concatenation(model, x), rel=1e-12)


def test_bf16_inputs_under_inference_mode_accumulate_exactly():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4).to(torch.bfloat16)
    x = torch.randn(3, 5, 8).to(torch.bfloat16)
    with torch.inference_mode():
        collector = ImportanceCollector(layer).__enter__()
        for batch in x:
            layer(batch)
        collector.__exit__(None, None, None)
    score = collector.compute()[""].score  # outside inference mode, where the all-reduce would run
    # Squares of bf16 values sum exactly in float64 whatever the order, so the norms agree bit for bit; the
    # final mean over 32 float64 products may be reduced in another order (SIMD width, alignment): <= 32 ulp.
    assert score == pytest.approx(
        weight_activation_score(layer.weight, channel_norms(x.double())), rel=32 * FLOAT64_EPS
    )


def test_collector_hooks_subclasses_or_the_named_layers_and_unhooks_on_exit():
    class QuantLinear(nn.Linear):
        pass

    model = nn.Sequential(QuantLinear(3, 3), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.Linear(3, 3))
    assert list(ImportanceCollector(model).layers) == ["0", "2", "3"]
    assert list(ImportanceCollector(model, layer_names=["3", "0"]).layers) == ["0", "3"]
    with pytest.raises(ValueError, match=r"not an nn\.Linear or nn\.Conv2d of the model: 1, 9"):
        ImportanceCollector(model, layer_names=["1", "9"])
    with ImportanceCollector(model, layer_names=["0"]) as collector:
        model[0](torch.ones(2, 3))
    model[0](torch.full((2, 3), 100.0))  # after exit: not counted
    # The same 9-term float64 mean both ways, but torch may reduce it in another order (SIMD width, memory
    # alignment, threads): the results may differ by up to 9 ulp, never more.
    assert collector.compute()["0"].score == pytest.approx(
        weight_activation_score(model[0].weight, torch.full((3,), math.sqrt(2), dtype=torch.float64)),
        rel=9 * FLOAT64_EPS,
    )


def test_layer_that_saw_no_input_stays_float_with_a_warning_unless_required(caplog):
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with ImportanceCollector(model) as collector:
        model[0](torch.ones(2, 3))
    with caplog.at_level("WARNING"):
        assert list(collector.compute()) == ["0"]
    assert "stay in floating point: 1" in caplog.text
    with pytest.raises(MQSAM2Error, match="no calibration input reached 1 layer"):
        collector.compute(required=["1"])


def test_importance_json_round_trip(tmp_path):
    importance = {"b.linear": LayerImportance(0.1 + 0.2, 12), "a.conv": LayerImportance(3.0, 5)}
    assert read_importance(write_importance(importance, tmp_path / "importance.json")) == importance
    assert list(read_importance(tmp_path / "importance.json")) == ["b.linear", "a.conv"]


def _rank_scores(rank: int, world: int, init_file: str, shards: list[torch.Tensor], queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = _ConvThenLinear()  # same weights on every rank, as DDP guarantees
    spare = nn.Linear(5, 5, dtype=torch.float64)  # only rank 0 runs it: the all-reduce must still line up
    model.add_module("spare", spare)
    with ImportanceCollector(model) as collector:
        for batch in shards[rank].split(2):
            features = model.conv(batch).permute(0, 2, 3, 1)
            model.linear(features)
            if rank == 0:
                spare(features)
    try:
        queue.put((rank, {name: layer.score for name, layer in collector.compute().items()}))
    except MQSAM2Error as failure:  # hand it to the parent rather than leave it waiting
        queue.put((rank, repr(failure)))
    dist.destroy_process_group()


def test_two_gloo_ranks_score_the_union_of_their_data(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(7, 3, 10, 10, dtype=torch.float64)
    shards = [x[:5], x[5:]]  # unequal shards, and rank 1 never runs `spare`
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=_rank_scores, args=(rank, 2, str(tmp_path / "init"), shards, queue))
        for rank in range(2)
    ]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    torch.manual_seed(0)
    model = _ConvThenLinear()
    spare = nn.Linear(5, 5, dtype=torch.float64)
    truth = _scores_of_concatenation(model, x)
    with torch.no_grad():
        truth["spare"] = weight_activation_score(
            spare.weight, channel_norms(model.conv(x[:5]).permute(0, 2, 3, 1))
        )
    assert results[0] == pytest.approx(truth, rel=1e-12)
    assert results[1] == results[0]


def test_sam2_tiny_image_and_memory_encoders():
    """Every quantizable layer of SAM2.1-tiny's image and memory encoders: Hiera's NHWC Linears, the FPN's
    1x1 convs, the memory encoder's depthwise 7x7 convs (groups=256) and its NHWC CXBlock Linears."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    model = build_sam2(
        "configs/sam2.1/sam2.1_hiera_t.yaml",
        device="cpu",
        apply_postprocessing=False,
        hydra_overrides_extra=["++model.image_size=256"],
    )
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d)
        and name.startswith(("image_encoder.", "memory_encoder."))
    ]
    with torch.inference_mode(), ImportanceCollector(model, layer_names=names) as collector:
        backbone = model.forward_image(torch.randn(1, 3, 256, 256))
        model.memory_encoder(backbone["vision_features"], torch.randn(1, 1, 256, 256), skip_mask_sigmoid=True)
    importance = collector.compute()
    assert list(importance) == names
    assert all(math.isfinite(imp.score) and imp.score > 0 for imp in importance.values())
    dwconv = model.memory_encoder.fuser.layers[0].dwconv
    assert importance["memory_encoder.fuser.layers.0.dwconv"].num_params == dwconv.weight.numel() == 256 * 49
