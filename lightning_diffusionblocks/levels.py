"""The noise-level interface every formulation offers: pure tensor math, importing nothing from the package.

A formulation (EDM σ, rectified-flow t, DDPM timesteps, masking t) describes the training distribution of its
noise level — a *level*, larger = more noise — and DiffusionBlocks cuts that distribution into B groups of equal
probability, group 0 (the first layers) owning the highest levels. What the module, the router and the tasks ask
of a formulation is declared here once, under neutral names:

* ``level_min`` / ``level_max``: the trained range; ``level_end``: the clean level a sampler ends at;
* ``boundaries(B, partition)``: B+1 ascending cut points; ``group_of(level, boundaries)``: the owning group;
* ``nominal_range(boundaries, g)`` and ``group_range(boundaries, g, gamma)``: a group's levels, widened by overlap;
* ``sample(n, lo, hi, generator, device)``: levels drawn from the distribution restricted to ``[lo, hi]``;
* ``mass(lo, hi)``: the probability of ``[lo, hi]``; ``loss_weight(level)``: the per-sample loss weight;
* ``sampling_grid(steps)``: the ``steps`` levels a sampler calls the network at, then ``level_end``.

The shared code (argument checks, the equal-probability cut, inverse-CDF sampling, widening and clamping, the
indexing of groups, the equal-probability grid) lives here; a formulation supplies its CDF and inverse CDF
(:meth:`NoiseLevels.cdf`, :meth:`NoiseLevels.icdf`), its widening rule (:meth:`NoiseLevels.widen`) and, where it
differs, its own cut (:meth:`NoiseLevels.cut`), draw (:meth:`NoiseLevels.draw`) or grid.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

#: How :meth:`NoiseLevels.boundaries` cuts the range; each formulation says which it supports.
PARTITIONS = ("equiprobable", "uniform_log", "linear")


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """``x`` of shape (N,) viewed as (N, 1, …, 1) with ``ndim`` dimensions, so a per-sample value (a level, a
    weight) broadcasts over the rest of a sample of ``ndim`` dimensions."""
    if ndim < x.ndim:
        raise ValueError(f"append_dims: cannot view a {x.ndim}-D tensor with {ndim} dimensions.")
    return x.reshape((-1,) + (1,) * (ndim - 1))


class GroupRouting:
    """Routing shared by every formulation: which group owns a level, given B+1 ascending boundaries."""

    def group_of(self, level: Tensor, boundaries: Tensor) -> Tensor:
        """Group index (0 = highest noise) owning each noise level, given B+1 ascending boundaries.

        A level on a boundary goes to the lower-noise group.
        """
        num_groups = len(boundaries) - 1
        inner = boundaries[1:-1].to(dtype=torch.float64, device=level.device)
        bucket = torch.bucketize(level.to(torch.float64), inner, right=False)  # 0 = lowest noise; b < x <= b'
        return (num_groups - 1 - bucket).clamp_(0, num_groups - 1)


class NoiseLevels(GroupRouting, ABC):
    """A formulation's noise levels: their training distribution, its partition into groups, and the grid a sampler
    walks. Subclasses supply :meth:`cdf`, :meth:`icdf`, ``level_min``/``level_max``, :meth:`loss_weight` and, where
    the default does not fit, :meth:`widen`, :meth:`cut`, :meth:`draw` or :meth:`sampling_grid`."""

    #: what a level is called in messages (σ, t, timestep)
    level_name: str = "level"
    #: the clean end of a sampler's walk, after the last level the network is called at
    level_end: float = 0.0
    #: the partitions :meth:`boundaries` accepts: the two every formulation has, plus any its :meth:`cut_other` adds
    partitions: tuple[str, ...] = ("equiprobable", "linear")
    #: the stock diffusers schedulers that sample a network trained here with its own parameterisation: "discrete"
    #: (DDPM family, timestep k), "flow" (flow matching, 1000·t), or None (none does: EDM's preconditioning)
    pipeline_time: str | None = None

    def edm_sigma(self, levels: Tensor) -> Tensor:
        """The EDM σ (noise-to-signal ratio) of these levels: the common scale for moving edges between formulations."""
        raise NotImplementedError(
            f"{type(self).__name__} defines no EDM sigma for its {self.level_name}; give it an `edm_sigma(levels)`"
            " method to convert its group edges to another formulation's scale (e.g. a diffusers pipeline's)."
        )

    # ------------------------------------------------------------------ what a formulation supplies
    @property
    @abstractmethod
    def level_min(self) -> float:
        """The lowest trained level."""

    @property
    @abstractmethod
    def level_max(self) -> float:
        """The highest trained level (pure noise or close to it)."""

    @abstractmethod
    def cdf(self, level: Tensor | float) -> Tensor:
        """P(level' ≤ level) of the training distribution before truncation to the trained range, float64."""

    @abstractmethod
    def icdf(self, q: Tensor | float) -> Tensor:
        """The inverse of :meth:`cdf`, float64."""

    @abstractmethod
    def loss_weight(self, level: Tensor) -> Tensor:
        """Per-sample loss weight at ``level``, float32."""

    def widen(self, lo: float, hi: float, gamma: float) -> tuple[float, float]:
        """The range ``[lo, hi]`` widened by overlap γ before clamping: γ × its width on both sides (linear in the
        level); formulations whose overlap is measured in another space (ln σ, logit t) override this."""
        pad = gamma * (hi - lo)
        return lo - pad, hi + pad

    def cut(self, frac: Tensor, partition: str) -> Tensor:
        """Levels at the fractions ``frac`` (0 … 1, float64) of the range under ``partition``; the ends are set
        exactly by :meth:`boundaries`. ``equiprobable``: quantiles of the truncated distribution; ``linear``:
        equal steps of the level; other partitions are the formulation's (:meth:`cut_other`)."""
        if partition == "equiprobable":
            return self.quantile(frac)
        if partition == "linear":
            return self.level_min + frac * (self.level_max - self.level_min)
        return self.cut_other(frac, partition)

    def cut_other(self, frac: Tensor, partition: str) -> Tensor:
        """A partition beyond ``equiprobable``/``linear`` (EDM and flow: ``uniform_log``), named in :attr:`partitions`;
        refused by default."""
        raise self.unknown_partition(partition)

    def unknown_partition(self, partition: str) -> ValueError:
        """The error for a partition this formulation does not offer, naming the ones it does."""
        offered = ", ".join(repr(p) for p in self.partitions[:-1]) + f" or {self.partitions[-1]!r}"
        return ValueError(f"Unknown partition {partition!r}; use {offered}.")

    # ------------------------------------------------------------------ the distribution
    def quantile(self, frac: Tensor | float) -> Tensor:
        """The level below which a share ``frac`` of the distribution truncated to the trained range lies."""
        q_lo, q_hi = self.cdf(self.level_min), self.cdf(self.level_max)
        return self.icdf(q_lo + torch.as_tensor(frac, dtype=torch.float64) * (q_hi - q_lo))

    def mass(self, lo: float, hi: float) -> float:
        """Probability mass of the distribution truncated to the trained range inside [lo, hi]."""
        total = self.cdf(self.level_max) - self.cdf(self.level_min)
        return float((self.cdf(hi) - self.cdf(lo)) / total)

    # ------------------------------------------------------------------ partition
    def boundaries(self, num_groups: int, partition: str = "equiprobable") -> Tensor:
        """B+1 ascending levels, float64; interval [b_i, b_{i+1}] is owned by group B−1−i (group 0: the highest
        levels). The ends are ``level_min`` and ``level_max`` exactly."""
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}.")
        frac = torch.arange(num_groups + 1, dtype=torch.float64) / num_groups
        out = self.cut(frac, partition)
        out[0], out[-1] = self.level_min, self.level_max  # exact ends, no round-off
        return out

    def nominal_range(self, boundaries: Tensor, group: int) -> tuple[float, float]:
        """(lo, hi) owned by ``group`` (0 = first layers = highest noise), without overlap."""
        num_groups = len(boundaries) - 1
        if not 0 <= group < num_groups:
            raise ValueError(f"group must be in [0, {num_groups}), got {group}.")
        return float(boundaries[num_groups - 1 - group]), float(boundaries[num_groups - group])

    def group_range(self, boundaries: Tensor, group: int, gamma: float = 0.0) -> tuple[float, float]:
        """(lo, hi) trained by ``group`` (0 = first layers = highest noise): its nominal range widened by overlap γ
        (:meth:`widen`), clamped to [level_min, level_max] (paper App. C)."""
        lo, hi = self.nominal_range(boundaries, group)
        if gamma < 0:
            raise ValueError(f"Overlap gamma must be >= 0, got {gamma}.")
        lo_w, hi_w = self.widen(lo, hi, gamma)
        return max(lo_w, self.level_min), min(hi_w, self.level_max)

    # ------------------------------------------------------------------ drawing levels
    def sample(
        self,
        n: int,
        lo: float | None = None,
        hi: float | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Draw n levels from the distribution restricted to [lo, hi] (default the trained range), float32 on
        ``device``; the random numbers come from ``generator`` on its own device."""
        lo = self.level_min if lo is None else lo
        hi = self.level_max if hi is None else hi
        dev = generator.device if generator is not None else torch.device(device)
        return self.draw(n, lo, hi, generator, dev).to(device=device, dtype=torch.float32)

    def draw(self, n: int, lo: float, hi: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """n levels in [lo, hi] on ``device`` by inverse CDF (exact, no rejection loop), float64."""
        self.check_range(lo, hi)
        q_lo, q_hi = self.cdf(lo).to(device), self.cdf(hi).to(device)
        u = torch.rand(n, dtype=torch.float64, generator=generator, device=device)
        return self.icdf(q_lo + u * (q_hi - q_lo)).clamp_(lo, hi)

    def check_range(self, lo: float, hi: float) -> None:
        """Refuse an empty range to draw levels from."""
        if not lo < hi:
            raise ValueError(f"Need lo < hi to sample {self.level_name}, got [{lo}, {hi}].")

    # ------------------------------------------------------------------ sampling grid
    def equiprobable_grid(self, steps: int) -> Tensor:
        """Descending grid of ``steps`` levels, equally spaced in the truncated CDF, from ``level_max`` to
        ``level_min`` (both exact), float64: each group serves about 1/B of the steps (paper App. H)."""
        if steps < 1:
            raise ValueError(f"Sampling needs at least 1 step, got steps={steps}.")
        if steps == 1:
            return torch.tensor([self.level_max], dtype=torch.float64)
        q_lo, q_hi = self.cdf(self.level_min), self.cdf(self.level_max)
        q = q_hi - torch.arange(steps, dtype=torch.float64) / (steps - 1) * (q_hi - q_lo)
        out = self.icdf(q).clamp(self.level_min, self.level_max)
        out[0], out[-1] = self.level_max, self.level_min
        return out

    def sampling_grid(self, steps: int) -> Tensor:
        """The walk of a sampler with ``steps`` network calls, float64, shape (steps + 1,), descending: the levels
        the network is called at, then ``level_end``. Default: :meth:`equiprobable_grid`."""
        end = torch.tensor([self.level_end], dtype=torch.float64)
        return torch.cat([self.equiprobable_grid(steps), end])

    # ------------------------------------------------------------------ old names
    @property
    def sigma_min(self) -> float:
        """``level_min`` under the name the module and dashboards read (σ, t or a timestep bound)."""
        return self.level_min

    @property
    def sigma_max(self) -> float:
        """``level_max`` under the name the module and dashboards read (σ, t or a timestep bound)."""
        return self.level_max


__all__ = ["PARTITIONS", "GroupRouting", "NoiseLevels", "append_dims"]
