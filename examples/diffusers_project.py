"""Another user's text-to-image Lightning project, written the way diffusers fine-tuning scripts are written: a
diffusers ``SD3Transformer2DModel`` (tiny here), ``FlowMatchEulerDiscreteScheduler`` for the noise (logit-normal
timesteps looked up in the scheduler's tables, x_t = (1 − σ)x + σε, the velocity target ε − x, ``timestep`` =
1000·σ), captions encoded once by a frozen text encoder into ``encoder_hidden_states`` and ``pooled_projections``,
caption dropout to the empty prompt, and the scheduler's Euler sampler with classifier-free guidance.

The text encoder is a small frozen stand-in for CLIP/T5 so the project runs offline in seconds; a real project
precomputes the same two tensors with its own encoder (``ldb.data.CaptionedMNISTDataModule`` gives captioned MNIST
batches in this form, encoded by a real MiniLM sentence encoder).

The README shows, as a diff, the lines that convert it to DiffusionBlocks; the test suite applies that diff and
runs the result. The transformer, the data and the text encoder are not changed.
"""

import lightning as L
import torch
import torch.nn.functional as F  # noqa: N812
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import nn
from torch.utils.data import DataLoader, Dataset

SIZES = ("small", "large")
ROWS = ("top", "bottom")
COLUMNS = ("left", "right")
MAX_TOKENS = 8
TEXT_DIM = 32


def caption_of(size: str, row: str, column: str) -> str:
    return f"a {size} blob in the {row} {column}"


CAPTIONS = [caption_of(s, r, c) for s in SIZES for r in ROWS for c in COLUMNS]


class TextEncoder(nn.Module):
    """A frozen word-embedding encoder (the stand-in for CLIP/T5): per-token states padded with zeros to
    ``MAX_TOKENS``, and their mean as the pooled embedding."""

    def __init__(self, captions: list[str], dim: int = TEXT_DIM, seed: int = 0) -> None:
        super().__init__()
        self.vocab = {w: i for i, w in enumerate(sorted({w for c in captions for w in c.split()}))}
        torch.manual_seed(seed)
        self.words = nn.Embedding(len(self.vocab), dim)
        self.positions = nn.Parameter(0.1 * torch.randn(MAX_TOKENS, dim))
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        states = torch.zeros(len(prompts), MAX_TOKENS, self.words.embedding_dim)
        pooled = torch.zeros(len(prompts), self.words.embedding_dim)
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([self.vocab[w] for w in prompt.split()][:MAX_TOKENS], dtype=torch.long)
            if len(ids):
                states[i, : len(ids)] = self.words(ids) + self.positions[: len(ids)]
                pooled[i] = states[i, : len(ids)].mean(0)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}


class CaptionedBlobs(Dataset):
    """8×8 blobs in [-1, 1] placed and sized as their caption says, with the caption's precomputed embeddings."""

    def __init__(self, encoder: TextEncoder, n: int = 256, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        which = torch.randint(0, len(CAPTIONS), (n,), generator=g)
        grid = torch.linspace(-1, 1, 8)
        size, row, column = which // 4, (which // 2) % 2, which % 2
        cy = (row * 2 - 1) * 0.5 + 0.1 * torch.randn(n, generator=g)
        cx = (column * 2 - 1) * 0.5 + 0.1 * torch.randn(n, generator=g)
        d2 = (grid[None, :, None] - cy[:, None, None]) ** 2 + (grid[None, None, :] - cx[:, None, None]) ** 2
        width = torch.where(size == 0, 12.0, 4.0)[:, None, None]
        self.images = (2 * torch.exp(-width * d2) - 1)[:, None]
        embeddings = encoder(CAPTIONS)  # each caption encoded once, as the diffusers scripts precompute them
        self.text = {k: v[which] for k, v in embeddings.items()}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"images": self.images[i], **{k: v[i] for k, v in self.text.items()}}


def make_transformer() -> SD3Transformer2DModel:
    """A tiny SD3 MMDiT (joint text–image blocks); a real project calls ``from_pretrained(..., subfolder=...)``."""
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=4, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
        pooled_projection_dim=TEXT_DIM, pos_embed_max_size=8,
    )  # fmt: skip


class TextToImage(L.LightningModule):
    """The project's end-to-end rectified flow with the scheduler's tables and caption dropout for guidance."""

    def __init__(self, transformer: SD3Transformer2DModel, null: dict[str, torch.Tensor], lr: float = 1e-3,
                 caption_dropout: float = 0.1) -> None:  # fmt: skip
        super().__init__()
        self.transformer, self.null, self.lr, self.caption_dropout = transformer, null, lr, caption_dropout
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)

    def flow_loss(self, x: torch.Tensor, text: dict[str, torch.Tensor], sigmas: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """‖v − (ε − x)‖² at x_t = (1 − σ)x + σε, the transformer called at timestep 1000·σ."""
        s = sigmas.view(-1, 1, 1, 1).to(x)
        noisy = (1 - s) * x + s * noise
        timesteps = sigmas * self.scheduler.config.num_train_timesteps
        pred = self.transformer(hidden_states=noisy, timestep=timesteps, **text).sample
        return F.mse_loss(pred.float(), (noise - x).float())

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x = batch["images"]
        text = {k: v for k, v in batch.items() if k != "images"}
        drop = torch.rand(x.shape[0], device=x.device) < self.caption_dropout
        text = {k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), self.null[k].to(v), v) for k, v in text.items()}
        u = torch.sigmoid(torch.randn(x.shape[0]))  # SD3's weighting_scheme="logit_normal"
        indices = (u * self.scheduler.config.num_train_timesteps).long()
        sigmas = self.scheduler.sigmas[indices].to(x.device)
        loss = self.flow_loss(x, text, sigmas, torch.randn_like(x))
        self.log("train_loss", loss)
        return loss

    @torch.no_grad()
    def sample(self, prompts: dict[str, torch.Tensor], steps: int = 20, guidance_scale: float = 4.0) -> torch.Tensor:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        n, cfg = len(prompts["pooled_projections"]), self.transformer.config
        z = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=self.device)
        text = {k: torch.cat([v, self.null[k].expand_as(v)]).to(self.device) for k, v in prompts.items()}
        for t in scheduler.timesteps:
            v = self.transformer(hidden_states=torch.cat([z, z]), timestep=t.expand(2 * n), **text).sample
            v_text, v_null = v.chunk(2)
            z = scheduler.step(v_null + guidance_scale * (v_text - v_null), t, z).prev_sample
        return z

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(max_steps: int = 300, **trainer_kwargs) -> tuple[L.LightningModule, torch.Tensor]:  # noqa: ANN003
    encoder = TextEncoder(CAPTIONS)
    loader = DataLoader(CaptionedBlobs(encoder), batch_size=32, shuffle=True)
    null = encoder([""])  # the empty prompt
    module = TextToImage(make_transformer(), null)
    trainer = L.Trainer(max_steps=max_steps, **trainer_kwargs)
    trainer.fit(module, loader)
    prompts = encoder(["a large blob in the top left", "a small blob in the bottom right"])
    images = module.sample(prompts, steps=20, guidance_scale=4.0)
    return module, images


if __name__ == "__main__":
    print(main()[1].squeeze(1).round(decimals=1))
