"""Evaluation metrics: DAVIS J&F for video tracks, COCO mask mAP with box prompts."""

from mqsam2.metrics.coco import (
    Instances,
    MaskMAP,
    against_reference,
    coco_ground_truth,
    coco_results,
    load_detections,
    mask_map,
    predict_instances,
    segm_stats,
)
from mqsam2.metrics.jandf import JandF, boundary_f_measure, boundary_map, region_similarity

__all__ = [
    "Instances",
    "JandF",
    "MaskMAP",
    "against_reference",
    "boundary_f_measure",
    "boundary_map",
    "coco_ground_truth",
    "coco_results",
    "load_detections",
    "mask_map",
    "predict_instances",
    "region_similarity",
    "segm_stats",
]
