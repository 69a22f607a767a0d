"""Callbacks for block-wise training."""

from lightning_diffusionblocks.callbacks.fid import FID
from lightning_diffusionblocks.callbacks.memory_monitor import BlockMemoryMonitor
from lightning_diffusionblocks.callbacks.offload import BlockOffload, OffloadError
from lightning_diffusionblocks.callbacks.prediction_writer import PredictionWriter
from lightning_diffusionblocks.callbacks.samples import SampleLogger

__all__ = ["FID", "BlockMemoryMonitor", "BlockOffload", "OffloadError", "PredictionWriter", "SampleLogger"]
