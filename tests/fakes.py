"""Fake networks for the formula tests: they record what a task hands them and return known outputs.

Tasks are driven through their public ``loss(run, batch, level, generator)`` and inference calls with these; the
networks built for inference have one block per group whose effect is visible in the output (a known scaling or
a tag), so the group that ran, and with it the routing, is checked for free.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.routing import Router


class Recorder:
    """A fake network: records every call and returns a fixed output (the embedding table when asked)."""

    def __init__(self, output: Tensor, table: Tensor | None = None) -> None:
        self.output, self.table = output, table
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        if kwargs.get("mode") == "embeddings":
            assert self.table is not None
            return self.table.clone()
        self.calls.append((args, kwargs))
        return self.output.clone()


def labels_in_call(args: tuple, kwargs: dict) -> Tensor | None:
    """The class labels a call passed (third positional argument, or an integer-tensor keyword)."""
    if len(args) > 2:
        return args[2]
    ints = [v for v in kwargs.values() if isinstance(v, Tensor) and not v.is_floating_point()]
    return ints[0] if ints else None


FACTORS = (0.5, -0.25, 1.5)  # group g's single block multiplies by FACTORS[g]: the output shows who ran


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor


class Tag(nn.Module):
    """Adds index+1: with one block per group, the stack output names the group that ran."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        return x + (self.index + 1)


def label_term(labels: Tensor | None, num_classes: int) -> Tensor:
    """label + 1 for a real class, 0 for anything else (whatever the null convention)."""
    if labels is None:
        return torch.zeros(1)
    return torch.where((labels >= 0) & (labels < num_classes), labels + 1, 0).double()


COND = 0.7


class FakeDenoiser(nn.Module):
    """F(x, c_noise, labels) = s_g·x + COND·(label + 1): s_g from the group's block, 0 for the null label."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Scale(f) for f in FACTORS)
        self.num_classes = num_classes
        self.calls: list[dict[str, Any]] = []

    def forward(self, x: Tensor, c_noise: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        labels = labels_in_call((x, c_noise, *args), kwargs)
        self.calls.append({"x": x.clone(), "c_noise": c_noise.clone(), "labels": labels})
        h = x
        for block in self.blocks:
            h = block(h)
        extra = label_term(labels, self.num_classes).float().view(-1, *([1] * (x.ndim - 1)))
        return h + COND * extra


class FakeMaskedLM(nn.Module):
    """Proposes token (position + g + 1) mod V with certainty, g = the group whose block ran."""

    def __init__(self, vocab: int, num_groups: int, per_group: Tensor | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Tag(g) for g in range(num_groups))
        self.vocab = vocab
        self.per_group = per_group  # optional (B, V) logits added per group
        self.calls: list[dict[str, Any]] = []

    def forward(self, tokens: Tensor, level: Tensor | None = None, **kwargs: Any) -> Tensor:
        n, length = tokens.shape
        h = torch.zeros(n, length, 1)
        for block in self.blocks:
            h = block(h)
        group = int(h[0, 0, 0]) - 1
        self.calls.append({"tokens": tokens.clone(), "level": level.clone(), "group": group})
        if self.per_group is not None:
            return self.per_group[group].expand(n, length, self.vocab).clone()
        proposal = (torch.arange(length) + group + 1) % self.vocab
        return F.one_hot(proposal, self.vocab).float().expand(n, length, self.vocab) * 30


class Declares(nn.Module):
    """A network that only declares attributes (objective, vocab_size, context_length, num_classes, ...)."""

    def __init__(self, **declared: Any) -> None:
        super().__init__()
        for name, value in declared.items():
            setattr(self, name, value)

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        return x


class FakeNet(nn.Module):
    """Records (x, level, labels) and returns out(x, level, labels); one label embedding row per class + null."""

    def __init__(self, out, num_classes: int = 10) -> None:  # noqa: ANN001
        super().__init__()
        self.out, self.num_classes = out, num_classes
        self.channels, self.image_size = 1, 2
        self.calls: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        self.calls.append((x.clone(), t.clone(), None if labels is None else labels.clone()))
        return self.out(x, t, labels)


def bound(task: ldb.tasks.Task, net: nn.Module) -> ldb.tasks.Task:
    task.bind(net)
    return task


def router(net: nn.Module, schedule, boundaries: Tensor | None = None) -> Router:  # noqa: ANN001
    return Router(lambda group: net, schedule, boundaries)


@torch.no_grad()
def unzero_linears(net: nn.Module, std: float = 0.05) -> nn.Module:
    """Give zero-initialised Linears (adaLN-Zero gates, heads) small random weights, so every conditioning path
    reaches the output."""
    for module in net.modules():
        if isinstance(module, nn.Linear) and not module.weight.any():
            module.weight.normal_(0, std)
    return net
