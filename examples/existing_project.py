"""A user's own Lightning project: a noise-conditioned residual denoiser and its EDM LightningModule.

The README shows, as a diff, the few lines that convert it to DiffusionBlocks; the test suite applies
that diff and runs the result.
"""

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Block(nn.Module):
    """Residual MLP block modulated by the noise embedding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.scale = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm(h) * (1 + self.scale(c)))


class Denoiser(nn.Module):
    """F(x, c_noise, labels) for 8×8 images: stem, a stack of blocks, head."""

    def __init__(self, dim: int = 64, depth: int = 6, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(64, dim)
        self.noise = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(num_classes + 1, dim)  # last row: no label
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 64)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.noise(c_noise[:, None].float())
        if labels is not None:
            c = c + self.label(torch.where(labels < 0, self.label.num_embeddings - 1, labels))
        h = self.embed(x.flatten(1))
        for block in self.blocks:
            h = block(h, c)
        return self.head(h).view_as(x)


class EDMModule(L.LightningModule):
    """The user's end-to-end EDM training."""

    def __init__(self, net: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, labels = batch
        sigma = (torch.randn(x.shape[0], device=x.device) * 1.2 - 1.2).exp().view(-1, 1, 1, 1)
        z = x + sigma * torch.randn_like(x)
        c_skip, c_out, c_in = (
            0.25 / (sigma**2 + 0.25),
            sigma * 0.5 / (sigma**2 + 0.25).sqrt(),
            1 / (sigma**2 + 0.25).sqrt(),
        )
        denoised = c_skip * z + c_out * self.net(c_in * z, sigma.flatten().log() / 4, labels)
        loss = ((sigma**2 + 0.25) / (0.5 * sigma) ** 2 * (denoised - x) ** 2).mean()
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def toy_digits(n: int = 512) -> TensorDataset:
    """Blurry class-dependent 8×8 patterns in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (n,), generator=g)
    protos = torch.rand(10, 1, 8, 8, generator=g) * 2 - 1
    images = (protos[labels] + 0.1 * torch.randn(n, 1, 8, 8, generator=g)).clamp(-1, 1)
    return TensorDataset(images, labels)


def main(max_steps: int = 300, **trainer_kwargs) -> L.LightningModule:  # noqa: ANN003
    loader = DataLoader(toy_digits(), batch_size=32, shuffle=True)
    module = EDMModule(Denoiser())
    trainer = L.Trainer(max_steps=max_steps, **trainer_kwargs)
    trainer.fit(module, loader)
    return module


if __name__ == "__main__":
    main()
