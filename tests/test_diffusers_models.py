"""diffusers transformers trained as they are (``DiffusersNetwork``): stacks, time conventions, learned σ, DiT's label
dropout, dict-batch conditioning with dropout and classifier-free guidance, and the errors for bad input.

The contract (only the active group changes, one group per step, reload, plain-Trainer validation) runs for these
networks in tests/test_contract.py, from the factories below. Tiny configs from the class constructors, never a
download.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_diffusionblocks as ldb
from tests.conftest import tiny_dit, trainer_kwargs

needs_diffusers = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="needs `pip install lightning-diffusionblocks[diffusers]`"
)
TEXT, POOLED, TOKENS = 32, 24, 5


# ---------------------------------------------------------------------- tiny models (shared with test_contract)
def tiny(family: str, **overrides: Any) -> nn.Module:
    """A tiny randomly initialised diffusers transformer of ``family`` (latents 4×8×8)."""
    import diffusers

    torch.manual_seed(0)
    head = {"num_attention_heads": 2, "attention_head_dim": 8}
    configs: dict[str, tuple[str, dict[str, Any]]] = {
        "dit": ("DiTTransformer2DModel", {**head, "in_channels": 4, "out_channels": 8, "num_layers": 3,
                                          "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10}),
        "pixart": ("PixArtTransformer2DModel", {**head, "in_channels": 4, "out_channels": 8, "num_layers": 3,
                                                "cross_attention_dim": 16, "caption_channels": TEXT, "sample_size": 8,
                                                "patch_size": 2}),
        "sd3": ("SD3Transformer2DModel", {**head, "sample_size": 8, "patch_size": 2, "in_channels": 4,
                                          "out_channels": 4, "num_layers": 3, "joint_attention_dim": TEXT,
                                          "caption_projection_dim": 16, "pooled_projection_dim": POOLED,
                                          "pos_embed_max_size": 16}),
        # 1 double- then 3 single-stream blocks: with 3 groups, group 0 spans the seam
        "flux": ("FluxTransformer2DModel", {"patch_size": 1, "in_channels": 16, "num_layers": 1,
                                            "num_single_layers": 3, "attention_head_dim": 16,
                                            "num_attention_heads": 2, "joint_attention_dim": TEXT,
                                            "pooled_projection_dim": POOLED, "guidance_embeds": False,
                                            "axes_dims_rope": (4, 6, 6)}),
        "sana": ("SanaTransformer2DModel", {**head, "in_channels": 4, "out_channels": 4, "num_layers": 3,
                                            "num_cross_attention_heads": 2, "cross_attention_head_dim": 8,
                                            "cross_attention_dim": 16, "caption_channels": TEXT, "sample_size": 8,
                                            "patch_size": 2}),
    }  # fmt: skip
    name, config = configs[family]
    return getattr(diffusers, name)(**{**config, **overrides})


def wrapped(family: str, **options: Any) -> ldb.models.DiffusersNetwork:
    return ldb.models.DiffusersNetwork(tiny(family), sample_size=8 if family == "flux" else None, **options)


def text_conditioning(n: int, seed: int = 0, family: str = "sd3") -> dict[str, Tensor]:
    """Per-sample text conditioning the family takes (states; pooled states or a mask)."""
    g = torch.Generator().manual_seed(seed)
    cond = {"encoder_hidden_states": torch.randn(n, TOKENS, TEXT, generator=g)}
    if family in ("sd3", "flux"):
        cond["pooled_projections"] = torch.randn(n, POOLED, generator=g)
    else:
        mask = torch.ones(n, TOKENS)
        mask[::2, -2:] = 0  # some prompts padded
        cond["encoder_attention_mask"] = mask
    return cond


def latent_loader(family: str, n: int = 32, batch_size: int = 16) -> DataLoader:
    """Latent batches: ``(latents, labels)`` for DiT (class-conditional), dict batches with text otherwise."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    if family == "dit":
        return DataLoader(list(zip(latents, labels)), batch_size=batch_size)
    cond = text_conditioning(n, family=family)
    rows = [{"images": latents[i], "labels": labels[i], **{k: v[i] for k, v in cond.items()}} for i in range(n)]
    return DataLoader(rows, batch_size=batch_size)


def infer(family: str) -> Callable[[ldb.DiffusionBlocksModule, int], Tensor]:
    """The contract's inference call: guided samples from labels (DiT) or from text conditioning."""
    if family == "dit":
        return lambda m, steps: m.sample(labels=[1, 2], steps=steps, guidance=2.0)
    return lambda m, steps: m.sample(conditioning=text_conditioning(2, seed=1, family=family), steps=steps,
                                     guidance=2.0)  # fmt: skip


# ---------------------------------------------------------------------- stacks and ownership
@needs_diffusers
def test_stacks_are_found_and_keep_their_diffusers_keys() -> None:
    flux = wrapped("flux")
    stock_keys = list(tiny("flux").state_dict())
    module = ldb.DiffusionBlocksModule(flux, ldb.tasks.FlowMatching(), num_blocks=3)
    network = module.network
    # double- then single-stream blocks as one index; the canonical path records where each part's layers sit
    assert network.block_path == "model.transformer_blocks[0:1]+model.single_transformer_blocks[1:4]"
    assert network.groups == [[0, 1], [2], [3]]
    assert list(flux.model.state_dict()) == stock_keys  # diffusers' own keys, nothing renamed or duplicated
    partition = network.partition
    assert partition.owner("net.model.transformer_blocks.0.attn.to_q.weight") == 0
    assert partition.owner("net.model.single_transformer_blocks.0.attn.to_q.weight") == 0  # across the seam
    assert partition.owner("net.model.single_transformer_blocks.1.attn.to_q.weight") == 1
    assert partition.owner("net.model.single_transformer_blocks.2.proj_out.weight") == 2
    assert partition.owner("net.model.proj_out.weight") == 0  # the head: group 0's (its copies are stems.k)
    state_keys = set(module.state_dict())
    for key in ("network.net.model.transformer_blocks.0.attn.to_q.weight", "network.stems.0.model.proj_out.weight"):
        assert key in state_keys
    assert not any(k.startswith("network.stems.0.model.single_transformer_blocks.") for k in state_keys)
    assert ldb.models.DiffusersNetwork(tiny("dit")).diffusionblocks_stack_path == "model.transformer_blocks"


@needs_diffusers
def test_a_group_runs_as_the_stock_model_trimmed_to_its_blocks() -> None:
    """Flux's group 0 (double block 0 + single block 0) and DiT's group 1 equal diffusers' own models holding only
    those blocks; for DiT that is the head reading its group's first block's embedder (the convention kept at
    inference and by an export)."""
    for family, group in (("flux", 0), ("dit", 1)):
        net = wrapped(family)
        stock = tiny(family).eval()  # eval: the stock DiT would drop labels at random in train()
        stock.load_state_dict(net.model.state_dict())
        network = ldb.BlockwiseNetwork(net, 3, stem="shared")
        layers = network.groups[group]
        if family == "flux":
            stock.transformer_blocks = nn.ModuleList([stock.transformer_blocks[i] for i in layers if i < 1])
            stock.single_transformer_blocks = nn.ModuleList([stock.single_transformer_blocks[i - 1] for i in layers
                                                             if i >= 1])  # fmt: skip
        else:
            stock.transformer_blocks = nn.ModuleList([stock.transformer_blocks[i] for i in layers])
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7])
        cond = text_conditioning(2, family=family) if family == "flux" else {}
        labels = torch.tensor([1, 2]) if family == "dit" else None
        got = network(x, t, labels, group=group, **cond)
        if family == "flux":  # pack 2×2 as FluxPipeline does; ids for a 4×4 token grid
            tokens = x.view(2, 4, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 16)
            ids = torch.stack([torch.zeros(16), torch.arange(4).repeat_interleave(4), torch.arange(4).repeat(4)], 1)
            out = stock(tokens, timestep=t, img_ids=ids, txt_ids=torch.zeros(TOKENS, 3), **cond).sample
            want = out.view(2, 4, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 4, 8, 8)
        else:
            want = stock(x, timestep=t, class_labels=labels).sample[:, :4]
        assert torch.equal(got, want), family


# ---------------------------------------------------------------------- time conventions and outputs
@needs_diffusers
def test_each_formulation_reaches_the_models_own_timesteps() -> None:
    """What the model's forward receives as ``timestep``, computed here from each convention: DDPM's integer k
    unchanged; flow time t as 1000·t (Flux: t, it multiplies by 1000 itself); EDM σ as 1000·σ/(1 + σ)."""
    seen: list[Tensor] = []

    def spy(_: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(kwargs["timestep"])

    cases: list[tuple[str, Any, Tensor, Tensor]] = [
        ("dit", ldb.tasks.DDPM(), torch.tensor([999, 3]), torch.tensor([999, 3])),
        ("sd3", ldb.tasks.FlowMatching(), torch.tensor([0.25, 1.0]), torch.tensor([250.0, 1000.0])),
        ("sd3", ldb.tasks.FlowMatching(time_scale=1000.0, reverse_time=True), torch.tensor([100.0, 900.0]),
         torch.tensor([900.0, 100.0])),
        ("flux", ldb.tasks.FlowMatching(), torch.tensor([0.25, 1.0]), torch.tensor([0.25, 1.0])),
        ("dit", ldb.tasks.ImageGeneration(), torch.log(torch.tensor([1.0, 3.0])) / 4, torch.tensor([500.0, 750.0])),
        ("dit", ldb.tasks.DDPM(noise=ldb.DDPMSchedule(num_timesteps=100)), torch.tensor([50, 99]),
         torch.tensor([500.0, 990.0])),
    ]  # fmt: skip
    for family, task, level, want in cases:
        net = wrapped(family)
        task.bind(net)
        net.model.register_forward_pre_hook(spy, with_kwargs=True)
        cond = text_conditioning(2, family=family) if family != "dit" else {}
        net(torch.randn(2, 4, 8, 8), level, None, **cond)
        assert seen[-1].dtype == want.dtype, (family, task, seen[-1])
        assert torch.allclose(seen[-1], want, rtol=1e-5), (family, task, seen[-1])
    sana = ldb.models.DiffusersNetwork(tiny("sana", timestep_scale=2.0))
    assert sana.timestep_scale == 2000.0  # Sana's pipeline passes σ·1000·config.timestep_scale
    assert ldb.models.DiffusersNetwork(tiny("sd3"), timestep_scale=1.0).timestep_scale == 1.0  # the one option


@needs_diffusers
def test_learned_sigma_output_is_cut_to_its_prediction_half() -> None:
    net = wrapped("dit")
    assert net.model.config.out_channels == 8
    assert net.learned_sigma
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    out = net(x, t, y)
    assert out.shape == x.shape
    assert torch.equal(out, net.model(x, timestep=t, class_labels=y).sample[:, :4])
    assert not wrapped("sd3").learned_sigma


@needs_diffusers
def test_dit_label_dropout_happens_once_in_the_task() -> None:
    """Measured: the labels every block embeds in train() are the task's, dropped at rate label_dropout once (the
    same rows in every block). diffusers' own LabelEmbedding would drop again, independently in every block."""
    n, rate = 4000, 0.1
    embedded: list[Tensor] = []

    def measure(net: nn.Module) -> list[float]:
        embedded.clear()
        hooks = [m.register_forward_pre_hook(lambda _, a: embedded.append(a[0])) for name, m in net.named_modules()
                 if name.endswith("class_embedder.embedding_table")]  # fmt: skip
        task = ldb.tasks.ImageGeneration(label_dropout=rate)
        task.bind(net)
        labels = task.drop_labels(torch.randint(0, 10, (n,)), torch.Generator().manual_seed(0))
        net.train()
        with torch.no_grad():
            net(torch.randn(n, 4, 8, 8), torch.zeros(n), labels)
        for hook in hooks:
            hook.remove()
        return [(e == 10).float().mean().item() for e in embedded]

    net = wrapped("dit")
    rates = measure(net)
    assert len(rates) == 4  # three blocks and the head's read of the first block's embedder
    assert all(abs(r - rate) < 0.02 for r in rates), rates  # ±4 binomial standard deviations
    assert all(torch.equal(e, embedded[0]) for e in embedded)
    for module in net.model.modules():  # diffusers' default: each block drops on its own as well
        if hasattr(module, "embedding_table"):
            module.dropout_prob = 0.1
    doubled = measure(net)
    assert all(abs(r - (1 - (1 - rate) ** 2)) < 0.02 for r in doubled), doubled  # 0.19: what the fix prevents


# ---------------------------------------------------------------------- conditioning
@needs_diffusers
def test_text_conditioning_dropout_uses_the_given_null_and_guidance_mixes_it() -> None:
    torch.manual_seed(0)
    null = {"encoder_hidden_states": torch.full((TOKENS, TEXT), 0.5), "pooled_projections": torch.ones(POOLED)}
    task = ldb.tasks.FlowMatching(label_dropout=0.25, null_conditioning=null)
    module = ldb.DiffusionBlocksModule(wrapped("sd3"), task, num_blocks=1)
    _, cond = task.split(next(iter(latent_loader("sd3", n=400, batch_size=400))))
    dropped = task.drop_labels(cond, torch.Generator().manual_seed(0))
    rows = (dropped.values["encoder_hidden_states"] == 0.5).flatten(1).all(1)
    assert abs(float(rows.float().mean()) - 0.25) < 0.09  # ±4 binomial standard deviations at n = 400
    assert torch.equal(rows, (dropped.values["pooled_projections"] == 1).all(1))  # whole samples drop together
    assert torch.equal(dropped.labels, cond.labels)  # a text network's labels stay data
    kept = ~rows
    assert torch.equal(dropped.values["encoder_hidden_states"][kept], cond.values["encoder_hidden_states"][kept])

    calls: list[dict[str, Tensor]] = []
    module.network.net.model.register_forward_pre_hook(lambda _, a, kw: calls.append(kw), with_kwargs=True)
    c = text_conditioning(2, seed=3)
    guided = module.sample(conditioning=c, steps=1, guidance=3.0, seed=0)
    # one call, conditional then null rows; the null rows are the given null conditioning
    states = calls[0]["encoder_hidden_states"]
    assert states.shape[0] == 4
    assert torch.equal(states[:2], c["encoder_hidden_states"])
    assert torch.equal(states[2:], null["encoder_hidden_states"].expand(2, TOKENS, TEXT))
    # the guided Euler step from t_max to 0 is x = ε − t_max·(v_u + g·(v_c − v_u)), v from the network itself
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    t_max = task.noise.t_max
    net, t = module.network.net.eval(), torch.full((2,), t_max)
    with torch.no_grad():
        v_c = net(noise, t, None, **c)
        v_u = net(noise, t, None, **{k: v.expand(2, *v.shape) for k, v in null.items()})
    assert torch.allclose(guided, noise - t_max * (v_u + 3.0 * (v_c - v_u)), atol=1e-5)
    unconditional = module.sample(num_samples=2, steps=1)  # the null conditioning stands in for a prompt
    assert torch.allclose(unconditional, noise - t_max * v_u, atol=1e-5)


@needs_diffusers
def test_dict_batches_without_extra_keys_read_as_labelled_batches() -> None:
    task = ldb.tasks.ImageGeneration()
    images, labels = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    got_images, got_labels = task.split({"images": images, "labels": labels})
    assert got_images is images
    assert got_labels is labels


@needs_diffusers
def test_conditioning_keys_pass_only_the_keys_the_network_takes(tmp_path: Any) -> None:
    """A dict batch that carries data beside the conditioning (a caption index, as the captioned MNIST batches do)
    is refused naming `conditioning_keys`; with them the other keys ride along unpassed, and the option is
    rebuilt from the checkpoint."""
    batch = next(iter(latent_loader("sd3", n=4, batch_size=4)))
    rows = [{**{k: v[i] for k, v in batch.items()}, "caption": torch.tensor(i)} for i in range(4)]
    loader = DataLoader(rows, batch_size=4)
    plain = ldb.DiffusionBlocksModule(wrapped("sd3"), ldb.tasks.FlowMatching(), num_blocks=2)
    with pytest.raises(ValueError, match=r"takes no conditioning \['caption'\].*conditioning_keys=\["):
        L.Trainer(strategy="diffusionblocks", **trainer_kwargs(tmp_path, max_steps=1)).fit(plain, loader)
    keys = ["encoder_hidden_states", "pooled_projections"]
    task = ldb.tasks.FlowMatching(conditioning_keys=keys)
    images, cond = task.split(next(iter(loader)))
    assert sorted(cond.values) == keys
    assert images.shape == (4, 4, 8, 8)
    module = ldb.DiffusionBlocksModule(wrapped("sd3"), task, num_blocks=2)
    trainer = L.Trainer(strategy="diffusionblocks", **trainer_kwargs(tmp_path, max_steps=2))
    trainer.fit(module, loader)
    assert int(module.group_steps.sum()) == 2
    path = tmp_path / "keys.ckpt"
    trainer.save_checkpoint(path)
    assert ldb.DiffusionBlocksModule.load_from_checkpoint(path).task.conditioning_keys == tuple(keys)
    with pytest.raises(ValueError, match="conditioning_keys must be a list"):
        ldb.tasks.DDPM(conditioning_keys="encoder_hidden_states")


# ---------------------------------------------------------------------- errors that name the fix
@needs_diffusers
def test_diffusers_network_refuses_bad_input_naming_the_fix() -> None:
    sd3 = wrapped("sd3")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match=r"needs the conditioning \['pooled_projections'\].*dict batches"):
        sd3(x, t, encoder_hidden_states=torch.randn(2, TOKENS, TEXT))
    with pytest.raises(ValueError, match=r"one timestep per sample.*t\.expand"):
        sd3(x, torch.tensor(0.5), **text_conditioning(2))
    with pytest.raises(ValueError, match=r"takes no conditioning \['prompt'\]"):
        sd3(x, t, prompt=torch.zeros(2), **text_conditioning(2))
    with pytest.raises(ValueError, match=r"block_path='<attribute>'.*module lists"):
        ldb.models.DiffusersNetwork(_without_stacks(tiny("sd3")))
    own = ldb.DiffusionBlocksModule(tiny_dit(depth=3), ldb.tasks.ImageGeneration(), num_blocks=3)
    batch = {"images": torch.randn(2, 1, 8, 8), "labels": torch.tensor([1, 2]), "encoder_hidden_states": x}
    with pytest.raises(ValueError, match=r"conditioning \['encoder_hidden_states'\].*takes no such argument"):
        own.task.loss(own.network, batch, torch.ones(2), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"DiffusersNetwork\(model\)"):
        ldb.DiffusionBlocksModule(tiny("sd3"), ldb.tasks.FlowMatching())
    module = ldb.DiffusionBlocksModule(wrapped("sd3"), ldb.tasks.FlowMatching(), num_blocks=3)
    with pytest.raises(ValueError, match=r"needs the conditioning .*null_conditioning"):
        module.sample(num_samples=2, steps=1)
    with pytest.raises(ValueError, match=r"one row per sample"):
        module.sample(conditioning={"encoder_hidden_states": torch.randn(2, TOKENS, TEXT),
                                    "pooled_projections": torch.randn(3, POOLED)}, steps=1)  # fmt: skip


@needs_diffusers
def test_a_text_mask_reaches_flux_and_sd3_warns_that_it_attends_to_padding() -> None:
    flux, x, t = wrapped("flux"), torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5])
    cond = text_conditioning(2, family="flux")
    cond["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    other = {**cond, "encoder_hidden_states": cond["encoder_hidden_states"].clone()}
    other["encoder_hidden_states"][0, 3:] = 7.0  # only the padding of sample 0 changes
    masked, changed = flux(x, t, **cond), flux(x, t, **other)
    assert torch.allclose(masked, changed, atol=1e-5)
    assert not torch.allclose(masked, flux(x, t, **{k: v for k, v in other.items() if k != "encoder_attention_mask"}))
    sd3 = wrapped("sd3")
    with pytest.warns(UserWarning, match="takes no text attention mask"):
        sd3(x, t, encoder_attention_mask=torch.ones(2, TOKENS), **text_conditioning(2))


def _without_stacks(model: nn.Module) -> nn.Module:
    model.blocks = model.transformer_blocks  # renamed: the wrapper does not guess
    del model.transformer_blocks
    return model


@needs_diffusers
def test_the_wrapper_records_plain_data_and_rebuilds_from_config() -> None:
    from lightning_diffusionblocks.records import build, is_plain, record_of

    net = wrapped("flux", timestep_scale=1.0)
    record = record_of(net)
    assert record is not None
    assert is_plain(record)
    assert record["init_args"]["model"] == "FluxTransformer2DModel"
    rebuilt = build(record, "net")
    rebuilt.load_state_dict(net.state_dict())
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([0.5])
    cond = text_conditioning(1, family="flux")
    assert torch.equal(rebuilt(x, t, **cond), net(x, t, **cond))
    task = ldb.tasks.FlowMatching(null_conditioning={"pooled_projections": torch.linspace(0, 1, POOLED)})
    task_record = record_of(task)
    assert task_record is not None
    assert is_plain(task_record)  # the null conditioning as nested lists, so the task rebuilds itself
    assert torch.equal(build(task_record, "task").null_conditioning["pooled_projections"], torch.linspace(0, 1, POOLED))
    assert math.isclose(rebuilt.timestep_scale, 1.0)
    assert rebuilt.image_size == [8, 8]


@needs_diffusers
def test_jobs_that_each_train_one_flux_group_merge_across_the_seam(tmp_path: Any) -> None:
    """Group 0 holds the double-stream block and the first single-stream block: the job that trained it alone gives
    both to the merged model (ownership read from the recorded two-part block path), the others give theirs."""
    import lightning as L

    from lightning_diffusionblocks.merge import merge_checkpoints
    from tests.conftest import trainer_kwargs

    paths = []
    for group in range(3):
        module = ldb.DiffusionBlocksModule(wrapped("flux"), ldb.tasks.FlowMatching(), num_blocks=3, lr=1e-2)
        strategy = ldb.DiffusionBlocksStrategy(groups_to_train=[group])
        trainer = L.Trainer(strategy=strategy, max_steps=2, **trainer_kwargs(tmp_path / str(group)))
        trainer.fit(module, latent_loader("flux"))
        paths.append(tmp_path / f"job{group}.ckpt")
        trainer.save_checkpoint(paths[-1])
    merge_checkpoints(paths, tmp_path / "merged.ckpt")
    merged = ldb.DiffusionBlocksModule.load_from_checkpoint(tmp_path / "merged.ckpt")  # rebuilt from the record
    jobs = [torch.load(p, weights_only=True)["state_dict"] for p in paths]
    state = merged.state_dict()
    for key, group in (("network.net.model.transformer_blocks.0.attn.to_q.weight", 0),
                       ("network.net.model.single_transformer_blocks.0.proj_out.weight", 0),
                       ("network.net.model.single_transformer_blocks.1.proj_out.weight", 1),
                       ("network.net.model.single_transformer_blocks.2.proj_out.weight", 2),
                       ("network.stems.1.model.proj_out.weight", 2)):  # fmt: skip
        assert torch.equal(state[key], jobs[group][key]), key
        assert not torch.equal(jobs[group][key], jobs[(group + 1) % 3][key]), key  # only its own job moved it
    assert merged.sample(conditioning=text_conditioning(1, family="flux"), steps=3).shape == (1, 4, 8, 8)


@needs_diffusers
def test_previews_and_predictions_draw_from_a_batchs_conditioning() -> None:
    task = ldb.tasks.DDPM()
    module = ldb.DiffusionBlocksModule(wrapped("pixart"), task, num_blocks=3)
    batch = next(iter(latent_loader("pixart", n=4, batch_size=4)))
    with module.evaluating() as router:
        preview = task.preview(router, batch, per_row=2, max_rows=3, steps=2, guidance=2.0)
        predicted = task.predict_step(router, text_conditioning(2, family="pixart"), 0)
    assert preview.rows == 3
    assert preview.images is not None
    assert preview.images.shape == (6, 4, 8, 8)
    assert predicted.shape == (2, 4, 8, 8)
    assert torch.isfinite(preview.images).all()
