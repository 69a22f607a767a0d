"""EDM preconditioning inside the models (paper §1.7, App. B/C): the ConditioningAdapter's classifier readout
and the autoregressive TransformerLM feed c_in·z and c_noise = ¼ ln σ and read out D = c_out·norm(h) + c_skip·z;
the discrete targets they diffuse are L2-normalised embeddings."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import lightning_diffusionblocks as ldb
from tests.reference import SIGMA_DATA, close, coefficient_tensors, gen, layer_norm


class TokenBackbone(nn.Module):
    """A plain backbone: tokens in, identity blocks, tokens out (so the stack output is known)."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Identity() for _ in range(depth))

    def forward_features(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@torch.no_grad()
def randomise(*layers: nn.Linear, seed: int = 0) -> None:
    g = gen(seed)
    for layer in layers:
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.5)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.5)


def test_label_and_token_embeddings_are_l2_normalised() -> None:
    """Discrete targets (App. C, Dieleman et al.): the embeddings diffused and bridged are Ê = E/‖E‖ per row."""
    adapter = ldb.models.ConditioningAdapter(TokenBackbone(2), num_classes=5, dim=8)
    raw = adapter.label_embed.weight.detach().double()
    close(adapter(mode="embeddings"), raw / raw.norm(dim=-1, keepdim=True), rtol=1e-6)
    lm = ldb.models.TransformerLM(9, "autoregressive", dim=8, depth=2, heads=2, context_length=8)
    table = lm.target_table.detach().double()
    assert float((table.norm(dim=-1) - 1).abs().max()) > 0.5  # the raw table is far from unit norm: normalising matters
    close(lm(mode="embeddings"), table / table.norm(dim=-1, keepdim=True), rtol=1e-6)


ADAPTER_LAYOUTS = inspect.signature(ldb.models.ConditioningAdapter).parameters.get("layout")


@pytest.mark.parametrize("layout", ["token", "additive"])
def test_conditioning_adapter_readout(layout: str) -> None:
    """Classifier readout (official ViT code): stack gets c_in·z, c_noise = ¼ ln σ, D = c_out·norm(h) + c_skip·z."""
    if ADAPTER_LAYOUTS is None and layout != "token":
        pytest.skip("this ConditioningAdapter has only the token layout")
    dim, n, tokens, num_classes = 8, 5, 3, 4
    kwargs = {} if ADAPTER_LAYOUTS is None else {"layout": layout}
    adapter = ldb.models.ConditioningAdapter(TokenBackbone(2), num_classes=num_classes, dim=dim, **kwargs)
    randomise(adapter.final_ada, adapter.head)
    with torch.no_grad():
        if layout == "token":
            adapter.target_pos.copy_(torch.randn(1, 1, dim, generator=gen(1)))
        else:
            adapter.target_proj.weight.copy_(torch.randn(dim, dim, generator=gen(1)))
    seen: dict[str, Tensor] = {}
    adapter.noise_embed.register_forward_pre_hook(lambda m, a: seen.setdefault("c_noise", a[0].detach().clone()))
    adapter.backbone.blocks[0].register_forward_pre_hook(
        lambda m, a: seen.setdefault("stack_in", a[0].detach().clone())
    )
    inputs = torch.randn(n, tokens, dim, generator=gen(2))
    z = torch.randn(n, dim, generator=gen(3)) * 2
    sigma = torch.tensor([0.002, 0.2, 0.5, 3.0, 80.0])
    logits = adapter(inputs, z, sigma)
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1) for c in coefficient_tensors(sigma))
    close(seen["c_noise"], c_noise.view(-1), rtol=1e-6)
    target = c_in * z.double()  # the preconditioned noisy target
    if layout == "token":  # prepended as token 0 (+ its position); blocks are identities, so h = that token
        h = target + adapter.target_pos.detach().double()[0]
        close(seen["stack_in"][:, 0], h, rtol=1e-5, atol=1e-6)
        close(seen["stack_in"][:, 1:], inputs, rtol=0.0, atol=0.0)
    else:  # projected and added to every token; the readout is the mean token
        added = inputs.double() + (target @ adapter.target_proj.weight.double().T)[:, None, :]
        close(seen["stack_in"], added, rtol=1e-5, atol=1e-5)
        h = added.mean(1)
    denoised = c_out * layer_norm(h) + c_skip * z.double()
    with torch.no_grad():
        c = adapter.noise_embed(c_noise.view(-1).float()).double()
    shift, scale = (F.silu(c) @ adapter.final_ada.weight.double().T + adapter.final_ada.bias.double()).chunk(2, -1)
    expected = (denoised * (1 + scale) + shift) @ adapter.head.weight.double().T + adapter.head.bias.double()
    close(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["train", "next"])
def test_transformer_lm_autoregressive_preconditioning(mode: str) -> None:
    """AR LM (§1.7, App. B): token c_in·z, c_noise = ¼ ln σ to the noise embedding, D = c_out·norm(h) + c_skip·z."""
    vocab, dim, n, length = 9, 8, 4, 5
    net = ldb.models.TransformerLM(vocab, "autoregressive", dim=dim, depth=2, heads=2, context_length=8)
    randomise(net.final_ada, net.head)
    tokens = torch.randint(0, vocab, (n, length), generator=gen(1))
    width = length if mode == "train" else 1
    z = torch.randn(n, width, dim, generator=gen(2))
    sigma = torch.tensor([0.002, 0.3, 2.0, 80.0])
    stack_out = torch.randn(n, length + width, dim, generator=gen(3)) * 2
    seen: dict[str, Tensor] = {}

    def fake_stack(h: Tensor, allowed: Tensor | None, positions: Tensor, c: Tensor) -> Tensor:
        seen["h"] = h.detach().clone()
        return stack_out.clone()

    net.run_stack = fake_stack  # type: ignore[method-assign]
    net.noise_embed.register_forward_pre_hook(lambda m, a: seen.setdefault("c_noise", a[0].detach().clone()))
    logits = net(tokens, z, level=sigma, sigma_data=SIGMA_DATA, mode=mode)
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1) for c in coefficient_tensors(sigma))
    close(seen["c_noise"], c_noise.view(-1), rtol=1e-6)
    close(seen["h"][:, length:], c_in * z.double() + net.noisy_type.detach().double(), rtol=1e-5, atol=1e-6)
    denoised = c_out * layer_norm(stack_out[:, length:]) + c_skip * z.double()
    with torch.no_grad():
        c = net.noise_embed(c_noise.view(-1).float()).double()
    shift, scale = (F.silu(c) @ net.final_ada.weight.double().T + net.final_ada.bias.double()).chunk(2, -1)
    expected = (denoised * (1 + scale[:, None]) + shift[:, None]) @ net.head.weight.double().T + net.head.bias.double()
    close(logits, expected, rtol=1e-4, atol=1e-5)
