import pytest
import torch

from conftest import rel_err
from wanlite.loading.vae_keymap import is_wan22_diffusers, vae_key_from_diffusers
from wanlite.models.vae import CausalConv3d, WanVAE
from wanlite.specs import TINY_VAE_SPECS, VAE_SPECS


@pytest.mark.parametrize("name,params", [("vae2.1", 126_892_531), ("vae2.2", 704_688_668)])
def test_full_size_manifest_matches_official(name, params, manifests):
    with torch.device("meta"):
        vae = WanVAE(VAE_SPECS[name])
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == manifests[name]
    assert sum(p.numel() for p in vae.parameters()) == params


DIFFUSERS_CONFIGS = {
    "vae2.1": dict(base_dim=8, z_dim=16),
    "vae2.2": dict(base_dim=8, decoder_base_dim=8, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                   patch_size=2, scale_factor_spatial=16),
}


def _pair(name):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(**DIFFUSERS_CONFIGS[name]).eval()
    with torch.no_grad():
        for p in ref.parameters():  # default init leaves gammas at 1: randomize everything
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if p.ndim in (3, 4) and p.shape[1:] == (1,) * (p.ndim - 1) else 0))
    sd = ref.state_dict()
    wan22 = is_wan22_diffusers(sd)
    ours = WanVAE(TINY_VAE_SPECS[name]).eval()
    ours.load_state_dict({vae_key_from_diffusers(k, wan22): v for k, v in sd.items()}, strict=True)
    spec = ours.spec
    mean = torch.tensor(spec.latent_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(spec.latent_std).view(1, -1, 1, 1, 1)
    return ref, ours, mean, std


@pytest.mark.parametrize("name", ["vae2.1", "vae2.2"])
def test_encode_decode_match_diffusers(name):
    ref, ours, mean, std = _pair(name)
    stride = ours.spec.stride[1]
    video = torch.rand(1, 3, 9, 2 * stride, 2 * stride) * 2 - 1
    with torch.no_grad():
        mu_ref = ref.encode(video).latent_dist.mode()
        z = ours.encode(video)
        assert z.shape == (1, ours.spec.z_dim, 3, 2, 2)
        assert rel_err(z, (mu_ref - mean) / std) <= 1e-4
        out_ref = ref.decode(mu_ref).sample.clamp(-1, 1)
        out = ours.decode(z)
    assert out.shape == video.shape  # 1 + 4 * (3 - 1) = 9 frames back
    assert rel_err(out, out_ref) <= 1e-4


@pytest.mark.parametrize("kernel,padding,stride", [(3, 1, 1), ((3, 1, 1), (1, 0, 0), 1), ((3, 3, 3), 1, (1, 2, 2))])
def test_lone_frame_fast_path_equals_the_3d_conv(kernel, padding, stride):
    torch.manual_seed(0)
    conv = CausalConv3d(4, 6, kernel, stride=stride, padding=padding)
    x = torch.randn(2, 4, 1, 9, 10)
    with torch.no_grad():
        full = torch.nn.Conv3d.forward(conv, torch.nn.functional.pad(x, conv.pad))
        fast = conv(x)
    assert fast.shape == full.shape
    assert (fast - full).abs().max() <= 1e-5


def test_decode_single_latent_frame():
    vae = WanVAE(TINY_VAE_SPECS["vae2.2"]).eval()
    with torch.no_grad():
        assert vae.decode(torch.randn(1, 48, 1, 2, 3)).shape == (1, 3, 1, 32, 48)


def test_bad_inputs():
    vae = WanVAE(TINY_VAE_SPECS["vae2.1"]).eval()
    with pytest.raises(ValueError, match="4k\\+1"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(ValueError, match="video \\[B, 3"):
        vae.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(ValueError, match="latents \\[B, 16"):
        vae.decode(torch.zeros(1, 48, 2, 2, 2))
