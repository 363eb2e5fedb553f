import pytest
import torch

from conftest import rel_err
from wanlite.archs import manifest
from wanlite.loading.keymaps import dit_key_from_diffusers
from wanlite.models.dit import WanDiT
from wanlite.models.rope import apply_rope, axis_dims, rope_cos_sin
from wanlite.specs import DIT_SPECS, TINY_DIT_SPECS, DiTSpec


@pytest.mark.parametrize("name", list(DIT_SPECS))
def test_full_size_manifest_matches_official(name, manifests):
    # S2V's injectors live in their blocks and are renamed to the official top-level list
    assert {k: list(v) for k, v in manifest(name).items()} == manifests[name]


def test_parameter_counts():
    expected = {"t2v-A14B": 14_288_491_584, "i2v-A14B": 14_288_901_184, "ti2v-5B": 4_999_787_712}
    for name, count in expected.items():
        with torch.device("meta"):
            assert sum(p.numel() for p in WanDiT(DIT_SPECS[name]).parameters()) == count


def test_rope_split_and_rotation_against_complex_reference():
    assert axis_dims(128) == (44, 42, 42)
    grid, hd = (3, 4, 5), 128
    cos, sin = rope_cos_sin(grid, hd)
    x = torch.randn(2, 60, 3, hd)
    # reference: complex128 phasors over adjacent pairs, as the official rope_apply
    angles = torch.atan2(sin.double(), cos.double())
    ref = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (-1, 2)))
                             * torch.polar(torch.ones_like(angles), angles)[:, None, :]).flatten(-2)
    assert rel_err(apply_rope(x, cos, sin), ref) < 1e-6


def _diffusers_pair(in_ch, out_ch, seed=0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=in_ch,
        out_channels=out_ch, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=1024).eval()
    with torch.no_grad():
        for p in ref.parameters():  # defaults leave norms at 1 and some layers at 0: randomize everything
            p.copy_(torch.randn_like(p) * 0.2)
    spec = DiTSpec({16: "t2v", 36: "i2v", 48: "ti2v"}[in_ch], dim=32, ffn_dim=64, num_heads=2, num_layers=2,
                   in_dim=in_ch, out_dim=out_ch, freq_dim=32, text_dim=32, text_len=12)
    ours = WanDiT(spec).eval()
    ours.load_state_dict({dit_key_from_diffusers(k): v for k, v in ref.state_dict().items()}, strict=True)
    return ref, ours


@pytest.mark.parametrize("in_ch,out_ch", [(16, 16), (36, 16), (48, 48)])
def test_forward_matches_diffusers(in_ch, out_ch):
    ref, ours = _diffusers_pair(in_ch, out_ch)
    x = torch.randn(1, in_ch, 3, 8, 12)
    context = torch.randn(1, 12, 32)
    t = torch.tensor([937.0])
    with torch.no_grad():
        expected = ref(x, t, context, return_dict=False)[0]
        got = ours(x, t, context)
    assert got.shape == (1, out_ch, 3, 8, 12)
    assert rel_err(got, expected) <= 1e-4


def test_per_frame_timestep_matches_diffusers_per_token():
    """TI2V: frame-0 tokens at t=0, the rest at t; our per-frame form equals diffusers' per-token form."""
    ref, ours = _diffusers_pair(48, 48, seed=1)
    x = torch.randn(1, 48, 3, 8, 8)
    context = torch.randn(1, 12, 32)
    per_frame = torch.tensor([[0.0, 811.0, 811.0]])
    per_token = per_frame.repeat_interleave(4 * 4, dim=1)  # 16 tokens per latent frame
    with torch.no_grad():
        expected = ref(x, per_token, context, return_dict=False)[0]
        got = ours(x, per_frame, context)
    assert rel_err(got, expected) <= 1e-4


def test_short_context_is_zero_padded_like_reference():
    ref, ours = _diffusers_pair(16, 16, seed=2)
    x = torch.randn(1, 16, 1, 4, 4)
    short = torch.randn(5, 32)
    with torch.no_grad():
        expected = ref(x, torch.tensor([500.0]), torch.nn.functional.pad(short, (0, 0, 0, 7))[None],
                       return_dict=False)[0]
        got = ours(x, torch.tensor([500.0]), [short])
    assert rel_err(got, expected) <= 1e-4


def test_bf16_forward_stays_close_to_fp32():
    torch.manual_seed(0)
    dit = WanDiT(TINY_DIT_SPECS["t2v-A14B"]).eval()
    x, ctx = torch.randn(1, 16, 2, 8, 8), [torch.randn(7, 64)]
    with torch.no_grad():
        ref = dit(x, torch.tensor([900]), ctx)
        dit.to(torch.bfloat16)
        out = dit(x, torch.tensor([900]), ctx)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 0.05


def test_bad_inputs_raise_clear_errors():
    dit = WanDiT(TINY_DIT_SPECS["t2v-A14B"])
    with pytest.raises(ValueError, match="input channels"):
        dit(torch.randn(1, 36, 1, 4, 4), torch.tensor([1]), [torch.randn(3, 64)])
    with pytest.raises(ValueError, match="divisible by the patch"):
        dit(torch.randn(1, 16, 1, 5, 4), torch.tensor([1]), [torch.randn(3, 64)])
    with pytest.raises(ValueError, match="context"):
        dit(torch.randn(1, 16, 1, 4, 4), torch.tensor([1]), [torch.randn(600, 64)])
