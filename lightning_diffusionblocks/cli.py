"""The command line: ``python -m lightning_diffusionblocks fit|validate|test|predict --config FILE``.

Built on Lightning's :class:`~lightning.pytorch.cli.LightningCLI`. ``model:`` holds the arguments of
:class:`~lightning_diffusionblocks.DiffusionBlocksModule`, whose ``net`` and ``task`` are chosen by
``class_path`` (any ``nn.Module`` with a block stack, any task); ``data:`` is any ``LightningDataModule``
by ``class_path``. ``configs/`` holds one commented file per example.

Two things differ from a plain LightningCLI, both because the module trains one block group at a time:

- ``--optimizer`` (e.g. ``--optimizer=torch.optim.SGD --optimizer.lr=0.1``) becomes the module's optimizer
  factory, so the optimizer gets one param group per block group (Lightning's default would build one
  group of ``model.parameters()``, which per-group learning rates, clipping and EMA cannot use).
  ``--lr_scheduler`` is refused: the module schedules each group's learning rate in that group's own steps
  (``model.warmup_steps``, ``model.lr_schedule``, ``model.min_lr_ratio``).
- The resolved config is kept in every checkpoint the run writes, as a YAML string under
  ``checkpoint["cli_config"]`` (plain data: the file still loads with ``weights_only=True``); read it back
  with :func:`config_from_checkpoint`.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import (
    LightningArgumentParser,
    LightningCLI,
    LRSchedulerTypeTuple,
    SaveConfigCallback,
    instantiate_class,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.imports import RequirementCache
from torch.optim import Optimizer
from typing_extensions import override

from lightning_diffusionblocks.checkpoints import read_checkpoint
from lightning_diffusionblocks.module import DiffusionBlocksModule

#: what LightningCLI needs at run time (the `cli` extra pins the range this project is tested with)
JSONARGPARSE_AVAILABLE = RequirementCache("jsonargparse[signatures]>=4.27.7")
#: the checkpoint key holding the resolved CLI config (a YAML string)
CONFIG_KEY = "cli_config"
DESCRIPTION = (
    "Train, validate, test or predict with a DiffusionBlocksModule from a config file; configs/ holds one per"
    " example. Any key can be overridden: --model.num_blocks=4, --trainer.max_steps=100."
)
INSTALL_HINT = (
    "The command line needs jsonargparse: install the `cli` extra with"
    " `pip install 'lightning-diffusionblocks[cli]'` (from a checkout: `pip install -e '.[cli]'`),"
    " or `pip install 'jsonargparse[signatures]>=4.39,<5'`."
)


class OptimizerFromConfig:
    """``factory(param_groups) -> Optimizer`` built from the CLI's ``--optimizer`` class and arguments.

    A class, not a closure, so the module stays picklable for spawn launchers.
    """

    def __init__(self, class_path: str, init_args: dict[str, Any]) -> None:
        self.class_path, self.init_args = class_path, dict(init_args)

    def __call__(self, param_groups: list[dict[str, Any]]) -> Optimizer:
        return instantiate_class(param_groups, {"class_path": self.class_path, "init_args": self.init_args})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.class_path!r}, {self.init_args!r})"


class ConfigInCheckpoint(SaveConfigCallback):
    """Lightning's ``config.yaml`` in the log directory, plus the same YAML in every checkpoint written.

    The copy in the checkpoint travels with the weights, so a model file always says how it was trained.
    """

    _yaml: str | None = None

    def as_yaml(self) -> str:
        """The resolved config as Lightning writes ``config.yaml``: every key, None values included."""
        if self._yaml is None:
            # jsonargparse 4.49 renamed skip_none to skip_unset; Lightning 2.6 accepts versions on either side
            keep_none = "skip_unset" if "skip_unset" in inspect.signature(self.parser.dump).parameters else "skip_none"
            self._yaml = self.parser.dump(self.config, **{keep_none: False})
        return self._yaml

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.as_yaml()


class DiffusionBlocksCLI(LightningCLI):
    """LightningCLI for :class:`~lightning_diffusionblocks.DiffusionBlocksModule` and any data module.

    Defaults (each overridable by keyword): the model class is ``DiffusionBlocksModule`` (not a subclass
    choice: ``model.net`` and ``model.task`` take a ``class_path``), ``data`` is any ``LightningDataModule``
    by ``class_path``, the config is saved with the checkpoints, and ``config.yaml`` in the log directory is
    overwritten by a rerun (the checkpoint keeps each run's own copy).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not JSONARGPARSE_AVAILABLE:
            raise ModuleNotFoundError(INSTALL_HINT)
        kwargs.setdefault("model_class", DiffusionBlocksModule)
        kwargs.setdefault("subclass_mode_model", False)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", ConfigInCheckpoint)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # the optimizer arguments are added below and become the module's factory after instantiation
        kwargs.setdefault("auto_configure_optimizers", False)
        # the module records its network and task itself; Lightning's instantiator would need jsonargparse to load
        kwargs.setdefault("load_from_checkpoint_support", False)
        super().__init__(*args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_optimizer_args((Optimizer,))
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple)

    def _section(self, config: Any) -> Any:
        return config[self.subcommand] if self.subcommand is not None else config

    @override
    def before_instantiate_classes(self) -> None:
        config = self._section(self.config)
        if config.get("lr_scheduler") is not None:
            raise MisconfigurationException(
                f"--lr_scheduler={config['lr_scheduler'].get('class_path')} cannot be honoured: DiffusionBlocksModule"
                " sets each block group's learning rate every step from that group's own step count, which one"
                " scheduler over all param groups cannot follow. Remove it and use the module's own schedule:"
                " --model.warmup_steps=N, --model.lr_schedule=cosine and --model.min_lr_ratio=R."
            )
        if config.get("optimizer") is not None and config["model"].get("optimizer") is not None:
            raise MisconfigurationException(
                "Both --optimizer and --model.optimizer are set; they are the same setting. Keep one of them."
            )

    @override
    def after_instantiate_classes(self) -> None:
        self._check_vocabulary()
        chosen = self._section(self.config_init).get("optimizer")
        if chosen is None:
            return
        if not isinstance(self.model, DiffusionBlocksModule):
            raise MisconfigurationException(
                f"--optimizer needs a DiffusionBlocksModule model, got {type(self.model).__name__}."
            )
        init_args = chosen.get("init_args")
        init_args = {} if init_args is None else init_args.as_dict() if hasattr(init_args, "as_dict") else init_args
        # each param group the module passes keeps its own name; the optimizer's arguments are the defaults
        self.model.optimizer_factory = OptimizerFromConfig(chosen["class_path"], init_args)

    def _check_vocabulary(self) -> None:
        """A config names the vocabulary size by hand; a text with another one would fail deep in training."""
        task_vocab = getattr(getattr(self.model, "task", None), "vocab_size", None)
        if not isinstance(task_vocab, int):
            return
        data_vocab = getattr(self.datamodule, "vocab_size", None)  # a text module reads its text (once) here
        if isinstance(data_vocab, int) and data_vocab != task_vocab:
            raise MisconfigurationException(
                f"The data has {data_vocab} distinct tokens but the task was built for vocab_size={task_vocab}. Set"
                f" vocab_size: {data_vocab} in both model.net.init_args and model.task.init_args."
            )


def config_from_checkpoint(path: str | Path) -> str | None:
    """The YAML config a CLI run saved in checkpoint ``path`` (read with ``weights_only=True``), or None."""
    config = read_checkpoint(path).get(CONFIG_KEY)
    return config if isinstance(config, str) else None


def main(args: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Entry point of ``python -m lightning_diffusionblocks`` and the ``diffusionblocks`` command."""
    if not JSONARGPARSE_AVAILABLE:
        sys.exit(INSTALL_HINT)
    parser_kwargs: dict[str, Any] = {"description": DESCRIPTION}
    if prog is not None:
        parser_kwargs["prog"] = prog
    DiffusionBlocksCLI(args=None if args is None else list(args), parser_kwargs=parser_kwargs)


__all__ = ["CONFIG_KEY", "ConfigInCheckpoint", "DiffusionBlocksCLI", "OptimizerFromConfig", "config_from_checkpoint",
           "main"]  # fmt: skip
