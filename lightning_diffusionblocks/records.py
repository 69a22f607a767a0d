"""How a checkpoint rebuilds its network and task: ``{"class_path": ..., "init_args": {...}}`` records.

The shape is LightningCLI's. A record holds plain data only (strings, numbers, booleans, None, lists and
string-keyed dicts, nested records), so a checkpoint stays loadable with torch's restricted unpickler
(``weights_only=True``). Rebuilding imports the recorded class, which runs that module's code, so it is
limited to this package and to the modules the caller names as trusted, at every depth of the record: every
``class_path`` inside it is checked before anything is imported, and a constructor that itself builds a
``class_path`` dict it was given (``DiffusionBlocksModule``) applies the same rule while a record is being built.

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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

TRUSTED_BY_DEFAULT = ("lightning_diffusionblocks",)

_PLAIN = (str, int, float, bool, type(None))


class RecordError(ValueError):
    """A record cannot be made into an object (unknown, untrusted, or incomplete).

    ``untrusted`` lists the top-level packages the record names that are not trusted (empty for other reasons).
    """

    def __init__(self, message: str, untrusted: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.untrusted = list(untrusted)


#: the trusted prefixes of the record being built (None: no record is being built, a dict is the caller's own)
_BUILDING: ContextVar[tuple[str, ...] | None] = ContextVar("lightning_diffusionblocks_trusted", default=None)


@contextmanager
def trusting(trusted: Iterable[str]) -> Iterator[tuple[str, ...]]:
    """While active, a ``class_path`` dict handed to one of this package's constructors is built only from this
    package and ``trusted`` (it came from a checkpoint, not from the caller). Nested uses keep the outer rule."""
    outer = _BUILDING.get()
    active = tuple(trusted) if outer is None else outer
    token = _BUILDING.set(active)
    try:
        yield active
    finally:
        _BUILDING.reset(token)


def building_trust() -> tuple[str, ...] | None:
    """The trusted prefixes of the record being built now, or None outside :func:`build` / :func:`trusting`."""
    return _BUILDING.get()


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


def class_paths(value: Any) -> Iterator[Any]:
    """Every ``class_path`` value in ``value``, at any depth (in any dict that has one, a record or not)."""
    if isinstance(value, dict):
        if "class_path" in value:
            yield value["class_path"]
        for v in value.values():
            yield from class_paths(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from class_paths(v)


def top_package(path: Any) -> str:
    return str(path).split(".")[0]


def untrusted_packages(value: Any, trusted: Iterable[str] = ()) -> list[str]:
    """The top-level packages named by class paths anywhere in ``value`` that are not trusted, without importing.

    A class path that is not a dotted string (a short name that would be looked up among loaded classes) counts
    as untrusted too, under its own name.
    """
    trusted = tuple(trusted)
    found: list[str] = []
    for path in class_paths(value):
        ok = isinstance(path, str) and "." in path and _trusted(path, trusted)
        if not ok and top_package(path) not in found:
            found.append(top_package(path))
    return found


def untrusted_message(what: str, record: Any, untrusted: list[str]) -> str:
    names = ", ".join(f"`{p}`" for p in untrusted)
    where = f"The checkpoint records the {what} as `{record.get('class_path')}`" if isinstance(record, dict) else ""
    return (
        f"{where}{'; its record' if where else 'The record'} names classes from {names}, not trusted: importing them"
        f" would run their code. Pass trusted={untrusted!r} to load_from_checkpoint if you trust"
        f" {'that package' if len(untrusted) == 1 else 'those packages'}, or pass {what}=... yourself."
    )


def explain_rebuild(source: str, records: dict[str, Any], trusted: Iterable[str], call: str) -> str | None:
    """One message for every reason the ``records`` (``{"net": record, "task": record}``) cannot be rebuilt, with
    the one call that works (``call(path, net=..., trusted=[...])``); None when nothing stands in the way.

    Reasons are found without importing anything: a missing record or missing constructor arguments (the object
    must be passed), and class paths anywhere in a record from packages not trusted (they must be trusted).
    """
    trusted = tuple(trusted)
    reasons: list[str] = []
    to_pass: dict[str, str] = {}
    untrusted: list[str] = []
    for what, record in records.items():
        path = record.get("class_path") if isinstance(record, dict) else None
        if not isinstance(path, str):
            reasons.append(
                f"it does not record how to build its {what} (written by lightning_diffusionblocks 0.1, or by a {what}"
                " whose arguments could not be recorded)"
            )
            to_pass[what] = "..."
        elif record.get("init_args") is None:
            reasons.append(f"it records the {what} as `{path}` but not its constructor arguments")
            to_pass[what] = f"{path.rpartition('.')[2]}(...)"
        else:
            packages = untrusted_packages(record, trusted)
            if packages:
                paths = [p for p in class_paths(record) if top_package(p) in packages]
                named = ", ".join(f"`{p}`" for p in dict.fromkeys(map(str, paths)))
                reasons.append(
                    f"its {what} is built from {named}, whose package{'s are' if len(packages) > 1 else ' is'} not"
                    " trusted (importing it would run its code)"
                )
                untrusted += [p for p in packages if p not in untrusted]
    if not reasons:
        return None
    arguments = [f"{what}={obj}" for what, obj in to_pass.items()]
    if untrusted or trusted:  # the caller's own trusted list stays in the call
        arguments.append(f"trusted={[*trusted, *untrusted]!r}")
    message = f"Cannot rebuild the model from {source}: {'; '.join(reasons)}. Load it with\n    {call}(path, "
    message += f"{', '.join(arguments)})"
    if untrusted:
        whats = [w for w in records if w not in to_pass and untrusted_packages(records[w], trusted)]
        names = " and ".join(f"`{p}`" for p in untrusted)
        message += f"\nif you trust {names}; otherwise pass {' and '.join(f'{w}=...' for w in whats)} yourself."
    return message


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
    untrusted = untrusted_packages(record, trusted)  # every depth, before anything is imported
    if untrusted:
        raise RecordError(untrusted_message(what, record, untrusted), untrusted)
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
    if isinstance(owner, type) and not _trusted(f"{owner.__module__}.{owner.__qualname__}", trusted):
        # a trusted module may import a class from elsewhere; the class's own module decides
        untrusted = [top_package(owner.__module__)]
        raise RecordError(untrusted_message(what, {"class_path": f"{owner.__module__}.{owner.__qualname__}"},
                                            untrusted), untrusted)  # fmt: skip
    if not isinstance(owner, type) or (expected is not None and not issubclass(owner, expected)):
        raise RecordError(
            f"The checkpoint records the {what} as `{path}`, which is not a"
            f" {expected.__name__ if expected else 'class'}; refusing to call it. Pass {what}=... yourself."
        )
    if expected is None and not _buildable(owner):
        raise RecordError(f"The checkpoint records an argument `{what}` of type `{path}`, which records never hold.")
    if not isinstance(record["init_args"], dict):
        raise RecordError(f"The checkpoint's record of the {what} is malformed: {record!r}.")
    with trusting(trusted) as active:  # a constructor that builds a class_path dict itself follows the same rule
        kwargs = {k: _built(v, f"{what}.{k}", active) for k, v in record["init_args"].items()}
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


__all__ = ["TRUSTED_BY_DEFAULT", "RecordError", "RecordsInitArgs", "build", "building_trust", "class_paths",
           "explain_rebuild", "is_plain", "record_of", "trusting", "untrusted_packages"]  # fmt: skip
