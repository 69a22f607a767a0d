"""Reference σ-conditioned networks."""

from lightning_diffusionblocks.models.dit import DiT, DiTBlock

__all__ = ["DiT", "DiTBlock"]
