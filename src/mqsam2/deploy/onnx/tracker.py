"""SAM2's video tracking loop on the host, in numpy, around the ONNX Runtime sessions of an exported tracker
(`mqsam2.deploy.onnx.video`): no PyTorch at inference.

The loop is sam2's `SAM2VideoPredictor` as `mqsam2.memory.VideoPredictor.track_clip` runs it: every object
prompted on its frame (a box or clicks; its one conditioning frame), one forward propagation from the
earliest prompt frame, each object with its own state. Per frame and object: memory selection (FIFO: the
conditioning frame and the `num_maskmem - 1` most recent frames; SIS: the conditioning frame and the
object's synthesised bank, `mqsam2.deploy.onnx.memory_bank`), the temporal encodings, the object pointers
with their frame distances, memory attention, the video-mode decoder and the memory encoder. sam2 stores the
memories in bfloat16; so does this loop (rounded to nearest even, held as float32).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mqsam2.deploy.onnx.layout import (
    DECODER_FILES,
    FRAME_ENCODER_FILE,
    FRAME_ENCODER_OUTPUTS,
    GRAPH_FILES,
    MEMORY_ATTENTION_FILE,
    MEMORY_ENCODER_FILE,
    TRACKER_FILE,
)
from mqsam2.deploy.onnx.memory_bank import MemoryBank, to_bfloat16
from mqsam2.deploy.onnx.sessions import session
from mqsam2.errors import MQSAM2Error

BINARISED_LOGIT = np.float32(1e4)  # sigmoid(+-1e4) is exactly 1 and 0 in float32
POLICIES = ("fifo", "sis")


@dataclass(frozen=True)
class TrackPrompt:
    """One object's prompt on one frame, in video pixels: a box (x0, y0, x1, y1) and / or clicks."""

    frame: int
    box: tuple[float, float, float, float] | None = None
    points: np.ndarray | None = None  # [P, 2] (x, y)
    labels: np.ndarray | None = None  # [P]: 1 foreground, 0 background

    def model_points(self, video_size: tuple[int, int], image_size: int) -> tuple[np.ndarray, np.ndarray]:
        """sam2's point inputs [1, P, 2] and [1, P]: the box as two corners labelled 2 and 3 first, then the
        clicks, scaled from video pixels to the model's input as `add_new_points_or_box` scales them."""
        coords, labels = [], []
        if self.box is not None:
            coords.append(np.asarray(self.box, np.float32).reshape(2, 2))
            labels.append(np.array([2, 3], np.int32))
        if self.points is not None:
            coords.append(np.asarray(self.points, np.float32).reshape(-1, 2))
            labels.append(np.asarray(self.labels, np.int32).reshape(-1))
        if not coords:
            raise MQSAM2Error(f"the prompt on frame {self.frame} has neither a box nor points: give one")
        height, width = video_size
        points = np.concatenate(coords) / np.array([width, height], np.float32) * np.float32(image_size)
        return points[None].astype(np.float32), np.concatenate(labels)[None]


def tokens(feature_map: np.ndarray) -> np.ndarray:
    """[1, C, h, w] -> [h * w, 1, C], sam2's flatten(2).permute(2, 0, 1)."""
    return feature_map.reshape(feature_map.shape[1], -1).T[:, None].copy()


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[..., H, W] -> [..., *size]: torch's bilinear interpolation with align_corners=False (no antialias)."""

    def weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(n_in / n_out) - 0.5, 0)
        low = np.minimum(source.astype(np.int64), n_in - 1)
        return low, np.minimum(low + 1, n_in - 1), (source - low).astype(np.float32)

    y0, y1, wy = weights(x.shape[-2], size[0])
    x0, x1, wx = weights(x.shape[-1], size[1])
    rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


@dataclass
class FrameOutput:
    """What sam2 keeps of one object on one frame."""

    maskmem: np.ndarray  # [hw, 1, mem_dim] memory tokens, bfloat16 values
    obj_ptr: np.ndarray  # [1, C]
    low_res_masks: np.ndarray  # [1, 1, S/4, S/4] logits


@dataclass
class ObjectState:
    """One object's outputs: its conditioning (prompt) frame and the tracked frames; with SIS, its bank and
    the frame it last prepared (a bank grows by that frame's memory when the propagation continues)."""

    cond: dict[int, FrameOutput] = field(default_factory=dict)
    non_cond: dict[int, FrameOutput] = field(default_factory=dict)
    bank: MemoryBank | None = None
    last_prepared: int | None = None


class OnnxVideoTracker:
    """An exported SAM2 video tracker on ONNX Runtime (CPU); `policy` and `memory_options` override the
    memory policy the model was exported with ("fifo" or "sis")."""

    def __init__(
        self,
        directory: str | Path,
        threads: int | None = None,
        policy: str | None = None,
        memory_options: Mapping | None = None,
        optimize: bool = True,
    ):
        directory = Path(directory)
        missing = [name for name in (*GRAPH_FILES, TRACKER_FILE) if not (directory / name).is_file()]
        if missing:
            raise MQSAM2Error(
                f"{directory} holds no exported video tracker ({', '.join(missing)} missing): write one with "
                "python -m mqsam2.deploy --target onnx or mqsam2.deploy.onnx.export_video_tracker"
            )
        saved = json.loads((directory / TRACKER_FILE).read_text())
        self.settings: dict = saved["settings"]
        self.policy = policy or saved["memory_policy"]
        if self.policy not in POLICIES:
            raise MQSAM2Error(
                f"memory policy {self.policy!r}: the ONNX tracker runs one of {', '.join(POLICIES)}"
            )
        self.memory_options = dict(memory_options if memory_options is not None else saved["memory_options"])
        if self.policy == "sis":
            self.memory_options.pop("free_evicted", None)  # the host keeps only the frames it reads
            self.memory_options.setdefault("capacity", self.settings["num_maskmem"] - 1)
            MemoryBank(**self.memory_options)  # validates the options before any frame is tracked
        self.no_mem_embed = np.asarray(saved["no_mem_embed"], np.float32).reshape(1, -1, 1, 1)
        self.maskmem_tpos_enc = np.asarray(saved["maskmem_tpos_enc"], np.float32)[:, None]  # [n, 1, mem_dim]
        self.image_size = int(self.settings["image_size"])
        self.frame_encoder = session(directory / FRAME_ENCODER_FILE, threads, optimize)
        self.decoders = {m: session(directory / f, threads, optimize) for m, f in DECODER_FILES.items()}
        self.memory_attention = session(directory / MEMORY_ATTENTION_FILE, threads, optimize)
        self.memory_encoder = session(directory / MEMORY_ENCODER_FILE, threads, optimize)
        self.maskmem_pos: np.ndarray | None = None  # the memories' spatial encoding, the same on every frame

    def encode_frame(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """The frame encoder's four maps for one prepared frame [3, S, S]."""
        image = np.asarray(image, np.float32).reshape(1, 3, self.image_size, self.image_size)
        return dict(zip(FRAME_ENCODER_OUTPUTS, self.frame_encoder.run(None, {"image": image}), strict=True))

    def track(
        self, frames, video_size: tuple[int, int], prompts: Mapping[int, TrackPrompt]
    ) -> dict[int, np.ndarray]:
        """Masks per object id, [T, H, W] bool at video resolution, for frames [T, 3, S, S] prepared as the
        data layer prepares them (or an iterable of [3, S, S]); frames before an object's prompt frame are
        empty for it."""
        frames = list(frames)
        if not prompts:
            raise MQSAM2Error("a video needs a prompt on at least one frame for at least one object")
        for obj_id, prompt in prompts.items():
            if not 0 <= prompt.frame < len(frames):
                raise MQSAM2Error(
                    f"object {obj_id} is prompted on frame {prompt.frame} of a {len(frames)}-frame clip"
                )
        states = {obj_id: ObjectState() for obj_id in prompts}
        prompt_features = {prompt.frame: None for prompt in prompts.values()}
        for frame_idx in prompt_features:  # every prompt first, as sam2 adds them before propagating
            prompt_features[frame_idx] = self.encode_frame(frames[frame_idx])
        for obj_id, prompt in prompts.items():
            points = prompt.model_points(video_size, self.image_size)
            states[obj_id].cond[prompt.frame] = self._prompt_frame(prompt_features[prompt.frame], points)
        masks = {obj_id: np.zeros((len(frames), *video_size), bool) for obj_id in prompts}
        for frame_idx in range(min(prompt_features), len(frames)):
            features = prompt_features.pop(frame_idx, None) or self.encode_frame(frames[frame_idx])
            for obj_id, prompt in prompts.items():
                state = states[obj_id]
                out = state.cond.get(frame_idx)
                if out is None:
                    out = self._tracked_frame(features, state, frame_idx, len(frames))
                    state.non_cond[frame_idx] = out
                    self._forget_unread(state, frame_idx)
                if frame_idx >= prompt.frame:
                    masks[obj_id][frame_idx] = resize_bilinear(out.low_res_masks[0, 0], video_size) > 0
        return masks

    def _decode(self, pix_feat, features, points: np.ndarray, labels: np.ndarray, multimask: bool):
        feeds = {
            "pix_feat": pix_feat,
            "high_res_feats_0": features["high_res_feats_0"],
            "high_res_feats_1": features["high_res_feats_1"],
            "point_coords": points,
            "point_labels": labels,
        }
        return self.decoders[multimask].run(None, feeds)

    def _use_multimask(self, is_init_cond_frame: bool, num_points: int) -> bool:
        """sam2's `_use_multimask`."""
        s = self.settings
        return (
            s["multimask_output_in_sam"]
            and (is_init_cond_frame or s["multimask_output_for_tracking"])
            and s["multimask_min_pt_num"] <= num_points <= s["multimask_max_pt_num"]
        )

    def _memory(self, features, high_res_masks, object_score_logits, binarise: bool) -> np.ndarray:
        if binarise:
            high_res_masks = np.where(high_res_masks > 0, BINARISED_LOGIT, -BINARISED_LOGIT)
        maskmem, pos = self.memory_encoder.run(
            None,
            {
                "vision_feats": features["vision_feats"],
                "mask_logits": high_res_masks.astype(np.float32),
                "object_score_logits": object_score_logits,
            },
        )
        if self.maskmem_pos is None:
            self.maskmem_pos = tokens(pos)
        return to_bfloat16(tokens(maskmem))

    def _prompt_frame(self, features, prompt_points: tuple[np.ndarray, np.ndarray]) -> FrameOutput:
        """A prompt frame: no memory (the no-memory embedding added), the decoder on the prompt; its memory is
        encoded from the binarised mask, as sam2's `propagate_in_video_preflight` does."""
        points, labels = prompt_points
        pix_feat = features["vision_feats"] + self.no_mem_embed
        multimask = self._use_multimask(True, points.shape[1])
        low_res, high_res, obj_ptr, score = self._decode(pix_feat, features, points, labels, multimask)
        binarise = bool(self.settings["binarize_mask_from_pts_for_mem_enc"])
        return FrameOutput(self._memory(features, high_res, score, binarise), obj_ptr, low_res)

    def _tracked_frame(self, features, state: ObjectState, frame_idx: int, num_frames: int) -> FrameOutput:
        memory, memory_pos = self._spatial_memories(state, frame_idx)
        obj_ptrs, obj_ptr_tpos = self._object_pointers(state, frame_idx, num_frames)
        pix_feat = self.memory_attention.run(
            None,
            {
                "curr": tokens(features["vision_feats"]),
                "curr_pos": tokens(features["vision_pos"]),
                "memory": memory,
                "memory_pos": memory_pos,
                "obj_ptrs": obj_ptrs,
                "obj_ptr_tpos": obj_ptr_tpos,
            },
        )[0]
        points, labels = np.zeros((1, 1, 2), np.float32), -np.ones((1, 1), np.int32)  # sam2's empty prompt
        low_res, high_res, obj_ptr, score = self._decode(
            pix_feat, features, points, labels, self._use_multimask(False, 0)
        )
        return FrameOutput(self._memory(features, high_res, score, binarise=False), obj_ptr, low_res)

    def _spatial_memories(self, state: ObjectState, frame_idx: int) -> tuple[np.ndarray, np.ndarray]:
        """Memory tokens [M, 1, mem_dim] and their encodings: the conditioning frame (temporal slot
        num_maskmem - 1), then the recent frames (FIFO) or the bank (SIS), oldest first."""
        num_maskmem = self.settings["num_maskmem"]
        chosen = [(out.maskmem, num_maskmem - 1) for out in state.cond.values()]
        if self.policy == "sis":
            chosen += self._updated_bank(state, frame_idx).tokens(num_maskmem)
        else:
            chosen += [
                (out.maskmem, t_rel - 1)
                for t_rel, out in self._recent_frames(state, frame_idx)
                if out is not None
            ]
        memory = np.concatenate([maskmem for maskmem, _ in chosen])
        memory_pos = np.concatenate([self.maskmem_pos + self.maskmem_tpos_enc[slot] for _, slot in chosen])
        return memory, memory_pos

    def _recent_frames(self, state: ObjectState, frame_idx: int) -> list[tuple[int, FrameOutput | None]]:
        """sam2's non-conditioning memories, oldest first: (frames back, output) for t_rel = num_maskmem - 1
        .. 1; the last frame always, the others every `memory_temporal_stride_for_eval` frames."""
        stride = self.settings["memory_temporal_stride_for_eval"]
        recent = []
        for t_rel in range(self.settings["num_maskmem"] - 1, 0, -1):
            previous = (
                frame_idx - 1 if t_rel == 1 else ((frame_idx - 2) // stride) * stride - (t_rel - 2) * stride
            )
            recent.append((t_rel, state.non_cond.get(previous)))
        return recent

    def _updated_bank(self, state: ObjectState, frame_idx: int) -> MemoryBank:
        """`SISVideoPredictor._updated_bank`, forward only: a continuing propagation adds the memory of the
        frame prepared last; otherwise a new bank starts."""
        last = state.last_prepared
        continues = (
            state.bank is not None
            and last is not None
            and frame_idx > last
            and all(t in state.cond for t in range(last + 1, frame_idx))
        )
        state.last_prepared = frame_idx
        if not continues:
            state.bank = MemoryBank(**self.memory_options)
        elif last in state.non_cond:
            state.bank.add(state.non_cond[last].maskmem, (last,))
        return state.bank

    def _object_pointers(self, state: ObjectState, frame_idx: int, num_frames: int):
        """Pointers [N, 1, C] and their signed frame distances over the largest (sam2's order: the
        conditioning frames in the past, then the non-conditioning frames 1, 2, ... back)."""
        s = self.settings
        max_pointers = min(num_frames, s["max_obj_ptrs_in_encoder"])
        chosen = [
            (frame_idx - t if s["use_signed_tpos_enc_to_obj_ptrs"] else abs(frame_idx - t), out.obj_ptr)
            for t, out in state.cond.items()
            if t <= frame_idx or not s["only_obj_ptrs_in_the_past_for_eval"]
        ]
        for t_diff in range(1, min(max_pointers, frame_idx + 1)):
            out = state.non_cond.get(frame_idx - t_diff)
            if out is not None:
                chosen.append((t_diff, out.obj_ptr))
        if not chosen:
            return np.zeros((0, 1, s["hidden_dim"]), np.float32), np.zeros(0, np.float32)
        distances = np.array([d for d, _ in chosen], np.float32) / np.float32(max_pointers - 1)
        return np.stack([ptr for _, ptr in chosen]).astype(np.float32), distances

    def _forget_unread(self, state: ObjectState, frame_idx: int) -> None:
        """Drop tracked frames no later frame reads (past the pointer window and the memory window), so a long
        stream stays bounded; the SIS bank holds its own copies."""
        s = self.settings
        stride = s["memory_temporal_stride_for_eval"]
        reach = max(s["max_obj_ptrs_in_encoder"], stride * (s["num_maskmem"] - 1) + 2)
        for t in [t for t in state.non_cond if t <= frame_idx - reach]:
            del state.non_cond[t]
