"""evaluate_video / evaluate_images (protocol, fidelity, bad input) and the Lightning validation callback."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from mqsam2.callbacks import EvaluationCallback
from mqsam2.errors import MQSAM2Error
from mqsam2.evaluate import evaluate_images, evaluate_video, evaluate_video_grid
from mqsam2.memory import SISVideoPredictor, VideoPredictor
from mqsam2.models import build_sam2

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
    # 4 frames never overflow the bank, so SIS equals the stock memory here.
    assert rows[1]["J&F"] == rows[3]["J&F"] and rows[1]["fidelity/J&F"] == rows[3]["fidelity/J&F"]
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


class TinyModule(L.LightningModule):
    """The shape the reconstruction trainer's module has for this callback: `.model` and `.fp_model`."""

    def __init__(self, model, fp_model):
        super().__init__()
        self.model, self.fp_model = model, fp_model

    def validation_step(self, batch, batch_idx):
        return None


def test_callback_logs_metrics_and_overlays_in_a_trainer_validation_loop(
    tmp_path, model, other_model, monkeypatch
):
    monkeypatch.setenv("WANDB_SILENT", "true")
    clips = [make_clip(num_frames=6, seed=s, video_id=f"clip{s}") for s in (0, 1)]
    images = [make_image(i) for i in (1, 2)]
    callback = EvaluationCallback(
        clips, images, memory_policy="sis", memory_options={"capacity": 2, "k": 2}, overlays=1
    )
    csv_logger = CSVLogger(tmp_path, name="run")
    wandb_logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="mqsam2-test")
    trainer = L.Trainer(
        accelerator="cpu",
        logger=[csv_logger, wandb_logger],
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    module = TinyModule(other_model, model)
    seen = []
    original = SISVideoPredictor._prepare_memory_conditioned_features

    def spy(self, *args, **kwargs):
        seen.append(type(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SISVideoPredictor, "_prepare_memory_conditioned_features", spy)
    trainer.validate(module, dataloaders=torch.utils.data.DataLoader([0]))
    wandb_logger.experiment.finish()
    assert seen and type(other_model) is VideoPredictor  # evaluated under SIS, restored afterwards
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as fh:
        row = next(csv.DictReader(fh))
    for key in ("val/J", "val/F", "val/J&F", "val/mAP", "val/fidelity/J&F", "val/fidelity/mAP"):
        assert 0 <= float(row[key]) <= 1, key
    assert float(row["val/J&F"]) == pytest.approx((float(row["val/J"]) + float(row["val/F"])) / 2)
    overlays = list((tmp_path / "run" / "version_0" / "overlays").glob("*.png"))
    assert [p.name for p in overlays] == ["epoch000_clip0.png"]
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/images/val/overlays_*.png"))


def test_callback_needs_something_to_evaluate():
    with pytest.raises(MQSAM2Error, match="nothing to evaluate"):
        EvaluationCallback([], [])
