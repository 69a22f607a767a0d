"""Block-wise training of stacked-block networks with DiffusionBlocks, as a Lightning strategy.

Importing this package registers ``Trainer(strategy="diffusionblocks")`` (and
``"diffusionblocks_sequential"``).
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_diffusionblocks import callbacks, data, models, noise, tasks
from lightning_diffusionblocks.module import DiffusionBlocksModule, NonFiniteLossError
from lightning_diffusionblocks.noise import EDM, NoiseSchedule
from lightning_diffusionblocks.partition import BlockStack, BlockwiseNetwork, find_block_stack, split_layers
from lightning_diffusionblocks.schedules import RandomSchedule, Schedule, SequentialSchedule
from lightning_diffusionblocks.strategy import DiffusionBlocksStrategy

__version__ = "0.1.0"

if DiffusionBlocksStrategy.strategy_name not in StrategyRegistry:
    DiffusionBlocksStrategy.register_strategies(StrategyRegistry)

__all__ = [
    "EDM",
    "BlockStack",
    "BlockwiseNetwork",
    "DiffusionBlocksModule",
    "DiffusionBlocksStrategy",
    "NoiseSchedule",
    "NonFiniteLossError",
    "RandomSchedule",
    "Schedule",
    "SequentialSchedule",
    "callbacks",
    "data",
    "find_block_stack",
    "models",
    "noise",
    "split_layers",
    "tasks",
]
