"""Another user's DDPM Lightning project, in the style of the classic "DDPM from scratch" tutorials: a linear β
schedule over 1000 integer timesteps, ε-prediction with the simple MSE loss, its own residual conv network whose
``forward(x, t, class_labels)`` receives integer timesteps, label dropout to an extra "no label" row, and an
ancestral sampler.

The README shows, as a diff, the lines that convert it to DiffusionBlocks; the test suite applies that diff and
runs the result. The network is not changed.
"""

import math

import lightning as L
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class SinusoidalPositionEmbeddings(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=time.device) * -(math.log(10000) / (half - 1)))
        args = time.float()[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, with the time/class embedding added as a per-channel shift."""

    def __init__(self, channels: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, channels)
        self.norm2 = nn.GroupNorm(8, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.silu(self.norm1(h))) + self.emb(emb)[:, :, None, None]
        return h + self.conv2(F.silu(self.norm2(out)))


class NoisePredictor(nn.Module):
    def __init__(self, channels: int = 1, width: int = 32, depth: int = 6, num_classes: int = 10) -> None:
        super().__init__()
        self.time_mlp = nn.Sequential(SinusoidalPositionEmbeddings(width), nn.Linear(width, 4 * width), nn.GELU(),
                                      nn.Linear(4 * width, 4 * width))  # fmt: skip
        self.class_emb = nn.Embedding(num_classes + 1, 4 * width)  # the last row: "no label"
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.Sequential(*(ResBlock(width, 4 * width) for _ in range(depth)))
        self.out = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(t) + self.class_emb(class_labels)
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)


class DiffusionModel(L.LightningModule):
    """The project's end-to-end DDPM: x_t = √ᾱ_t x + √(1 − ᾱ_t) ε, predict ε."""

    def __init__(self, model: nn.Module, timesteps: int = 1000, lr: float = 1e-3, p_uncond: float = 0.1) -> None:
        super().__init__()
        self.model, self.timesteps, self.lr, self.p_uncond = model, timesteps, lr, p_uncond
        betas = torch.linspace(1e-4, 0.02, timesteps)
        self.register_buffer("betas", betas)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, dim=0))

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        null = self.model.class_emb.num_embeddings - 1
        y = torch.where(torch.rand(y.shape, device=y.device) < self.p_uncond, null, y)
        t = torch.randint(0, self.timesteps, (x.shape[0],), device=x.device)
        noise = torch.randn_like(x)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(self.model(a.sqrt() * x + (1 - a).sqrt() * noise, t, y), noise)
        self.log("train_loss", loss)
        return loss

    @torch.no_grad()
    def sample(self, y: torch.Tensor, shape: tuple[int, ...] = (1, 8, 8)) -> torch.Tensor:
        x = torch.randn(y.shape[0], *shape)
        for i in reversed(range(self.timesteps)):
            t = torch.full((y.shape[0],), i, dtype=torch.long)
            beta, a = self.betas[i], self.alphas_cumprod[i]
            mean = (x - beta / (1 - a).sqrt() * self.model(x, t, y)) / (1 - beta).sqrt()
            x = mean + beta.sqrt() * torch.randn_like(x) if i > 0 else mean
        return x

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.Adam(self.parameters(), lr=self.lr)


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
    module = DiffusionModel(NoisePredictor())
    trainer = L.Trainer(max_steps=max_steps, **trainer_kwargs)
    trainer.fit(module, loader)
    return module


if __name__ == "__main__":
    main()
