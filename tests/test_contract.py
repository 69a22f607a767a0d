"""One contract for every (task, network) pair the package supports, in the spirit of a metric tester.

Every case runs through the same checks: only the active group's parameters change; each noise level is
served by its owning group and only that group's layers run at inference; any number of inference steps
works; save → ``load_from_checkpoint`` → identical outputs; validation under a plain Trainer equals
validation under the strategy; B=1 block-wise equals end-to-end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_diffusionblocks as ldb
from tests.conftest import fit, image_loader, tiny_dit, trainer_kwargs
from tests.fakes import unzero_linears
from tests.test_adapter import build as build_backbone
from tests.test_diffusers_models import infer as diffusers_infer
from tests.test_diffusers_models import latent_loader, needs_diffusers, wrapped
from tests.test_language import needs_hf, token_loader

V = 12


def _sigma_of_c_noise(args: tuple, kwargs: dict) -> float | None:
    return math.exp(4 * float(args[1][0]))  # DiT: forward(x, c_noise, labels), c_noise = ln σ / 4


def _sigma_of_adapter(args: tuple, kwargs: dict) -> float | None:
    return None if kwargs.get("mode") == "embeddings" or len(args) < 3 else float(args[2][0])


def _level_kwarg(args: tuple, kwargs: dict) -> float | None:
    return None if kwargs.get("mode") == "embeddings" else float(kwargs["level"][0])


def _classification_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (32,), generator=g)
    images = torch.randn(32, 1, 16, 16, generator=g) + labels.view(-1, 1, 1, 1).float()
    return DataLoader(TensorDataset(images, labels), batch_size=16)


@dataclass
class Case:
    """A (task, network) pair: how to build it, feed it, run its inference and read a call's noise level."""

    name: str
    make: Callable[[], tuple[nn.Module, ldb.tasks.Task]]
    loader: Callable[[], DataLoader]
    infer: Callable[[ldb.DiffusionBlocksModule, int], Tensor]
    level_of: Callable[[tuple, dict], float | None]
    module_kwargs: dict[str, Any] = field(default_factory=dict)
    #: what load_from_checkpoint needs besides the path (None: a network the record cannot rebuild)
    reload: Callable[[], dict[str, Any]] = dict
    exact_reload: bool = True
    marks: tuple = ()


def _adapter(family: str, conditioning: str) -> Callable[[], tuple[nn.Module, ldb.tasks.Task]]:
    def make() -> tuple[nn.Module, ldb.tasks.Task]:
        backbone = build_backbone(family, depth=3)
        net = ldb.models.ConditioningAdapter(backbone, num_classes=4, learn_embedding=False, conditioning=conditioning)
        return unzero_linears(net), ldb.tasks.Classification(4)  # leave zero initialisation: conditioning matters

    return make


def _lm(backbone: str, objective: str, **options: Any) -> Callable[[], tuple[nn.Module, ldb.tasks.Task]]:
    def make() -> tuple[nn.Module, ldb.tasks.Task]:
        from tests.test_language import build

        task = ldb.tasks.MaskedLM(V) if objective == "masked" else ldb.tasks.AutoregressiveLM(V)
        return build(backbone, objective, **options), task

    return make


def _lm_infer(objective: str) -> Callable[[ldb.DiffusionBlocksModule, int], Tensor]:
    if objective == "masked":
        return lambda m, steps: m.generate(num_samples=2, length=8, steps=steps, seed=1).float()
    return lambda m, steps: m.generate([1, 2, 3], max_new_tokens=2, steps=steps).float()


def _dit() -> tuple[nn.Module, ldb.tasks.Task]:
    return tiny_dit(depth=3), ldb.tasks.ImageGeneration()


def _flow(**options: Any) -> Callable[[], tuple[nn.Module, ldb.tasks.Task]]:
    return lambda: (tiny_dit(depth=3), ldb.tasks.FlowMatching(**options))


def _ddpm(**options: Any) -> Callable[[], tuple[nn.Module, ldb.tasks.Task]]:
    return lambda: (tiny_dit(depth=3), ldb.tasks.DDPM(**options))


def _level_scaled(scale: float) -> Callable[[tuple, dict], float | None]:
    """The level is what the network receives as its second argument (flow t, DDPM timestep), divided by ``scale``."""
    return lambda args, kwargs: float(args[1][0]) / scale


CASES = [
    Case("generation-dit", _dit, image_loader, lambda m, s: m.sample(labels=[1, 2], steps=s, guidance=2.0),
         _sigma_of_c_noise),
    Case("classification-vit-film", _adapter("vit", "film"), _classification_loader,
         lambda m, s: m.predict_proba(torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)), steps=s),
         _sigma_of_adapter, reload=lambda: {"net": _adapter("vit", "film")()[0]}),
    Case("classification-eva02-adaln", _adapter("eva02", "adaln_zero"), _classification_loader,
         lambda m, s: m.predict_proba(torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)), steps=s),
         _sigma_of_adapter, reload=lambda: {"net": _adapter("eva02", "adaln_zero")()[0]}),
    Case("masked-own", _lm("own", "masked"), lambda: token_loader(n=32), _lm_infer("masked"), _level_kwarg),
    Case("autoregressive-own", _lm("own", "autoregressive"), lambda: token_loader(n=32), _lm_infer("autoregressive"),
         _level_kwarg),
    Case("autoregressive-own-input-targets", _lm("own", "autoregressive", target_embedding="input"),
         lambda: token_loader(n=32), _lm_infer("autoregressive"), _level_kwarg, module_kwargs={"stem": "shared"},
         reload=lambda: {"net": _lm("own", "autoregressive", target_embedding="input")()[0]}),
    Case("masked-gpt2", _lm("gpt2", "masked"), lambda: token_loader(n=32), _lm_infer("masked"), _level_kwarg,
         reload=lambda: {"trusted": ["transformers"]}, exact_reload=False, marks=(needs_hf,)),
    Case("autoregressive-llama", _lm("llama", "autoregressive"), lambda: token_loader(n=32),
         _lm_infer("autoregressive"), _level_kwarg, reload=lambda: {"net": _lm("llama", "autoregressive")()[0]},
         marks=(needs_hf,)),
    Case("flow-dit", _flow(loss_bins=2), image_loader,
         lambda m, s: m.sample(labels=[1, 2], steps=s, guidance=2.0), _level_scaled(1.0)),
    Case("flow-dit-heun-x0-shift", _flow(noise=ldb.FlowSchedule(shift=3.0), prediction="x0", sampler="heun",
                                         time_scale=1000.0, grid="equiprobable"), image_loader,
         lambda m, s: m.sample(labels=[1, 2], steps=s, guidance=2.0), _level_scaled(1000.0)),
    Case("ddpm-dit", _ddpm(loss_bins=2), image_loader,
         lambda m, s: m.sample(labels=[1, 2], steps=s, guidance=2.0), _level_scaled(1.0)),
    Case("ddpm-dit-v-cosine", _ddpm(noise=ldb.DDPMSchedule(num_timesteps=100, beta_schedule="cosine"),
                                    prediction="v", eta=1.0), image_loader,
         lambda m, s: m.sample(num_samples=2, steps=s), _level_scaled(1.0)),
]  # fmt: skip


def _diffusers(family: str, task: Callable[[], ldb.tasks.Task]) -> Callable[[], tuple[nn.Module, ldb.tasks.Task]]:
    return lambda: (wrapped(family), task())


def _diffusers_case(name: str, family: str, task: Callable[[], ldb.tasks.Task], level_of: Any) -> Case:
    """A diffusers transformer (``DiffusersNetwork``) with one formulation: DiT class-conditional on latents, the
    others text-conditioned from dict batches; inference is guided by labels or text."""
    return Case(name, _diffusers(family, task), lambda: latent_loader(family), diffusers_infer(family), level_of,
                marks=(needs_diffusers,))


CASES += [
    _diffusers_case("diffusers-dit-edm-learned-sigma", "dit", ldb.tasks.ImageGeneration, _sigma_of_c_noise),
    _diffusers_case("diffusers-dit-ddpm", "dit", ldb.tasks.DDPM, _level_scaled(1.0)),
    _diffusers_case("diffusers-dit-flow", "dit", ldb.tasks.FlowMatching, _level_scaled(1.0)),
    _diffusers_case("diffusers-sd3-flow", "sd3", lambda: ldb.tasks.FlowMatching(loss_bins=2), _level_scaled(1.0)),
    _diffusers_case("diffusers-flux-flow-seam", "flux", ldb.tasks.FlowMatching, _level_scaled(1.0)),
    _diffusers_case("diffusers-pixart-ddpm", "pixart", ldb.tasks.DDPM, _level_scaled(1.0)),
    _diffusers_case("diffusers-sana-flow", "sana", ldb.tasks.FlowMatching, _level_scaled(1.0)),
]
PARAMS = [pytest.param(c, id=c.name, marks=c.marks) for c in CASES]


def module_for(case: Case, num_blocks: int = 3, **kwargs: Any) -> ldb.DiffusionBlocksModule:
    net, task = case.make()
    return ldb.DiffusionBlocksModule(net, task, num_blocks=num_blocks, lr=1e-2, **case.module_kwargs, **kwargs)


def fit_case(
    module: ldb.DiffusionBlocksModule, case: Case, tmp_path: Path, steps: int = 3, **strategy: Any
) -> L.Trainer:
    """Train on the case's data under ``strategy=`` or a DiffusionBlocksStrategy built from the other keywords."""
    chosen = strategy.pop("strategy", None) or ldb.DiffusionBlocksStrategy(**strategy)
    return fit(module, tmp_path, steps=steps, strategy=chosen, loader=case.loader())


def flat(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([p.detach().flatten().clone() for p in params])


class CallTrace:
    """Records, for every call of a module's sampling network, the group asked for, the noise level the
    network received and the layers that ran."""

    def __init__(self, module: ldb.DiffusionBlocksModule, case: Case) -> None:
        self.calls: list[dict[str, Any]] = []
        network = module.sampling_network

        def enter(_: nn.Module, args: tuple, kwargs: dict) -> None:
            call_kwargs = {k: v for k, v in kwargs.items() if k != "group"}
            level = case.level_of(args, call_kwargs)
            self.calls.append({"group": kwargs.get("group"), "level": level, "layers": []})

        network.register_forward_pre_hook(enter, with_kwargs=True)
        for index, block in enumerate(network.stack._modules.values()):
            block.register_forward_pre_hook(lambda *_, i=index: self.calls[-1]["layers"].append(i))


@pytest.mark.parametrize("case", PARAMS)
def test_only_the_active_group_changes(case: Case, tmp_path: Path) -> None:
    module = module_for(case)
    before = [flat(module.network.group_parameters(g)) for g in range(3)]
    # a shared stem is refused with a subset of groups (it would move a finished group's input): random over all
    shared = case.module_kwargs.get("stem") == "shared"
    fit_case(module, case, tmp_path, steps=2, **({} if shared else {"groups_to_train": [1]}))
    after = [flat(module.network.group_parameters(g)) for g in range(3)]
    trained = [s > 0 for s in module.group_steps.tolist()]
    assert [not torch.equal(b, a) for b, a in zip(before, after)] == trained
    assert module.group_steps.tolist() == [0, 2, 0] if not shared else sum(trained) in (1, 2)  # 2 steps: one stays


@pytest.mark.parametrize("case", PARAMS)
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_each_level_is_served_by_its_owning_group_only(case: Case, steps: int) -> None:
    module = module_for(case)
    trace = CallTrace(module, case)
    out = case.infer(module, steps)
    assert torch.isfinite(out).all()
    served = [c for c in trace.calls if c["level"] is not None]
    assert served, "the inference never called the network with a noise level"
    bounds = module.boundaries.tolist()
    for call in served:
        g = call["group"]
        lo, hi = bounds[2 - g], bounds[3 - g]  # group 0 owns the highest levels
        assert lo * (1 - 1e-6) <= call["level"] <= hi * (1 + 1e-6), (call, bounds)
        assert call["layers"] == module.network.groups[g]
    if steps == 5:
        assert {c["group"] for c in served} == {0, 1, 2}


@pytest.mark.parametrize("case", PARAMS)
def test_checkpoint_round_trip_gives_identical_outputs(case: Case, tmp_path: Path) -> None:
    module = module_for(case, ema_decay=0.9)
    trainer = fit_case(module, case, tmp_path)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = ldb.DiffusionBlocksModule.load_from_checkpoint(path, **case.reload())
    assert restored.blockwise
    assert int(restored.step_count) == 3
    for key, value in module.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    expected, got = case.infer(module, 3), case.infer(restored, 3)
    if case.exact_reload:
        assert torch.equal(expected, got)
    else:  # a rebuilt Hugging Face config may pick another attention kernel
        assert torch.allclose(expected, got, atol=1e-5)


@pytest.mark.parametrize("case", PARAMS)
def test_plain_trainer_validation_equals_strategy_validation(case: Case, tmp_path: Path) -> None:
    module = module_for(case)
    fit_case(module, case, tmp_path, steps=3)
    plain = L.Trainer(**trainer_kwargs(tmp_path)).validate(module, case.loader(), verbose=False)
    strategy = L.Trainer(strategy="diffusionblocks", **trainer_kwargs(tmp_path)).validate(
        module, case.loader(), verbose=False
    )
    assert plain == strategy
    assert set(plain[0]) >= {"val/loss", "val/loss_group_0", "val/loss_group_2"}


@pytest.mark.parametrize("case", PARAMS)
def test_one_group_blockwise_equals_end_to_end(case: Case, tmp_path: Path) -> None:
    blockwise, end_to_end = module_for(case, num_blocks=1), module_for(case, num_blocks=1)
    fit_case(blockwise, case, tmp_path, steps=3)
    fit_case(end_to_end, case, tmp_path, steps=3, strategy="auto")
    assert blockwise.blockwise
    assert not end_to_end.blockwise
    for (key, a), b in zip(blockwise.state_dict().items(), end_to_end.state_dict().values()):
        if key != "trained_blockwise":
            assert torch.equal(a, b), key
    assert torch.equal(case.infer(blockwise, 2), case.infer(end_to_end, 2))
