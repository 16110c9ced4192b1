"""The forward passes every calibration stage runs: importance, observers and reconstruction all see SAM2
exactly as deployed (frames through the image encoder; clips tracked from GT prompts through memory)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mqsam2.data import ImageSample, VideoClip
from mqsam2.errors import MQSAM2Error
from mqsam2.evaluate import clip_prompts
from mqsam2.memory.batched import batched_tracking_supported, track_clips
from mqsam2.memory.predictor import VideoPredictor
from mqsam2.models import TensorImagePredictor
from mqsam2.reconstruct.positions import tracking_clip


@dataclass
class Workload:
    """Calibration data plus how to push it through a model; `shard` splits it across DDP ranks."""

    videos: Sequence[VideoClip]
    images: Sequence[ImageSample]
    prompt: str = "box"
    max_objects: int | None = None
    encoder_batch: int = 4

    def shard(self, rank: int, world_size: int) -> Workload:
        if world_size > 1 and self.videos and len(self.videos) < world_size:
            raise MQSAM2Error(
                f"{len(self.videos)} calibration videos cannot be split over {world_size} ranks: "
                "raise data.calib_videos to at least the number of GPUs"
            )
        return dataclasses.replace(
            self, videos=self.videos[rank::world_size], images=self.images[rank::world_size]
        )

    def samples(self, clips: int, frames: int, images: int) -> list[Workload]:
        """One workload per sample of an output measurement: each of the first `clips` clips cut to its first
        `frames` frames, and each of the first `images` images."""
        heads = [
            dataclasses.replace(
                clip,
                frames=clip.frames[:frames],
                masks=clip.masks[:, :frames],
                frame_indices=clip.frame_indices[:frames],
                annotated=clip.annotated[:frames],
            )
            for clip in self.videos[:clips]
        ]
        return [dataclasses.replace(self, videos=[clip], images=[]) for clip in heads] + [
            dataclasses.replace(self, videos=[], images=[image]) for image in self.images[:images]
        ]

    def all_frames(self) -> torch.Tensor:
        return torch.cat([c.frames for c in self.videos] + [s.image[None] for s in self.images])

    @torch.inference_mode()
    def run_encoder(self, model: torch.nn.Module, frames: torch.Tensor | None = None) -> None:
        """Frames (default: every calibration frame and image) through the image encoder (trunk + neck)."""
        device = next(model.parameters()).device
        frames = self.all_frames() if frames is None else frames
        for start in range(0, len(frames), self.encoder_batch):
            model.forward_image(frames[start : start + self.encoder_batch].to(device))

    @torch.inference_mode()
    def run_full(self, model: VideoPredictor) -> None:
        """Every clip tracked from its prompts (memory attention, memory encoder and mask decoder see their
        deployment inputs), and every image segmented from its boxes. Unit calls made while a clip is tracked
        know their (clip, frame) (`mqsam2.reconstruct.positions`). Objects and clips are stepped in batches
        where the model allows it (`mqsam2.memory.batched`), one object at a time otherwise."""
        prompts = [clip_prompts(clip, self.prompt, self.max_objects) for clip in self.videos]
        if batched_tracking_supported(model, prompts):
            track_clips(model, self.videos, prompts, encoder_batch=self.encoder_batch)
        else:
            for index, (clip, clip_prompt) in enumerate(zip(self.videos, prompts, strict=True)):
                with tracking_clip(model, index):
                    model.track_clip(clip.frames, clip.orig_size, clip_prompt)
        self.run_images(model)

    @torch.inference_mode()
    def run_images(self, model: VideoPredictor) -> None:
        """Each image segmented from its GT boxes, then refined once with the first pass's mask logits as a
        dense prompt (SAM's interactive loop), which is what exercises the prompt encoder's mask convs."""
        predictor = TensorImagePredictor(model)
        for sample in self.images:
            if not len(sample.boxes):
                continue
            predictor.set_image_tensor(sample.image, sample.orig_size)
            boxes = sample.boxes.numpy()
            _, _, logits = predictor.predict(box=boxes, multimask_output=False)
            predictor.predict(box=boxes, mask_input=logits, multimask_output=False)

    def run(self, model: VideoPredictor, encoder_only: bool = False) -> None:
        if encoder_only:
            self.run_encoder(model)
        else:
            self.run_full(model)
