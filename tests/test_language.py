"""Language models: clean‖noisy layout, backbones (ours, GPT-2, Llama), both tasks, and the autoregressive bridge's
formulas (the masking schedule and MaskedLM's formulas are in test_masking.py)."""

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
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.masking import MaskingSchedule
from lightning_diffusionblocks.models import DecoderAdapter, TransformerLM
from lightning_diffusionblocks.models.diffusion_lm import autoregressive_mask
from lightning_diffusionblocks.routing import Router
from lightning_diffusionblocks.tasks import AutoregressiveLM, MaskedLM
from tests.conftest import trainer_kwargs
from tests.fakes import FACTORS, Declares, FakeMaskedLM, Recorder, Scale
from tests.reference import SIGMA_MAX, close, cross_entropy, edm_boundaries, edm_grid, gen, owner, weight

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


# ---------------------------------------------------------------------------- attention layout
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
def test_untrained_decoder_adapter_leaves_the_hf_backbone_unchanged(name: str) -> None:
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


# -------------- the AutoregressiveLM bridge against the paper's equations (tests/reference.py), and both language tasks


def test_autoregressive_lm_loss() -> None:
    """AR (§5.4, App. B): targets Ê[x_i] (normalised rows), z = Ê[x] + σε, λ(σ)·mean_i CE_i per sequence."""
    vocab, dim, n, length = 7, 4, 5, 6
    table = F.normalize(torch.randn(vocab, dim, generator=gen(0)), dim=-1)
    tokens = torch.randint(0, vocab, (n, length), generator=gen(1))
    sigma = torch.tensor([0.002, 0.1, 0.6, 4.0, 80.0])
    logits = torch.randn(n, length, vocab, generator=gen(2)) * 2
    run = Recorder(logits, table)
    loss = AutoregressiveLM(vocab).loss(run, tokens, sigma, gen(11))
    eps = torch.randn(n, length, dim, generator=gen(11)).double()
    args, kwargs = run.calls[0]
    assert torch.equal(args[0], tokens)
    close(args[1], table[tokens].double() + sigma.double().view(-1, 1, 1) * eps, rtol=1e-5, atol=1e-6)
    close(kwargs["level"], sigma, rtol=0.0, atol=0.0)
    expected = weight(sigma) * cross_entropy(logits, tokens).mean(1)
    close(loss, expected, rtol=1e-5)


KAPPA = 4.0


class FakeARLM(nn.Module):
    """logits = κ·s_g·z·Êᵀ (+ bias[last context token] when generating); ``mode="embeddings"`` gives Ê."""

    def __init__(self, vocab: int = 7, dim: int = 5, context_length: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Scale(f) for f in FACTORS)
        self.context_length = context_length
        self.table = F.normalize(torch.randn(vocab, dim, generator=gen(0)), dim=-1)
        self.bias = torch.randn(vocab, vocab, generator=gen(1)) * 2
        self.calls: list[dict[str, Any]] = []

    def forward(
        self, tokens: Tensor | None = None, z: Tensor | None = None, level: Tensor | None = None,
        sigma_data: float = 0.5, mode: str = "train",
    ) -> Tensor:  # fmt: skip
        if mode == "embeddings":
            return self.table.clone()
        assert tokens is not None
        assert z is not None
        assert level is not None
        self.calls.append({"tokens": tokens.clone(), "z": z.clone(), "level": level.clone(), "mode": mode})
        h = z
        for block in self.blocks:
            h = block(h)
        logits = KAPPA * h @ self.table.T
        return logits + self.bias[tokens[:, -1]][:, None, :] if mode == "next" else logits


def ar_logits(net: FakeARLM, z: Tensor, sigma: float, last: Tensor | None) -> Tensor:
    logits = KAPPA * FACTORS[owner(sigma, edm_boundaries(3))] * z @ net.table.double().T
    return logits if last is None else logits + net.bias.double()[last][:, None, :]


@pytest.mark.parametrize("steps", [None, 5])
def test_autoregressive_generation_chain(steps: int | None) -> None:
    """AR generation (§5.4): per token z_0 ~ N(0, σ_max²), routed Euler toward softmax(logits)·Ê, greedy last logits."""
    net = FakeARLM()
    module = ldb.DiffusionBlocksModule(net, AutoregressiveLM(7), num_blocks=3)
    prompt = torch.tensor([[1, 4], [2, 2], [6, 0]])
    new = 4
    out = module.generate(prompt, steps=steps, max_new_tokens=new, seed=5)
    sigmas = edm_grid(steps or 3)  # default: B steps
    assert len(net.calls) == new * len(sigmas)
    x, table, starts = prompt.clone(), net.table.double(), []
    for i in range(new):
        chain = net.calls[i * len(sigmas) : (i + 1) * len(sigmas)]
        z = chain[0]["z"].double()
        starts.append(z)
        logits = None
        for k, (call, s) in enumerate(zip(chain, sigmas)):
            assert call["mode"] == "next"
            assert torch.equal(call["tokens"], x)
            close(call["z"], z, rtol=1e-4, atol=1e-5)
            close(call["level"], torch.full((3,), s), rtol=1e-6, atol=0.0)
            logits = ar_logits(net, z, s, x[:, -1])
            if k + 1 < len(sigmas):
                z = z + (sigmas[k + 1] - s) * (z - logits.softmax(-1) @ table) / s
        assert logits is not None
        x = torch.cat([x, logits[:, 0].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, x)
    spread = float(torch.cat(starts).std())
    assert 0.7 * SIGMA_MAX < spread < 1.3 * SIGMA_MAX


def test_autoregressive_evaluation_chain() -> None:
    """AR evaluation: teacher-forced CE of the σ_max logits and of the chain's last logits (routed Euler), and the
    greedy accuracy after every step of the chain."""
    net = FakeARLM()
    module = ldb.DiffusionBlocksModule(net, AutoregressiveLM(7), num_blocks=3)
    tokens = torch.randint(0, 7, (4, 6), generator=gen(2))
    metrics = module.evaluate_batch(tokens, steps=3, seed=0)
    sigmas, table = edm_grid(3), net.table.double()
    assert len(net.calls) == 3
    assert sorted(k for k in metrics if k.startswith("accuracy_step_")) == [f"accuracy_step_{k}" for k in range(3)]
    z = net.calls[0]["z"].double()
    first = last = None
    for k, (call, s) in enumerate(zip(net.calls, sigmas)):
        close(call["z"], z, rtol=1e-4, atol=1e-5)
        last = ar_logits(net, z, s, None)
        first = last if first is None else first
        close(metrics[f"accuracy_step_{k}"], (last.argmax(-1) == tokens).double().mean(1), rtol=0.0, atol=1e-6)
        if k + 1 < len(sigmas):
            z = z + (sigmas[k + 1] - s) * (z - last.softmax(-1) @ table) / s
    assert first is not None
    assert last is not None
    close(metrics["ce_sigma_max"], cross_entropy(first, tokens).mean(1), rtol=1e-4)
    close(metrics["ce_chain"], cross_entropy(last, tokens).mean(1), rtol=1e-4)
    close(metrics["accuracy_chain"], (last.argmax(-1) == tokens).double().mean(1), rtol=0.0, atol=1e-6)


def test_language_validation_and_prediction_use_the_batch_index_as_seed() -> None:
    """MaskedLM and AutoregressiveLM: validation metrics are the batch means of evaluate_batch(seed=batch index),
    predict_step its per-sequence values; a 1-tuple or (tokens, extra) batch reads the tokens."""
    vocab, num_groups = 6, 3
    tokens = torch.randint(0, vocab, (4, 12), generator=gen(1))
    masked = ldb.DiffusionBlocksModule(
        FakeMaskedLM(vocab, num_groups, torch.randn(num_groups, vocab, generator=gen(0)) * 2),
        MaskedLM(vocab),
        num_blocks=num_groups,
    )
    ar = ldb.DiffusionBlocksModule(FakeARLM(vocab), AutoregressiveLM(vocab), num_blocks=3)
    for module in (masked, ar):
        task, router = module.task, module.router()
        reference = task.evaluate_batch(router, tokens, seed=5)
        assert any(not torch.equal(v, task.evaluate_batch(router, tokens, seed=0)[k]) for k, v in reference.items())
        for batch in (tokens, (tokens,), (tokens, torch.zeros(4))):
            metrics = task.validation_metrics(router, batch, 5)
            assert set(metrics) == set(reference)
            for name, value in metrics.items():
                close(value, reference[name].mean(), rtol=1e-6, atol=1e-7)
            for name, value in task.predict_step(router, batch, 5).items():
                close(value, reference[name], rtol=1e-6, atol=1e-7)


def test_language_tasks_check_the_network_they_bind() -> None:
    """MaskedLM and AutoregressiveLM refuse a network of the other objective or another vocabulary, and read its
    context length (None when it declares none)."""
    cases = ((MaskedLM(5), "masked", "autoregressive"), (AutoregressiveLM(5), "autoregressive", "masked"))
    for task, objective, other in cases:
        wrong = rf"^The network was built with objective='{other}' but the task trains objective='{objective}';"
        with pytest.raises(ValueError, match=wrong + rf" build it with objective='{objective}'\.$"):
            task.bind(Declares(objective=other))
        with pytest.raises(
            ValueError, match=r"^The network reads out 6 tokens but the task has vocab_size=5; use one\.$"
        ):
            task.bind(Declares(vocab_size=6))
        task.bind(Declares(objective=objective, vocab_size=5, context_length=9))
        assert task.context_length == 9
        task.bind(Declares())
        assert task.context_length is None


def test_token_batches_are_checked() -> None:
    """Language-model batches are (N, L) int64/int32 ids in [0, vocab_size); anything else is refused, by shape."""
    task = MaskedLM(5)
    assert task.batch_size(torch.zeros(3, 4, dtype=torch.int32)) == 3
    cases = ((torch.zeros(3, 4), r"\(3, 4\)"), (torch.zeros(4, dtype=torch.long), r"\(4,\)"), ([[1, 2]], "list"))
    for bad, shown in cases:
        with pytest.raises(
            ValueError, match=rf"^Language-model batches must be \(N, L\) integer token ids, got {shown}\.$"
        ):
            task.batch_size(bad)
    with pytest.raises(
        ValueError,
        match=r"^Token ids must be in \[0, 5\); the batch has ids in \[0, 5\]\. Build the task and the model with"
        r" the tokenizer's vocab_size\.$",
    ):
        task.batch_size(torch.tensor([[0, 5]]))


def test_generate_names_its_own_arguments_when_refusing_them() -> None:
    """A non-integer ``steps`` or ``seed`` is refused naming the argument and generate(), not sample()."""
    module = ldb.DiffusionBlocksModule(FakeARLM(), AutoregressiveLM(7), num_blocks=3)
    prompt = torch.tensor([[1, 4]])
    with pytest.raises(TypeError, match=r"^steps must be an integer, got 2\.5 \(float\); e\.g\. generate\(steps="):
        module.generate(prompt, steps=2.5, max_new_tokens=1)
    with pytest.raises(TypeError, match=r"^seed must be an integer, got '1' \(str\); e\.g\. generate\(seed="):
        module.generate(prompt, max_new_tokens=1, seed="1")


def test_evaluate_batch_names_a_bad_seed() -> None:
    """The evaluation chain refuses a non-integer seed naming the argument and the call it checks for."""
    module = ldb.DiffusionBlocksModule(FakeARLM(), AutoregressiveLM(7), num_blocks=3)
    with pytest.raises(TypeError, match=r"^seed must be an integer, got 1\.5 \(float\); e\.g\. generate\(seed="):
        module.evaluate_batch(torch.tensor([[1, 4, 2], [2, 2, 6]]), seed=1.5)


def test_masked_lm_preview_is_unconditional_samples_as_long_as_the_batchs_rows() -> None:
    """``num_samples`` sequences by generate(), as long as the batch's rows (cut to the context) unless ``length`` is
    given, 4·B unmasking steps and temperature 1 unless given."""
    module = ldb.DiffusionBlocksModule(own("masked"), MaskedLM(V), num_blocks=3)
    task, router = module.task, module.router()
    tokens = torch.randint(0, V, (5, 40), generator=gen(0))
    for batch, options, length, steps in (
        (tokens, {}, 32, 12),  # 40 tokens a row, 32 in the context
        (tokens[:, :10], {"num_samples": 2, "steps": 3, "temperature": 0.5, "seed": 7}, 10, 3),
        (tokens[:, :10], {"num_samples": 3, "length": 6, "steps": 2, "temperature": 0.0}, 6, 2),
    ):
        preview = task.preview(router, batch, **options)
        want = task.generate(router, num_samples=options.get("num_samples", 4), length=length, steps=steps,
                             temperature=options.get("temperature", 1.0), seed=options.get("seed", 0))  # fmt: skip
        assert preview.tokens == want.tolist()
        assert preview.caption == f"MaskedLM: unconditional samples, {length} tokens, {steps} unmasking steps"
        assert (preview.images, preview.prompt_length, preview.text) == (None, 0, None)


def test_autoregressive_preview_continues_the_first_tokens_of_the_batchs_first_rows() -> None:
    """The first ``prompt_length`` tokens (at least 1, at most the row and the context less one) of the batch's first
    ``num_samples`` rows, continued by ``max_new_tokens`` tokens; B steps a token and greedy decoding unless given."""
    module = ldb.DiffusionBlocksModule(own("autoregressive"), AutoregressiveLM(V), num_blocks=3)
    task, router = module.task, module.router()
    tokens = torch.randint(0, V, (6, 40), generator=gen(1))
    for batch, options, prompt, steps, new in (
        (tokens, {}, 16, 3, 48),
        (tokens, {"prompt_length": 35, "max_new_tokens": 2}, 31, 3, 2),  # the context holds 32: 31 + the next
        (tokens[:, :5], {"num_samples": 2, "prompt_length": 8, "max_new_tokens": 3, "steps": 2}, 5, 2, 3),
        (tokens, {"num_samples": 3, "prompt_length": 0, "max_new_tokens": 4, "temperature": 0.8, "seed": 5}, 1, 3, 4),
    ):
        preview = task.preview(router, batch, **options)
        rows = batch[: options.get("num_samples", 4)]
        want = task.generate(router, rows[:, :prompt], max_new_tokens=new, steps=steps,
                             temperature=options.get("temperature", 0.0), seed=options.get("seed", 0))  # fmt: skip
        assert preview.tokens == want.tolist()
        assert preview.prompt_length == prompt
        assert preview.caption == f"AutoregressiveLM: prompt of {prompt} tokens | {new} generated, {steps} steps each"
