"""Latent space with tiny randomly initialised diffusers autoencoders: scale and shift from the config, encode/decode
as the pipelines do, the latent cache (written once, reused, stale or crafted files rebuilt or refused), and the
SampleLogger decoding latents before it logs them and scoring FID at each validation from the EMA weights."""

from __future__ import annotations

import importlib.util

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.callbacks import FID
from lightning_diffusionblocks.latents import LatentSpace, StaleCacheError, cache_latents
from tests.conftest import trainer_kwargs

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

VAE_KW = {"in_channels": 1, "out_channels": 1, "down_block_types": ("DownEncoderBlock2D",) * 2,
          "up_block_types": ("UpDecoderBlock2D",) * 2, "block_out_channels": (8, 16), "layers_per_block": 1,
          "latent_channels": 4, "norm_num_groups": 4, "sample_size": 32}  # fmt: skip  (43k parameters)


def tiny_vae(seed: int = 0, **config) -> nn.Module:  # noqa: ANN003
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(**{**VAE_KW, **config})


def images(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class Counting:
    """Counts the autoencoder's encode calls (the expensive part a cache must skip)."""

    def __init__(self, vae: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls, real = 0, vae.encode

        def encode(x, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            self.calls += 1
            return real(x, *args, **kwargs)

        monkeypatch.setattr(vae, "encode", encode)


def test_autoencoder_kl_scale_shift_from_config_and_round_trip_shapes():
    vae = tiny_vae()
    assert sum(p.numel() for p in vae.parameters()) < 50_000
    space = LatentSpace(vae)
    assert (space.scaling_factor, space.shift_factor) == (0.18215, 0.0)  # diffusers' defaults; shift None → 0
    x = images(4)
    z = space.encode(x)
    assert z.shape == (4, 4, 14, 14)
    mean = vae.encode(x).latent_dist.mean.detach()
    assert torch.allclose(z, mean * 0.18215, atol=1e-6)  # the mode of the posterior is its mean
    out = space.decode(z)
    assert out.shape == (4, 1, 28, 28)
    assert torch.allclose(out, vae.decode(mean).sample.detach(), atol=1e-5)  # decode(z / scale) as DiT/PixArt do
    assert torch.equal(space(z), out)  # the LatentSpace is itself the decoder

    shifted = tiny_vae(scaling_factor=0.5, shift_factor=0.25)  # as SD3/Flux VAEs record them
    space = LatentSpace(shifted)
    assert (space.scaling_factor, space.shift_factor) == (0.5, 0.25)
    mean = shifted.encode(x).latent_dist.mean.detach()
    z = space.encode(x)
    assert torch.allclose(z, (mean - 0.25) * 0.5, atol=1e-6)
    assert torch.allclose(space.decode(z), shifted.decode(mean).sample.detach(), atol=1e-5)  # z / scale + shift
    given = LatentSpace(shifted, scaling_factor=2.0, shift_factor=-1.0)
    assert torch.allclose(given.encode(x), (mean + 1.0) * 2.0, atol=1e-5)

    drawn = LatentSpace(vae, sample=True, seed=3)
    assert torch.equal(drawn.encode(x), drawn.encode(x))  # seeded
    assert not torch.allclose(drawn.encode(x), LatentSpace(vae).encode(x))  # a draw, not the mode
    assert vae.training  # eval only while encoding, the mode restored

    fitted = LatentSpace(vae)
    scale = fitted.fit_scaling(images(32))
    assert abs(float(fitted.encode_all(images(32)).std()) - 1.0) < 1e-4
    assert abs(scale - 1.0 / float(LatentSpace(vae, scaling_factor=1.0).encode(images(32)).std())) < 1e-4


def test_autoencoder_dc_and_plain_modules():
    torch.manual_seed(0)
    dc = diffusers.AutoencoderDC(
        in_channels=1, latent_channels=4, attention_head_dim=8, encoder_block_types=("ResBlock",) * 2,
        decoder_block_types=("ResBlock",) * 2, encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()), upsample_block_type="interpolate",
        downsample_block_type="conv", scaling_factor=0.4,
    )  # fmt: skip
    space = LatentSpace(dc)
    x = images(2)
    z = space.encode(x)
    assert space.scaling_factor == 0.4
    assert torch.allclose(z, dc.encode(x).latent.detach() * 0.4, atol=1e-6)  # `.latent`, no distribution
    assert space.decode(z).shape == (2, 1, 28, 28)

    class Plain(nn.Module):  # a user's autoencoder returning tensors, no config
        def __init__(self) -> None:
            super().__init__()
            self.down, self.up = nn.Conv2d(1, 2, 2, stride=2), nn.ConvTranspose2d(2, 1, 2, stride=2)

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(x)

        def decode(self, z: torch.Tensor) -> torch.Tensor:
            return self.up(z)

    plain = Plain()
    space = LatentSpace(plain, shift_factor=0.5)
    assert space.scaling_factor == 1.0
    assert torch.allclose(space.encode(x), plain.down(x).detach() - 0.5)
    with pytest.raises(TypeError, match="encode\\(images\\) and decode\\(latents\\)"):
        LatentSpace(nn.Linear(2, 2))


class Items(Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"images": self.x[i], "labels": torch.tensor(i % 10), "caption": torch.tensor(i % 3)}


def test_latent_cache_written_once_reused_and_rebuilt_or_refused_when_stale(tmp_path, monkeypatch):
    vae = tiny_vae()
    counter = Counting(vae, monkeypatch)
    space = LatentSpace(vae)
    x, y = images(20), torch.arange(20) % 10
    path = tmp_path / "train.safetensors"
    data = cache_latents(space, TensorDataset(x, y), path, batch_size=8)
    assert path.is_file()
    assert counter.calls == 3  # 20 images in batches of 8
    z, label = data[5]
    assert z.shape == (4, 14, 14)
    assert int(label) == 5
    assert torch.allclose(data.latents, space.encode(x), atol=1e-6)
    counter.calls = 0
    again = cache_latents(space, TensorDataset(x, y), path, batch_size=8)
    assert counter.calls == 0  # read, not encoded
    assert torch.equal(again.latents, data.latents)
    batch = next(iter(DataLoader(again, batch_size=4)))
    assert batch[0].shape == (4, 4, 14, 14)
    assert batch[1].tolist() == [0, 1, 2, 3]

    # other VAE weights: the cache is stale; refused on request, else rebuilt with a warning
    other = LatentSpace(tiny_vae(seed=1))
    with pytest.raises(StaleCacheError, match="another autoencoder"):
        cache_latents(other, TensorDataset(x, y), path, on_stale="error")
    with pytest.warns(UserWarning, match="another autoencoder.*Encoding the data again"):
        rebuilt = cache_latents(other, TensorDataset(x, y), path)
    assert torch.allclose(rebuilt.latents, other.encode(x), atol=1e-6)
    assert not torch.allclose(rebuilt.latents, data.latents)
    with pytest.raises(StaleCacheError, match="other data"):  # same VAE, other images
        cache_latents(other, TensorDataset(images(20, seed=1), y), path, on_stale="error")
    with pytest.raises(StaleCacheError, match="another autoencoder or other latent settings"):
        cache_latents(LatentSpace(tiny_vae(seed=1), scaling_factor=1.0), TensorDataset(x, y), path, on_stale="error")

    # dict items keep their structure; the images become latents
    dicts = cache_latents(space, Items(x), tmp_path / "dicts.safetensors", batch_size=8)
    item = dicts[4]
    assert set(item) == {"images", "labels", "caption"}
    assert item["images"].shape == (4, 14, 14)
    assert (int(item["labels"]), int(item["caption"])) == (4, 1)

    # files that are not such a cache are refused, whatever their name
    from safetensors.torch import save_file

    crafted = tmp_path / "crafted.safetensors"
    save_file({"images": torch.zeros(20, 4, 14, 14)}, str(crafted))
    with pytest.raises(ValueError, match="not a latent cache"):
        cache_latents(space, TensorDataset(x, y), crafted)
    torch.save({"images": torch.zeros(1)}, crafted)
    with pytest.raises(ValueError, match="not a latent cache"):
        cache_latents(space, TensorDataset(x, y), crafted)


def fid_by_hand(features: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> float:
    """‖μ_r − μ_f‖² + Tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^½), covariances with n − 1 (Heusel et al. 2017)."""
    with torch.no_grad():
        a, b = features(real).double(), features(fake).double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_trace = torch.linalg.eigvals(cov_a @ cov_b).real.clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * root_trace)


def test_sample_logger_decodes_latents_and_scores_fid_from_the_ema_weights(tmp_path):
    """A DiT trained block-wise on cached latents: the logged samples are decoded 28×28 images, and FID is scored
    at each validation against reference statistics computed once, from the EMA weights."""
    space = LatentSpace(tiny_vae())
    x, y = images(16), torch.arange(16) % 2
    data = cache_latents(space, TensorDataset(x, y), tmp_path / "latents.safetensors")
    torch.manual_seed(0)
    net = ldb.models.DiT(image_size=14, channels=4, patch=7, dim=16, depth=2, heads=2, num_classes=10)
    module = ldb.DiffusionBlocksModule(net, ldb.tasks.ImageGeneration(), num_blocks=2, ema_decay=0.5)
    torch.manual_seed(1)
    features = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3))  # fixed random features: enough to compare
    fid = FID(features=features, reference=DataLoader(TensorDataset(x), batch_size=5))
    samples = ldb.callbacks.SampleLogger(
        every_n_steps=0, decode_latents=space, fid=fid, steps=2, per_row=2,
        fid_options={"steps": 2, "per_row": 4, "seed": 1},
    )  # fmt: skip
    loader = DataLoader(data, batch_size=8)
    kwargs = trainer_kwargs(tmp_path, callbacks=[samples], limit_val_batches=1)
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=4, **kwargs)
    trainer.fit(module, loader, loader)

    assert samples.last is not None
    assert samples.last.images is not None
    assert samples.last.images.shape == (4, 1, 28, 28)  # 2 classes × 2 per row, decoded from 4×14×14
    assert samples.last.value_range == (-1.0, 1.0)
    assert samples.files  # the decoded grid was written (no logger: files in dirpath)
    latents = module.sample(labels=torch.tensor([0, 0, 1, 1]), steps=2, seed=0)
    assert torch.allclose(samples.last.images, space.decode(latents), atol=1e-5)

    assert [step for step, _ in samples.fid_history] == [2, 4]  # one score per validation (2 epochs of 2 steps)
    assert fid.reference_count == 16  # the reference statistics were computed once, not at each validation
    assert float(trainer.callback_metrics["samples/fid"]) == pytest.approx(samples.fid_history[-1][1], rel=1e-6)
    labels = torch.tensor([0] * 4 + [1] * 4)
    ema = space.decode(module.sample(labels=labels, steps=2, seed=1))
    assert samples.fid_history[-1][1] == pytest.approx(fid_by_hand(features, x, ema), rel=1e-4, abs=1e-6)
    module.ema_network, kept = None, module.ema_network  # the live weights give other samples
    live = space.decode(module.sample(labels=labels, steps=2, seed=1))
    module.ema_network = kept
    assert abs(fid_by_hand(features, x, live) - samples.fid_history[-1][1]) > 1e-6
    # predictions are written decoded too
    writer = ldb.callbacks.PredictionWriter(tmp_path / "pred", scale=1, decode_latents=space)
    predict = L.Trainer(**trainer_kwargs(tmp_path, callbacks=[writer]))
    (predicted,) = predict.predict(module, DataLoader(TensorDataset(torch.tensor([0, 1, 1])), batch_size=3))
    assert predicted.shape == (3, 4, 14, 14)  # the module returns latents; the file holds images
    from PIL import Image

    from lightning_diffusionblocks.visualize import image_grid

    rows = module.task.prediction_preview(predicted, torch.tensor([0, 1, 1])).rows
    written = np.array(Image.open(writer.files[0]))
    assert np.array_equal(written, image_grid(space.decode(predicted), rows))
    with pytest.raises(ValueError, match="explicit feature extractor"):
        FID(features="resnet", reference=x)  # type: ignore[arg-type]
    if importlib.util.find_spec("torch_fidelity") is None:  # the online-only option says what it needs
        with pytest.raises(ModuleNotFoundError, match="torch-fidelity.*online only"):
            FID(features="inception", reference=x)


def test_mnist_datamodule_trains_on_cached_latents(mnist_dir, tmp_path, monkeypatch):
    vae = tiny_vae()
    counter = Counting(vae, monkeypatch)
    space = LatentSpace(vae)
    dm = ldb.data.MNISTDataModule(mnist_dir, batch_size=8, val_size=20, latents=space, latent_dir=tmp_path / "z")
    dm.prepare_data()  # encodes train and validation once
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == [
        "mnistdatamodule-train-latents.safetensors", "mnistdatamodule-val-latents.safetensors"
    ]  # fmt: skip
    encoded = counter.calls
    assert encoded > 0
    dm.setup("fit")
    z, labels = next(iter(dm.train_dataloader()))
    assert z.shape == (8, 4, 14, 14)
    assert labels.dtype == torch.int64
    pixels = ldb.data.MNISTDataModule(mnist_dir, val_size=20)
    pixels.setup("fit")
    assert torch.allclose(dm.val_set.tensors[0], space.encode(pixels.val_set.tensors[0]), atol=1e-6)
    later = ldb.data.MNISTDataModule(mnist_dir, val_size=20, latents=space, latent_dir=tmp_path / "z")
    later.prepare_data()
    later.setup("fit")
    assert counter.calls == encoded + 1  # the check above; the second data module read both files
    with pytest.raises(ValueError, match="latent_dir="):
        ldb.data.MNISTDataModule(mnist_dir, latents=space)
