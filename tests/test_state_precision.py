"""Low-precision per-group state in training: bf16 rounding, the store/restore switch, 8-bit moments, offload, resume.

Expected values are computed here from the bf16 bit layout (sign, 8 exponent bits, the top 7 of fp32's 23 mantissa
bits) and from AdamW's update rule, not with the package's helpers.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.callbacks import BlockMemoryMonitor, BlockOffload
from lightning_diffusionblocks.data import make_loader
from lightning_diffusionblocks.memory import optimizer_bytes
from lightning_diffusionblocks.optimisation import param_groups
from lightning_diffusionblocks.precision import GroupStateStore, StatePrecision, adamw_8bit, round_to_bf16
from tests.conftest import image_loader, make_module, trainer_kwargs

BF16_BF16 = {"weights": "bf16", "moments": "bf16", "rounding": "stochastic"}
BF16_8BIT = {"weights": "bf16", "moments": "8bit", "min_8bit_size": 0}  # tiny tensors: 8 bits all the same


def bits(x: torch.Tensor) -> np.ndarray:
    """fp32 bit patterns as unsigned integers."""
    return x.numpy().view(np.uint32).astype(np.int64)


def bf16_bits(y: torch.Tensor) -> np.ndarray:
    """bf16 values as their fp32 bit patterns (a bf16 is the top half of an fp32)."""
    return bits(y.float())


def test_nearest_rounding_is_round_half_to_even_on_the_bit_pattern() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, generator=g) * torch.logspace(-40, 38, 20_000).float()
    ties = (torch.randint(0, 0x7F80, (2000,), generator=g, dtype=torch.int32) << 16) | (1 << 15)  # finite, low 0x8000
    x = torch.cat([x, ties.view(torch.float32), torch.tensor([0.0, -0.0, math.inf, -math.inf, 1e-45, 3.4e38])])
    b = bits(x)
    low, high = b & 0xFFFF, b >> 16
    up = (low > 0x8000) | ((low == 0x8000) & (high & 1 == 1))
    expected = ((high + up) << 16) & 0xFFFFFFFF
    finite = np.isfinite(x.numpy())
    assert np.array_equal(bf16_bits(round_to_bf16(x, "nearest"))[finite], expected[finite])
    assert finite[:-6].all()
    assert torch.equal(round_to_bf16(x[-4:-2], "nearest").float(), x[-4:-2])
    assert torch.isnan(round_to_bf16(torch.tensor([math.nan]), "stochastic", torch.Generator())).all()


def test_stochastic_rounding_is_unbiased_between_the_two_bf16_neighbours() -> None:
    g = torch.Generator().manual_seed(1)
    values = torch.randn(48, generator=g) * torch.logspace(-20, 20, 48)
    values[0] = 1.0 + 2**-7  # a bf16 value: kept exactly
    n = 4000
    x = values.repeat_interleave(n)
    y = round_to_bf16(x, "stochastic", torch.Generator().manual_seed(2)).float()
    b = bits(x)
    lower = b & 0xFFFF0000  # truncation towards zero: the neighbour of smaller magnitude
    upper = lower + 0x10000  # the next bf16 away from zero
    got = bf16_bits(y)
    assert np.all((got == lower) | (got == upper))
    assert torch.equal(y[:n], x[:n])
    spacing = (
        torch.from_numpy(upper.astype(np.uint32).view(np.float32)).double()
        - torch.from_numpy(lower.astype(np.uint32).view(np.float32)).double()
    ).abs()
    error = (y.double() - x.double()).reshape(-1, n).mean(dim=1)
    # the mean of n roundings has standard deviation at most spacing / (2 sqrt(n)): 6 of those bound it
    bound = 6 * spacing.reshape(-1, n)[:, 0] / (2 * math.sqrt(n))
    assert (error.abs() <= bound).all(), (error / spacing.reshape(-1, n)[:, 0]).abs().max()
    again = round_to_bf16(x, "stochastic", torch.Generator().manual_seed(2)).float()
    assert torch.equal(again, y)  # a seeded generator rounds the same way (a resumed run rounds identically)


def test_the_active_groups_step_is_adamw_on_the_upcast_stored_state() -> None:
    """Group 0 trains a step, is stored (bf16 weights and moments) while group 1 trains, comes back: its weights and
    moments are the exact upcasts of the rounded ones, and its next step is AdamW's update computed here."""
    module = make_module()
    network = module.network
    lr, (b1, b2), wd, eps = 0.01, (0.9, 0.99), 0.1, 1e-8
    opt = torch.optim.AdamW(param_groups(network), lr=lr, betas=(b1, b2), weight_decay=wd, eps=eps)
    option = StatePrecision(weights="bf16", moments="bf16")
    store = GroupStateStore(option, 0, lambda: [network], lambda: opt, lambda: 0)
    g = torch.Generator().manual_seed(3)

    def step(group: int) -> list[torch.Tensor]:
        grads = []
        for p in network.group_parameters(group):
            p.grad = torch.randn(p.shape, generator=g)
            grads.append(p.grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return grads

    store.activate(0)
    step(0)
    params = network.group_parameters(0)
    trained = [p.detach().clone() for p in params]
    moments = [(opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()) for p in params]
    store.activate(1)
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert {opt.state[p]["exp_avg_sq"].dtype for p in params} == {torch.bfloat16}
    assert {p.dtype for p in network.group_parameters(1)} == {torch.float32}
    step(1)
    store.activate(0)
    assert {p.dtype for p in network.group_parameters(1) + network.group_parameters(2)} == {torch.bfloat16}
    for p, w, (m, v) in zip(params, trained, moments):
        assert p.dtype == torch.float32
        assert torch.equal(p, w.to(torch.bfloat16).float())
        assert torch.equal(opt.state[p]["exp_avg"], m.to(torch.bfloat16).float())
        assert torch.equal(opt.state[p]["exp_avg_sq"], v.to(torch.bfloat16).float())
    before = [(p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()) for p in params]
    grads = step(0)
    for p, grad, (w, m, v) in zip(params, grads, before):
        m2 = b1 * m.double() + (1 - b1) * grad.double()
        v2 = b2 * v.double() + (1 - b2) * grad.double() ** 2
        update = (m2 / (1 - b1**2)) / ((v2 / (1 - b2**2)).sqrt() + eps)
        expected = w.double() * (1 - lr * wd) - lr * update
        torch.testing.assert_close(p.double(), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"].double(), v2, rtol=1e-6, atol=0)


def group_dtypes(module: ldb.DiffusionBlocksModule, opt: Any, group: int) -> dict[str, set[torch.dtype]]:
    """The dtypes of a group's weights, EMA weights and optimizer state tensors (offloaded ones are empty but typed)."""
    params = module.network.group_parameters(group)
    assert module.ema_network is not None
    moments = {v.dtype for p in params for k, v in opt.state.get(p, {}).items() if k in {"exp_avg", "state1", "state2"}}
    return {"weights": {p.dtype for p in params}, "ema": {p.dtype for p in module.ema_network.group_parameters(group)},
            "moments": moments}  # fmt: skip


class Dtypes(Callback):
    """After each step: which group trained, the dtypes of every group, and (offloaded) the files' dtypes."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[dict[str, set[torch.dtype]]]]] = []
        self.files: dict[int, set[torch.dtype]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        opt = trainer.optimizers[0]
        self.seen.append((pl_module.last_group, [group_dtypes(pl_module, opt, g) for g in range(3)]))
        offload = next((c for c in trainer.callbacks if isinstance(c, BlockOffload)), None)
        if offload is not None and offload.directory is not None:
            for path in offload.directory.glob("group_*.pt"):
                tensors = torch.load(path, weights_only=True)
                self.files[int(path.stem[6:])] = {t.dtype for t in tensors if t.dim() > 0}


def sequential(steps_per_phase: int = 2) -> ldb.DiffusionBlocksStrategy:
    return ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=steps_per_phase)


def run(root: Path, option: dict, steps: int = 6, callbacks: list | None = None, ckpt: Path | None = None,
        n: int = 64, validate: bool = False) -> tuple[L.Trainer, ldb.DiffusionBlocksModule]:  # fmt: skip
    """A sequential fit (2 steps a phase) on the resumable loader; ``validate``: one validation batch every 2 steps."""
    module = make_module(state_precision=option, ema_decay=0.9, weight_decay=0.05, gradient_clip_val=1.0)
    checkpoints = any(isinstance(c, ModelCheckpoint) for c in callbacks or [])
    every = {"val_check_interval": 2, "limit_val_batches": 1} if validate else {}
    trainer = L.Trainer(strategy=sequential(), max_steps=steps, callbacks=callbacks or [],
                        **trainer_kwargs(root, enable_checkpointing=checkpoints, **every))  # fmt: skip
    loader = make_loader(image_loader(n=n).dataset, batch_size=16, shuffle=True)
    trainer.fit(module, loader, image_loader(n=16) if validate else None, ckpt_path=ckpt)
    return trainer, module


def state_of(trainer: L.Trainer, module: ldb.DiffusionBlocksModule) -> dict[str, torch.Tensor]:
    """The module's tensors and the optimizer's, flattened, as they are now."""
    out = dict(module.state_dict())
    names = {id(p): n for n, p in module.named_parameters()}
    for p, state in trainer.optimizers[0].state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"opt:{names[id(p)]}:{key}"] = value.cpu()
    return out


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)}/{len(a)} tensors differ, e.g. {differ[:4]}"


@pytest.mark.parametrize("option", [BF16_BF16, BF16_8BIT], ids=["bf16-moments", "8bit-moments"])
def test_inactive_groups_are_stored_and_offloaded_in_low_precision(tmp_path: Path, option: dict) -> None:
    """Inactive groups hold bf16 weights and EMA and bf16 / uint8 moments, the active one fp32, with and without
    BlockOffload (whose files hold the low-precision tensors); the run with offload (and a validation every 2 steps,
    which runs every group in fp32) ends bit-identical to the plain one; after fit the model is fp32 again, samples,
    saves and loads a checkpoint, and trains again."""
    low_moments = torch.bfloat16 if option["moments"] == "bf16" else torch.uint8
    ends = {}
    for offload in (False, True):
        dtypes = Dtypes()
        callbacks: list[Callback] = [dtypes] + ([BlockOffload(directory=tmp_path / "off")] if offload else [])
        trainer, module = run(tmp_path / str(offload), option, callbacks=callbacks, validate=offload)
        for active, groups in dtypes.seen:
            for g, found in enumerate(groups):
                if g == active:
                    assert found["weights"] == found["ema"] == {torch.float32}, (active, g, found)
                    assert found["moments"] == ({torch.float32} if option["moments"] == "bf16" else {torch.uint8})
                elif found["moments"]:  # a group that has trained
                    assert found == {"weights": {torch.bfloat16}, "ema": {torch.bfloat16}, "moments": {low_moments}}
                else:
                    assert found["weights"] == found["ema"] == {torch.bfloat16}, (active, g, found)
        assert [a for a, _ in dtypes.seen] == [0, 0, 1, 1, 2, 2]
        if offload:  # groups 0 and 1 were written after training: weights, EMA and moments in low precision
            assert dtypes.files[0] == {torch.bfloat16, low_moments, torch.float32} - (
                {torch.float32} if option["moments"] == "bf16" else set()
            )
        assert {p.dtype for p in module.parameters()} == {torch.float32}  # an ordinary model after fit
        ends[offload] = state_of(trainer, module)
        assert module.sample(labels=[1, 2], steps=2).isfinite().all()
    assert_identical(ends[False], ends[True])
    # a checkpoint saved after fit holds the stored moments, loads with the restricted unpickler, and trains on
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    saved = torch.load(tmp_path / "after.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["state_precision"] == StatePrecision.of(option).record()
    loaded = ldb.DiffusionBlocksModule.load_from_checkpoint(tmp_path / "after.ckpt")
    assert loaded.state_precision == StatePrecision.of(option)
    assert torch.equal(loaded.sample(labels=[1], steps=2), module.sample(labels=[1], steps=2))
    again = L.Trainer(strategy=sequential(), max_steps=2, **trainer_kwargs(tmp_path / "again"))
    again.fit(module, image_loader())
    assert int(module.step_count) == 8
    assert {p.dtype for p in module.parameters()} == {torch.float32}


def test_resume_is_bit_identical_mid_phase_at_a_phase_boundary_and_at_an_epoch_end(tmp_path: Path) -> None:
    """Uninterrupted: 8 steps, sequential phases of 2 steps, epochs of 5 batches, a checkpoint after every step and
    at every epoch end. Resumed (with disk offload) from step 3 (mid-phase), step 4 (group 1 -> 2) and the epoch-end
    checkpoint (step 5): weights, EMA and every optimizer state tensor end bit-identical to the uninterrupted run."""
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    epoch = ModelCheckpoint(dirpath=tmp_path / "epoch", save_top_k=-1)
    trainer, module = run(tmp_path / "full", BF16_BF16, steps=8, callbacks=[every, epoch], n=80)
    reference = state_of(trainer, module)
    stored = torch.load(tmp_path / "ckpt" / "epoch=0-step=3.ckpt", weights_only=True)
    assert stored["state_dict"]["network.net.blocks.0.mlp.0.weight"].dtype == torch.bfloat16  # group 0 is stored
    assert stored["state_dict"]["network.net.blocks.1.mlp.0.weight"].dtype == torch.float32  # group 1 is active
    loaded = ldb.DiffusionBlocksModule.load_from_checkpoint(tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert loaded.sample(labels=[1], steps=2).isfinite().all()
    for name in ("ckpt/epoch=0-step=3.ckpt", "ckpt/epoch=0-step=4.ckpt", "epoch/epoch=0-step=5.ckpt"):
        callbacks = [BlockOffload(directory=tmp_path / "off")]
        resumed_trainer, resumed = run(tmp_path / name, BF16_BF16, steps=8, callbacks=callbacks, ckpt=tmp_path / name,
                                       n=80)  # fmt: skip
        assert_identical(reference, state_of(resumed_trainer, resumed))


def test_resume_under_another_state_precision_is_refused_unless_allowed(tmp_path: Path) -> None:
    trainer, _ = run(tmp_path / "a", {"weights": "bf16"}, steps=2)
    trainer.save_checkpoint(tmp_path / "a.ckpt")

    def resume(option: dict | None, allow: tuple[str, ...] = ()) -> ldb.DiffusionBlocksModule:
        module = make_module(state_precision=option, ema_decay=0.9, weight_decay=0.05, gradient_clip_val=1.0)
        strategy = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=2, allow_changed=allow)
        resumed = L.Trainer(strategy=strategy, max_steps=4, **trainer_kwargs(tmp_path / "b"))
        loader = make_loader(image_loader().dataset, batch_size=16, shuffle=True)
        resumed.fit(module, loader, ckpt_path=tmp_path / "a.ckpt")
        return module

    with pytest.raises(MisconfigurationException, match=r"state_precision=.*allow_changed=\('state_precision',\)"):
        resume(None)
    with pytest.raises(MisconfigurationException, match="8-bit and full-width Adam state differ"):
        resume({"weights": "bf16", "moments": "8bit"}, allow=("state_precision",))
    with pytest.warns(UserWarning, match="changed settings"):
        module = resume({"weights": "bf16", "moments": "bf16"}, allow=("state_precision",))
    assert int(module.step_count) == 4


def test_memory_figures_count_the_stored_bytes_the_option_predicts(tmp_path: Path) -> None:
    """Per inactive group, the bytes of its weights and moments are StatePrecision's weight_bytes / moment_bytes
    summed over its tensors, and the memory monitor's parameter figure is the sum over groups."""
    for option in (BF16_BF16, {**BF16_8BIT, "min_8bit_size": 1024}):
        precision = StatePrecision.of(option)
        monitor = BlockMemoryMonitor(log=False)
        trainer, module = run(tmp_path / option["moments"], option, steps=5, callbacks=[monitor])
        opt = trainer.optimizers[0]
        module.state_store.activate(2)  # as during the last step (fit's end gave the model fp32 weights back)
        expected_params = 0
        for g in range(3):
            params = module.network.group_parameters(g)
            weights = sum(p.numel() * p.element_size() for p in params)
            assert weights == sum(precision.weight_bytes(p.numel(), active=g == 2) for p in params)
            expected_params += 2 * weights  # the EMA copy is stored alike
            if g < 2:  # groups 0 and 1 have trained: their moments, without torch's 0-dim step counter
                found = sum(v.numel() * v.element_size() for p in params for v in opt.state[p].values()
                            if isinstance(v, torch.Tensor) and v.dim() > 0)  # fmt: skip
                assert found == sum(precision.moment_bytes(p.numel(), active=False) for p in params)
                if option["moments"] == "8bit":  # the size rule: small tensors kept fp32 moments
                    small = [p for p in params if p.numel() < 1024]
                    assert small
                    assert all(opt.state[p]["state1"].dtype == torch.float32 for p in small)
        assert monitor.last["2"].params == expected_params
        # what the optimizer holds, counted here: torch's AdamW adds a 0-dim fp32 step counter per tensor; the 8-bit
        # one keeps an int, and one pair of 256-entry fp32 quantization maps that every tensor's state shares
        held = 0
        for p, state in opt.state.items():
            if "exp_avg" in state:
                held += 2 * p.numel() * state["exp_avg"].element_size() + 4
            elif state["state1"].dtype == torch.uint8:
                held += 2 * p.numel() + 2 * 4 * math.ceil(p.numel() / 256)
            else:
                held += 2 * 4 * p.numel()
        if option["moments"] == "8bit":
            held += 2 * 4 * 256
        assert optimizer_bytes(opt) == held == monitor.last["2"].optimizer


def test_option_errors_name_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot be combined with optimizer=.*AdamW8bit\(groups"):
        make_module(state_precision={"moments": "8bit"}, optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        adamw_8bit([{"params": [torch.nn.Parameter(torch.zeros(2))]}], 1e-3, (0.9, 0.999), 0.0, 0)
    monkeypatch.undo()
    module = make_module(state_precision={"weights": "bf16"}).double()
    trainer = L.Trainer(strategy=sequential(), max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"parameters are \['torch.float64'\].*Keep the parameters in fp32"):
        trainer.fit(module, image_loader())


def test_the_memory_monitor_counts_the_same_activations_with_bf16_weights(tmp_path: Path) -> None:
    """The active group's fp32 masters are made by the training step, after the monitor starts its step: they are
    parameters, not activations, so the activation term is the fp32 run's (it once counted the weights again)."""
    terms = []
    for option in ({}, {"weights": "bf16"}):
        monitor = BlockMemoryMonitor(log=False)
        run(tmp_path / str(len(terms)), option, steps=6, callbacks=[monitor])
        terms.append({g: m.activations for g, m in monitor.groups.items()})
    assert terms[0] == terms[1]
    assert all(v > 0 for v in terms[0].values())
