"""Video memory: the tensor-fed predictor and memory-bank policies (stock FIFO, SIS, Mutual-KV)."""

from mqsam2.memory.mutual_kv import MutualKVOptions, MutualKVVideoPredictor
from mqsam2.memory.policies import (
    MEMORY_POLICIES,
    policy_name,
    policy_target,
    set_memory_policy,
    using_memory_policy,
)
from mqsam2.memory.predictor import Prompt, VideoPredictor
from mqsam2.memory.sis import MemoryBank, MemoryEntry, SISOptions, SISVideoPredictor, synthesize

__all__ = [
    "MEMORY_POLICIES",
    "MemoryBank",
    "MemoryEntry",
    "MutualKVOptions",
    "MutualKVVideoPredictor",
    "Prompt",
    "SISOptions",
    "SISVideoPredictor",
    "VideoPredictor",
    "policy_name",
    "policy_target",
    "set_memory_policy",
    "synthesize",
    "using_memory_policy",
]
