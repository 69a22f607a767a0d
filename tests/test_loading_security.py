"""Loading imports only this package and what the caller trusts, at every depth, and never unpickles code.

Each test crafts a file whose loading would leave a marker file: a package on a temporary ``sys.path`` whose import
(and whose network's constructor) writes one, or a pickle whose ``__reduce__`` does. A control shows each payload is
live; the package's own loads must leave no marker behind. The command line's share is in ``test_cli.py``.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import lightning as L
import pytest
import torch

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.checkpoints import CheckpointLoadError, read_checkpoint
from lightning_diffusionblocks.merge import MergeError, merge_checkpoints
from tests.conftest import image_loader, tiny_dit, trainer_kwargs
from tests.test_safety import Payload

TASK = {"class_path": "lightning_diffusionblocks.tasks.ImageGeneration", "init_args": {}}


def marker_package(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A package on ``sys.path`` whose import writes ``<root>/<name>.marker`` and whose ``Net()`` appends to it.

    The name is new each time, so no earlier import can hide a later one.
    """
    name = f"untrusted_{uuid.uuid4().hex[:10]}"
    marker = root / f"{name}.marker"
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(
        "from pathlib import Path\n"
        "from torch import nn\n"
        f"MARKER = Path({str(marker)!r})\n"
        "MARKER.write_text('imported')\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, **kwargs):\n"
        "        super().__init__()\n"
        "        MARKER.write_text('constructed')\n"
    )
    monkeypatch.syspath_prepend(str(root))
    return name, marker


def assert_no_unpickler_advice(message: str) -> None:
    """A refusal names what was refused and never points at the unrestricted unpickler."""
    assert "the global `exec`" in message
    assert "refused and nothing in it ran" in message
    for advice in ("weights_only=False", "weights_only` set to `False", "safe_globals", "Weights only load failed"):
        assert advice not in message


def test_a_record_nesting_a_module_whose_net_is_a_dict_imports_nothing_untrusted(tmp_path, monkeypatch):
    """0.2.0 built the nested DiffusionBlocksModule, whose own constructor trusted the dict's package."""
    name, marker = marker_package(tmp_path / "site", monkeypatch)
    nested = {
        "class_path": "lightning_diffusionblocks.module.DiffusionBlocksModule",
        "init_args": {"net": {"class_path": f"{name}.Net"}, "task": TASK},  # not a record: no init_args
    }
    for net in (nested, {"class_path": f"{name}.Net", "init_args": {}}):
        torch.save({"diffusionblocks": {"net": net, "task": TASK}, "state_dict": {}}, tmp_path / "crafted.ckpt")
        with pytest.raises(Exception) as info:  # noqa: PT011 - 0.2.0 failed only after running the package
            ldb.DiffusionBlocksModule.load_from_checkpoint(tmp_path / "crafted.ckpt")
        assert not marker.exists()
        assert isinstance(info.value, CheckpointLoadError)
        assert f"`{name}.Net`, whose package is not trusted" in str(info.value)
        assert f"load_from_checkpoint(path, trusted=['{name}'])" in str(info.value)
    # the same dict met while a record is built (a constructor given it by a record) follows the record's rule
    with pytest.raises(ldb.records.RecordError, match="not trusted"), ldb.records.trusting(()):
        ldb.DiffusionBlocksModule({"class_path": f"{name}.Net"}, TASK)
    assert not marker.exists()
    # control: trusting the package runs it (the nested network is then refused, having no block stack)
    torch.save({"diffusionblocks": {"net": nested, "task": TASK}, "state_dict": {}}, tmp_path / "crafted.ckpt")
    with pytest.raises(ValueError, match="block stack"):
        ldb.DiffusionBlocksModule.load_from_checkpoint(tmp_path / "crafted.ckpt", trusted=[name])
    assert marker.read_text() == "constructed"


def test_a_trusted_module_reexporting_a_class_does_not_lend_it_trust(tmp_path):
    """The class's own module decides: `lightning_diffusionblocks.cli.LightningModule` is Lightning's class, imported
    there, and Lightning is not trusted by default (0.2.0 constructed it)."""
    record = {"class_path": "lightning_diffusionblocks.cli.LightningModule", "init_args": {}}
    torch.save({"diffusionblocks": {"net": record, "task": TASK}}, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointLoadError, match="lightning.pytorch.core.module.LightningModule`; its record names"):
        ldb.DiffusionBlocksModule.load_from_checkpoint(tmp_path / "m.ckpt")


def test_forced_unrestricted_loads_by_the_environment_are_refused_by_the_strategy(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns torch.load(weights_only=None) into the unrestricted unpickler; the
    strategy passed None (0.2.0), so fit/test(ckpt_path=...) ran the file. An explicit True is kept."""
    marker = tmp_path / "marker"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": Payload(marker)}, tmp_path / "crafted.ckpt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.warns(UserWarning, match="forcing weights_only=False"):  # control: the variable does switch torch
        torch.load(tmp_path / "crafted.ckpt")
    assert marker.read_text() == "ran"
    marker.unlink()
    module = ldb.DiffusionBlocksModule(tiny_dit(depth=3), ldb.tasks.ImageGeneration(), num_blocks=3)
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=2, **trainer_kwargs(tmp_path))
    with pytest.raises(Exception) as info:  # noqa: PT011 - 0.2.0 failed only after running the payload
        trainer.fit(module, image_loader(), ckpt_path=tmp_path / "crafted.ckpt")
    assert not marker.exists()
    assert_no_unpickler_advice(str(info.value))
    with pytest.raises(RuntimeError) as info, pytest.warns(UserWarning, match="weights_only=False is ignored"):
        trainer.test(module, image_loader(), ckpt_path=tmp_path / "crafted.ckpt", weights_only=False)
    assert not marker.exists()
    assert_no_unpickler_advice(str(info.value))
    for load in (read_checkpoint, ldb.DiffusionBlocksModule.load_from_checkpoint):
        with pytest.raises(CheckpointLoadError) as info:
            load(tmp_path / "crafted.ckpt")
        assert_no_unpickler_advice(str(info.value))
    assert not marker.exists()


def test_refusals_name_the_refused_global_and_never_advise_the_unrestricted_unpickler(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": Payload(marker)}, tmp_path / "crafted.ckpt")
    with pytest.raises(CheckpointLoadError) as info:
        read_checkpoint(tmp_path / "crafted.ckpt")
    assert_no_unpickler_advice(str(info.value))
    with pytest.raises(MergeError) as info:
        merge_checkpoints([tmp_path / "crafted.ckpt", tmp_path / "crafted.ckpt"], tmp_path / "merged.ckpt")
    assert_no_unpickler_advice(str(info.value))
    assert not marker.exists()
