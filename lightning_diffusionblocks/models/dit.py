"""A small class-conditional DiT (Peebles & Xie 2023) with adaLN-Zero noise conditioning.

``forward(x, c_noise, labels)`` is the raw network F of EDM: ``x`` is the preconditioned noisy image
c_in·z, ``c_noise`` is ¼·ln σ per sample, ``labels`` are class ids where ``num_classes`` (the extra embedding row)
or a negative id means "no label" (the null class used for classifier-free guidance).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_diffusionblocks.records import RecordsInitArgs


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding, (grid², dim)."""
    if dim % 4:
        raise ValueError(f"DiT width must be divisible by 4 for the 2-D position embedding, got dim={dim}.")
    coords = torch.arange(grid, dtype=torch.float64)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    parts = [f(c.flatten()[:, None] * omega[None]) for c in (yy, xx) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


def rotary_tables(positions: Tensor, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (T, head_dim), of the rotary position embedding for integer ``positions`` (T,)."""
    if head_dim % 2:
        raise ValueError(f"Rotary position embedding needs an even head width, got {head_dim}.")
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv[None]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Apply the rotary embedding to queries or keys ``x`` (N, H, T, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype)).to(x.dtype)


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of ``scale``·c_noise followed by an MLP. The default scale (100) suits inputs of order
    one (EDM's c_noise = ¼·ln σ ≈ −1.6 … 1.1, flow time t ∈ [0, 1]); integer DDPM timesteps k ∈ [0, 999] need
    about 0.1, or most frequencies wrap around between neighbouring timesteps."""

    def __init__(self, dim: int, frequencies: int = 256, scale: float = 100.0) -> None:
        super().__init__()
        self.frequencies, self.scale = frequencies, scale
        self.mlp = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: Tensor) -> Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
        args = (c_noise.float() * self.scale)[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}.")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``mask``: boolean (T, T) or (N, 1, T, T), True where a query may attend to a key. ``rope``: the
        (cos, sin) tables of :func:`rotary_tables` for the tokens' positions (rotary position embedding)."""
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated by the conditioning (adaLN-Zero)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(
        self, x: Tensor, c: Tensor, mask: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), mask, rope)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out)
        for layer in (self.ada[1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(RecordsInitArgs, nn.Module):
    """Class-conditional Diffusion Transformer; ``blocks`` is the stack DiffusionBlocks cuts into groups."""

    def __init__(
        self,
        image_size: int = 28,
        channels: int = 1,
        patch: int = 4,
        dim: int = 128,
        depth: int = 6,
        heads: int = 4,
        num_classes: int = 10,
        mlp_ratio: float = 4.0,
        noise_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if not noise_scale > 0:
            raise ValueError(f"noise_scale must be positive, got {noise_scale}.")
        if image_size % patch:
            raise ValueError(f"image_size={image_size} must be divisible by patch={patch}.")
        self.image_size, self.channels, self.patch, self.num_classes = image_size, channels, patch, num_classes
        self.grid = image_size // patch
        self.patch_embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.register_buffer("pos_embed", sincos_2d(dim, self.grid)[None], persistent=False)
        self.noise_embed = NoiseEmbedding(dim, scale=noise_scale)
        # index num_classes is the null label (classifier-free guidance)
        self.label_embed = nn.Embedding(num_classes + 1, dim) if num_classes > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(dim, patch * patch * channels)
        nn.init.normal_(self.noise_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.noise_embed.mlp[2].weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"DiT expects images of shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}.")
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.noise_embed(c_noise)
        if self.label_embed is not None:
            if labels is None:
                labels = torch.full((x.shape[0],), -1, device=x.device, dtype=torch.long)
            if (labels > self.num_classes).any():
                raise ValueError(
                    f"Labels must be in [0, {self.num_classes}), or {self.num_classes} / negative for no label;"
                    f" got {labels.max()}."
                )
            c = c + self.label_embed(torch.where(labels < 0, self.num_classes, labels))
        for block in self.blocks:
            h = block(h, c)
        out = self.final(h, c)  # (N, T, p*p*C)
        n, p, g = x.shape[0], self.patch, self.grid
        out = out.view(n, g, g, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(n, self.channels, g * p, g * p)
