"""One class per DiffusionBlocks formulation."""

from lightning_diffusionblocks.tasks.autoregressive_lm import AutoregressiveLM
from lightning_diffusionblocks.tasks.base import Preview, Task
from lightning_diffusionblocks.tasks.classification import Classification
from lightning_diffusionblocks.tasks.ddpm import DDPM
from lightning_diffusionblocks.tasks.flow_matching import FlowMatching
from lightning_diffusionblocks.tasks.image_generation import ImageGeneration
from lightning_diffusionblocks.tasks.masked_lm import MaskedLM

__all__ = [
    "DDPM",
    "AutoregressiveLM",
    "Classification",
    "FlowMatching",
    "ImageGeneration",
    "MaskedLM",
    "Preview",
    "Task",
]
