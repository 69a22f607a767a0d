"""Block-wise training of stacked-block networks with DiffusionBlocks, as a Lightning strategy.

Importing this package registers ``Trainer(strategy="diffusionblocks")`` (one device; and
``"diffusionblocks_sequential"``), ``"diffusionblocks_ddp"`` (data parallel) and
``"diffusionblocks_block_parallel"`` (one group per process), each also with a ``_spawn`` variant.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_diffusionblocks import callbacks, data, lora, models, noise, presets, pretrained, tasks
from lightning_diffusionblocks.block_parallel import BlockParallelStrategy
from lightning_diffusionblocks.data_parallel import DiffusionBlocksDDPStrategy
from lightning_diffusionblocks.ddpm import DDPMSchedule
from lightning_diffusionblocks.flow import FlowSchedule
from lightning_diffusionblocks.latents import LatentDataset, LatentSpace, cache_latents
from lightning_diffusionblocks.lora import GroupLoRA
from lightning_diffusionblocks.module import DiffusionBlocksModule, NonFiniteLossError
from lightning_diffusionblocks.noise import EDM, NoiseSchedule
from lightning_diffusionblocks.partition import BlockStack, BlockwiseNetwork, find_block_stack, split_layers
from lightning_diffusionblocks.precision import StatePrecision
from lightning_diffusionblocks.schedules import RandomSchedule, Schedule, SequentialSchedule
from lightning_diffusionblocks.strategy import DiffusionBlocksStrategy

__version__ = "0.3.0"

for _strategy in (DiffusionBlocksStrategy, DiffusionBlocksDDPStrategy, BlockParallelStrategy):
    if _strategy.strategy_name not in StrategyRegistry:
        _strategy.register_strategies(StrategyRegistry)

__all__ = [
    "BlockParallelStrategy",
    "DiffusionBlocksDDPStrategy",
    "DDPMSchedule",
    "EDM",
    "FlowSchedule",
    "GroupLoRA",
    "LatentDataset",
    "LatentSpace",
    "BlockStack",
    "BlockwiseNetwork",
    "DiffusionBlocksModule",
    "DiffusionBlocksStrategy",
    "NoiseSchedule",
    "NonFiniteLossError",
    "RandomSchedule",
    "Schedule",
    "SequentialSchedule",
    "StatePrecision",
    "cache_latents",
    "callbacks",
    "data",
    "find_block_stack",
    "lora",
    "models",
    "noise",
    "presets",
    "pretrained",
    "split_layers",
    "tasks",
]
