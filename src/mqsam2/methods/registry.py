"""Quantization methods as registered configs (torchao's one-config-per-technique habit): each method module
declares one `Method` and registers it by name; `mqsam2.api` is the one place that reads them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from mqsam2.errors import MQSAM2Error

Hook = Callable[[nn.Module, object], None]
Allocator = Callable[[nn.Module, object, object], object]  # (float model, workload, recipe) -> Allocation


@dataclass(frozen=True)
class Method:
    """What a method allocates, which quantizers it uses, what it learns per unit, and its hooks.

    - allocation: `mixed` methods solve Eq. 6 for an Avg-b target over candidates {b-1, b, b+1} with the
      `error` model; `activations` says how input widths are chosen (see `mqsam2.allocation.allocate`).
      Uniform methods put every layer at b (WbAb). A method with its own `allocator` measures what it needs
      on the float model and the workload and returns the `Allocation` itself (Mix-QSAM's KL + IQP).
    - quantizers: the observers that initialise weight and activation ranges (`dynamic`: per live input),
      whether attention matmuls are quantized, and the softmax probabilities' quantizer (`attention_probs`:
      `uniform` or `log2`; None keeps the recipe's).
    - per unit: `reconstruction` is the learning recipe (`none`, `adaround`, `brecq`, `qdrop`, `lsc`);
      `video_loss` the objective of the memory attention layers and the memory encoder (`mse`: output error;
      `hvq`: Q-MiniSAM2's hierarchy-based video loss).
    - memory: `memory_policy` is the policy the quantized model tracks with (`mqsam2.memory.MEMORY_POLICIES`;
      None keeps stock FIFO); calibration and reconstruction always run the stock policy.
    - hooks: `before_quantize(float_model, workload)` runs on the model's copy before layers are swapped (e.g.
      an output-preserving reparametrisation); `after_calibration(model, workload)` after the observers.
    """

    name: str
    summary: str
    mixed: bool = False
    error: str = "pow2"
    activations: Literal["shared", "fixed", "separate"] = "shared"
    weight_observer: str = "minmax"
    act_observer: str = "minmax"
    quantize_attention: bool = False
    attention_probs: Literal["uniform", "log2"] | None = None
    reconstruction: Literal["none", "adaround", "brecq", "qdrop", "lsc"] = "none"
    video_loss: Literal["mse", "hvq"] = "mse"
    memory_policy: str | None = None
    allocator: Allocator | None = None
    before_quantize: Hook | None = None
    after_calibration: Hook | None = None

    @property
    def quantizes(self) -> bool:
        return self.name != "fp"

    @property
    def exportable(self) -> bool:
        """Whether the packed export (docs/export.md) holds its model: it stores calibrated uniform quantizers,
        not live per-input ranges (`dynamic`) nor log2 softmax quantizers."""
        return self.quantizes and self.act_observer != "dynamic" and self.attention_probs != "log2"


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (one line in its module); names are unique."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str | Method) -> Method:
    """The registered method of that name, or a one-line error listing the registered ones."""
    if isinstance(name, Method):
        return name
    try:
        return METHODS[name]
    except KeyError:
        raise MQSAM2Error(f"unknown method {name!r}: use one of {', '.join(sorted(METHODS))}") from None
