"""Language models: masking schedule, clean‖noisy layout, backbones (ours, GPT-2, Llama), both tasks."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.masking import MaskingSchedule
from lightning_diffusionblocks.models import DecoderAdapter, TransformerLM
from lightning_diffusionblocks.models.diffusion_lm import autoregressive_mask
from lightning_diffusionblocks.routing import Router
from lightning_diffusionblocks.tasks import AutoregressiveLM, MaskedLM
from tests.conftest import trainer_kwargs

V, DIM = 12, 32
try:
    import transformers
except ImportError:  # the Hugging Face backbones are an optional extra; our own model is always tested
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="needs `pip install lightning-diffusionblocks[hf]`")


def own(objective: str, depth: int = 3, **kwargs: Any) -> nn.Module:
    return TransformerLM(V, objective, dim=DIM, depth=depth, heads=2, context_length=32, **kwargs)


def gpt2(objective: str, depth: int = 3, **kwargs: Any) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=V + 1, n_positions=32, n_embd=DIM, n_layer=depth, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return DecoderAdapter(transformers.GPT2Model(config), V, objective, **kwargs)


def llama(objective: str, depth: int = 3, impl: str = "sdpa", **kwargs: Any) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=V + 1, hidden_size=DIM, intermediate_size=64, num_hidden_layers=depth, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, attn_implementation=impl, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return DecoderAdapter(transformers.LlamaForCausalLM(config), V, objective, **kwargs)


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "own": own, "gpt2": gpt2, "llama": llama, "llama-eager": partial(llama, impl="eager"),
}  # fmt: skip


def params(*names: str) -> list:
    return [pytest.param(n, marks=() if n == "own" else needs_hf) for n in names]


def build(name: str, objective: str, depth: int = 3, seed: int = 0, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    net = BACKBONES[name](objective, depth, **kwargs)
    with torch.no_grad():  # leave the zero initialisation so the conditioning paths matter in the checks
        for module in net.modules():
            if isinstance(module, nn.Linear) and not module.weight.any():
                module.weight.normal_(0, 0.05)
    return net


def task_for(objective: str) -> ldb.tasks.Task:
    return MaskedLM(V) if objective == "masked" else AutoregressiveLM(V)


# ---------------------------------------------------------------------------- masking schedule
def test_masking_boundaries_are_equal_alpha_drops() -> None:
    s = MaskingSchedule()
    b = s.boundaries(3)
    assert b[1:].tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert s.group_range(b, 0) == pytest.approx((2 / 3, 1.0))  # group 0 = most masked
    lo, hi = s.group_range(b, 1, gamma=0.05)
    assert (lo, hi) == pytest.approx((1 / 3 - 0.05 / 3, 2 / 3 + 0.05 / 3))
    assert s.group_of(torch.tensor([0.9, 2 / 3, 0.5, 0.01], dtype=torch.float64), b).tolist() == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="equal drops of alpha"):
        s.boundaries(3, "uniform_log")


def test_masking_sample_is_stratified_inside_range() -> None:
    s = MaskingSchedule()
    t = s.sample(300, 0.2, 0.5, generator=torch.Generator().manual_seed(0))
    assert float(t.min()) >= 0.2
    assert float(t.max()) <= 0.5
    counts = torch.histc(t, bins=3, min=0.2, max=0.5)
    assert counts.tolist() == [100, 100, 100]
    assert s.grid(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_autoregressive_mask_layout() -> None:
    m = autoregressive_mask(3)
    clean, noisy = m[:3], m[3:]
    assert clean[:, :3].equal(torch.ones(3, 3, dtype=torch.bool).tril())
    assert not clean[:, 3:].any()
    assert noisy[:, :3].equal(torch.ones(3, 3, dtype=torch.bool).tril(-1))  # strictly before
    assert noisy[:, 3:].equal(torch.eye(3, dtype=torch.bool))


def test_rotary_scores_depend_only_on_relative_position() -> None:
    from lightning_diffusionblocks.models.dit import rotary_tables, rotate

    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i: int, j: int) -> float:
        cos, sin = rotary_tables(torch.tensor([i, j]), 8)
        return float((rotate(q, cos[:1], sin[:1]) * rotate(k, cos[1:], sin[1:])).sum())

    assert score(3, 1) == pytest.approx(score(13, 11), rel=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)
    with pytest.raises(ValueError, match="even width"):
        TransformerLM(V, dim=30, heads=2)


# ---------------------------------------------------------------------------- backbones: one harness
@pytest.mark.parametrize("name", params(*BACKBONES))
def test_autoregressive_layout_never_sees_the_future(name: str) -> None:
    net = build(name, "autoregressive").eval()
    tokens = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(1))
    z, sigma = torch.randn(2, 10, DIM), torch.tensor([0.3, 2.0])
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    diff = (net(tokens, z, level=sigma) - net(changed, z, level=sigma)).abs().amax(dim=(0, 2))
    assert diff[:7].max() == 0  # noisy i sees clean tokens < i only: position 6 predicts token 6 blind to it
    assert diff[7:].min() > 0
    z2 = z.clone()
    z2[:, 4] += 1.0
    diff = (net(tokens, z, level=sigma) - net(tokens, z2, level=sigma)).abs().amax(dim=(0, 2))
    assert diff[4] > 0
    assert diff[torch.arange(10) != 4].max() == 0  # noisy tokens never see each other


@pytest.mark.parametrize("name", params(*BACKBONES))
def test_next_mode_matches_the_training_layout(name: str) -> None:
    net = build(name, "autoregressive").eval()
    tokens = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(2))
    z, sigma = torch.randn(2, 8, DIM), torch.tensor([0.5, 0.05])
    full = net(tokens, z, level=sigma)
    nxt = net(tokens[:, :5], z[:, 5:6], level=sigma, mode="next")
    torch.testing.assert_close(nxt[:, 0], full[:, 5], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", params(*BACKBONES))
def test_masked_objective_is_bidirectional_and_conditioned_on_t(name: str) -> None:
    net = build(name, "masked").eval()
    tokens = torch.randint(0, V + 1, (2, 8), generator=torch.Generator().manual_seed(3))  # V = mask id
    t = torch.tensor([0.3, 0.8])
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % (V + 1)
    out = net(tokens, level=t)
    assert out.shape == (2, 8, V)
    assert (out - net(changed, level=t)).abs().amax(dim=(0, 2))[0] > 0  # the first position sees the last
    assert (out - net(tokens, level=t + 0.1)).abs().max() > 0


@pytest.mark.parametrize("name", params("gpt2", "llama"))
def test_untrained_adapter_leaves_the_backbone_unchanged(name: str) -> None:
    torch.manual_seed(0)
    adapter = BACKBONES[name]("autoregressive")
    backbone = adapter.backbone
    inner = backbone.model if hasattr(backbone, "model") else backbone
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        hidden = inner(input_ids=ids).last_hidden_state  # hooks are inactive outside the adapter
        reference = {k: v.clone() for k, v in backbone.state_dict().items() if "noise_modulation" not in k}
        fresh = BACKBONES[name]("autoregressive").backbone
        fresh.load_state_dict(reference, strict=False)
        inner_fresh = fresh.model if hasattr(fresh, "model") else fresh
        torch.testing.assert_close(inner_fresh(input_ids=ids).last_hidden_state, hidden)
        # zero-initialised modulation: the modulated stack computes what the plain stack computes
        h = adapter.embed_tokens(ids)
        c = torch.randn(2, DIM)
        positions = torch.arange(6)
        causal = torch.ones(6, 6, dtype=torch.bool).tril()
        modulated = adapter.run_stack(h, causal, positions, c)
        plain = adapter.run_stack(h, causal, positions, torch.zeros(2, DIM))
        torch.testing.assert_close(modulated, plain)


# ---------------------------------------------------------------------------- training through the strategy
def token_loader(n: int = 48, length: int = 12, batch_size: int = 8, pattern: bool = False) -> DataLoader:
    if pattern:  # counting sequences k, k+1, k+2, … (mod V): fully predictable from the first token
        start = torch.arange(n) % V
        data = (start[:, None] + torch.arange(length)[None]) % V
    else:
        data = torch.randint(0, V, (n, length), generator=torch.Generator().manual_seed(0))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


@pytest.mark.parametrize("objective", ["masked", "autoregressive"])
@pytest.mark.parametrize("name", params("own", "gpt2", "llama"))
def test_blockwise_step_trains_one_group_only(tmp_path: Path, name: str, objective: str) -> None:
    net = build(name, objective, depth=3)
    module = ldb.DiffusionBlocksModule(net, task_for(objective), num_blocks=3, lr=1e-2, gradient_clip_val=1.0)
    before = [torch.cat([p.detach().flatten().clone() for p in module.network.group_parameters(g)]) for g in range(3)]
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=1, **trainer_kwargs(tmp_path))
    trainer.fit(module, token_loader())
    after = [torch.cat([p.detach().flatten() for p in module.network.group_parameters(g)]) for g in range(3)]
    changed = [not torch.equal(b, a) for b, a in zip(before, after)]
    assert changed == [g == module.last_group for g in range(3)]
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


class GroupSpy:
    """Wraps the routers a module hands its task to record which groups are called."""

    def __init__(self, module: ldb.DiffusionBlocksModule) -> None:
        self.calls: list[int | None] = []
        original = module.router

        def router(network=None):  # noqa: ANN001, ANN202
            routed = original(network)
            inner = routed._run_group

            def run_group(group: int | None):  # noqa: ANN202
                self.calls.append(group)
                return inner(group)

            routed._run_group = run_group
            return routed

        module.router = router  # type: ignore[method-assign]


def test_generation_calls_only_the_owning_group_per_step() -> None:
    module = ldb.DiffusionBlocksModule(build("own", "autoregressive"), AutoregressiveLM(V), num_blocks=3)
    spy = GroupSpy(module)
    module.generate([1, 2], max_new_tokens=2)
    model_calls = [g for g in spy.calls if g is not None]
    assert model_calls.count(0) >= 2
    assert model_calls[-3:] in ([0, 1, 2], [1, 2, 2], [0, 2, 2])
    assert set(model_calls) == {0, 1, 2}
    mdm = ldb.DiffusionBlocksModule(build("own", "masked"), MaskedLM(V), num_blocks=3)
    spy = GroupSpy(mdm)
    mdm.generate(num_samples=2, length=6, steps=3)
    assert spy.calls == [0, 1, 2]


def test_masked_nelbo_routes_every_t_to_its_group() -> None:
    module = ldb.DiffusionBlocksModule(build("own", "masked"), MaskedLM(V), num_blocks=3)
    spy = GroupSpy(module)
    batch = next(iter(token_loader()))
    metrics = module.evaluate_batch(batch, samples=6)
    assert sorted(spy.calls) == [0, 0, 1, 1, 2, 2]  # 6 strata, two per group, each a single group
    assert torch.allclose(metrics["bits_per_token"], metrics["nelbo"] / math.log(2))
    assert (metrics["nelbo"] > 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["masked", "autoregressive"])
@pytest.mark.parametrize("strategy", ["diffusionblocks", "auto"])
def test_learns_a_predictable_sequence(tmp_path: Path, objective: str, strategy: str) -> None:
    torch.manual_seed(0)
    net = TransformerLM(V, objective, dim=48, depth=3, heads=2, context_length=32)
    module = ldb.DiffusionBlocksModule(
        net, task_for(objective), num_blocks=3, lr=3e-3, gradient_clip_val=1.0, warmup_steps=20
    )
    trainer = L.Trainer(strategy=strategy, max_steps=600 if strategy == "diffusionblocks" else 200,
                        **trainer_kwargs(tmp_path))  # fmt: skip
    loader = token_loader(n=96, length=12, batch_size=16, pattern=True)
    trainer.fit(module, loader)
    batch = next(iter(loader))
    metrics = module.evaluate_batch(batch)
    if objective == "masked":
        # uniform guessing costs log2(12) = 3.58 bits per token; the pattern needs far less
        assert float(metrics["bits_per_token"].mean()) < 1.3
        out = module.generate(prompt=[5], num_samples=4, length=8, steps=8)
        assert (out[:, 0] == 5).all()
        assert (out < V).all()  # every mask revealed
    else:
        assert float(metrics["accuracy_chain"].mean()) > 0.75  # chance 1/12; position 0 is unpredictable
        out = module.generate([3, 4], max_new_tokens=6)[0]
        assert ((out[1:] - out[:-1]) % V == 1).sum() >= 5  # of 7 steps


def test_masked_sampler_with_a_perfect_denoiser_reproduces_the_data() -> None:
    """A fake network that knows the answer (token i = prompt + i) once any token is visible: the sampler
    must reveal every position exactly once, keep the prompt, and call each group for its own times."""
    task, calls, revealed = MaskedLM(V), [], []

    def run_group(group: int | None):  # noqa: ANN202
        def run(tokens: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
            calls.append((group, float(level[0])))
            revealed.append(int((tokens != V).sum()))
            answer = (tokens[:, :1] + torch.arange(tokens.shape[1])) % V
            return torch.nn.functional.one_hot(answer, V).float() * 20

        return run

    schedule = MaskingSchedule()
    bounds = schedule.boundaries(3)
    router = Router(run_group, schedule, bounds)
    out = task.generate(router, prompt=[4], num_samples=3, length=10, steps=6, temperature=0)
    assert out.tolist() == [[(4 + i) % V for i in range(10)]] * 3
    assert [g for g, _ in calls] == [0, 0, 1, 1, 2, 2]
    assert revealed == sorted(revealed)  # unmasking only ever reveals


# ---------------------------------------------------------------------------- bad input
def test_token_ids_outside_the_vocabulary_are_refused() -> None:
    module = ldb.DiffusionBlocksModule(build("own", "autoregressive"), AutoregressiveLM(V), num_blocks=3)
    bad = torch.tensor([[1, 2, V]])
    with pytest.raises(ValueError, match=r"Token ids must be in \[0, 12\)"):
        module.group_loss(module.network, bad, 0, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"Token ids must be in \[0, 12\)"):
        module.generate([1, -1])
    with pytest.raises(ValueError, match="Token ids must be in"):
        build("own", "masked")(torch.tensor([[V + 1]]), level=torch.tensor([0.5]))


@needs_hf
def test_sequences_longer_than_the_context_are_refused() -> None:
    net = build("own", "masked")
    with pytest.raises(ValueError, match="longer than the model's context of 32"):
        net(torch.zeros(1, 33, dtype=torch.long), level=torch.tensor([0.5]))
    module = ldb.DiffusionBlocksModule(build("gpt2", "autoregressive"), AutoregressiveLM(V), num_blocks=3)
    with pytest.raises(ValueError, match="longer than the model's context"):
        module.evaluate_batch(torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="Shorten the prompt"):
        module.generate(torch.zeros(32, dtype=torch.long), max_new_tokens=1)
    # generating past the context keeps the last context_length - 1 tokens
    assert module.generate(torch.zeros(30, dtype=torch.long), max_new_tokens=4).shape == (1, 34)


def test_empty_prompts_and_zero_steps_are_refused() -> None:
    ar = ldb.DiffusionBlocksModule(build("own", "autoregressive"), AutoregressiveLM(V), num_blocks=3)
    with pytest.raises(ValueError, match="prompt is empty"):
        ar.generate([], max_new_tokens=3)
    with pytest.raises(ValueError, match="needs a prompt"):
        ar.generate(None, max_new_tokens=3)
    with pytest.raises(ValueError, match="at least 1 diffusion step"):
        ar.generate([1], max_new_tokens=1, steps=-1)
    mdm = ldb.DiffusionBlocksModule(build("own", "masked"), MaskedLM(V), num_blocks=3)
    with pytest.raises(ValueError, match="prompt is empty"):
        mdm.generate([], num_samples=1, length=4)
    with pytest.raises(ValueError, match="at least 1 step"):
        mdm.generate(num_samples=1, length=4, steps=0)  # 0 is refused, not replaced by the default
    with pytest.raises(ValueError, match="at least 1 diffusion step"):
        ar.evaluate_batch(torch.zeros(1, 4, dtype=torch.long), steps=0)
    with pytest.raises(ValueError, match="at least 1 masking time"):
        mdm.evaluate_batch(torch.zeros(1, 4, dtype=torch.long), samples=0)


@needs_hf
def test_adapter_configuration_errors() -> None:
    config = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=DIM, n_layer=2, n_head=2)
    with pytest.raises(ValueError, match="vocab_size >= 13"):
        DecoderAdapter(transformers.GPT2Model(config), V, "masked")  # no room for the mask token
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16,
    )  # fmt: skip
    backbone = transformers.LlamaModel(config)
    backbone.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa' or 'eager'"):
        DecoderAdapter(backbone, V)
    net = TransformerLM(V, "autoregressive", dim=DIM, depth=3, heads=2, learn_target_embedding=True)
    with pytest.raises(ValueError, match="learn_target_embedding=False"):
        ldb.DiffusionBlocksModule(net, AutoregressiveLM(V), num_blocks=3)
    ldb.DiffusionBlocksModule(net, AutoregressiveLM(V), num_blocks=3, stem="shared")  # the safe combination
    with pytest.raises(ValueError, match="equal drops of alpha"):
        ldb.DiffusionBlocksModule(build("own", "masked"), MaskedLM(V), num_blocks=3, partition="uniform_log")


# ---------------------------------------------------------------------------- autoregressive target embedding
def input_table(name: str, net: nn.Module) -> torch.Tensor:
    """The input token embedding f_in, read from where each model keeps it (not through the package's helper)."""
    return net.tok_embed.weight if name == "own" else net.backbone.wte.weight


@pytest.mark.parametrize("name", params("own", "gpt2"))
def test_input_target_embedding_is_the_normalised_input_table(name: str) -> None:
    net = build(name, "autoregressive", target_embedding="input")
    assert "target_table" not in dict(net.named_parameters())
    assert "target_table" not in dict(net.named_buffers())
    expected = input_table(name, net)[:V] / input_table(name, net)[:V].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(net(mode="embeddings"), expected)


@pytest.mark.parametrize("name", params("own", "gpt2"))
def test_input_target_embedding_is_trained_through_the_target_path(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the clean-token path cut off from the table, the AR loss still reaches it: through the targets."""
    net = build(name, "autoregressive", target_embedding="input")
    table = input_table(name, net)
    monkeypatch.setattr(net, "embed_tokens", lambda tokens: F.embedding(tokens, table.detach()))
    tokens = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.05, 0.3, 1.0, 4.0])
    loss = AutoregressiveLM(V).loss(net, tokens, sigma, torch.Generator().manual_seed(1)).sum()
    loss.backward()
    assert table.grad is not None
    assert table.grad[tokens.unique()].abs().sum(-1).min() > 0  # every target row seen gets a gradient


@pytest.mark.parametrize("choice", ["input", "learned"])
def test_trained_target_embedding_refuses_per_group_stems(choice: str) -> None:
    net = own("autoregressive", target_embedding=choice)
    with pytest.raises(ValueError, match="stem='shared'"):
        ldb.DiffusionBlocksModule(net, AutoregressiveLM(V), num_blocks=3)  # the default stem is per group
    ldb.DiffusionBlocksModule(net, AutoregressiveLM(V), num_blocks=3, stem="shared")


def test_target_embedding_option_and_legacy_flag() -> None:
    assert own("autoregressive", learn_target_embedding=True).target_embedding == "learned"
    assert own("autoregressive", learn_target_embedding=False, target_embedding="random").target_embedding == "random"
    with pytest.raises(ValueError, match="pass only target_embedding='input'"):
        own("autoregressive", learn_target_embedding=True, target_embedding="input")
    with pytest.raises(ValueError, match="pass only target_embedding='learned'"):
        own("autoregressive", learn_target_embedding=False, target_embedding="learned")
    with pytest.raises(ValueError, match="must be one of"):
        own("autoregressive", target_embedding="output")
    with pytest.raises(ValueError, match="objective='autoregressive' only"):
        own("masked", target_embedding="input")


def test_default_target_table_is_the_seeded_random_buffer_and_old_state_dicts_load() -> None:
    net = own("autoregressive")
    old_table = torch.randn(V, DIM, generator=torch.Generator().manual_seed(0))  # target_seed 0, as before
    assert torch.equal(dict(net.named_buffers())["target_table"], old_table)
    assert "target_table" not in dict(net.named_parameters())
    torch.testing.assert_close(net(mode="embeddings"), F.normalize(old_table, dim=-1))
    saved = net.state_dict()
    torch.manual_seed(123)
    fresh = own("autoregressive", learn_target_embedding=False)  # the legacy spelling builds the same layout
    fresh.load_state_dict(saved)  # strict: same keys, target_table included
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in saved.items())
    learned = own("autoregressive", learn_target_embedding=True).state_dict()
    own("autoregressive", target_embedding="learned").load_state_dict(learned)  # a learned table keeps its key


def test_short_fit_with_the_input_target_embedding(tmp_path: Path) -> None:
    net = build("own", "autoregressive", target_embedding="input")
    module = ldb.DiffusionBlocksModule(net, AutoregressiveLM(V), num_blocks=3, stem="shared", lr=1e-2,
                                       gradient_clip_val=1.0)  # fmt: skip
    before = net.tok_embed.weight.detach().clone()
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=4, **trainer_kwargs(tmp_path))
    trainer.fit(module, token_loader())
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert not torch.equal(before, net.tok_embed.weight)  # the shared stem trains f_in every step
    torch.testing.assert_close(net(mode="embeddings"), F.normalize(net.tok_embed.weight, dim=-1))
    metrics = module.evaluate_batch(next(iter(token_loader())))
    assert torch.isfinite(metrics["ce_chain"]).all()
    assert module.generate([1, 2], max_new_tokens=2).shape == (1, 4)


@needs_hf
def test_ema_copy_of_an_adapter_uses_its_own_weights(tmp_path: Path) -> None:
    module = ldb.DiffusionBlocksModule(
        build("gpt2", "autoregressive"), AutoregressiveLM(V), num_blocks=3, lr=1e-2, ema_decay=0.5
    )
    L.Trainer(strategy="diffusionblocks", max_steps=4, **trainer_kwargs(tmp_path)).fit(module, token_loader())
    tokens = torch.randint(0, V, (2, 6))
    z, sigma = torch.randn(2, 6, DIM), torch.tensor([0.4, 0.4])
    live = module.network(tokens, z, level=sigma, group=2)
    ema = module.ema_network(tokens, z, level=sigma, group=2)
    assert not torch.allclose(live, ema)
    assert module.generate([1, 2], max_new_tokens=2).shape == (1, 4)
