"""Selective Importance-driven Synthesis (Mix-QSAM2): a bounded, content-aware memory bank for SAM2.

SAM2 feeds memory attention its conditioning frames plus the 6 most recent frames. SIS keeps a bank per object
and tracking direction instead: when it overflows, the older entries most similar to the newest one (t-1) are
fused into one softmax-weighted memory, so redundant context shrinks while dissimilar (informative) frames stay.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mqsam2.errors import MQSAM2Error
from mqsam2.memory.predictor import VideoPredictor

SIMILARITIES = ("flat", "per_location")


def check_bank_settings(capacity: int, k: int, tau: float, similarity: str) -> None:
    """A bank's SIS settings, one line each when wrong (shared with the ONNX tracker's numpy bank)."""
    if k < 2 or capacity < k:
        raise MQSAM2Error(
            f"SIS needs 2 <= k <= capacity (k entries fuse into one), got k={k}, capacity={capacity}"
        )
    _check_settings(tau, similarity)


def _check_settings(tau: float, similarity: str) -> None:
    if tau <= 0:
        raise MQSAM2Error(f"tau must be positive, got {tau}")
    if similarity not in SIMILARITIES:
        raise MQSAM2Error(f"unknown similarity {similarity!r}: use one of {', '.join(SIMILARITIES)}")


def _scores(features: Tensor, similarity: str) -> Tensor:
    """Cosine similarity of every entry but the last to the last (fp32), shape [N-1].

    `flat` compares whole maps flattened over C*H*W; `per_location` compares channel vectors (dim -3) at each
    position and averages over positions, so a moved object does not dominate the score.
    """
    older, reference = features[:-1].float(), features[-1:].float()
    if similarity == "flat":
        return F.cosine_similarity(older.flatten(1), reference.flatten(1), dim=1)
    if features.ndim < 4:
        raise MQSAM2Error(
            f"per_location similarity needs features [N, ..., C, H, W], got {list(features.shape)}"
        )
    return F.cosine_similarity(older, reference, dim=-3).flatten(1).mean(dim=1)


def synthesize(
    features: Tensor, k: int = 3, tau: float = 1.0, similarity: str = "flat"
) -> tuple[Tensor, Tensor, Tensor]:
    """One SIS step over memories ordered oldest -> newest (the last is the t-1 reference).

    Returns (new_features [N-k+1, ...] = [F_synth] + unselected in time order + t-1, selected indices in
    descending score order, their softmax(score / tau) weights). Math in fp32, result in the input dtype;
    ties go to the older entry.
    """
    if features.ndim < 2 or not 1 <= k < len(features):
        raise MQSAM2Error(
            f"synthesize needs 1 <= k < N entries, got k={k} with features {list(features.shape)}"
        )
    _check_settings(tau, similarity)
    scores = _scores(features, similarity)
    selected = torch.sort(scores, descending=True, stable=True).indices[:k]
    weights = torch.softmax(scores[selected] / tau, dim=0)
    shape = (k,) + (1,) * (features.ndim - 1)
    fused = (weights.view(shape) * features[selected].float()).sum(dim=0, keepdim=True).to(features.dtype)
    keep = torch.ones(len(features), dtype=torch.bool, device=features.device)
    keep[selected] = False
    return torch.cat([fused, features[keep]]), selected, weights


@dataclass
class MemoryEntry:
    """One bank slot: a memory map, its spatial positional encoding and the frames it summarises."""

    features: Tensor
    pos_enc: Tensor
    frames: tuple[int, ...]


@dataclass
class MemoryBank:
    """The bounded memory of one object in one tracking direction (conditioning frames live outside it)."""

    capacity: int
    k: int = 3
    tau: float = 1.0
    similarity: str = "flat"
    entries: list[MemoryEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_bank_settings(self.capacity, self.k, self.tau, self.similarity)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: MemoryEntry) -> None:
        """Append the newest memory, then synthesize until the bank fits its capacity again."""
        self.entries.append(entry)
        while len(self.entries) > self.capacity:
            stacked = torch.stack([e.features for e in self.entries])
            new_features, selected, _ = synthesize(stacked, self.k, self.tau, self.similarity)
            chosen = set(selected.tolist())
            merged = sorted(f for i in chosen for f in self.entries[i].frames)
            # clone: a view would keep the whole stacked bank alive
            fused = MemoryEntry(new_features[0].clone(), self.entries[-1].pos_enc, tuple(merged))
            self.entries = [fused] + [e for i, e in enumerate(self.entries) if i not in chosen]


@dataclass(frozen=True)
class SISOptions:
    """SIS settings; capacity counts non-conditioning entries (SAM2's window is num_maskmem - 1 = 6)."""

    capacity: int = 6
    k: int = 3
    tau: float = 1.0
    similarity: str = "flat"
    free_evicted: bool = False

    def __post_init__(self) -> None:
        MemoryBank(self.capacity, self.k, self.tau, self.similarity)  # validates the bank settings

    def new_bank(self) -> MemoryBank:
        return MemoryBank(self.capacity, self.k, self.tau, self.similarity)


@dataclass
class _Stream:
    """A bank plus the frame it last prepared, to tell a continuing propagation from a new one."""

    bank: MemoryBank
    frame: int


class _PointersOnly(Mapping):
    """sam2's per-frame outputs with their memories hidden (zero tokens) and object pointers intact.

    SAM2 reads memories and object pointers from the same per-frame outputs in one method; through this view the
    stock method still assembles conditioning memories and pointers exactly, while the bank supplies the rest.
    """

    def __init__(self, outputs: Mapping[int, dict], mem_dim: int):
        self._outputs = outputs
        self._mem_dim = mem_dim

    def __getitem__(self, frame: int) -> dict:
        pointer = self._outputs[frame]["obj_ptr"]
        empty = pointer.new_empty(pointer.shape[0], self._mem_dim, 0)
        return {"obj_ptr": pointer, "maskmem_features": empty, "maskmem_pos_enc": [empty]}

    def __iter__(self) -> Iterator[int]:
        return iter(self._outputs)

    def __len__(self) -> int:
        return len(self._outputs)


@contextmanager
def _inserted_before_pointers(attention: nn.Module, memory: Tensor, memory_pos: Tensor) -> Iterator[None]:
    """Splice extra memory tokens between the conditioning memories and the object pointers of one call."""

    def insert(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        split = kwargs["memory"].shape[0] - kwargs["num_obj_ptr_tokens"]
        for key, extra in (("memory", memory), ("memory_pos", memory_pos)):
            kwargs[key] = torch.cat([kwargs[key][:split], extra, kwargs[key][split:]])
        return args, kwargs

    handle = attention.register_forward_pre_hook(insert, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


_STREAMS_KEY = "mqsam2_sis_streams"


class SISVideoPredictor(VideoPredictor):
    """SAM2's video predictor with an SIS memory bank per object and direction instead of the recency window.

    Conditioning frames are always fed; the temporal encoding goes by slot rank (entry p of n gets
    t_rel = min(n - p, num_maskmem - 1)); object pointers are SAM2's own. Chosen through hydra's `_target_`
    (`build_sam2(..., memory_policy="sis")`); constructor kwargs arrive as `++model.<key>=<value>` overrides.
    With `free_evicted`, per-frame outputs that fell out of SAM2's object-pointer window are dropped (their
    memory lives on in the bank only while it is still there), so the state stays bounded on long streams;
    this assumes one pass over the stream (later re-propagation cannot reuse dropped frames).
    """

    def __init__(
        self,
        capacity: int | None = None,
        k: int = 3,
        tau: float = 1.0,
        similarity: str = "flat",
        free_evicted: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.configure_memory(
            capacity=capacity, k=k, tau=tau, similarity=similarity, free_evicted=free_evicted
        )

    def configure_memory(self, capacity: int | None = None, **options) -> None:
        """Set the SIS options (capacity defaults to SAM2's window, num_maskmem - 1); applies to new banks."""
        capacity = self.num_maskmem - 1 if capacity is None else capacity
        self.memory_options = SISOptions(capacity=capacity, **options)

    def _prepare_memory_conditioned_features(
        self,
        frame_idx,
        is_init_cond_frame,
        current_vision_feats,
        current_vision_pos_embeds,
        feat_sizes,
        output_dict,
        num_frames,
        track_in_reverse=False,
    ):
        stock_args = (current_vision_feats, current_vision_pos_embeds, feat_sizes)
        if is_init_cond_frame or self.num_maskmem == 0:
            return super()._prepare_memory_conditioned_features(
                frame_idx, is_init_cond_frame, *stock_args, output_dict, num_frames, track_in_reverse
            )
        step = -1 if track_in_reverse else 1
        bank = self._updated_bank(output_dict, frame_idx, step)
        if self.memory_options.free_evicted:
            self._drop_outside_pointer_window(output_dict["non_cond_frame_outputs"], frame_idx, step)
        pointers = _PointersOnly(output_dict["non_cond_frame_outputs"], self.mem_dim)
        outputs = {**output_dict, "non_cond_frame_outputs": pointers}
        splice = (
            _inserted_before_pointers(
                self.memory_attention, *self._bank_tokens(bank, current_vision_feats[-1].device)
            )
            if len(bank)
            else nullcontext()
        )
        with splice:
            return super()._prepare_memory_conditioned_features(
                frame_idx, is_init_cond_frame, *stock_args, outputs, num_frames, track_in_reverse
            )

    def _updated_bank(self, output_dict: dict, frame_idx: int, step: int) -> MemoryBank:
        """Add the memory of the frame prepared last; a new propagation (not a continuation) starts a new bank."""
        streams = output_dict.setdefault(_STREAMS_KEY, {})
        stream = streams.get(step)
        cond = output_dict["cond_frame_outputs"]
        continues = (
            stream is not None
            and (frame_idx - stream.frame) * step > 0
            and all(t in cond for t in range(stream.frame + step, frame_idx, step))
        )
        if not continues:
            streams[step] = _Stream(self.memory_options.new_bank(), frame_idx)
            return streams[step].bank
        previous, stream.frame = stream.frame, frame_idx
        out = output_dict["non_cond_frame_outputs"].get(previous)
        if out is not None and out["maskmem_features"] is not None:
            stream.bank.add(MemoryEntry(out["maskmem_features"], out["maskmem_pos_enc"][-1], (previous,)))
        return stream.bank

    def _bank_tokens(self, bank: MemoryBank, device: torch.device) -> tuple[Tensor, Tensor]:
        """Memory tokens [n*HW, B, C] and their encodings (spatial + temporal by slot rank), as SAM2 lays them."""
        memory, memory_pos = [], []
        n = len(bank)
        for rank, entry in enumerate(bank.entries):
            t_rel = min(n - rank, self.num_maskmem - 1)
            memory.append(entry.features.to(device, non_blocking=True).flatten(2).permute(2, 0, 1))
            pos = entry.pos_enc.to(device).flatten(2).permute(2, 0, 1)
            memory_pos.append(pos + self.maskmem_tpos_enc[t_rel - 1])
        return torch.cat(memory), torch.cat(memory_pos)

    def _drop_outside_pointer_window(self, outputs: dict, frame_idx: int, step: int) -> None:
        """Forget this direction's per-frame outputs SAM2 will not read again (beyond the pointer window)."""
        for t in [t for t in outputs if (frame_idx - t) * step >= self.max_obj_ptrs_in_encoder]:
            del outputs[t]
