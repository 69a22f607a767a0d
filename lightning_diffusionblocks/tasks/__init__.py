"""One class per DiffusionBlocks formulation."""

from lightning_diffusionblocks.tasks.base import Task
from lightning_diffusionblocks.tasks.classification import Classification
from lightning_diffusionblocks.tasks.image_generation import ImageGeneration

__all__ = ["Classification", "ImageGeneration", "Task"]
