"""diffusers, peft and accelerate are an optional extra: without them the package imports and trains, and each
feature that needs them says which extra to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRA = "pip install 'lightning-diffusionblocks[diffusers]'"
BLOCKED = ("diffusers", "peft", "accelerate")

# Runs in a fresh interpreter where importing any of BLOCKED fails as if it were not installed (a None entry in
# sys.modules makes `import name` raise ModuleNotFoundError and importlib.util.find_spec(name) return None).
SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys
    for name in {blocked!r}:
        sys.modules[name] = None
    import lightning as L
    import torch
    import lightning_diffusionblocks as ldb
    from tests.conftest import image_loader, tiny_dit, trainer_kwargs

    module = ldb.DiffusionBlocksModule(tiny_dit(depth=2), ldb.tasks.FlowMatching(), num_blocks=2)
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=2, **trainer_kwargs(sys.argv[1]))
    trainer.fit(module, image_loader(n=32))
    report = {{"steps": int(module.group_steps.sum()), "blockwise": bool(module.trained_blockwise),
               "sample": list(module.sample(labels=[1, 2], steps=2).shape),
               "loaded": sorted(n for n in {blocked!r} if sys.modules.get(n) is not None)}}

    def refused(call):
        try:
            call()
        except Exception as err:  # noqa: BLE001 - the test reads the type and message
            return [type(err).__name__, str(err)]
        return None

    sd3 = {{"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2}}
    report["DiffusersNetwork"] = refused(lambda: ldb.models.DiffusersNetwork("SD3Transformer2DModel", config=sd3))
    report["GroupLoRA"] = refused(
        lambda: ldb.DiffusionBlocksModule(tiny_dit(depth=2), ldb.tasks.FlowMatching(), num_blocks=2,
                                          lora=ldb.GroupLoRA(rank=2))
    )
    report["export"] = refused(lambda: importlib.import_module("lightning_diffusionblocks.export"))
    report["LatentSpace"] = refused(lambda: ldb.LatentSpace("stabilityai/sd-vae-ft-mse"))
    print("REPORT" + json.dumps(report))
    """
)


def test_the_core_runs_without_the_diffusers_extra_and_its_features_name_it(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", SCRIPT.format(blocked=BLOCKED), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("REPORT"))
    report = json.loads(line[len("REPORT") :])
    assert report["loaded"] == []  # nothing of the extra was imported, so the run above needed none of it
    assert report["steps"] == 2
    assert report["blockwise"]
    assert report["sample"] == [2, 1, 8, 8]
    expected = {"DiffusersNetwork": ("ImportError", "DiffusersNetwork needs diffusers"),
                "GroupLoRA": ("ModuleNotFoundError", "LoRA needs peft"),
                "export": ("ImportError", "lightning_diffusionblocks.export needs diffusers"),
                "LatentSpace": ("TypeError", "AutoencoderKL.from_pretrained")}  # fmt: skip
    for feature, (kind, what) in expected.items():
        assert report[feature] is not None, f"{feature} ran without the diffusers extra"
        name, message = report[feature]
        assert name == kind, (feature, name, message)
        assert what in message, (feature, message)
        assert EXTRA in message, (feature, message)
