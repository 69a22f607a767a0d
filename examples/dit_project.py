"""Another user's Lightning project, written in the style of the reference DiT code: its own DiT with
``input_size``/``in_channels``, a label table with one extra "no label" row, a keyword-only label argument,
its own EDM LightningModule and its own EMA callback.

The README shows, as a diff, the lines that convert it to DiffusionBlocks; the test suite applies that
diff and runs the result. The network is not changed.
"""

import copy

import lightning as L
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq: int = 64) -> None:
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq // 2
        k = torch.exp(-torch.arange(half, device=t.device) * (9.2 / half))
        angles = 100 * t.float()[:, None] * k[None]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))


class LabelEmbedder(nn.Module):
    """Class table with a last row for "no label" (classifier-free guidance)."""

    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class DiTLayer(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(hidden, elementwise_affine=False)
        self.ff = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.adaLN_modulation = nn.Linear(hidden, 6 * hidden)  # noqa: N815 - the reference code's name
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        s1, c1, g1, s2, c2, g2 = self.adaLN_modulation(F.silu(cond))[:, None].chunk(6, dim=-1)
        a = self.ln1(h) * (1 + c1) + s1
        h = h + g1 * self.attn(a, a, a, need_weights=False)[0]
        return h + g2 * self.ff(self.ln2(h) * (1 + c2) + s2)


class DiT(nn.Module):
    def __init__(self, input_size: int = 8, patch_size: int = 2, in_channels: int = 1, hidden: int = 32,
                 depth: int = 6, heads: int = 2, num_classes: int = 10) -> None:  # fmt: skip
        super().__init__()
        self.input_size, self.in_channels, self.patch_size = input_size, in_channels, patch_size
        tokens = (input_size // patch_size) ** 2
        self.x_embedder = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.zeros(1, tokens, hidden))
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(num_classes, hidden)
        self.layers = nn.ModuleList(DiTLayer(hidden, heads) for _ in range(depth))
        self.final = nn.Linear(hidden, patch_size * patch_size * in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        n, p, g = x.shape[0], self.patch_size, self.input_size // self.patch_size
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos
        cond = self.t_embedder(t) + self.y_embedder(y)
        for layer in self.layers:
            h = layer(h, cond)
        out = self.final(h).view(n, g, g, p, p, self.in_channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(n, self.in_channels, g * p, g * p)


class EDMTraining(L.LightningModule):
    """The project's end-to-end EDM training (label dropout to the extra row, for guidance)."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, p_uncond: float = 0.1) -> None:
        super().__init__()
        self.model, self.lr, self.p_uncond = model, lr, p_uncond

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        y = torch.where(torch.rand(y.shape, device=y.device) < self.p_uncond, self.model.y_embedder.num_classes, y)
        sigma = (torch.randn(x.shape[0], device=x.device) * 1.2 - 1.2).exp()
        s = sigma.view(-1, 1, 1, 1)
        z = x + s * torch.randn_like(x)
        scale = (s**2 + 0.25).sqrt()
        denoised = 0.25 / scale**2 * z + s * 0.5 / scale * self.model(z / scale, sigma.log() / 4, y=y)
        loss = (scale**2 / (0.5 * s) ** 2 * (denoised - x) ** 2).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class EMACallback(L.Callback):
    """The project's own weight EMA, kept beside the LightningModule."""

    def __init__(self, decay: float = 0.99) -> None:
        self.decay, self.shadow = decay, None

    def on_fit_start(self, trainer, pl_module):  # noqa: ANN001, ANN201
        self.shadow = copy.deepcopy(pl_module).requires_grad_(False)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
        for avg, live in zip(self.shadow.parameters(), pl_module.parameters()):
            avg.lerp_(live, 1 - self.decay)


def blobs(n: int = 256) -> TensorDataset:
    """Class-dependent 8×8 blobs in [-1, 1]."""
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (n,), generator=g)
    grid = torch.linspace(-1, 1, 8)
    centres = torch.rand(10, 2, generator=g) * 1.6 - 0.8
    d2 = (grid[None, :, None] - centres[y, 0, None, None]) ** 2 + (grid[None, None, :] - centres[y, 1, None, None]) ** 2
    return TensorDataset((2 * torch.exp(-8 * d2) - 1)[:, None], y)


def main(max_steps: int = 200, **trainer_kwargs) -> L.LightningModule:  # noqa: ANN003
    loader = DataLoader(blobs(), batch_size=32, shuffle=True)
    module = EDMTraining(DiT())
    trainer = L.Trainer(max_steps=max_steps, callbacks=[EMACallback()], **trainer_kwargs)
    trainer.fit(module, loader)
    return module


if __name__ == "__main__":
    main()
