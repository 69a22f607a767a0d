"""Per-group LoRA (peft): one adapter per group on that group's Linears, base weights frozen; only the active group's
adapter trains and holds optimizer state; each group's adapter leaves on its own (peft format) and the merged model
equals the unmerged one; checkpoints resume; BlockOffload moves adapters and their state; the memory monitor counts
them to the byte.

Expected counts are worked out here from the Linears' shapes (Σ r·(in + out)), not from the package's helpers.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.callbacks import BlockMemoryMonitor, BlockOffload
from lightning_diffusionblocks.lora import GroupLoRA, merge_adapters, merged_network, save_adapters, save_merged
from tests.conftest import image_loader, tiny_dit, trainer_kwargs

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parents[1]
RANK, ALPHA = 4, 8
TARGET = r"attn\.(qkv|proj)"  # by the names inside a block
ADAPTED = ("attn.qkv", "attn.proj")
GROUPS = [[0, 1], [2, 3]]  # depth 4 in 2 groups
FLOAT = 4  # bytes


def pretrained_dit() -> ldb.models.DiT:
    """The tiny DiT as a trained network has it: its zero-initialised layers (adaLN-Zero gates, the head) drawn. With
    zero gates every block is the identity and no adapter would get a gradient."""
    net = tiny_dit(depth=4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.05)
    return net


def lora_module() -> ldb.DiffusionBlocksModule:
    lora = GroupLoRA(rank=RANK, alpha=ALPHA, target=TARGET)
    return ldb.DiffusionBlocksModule(pretrained_dit(), ldb.tasks.ImageGeneration(), num_blocks=2, lora=lora)


def lora_numel(layers: list[int]) -> int:
    """Σ r·(in + out) over the adapted Linears of ``layers``, from a plain DiT's shapes."""
    linears = dict(pretrained_dit().named_modules())
    return sum(
        RANK * (linears[f"blocks.{i}.{n}"].in_features + linears[f"blocks.{i}.{n}"].out_features)
        for i in layers
        for n in ADAPTED
    )


def adapter_keys(state: dict[str, Any], group: int) -> set[str]:
    return {k for k in state if f".lora_A.group_{group}." in k or f".lora_B.group_{group}." in k}


def inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, generator=gen), torch.tensor([0, 3, 7, 10])


class Spy(L.Callback):
    """At every step's end: which parameters hold optimizer state (and how big), and which are offloaded."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        state = trainer.optimizers[0].state
        self.steps.append({
            "state": {names[id(p)]: sum(v.numel() for v in s.values() if v.dim()) for p, s in state.items()},
            "empty": {n for n, p in pl_module.named_parameters() if p.numel() == 0},
        })  # fmt: skip


def run(root: Path, ckpt_path: Path | None = None) -> tuple[ldb.DiffusionBlocksModule, Spy, BlockMemoryMonitor]:
    """Two sequential phases of two steps (one epoch each), inactive groups offloaded to disk, a checkpoint per
    epoch."""
    module, spy, monitor = lora_module(), Spy(), BlockMemoryMonitor(log=False)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_top_k=-1)
    callbacks = [BlockOffload(directory=root / "offload"), monitor, spy, checkpoints]
    strategy = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=2)
    trainer = L.Trainer(strategy=strategy, max_steps=4, callbacks=callbacks,
                        **trainer_kwargs(root, enable_checkpointing=True))  # fmt: skip
    trainer.fit(module, image_loader(n=32), ckpt_path=ckpt_path)
    return module, spy, monitor


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora")
    initial = {k: v.clone() for k, v in lora_module().state_dict().items()}
    module, spy, monitor = run(root)
    return {"root": root, "initial": initial, "module": module, "spy": spy, "monitor": monitor}


def test_one_adapter_per_group_on_its_own_linears_and_only_adapters_train() -> None:
    module = lora_module()
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    for g, layers in enumerate(GROUPS):
        names = {n for n in trainable if f".group_{g}." in n}
        assert names == {
            f"network.net.blocks.{i}.{a}.lora_{ab}.group_{g}.weight" for i in layers for a in ADAPTED for ab in "AB"
        }
        assert sum(trainable[n].numel() for n in names) == lora_numel(layers) == 2 * RANK * (32 + 96 + 32 + 32)
    assert sum(p.numel() for p in trainable.values()) == lora_numel([0, 1, 2, 3])  # base, stems, head: frozen
    # every layer runs its own group's adapter (peft leaves the last injected one active everywhere)
    for name, m in module.network.net.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            group = next(g for g, layers in enumerate(GROUPS) if int(name.split(".")[1]) in layers)
            assert m.active_adapters == [f"group_{group}"], name
    assert module.hparams["lora"] == {"rank": RANK, "alpha": ALPHA, "target": TARGET, "dropout": 0.0,
                                      "train_stem": False}  # fmt: skip


def test_train_stem_makes_each_groups_stem_and_head_trainable_too() -> None:
    lora = GroupLoRA(rank=RANK, target=TARGET, train_stem=True)
    module = ldb.DiffusionBlocksModule(pretrained_dit(), ldb.tasks.ImageGeneration(), num_blocks=2, lora=lora)
    stem = sum(p.numel() for n, p in pretrained_dit().named_parameters() if not n.startswith("blocks."))
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    # the adapters, the network's own stem/head (group 0's) and group 1's copy of it; no base weight of a block
    assert sum(dict(module.named_parameters())[n].numel() for n in trainable) == lora_numel([0, 1, 2, 3]) + 2 * stem
    assert not [n for n in trainable if ".blocks." in n and "lora_" not in n]


def test_only_the_active_groups_adapter_changes_and_holds_optimizer_state(trained: dict[str, Any]) -> None:
    root, initial, module, spy = trained["root"], trained["initial"], trained["module"], trained["spy"]
    after_phase_0 = torch.load(root / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)["state_dict"]
    final = module.state_dict()
    for before, after, g in ((initial, after_phase_0, 0), (after_phase_0, final, 1)):
        weights = [k for k in before if k.startswith("network.")]  # the step counters move, of course
        changed = {k for k in weights if not torch.equal(before[k], after[k])}
        # the group's adapter trained (every tensor: B at once, A once B is non-zero); nothing else moved a bit
        assert changed == adapter_keys(before, g), g
    names = [n for n, _ in module.named_parameters()]
    group_adapter = {g: {n for n in names if f".group_{g}." in n} for g in (0, 1)}
    sizes = {n: p.numel() for n, p in module.named_parameters()}
    # Adam state only for the active group's adapter: both moments, full size, nothing for base weights or stems
    assert set(spy.steps[1]["state"]) == group_adapter[0]
    assert all(spy.steps[1]["state"][n] == 2 * sizes[n] for n in group_adapter[0])
    # in phase 1, group 0's adapter, its weights and its Adam moments are offloaded (empty here, on disk)
    phase_1 = spy.steps[3]
    assert set(phase_1["state"]) == group_adapter[0] | group_adapter[1]
    assert all(phase_1["state"][n] == 0 for n in group_adapter[0])
    assert all(phase_1["state"][n] == 2 * sizes[n] for n in group_adapter[1])
    assert group_adapter[0] <= phase_1["empty"]
    assert not group_adapter[1] & phase_1["empty"]
    # and came back exactly: group 0's adapter after fit is what the step-2 checkpoint holds
    for k in adapter_keys(final, 0):
        assert torch.equal(final[k], after_phase_0[k]), k


def test_memory_monitor_counts_adapters_and_their_adam_state_to_the_byte(trained: dict[str, Any]) -> None:
    monitor = trained["monitor"]
    plain = pretrained_dit()
    stem = sum(p.numel() for n, p in plain.named_parameters() if not n.startswith("blocks."))
    steps_scalar = FLOAT  # Adam's step counter: a 0-d float32 tensor per parameter, kept on the host when offloaded
    tensors = 2 * len(ADAPTED) * len(GROUPS[0])  # lora_A and lora_B of each adapted Linear of a group
    for g, layers in enumerate(GROUPS):
        blocks = sum(p.numel() for i in layers for p in plain.blocks[i].parameters())
        lora = lora_numel(layers)
        m = monitor.groups[str(g)]
        # resident: this group's blocks (frozen base + adapter) and its own stem/head; the other group is on disk
        assert m.params == FLOAT * (blocks + lora + stem)
        assert m.grads == FLOAT * lora  # gradients only for the adapter
        # both Adam moments of this group's adapter, plus the step counters of every group that has stepped
        assert m.optimizer == 2 * FLOAT * lora + steps_scalar * tensors * (g + 1)


def test_each_groups_adapter_exports_alone_and_loads_back_with_peft(trained: dict[str, Any], tmp_path: Path) -> None:
    module = trained["module"]
    folders = save_adapters(module.network, tmp_path / "adapters")
    assert [f.name for f in folders] == ["group_0", "group_1"]
    for g, folder in enumerate(folders):
        assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
        stored = safetensors_torch.load_file(folder / "adapter_model.safetensors")
        assert set(stored) == {
            f"base_model.model.blocks.{i}.{a}.lora_{ab}.weight" for i in GROUPS[g] for a in ADAPTED for ab in "AB"
        }
        assert sum(t.numel() for t in stored.values()) == lora_numel(GROUPS[g])
    # a fresh copy of the base network takes both groups' files with peft's own calls
    restored = peft.PeftModel.from_pretrained(pretrained_dit(), folders[0], adapter_name="group_0")
    restored.load_adapter(folders[1], adapter_name="group_1")
    restored.base_model.set_adapter(["group_0", "group_1"])
    network = ldb.BlockwiseNetwork(restored.base_model.model, 2).eval()
    base = ldb.BlockwiseNetwork(pretrained_dit(), 2).eval()
    trained_network = module.network.eval()
    with torch.no_grad():
        for g in (0, 1, None):
            expected = trained_network(*inputs(), group=g)
            assert torch.equal(network(*inputs(), group=g), expected), g
            assert not torch.allclose(base(*inputs(), group=g), expected), g  # the adapters do change the output


def test_merged_model_equals_unmerged_and_has_the_networks_own_keys(trained: dict[str, Any], tmp_path: Path) -> None:
    network = trained["module"].network.eval()
    merged = merged_network(network).eval()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    fresh = ldb.BlockwiseNetwork(pretrained_dit(), 2)
    assert set(merged.state_dict()) == set(fresh.state_dict())
    path = save_merged(network, tmp_path / "merged.safetensors")
    fresh.load_state_dict(safetensors_torch.load_file(path))
    fresh.eval()
    with torch.no_grad():
        for g in (0, 1, None):
            unmerged = network(*inputs(), group=g)
            torch.testing.assert_close(merged(*inputs(), group=g), unmerged, rtol=1e-5, atol=1e-6)
            assert torch.equal(fresh(*inputs(), group=g), merged(*inputs(), group=g))
    assert any(isinstance(m, peft.tuners.lora.LoraLayer) for m in network.modules())  # the original is untouched


def test_merge_adapters_makes_the_module_a_plain_one(trained: dict[str, Any]) -> None:
    module = ldb.DiffusionBlocksModule.load_from_checkpoint(trained["root"] / "ckpt" / "epoch=1-step=4.ckpt")
    with torch.no_grad():
        unmerged = [module.network.eval()(*inputs(), group=g) for g in (0, 1)]
    merge_adapters(module)
    assert module.lora is None
    assert "lora" not in module.hparams
    plain = ldb.DiffusionBlocksModule(pretrained_dit(), ldb.tasks.ImageGeneration(), num_blocks=2)
    plain.load_state_dict(module.state_dict())  # strict: exactly a plain module's keys
    assert all(p.requires_grad for p in module.parameters())
    with torch.no_grad():
        for g in (0, 1):
            torch.testing.assert_close(plain.network.eval()(*inputs(), group=g), unmerged[g], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no LoRA adapters to merge"):
        merge_adapters(module)


def test_checkpoint_rebuilds_adapters_and_resume_is_exact(trained: dict[str, Any], tmp_path: Path) -> None:
    root, final = trained["root"], trained["module"].state_dict()
    last = root / "ckpt" / "epoch=1-step=4.ckpt"
    loaded = ldb.DiffusionBlocksModule.load_from_checkpoint(last)  # net from the record, adapters from the record
    assert loaded.lora == GroupLoRA(rank=RANK, alpha=ALPHA, target=TARGET)
    assert loaded.state_dict().keys() == final.keys()
    assert all(torch.equal(loaded.state_dict()[k], final[k]) for k in final)
    resumed, _, _ = run(tmp_path, ckpt_path=root / "ckpt" / "epoch=0-step=2.ckpt")
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_adapters_on_a_diffusers_transformer_by_its_stock_block_names(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")

    def dit() -> Any:
        torch.manual_seed(0)
        return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                               out_channels=8, num_layers=4, sample_size=8, patch_size=2,
                                               num_embeds_ada_norm=10).eval()  # fmt: skip

    attention = ["to_q", "to_k", "to_v", "to_out.0"]
    network = ldb.BlockwiseNetwork(dit(), 2, block_path="transformer_blocks")
    GroupLoRA(rank=RANK, target=attention).apply(network)
    plain = dict(dit().named_modules())
    for g, layers in enumerate(GROUPS):
        names = {n for n, p in network.named_parameters() if p.requires_grad and f".group_{g}." in n}
        assert names == {
            f"net.transformer_blocks.{i}.attn1.{a}.lora_{ab}.group_{g}.weight"
            for i in layers for a in attention for ab in "AB"
        }  # fmt: skip
        linears = [plain[f"transformer_blocks.{i}.attn1.{a}"] for i in layers for a in attention]
        expected = sum(RANK * (m.in_features + m.out_features) for m in linears)
        assert sum(dict(network.named_parameters())[n].numel() for n in names) == expected == 1024
    assert all("lora_" in n for n, p in network.named_parameters() if p.requires_grad)
    with torch.no_grad():  # as if trained: B = 0 would make any adapter file reproduce the output
        for n, p in network.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    folders = save_adapters(network, tmp_path)
    restored = peft.PeftModel.from_pretrained(dit(), folders[0], adapter_name="group_0")
    restored.load_adapter(folders[1], adapter_name="group_1")
    restored.base_model.set_adapter(["group_0", "group_1"])
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        expected = network(x, timestep=t, class_labels=y).sample
        assert torch.equal(restored.base_model.model(x, timestep=t, class_labels=y).sample, expected)
        assert not torch.allclose(dit()(x, timestep=t, class_labels=y).sample, expected)


def test_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    for rank in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=r"positive integer rank.*GroupLoRA\(rank=4\)"):
            GroupLoRA(rank=rank)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha must be positive"):
        GroupLoRA(alpha=0)
    with pytest.raises(ValueError, match="not a regular expression"):
        GroupLoRA(target="attn.(")
    with pytest.raises(ValueError, match="unknown keys"):
        GroupLoRA.of({"rank": 4, "r": 4})
    assert GroupLoRA.of(GroupLoRA(rank=2, target=["to_q"]).record()) == GroupLoRA(rank=2, target=["to_q"])
    # a network-wide pattern that only reaches the first group's blocks: the second group is named, with its Linears
    module_args = (pretrained_dit(), ldb.tasks.ImageGeneration())
    with pytest.raises(ValueError, match=r"matches no Linear of group 1 \(layers \[2, 3\] of `blocks`\)") as err:
        ldb.DiffusionBlocksModule(*module_args, num_blocks=2, lora=GroupLoRA(target=r"blocks\.[01]\.attn\.qkv"))
    for name in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2", "ada.1", "blocks.2.attn.qkv"):
        assert name in str(err.value)
    network = ldb.BlockwiseNetwork(pretrained_dit(), 2)
    GroupLoRA().apply(network)
    with pytest.raises(ValueError, match="already holds LoRA layers"):
        GroupLoRA().apply(network)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ModuleNotFoundError, match=r"lightning-diffusionblocks\[diffusers\]"):
        GroupLoRA().apply(ldb.BlockwiseNetwork(pretrained_dit(), 2))


def test_memory_benchmark_lora_end_to_end_against_block_wise(monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks/memory.py --lora``: end to end every adapter has a gradient and Adam moments at every step;
    block-wise only the active group's, the rest offloaded. Byte counts from the Linears' shapes (all of a block's)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("ldb_memory_benchmark", ROOT / "benchmarks" / "memory.py")
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(bench)
        args = {"model": "dit", "accelerator": "cpu", "image_size": 8, "patch": 4, "dim": 32, "depth": 4, "heads": 2,
                "batch_size": 4, "steps_per_group": 1, "no_offload": False, "lora": RANK}  # fmt: skip
        rows = {b: bench.child(argparse.Namespace(**args, blocks=b)) for b in (0, 2)}
    finally:
        sys.modules.pop("common", None)  # the benchmarks' helper module, imported by its bare name
    plain = ldb.presets.demo_dit(image_size=8, channels=3, patch=4, dim=32, depth=4, heads=2)
    linears = [[m for m in plain.blocks[i].modules() if isinstance(m, nn.Linear)] for i in range(4)]
    numel = [sum(RANK * (m.in_features + m.out_features) for m in layer) for layer in linears]
    tensors = [2 * len(layer) for layer in linears]  # lora_A and lora_B per Linear, each with a 0-d step counter
    mib = 2**20
    e2e = rows[0]["per_group"]["all"]
    assert e2e["grads"] * mib == FLOAT * sum(numel) == rows[0]["trainable_mib"] * mib
    assert e2e["optimizer"] * mib == 2 * FLOAT * sum(numel) + FLOAT * sum(tensors)
    for g, layers in enumerate(GROUPS):
        group = rows[2]["per_group"][str(g)]
        assert group["grads"] * mib == FLOAT * sum(numel[i] for i in layers)
        stepped = [i for later in GROUPS[: g + 1] for i in later]
        assert group["optimizer"] * mib == 2 * FLOAT * sum(numel[i] for i in layers) + FLOAT * sum(
            tensors[i] for i in stepped
        )
        assert group["activations"] < 0.6 * e2e["activations"]
    assert "| LoRA r=4, DiffusionBlocks B=2 |" in bench.markdown(list(rows.values()), cuda=False)


# ------------------------------------------------------------------ diffusers transformers (DiffusersNetwork)
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
D_RANK, D_ALPHA = 2, 4.0


class AdapterSteps(L.Callback):
    """Per training step, the names of the parameters it changed."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.changed: list[set[str]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        now = dict(pl_module.named_parameters())
        self.changed.append({n for n, v in self.before.items() if not torch.equal(v, now[n].detach())})


@pytest.fixture(scope="module")
def diffusers_lora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ldb.DiffusionBlocksModule, Any]]:
    """SD3 (3 joint blocks) and Flux (1 double- + 3 single-stream blocks; group 0 holds double 0 and single 0, so it
    spans the seam), wrapped in DiffusersNetwork, 3 groups, LoRA on the attention projections; one step per group."""
    pytest.importorskip("diffusers")
    from tests.test_diffusers_models import latent_loader, wrapped

    out = {}
    for name in ("sd3", "flux"):
        root = tmp_path_factory.mktemp(f"lora_{name}")
        lora = GroupLoRA(rank=D_RANK, alpha=D_ALPHA, target=ATTENTION)
        module = ldb.DiffusionBlocksModule(wrapped(name), ldb.tasks.FlowMatching(), num_blocks=3, lr=1e-2, lora=lora)
        steps = AdapterSteps()
        strategy = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=1)
        L.Trainer(strategy=strategy, max_steps=3, callbacks=[steps], **trainer_kwargs(root)).fit(
            module, latent_loader(name, n=6, batch_size=2)
        )
        out[name] = (module, steps)
    return out


def _expected_adapters(name: str, groups: list[list[int]]) -> list[dict[str, int]]:
    """Per group, ``<stock Linear name> -> r·(in + out)`` of the attention projections in its blocks, read from a
    plain stock model: global layer i is ``transformer_blocks.i``, after them ``single_transformer_blocks.(i − n)``."""
    from tests.test_diffusers_models import tiny

    stock = tiny(name)
    linears = {n: m for n, m in stock.named_modules() if isinstance(m, nn.Linear)}
    doubles = len(stock.transformer_blocks)
    out = []
    for layers in groups:
        prefixes = [f"transformer_blocks.{i}." if i < doubles else f"single_transformer_blocks.{i - doubles}."
                    for i in layers]  # fmt: skip
        out.append({
            n: D_RANK * (m.in_features + m.out_features)
            for n, m in linears.items()
            for p in prefixes
            if n.startswith(p) and n[len(p):] in {f"attn.{t}" for t in ATTENTION}
        })  # fmt: skip
    return out


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_group_lora_on_a_diffusers_network_gives_each_group_its_attention_adapters(
    name: str, diffusers_lora: dict[str, Any]
) -> None:
    """GroupLoRA(target=["to_q", "to_k", "to_v", "to_out.0"]) on DiffusersNetwork: group g's adapter sits on exactly
    the attention projections of g's blocks, by their stock diffusers names (for Flux group 0: double-stream block 0
    and single-stream block 0, across the seam); only adapters are trainable; each block-wise step changes only the
    adapter of the group it trains, and every group's adapter trains."""
    module, steps = diffusers_lora[name]
    groups = module.network.groups
    assert groups == [[0, 1], [2], [3]] if name == "flux" else groups == [[0], [1], [2]]
    expected = _expected_adapters(name, groups)
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    for g, linears in enumerate(expected):
        names = {n for n in trainable if f".group_{g}." in n}
        want = {f"network.net.model.{lin}.lora_{ab}.group_{g}.weight" for lin in linears for ab in "AB"}
        assert names == want, f"group {g}: {sorted(names ^ want)}"
        assert sum(trainable[n].numel() for n in names) == sum(linears.values())
    assert set(trainable) == {n for n in trainable if ".lora_" in n}  # base weights, stems and head frozen
    if name == "flux":
        seam = {lin.split(".attn.")[0] for lin in expected[0]}
        assert seam == {"transformer_blocks.0", "single_transformer_blocks.0"}
    # one step per group (sequential phases): each changed only its own group's adapter, and each group trained once
    owners = []
    for changed in steps.changed:
        groups_changed = {int(n.split(".group_")[1].split(".")[0]) for n in changed if ".group_" in n}
        assert len(groups_changed) == 1
        assert changed <= {n for n in trainable if f".group_{min(groups_changed)}." in n}
        owners.append(groups_changed.pop())
    assert sorted(owners) == [0, 1, 2]


def test_to_diffusers_exports_a_lora_module_with_its_adapters_merged(diffusers_lora: dict[str, Any], tmp_path: Path):
    """to_diffusers of a Flux module trained with GroupLoRA writes plain stock weights, each adapted projection
    W + (alpha / r)·B·A (the LoRA update, computed here from the module's tensors), on a copy: the module keeps its
    adapters and weights; the written model computes what the module's own network computes per group."""
    from lightning_diffusionblocks.export import TimestepRoutedTransformer, to_diffusers
    from lightning_diffusionblocks.lora import has_adapters
    from tests.test_diffusers_models import text_conditioning, tiny
    from tests.test_export import _stock_call

    module, _ = diffusers_lora["flux"]
    state = {k: v.clone() for k, v in module.state_dict().items()}
    to_diffusers(module, tmp_path / "flux")
    assert has_adapters(module.network)
    assert module.lora is not None
    after = module.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(v, after[k]) for k, v in state.items())

    written = TimestepRoutedTransformer.from_pretrained(tmp_path / "flux")
    weights = written.transformer.state_dict()
    assert set(weights) == set(tiny("flux").state_dict())  # the stock keys: no base_layer, no lora_A/B
    ours = {k.removeprefix("network.net.model."): v for k, v in state.items() if k.startswith("network.net.model.")}
    merged = 0
    for key, value in weights.items():
        stem = key.removesuffix(".weight")
        if f"{stem}.base_layer.weight" in ours:  # an adapted projection: W + (alpha/r)·B·A of its group's adapter
            (g,) = [k.split(".lora_A.")[1] for k in ours if k.startswith(f"{stem}.lora_A.")]
            update = ours[f"{stem}.lora_B.{g}"] @ ours[f"{stem}.lora_A.{g}"] * (D_ALPHA / D_RANK)
            assert update.abs().max() > 0, f"{stem}: its adapter never trained"
            torch.testing.assert_close(value, ours[f"{stem}.base_layer.weight"] + update, rtol=0, atol=1e-6)
            merged += 1
        else:
            assert torch.equal(value, ours[key.replace(".bias", ".base_layer.bias")] if key not in ours else ours[key])
    assert merged == sum(len(e) for e in _expected_adapters("flux", module.network.groups))

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = text_conditioning(2, seed=4, family="flux")
    network = module.sampling_network.eval()
    for group, t in enumerate((0.9, 0.5, 0.1)):
        level = torch.full((2,), t)
        assert written.group_of(level) == group
        with torch.no_grad():
            got = _stock_call("flux", written, x, level, None, cond)
            want = network(x, level, None, group=group, **cond)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
