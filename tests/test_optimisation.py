"""The optimisation of a block-wise module on its own (`lightning_diffusionblocks.optimisation`): the LR factor
against the formula written out here, each param group's rate after given per-group step counts, the owner checks,
per-group clipping and the EMA's warmed-up decay. No Trainer is run."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_diffusionblocks import module as module_file
from lightning_diffusionblocks.optimisation import SHARED, lr_factor, param_group_owners, param_groups, warmup_cosine
from tests.conftest import make_module


def test_warmup_cosine_and_lr_factor_follow_the_formula():
    # warmup 4, horizon 20, floor 0.1: (s+1)/4 during warmup, then 0.1 + 0.45 (1 + cos(pi (s-4)/16)), then 0.1
    expected = {0: 0.25, 3: 1.0, 4: 1.0, 12: 0.55, 20: 0.1, 30: 0.1}
    expected[8] = 0.1 + 0.45 * (1 + math.cos(math.pi / 4))
    for step, value in expected.items():
        assert warmup_cosine(step, 4, 20.0, 0.1) == pytest.approx(value), step
    assert warmup_cosine(0, 0, 10.0, 0.0) == pytest.approx(1.0)  # no warmup: the decay starts at the first step
    assert warmup_cosine(5, 0, 10.0, 0.0) == pytest.approx(0.5)
    # constant: only the warmup ramps; cosine: the same function
    assert [lr_factor(s, 20.0, "constant", 4, 0.1) for s in (0, 3, 4, 12, 30)] == pytest.approx([0.25, 1, 1, 1, 1])
    assert lr_factor(12, 20.0, "cosine", 4, 0.1) == pytest.approx(0.55)
    assert lr_factor(7, 20.0, "constant", 0, 0.1) == 1.0
    assert module_file.warmup_cosine is warmup_cosine  # the examples import it from its former home


def test_each_param_group_gets_the_rate_of_its_own_next_step():
    """Group g has taken steps[g] steps of its own; the shared stem counts every step of the module."""
    module = make_module(lr=0.1, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.2, stem="shared")
    opt = module.configure_optimizers()
    assert [pg["name"] for pg in opt.param_groups] == ["group_0", "group_1", "group_2", "shared"]
    module.group_steps.copy_(torch.tensor([0, 1, 6]))
    module.step_count.fill_(7)
    module.lr_horizons.copy_(torch.tensor([10.0, 10.0, 10.0, 30.0], dtype=torch.float64))
    module.optimisation.set_learning_rates(opt)

    def factor(step: int, horizon: float) -> float:  # written out: warmup 2, cosine to 0.2 at the horizon
        if step < 2:
            return (step + 1) / 2
        return 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * min((step - 2) / (horizon - 2), 1.0)))

    want = [0.1 * factor(0, 10), 0.1 * factor(1, 10), 0.1 * factor(6, 10), 0.1 * factor(7, 30)]
    assert [pg["lr"] for pg in opt.param_groups] == pytest.approx(want)
    assert want[:2] == pytest.approx([0.05, 0.1])
    assert want[2] == pytest.approx(0.1 * (0.2 + 0.4 * (1 + math.cos(math.pi / 2))))
    assert module.param_group_owners(opt) == [0, 1, 2, SHARED]
    assert all(pg["base_lr"] == pytest.approx(0.1) for pg in opt.param_groups)  # the schedule scales base_lr


def test_owners_are_found_by_identity_and_bad_groupings_are_refused():
    network = make_module().network
    groups = param_groups(network)
    split = [{"params": g["params"][i::2], "lr": 1e-3} for g in groups for i in (0, 1)]  # each group cut in two
    assert param_group_owners(torch.optim.SGD(split), network) == [0, 0, 1, 1, 2, 2]
    mixed = torch.optim.SGD([{"params": groups[0]["params"] + groups[1]["params"]}] + groups[2:], lr=1e-3)
    with pytest.raises(MisconfigurationException, match="mixes parameters of group_0, group_1"):
        param_group_owners(mixed, network)
    stray = torch.optim.SGD([*groups, {"params": [torch.nn.Parameter(torch.zeros(2))]}], lr=1e-3)
    with pytest.raises(MisconfigurationException, match="not a parameter of the network"):
        param_group_owners(stray, network)
    with pytest.raises(MisconfigurationException, match="does not hold .* trainable parameters"):
        param_group_owners(torch.optim.SGD(groups[:2], lr=1e-3), network)


def test_clipping_is_per_group_and_the_ema_decay_warms_up_in_each_groups_own_steps():
    module = make_module(gradient_clip_val=1.0, ema_decay=0.99)
    network, ema = module.network, module.ema_network
    assert ema is not None
    for p in network.parameters():
        p.grad = torch.full_like(p, 10.0)
    module.optimisation.clip([1])

    def norm(g: int) -> float:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in network.group_parameters(g)])))

    assert norm(1) == pytest.approx(1.0, rel=1e-4)  # the trained group clipped on its own
    assert min(norm(0), norm(2)) > 10  # the others untouched
    before = {g: [p.clone() for p in ema.group_parameters(g)] for g in range(3)}
    with torch.no_grad():
        for p in network.parameters():
            p.add_(1.0)
    module.group_steps.copy_(torch.tensor([0, 5, 0]))
    module.optimisation.update_ema([1])
    decay = min(0.99, 6 / 15)  # group 1 has taken 5 steps: (1 + 5) / (10 + 5)
    for old, new, live in zip(before[1], ema.group_parameters(1), network.group_parameters(1)):
        torch.testing.assert_close(new, old + (1 - decay) * (live - old))
    assert all(torch.equal(a, b) for g in (0, 2) for a, b in zip(before[g], ema.group_parameters(g)))


def test_the_checkpoint_record_keeps_its_layout_and_a_save_between_micro_batches_warns():
    """The ``diffusionblocks`` record's keys, and the warning of a checkpoint written inside an accumulated step
    (its gradients are not saved, so a resume starts that optimizer step afresh)."""
    module = make_module(accumulate_grad_batches=2)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    record = checkpoint["diffusionblocks"]
    assert list(record) == ["groups", "stem", "block_path", "boundaries", "training", "blockwise", "net", "task",
                            "task_state"]  # fmt: skip
    assert record["training"] == {"seed": 0, "gamma": 0.05, "partition": "equiprobable", "accumulate_grad_batches": 2}
    module.optimisation.micro = 1
    with pytest.warns(UserWarning, match=r"after 1 of 2 accumulated micro-batches"):
        module.on_save_checkpoint({})
