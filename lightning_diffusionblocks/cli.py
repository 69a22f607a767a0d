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
- ``validate``/``test``/``predict --ckpt_path=FILE`` need no config: the model (and the data, when the file was
  written by this command line) is rebuilt from the checkpoint's own record, under the same trust rule as
  ``DiffusionBlocksModule.load_from_checkpoint``: only this package's classes and the packages named by
  ``--trusted=pkg[,pkg...]`` are imported from what the file says. Anything given on the command line or in a
  ``--config`` overrides what the checkpoint says. The checkpoint's hyper-parameters are never fed to the parser
  as Lightning's own CLI does (they could name any class). Every checkpoint is read with ``weights_only=True``.
- ``predict`` writes what the task predicts (:class:`~lightning_diffusionblocks.callbacks.PredictionWriter`: PNG
  grids for image generation, CSV tables for class probabilities and per-sequence language-model metrics) under
  ``<default_root_dir>/predictions``, unless the config has a prediction writer of its own.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import (
    LightningArgumentParser,
    LightningCLI,
    LRSchedulerTypeTuple,
    SaveConfigCallback,
    instantiate_class,
)
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.imports import RequirementCache
from torch.optim import Optimizer
from typing_extensions import override

from lightning_diffusionblocks.callbacks.prediction_writer import PredictionWriter
from lightning_diffusionblocks.checkpoints import read_checkpoint
from lightning_diffusionblocks.module import DiffusionBlocksModule
from lightning_diffusionblocks.records import TRUSTED_BY_DEFAULT, top_package, untrusted_packages

#: what LightningCLI needs at run time (the `cli` extra pins the range this project is tested with)
JSONARGPARSE_AVAILABLE = RequirementCache("jsonargparse[signatures]>=4.27.7")
#: the checkpoint key holding the resolved CLI config (a YAML string)
CONFIG_KEY = "cli_config"
DESCRIPTION = (
    "Train, validate, test or predict with a DiffusionBlocksModule from a config file; configs/ holds one per"
    " example. Any key can be overridden: --model.num_blocks=4, --trainer.max_steps=100."
)
#: subcommands whose --ckpt_path rebuilds the model from the checkpoint when no config gives it
FROM_CHECKPOINT = ("validate", "test", "predict")
#: the sections of a saved config that a validate/test/predict run takes from the checkpoint
CHECKPOINT_SECTIONS = ("seed_everything", "model", "data")
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
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
        parser.add_argument(
            "--trusted",
            type=str | None,
            default=None,
            help="Comma-separated packages whose classes may be imported from what a --ckpt_path file records (its"
            " network, task, data module), besides lightning_diffusionblocks. Importing a class runs its package's"
            " code: name only packages you trust.",
        )

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Lightning's parsing, with the config a ``--ckpt_path`` file records placed first (see the module doc)."""
        if args is not None and not isinstance(args, (list, tuple)):  # a dict or Namespace: Lightning's own way
            super().parse_arguments(parser, args)
            return
        argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        found = _subcommand_and_checkpoint(argv, self.subcommands())
        if found is None:
            super().parse_arguments(parser, None if args is None else list(args))
            return
        index, subcommand, ckpt_path = found
        trusted = _flag(argv[index + 1 :], "--trusted")
        base, refused = checkpoint_config(ckpt_path, trusted.split(",") if trusted else (), self._model_class)
        given = argv[index + 1 :]
        for key, reason in refused.items():
            if not _may_give(given, key):  # nothing the user passes can stand in for it: say so before parsing
                raise MisconfigurationException(reason)
        taken = " and ".join(k for k in ("model", "data") if k in base)
        rank_zero_info(f"{subcommand}: the {taken} come from {ckpt_path}")
        argv.insert(index + 1, f"--config={yaml.safe_dump(base, sort_keys=False)}")
        try:
            self.config = parser.parse_args(argv)
        except SystemExit:
            for reason in refused.values():
                sys.stderr.write(f"{reason}\n")
            raise
        section = self.config[subcommand]
        for key, reason in refused.items():
            if key == "data" and section.get("data") is None:
                raise MisconfigurationException(reason)

    @override
    def _parse_ckpt_path(self) -> None:
        """Lightning feeds the checkpoint's hyper-parameters to the parser, which imports any class they name; the
        checkpoint's record is used instead, under the trust rule, by :meth:`parse_arguments`."""

    def _section(self, config: Any) -> Any:
        return config[self.subcommand] if self.subcommand is not None else config

    @override
    def before_instantiate_classes(self) -> None:
        config = self._section(self.config)
        if "weights_only" in config:  # Trainer.fit/validate/test/predict(weights_only=None) can load unrestricted
            if config["weights_only"] is False:
                raise MisconfigurationException(
                    "--weights_only=false cannot be honoured: a DiffusionBlocks checkpoint holds tensors and plain"
                    " data only and is always read with torch's restricted unpickler. Remove the flag."
                )
            config["weights_only"] = True
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

    @override
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """``predict`` writes its predictions (a :class:`PredictionWriter`) unless the config has a writer."""
        if self.subcommand == "predict":
            given = config.get("callbacks") or []
            given = given if isinstance(given, list) else [given]
            if not any(isinstance(c, BasePredictionWriter) for c in [*given, *callbacks]):
                callbacks = [*callbacks, PredictionWriter()]
        return super()._instantiate_trainer(config, callbacks)

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


def _flag(args: Sequence[str], name: str) -> str | None:
    """The value of ``--name=VALUE`` or ``--name VALUE`` in ``args`` (the last one given), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        elif arg == name and i + 1 < len(args):
            value = args[i + 1]
    return value


def _subcommand_and_checkpoint(args: Sequence[str], subcommands: Any) -> tuple[int, str, str] | None:
    """(index of the subcommand, the subcommand, the checkpoint file) of a validate/test/predict run with
    ``--ckpt_path`` naming an existing file on the command line; None otherwise."""
    index = next((i for i, a in enumerate(args) if a in subcommands), None)
    if index is None or args[index] not in FROM_CHECKPOINT:
        return None
    ckpt_path = _flag(args[index + 1 :], "--ckpt_path")
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None  # no file (or Lightning's "best"/"last"): nothing to read before parsing
    return index, args[index], ckpt_path


def _may_give(args: Sequence[str], key: str) -> bool:
    """Whether ``args`` may provide config key ``key`` (e.g. ``model.net``) themselves: a flag for it or a config."""
    prefixes = {f"--{'.'.join(key.split('.')[:n])}" for n in range(1, key.count(".") + 2)}
    return any(a in ("-c", "--config") or a.startswith("--config=") or a.split("=")[0] in prefixes or
               a.startswith(f"--{key}.") for a in args)  # fmt: skip


def _imports_untrusted(value: Any, trusted: Sequence[str]) -> list[str]:
    """Packages a parser could import from ``value`` that are not trusted: every ``class_path`` at any depth, and any
    string that reads as a dotted import path into an installed package (a callable argument is resolved so)."""
    found = untrusted_packages(value, trusted)
    strings: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for item in v.values():
                walk(item)
        elif isinstance(v, list):
            for item in v:
                walk(item)
        elif isinstance(v, str) and _IMPORT_PATH.fullmatch(v):
            strings.append(v)

    walk(value)
    for path in strings:
        top = top_package(path)
        ok = any(path == t or path.startswith(t + ".") for t in (*TRUSTED_BY_DEFAULT, *trusted))
        if not ok and top not in found and importlib.util.find_spec(top) is not None:
            found.append(top)
    return found


def _resolve(path: str) -> Any:
    module, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError):
        return None


def _without_default_callables(value: Any) -> Any:
    """``value`` without the constructor arguments that name their own default class or function by import path.

    A saved config holds every argument, resolved: a callable one (timm's ``embed_layer=PatchEmbed``) is written as its
    import path, which the parser reads back as an instance to build, not the class. Leaving it out keeps the default.
    Called only on parts whose packages are trusted (it imports them).
    """
    if isinstance(value, list):
        return [_without_default_callables(v) for v in value]
    if not isinstance(value, dict):
        return value
    value = {k: _without_default_callables(v) for k, v in value.items()}
    init_args = value.get("init_args")
    owner = _resolve(value["class_path"]) if isinstance(value.get("class_path"), str) else None
    if not isinstance(init_args, dict) or owner is None:
        return value
    try:
        defaults = {k: p.default for k, p in inspect.signature(owner).parameters.items()}
    except (TypeError, ValueError):
        return value
    kept = {
        k: v
        for k, v in init_args.items()
        if not (isinstance(v, str) and _IMPORT_PATH.fullmatch(v) and callable(defaults.get(k)) and
                _resolve(v) is defaults[k])
    }  # fmt: skip
    return {**value, "init_args": kept}


def checkpoint_config(
    path: str | Path, trusted: Sequence[str] = (), model_class: Any = DiffusionBlocksModule
) -> tuple[dict[str, Any], dict[str, str]]:
    """The config sections a checkpoint records (``seed_everything``, ``model``, ``data``), and for each part left
    out because it would import a package not trusted (or is not recorded), the message saying what to pass.

    The model comes from the config the command line saved in the checkpoint, else from its record (network and task
    class paths with their arguments) and its plain hyper-parameters; the data only from a saved config. Read with
    ``weights_only=True``; the saved config is parsed as plain YAML. Nothing is imported here.
    """
    trusted = [t.strip() for t in trusted if t.strip()]
    checkpoint = read_checkpoint(path)
    checkpoint = checkpoint if isinstance(checkpoint, dict) else {}
    saved = checkpoint.get(CONFIG_KEY)
    saved = yaml.safe_load(saved) if isinstance(saved, str) else None
    saved = saved if isinstance(saved, dict) else {}
    base: dict[str, Any] = {k: saved[k] for k in CHECKPOINT_SECTIONS if saved.get(k) is not None}
    if not isinstance(base.get("model"), dict):
        record = checkpoint.get("diffusionblocks")
        record = record if isinstance(record, dict) else {}
        hparams = checkpoint.get("hyper_parameters")
        hparams = hparams if isinstance(hparams, dict) else {}
        arguments = set(inspect.signature(model_class).parameters) - {"net", "task", "optimizer"}
        base["model"] = {k: v for k, v in hparams.items() if k in arguments and not isinstance(v, dict)}
        base["model"].update({what: record.get(what) for what in ("net", "task")})
    model = base["model"]
    model.pop("optimizer", None)  # an optimizer only matters to fit
    refused: dict[str, str] = {}
    parts = [(f"model.{what}", model, what) for what in ("net", "task")] + [("data", base, "data")]
    for key, owner, name in parts:
        value = owner.get(name)
        if key == "data" and value is None:  # written from Python: the data is the user's to give
            refused[key] = (
                f"{path} holds no saved config, so it does not say which data to use (it was written from Python,"
                " not by this command line). Give it: --data=<class path> with its arguments, e.g."
                " --data=lightning_diffusionblocks.data.MNISTDataModule --data.init_args.data_dir=DIR, or a --config."
            )
            continue
        if not isinstance(value, dict) or not value.get("class_path") or value.get("init_args", {}) is None:
            owner.pop(name, None)
            refused[key] = (
                f"{path} does not record how to build {key} (it holds no saved config, and its record has no"
                f" constructor arguments for it). Give it: --config=<the training config>, or --{key}=..."
            )
            continue
        packages = _imports_untrusted(value, trusted)
        if not packages:
            owner[name] = _without_default_callables(value)
            continue
        owner.pop(name)
        names = " and ".join(f"`{p}`" for p in packages)
        refused[key] = (
            f"{path} records {key} as `{value['class_path']}`, which imports {names}: not trusted, so nothing of it"
            f" was imported. Run again with --trusted={','.join([*trusted, *packages])} if you trust"
            f" {'it' if len(packages) == 1 else 'them'}, or give {key} yourself (--config=<the training config>"
            f" or --{key}=...)."
        )
    return json.loads(json.dumps(base)), refused  # plain YAML-able data (tuples become lists)


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


__all__ = ["CONFIG_KEY", "ConfigInCheckpoint", "DiffusionBlocksCLI", "OptimizerFromConfig", "checkpoint_config",
           "config_from_checkpoint", "main"]  # fmt: skip
