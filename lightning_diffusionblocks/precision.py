"""How each block group keeps its training state: weights and Adam moments in fp32 or in low precision.

A group that is not training needs none of its state at full precision until its turn comes, so
:class:`StatePrecision` chooses what an inactive (stored, possibly offloaded) group holds and what the active
group trains with. Its byte counts are the memory plan's single source for what a parameter costs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

WeightPrecision = Literal["fp32", "bf16"]
MomentPrecision = Literal["fp32", "bf16", "8bit"]
Rounding = Literal["nearest", "stochastic"]

#: bitsandbytes' 8-bit optimizers quantize each state tensor in blocks of this many values, one fp32 scale per block
BNB_BLOCK = 256
#: and keep a 256-entry fp32 quantization map per state tensor
BNB_QMAP = 256


@dataclass(frozen=True)
class StatePrecision:
    """What each block group's weights and Adam moments are kept in.

    Args:
        weights: ``"fp32"``, or ``"bf16"``: every group's weights (and EMA weights) are stored in bf16 and only the
            active group holds an fp32 master copy, made when it becomes active and rounded back when it stops.
        moments: ``"fp32"``; ``"bf16"``: inactive groups' Adam moments are stored in bf16 (the active group's are
            fp32); ``"8bit"``: bitsandbytes' block-wise 8-bit AdamW keeps every group's moments in 8 bits.
        rounding: how fp32 values are rounded to bf16 when a group is stored: ``"nearest"`` or ``"stochastic"``
            (unbiased: small updates survive many store/restore cycles on average).
        min_8bit_size: tensors with fewer values keep fp32 moments under ``"8bit"`` (bitsandbytes' own rule).
    """

    weights: WeightPrecision = "fp32"
    moments: MomentPrecision = "fp32"
    rounding: Rounding = "nearest"
    min_8bit_size: int = 4096

    def __post_init__(self) -> None:
        if self.weights not in ("fp32", "bf16"):
            raise ValueError(f"StatePrecision(weights=...) must be 'fp32' or 'bf16', got {self.weights!r}.")
        if self.moments not in ("fp32", "bf16", "8bit"):
            raise ValueError(f"StatePrecision(moments=...) must be 'fp32', 'bf16' or '8bit', got {self.moments!r}.")
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"StatePrecision(rounding=...) must be 'nearest' or 'stochastic', got {self.rounding!r}.")
        if isinstance(self.min_8bit_size, bool) or not isinstance(self.min_8bit_size, int) or self.min_8bit_size < 0:
            raise ValueError(
                f"StatePrecision(min_8bit_size=...) must be a non-negative integer, got {self.min_8bit_size!r}."
            )

    @classmethod
    def of(cls, value: StatePrecision | Mapping[str, Any] | None) -> StatePrecision:
        """The option as given to the module (an instance, its :meth:`record`, or None for full precision)."""
        if value is None:
            return cls()
        if isinstance(value, StatePrecision):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"weights", "moments", "rounding", "min_8bit_size"}
            if unknown:
                raise ValueError(f"Unknown StatePrecision fields {sorted(unknown)}.")
            return cls(**value)
        raise TypeError(f"state_precision must be a StatePrecision, a dict of its fields or None, got {value!r}.")

    def record(self) -> dict[str, Any]:
        """Plain data for hyper-parameters and checkpoints."""
        return asdict(self)

    @property
    def full(self) -> bool:
        """True when nothing is kept in low precision (the default)."""
        return self.weights == "fp32" and self.moments == "fp32"

    def weight_bytes(self, numel: int, active: bool) -> int:
        """Bytes of one weight tensor of ``numel`` values: fp32 while its group trains, else as stored."""
        return numel * (4 if active or self.weights == "fp32" else 2)

    def moment_bytes(self, numel: int, active: bool) -> int:
        """Bytes of Adam's two moments for one tensor of ``numel`` values, in its group's state (active or not)."""
        if self.moments == "8bit" and numel >= self.min_8bit_size:
            return 2 * (numel + 4 * math.ceil(numel / BNB_BLOCK) + 4 * BNB_QMAP)
        if self.moments == "bf16" and not active:
            return 2 * 2 * numel
        return 2 * 4 * numel
