"""Reference σ-conditioned networks and adapters for plain backbones."""

from lightning_diffusionblocks.models.adapter import ConditioningAdapter
from lightning_diffusionblocks.models.decoder_adapter import DecoderAdapter
from lightning_diffusionblocks.models.diffusers_net import DiffusersNetwork
from lightning_diffusionblocks.models.diffusion_lm import DiffusionLM
from lightning_diffusionblocks.models.dit import DiT, DiTBlock
from lightning_diffusionblocks.models.transformer_lm import TransformerLM

__all__ = [
    "ConditioningAdapter", "DecoderAdapter", "DiT", "DiTBlock", "DiffusersNetwork", "DiffusionLM", "TransformerLM",
]  # fmt: skip
