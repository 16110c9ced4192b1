"""evaluate_video / evaluate_images (protocol, fidelity, bad input) and the Lightning validation loop."""

from __future__ import annotations

import csv
import dataclasses
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch.utils.data import DataLoader, DistributedSampler

from mqsam2 import validation
from mqsam2.callbacks import OverlayCallback
from mqsam2.config import parse_config
from mqsam2.errors import MQSAM2Error
from mqsam2.evaluate import evaluate_images, evaluate_video, evaluate_video_grid
from mqsam2.memory import SISVideoPredictor, VideoPredictor, using_memory_policy
from mqsam2.metrics.coco import mask_map
from mqsam2.models import build_sam2
from mqsam2.pipeline import Datasets, stage_evaluate
from mqsam2.rundir import RunDir
from mqsam2.validation import EvaluationModule, ValidationData, rank_share

from .eval_data import EVAL_IMAGE_SIZE, make_clip, make_image


@pytest.fixture(scope="module")
def model():
    return build_sam2("t", image_size=EVAL_IMAGE_SIZE)


@pytest.fixture(scope="module")
def other_model():
    """Same architecture, different random weights: a stand-in for a damaged (quantized) model."""
    return build_sam2("t", image_size=EVAL_IMAGE_SIZE, seed=1)


class ReplayPredictor:
    """Answers with given masks and records the prompts: tests the protocol without SAM2."""

    def __init__(self, masks: torch.Tensor):
        self.masks, self.prompts = masks, None

    def track_clip(self, frames, video_size, prompts):
        self.prompts = prompts
        return self.masks[: len(prompts)]


def protocol_clip():
    """Object 2 first appears on frame 2; frames 1 and 4 carry no annotation."""
    clip = make_clip(num_frames=6, num_objects=2, seed=2)
    clip.masks[1, :2] = False
    clip.annotated = torch.tensor([True, False, True, True, False, True])
    return clip


def test_objects_are_prompted_on_first_visible_annotated_frame_and_scored_after_it():
    clip = protocol_clip()
    answer = clip.masks.clone()
    answer[0, 0] = answer[1, 2] = True  # wrong on each prompt frame: not scored
    answer[:, 1] = answer[:, 4] = True  # wrong on unannotated frames: not scored against labels
    replay = ReplayPredictor(answer)
    scores = evaluate_video(replay, [clip])
    assert scores == {"J": 1.0, "F": 1.0, "J&F": 1.0, "objects": 2}
    assert {k: p.frame for k, p in replay.prompts.items()} == {1: 0, 2: 2}
    ys, xs = clip.masks[1, 2].nonzero(as_tuple=True)
    assert replay.prompts[2].box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    answer[1, 3] = False  # wrong on a scored frame
    assert evaluate_video(ReplayPredictor(answer), [clip])["J"] < 1
    # Against a model's masks every frame after the prompt counts, annotated or not.
    assert evaluate_video(ReplayPredictor(clip.masks), [clip], reference=[answer])["J"] < 1


def test_fidelity_against_itself_is_perfect_and_against_another_model_is_not(model, other_model):
    clips = [make_clip(num_frames=4, seed=s, video_id=f"c{s}") for s in (0, 1)]
    assert evaluate_video(model, clips, reference=model) == {"J": 1.0, "F": 1.0, "J&F": 1.0, "objects": 4}
    damaged = evaluate_video(other_model, clips, reference=model)
    assert damaged["J&F"] < 1


def test_grid_has_a_row_per_model_and_policy(model, other_model):
    clips = [make_clip(num_frames=4, seed=3)]
    rows = evaluate_video_grid({"FP": model, "damaged": other_model}, clips, fp_model=model)
    assert [(r["model"], r["memory"]) for r in rows] == [
        ("FP", "fifo"),
        ("damaged", "fifo"),
        ("FP", "sis"),
        ("damaged", "sis"),
    ]
    assert rows[0]["fidelity/J&F"] == rows[2]["fidelity/J&F"] == 1.0 and rows[1]["fidelity/J&F"] < 1
    assert 0 <= rows[1]["J&F"] <= 1 and rows[1]["objects"] == 2
    assert rows[1]["J&F"] == evaluate_video(other_model, clips)["J&F"]
    # 4 frames never overflow the bank, so SIS equals the stock memory here (SIS tracks one object at a time,
    # the stock memory in a batch: a random-init model's near-zero logits may flip a pixel).
    assert rows[1]["J&F"] == pytest.approx(rows[3]["J&F"], abs=1e-3)
    assert rows[1]["fidelity/J&F"] == pytest.approx(rows[3]["fidelity/J&F"], abs=1e-3)
    assert type(model) is type(other_model) is VideoPredictor


def test_bad_video_input_gives_clear_errors(model):
    clip = make_clip(num_frames=4)
    with pytest.raises(MQSAM2Error, match="validation set is empty"):
        evaluate_video(model, [])
    hidden = make_clip(num_frames=4, video_id="hidden")
    hidden.masks[:] = False
    with pytest.raises(MQSAM2Error, match="video hidden has no prompt on any frame"):
        evaluate_video(model, [hidden])
    wrong = make_clip(num_frames=4, video_id="wrong")
    wrong.masks = wrong.masks[..., :-1]
    with pytest.raises(MQSAM2Error, match=r"video wrong: masks must be bool \[objects, frames, H, W\]"):
        evaluate_video(model, [wrong])
    with pytest.raises(MQSAM2Error, match="one per clip"):
        evaluate_video(model, [clip], reference=[])
    with pytest.raises(MQSAM2Error, match="reference"):
        evaluate_video(ReplayPredictor(clip.masks), [clip], reference=[clip.masks[..., :-1]])
    with pytest.raises(MQSAM2Error, match="unknown reference 'fp'"):
        evaluate_video(model, [clip], reference="fp")


def test_evaluate_images_against_labels_and_fidelity(model, other_model):
    images = [make_image(i) for i in (1, 2)]
    stats = evaluate_images(model, images)
    assert 0 <= stats["mAP"] <= 1 and set(stats) >= {"mAP", "mAP50", "mAP75"}
    fidelity = evaluate_images(other_model, images, reference=model)
    assert 0 <= fidelity["mAP"] <= 1
    with pytest.raises(MQSAM2Error, match="image set is empty"):
        evaluate_images(model, [])
    bad = make_image(3, image_size=EVAL_IMAGE_SIZE * 2)
    with pytest.raises(MQSAM2Error, match=r"image must be \[3, 64, 64\]"):
        evaluate_images(model, [bad])


def validate(module, clips=(), images=(), callbacks=(), loggers=False, root=None) -> dict[str, float]:
    """One Lightning validation loop over the items, as the fit runs it; the logged metrics."""
    trainer = L.Trainer(
        accelerator="cpu",
        use_distributed_sampler=False,
        logger=loggers,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
    )
    trainer.validate(module, datamodule=ValidationData(clips, images), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_validation_loop_logs_the_direct_metrics_and_draws_overlays(
    tmp_path, model, other_model, monkeypatch
):
    monkeypatch.setenv("WANDB_SILENT", "true")
    clips = [make_clip(num_frames=6, seed=s, video_id=f"clip{s}") for s in (0, 1)]
    images = [make_image(i) for i in (1, 2)]
    sis = {"capacity": 2, "k": 2}
    csv_logger = CSVLogger(tmp_path, name="run")
    wandb_logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="mqsam2-test")
    module = EvaluationModule(other_model, model, memory_policy="sis", memory_options=sis)
    seen = []
    original = SISVideoPredictor._prepare_memory_conditioned_features

    def spy(self, *args, **kwargs):
        seen.append(type(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SISVideoPredictor, "_prepare_memory_conditioned_features", spy)
    loggers = [csv_logger, wandb_logger]
    logged = validate(module, clips, images, [OverlayCallback(overlays=1)], loggers, tmp_path)
    wandb_logger.experiment.finish()
    # Evaluated under SIS, each model's own policy restored afterwards.
    assert seen and type(other_model) is type(model) is VideoPredictor
    # The same metrics computed directly, without Lightning, on the same models and items.
    with using_memory_policy(other_model, "sis", **sis), using_memory_policy(model, "sis", **sis):
        scores = {"": evaluate_video(other_model, clips)}
        scores["fidelity/"] = evaluate_video(other_model, clips, reference=model)
    for prefix, reference in (("", None), ("fidelity/", model)):
        stats = mask_map(other_model, images, reference=reference)
        scores[prefix] |= {k: stats[k] for k in ("mAP", "mAP50", "mAP75")}
    expected = {f"val/{p}{k}": v for p, s in scores.items() for k, v in s.items() if k != "objects"}
    assert logged == pytest.approx(expected, rel=1e-6)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as fh:
        row = next(csv.DictReader(fh))
    assert {k: float(row[k]) for k in logged} == pytest.approx(logged, rel=1e-6)
    overlays = list((tmp_path / "run" / "version_0" / "overlays").glob("*.png"))
    assert [p.name for p in overlays] == ["epoch000_clip0.png"]
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/images/val/overlays_*.png"))


def test_a_model_against_itself_has_fidelity_one_and_label_free_clips_give_only_fidelity(model):
    unlabelled = make_clip(num_frames=4, seed=4, video_id="unlabelled")
    unlabelled.annotated = torch.tensor([True, False, False, False])  # only the prompt frame is annotated
    logged = validate(EvaluationModule(model, model, memory_policy=None), [unlabelled], [make_image(1)])
    assert {k: v for k, v in logged.items() if "fidelity" in k} == {
        "val/fidelity/J": 1.0,
        "val/fidelity/F": 1.0,
        "val/fidelity/J&F": 1.0,
        "val/fidelity/mAP": 1.0,
        "val/fidelity/mAP50": 1.0,
        "val/fidelity/mAP75": 1.0,
    }
    assert {k for k in logged if "fidelity" not in k} == {"val/mAP", "val/mAP50", "val/mAP75"}


class Recorded(list):
    """A validation set that records which items are indexed, as a lazy set decodes them."""

    def __init__(self, items):
        super().__init__(items)
        self.indexed = []

    def __getitem__(self, index):
        self.indexed.append(index)
        return super().__getitem__(index)


def test_the_loop_visits_each_item_once_indexing_one_at_a_time(model, monkeypatch):
    clips = Recorded([make_clip(num_frames=2, seed=s, video_id=f"clip{s}") for s in range(3)])
    images = Recorded([make_image(i) for i in (1, 2)])
    tracked, scored = [], []
    original = validation.predict_instances

    def track(model, clip, prompts):
        tracked.append(clip.video_id)
        return clip.masks

    def predict(predictor, sample, detections):
        scored.append(sample.image_id)
        return original(predictor, sample, detections)

    monkeypatch.setattr(validation, "track", track)
    monkeypatch.setattr(validation, "predict_instances", predict)
    logged = validate(EvaluationModule(model, model), clips, images)
    assert clips.indexed == [0, 1, 2] and images.indexed == [0, 1]
    assert tracked == ["clip0", "clip0", "clip1", "clip1", "clip2", "clip2"]  # the quantized and the FP model
    assert scored == [1, 1, 2, 2]
    assert logged["val/J&F"] == logged["val/fidelity/J&F"] == 1.0


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_shares_are_disjoint_complete_and_even_without_repeats(world):
    for count in range(8):
        shares = [rank_share(count, rank, world) for rank in range(world)]
        items = [i for share in shares for i in share if i is not None]
        assert sorted(items) == list(range(count))  # each item on exactly one rank
        assert {len(share) for share in shares} == {-(-count // world)}  # same number of steps everywhere
        assert all(None not in share[: len(share) - share.count(None)] for share in shares)  # fillers last


def test_a_distributed_sampler_is_refused_and_nothing_to_evaluate_is_an_error(model):
    loader = DataLoader([0], sampler=DistributedSampler([0], num_replicas=1, rank=0))
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    with pytest.raises(MQSAM2Error, match="count twice"):
        trainer.validate(EvaluationModule(model, model), dataloaders=loader, verbose=False)
    with pytest.raises(MQSAM2Error, match="nothing to evaluate"):
        ValidationData([], [])


def test_stage_evaluate_logs_the_loop_and_its_table_agrees(tmp_path, model, other_model):
    """The fit's evaluation stage: the validation loop's metrics equal the comparison table's row for the same
    model and memory policy, which the non-Lightning path (evaluate_video_grid, mask_map) computes."""
    config = parse_config(["--config", "configs/demo.yaml", "--run_root", str(tmp_path)])
    evaluation = dataclasses.replace(config.evaluation, memory=["sis"], baselines=[], overlays=1)
    config = dataclasses.replace(config, evaluation=evaluation)
    data = Datasets(None, [make_clip(num_frames=4, seed=5)], [make_image(1)])
    results = stage_evaluate(other_model, model, config, data, RunDir(tmp_path / "run"), [])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == results
    row = next(r for r in results["table"] if r["model"] == "mixqsam2 Avg-4")  # no plan.json: no averages
    validation = results["validation"]
    for key in ("J", "F", "J&F", "fidelity/J", "fidelity/F", "fidelity/J&F", "mAP", "fidelity/mAP"):
        assert validation[f"val/{key}"] == pytest.approx(row[key], rel=1e-6), key
    assert list((tmp_path / "run" / "eval" / "overlays").glob("*.png"))
