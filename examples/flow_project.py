"""Another user's rectified-flow Lightning project, written in the style of minRF (cloneofsimo/minRF): its own
small DiT whose ``forward(x, t, y)`` takes the continuous time t ∈ [0, 1] (t = 1 pure noise), a label table with
one extra "no label" row, logit-normal t, the velocity loss, and an Euler sampler with classifier-free guidance.

The README shows, as a diff, the lines that convert it to DiffusionBlocks; the test suite applies that diff and
runs the result. The network is not changed.
"""

import math

import lightning as L
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of 1000·t (t ∈ [0, 1])."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.modulation = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c))[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.attn(h, h, h, need_weights=False)[0]
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class FlowDiT(nn.Module):
    def __init__(self, in_channels: int = 1, input_size: int = 8, patch_size: int = 2, dim: int = 32,
                 n_layers: int = 6, n_heads: int = 2, num_classes: int = 10) -> None:  # fmt: skip
        super().__init__()
        self.in_channels, self.input_size, self.patch_size = in_channels, input_size, patch_size
        self.num_classes = num_classes  # label id num_classes = "no label"
        self.init_conv = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, (input_size // patch_size) ** 2, dim) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(64, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = nn.Embedding(num_classes + 1, dim)
        self.layers = nn.ModuleList(Block(dim, n_heads) for _ in range(n_layers))
        self.final = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, patch_size * patch_size * in_channels))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n, p, g = x.shape[0], self.patch_size, self.input_size // self.patch_size
        h = self.init_conv(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_mlp(timestep_embedding(t, 64)) + self.y_embedder(y)
        for layer in self.layers:
            h = layer(h, c)
        out = self.final(h).view(n, g, g, p, p, self.in_channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(n, self.in_channels, g * p, g * p)


class RF(L.LightningModule):
    """The project's end-to-end rectified flow: x_t = (1 − t)x + tε, logit-normal t, loss ‖v − (ε − x)‖²."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, p_uncond: float = 0.1) -> None:
        super().__init__()
        self.model, self.lr, self.p_uncond = model, lr, p_uncond

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        y = torch.where(torch.rand(y.shape, device=y.device) < self.p_uncond, self.model.num_classes, y)
        t = torch.sigmoid(torch.randn(x.shape[0], device=x.device))
        texp = t.view(-1, 1, 1, 1)
        z1 = torch.randn_like(x)
        zt = (1 - texp) * x + texp * z1
        loss = ((z1 - x - self.model(zt, t, y)) ** 2).mean()
        self.log("train_loss", loss)
        return loss

    @torch.no_grad()
    def sample(self, y: torch.Tensor, steps: int = 50, cfg: float = 2.0) -> torch.Tensor:
        z = torch.randn(y.shape[0], self.model.in_channels, self.model.input_size, self.model.input_size)
        null = torch.full_like(y, self.model.num_classes)
        for i in range(steps, 0, -1):
            t = torch.full((y.shape[0],), i / steps)
            vc, vu = self.model(z, t, y), self.model(z, t, null)
            z = z - (vu + cfg * (vc - vu)) / steps
        return z

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


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
    module = RF(FlowDiT())
    trainer = L.Trainer(max_steps=max_steps, **trainer_kwargs)
    trainer.fit(module, loader)
    return module


if __name__ == "__main__":
    main()
