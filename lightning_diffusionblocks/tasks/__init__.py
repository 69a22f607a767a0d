"""One class per DiffusionBlocks formulation."""

from lightning_diffusionblocks.tasks.base import Task
from lightning_diffusionblocks.tasks.image_generation import ImageGeneration

__all__ = ["ImageGeneration", "Task"]
