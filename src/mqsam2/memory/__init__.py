"""Video memory: the tensor-fed predictor and memory-bank policies (stock FIFO, SIS)."""

from mqsam2.memory.predictor import Prompt, VideoPredictor

__all__ = ["Prompt", "VideoPredictor"]
