"""How each block group keeps its training state: weights and Adam moments in fp32 or in low precision.

A group that is not training needs none of its state at full precision until its turn comes, so
:class:`StatePrecision` chooses what an inactive (stored, possibly offloaded) group holds and what the active
group trains with. Its byte counts are the memory plan's single source for what a parameter costs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_diffusionblocks.schedules import step_seed

if TYPE_CHECKING:
    from lightning_diffusionblocks.partition import BlockwiseNetwork

WeightPrecision = Literal["fp32", "bf16"]
MomentPrecision = Literal["fp32", "bf16", "8bit"]
Rounding = Literal["nearest", "stochastic"]

#: bitsandbytes' 8-bit optimizers quantize each state tensor in blocks of this many values, one fp32 scale per block
BNB_BLOCK = 256
#: and keep a 256-entry fp32 quantization map per state tensor
BNB_QMAP = 256


@dataclass(frozen=True)
class StatePrecision:
    """What each block group's weights and Adam moments are kept in.

    Args:
        weights: ``"fp32"``, or ``"bf16"``: every group's weights (and EMA weights) are stored in bf16 and only the
            active group holds an fp32 master copy, made when it becomes active and rounded back when it stops.
        moments: ``"fp32"``; ``"bf16"``: inactive groups' Adam moments are stored in bf16 (the active group's are
            fp32); ``"8bit"``: bitsandbytes' block-wise 8-bit AdamW keeps every group's moments in 8 bits.
        rounding: how fp32 values are rounded to bf16 when a group is stored: ``"nearest"`` or ``"stochastic"``
            (unbiased: small updates survive many store/restore cycles on average).
        min_8bit_size: tensors with fewer values keep fp32 moments under ``"8bit"`` (bitsandbytes' own rule).
    """

    weights: WeightPrecision = "fp32"
    moments: MomentPrecision = "fp32"
    rounding: Rounding = "nearest"
    min_8bit_size: int = 4096

    def __post_init__(self) -> None:
        if self.weights not in ("fp32", "bf16"):
            raise ValueError(f"StatePrecision(weights=...) must be 'fp32' or 'bf16', got {self.weights!r}.")
        if self.moments not in ("fp32", "bf16", "8bit"):
            raise ValueError(f"StatePrecision(moments=...) must be 'fp32', 'bf16' or '8bit', got {self.moments!r}.")
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"StatePrecision(rounding=...) must be 'nearest' or 'stochastic', got {self.rounding!r}.")
        if isinstance(self.min_8bit_size, bool) or not isinstance(self.min_8bit_size, int) or self.min_8bit_size < 0:
            raise ValueError(
                f"StatePrecision(min_8bit_size=...) must be a non-negative integer, got {self.min_8bit_size!r}."
            )

    @classmethod
    def of(cls, value: StatePrecision | Mapping[str, Any] | None) -> StatePrecision:
        """The option as given to the module (an instance, its :meth:`record`, or None for full precision)."""
        if value is None:
            return cls()
        if isinstance(value, StatePrecision):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"weights", "moments", "rounding", "min_8bit_size"}
            if unknown:
                raise ValueError(f"Unknown StatePrecision fields {sorted(unknown)}.")
            return cls(**value)
        raise TypeError(f"state_precision must be a StatePrecision, a dict of its fields or None, got {value!r}.")

    def record(self) -> dict[str, Any]:
        """Plain data for hyper-parameters and checkpoints."""
        return asdict(self)

    @property
    def full(self) -> bool:
        """True when nothing is kept in low precision (the default)."""
        return self.weights == "fp32" and self.moments == "fp32"

    @property
    def switches(self) -> bool:
        """True when groups switch between a stored bf16 form and the active fp32 one (weights or moments in bf16)."""
        return self.weights == "bf16" or self.moments == "bf16"

    def check_optimizer(self, factory: object) -> None:
        """Refuse an optimizer factory with ``moments="8bit"``, which makes the module's own optimizer."""
        if factory is not None and self.moments == "8bit":
            raise ValueError(
                "StatePrecision(moments='8bit') makes the module's optimizer (bitsandbytes' AdamW8bit), so it cannot"
                " be combined with optimizer=. Either drop optimizer=, or keep moments='fp32' and build the 8-bit"
                " optimizer in your factory: optimizer=lambda groups: bitsandbytes.optim.AdamW8bit(groups, lr=...)."
            )

    def weight_bytes(self, numel: int, active: bool) -> int:
        """Bytes of one weight tensor of ``numel`` values: fp32 while its group trains, else as stored."""
        return numel * (4 if active or self.weights == "fp32" else 2)

    def moment_bytes(self, numel: int, active: bool) -> int:
        """Bytes of Adam's two moments for one tensor of ``numel`` values, in its group's state (active or not)."""
        if self.moments == "8bit" and numel >= self.min_8bit_size:
            return 2 * (numel + 4 * math.ceil(numel / BNB_BLOCK) + 4 * BNB_QMAP)
        if self.moments == "bf16" and not active:
            return 2 * 2 * numel
        return 2 * 4 * numel


def round_to_bf16(x: Tensor, rounding: Rounding = "nearest", generator: torch.Generator | None = None) -> Tensor:
    """``x`` (fp32) rounded to bf16: to nearest (ties to even, torch's own cast), or stochastically.

    Stochastic rounding adds 16 uniform random bits below the bf16 mantissa and truncates: a value between two bf16
    neighbours goes to the upper one (in magnitude) with probability equal to its distance from the lower one over
    their spacing, so the rounding is unbiased, and a value bf16 holds exactly is kept as it is (its low bits are 0).
    """
    if rounding == "nearest":
        return x.to(torch.bfloat16)
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, generator=generator, device=x.device, dtype=torch.int32)
    rounded = torch.bitwise_and(bits + noise, -(1 << 16)).view(torch.float32).to(torch.bfloat16)
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), rounded)  # a NaN's payload could carry into its sign


Slot = tuple[Any, str]  #: (owner, key): a parameter's ``data``, or one entry of an optimizer's per-parameter state


class GroupStateStore:
    """Switches block groups between their stored form (bf16 weights and/or moments) and the active form (fp32).

    Held by the module as ``state_store`` (when its :class:`StatePrecision` stores anything in bf16); the module
    activates the group each step trains, and an offloading callback calls :meth:`store` before it writes a group,
    so the copy it moves is the low-precision one. Whether a tensor is stored is read from its dtype, so every call
    is idempotent and an exact upcast stores back to the same bits: only the active group's trained fp32 master is
    ever rounded, with a generator seeded from ``(seed, group, step, tensor)``, so a resumed run rounds identically.

    Args:
        option: what is kept in bf16.
        seed: the module's seed (stochastic rounding's streams derive from it).
        networks: the module's networks whose group weights are stored (the live one first, then the EMA copy).
        optimizer: the module's optimizer, or None before it exists.
        step: the module's optimizer steps so far.
    """

    def __init__(
        self,
        option: StatePrecision,
        seed: int,
        networks: Callable[[], Sequence[BlockwiseNetwork]],
        optimizer: Callable[[], Optimizer | None],
        step: Callable[[], int],
    ) -> None:
        self.option = option
        self.seed = seed
        self._networks = networks
        self._optimizer = optimizer
        self._step = step

    def _slots(self, group: int) -> list[Slot]:
        """The group's tensors that have a stored form, in a fixed order (their index seeds their rounding)."""
        networks = list(self._networks())
        slots: list[Slot] = []
        if self.option.weights == "bf16":
            slots += [(p, "data") for network in networks for p in network.group_parameters(group)]
        opt = self._optimizer()
        if self.option.moments == "bf16" and opt is not None and networks:
            for p in networks[0].group_parameters(group):
                state = opt.state.get(p, {})
                slots += [
                    (state, key)
                    for key in sorted(state)
                    if isinstance(state[key], Tensor) and state[key].is_floating_point() and state[key].dim() > 0
                ]
        return slots

    @staticmethod
    def _get(slot: Slot) -> Tensor:
        owner, key = slot
        return owner.data if key == "data" else owner[key]

    @staticmethod
    def _set(slot: Slot, value: Tensor) -> None:
        owner, key = slot
        if key == "data":
            owner.grad = None  # a stored group is not training: its last step's gradient is stale
            owner.data = value
        else:
            owner[key] = value

    def generator(self, group: int, step: int, index: int, device: torch.device) -> torch.Generator:
        """The stream that rounds tensor ``index`` of ``group`` when it is stored at module step ``step``."""
        generator = torch.Generator(device=device)
        generator.manual_seed(step_seed(step_seed(step_seed(self.seed, group), step), index))
        return generator

    @torch.no_grad()
    def store(self, group: int) -> None:
        """Put ``group``'s fp32 tensors in their stored (bf16) form; tensors already stored or offloaded (empty) are
        left alone."""
        step, rounding = self._step(), self.option.rounding
        for index, slot in enumerate(self._slots(group)):
            t = self._get(slot)
            if t.numel() == 0 or t.dtype != torch.float32:
                continue
            generator = self.generator(group, step, index, t.device) if rounding == "stochastic" else None
            self._set(slot, round_to_bf16(t, rounding, generator))

    @torch.no_grad()
    def restore(self, group: int, moments: bool = True) -> None:
        """Give ``group`` its fp32 tensors back (exact upcasts of the stored ones)."""
        for slot in self._slots(group):
            t = self._get(slot)
            if t.numel() and t.dtype == torch.bfloat16 and (moments or slot[1] == "data"):
                self._set(slot, t.float())

    def activate(self, group: int | None) -> None:
        """Make ``group`` the one fp32 group and store every other one; None (end to end): every group is active."""
        networks = self._networks()
        groups = range(networks[0].num_groups if networks else 0)
        for g in groups:
            if group is not None and g != group:
                self.store(g)
        for g in groups if group is None else [group]:
            self.restore(g)

    def restore_all(self, moments: bool = False) -> None:
        """Every group's weights in fp32 (exact upcasts), for evaluation, which runs every group, and for the model a
        fit leaves behind. Moments stay stored unless asked: only training reads them, and :meth:`activate` upcasts
        a group's own when it trains again (a checkpoint saved after fit keeps them small)."""
        networks = self._networks()
        for g in range(networks[0].num_groups if networks else 0):
            self.restore(g, moments=moments)

    def check_fit(self, network: BlockwiseNetwork, world_size: int) -> None:
        """Refuse what the switching cannot serve: parameters that are not fp32 (their dtype tells stored from
        active), and several processes (each would round its own copy; not supported yet)."""
        other = sorted({str(p.dtype) for g in range(network.num_groups) for p in network.group_parameters(g)
                        if p.numel() and p.dtype not in (torch.float32, torch.bfloat16)})  # fmt: skip
        if other:
            raise ValueError(
                f"StatePrecision(weights={self.option.weights!r}, moments={self.option.moments!r}) keeps fp32 masters"
                f" of the active group, but the network's parameters are {other}. Keep the parameters in fp32 (use"
                " Trainer(precision='bf16-mixed'), not 'bf16-true'; don't call .half() / .to(bfloat16) on the"
                " model)."
            )
        if world_size > 1:
            raise ValueError(
                "StatePrecision with bf16 weights or moments trains in one process only for now; use"
                " StatePrecision(moments='8bit') (bitsandbytes' optimizer works in every layout) or train in one"
                " process."
            )


def adamw_8bit(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], weight_decay: float,
               min_8bit_size: int) -> Optimizer:  # fmt: skip
    """bitsandbytes' block-wise 8-bit AdamW over ``groups`` (imported here: an optional dependency)."""
    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)  # offline, its import warns that an optional CPU 4-bit kernel is missing
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError(
            "StatePrecision(moments='8bit') uses bitsandbytes' AdamW8bit: `pip install bitsandbytes` (or"
            " `pip install lightning-diffusionblocks[lowbit]`), or keep moments='fp32' / 'bf16'."
        ) from err
    finally:
        bnb_logger.setLevel(level)
    optimizer: Optimizer = bnb.optim.AdamW8bit(
        groups, lr=lr, betas=betas, weight_decay=weight_decay, min_8bit_size=min_8bit_size
    )
    return optimizer
