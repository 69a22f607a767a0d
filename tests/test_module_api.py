"""The module's seams with user code: optimizer factories, repeated fits, reloads, predict/test, conventions
discovered from the network, and the errors that name the fix."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.checkpoints import CheckpointLoadError
from lightning_diffusionblocks.schedules import RandomSchedule
from lightning_diffusionblocks.tasks.image_generation import CallConvention, discover_null_label
from tests.conftest import fit, image_loader, make_module, tiny_dit, trainer_kwargs


# ---------------------------------------------------------------------------- optimizer groups by name
def decay_split(groups: list[dict]) -> torch.optim.Optimizer:
    """The usual AdamW recipe: each group split into weights (decay) and biases/norms (no decay)."""
    split = []
    for g in groups:
        decay = [p for p in g["params"] if p.ndim >= 2]
        rest = [p for p in g["params"] if p.ndim < 2]
        split += [{"params": decay, "weight_decay": 0.1, "name": g["name"] + "/decay"},
                  {"params": rest, "weight_decay": 0.0, "name": g["name"] + "/no_decay"}]  # fmt: skip
    return torch.optim.AdamW(split, lr=1e-2)


def test_factory_that_splits_groups_gets_per_group_lr_and_leaves_others_alone(tmp_path):
    module = make_module(optimizer=decay_split, warmup_steps=4)
    before = [[p.detach().clone() for p in module.network.group_parameters(g)] for g in range(3)]
    trainer = fit(module, tmp_path, steps=2, strategy=ldb.DiffusionBlocksStrategy(groups_to_train=[2]))
    opt = trainer.optimizers[0]
    owners = module.param_group_owners(opt)
    assert owners == [0, 0, 1, 1, 2, 2]
    for pg, owner in zip(opt.param_groups, owners):  # each holds its next step's rate: group 2 took two warmup steps
        assert pg["lr"] == pytest.approx(1e-2 * (3 / 4 if owner == 2 else 1 / 4))
    for g in range(3):
        same = all(torch.equal(a, b) for a, b in zip(before[g], module.network.group_parameters(g)))
        assert same == (g != 2)


def test_factory_that_mixes_groups_or_drops_parameters_is_refused(tmp_path):
    mixed = make_module(optimizer=lambda groups: torch.optim.AdamW([p for g in groups for p in g["params"]]))
    with pytest.raises(MisconfigurationException, match=r"mixes parameters of group_0, group_1, group_2"):
        fit(mixed, tmp_path, steps=1)
    partial = make_module(optimizer=lambda groups: torch.optim.AdamW(groups[:2]))
    with pytest.raises(MisconfigurationException, match="does not hold .* trainable parameters"):
        fit(partial, tmp_path, steps=1)


# ---------------------------------------------------------------------------- repeated fits
def test_second_fit_continues_the_schedule_instead_of_replaying_it(tmp_path):
    module = make_module()
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):  # noqa: ANN001, ANN002
            seen.append(pl_module.last_group)

    fit(module, tmp_path, steps=4, callbacks=[Spy()])
    fit(module, tmp_path, steps=4, callbacks=[Spy()])
    schedule = RandomSchedule(3, seed=0)
    assert seen == [schedule.group_at(s) for s in range(8)]
    assert int(module.step_count) == 8
    assert int(module.group_steps.sum()) == 8


def test_changing_the_kind_of_training_is_refused(tmp_path):
    blockwise = make_module()
    fit(blockwise, tmp_path, steps=2)
    with pytest.raises(MisconfigurationException, match="trained block-wise for 2 steps"):
        fit(blockwise, tmp_path, steps=2, strategy="auto")
    end_to_end = make_module()
    fit(end_to_end, tmp_path, steps=2, strategy="auto")
    with pytest.raises(MisconfigurationException, match="trained end to end"):
        fit(end_to_end, tmp_path, steps=2)


# ---------------------------------------------------------------------------- reloads
class UserNet(nn.Module):
    """A user's own network that records nothing about how it was built."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(64, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        self.head = nn.Linear(width, 64)

    def forward(self, x, c_noise, labels=None):  # noqa: ANN001, ANN201
        h = self.embed(x.flatten(1)) + c_noise[:, None]
        for block in self.blocks:
            h = h + block(h)
        return self.head(h).view_as(x)


class RecordedNet(UserNet):
    def __init__(self, width: int = 16) -> None:
        super().__init__(width)
        self.init_args = {"width": width}


class UserGeneration(ldb.tasks.ImageGeneration):
    """A user's own task: it records its arguments (every Task does) but comes from a package not trusted."""


def test_reload_rebuilds_trusted_networks_and_says_what_to_pass_otherwise(tmp_path):
    """One error names everything the call needs (0.2.0 said `trusted=` first, then `net=` once trusted)."""
    for net, task in ((UserNet(), UserGeneration()), (RecordedNet(8), ldb.tasks.ImageGeneration())):
        module = ldb.DiffusionBlocksModule(net, task, num_blocks=3)
        trainer = fit(module, tmp_path, steps=2)
        trainer.save_checkpoint(tmp_path / "m.ckpt")
        if isinstance(net, RecordedNet):
            with pytest.raises(CheckpointLoadError, match=r"RecordedNet`, whose package is not trusted") as info:
                ldb.DiffusionBlocksModule.load_from_checkpoint(tmp_path / "m.ckpt")
            assert r"load_from_checkpoint(path, trusted=['tests'])" in str(info.value)
            restored = ldb.DiffusionBlocksModule.load_from_checkpoint(tmp_path / "m.ckpt", trusted=["tests"])
            assert isinstance(restored.network.net, RecordedNet)
            assert restored.network.net.embed.out_features == 8
        else:
            for trusted in ((), ["tests"]):  # trusting the package does not make the error any longer
                with pytest.raises(CheckpointLoadError, match=r"UserNet` but not its constructor arguments") as info:
                    ldb.DiffusionBlocksModule.load_from_checkpoint(tmp_path / "m.ckpt", trusted=trusted)
                assert r"load_from_checkpoint(path, net=UserNet(...), trusted=['tests'])" in str(info.value)
            restored = ldb.DiffusionBlocksModule.load_from_checkpoint(
                tmp_path / "m.ckpt", net=UserNet(), trusted=["tests"]
            )
            assert isinstance(restored.task, UserGeneration)
        assert restored.task.sample_shape == [1, 8, 8]  # learned from the training batches, kept in the file
        assert torch.equal(module.sample(labels=[1], steps=3), restored.sample(labels=[1], steps=3))


class Payload:
    """Unpickling this runs code (it writes a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (self.marker, "ran"))


def test_crafted_checkpoint_is_refused_and_nothing_runs(tmp_path):
    module = make_module()
    trainer = fit(module, tmp_path, steps=1)
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    ckpt = torch.load(tmp_path / "good.ckpt", weights_only=True)
    marker = tmp_path / "marker.txt"
    ckpt["diffusionblocks"]["payload"] = Payload(marker)
    torch.save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointLoadError, match="refused and nothing in it ran"):
        ldb.DiffusionBlocksModule.load_from_checkpoint(tmp_path / "evil.ckpt")
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=2, **trainer_kwargs(tmp_path))
    with pytest.raises(RuntimeError, match="refused and nothing in it ran"):
        trainer.fit(make_module(), image_loader(), ckpt_path=tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_merge_refuses_a_crafted_checkpoint_and_nothing_runs(tmp_path):
    from lightning_diffusionblocks.merge import MergeError, merge_checkpoints

    marker = tmp_path / "marker.txt"
    paths = []
    for group in range(3):
        module = make_module()
        trainer = fit(module, tmp_path, steps=1, strategy=ldb.DiffusionBlocksStrategy(groups_to_train=[group]))
        trainer.save_checkpoint(tmp_path / f"job{group}.ckpt")
        paths.append(tmp_path / f"job{group}.ckpt")
    merged = merge_checkpoints(paths, tmp_path / "merged.ckpt")  # real checkpoints merge under weights_only
    assert merged["state_dict"]["group_steps"].tolist() == [1, 1, 1]
    ckpt = torch.load(paths[1], weights_only=True)
    ckpt["state_dict"]["payload"] = Payload(marker)
    torch.save(ckpt, paths[1])
    with pytest.raises(MergeError, match="refused and nothing in it ran"):
        merge_checkpoints(paths, tmp_path / "merged2.ckpt")
    assert not marker.exists()
    assert not (tmp_path / "merged2.ckpt").exists()


def test_a_class_path_record_that_is_not_a_network_is_not_called(tmp_path):
    module = make_module()
    trainer = fit(module, tmp_path, steps=1)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    ckpt["diffusionblocks"]["net"] = {"class_path": "os.system", "init_args": {"command": "echo hacked"}}
    torch.save(ckpt, tmp_path / "m2.ckpt")
    with pytest.raises(CheckpointLoadError, match="`os.system`, whose package is not trusted"):
        ldb.DiffusionBlocksModule.load_from_checkpoint(tmp_path / "m2.ckpt")
    ckpt["diffusionblocks"]["net"] = {"class_path": "lightning_diffusionblocks.merge.main", "init_args": {}}
    torch.save(ckpt, tmp_path / "m3.ckpt")
    with pytest.raises(CheckpointLoadError, match="not a Module; refusing to call it"):
        ldb.DiffusionBlocksModule.load_from_checkpoint(tmp_path / "m3.ckpt")


def test_ema_mismatch_on_reload_names_the_option(tmp_path):
    module = make_module(ema_decay=0.9)
    trainer = fit(module, tmp_path, steps=1)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    with pytest.raises(CheckpointLoadError, match="with an EMA copy .* ema_decay=<the decay used in training>"):
        ldb.DiffusionBlocksModule.load_from_checkpoint(tmp_path / "m.ckpt", ema_decay=None)


def test_a_checkpoint_with_a_missing_group_is_refused(tmp_path):
    module = make_module()
    trainer = fit(module, tmp_path, steps=1)
    for p in module.network.group_parameters(1):
        p.data = torch.empty(0)
    with pytest.raises(RuntimeError, match=r"group\(s\) \[1\] are not in memory"):
        trainer.save_checkpoint(tmp_path / "m.ckpt")
    assert not (tmp_path / "m.ckpt").exists()


def test_lost_offload_files_never_give_an_empty_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    from lightning_diffusionblocks.callbacks.offload import OffloadError

    module = make_module()
    untouched = [p.detach().clone() for p in module.network.group_parameters(2)]

    class LoseGroupZero(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, ANN201
            if trainer.global_step == 3:  # group 0 finished its phase and lives on disk
                next((tmp_path / "offload").glob("*/group_0.pt")).unlink()  # in the run's own folder

    callbacks = [ldb.callbacks.BlockOffload(directory=tmp_path / "offload"), LoseGroupZero(),
                 OnExceptionCheckpoint(tmp_path)]  # fmt: skip
    strategy = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=2)
    with pytest.raises((OffloadError, RuntimeError), match=r"group\(s\) \[0\]"):
        fit(module, tmp_path, steps=4, strategy=strategy, callbacks=callbacks, enable_checkpointing=True)
    assert not (tmp_path / "on_exception.ckpt").exists()
    assert all(torch.equal(a, b) for a, b in zip(untouched, module.network.group_parameters(2)))  # read back
    assert all(p.numel() == 0 for p in module.network.group_parameters(0))  # lost, and known to be


def test_stale_offload_folders_of_dead_runs_are_removed(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from lightning_diffusionblocks.callbacks.offload import remove_stale_directories

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folders = {}
    for name, owner in (("dead", f"{dead.stdout.strip()} {socket.gethostname()}"),
                        ("alive", f"{os.getpid()} {socket.gethostname()}"),
                        ("elsewhere", f"{dead.stdout.strip()} another-host"), ("unowned", None)):  # fmt: skip
        folders[name] = tmp_path / f"ldb-offload-{name}"
        folders[name].mkdir()
        (folders[name] / "group_0.pt").write_bytes(b"x")
        if owner:
            (folders[name] / "owner").write_text(owner)
    assert remove_stale_directories(tmp_path) == [folders["dead"]]
    assert {p.name for p in tmp_path.iterdir()} == {"ldb-offload-alive", "ldb-offload-elsewhere", "ldb-offload-unowned"}


def test_a_replaced_offload_file_is_refused_and_nothing_runs(tmp_path):
    from lightning_diffusionblocks.callbacks.offload import OffloadError

    marker = tmp_path / "marker.txt"

    class Replace(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, ANN201
            if trainer.global_step == 2:  # group 0 sits on disk while group 1 trains; its file is swapped
                torch.save([Payload(marker)], next((tmp_path / "offload").glob("*/group_0.pt")))

    strategy = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=2)
    callbacks = [ldb.callbacks.BlockOffload(directory=tmp_path / "offload"), Replace()]
    with pytest.raises((OffloadError, RuntimeError), match=r"group\(s\) \[0\]"):
        fit(make_module(), tmp_path, steps=4, strategy=strategy, callbacks=callbacks)
    assert not marker.exists()


# ---------------------------------------------------------------------------- predict and test
def test_predict_and_test_steps(tmp_path):
    module = make_module()
    trainer = fit(module, tmp_path, steps=2)
    labels = DataLoader(TensorDataset(torch.tensor([1, 2, 3])), batch_size=2)
    images = trainer.predict(module, labels)
    assert [tuple(x.shape) for x in images] == [(2, 1, 8, 8), (1, 1, 8, 8)]
    with pytest.raises(ValueError, match="images in a predict batch would be ignored"):
        trainer.predict(module, image_loader())
    result = L.Trainer(**trainer_kwargs(tmp_path)).test(module, image_loader(), verbose=False)
    assert set(result[0]) == {"test/loss", "test/loss_group_0", "test/loss_group_1", "test/loss_group_2"}


def test_classification_predict_takes_inputs_with_or_without_labels(tmp_path):
    import timm

    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16,
                                 patch_size=4, in_chans=1, depth=3, embed_dim=32, num_heads=2)  # fmt: skip
    net = ldb.models.ConditioningAdapter(backbone, num_classes=4, learn_embedding=False)
    module = ldb.DiffusionBlocksModule(net, ldb.tasks.Classification(4), num_blocks=3)
    x, y = torch.randn(5, 1, 16, 16), torch.randint(0, 4, (5,))
    trainer = L.Trainer(**trainer_kwargs(tmp_path))
    with_labels = trainer.predict(module, DataLoader(TensorDataset(x, y), batch_size=5))[0]
    without = trainer.predict(module, DataLoader(TensorDataset(x), batch_size=5))[0]
    assert torch.equal(with_labels, without)
    assert with_labels.shape == (5, 4)
    with pytest.raises(ValueError, match="not labels"):
        trainer.predict(module, DataLoader(TensorDataset(y), batch_size=5))
    with pytest.raises(TypeError, match=r"sample\(\) is not offered by the Classification task"):
        module.sample(labels=[1])


# ---------------------------------------------------------------------------- conventions of the user's network
def test_null_label_is_discovered_or_given():
    assert discover_null_label(tiny_dit()) == 10  # num_classes: the extra row
    from examples.existing_project import Denoiser

    assert discover_null_label(Denoiser(num_classes=7)) == 7  # the last row of its `label` embedding
    assert discover_null_label(nn.Linear(2, 2)) is None
    task = ldb.tasks.ImageGeneration(null_label=99)
    task.bind(tiny_dit())
    assert task.null_label == 99


def test_label_dropout_feeds_the_null_label():
    task = ldb.tasks.ImageGeneration(label_dropout=0.5)
    task.bind(tiny_dit())
    seen = []

    def run(x, c_noise, labels):  # noqa: ANN001, ANN202
        seen.append(labels)
        return torch.zeros_like(x)

    labels = torch.arange(10).repeat(4)
    task.loss(run, (torch.zeros(40, 1, 8, 8), labels), torch.ones(40), torch.Generator().manual_seed(0))
    dropped = seen[0] != labels
    assert dropped.any()
    assert (seen[0][dropped] == 10).all()


def test_forward_signatures():
    class KeywordOnly(nn.Module):
        def forward(self, x, *, sigma_code, y=None):  # noqa: ANN001, ANN202
            return x

    class Unconditional(nn.Module):
        def forward(self, x, t):  # noqa: ANN001, ANN202
            return x

    class Strange(nn.Module):
        def forward(self, x, t, y, mask):  # noqa: ANN001, ANN202
            return x

    assert CallConvention.of(KeywordOnly()) == CallConvention("sigma_code", "y", True)
    assert CallConvention.of(Unconditional()).takes_labels is False
    with pytest.raises(ValueError, match=r"requires further arguments \['mask'\].*forward\(x, c_noise, labels=None\)"):
        CallConvention.of(Strange())
    calls = []
    CallConvention.of(KeywordOnly()).call(lambda *a, **k: calls.append((a, k)), "x", "c", "l")
    assert calls == [(("x",), {"sigma_code": "c", "y": "l"})]


def test_sample_shape_clip_and_data_range(tmp_path):
    class NoShape(UserNet):
        pass

    module = ldb.DiffusionBlocksModule(NoShape(), ldb.tasks.ImageGeneration(), num_blocks=3)
    with pytest.raises(ValueError, match=r"Pass shape=\(C, H, W\)"):
        module.sample(labels=[1], steps=2)
    fit(module, tmp_path, steps=1)
    raw = module.sample(labels=[1, 2], steps=2)
    assert raw.shape == (2, 1, 8, 8)
    lo, hi = module.task.data_range
    clipped = module.sample(labels=[1, 2], steps=2, clip=True)
    assert clipped.min() >= lo
    assert clipped.max() <= hi
    assert module.sample(labels=[1, 2], steps=2, clip=(-0.1, 0.1)).abs().max() <= 0.1


# ---------------------------------------------------------------------------- errors that name the fix
def test_bad_options_are_refused():
    with pytest.raises(ValueError, match=r"gamma=5 is outside \[0, 0.5\)"):
        make_module(gamma=5)
    with pytest.raises(TypeError, match="num_blocks must be an integer"):
        ldb.DiffusionBlocksModule(tiny_dit(), ldb.tasks.ImageGeneration(), num_blocks=2.5)
    with pytest.raises(ValueError, match="Classification needs a network .* ConditioningAdapter"):
        ldb.DiffusionBlocksModule(tiny_dit(), ldb.tasks.Classification(10), num_blocks=3)
    import timm

    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16,
                                 patch_size=4, in_chans=1, depth=3, embed_dim=32, num_heads=2)  # fmt: skip
    adapter = ldb.models.ConditioningAdapter(backbone, num_classes=3, learn_embedding=False)
    with pytest.raises(ValueError, match=r"embeds 3 classes but Classification\(num_classes=10\)"):
        ldb.DiffusionBlocksModule(adapter, ldb.tasks.Classification(10), num_blocks=3)


SWITCHES = [
    ({"gradient_clip_val": 1.0}, r"DiffusionBlocksModule\(..., gradient_clip_val"),
    ({"accumulate_grad_batches": 2}, r"DiffusionBlocksModule\(..., accumulate_grad_batches=2\)"),
]


@pytest.mark.parametrize(("switch", "fix"), SWITCHES)
def test_trainer_switches_name_the_module_option(tmp_path, switch, fix):
    with pytest.raises(MisconfigurationException, match=fix):
        fit(make_module(), tmp_path, steps=1, **switch)


def test_non_plain_hyperparameters_are_saved_as_strings(tmp_path):
    class WithPath(ldb.DiffusionBlocksModule):
        def __init__(self, *args, data_dir: Path = Path("/data/mnist"), **kwargs) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, **kwargs)
            self.save_hyperparameters({"data_dir": data_dir})

    module = WithPath(tiny_dit(depth=3), ldb.tasks.ImageGeneration(), num_blocks=3)
    trainer = fit(module, tmp_path, steps=1)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)  # loads with the restricted unpickler
    assert ckpt["hyper_parameters"]["data_dir"] == "/data/mnist"
