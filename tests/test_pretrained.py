"""Starting a module from pretrained weights (ldb.pretrained): every source format, refusals, the starting function,
and drift from the reference after a block-wise fine-tune."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.checkpoints import CheckpointLoadError
from lightning_diffusionblocks.pretrained import PretrainedLoadError, load_pretrained
from tests.conftest import fit, make_module
from tests.test_safety import Payload


def _inputs(n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, generator=g), torch.randint(0, 10, (n,), generator=g)


def _plain_dit(state: dict[str, torch.Tensor], layers: list[int] | None = None, depth: int = 3) -> nn.Module:
    """A fresh DiT holding ``state``, optionally cut down to ``layers`` of its stack: the expected function, built
    without the package's partition code."""
    dit = ldb.presets.tiny_dit(depth=depth)
    dit.load_state_dict(state)
    if layers is not None:
        dit.blocks = nn.ModuleList([dit.blocks[i] for i in layers])
    return dit.eval()


@pytest.fixture(scope="module")
def pretrained_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A package checkpoint of a tiny DiT trained end to end (2 steps, with EMA), and its EMA network's weights (what
    a start takes by default); the trained weights are checked in the next test."""
    root = tmp_path_factory.mktemp("pretrain")
    module = make_module(depth=3, ema_decay=0.5)
    trainer = fit(module, root, steps=2, strategy="auto")
    path = root / "e2e.ckpt"
    trainer.save_checkpoint(path)
    assert module.ema_network is not None
    state = {k: v.detach().clone() for k, v in module.ema_network.net.state_dict().items()}
    raw = module.network.net.state_dict()
    assert any(not torch.equal(v, raw[k]) for k, v in state.items())
    return path, state


def test_package_checkpoint_starts_every_group_from_the_pretrained_network(pretrained_ckpt, tmp_path: Path) -> None:
    path, state = pretrained_ckpt
    module = make_module(depth=3, ema_decay=0.9)  # the pretrained network's initial weights, before its 2 steps
    assert any(not torch.equal(v, state[k]) for k, v in module.network.net.state_dict().items())
    reference = load_pretrained(module, path)
    record = module.pretrained
    assert record is not None
    assert (record["kind"], record["source"], record["weights"]) == ("package_checkpoint", str(path), "ema")
    assert (record["loaded"], record["missing"], record["unexpected"]) == (len(state), [], [])
    x, level, labels = _inputs()
    module.eval()
    assert module.ema_network is not None
    with torch.no_grad():
        # the whole stack run end to end is exactly the pretrained network
        expected = _plain_dit(state)(x, level, labels)
        torch.testing.assert_close(module.network(x, level, labels), expected, rtol=0, atol=0)
        for net in (module.network, module.ema_network):  # so are the EMA copy's groups
            for g, layers in enumerate(net.groups):  # group g = the pretrained stem/head around its own layers
                expected = _plain_dit(state, layers)(x, level, labels)
                torch.testing.assert_close(net(x, level, labels, group=g), expected, rtol=0, atol=0)
    assert reference.drift(module) == {"group_0": 0.0, "group_1": 0.0, "group_2": 0.0}
    # where the weights came from is plain data in the module's checkpoints and comes back with them
    trainer = fit(module.train(), tmp_path, steps=1)
    trainer.save_checkpoint(tmp_path / "ft.ckpt")
    loaded = ldb.DiffusionBlocksModule.load_from_checkpoint(tmp_path / "ft.ckpt")
    assert loaded.pretrained == record


def test_safetensors_lightning_checkpoint_and_module_sources(pretrained_ckpt, tmp_path: Path) -> None:
    path, state = pretrained_ckpt
    raw = make_module(depth=3)
    load_pretrained(raw, path, weights="raw")  # the trained weights, not the EMA copy
    trained = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(v, trained[f"network.net.{k}"]) for k, v in raw.network.net.state_dict().items())
    x, level, labels = _inputs()
    expected = _plain_dit(state)(x, level, labels)
    file = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    lightning = tmp_path / "lightning.ckpt"  # a plain LightningModule holding the network as `model`
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}, lightning)
    for source, kind, prefix in ((file, "safetensors", ""), (lightning, "lightning_checkpoint", "model."),
                                 (_plain_dit(state), "module", "")):  # fmt: skip
        module = make_module(depth=3).eval()
        load_pretrained(module, source)
        assert module.pretrained is not None
        assert (module.pretrained["kind"], module.pretrained["prefix"]) == (kind, prefix)
        with torch.no_grad():
            torch.testing.assert_close(module.network(x, level, labels), expected, rtol=0, atol=0)


def test_mismatched_weights_are_refused_by_name_or_skipped_and_reported(pretrained_ckpt, tmp_path: Path) -> None:
    path, state = pretrained_ckpt
    wider = ldb.DiffusionBlocksModule(ldb.presets.tiny_dit(depth=3, dim=16), ldb.tasks.ImageGeneration())
    with pytest.raises(PretrainedLoadError, match=r"of another shape .*blocks\.0\.attn\.qkv\.weight: \(96, 32\) vs"):
        load_pretrained(wider, path)
    deeper = make_module(depth=4)
    before = {k: v.clone() for k, v in deeper.network.net.state_dict().items()}
    with pytest.raises(PretrainedLoadError, match=r"missing from the source \(\d+\): blocks\.3\..*strict=False"):
        load_pretrained(deeper, path)
    assert all(torch.equal(v, deeper.network.net.state_dict()[k]) for k, v in before.items())  # nothing loaded
    with pytest.warns(UserWarning, match="blocks.3"):
        reference = load_pretrained(deeper, path, strict=False)
    record = deeper.pretrained
    assert record is not None
    assert record["missing"]
    assert all(k.startswith("blocks.3.") for k in record["missing"])
    assert torch.equal(deeper.network.net.state_dict()["blocks.2.mlp.0.weight"], state["blocks.2.mlp.0.weight"])
    assert set(reference.drift(deeper)) == {"group_0", "group_1", "group_2"}
    shallow = make_module(depth=2, num_blocks=2)
    with pytest.raises(PretrainedLoadError, match=r"not in the network \(\d+\): blocks\.2\."):
        load_pretrained(shallow, path)
    with pytest.raises(PretrainedLoadError, match=r"Only 1 of the network's 41 .*other.weight.*not hold weights"):
        load_pretrained(make_module(depth=3), {"other.weight": torch.zeros(2)})
    marker = tmp_path / "ran"  # a crafted file: read as data only, refused, and nothing in it runs
    torch.save({"state_dict": {"blocks.0.attn.qkv.weight": Payload(marker)}}, tmp_path / "crafted.ckpt")
    with pytest.raises(CheckpointLoadError, match="the global `exec`.*nothing in it ran"):
        load_pretrained(make_module(depth=3), tmp_path / "crafted.ckpt")
    assert not marker.exists()
    # a block-wise checkpoint is B functions, not one network to start every group from
    blockwise = make_module(depth=3)
    trainer = fit(blockwise, tmp_path, steps=1)
    trainer.save_checkpoint(tmp_path / "bw.ckpt")
    with pytest.raises(PretrainedLoadError, match="trained block-wise in 3 groups.*load_from_checkpoint"):
        load_pretrained(make_module(depth=3), tmp_path / "bw.ckpt")


def test_blockwise_finetune_moves_only_the_scheduled_group(pretrained_ckpt, tmp_path: Path) -> None:
    path, state = pretrained_ckpt
    file = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    module = make_module(depth=3)
    reference = load_pretrained(module, file, keep_reference=False)  # measured by reading the file again
    drift = ldb.pretrained.PretrainedDrift(reference, every_n_steps=1)
    strategy = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=2, groups_to_train=[1])
    fit(module, tmp_path, steps=2, strategy=strategy, callbacks=[drift])
    assert module.group_steps.tolist() == [0, 2, 0]
    assert drift.last["group_1"] > 0
    assert (drift.last["group_0"], drift.last["group_2"]) == (0.0, 0.0)
    assert reference.drift(module) == drift.last
    save_file({k: (v + 1).contiguous() for k, v in state.items()}, str(file))  # the original is gone
    with pytest.raises(PretrainedLoadError, match="changed since the module was started from it"):
        reference.drift(module)


class _DiffusersDiT(nn.Module):
    """A tiny diffusers DiT held as ``model``, the way a training module holds one (its stack found by path)."""

    diffusionblocks_stack_path = "model.transformer_blocks"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(x, timestep=noise_level, class_labels=labels).sample


def test_diffusers_save_pretrained_directory(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    config = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 1, "out_channels": 1,
              "num_layers": 3, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10}  # fmt: skip
    torch.manual_seed(0)
    diffusers.DiTTransformer2DModel(**config).save_pretrained(tmp_path / "dit")
    original = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "dit").eval()  # a local directory
    x, level, labels = _inputs()
    level = level.abs() * 100
    with torch.no_grad():
        expected = original(x, timestep=level, class_labels=labels).sample
    for source in (tmp_path / "dit", original):
        torch.manual_seed(1)  # the network to start: other random weights
        module = ldb.DiffusionBlocksModule(_DiffusersDiT(diffusers.DiTTransformer2DModel(**config)),
                                           ldb.tasks.ImageGeneration(), num_blocks=3).eval()  # fmt: skip
        with torch.no_grad():
            assert not torch.allclose(module.network(x, level, labels), expected)
        load_pretrained(module, source)
        record = module.pretrained
        assert record is not None
        assert (record["prefix"], record["net_prefix"]) == ("", "model.")
        assert record["kind"] == ("diffusers_directory" if isinstance(source, Path) else "module")
        with torch.no_grad():
            torch.testing.assert_close(module.network(x, level, labels), expected, rtol=0, atol=0)
    with pytest.raises(PretrainedLoadError, match=r"Only \d+ of the network's \d+ weights .*not hold weights of DiT"):
        load_pretrained(make_module(depth=3), tmp_path / "dit")  # the package's DiT: another network
    (tmp_path / "pipe" / "transformer").mkdir(parents=True)
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(PretrainedLoadError, match="whole pipeline.*transformer"):
        load_pretrained(make_module(depth=3), tmp_path / "pipe")
