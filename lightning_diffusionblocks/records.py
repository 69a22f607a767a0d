"""How a checkpoint rebuilds its network and task: ``{"class_path": ..., "init_args": {...}}`` records.

The shape is LightningCLI's. A record holds plain data only (strings, numbers, booleans, None, lists and
string-keyed dicts, nested records), so a checkpoint stays loadable with torch's restricted unpickler
(``weights_only=True``). Rebuilding imports the recorded class, which runs that module's code, so it is
limited to this package and to the modules the caller names as trusted.

Constructor arguments are known when a class records them itself (:class:`RecordsInitArgs`, which every
model and task of this package uses, or an ``init_args`` dict attribute), for dataclasses, and for
Hugging Face models (their ``config``). Anything else is recorded by class path only, and reloading
says exactly what to pass.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
from collections.abc import Iterable
from typing import Any

TRUSTED_BY_DEFAULT = ("lightning_diffusionblocks",)

_PLAIN = (str, int, float, bool, type(None))


class RecordError(ValueError):
    """A record cannot be made into an object (unknown, untrusted, or incomplete)."""


class RecordsInitArgs:
    """Mixin: instances remember the arguments their most-derived constructor was called with.

    ``obj.init_args`` is then the dict a checkpoint records, so ``load_from_checkpoint(path)`` can rebuild it.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        original = cls.__dict__["__init__"]
        signature = inspect.signature(original)

        @functools.wraps(original)
        def __init__(self: Any, *args: Any, **kw: Any) -> None:  # noqa: N807
            original(self, *args, **kw)
            # the outermost constructor returns last, so its arguments (the caller's) are the ones kept
            bound = signature.bind(self, *args, **kw)
            bound.apply_defaults()
            recorded = dict(bound.arguments)
            recorded.pop(next(iter(signature.parameters)))  # self
            for name, param in signature.parameters.items():
                if param.kind is inspect.Parameter.VAR_KEYWORD:
                    recorded.update(recorded.pop(name, {}))
                elif param.kind is inspect.Parameter.VAR_POSITIONAL:
                    recorded.pop(name, None)
            object.__setattr__(self, "_recorded_init_args", recorded)

        cls.__init__ = __init__  # type: ignore[method-assign]

    @property
    def init_args(self) -> dict[str, Any] | None:
        return getattr(self, "_recorded_init_args", None)


def class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def is_plain(value: Any) -> bool:
    """True for data torch's restricted unpickler accepts without help: scalars, strings, lists, dicts."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def _value(value: Any) -> Any:
    """A constructor argument as plain data, or a nested record; raises RecordError when neither."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return [_value(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _value(v) for k, v in value.items()}
    record = record_of(value)
    if record is None or record.get("init_args") is None:
        raise RecordError(f"argument of type {type(value).__name__} cannot be recorded")
    return record


def _init_args(obj: Any) -> dict[str, Any] | None:
    args = getattr(obj, "init_args", None)
    if isinstance(args, dict):
        return args
    if callable(getattr(obj, "to_dict", None)) and type(obj).__module__.startswith("transformers."):
        to_json = getattr(obj, "to_json_string", None)  # JSON: plain data, string keys
        return json.loads(to_json(use_diff=False)) if callable(to_json) else obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
    config = getattr(obj, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict) and "config" in inspect.signature(type(obj).__init__).parameters:
        return {"config": config}
    return None


def record_of(obj: Any) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` of ``obj``; ``init_args`` is None when its arguments are unknown."""
    if obj is None or isinstance(obj, _PLAIN):
        return None
    args = _init_args(obj)
    try:
        init_args = None if args is None else {k: _value(v) for k, v in args.items()}
    except RecordError:
        init_args = None
    return {"class_path": class_path(obj), "init_args": init_args}


def _is_record(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"class_path", "init_args"}


def _trusted(path: str, trusted: Iterable[str]) -> bool:
    return any(path == t or path.startswith(t + ".") for t in (*TRUSTED_BY_DEFAULT, *trusted))


def build(record: dict[str, Any], what: str, trusted: Iterable[str] = (), expected: type | None = None) -> Any:
    """Instantiate a record, importing only from this package and the ``trusted`` module prefixes.

    Only classes are instantiated: ``expected`` (e.g. ``nn.Module``) for the top level, and nested modules,
    dataclasses or configuration objects (``to_dict``) for the arguments.
    """
    trusted = tuple(trusted)
    if not _is_record(record) or not isinstance(record["class_path"], str):
        raise RecordError(f"The checkpoint's record of the {what} is malformed: {record!r}.")
    path = record["class_path"]
    module_name, _, qualname = path.rpartition(".")
    if not _trusted(path, trusted):
        top = path.split(".")[0]
        raise RecordError(
            f"The checkpoint records the {what} as `{path}`. Importing it would run code from `{top}`, which is"
            f" not trusted. Pass trusted=[{top!r}] to load_from_checkpoint if you trust that package, or pass"
            f" {what}=... yourself."
        )
    if record["init_args"] is None:
        raise RecordError(
            f"The checkpoint records the {what} as `{path}` but not its constructor arguments. Pass it:"
            f" load_from_checkpoint(path, {what}={qualname}(...)), or let {qualname} record them"
            " (inherit lightning_diffusionblocks.records.RecordsInitArgs, or give it an `init_args` dict)."
        )
    try:
        owner: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            owner = getattr(owner, part)
    except (ImportError, AttributeError) as err:
        raise RecordError(
            f"The checkpoint records the {what} as `{path}`, which cannot be imported here ({err})."
            f" Install the package that defines it, or pass {what}=... to load_from_checkpoint."
        ) from err
    if not isinstance(owner, type) or (expected is not None and not issubclass(owner, expected)):
        raise RecordError(
            f"The checkpoint records the {what} as `{path}`, which is not a"
            f" {expected.__name__ if expected else 'class'}; refusing to call it. Pass {what}=... yourself."
        )
    if expected is None and not _buildable(owner):
        raise RecordError(f"The checkpoint records an argument `{what}` of type `{path}`, which records never hold.")
    if not isinstance(record["init_args"], dict):
        raise RecordError(f"The checkpoint's record of the {what} is malformed: {record!r}.")
    kwargs = {k: _built(v, f"{what}.{k}", trusted) for k, v in record["init_args"].items()}
    return owner(**kwargs)


def _buildable(cls: type) -> bool:
    """Nested arguments a record may rebuild: modules, dataclasses and configuration objects."""
    from torch import nn

    return issubclass(cls, (nn.Module, RecordsInitArgs)) or dataclasses.is_dataclass(cls) or hasattr(cls, "to_dict")


def _built(value: Any, what: str, trusted: tuple[str, ...]) -> Any:
    if _is_record(value):
        return build(value, what, trusted)
    if isinstance(value, list):
        return [_built(v, what, trusted) for v in value]
    if isinstance(value, dict):
        return {k: _built(v, what, trusted) for k, v in value.items()}
    return value


__all__ = ["TRUSTED_BY_DEFAULT", "RecordError", "RecordsInitArgs", "build", "is_plain", "record_of"]
