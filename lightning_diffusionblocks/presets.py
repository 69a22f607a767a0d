"""Ready-made settings: the MNIST demo's DiT, task and training run, and the tiny DiT of the tests.

The example scripts, the benchmarks and the tests build their networks from here, so a benchmark measures the
model users run, and a change to the demo reaches all of them at once::

    import lightning_diffusionblocks as ldb

    net = ldb.presets.demo_dit()                       # the demo's 28×28 class-conditional DiT
    demo = ldb.presets.MNISTDemo(formulation="edm")    # the whole demo run as data
    module, data = demo.module(), demo.datamodule()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from lightning_diffusionblocks.data import MNISTDataModule
from lightning_diffusionblocks.ddpm import DDPMSchedule
from lightning_diffusionblocks.models import DiT
from lightning_diffusionblocks.module import DiffusionBlocksModule
from lightning_diffusionblocks.precision import StatePrecision
from lightning_diffusionblocks.tasks import DDPM, FlowMatching, ImageGeneration, Task


@dataclass(frozen=True)
class DiTSettings:
    """The arguments of :class:`~lightning_diffusionblocks.models.DiT`, as data that can be stored and varied."""

    image_size: int = 28
    channels: int = 1
    patch: int = 4
    dim: int = 128
    depth: int = 6
    heads: int = 4
    num_classes: int = 10
    noise_scale: float = 100.0

    def build(self) -> DiT:
        """A fresh DiT with these settings (its initial weights come from the global torch seed)."""
        return DiT(**asdict(self))


#: the MNIST demo's DiT (examples/mnist_generation.py, benchmarks/parity.py)
DEMO_DIT = DiTSettings()
#: the tests' DiT: 8×8 single-channel images, two 4×4 patches a side, width 32
TINY_DIT = DiTSettings(image_size=8, dim=32, heads=2)


def demo_dit(**overrides: Any) -> DiT:
    """The demo's DiT, with any field of :class:`DiTSettings` changed (``demo_dit(dim=32, depth=3)``)."""
    return replace(DEMO_DIT, **overrides).build()


def tiny_dit(depth: int = 6, dim: int = 32, num_classes: int = 10) -> DiT:
    """The tests' tiny DiT (8×8 images): fast enough to train for a few steps in a unit test."""
    return replace(TINY_DIT, depth=depth, dim=dim, num_classes=num_classes).build()


#: the task class of each formulation (the DiT is the same; it receives ¼ ln σ, t ∈ [0, 1] or integer timesteps)
GENERATION_TASKS: dict[str, Callable[..., Task]] = {"edm": ImageGeneration, "flow": FlowMatching, "ddpm": DDPM}
#: the DiT's noise-embedding scale per formulation: its input is ¼·ln σ (edm), t ∈ [0, 1] (flow), k ∈ [0, 999] (ddpm)
NOISE_SCALE = {"edm": 100.0, "flow": 100.0, "ddpm": 0.1}
#: classifier-free guidance of the demo's samples per formulation: the paper's 2.0; 3.0 for flow, whose samples at
#: the demo's budget are recognisable more often with it (BENCHMARKS.md, "MNIST demo")
GUIDANCE = {"edm": 2.0, "flow": 3.0, "ddpm": 2.0}
#: DiffusionBlocks optimizer steps of the demo's default run (end to end: a B-th of them, the same layer evaluations)
DEFAULT_STEPS = 4000


def generation_task(
    formulation: str, prediction: str = "epsilon", beta_schedule: str = "linear", label_dropout: float = 0.1
) -> Task:
    """The formulation's image-generation task; DDPM's output (ε or v) and β schedule are options the others lack."""
    if formulation not in GENERATION_TASKS:
        raise ValueError(f"formulation={formulation!r} is none of {sorted(GENERATION_TASKS)}; e.g. formulation='flow'.")
    if formulation != "ddpm":
        if (prediction, beta_schedule) != ("epsilon", "linear"):
            raise ValueError(
                f"prediction and beta_schedule are DDPM options; use generation_task('ddpm', {prediction!r},"
                f" {beta_schedule!r}) or leave them at their defaults."
            )
        return GENERATION_TASKS[formulation](label_dropout=label_dropout)
    schedule = DDPMSchedule(beta_schedule=beta_schedule)  # type: ignore[arg-type]
    return DDPM(noise=schedule, prediction=prediction, label_dropout=label_dropout)  # type: ignore[arg-type]


@dataclass(frozen=True)
class MNISTDemo:
    """Every setting of the MNIST demo run that shapes its numbers (examples/mnist_generation.py's options).

    ``None`` means the formulation's or the strategy's default: ``steps`` is :data:`DEFAULT_STEPS` for
    DiffusionBlocks and a B-th of it end to end (the same layer evaluations), ``noise_scale`` and ``guidance``
    come from :data:`NOISE_SCALE` and :data:`GUIDANCE`.
    """

    strategy: str = "diffusionblocks"
    formulation: str = "flow"
    prediction: str = "epsilon"
    beta_schedule: str = "linear"
    num_blocks: int = 3
    steps: int | None = None
    dim: int = DEMO_DIT.dim
    depth: int = DEMO_DIT.depth
    heads: int = DEMO_DIT.heads
    patch: int = DEMO_DIT.patch
    noise_scale: float | None = None
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    lr_schedule: str = "cosine"
    ema: float = 0.995
    gamma: float = 0.05
    partition: str = "equiprobable"
    stem: str = "per_group"
    sample_steps: int = 50
    guidance: float | None = None
    per_class: int = 10
    data_dir: str | None = None
    accelerator: str = "cpu"
    seed: int = 0
    #: what inactive groups keep their weights and Adam moments in (:class:`StatePrecision`'s fields)
    state_weights: str = "fp32"
    state_moments: str = "fp32"
    state_rounding: str = "nearest"

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> MNISTDemo:
        """Settings read back from JSON; an unknown name is refused rather than dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown MNISTDemo settings {unknown}; the settings are {sorted(known)}.")
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def blockwise(self) -> bool:
        return self.strategy == "diffusionblocks"

    @property
    def total_steps(self) -> int:
        return self.steps or (DEFAULT_STEPS if self.blockwise else DEFAULT_STEPS // self.num_blocks)

    @property
    def guidance_scale(self) -> float:
        return GUIDANCE[self.formulation] if self.guidance is None else self.guidance

    @property
    def dit(self) -> DiTSettings:
        noise_scale = self.noise_scale or NOISE_SCALE[self.formulation]
        return replace(DEMO_DIT, patch=self.patch, dim=self.dim, depth=self.depth, heads=self.heads,
                       noise_scale=noise_scale)  # fmt: skip

    @property
    def layer_evaluations(self) -> int:
        """Layer evaluations of training: each step runs depth / B layers block-wise, all of them end to end."""
        return round(self.total_steps * (self.depth / self.num_blocks if self.blockwise else self.depth))

    def task(self) -> Task:
        return generation_task(self.formulation, self.prediction, self.beta_schedule)

    def module(self) -> DiffusionBlocksModule:
        """The demo's module: a fresh DiT (from the global torch seed) wrapped with the demo's training settings."""
        return DiffusionBlocksModule(
            self.dit.build(),
            self.task(),
            num_blocks=self.num_blocks,
            stem=self.stem,  # type: ignore[arg-type]
            gamma=self.gamma,
            partition=self.partition,  # type: ignore[arg-type]
            lr=self.lr,
            warmup_steps=self.warmup,
            lr_schedule=self.lr_schedule,  # type: ignore[arg-type]
            ema_decay=self.ema,
            seed=self.seed,
            state_precision=self.state_precision,
        )

    @property
    def state_precision(self) -> StatePrecision:
        return StatePrecision(self.state_weights, self.state_moments, self.state_rounding)  # type: ignore[arg-type]

    def datamodule(self) -> MNISTDataModule:
        return MNISTDataModule(self.data_dir, batch_size=self.batch_size, seed=self.seed)
