"""Latent space: train on the latents of a user-given autoencoder, encoded once and cached.

:class:`LatentSpace` wraps any autoencoder with ``encode``/``decode``: diffusers ``AutoencoderKL``
(``encode(x).latent_dist``, a diagonal Gaussian), ``AutoencoderDC`` (``encode(x).latent``), or a module returning
tensors. Latents are ``z = (e − shift) · scale`` with ``scale``/``shift`` read from the VAE's config
(``scaling_factor``, ``shift_factor``) unless given, exactly as the stock diffusers pipelines undo them when they
decode (``decode(z / scale + shift)``). A Gaussian posterior gives its mode (its mean) by default, so a cache is a
pure function of the images; ``sample=True`` draws from it with a seeded generator instead.

:func:`cache_latents` encodes a data set once and stores the latents (with the labels and other fields) in a
safetensors file keyed by a digest of the VAE's weights, the latent settings and the data; a later run with the
same VAE and data reads the file, and a stale file (other weights, other data) is rebuilt or refused.
:class:`LatentDataset` serves the cached fields as the original data set's items did.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_diffusionblocks.files import Digest, atomic_write, module_digest

__all__ = ["LatentDataset", "LatentSpace", "StaleCacheError", "cache_latents"]

_FORMAT = "lightning_diffusionblocks.latents/1"


class StaleCacheError(ValueError):
    """A latent cache made by another autoencoder, other latent settings or other data."""


def _config_value(autoencoder: nn.Module, name: str) -> Any:
    config = getattr(autoencoder, "config", None)
    if isinstance(config, Mapping):
        return config.get(name)
    return getattr(config, name, None)


class LatentSpace:
    """Images ↔ latents through ``autoencoder``, with the diffusers scale and shift.

    Args:
        autoencoder: a module with ``encode(images)`` and ``decode(latents)``; diffusers outputs
            (``latent_dist``, ``latent``, ``sample``) and tuples are unwrapped.
        scaling_factor, shift_factor: by default the VAE config's ``scaling_factor`` / ``shift_factor``
            (1 and 0 when it has none; a ``shift_factor`` of None is 0).
        sample: False (default) encodes a Gaussian posterior to its mode (its mean); True draws one sample with a
            generator seeded by ``seed`` (one generator per :meth:`encode` call).
        seed: the seed of ``sample=True``.
        value_range: the range of the images (what :meth:`decode` returns and the SampleLogger shows).
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        sample: bool = False,
        seed: int = 0,
        value_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        if not callable(getattr(autoencoder, "encode", None)) or not callable(getattr(autoencoder, "decode", None)):
            raise TypeError(
                "LatentSpace needs an autoencoder with encode(images) and decode(latents);"
                f" {type(autoencoder).__name__} has not both. Pass e.g."
                " diffusers.AutoencoderKL.from_pretrained(..., subfolder='vae') (diffusers:"
                " `pip install 'lightning-diffusionblocks[diffusers]'`)."
            )
        self.autoencoder = autoencoder
        scale = scaling_factor if scaling_factor is not None else _config_value(autoencoder, "scaling_factor")
        shift = shift_factor if shift_factor is not None else _config_value(autoencoder, "shift_factor")
        self.scaling_factor = float(scale) if scale is not None else 1.0
        self.shift_factor = float(shift) if shift is not None else 0.0
        if self.scaling_factor == 0:
            raise ValueError("scaling_factor must not be 0 (latents would all be zero); pass e.g. 1 / std(latents).")
        self.sample, self.seed, self.value_range = sample, seed, value_range

    @property
    def device(self) -> torch.device:
        first = next(iter(self.autoencoder.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    def _raw(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        out = self.autoencoder.encode(images.to(self.device))
        if isinstance(out, (tuple, list)):
            out = out[0]
        dist = getattr(out, "latent_dist", None)
        if dist is None and hasattr(out, "mode") and hasattr(out, "sample") and not isinstance(out, Tensor):
            dist = out  # a posterior returned directly
        if dist is not None:
            return dist.sample(generator=generator) if self.sample else dist.mode()
        latent = getattr(out, "latent", None)
        if latent is None:
            latent = getattr(out, "latents", out)
        if not isinstance(latent, Tensor):
            raise TypeError(
                f"{type(self.autoencoder).__name__}.encode returned {type(out).__name__}; LatentSpace reads a tensor,"
                " `.latent_dist` (AutoencoderKL), `.latent` (AutoencoderDC) or the first item of a tuple."
            )
        return latent

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Latents ``(e − shift) · scale`` of ``images`` (in :attr:`value_range`), in eval mode, without gradients."""
        generator = None
        if self.sample:
            generator = torch.Generator(device=self.device).manual_seed(self.seed)
        with _eval(self.autoencoder):
            return (self._raw(images, generator) - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images from latents: ``decode(z / scale + shift)``, as the stock pipelines decode."""
        with _eval(self.autoencoder):
            out = self.autoencoder.decode(latents.to(self.device) / self.scaling_factor + self.shift_factor)
        if isinstance(out, (tuple, list)):
            out = out[0]
        out = getattr(out, "sample", out)
        if not isinstance(out, Tensor):
            raise TypeError(f"{type(self.autoencoder).__name__}.decode returned {type(out).__name__}, not images.")
        return out

    __call__ = decode  # a LatentSpace is the decoder SampleLogger(decode_latents=...) applies

    def encode_all(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """:meth:`encode` in batches; the latents come back on the CPU as float32. With ``sample=True`` batch ``i``
        is drawn with seed ``seed + i`` (the draw depends on ``batch_size``; the mode does not)."""
        out = []
        for i, start in enumerate(range(0, len(images), batch_size)):
            if self.sample:
                generator = torch.Generator(device=self.device).manual_seed(self.seed + i)
                with torch.no_grad(), _eval(self.autoencoder):
                    raw = self._raw(images[start : start + batch_size], generator)
                z = (raw - self.shift_factor) * self.scaling_factor
            else:
                z = self.encode(images[start : start + batch_size])
            out.append(z.float().cpu())
        return torch.cat(out)

    def fit_scaling(self, images: Tensor, batch_size: int = 256) -> float:
        """Set ``scaling_factor`` to 1 / std of the shifted latents of ``images`` (unit-variance latents, how the
        published factors were chosen) and return it; do it before caching."""
        self.scaling_factor = 1.0
        std = float(self.encode_all(images, batch_size).std())
        if not std > 0:
            raise ValueError("The latents of these images have zero spread; pass more (and different) images.")
        self.scaling_factor = 1.0 / std
        return self.scaling_factor

    @property
    def digest(self) -> str:
        """A digest of the autoencoder's weights and the latent settings: equal digests give equal latents."""
        settings = f"{self.scaling_factor!r} {self.shift_factor!r} {self.sample} {self.seed}"
        return Digest().text(module_digest(self.autoencoder)).text(settings).hexdigest()


class _eval:
    """Eval mode for the duration (dropout off), restoring the previous mode after."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.was = module, module.training

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.was)


class LatentDataset(Dataset):
    """Cached fields served like the original items: a tuple or a dict (``images`` holding the latents), per
    ``structure`` (field names in order for a tuple; the keys for a dict)."""

    def __init__(self, fields: dict[str, Tensor], structure: Literal["tuple", "dict"], order: Sequence[str]) -> None:
        lengths = {len(t) for t in fields.values()}
        if len(lengths) != 1:
            raise ValueError(f"Every cached field needs one row per item; got lengths {sorted(lengths)}.")
        self.fields, self.structure, self.order = fields, structure, list(order)

    @property
    def latents(self) -> Tensor:
        return self.fields["images"]

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> Any:
        if self.structure == "tuple":
            return tuple(self.fields[name][i] for name in self.order)
        return {name: self.fields[name][i] for name in self.order}


def _rows(data: Tensor | Dataset, batch_size: int) -> tuple[dict[str, Tensor], Literal["tuple", "dict"], list[str]]:
    """Every field of ``data`` stacked: images (a tensor, or field 0 / key ``images`` of each item) and the rest."""
    if isinstance(data, Tensor):
        return {"images": data}, "tuple", ["images"]
    batches: dict[str, list[Tensor]] = {}
    structure: Literal["tuple", "dict"] = "tuple"
    order: list[str] = []
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):  # type: ignore[arg-type]
        if isinstance(batch, Mapping):
            if "images" not in batch:
                raise ValueError(f"Dict items need an 'images' entry to encode; got keys {sorted(batch)}.")
            structure, named = "dict", dict(batch)
        elif isinstance(batch, (tuple, list)):
            named = {("images" if j == 0 else f"field{j}"): v for j, v in enumerate(batch)}
        elif isinstance(batch, Tensor):
            named = {"images": batch}
        else:
            raise TypeError(
                f"cache_latents reads tensors, tuples or dicts of tensors; an item is {type(batch).__name__}."
            )
        order = list(named)
        for name, value in named.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"Field {name!r} is {type(value).__name__}; only tensors can be cached.")
            batches.setdefault(name, []).append(value)
    if not batches:
        raise ValueError("cache_latents got an empty data set; pass at least one item.")
    return {name: torch.cat(parts) for name, parts in batches.items()}, structure, order


def cache_latents(
    latents: LatentSpace,
    data: Tensor | Dataset,
    path: str | os.PathLike[str],
    batch_size: int = 256,
    on_stale: Literal["rebuild", "error"] = "rebuild",
) -> LatentDataset:
    """Encode ``data`` once into the safetensors file ``path`` and serve the latents; reuse the file later.

    ``data`` is an image tensor or a data set of tensors, tuples (images first) or dicts (``images`` key). Its
    images are replaced by their latents; every other field is stored with them. The file records a digest of the
    autoencoder's weights, the latent settings and the data: a file with the same digest is read without encoding,
    one with another digest (a retrained VAE, other images) is re-encoded (``on_stale="rebuild"``, with a warning)
    or refused (``"error"``). A file that is not such a cache is always refused.
    """
    from lightning.pytorch.utilities import rank_zero_warn
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file, save_file

    if on_stale not in ("rebuild", "error"):
        raise ValueError(f"on_stale must be 'rebuild' or 'error', got {on_stale!r}.")
    path = Path(path)
    fields, structure, order = _rows(data, batch_size)
    data_digest = Digest().tensors(sorted(fields.items())).text(structure).text(json.dumps(order)).hexdigest()
    vae_digest = latents.digest  # hashes every weight: once per call
    key = Digest().text(_FORMAT).text(vae_digest).text(data_digest).hexdigest()
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            stored = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path} is not a latent cache ({err}); delete it or pass another path.") from err
        if metadata.get("format") != _FORMAT or set(stored) != set(order) or metadata.get("order") != json.dumps(order):
            raise ValueError(
                f"{path} is not a latent cache of these fields ({sorted(stored)} stored, {order} expected); delete"
                " it or pass another path."
            )
        if metadata.get("digest") == key:
            return LatentDataset(stored, structure, order)
        why = (
            "another autoencoder or other latent settings"
            if metadata.get("autoencoder") != vae_digest
            else "other data"
        )
        message = f"The latent cache {path} was made from {why}."
        if on_stale == "error":
            raise StaleCacheError(message + " Delete it, pass another path, or on_stale='rebuild'.")
        rank_zero_warn(message + " Encoding the data again.")
    fields["images"] = latents.encode_all(fields["images"], batch_size)
    metadata = {"format": _FORMAT, "digest": key, "autoencoder": vae_digest, "data": data_digest,
                "order": json.dumps(order), "structure": structure,
                "scaling_factor": repr(latents.scaling_factor), "shift_factor": repr(latents.shift_factor)}  # fmt: skip
    tensors = {name: t.contiguous() for name, t in fields.items()}

    def write(tmp: Path) -> None:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=metadata)

    atomic_write(path, write)
    return LatentDataset(fields, structure, order)
