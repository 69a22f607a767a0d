"""Reference σ-conditioned networks."""

from lightning_diffusionblocks.models.adapter import ConditioningAdapter
from lightning_diffusionblocks.models.dit import DiT, DiTBlock

__all__ = ["ConditioningAdapter", "DiT", "DiTBlock"]
