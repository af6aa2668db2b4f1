import pytest
import torch

from ertacache.testbed import PixelVAE


def test_shapes_and_uint8_round_trip(tmp_path):
    vae = PixelVAE(latent_channels=16, spatial_factor=4, temporal_factor=1, image_channels=1)
    u8 = torch.randint(0, 256, (2, 8, 32, 32), dtype=torch.uint8)  # (B, F, H, W)
    frames = u8.float() / 127.5 - 1.0
    lat = vae.encode(frames)
    assert lat.shape == (2, 16, 8, 8, 8)
    assert torch.equal(vae.encode(frames[:, None]), lat)  # (B, 1, F, H, W) accepted too
    out = vae.decode(lat)
    assert out.shape == (2, 8, 32, 32, 3) and out.dtype == torch.uint8
    assert torch.equal(out[..., 0], u8) and torch.equal(out[..., 1], out[..., 2])

    vae.save_pretrained(tmp_path / "vae")
    back = PixelVAE.from_pretrained(tmp_path, subfolder="vae")
    assert back.config.spatial_factor == 4 and back.config.latent_channels == 16
    assert torch.equal(back.decode(back.encode(frames)), out)


def test_latent_channel_is_a_pixel_block():
    """Channel (dy * s + dx) at latent (y, x) is pixel (y * s + dy, x * s + dx)."""
    vae = PixelVAE()
    frames = torch.arange(32 * 32, dtype=torch.float32).reshape(1, 1, 32, 32)  # (B, F, H, W)
    lat = vae.encode(frames)  # (1, 16, 1, 8, 8)
    assert lat[0, 1 * 4 + 3, 0, 2, 5] == frames[0, 0, 2 * 4 + 1, 5 * 4 + 3]


def test_bad_config_and_shapes_rejected():
    with pytest.raises(ValueError):
        PixelVAE(latent_channels=12, spatial_factor=4)
    with pytest.raises(ValueError):
        PixelVAE(temporal_factor=2)
    with pytest.raises(ValueError):
        PixelVAE().encode(torch.zeros(1, 8, 30, 32))
