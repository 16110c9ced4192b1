"""J&F against a direct numpy transcription of the DAVIS formulas; COCO mAP against pycocotools' COCOeval."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sam2.sam2_image_predictor import SAM2ImagePredictor

from mqsam2.errors import MQSAM2Error
from mqsam2.metrics import (
    Instances,
    JandF,
    MaskMAP,
    boundary_f_measure,
    coco,
    coco_ground_truth,
    coco_results,
    load_detections,
    mask_map,
    predict_instances,
    region_similarity,
    segm_stats,
)
from mqsam2.models import TensorImagePredictor, build_sam2

# ---------------------------------------------------------------------------------- DAVIS, in plain numpy


def davis_j(gt: np.ndarray, seg: np.ndarray) -> float:
    union = np.sum(gt | seg)
    return 1.0 if union == 0 else np.sum(gt & seg) / union


def davis_bmap(seg: np.ndarray) -> np.ndarray:
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def davis_dilate(b: np.ndarray, r: int) -> np.ndarray:
    """Dilation by skimage's disk(r), written out as a union of shifted copies."""
    h, w = b.shape
    out = np.zeros_like(b)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx <= r * r:
                out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] |= b[
                    max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
                ]
    return out


def davis_f(seg: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    r = int(np.ceil(bound_th * np.linalg.norm(seg.shape)))
    fg_b, gt_b = davis_bmap(seg), davis_bmap(gt)
    fg_d, gt_d = davis_dilate(fg_b, r), davis_dilate(gt_b, r)
    n_fg, n_gt = np.sum(fg_b), np.sum(gt_b)
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1, 0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0, 1
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1, 1
    else:
        precision, recall = np.sum(fg_b & gt_d) / n_fg, np.sum(gt_b & fg_d) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def blobs(shape, density: float, seed: int, scale: int = 1) -> np.ndarray:
    """Random blobby masks: thresholded, box-smoothed noise, with blobs `scale` times larger."""
    rng = np.random.default_rng(seed)
    t, h, w = shape
    noise = torch.from_numpy(rng.random((t, -(-h // scale), -(-w // scale)))).float()[:, None]
    noise = torch.nn.functional.interpolate(noise, scale_factor=scale, mode="bilinear")[..., :h, :w]
    smooth = torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2)[:, 0].numpy()
    return smooth > np.quantile(smooth, 1 - density)


def hand_built_pairs(h: int = 30, w: int = 40) -> list[tuple[str, np.ndarray, np.ndarray]]:
    empty, full = np.zeros((h, w), bool), np.ones((h, w), bool)
    dot, dot_next, dot_far, corner = (empty.copy() for _ in range(4))
    dot[10, 12], dot_next[10, 13], dot_far[25, 35], corner[-1, -1] = True, True, True, True
    half = empty.copy()
    half[:, : w // 2] = True
    return [
        ("both empty", empty, empty),
        ("empty prediction", empty, half),
        ("empty target", half, empty),
        ("same pixel", dot, dot),
        ("adjacent pixels", dot, dot_next),
        ("far pixels", dot, dot_far),
        ("corner pixel", corner, corner),  # DAVIS's bmap drops the bottom-right pixel: no boundary at all
        ("corner vs dot", corner, dot),
        ("full frame", full, full),
        ("full vs half", full, half),
        ("half vs full", half, full),
    ]


@pytest.mark.parametrize("name,pred,gt", hand_built_pairs(), ids=[p[0] for p in hand_built_pairs()])
def test_j_and_f_match_davis_on_hand_built_masks(name, pred, gt):
    j = region_similarity(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])
    f = boundary_f_measure(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])
    assert j.item() == pytest.approx(davis_j(gt, pred), abs=1e-12)
    assert f.item() == pytest.approx(davis_f(pred, gt), abs=1e-12)


def test_both_empty_scores_one_and_disjoint_scores_zero():
    pairs = {name: (p, g) for name, p, g in hand_built_pairs()}
    for name, expected in (("both empty", 1.0), ("empty prediction", 0.0), ("far pixels", 0.0)):
        pred, gt = (torch.from_numpy(m)[None] for m in pairs[name])
        assert region_similarity(pred, gt).item() == expected
        assert boundary_f_measure(pred, gt).item() == expected


@pytest.mark.parametrize("shape,scale", [((6, 37, 53), 1), ((4, 120, 160), 2), ((3, 480, 854), 16)])
def test_j_and_f_match_davis_on_random_masks(shape, scale):
    pred, gt = blobs(shape, 0.3, seed=1, scale=scale), blobs(shape, 0.35, seed=2, scale=scale)
    gt[0] = pred[0]  # one identical frame
    j = region_similarity(torch.from_numpy(pred), torch.from_numpy(gt))
    f = boundary_f_measure(torch.from_numpy(pred), torch.from_numpy(gt))
    expected_j = [davis_j(g, p) for p, g in zip(pred, gt, strict=True)]
    expected_f = [davis_f(p, g) for p, g in zip(pred, gt, strict=True)]
    np.testing.assert_allclose(j.numpy(), expected_j, rtol=0, atol=1e-12)
    np.testing.assert_allclose(f.numpy(), expected_f, rtol=0, atol=1e-12)
    assert f[0] == 1 and j[0] == 1


def test_jandf_averages_frames_then_tracks():
    tracks = [(blobs((t, 30, 40), 0.3, seed=t), blobs((t, 30, 40), 0.3, seed=10 + t)) for t in (2, 5, 3)]
    metric = JandF()
    for pred, gt in tracks:
        metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
    out = metric.compute()
    j = np.mean([np.mean([davis_j(g, p) for p, g in zip(*tr, strict=True)]) for tr in tracks])
    f = np.mean([np.mean([davis_f(p, g) for p, g in zip(*tr, strict=True)]) for tr in tracks])
    assert out["J"].item() == pytest.approx(j, abs=1e-12)
    assert out["F"].item() == pytest.approx(f, abs=1e-12)
    assert out["J&F"].item() == pytest.approx((j + f) / 2, abs=1e-12)


def test_jandf_rejects_bad_masks():
    metric = JandF()
    good = torch.zeros(2, 8, 8, dtype=torch.bool)
    with pytest.raises(MQSAM2Error, match="bool mask"):
        metric.update(good.float(), good)
    with pytest.raises(MQSAM2Error, match="bool mask"):
        metric.update(good[0], good[0])
    with pytest.raises(MQSAM2Error, match="same resolution"):
        metric.update(good, torch.zeros(2, 8, 9, dtype=torch.bool))
    with pytest.raises(MQSAM2Error, match="no tracks"):
        metric.compute()


def _ddp_rank(rank: int, world: int, port: int, tracks, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    metric = JandF()
    for pred, gt in tracks[rank::world]:
        metric.update(pred, gt)
    result = {k: v.item() for k, v in metric.compute().items()}
    with open(f"{out_dir}/rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()


def test_jandf_syncs_across_ddp_ranks(tmp_path):
    tracks = [
        (
            torch.from_numpy(blobs((t, 24, 32), 0.3, seed=t)),
            torch.from_numpy(blobs((t, 24, 32), 0.3, seed=9 + t)),
        )
        for t in (1, 2, 3, 4, 5)
    ]
    single = JandF()
    for pred, gt in tracks:
        single.update(pred, gt)
    expected = {k: v.item() for k, v in single.compute().items()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, port, tracks, str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------- COCO mask mAP


def rect(h, w, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def coco_example():
    """Two images, three GT objects in two categories; predictions with known overlaps, one false positive."""
    gt = {
        1: [(rect(40, 50, 5, 25, 5, 25), 1), (rect(40, 50, 20, 38, 30, 48), 2)],
        2: [(rect(30, 30, 2, 20, 2, 12), 1)],
    }
    pred = {
        1: [
            (rect(40, 50, 5, 25, 5, 25), 0.9, 1),
            (rect(40, 50, 20, 38, 30, 40), 0.8, 2),
            (rect(40, 50, 0, 4, 0, 4), 0.95, 1),
        ],
        2: [(rect(30, 30, 2, 20, 2, 9), 0.7, 1)],
    }
    return gt, pred


def test_segm_stats_equal_cocoeval_on_a_hand_built_example():
    gt, pred = coco_example()
    # Reference: COCO dicts written out by hand, straight into COCOeval.
    images, anns, results = [], [], []
    for image_id, objects in gt.items():
        h, w = objects[0][0].shape
        images.append({"id": image_id, "height": h, "width": w})
        for mask, cat in objects:
            ys, xs = np.nonzero(mask)
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            box = [
                float(xs.min()),
                float(ys.min()),
                float(xs.max() - xs.min() + 1),
                float(ys.max() - ys.min() + 1),
            ]
            anns.append(
                {"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "segmentation": rle,
                 "area": float(mask.sum()), "bbox": box, "iscrowd": 0}
            )  # fmt: skip
    for image_id, objects in pred.items():
        for mask, score, cat in objects:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            results.append({"image_id": image_id, "category_id": cat, "segmentation": rle, "score": score})
    reference_gt = COCO()
    reference_gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1}, {"id": 2}]}
    reference_gt.createIndex()
    evaluator = COCOeval(reference_gt, reference_gt.loadRes(results), iouType="segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    # Ours: from the data layer's sample fields and predicted instances.
    samples = [
        SimpleNamespace(
            image_id=i,
            masks=torch.from_numpy(np.stack([m for m, _ in objs])),
            category_ids=[c for _, c in objs],
        )
        for i, objs in gt.items()
    ]
    instances = [
        Instances(
            i,
            torch.from_numpy(np.stack([m for m, _, _ in objs])),
            torch.tensor([s for _, s, _ in objs]),
            [c for *_, c in objs],
        )
        for i, objs in pred.items()
    ]
    ours = segm_stats(coco_ground_truth(samples), coco_results(instances))
    np.testing.assert_allclose(list(ours.values()), evaluator.stats, rtol=0, atol=1e-12)
    assert 0 < ours["mAP"] < 1 and ours["mAP50"] > ours["mAP75"]


def coco_pairs() -> list[tuple[Instances, SimpleNamespace]]:
    """`coco_example` as MaskMAP.update's arguments, one (prediction, target) pair per image."""
    gt, pred = coco_example()
    samples = {
        i: SimpleNamespace(
            image_id=i,
            masks=torch.from_numpy(np.stack([m for m, _ in objs])),
            category_ids=[c for _, c in objs],
        )
        for i, objs in gt.items()
    }
    instances = {
        i: Instances(
            i, torch.from_numpy(np.stack([m for m, _, _ in objs])), torch.tensor([s for _, s, _ in objs]),
            [c for *_, c in objs],
        )
        for i, objs in pred.items()
    }  # fmt: skip
    return [(instances[i], samples[i]) for i in samples]


def whole_set_stats(pairs) -> dict[str, float]:
    return segm_stats(coco_ground_truth([t for _, t in pairs]), coco_results([p for p, _ in pairs]))


def test_mask_map_metric_synced_from_shards_equals_the_whole_set():
    """Each rank scores its share; torchmetrics' "cat" reduction (what DDP sync applies, here by merge_state)
    must give exactly the whole set's COCOeval stats (checked against hand-built COCO dicts above)."""
    pairs = coco_pairs()
    ranks = [MaskMAP(), MaskMAP()]
    for n, (prediction, target) in enumerate(pairs):
        ranks[n % 2].update(prediction, target)
    ranks[0].merge_state(ranks[1])
    # COCOeval sorts images by id and keeps each image's detections in order, so the shards' order does not
    # reach the arithmetic: the same operations on the same numbers, hence equality.
    assert ranks[0].compute() == whole_set_stats(pairs)


def _mask_map_rank(rank: int, world: int, port: int, pairs, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    metric = MaskMAP()
    for prediction, target in pairs[rank::world]:
        metric.update(prediction, target)
    with open(f"{out_dir}/rank{rank}.json", "w") as fh:
        json.dump(metric.compute(), fh)
    dist.destroy_process_group()


def test_mask_map_syncs_across_ddp_ranks_with_uneven_and_empty_shares(tmp_path):
    """Three gloo ranks over two images: the two shares' states differ in length and the third rank scored
    nothing; every rank computes the whole set's stats."""
    pairs = coco_pairs()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_mask_map_rank, args=(3, port, pairs, str(tmp_path)), nprocs=3)
    expected = whole_set_stats(pairs)
    for rank in range(3):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


def test_perfect_predictions_score_one_and_no_predictions_zero():
    gt, _ = coco_example()
    samples = [
        SimpleNamespace(
            image_id=i,
            masks=torch.from_numpy(np.stack([m for m, _ in objs])),
            category_ids=[c for _, c in objs],
        )
        for i, objs in gt.items()
    ]
    perfect = [Instances(s.image_id, s.masks, torch.ones(len(s.masks)), s.category_ids) for s in samples]
    ground_truth = coco_ground_truth(samples)
    assert segm_stats(ground_truth, coco_results(perfect))["mAP"] == pytest.approx(1.0)
    assert segm_stats(ground_truth, [])["mAP"] == 0.0


class GroundTruthPredictor:
    """Stands in for TensorImagePredictor: records the prompts and answers with the GT mask under each box."""

    def __init__(self, sample, iou: float = 0.5):
        self.sample, self.iou, self.boxes = sample, iou, None

    def set_image_tensor(self, image, orig_hw):
        assert tuple(orig_hw) == self.sample.orig_size

    def predict(self, box, multimask_output):
        assert not multimask_output
        self.boxes = box
        gt_boxes = self.sample.boxes.numpy()
        rows = [int(np.argmin(np.abs(gt_boxes - b).sum(1))) for b in box]
        masks = self.sample.masks[rows].float()[:, None]  # [N, 1, H, W]; sam2 squeezes N == 1 away
        return masks.squeeze(0).numpy(), torch.full((len(box), 1), self.iou).squeeze(0).numpy(), None


def test_box_prompts_from_gt_and_from_detections():
    h, w = 40, 50
    masks = torch.from_numpy(np.stack([rect(h, w, 5, 25, 5, 25), rect(h, w, 20, 38, 30, 48)]))
    sample = SimpleNamespace(
        image_id=7, image=torch.zeros(3, 64, 64), boxes=torch.tensor([[5.0, 5, 25, 25], [30.0, 20, 48, 38]]),
        masks=masks, category_ids=[3, 4], orig_size=(h, w),
    )  # fmt: skip
    predictor = GroundTruthPredictor(sample)
    inst = predict_instances(predictor, sample)
    np.testing.assert_array_equal(predictor.boxes, sample.boxes.numpy())
    assert torch.equal(inst.masks, masks) and inst.category_ids == [3, 4]
    torch.testing.assert_close(inst.scores, torch.tensor([0.5, 0.5]))
    detections = {7: [{"image_id": 7, "category_id": 4, "bbox": [30, 20, 18, 18], "score": 0.8}]}
    inst = predict_instances(predictor, sample, detections)
    np.testing.assert_array_equal(predictor.boxes, [[30, 20, 48, 38]])  # xywh -> xyxy
    assert torch.equal(inst.masks, masks[1:]) and inst.category_ids == [4]
    torch.testing.assert_close(inst.scores, torch.tensor([0.4]))  # IoU prediction x detector score
    assert segm_stats(coco_ground_truth([sample]), coco_results([inst]))["mAP"] == pytest.approx(0.5)


def test_tensor_image_predictor_equals_sam2_set_image():
    """At sam2's native 1024 px, feeding the transformed tensor gives set_image's features and masks exactly."""
    model = build_sam2("t", video=False)
    rgb = (torch.rand(90, 120, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    stock, ours = SAM2ImagePredictor(model), TensorImagePredictor(model)
    stock.set_image(rgb)
    ours.set_image_tensor(stock._transforms(rgb), rgb.shape[:2])
    for a, b in zip(stock._features["high_res_feats"] + [stock._features["image_embed"]],
                    ours._features["high_res_feats"] + [ours._features["image_embed"]], strict=True):  # fmt: skip
        assert torch.equal(a, b)
    box = np.array([[10, 20, 70, 80]])
    for got, want in zip(ours.predict(box=box, multimask_output=False), stock.predict(box=box, multimask_output=False), strict=True):  # fmt: skip
        np.testing.assert_array_equal(got, want)


def test_load_detections_from_a_results_file(tmp_path):
    dets = [
        {"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 0.5},
        {"image_id": 2, "category_id": 3, "bbox": [0, 0, 2, 2], "score": 0.9},
        {"image_id": 1, "category_id": 4, "bbox": [5, 5, 1, 1], "score": 0.1},
    ]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    grouped = load_detections(path)
    assert grouped == {1: [dets[0], dets[2]], 2: [dets[1]]} == load_detections(dets)
    with pytest.raises(MQSAM2Error, match="lacks score"):
        load_detections([{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]}])
    with pytest.raises(MQSAM2Error, match="not found"):
        load_detections(tmp_path / "missing.json")


class FixedPredictor:
    """Stands in for TensorImagePredictor: the first box gets an empty mask, every other box a square."""

    def __init__(self, model):
        self.model = model

    def set_image_tensor(self, image, orig_hw):
        self.size = tuple(orig_hw)

    def predict(self, box, multimask_output):
        masks = np.zeros((len(box), 1, *self.size), dtype=np.float32)
        masks[1:, 0, 5:15, 5:15] = 1.0
        return masks, np.full((len(box), 1), 0.9, dtype=np.float32), None


def test_fidelity_map_of_a_model_against_itself_is_one_even_with_empty_reference_masks(monkeypatch):
    """COCO cannot match an empty mask, so a prompt whose reference mask is empty is left out with its
    prediction: a model scored against itself is then exactly 1 (0.25 if the empty mask stayed in)."""
    monkeypatch.setattr(coco, "TensorImagePredictor", FixedPredictor)
    sample = SimpleNamespace(
        image_id=3,
        image=torch.zeros(3, 8, 8),
        orig_size=(20, 20),
        boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0], [5.0, 5.0, 15.0, 15.0]]),
        category_ids=[1, 1],
    )
    assert mask_map("model", [sample], reference="model")["mAP"] == pytest.approx(1.0)
