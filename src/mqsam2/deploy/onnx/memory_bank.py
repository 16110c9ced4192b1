"""The SIS memory bank (`mqsam2.memory.sis`) in numpy, for the ONNX tracker's host loop: when the bank
overflows, the k older entries most similar to the newest are fused into one softmax-weighted memory.

Entries are memory tokens [hw, 1, C] with bfloat16 values (as sam2 stores them); the arithmetic is float32
and the fused entry is rounded to bfloat16 again, as the PyTorch bank does it in the memories' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from mqsam2.memory.sis import check_bank_settings

COSINE_EPS = np.float32(1e-8)  # torch.nn.functional.cosine_similarity's


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 -> float32 (round to nearest even), as sam2 stores memory features."""
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


def _normalised(x: np.ndarray, axis: int) -> np.ndarray:
    norm = np.sqrt(np.sum(x * x, axis=axis, keepdims=True, dtype=np.float32))
    return x / np.maximum(norm, COSINE_EPS)


def similarity_scores(features: np.ndarray, similarity: str) -> np.ndarray:
    """Cosine similarity of every entry [N, hw, 1, C] but the last to the last, [N - 1]: over whole maps
    (`flat`) or per location over channels, averaged (`per_location`)."""
    older, reference = features[:-1], features[-1:]
    if similarity == "flat":
        older, reference = older.reshape(len(older), -1), reference.reshape(1, -1)
        return np.sum(_normalised(older, 1) * _normalised(reference, 1), axis=1)
    per_location = np.sum(_normalised(older, -1) * _normalised(reference, -1), axis=-1)
    return per_location.reshape(len(older), -1).mean(axis=1)


@dataclass
class BankEntry:
    maskmem: np.ndarray  # [hw, 1, C]
    frames: tuple[int, ...]


@dataclass
class MemoryBank:
    """One object's bounded memory (conditioning frames live outside it)."""

    capacity: int = 6
    k: int = 3
    tau: float = 1.0
    similarity: str = "flat"
    entries: list[BankEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_bank_settings(self.capacity, self.k, self.tau, self.similarity)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, maskmem: np.ndarray, frames: tuple[int, ...]) -> None:
        """Append the newest memory, then fuse until the bank fits its capacity again."""
        self.entries.append(BankEntry(maskmem, frames))
        while len(self.entries) > self.capacity:
            stacked = np.stack([entry.maskmem for entry in self.entries])
            scores = similarity_scores(stacked, self.similarity)
            selected = np.argsort(-scores, kind="stable")[: self.k]  # ties: the older entry
            logits = scores[selected] / np.float32(self.tau)
            weights = np.exp(logits - logits.max())
            weights = (weights / weights.sum()).astype(np.float32)
            fused = np.sum(weights[:, None, None, None] * stacked[selected], axis=0)
            fused = to_bfloat16(fused)
            frames = tuple(sorted(f for i in selected for f in self.entries[i].frames))
            chosen = set(selected.tolist())
            self.entries = [BankEntry(fused, frames)] + [
                e for i, e in enumerate(self.entries) if i not in chosen
            ]

    def tokens(self, num_maskmem: int) -> list[tuple[np.ndarray, int]]:
        """(memory tokens, temporal slot) per entry, oldest first: entry p of n sits at t_rel = min(n - p,
        num_maskmem - 1) frames back, slot t_rel - 1 of the temporal encodings."""
        n = len(self.entries)
        return [
            (entry.maskmem, min(n - rank, num_maskmem - 1) - 1) for rank, entry in enumerate(self.entries)
        ]
