"""The data layer: WebDataset shards of SA-V-style clips and COCO-style images, the converters and synthetic
generator that write them, and the loaders and calibration set that read them (see docs/data.md)."""

from mqsam2.data.build import BuildReport
from mqsam2.data.coco import convert_coco
from mqsam2.data.davis import convert_davis
from mqsam2.data.format import DataError, ImageRecord, ShardWriter, VideoRecord, read_shard
from mqsam2.data.loaders import (
    CalibrationSet,
    ClipBatch,
    ImageBatch,
    ImageSample,
    LazySamples,
    SampleRef,
    VideoClip,
    calibration_set,
    collate_clips,
    collate_images,
    expand_urls,
    image_dataset,
    validation_set,
    video_dataset,
)
from mqsam2.data.sav import convert_sav
from mqsam2.data.synth import SynthShards, ensure_synth, render_clip, render_image, write_synth

__all__ = [
    "BuildReport",
    "CalibrationSet",
    "ClipBatch",
    "DataError",
    "ImageBatch",
    "ImageRecord",
    "ImageSample",
    "LazySamples",
    "SampleRef",
    "ShardWriter",
    "SynthShards",
    "VideoClip",
    "VideoRecord",
    "calibration_set",
    "collate_clips",
    "collate_images",
    "convert_coco",
    "convert_davis",
    "convert_sav",
    "ensure_synth",
    "expand_urls",
    "image_dataset",
    "read_shard",
    "render_clip",
    "render_image",
    "validation_set",
    "video_dataset",
    "write_synth",
]
