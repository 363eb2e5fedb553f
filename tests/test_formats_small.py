"""Small format fixes: `wanlite convert --to gguf-*` labels general.file_type with the quant it wrote, and a
diffusers VAE folder with another stage layout (diffusers' own AutoencoderKLWan test configs) loads from its
config.json, or is refused in one line naming the field."""
import json
import shutil

import pytest
import torch

from conftest import rel_err
from wanlite.cli import main
from wanlite.errors import CheckpointError
from wanlite.loading.checkpoints import component_from_file, discover
from wanlite.loading.models import load_vae, prepare_vae
from wanlite.loading.vae_keymap import vae_key_from_diffusers
from wanlite.loading.writers import save_safetensors
from wanlite.pipelines.convert import GGUF_FILE_TYPES, TARGETS
from wanlite.testing.fixtures import write_fixture

# gguf-py `gguf/constants.py` LlamaFileType: MOSTLY_Q4_0 = 2, MOSTLY_Q8_0 = 7, MOSTLY_Q4_K_S = 14,
# MOSTLY_Q5_K_S = 16, MOSTLY_Q6_K = 18 (MOSTLY_BF16 = 32 was written for every K-quant before)
FILE_TYPE = {"gguf-q8_0": 7, "gguf-q6_k": 18, "gguf-q5_k": 16, "gguf-q4_k": 14, "gguf-q4_0": 2}


@pytest.fixture(scope="module")
def comfy_5b(tmp_path_factory):
    return write_fixture("ti2v-5B", "comfy", tmp_path_factory.mktemp("comfy5b"))


def test_every_gguf_target_has_a_file_type():
    assert {t for t in TARGETS if t.startswith("gguf-")} == set(FILE_TYPE)
    assert {t.removeprefix("gguf-").upper() for t in FILE_TYPE} == set(GGUF_FILE_TYPES)


@pytest.mark.parametrize("to", list(FILE_TYPE))
def test_gguf_file_type_names_the_quant_written(comfy_5b, tmp_path, to):
    from gguf import GGUFReader, LlamaFileType

    out = tmp_path / "model.gguf"
    assert main(["convert", "--ckpt_dir", str(comfy_5b), "--task", "ti2v-5B", "--to", to, "--out", str(out)]) == 0
    reader = GGUFReader(out)
    field = reader.fields["general.file_type"]
    value = int(field.parts[field.data[0]][0])
    assert value == FILE_TYPE[to] == LlamaFileType[GGUF_FILE_TYPES[to[5:].upper()]]
    qtype = to.removeprefix("gguf-").upper()
    blocks = [t.tensor_type.name for t in reader.tensors if t.name.startswith("blocks.") and len(t.shape) == 2
              and t.name.endswith(".weight") and not t.name.endswith("modulation")]
    assert blocks and set(blocks) == {qtype}  # the label's type is the one every block matmul is stored in


# diffusers' AutoencoderKLWan test configs (tests/models/autoencoders/test_models_autoencoder_wan.py and the
# Wan2.2 5B pipeline tests): base_dim 3, dim_mult [1, 1, 1, 1], one residual block per stage
DIFFUSERS_TEST_VAES = {
    "2.1": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True]),
    "2.2": dict(base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                latents_mean=[0.1] * 48, latents_std=[2.0] * 48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[True, False, True], scale_factor_spatial=16),
}
TASK_OF = {"2.1": "t2v-A14B", "2.2": "ti2v-5B"}


def _diffusers_vae(version):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(**DIFFUSERS_TEST_VAES[version]).eval()
    with torch.no_grad():  # default init leaves the norm gammas at 1: randomize everything
        for p in ref.parameters():
            gamma = p.ndim in (3, 4) and p.shape[1:] == (1,) * (p.ndim - 1)
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if gamma else 0.0))
    return ref


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_diffusers_vae_of_another_layout_loads_from_its_config(tmp_path, version, capsys):
    ref = _diffusers_vae(version)
    root = write_fixture(TASK_OF[version], "diffusers", tmp_path / "ck")
    shutil.rmtree(root / "vae")
    ref.save_pretrained(root / "vae")  # diffusers writes the weights and the full config.json
    assert main(["check", "--task", TASK_OF[version], "--ckpt_dir", str(root)]) == 0
    vae = load_vae(discover(root).vae, TASK_OF[version])
    spec = vae.spec
    assert (spec.dim, spec.dec_dim, spec.dim_mult, spec.num_res_blocks) == (3, 3, (1, 1, 1, 1), 1)
    assert spec.temporal_downsample == tuple(DIFFUSERS_TEST_VAES[version]["temperal_downsample"])
    stride = 8 if version == "2.1" else 16
    assert spec.stride == (4, stride, stride)  # the task's latent grid, as the pipeline computes it
    mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1)
    if version == "2.2":
        assert spec.latent_mean == (0.1,) * 48 and spec.latent_std == (2.0,) * 48  # read from config.json
    torch.manual_seed(1)
    video = torch.rand(1, 3, 9, 2 * stride, 2 * stride) * 2 - 1
    with torch.no_grad():
        mu = ref.encode(video).latent_dist.mode()
        z = vae.encode(video)
        out_ref = ref.decode(mu).sample.clamp(-1, 1)
        out = vae.decode(z)
    assert z.shape == (1, spec.z_dim, 3, 2, 2) and out.shape == video.shape
    assert rel_err(z, (mu - mean) / std) <= 1e-4
    assert rel_err(out, out_ref) <= 1e-4


@pytest.fixture(scope="module")
def diffusers_a14b(tmp_path_factory):
    return write_fixture("t2v-A14B", "diffusers", tmp_path_factory.mktemp("diff14b"))


@pytest.mark.parametrize("fields,message", [
    ({"attn_scales": [0.5]}, "attn_scales [0.5] is not supported; wanlite builds Wan VAEs with attn_scales [] "
                             "(no attention inside the stages, as in every released Wan VAE)"),
    ({"dim_mult": [1, 2, 4]}, "dim_mult [1, 2, 4] is not supported; wanlite builds Wan VAEs with dim_mult "
                              "4 positive integers (four stages), e.g. [1, 2, 4, 4]"),
    ({"dim_mult": "1,2,4,4"}, 'dim_mult "1,2,4,4" is not supported'),
    ({"temperal_downsample": [False, True, False]},
     "temperal_downsample [false, true, false] is not supported; wanlite builds Wan VAEs with temperal_downsample "
     "3 booleans, two of them true, e.g. [false, true, true]"),
    ({"num_res_blocks": 0}, "num_res_blocks 0 is not supported; wanlite builds Wan VAEs with num_res_blocks "
                            "a positive integer"),
    ({"num_res_blocks": 1}, "config.json says num_res_blocks 1 but the weights hold 2 residual blocks per "
                            "encoder stage; fix the config"),
    ({"latents_std": [1.0] * 3}, "config.json's latents_std has 3 values but the Wan2.1 VAE has 16 latent "
                                 "channels; fix or drop the field"),
    ({"latents_mean": ["x"] * 16}, "latents_mean (16 values) is not supported"),
    ({"dim_mult": [3, 3, 3, 3]}, "the decoder's first conv gives 32 channels, which do not fit dim_mult "
                                 "[3, 3, 3, 3]; the config.json's dim_mult does not match the weights"),
    ({"dim_mult": [1, 1, 1, 1]}, "has shape (3, 8, 3, 3, 3) but a Wan2.1 VAE needs (3, 32, 3, 3, 3)"),
])
def test_unsupported_vae_config_is_one_line_from_check(diffusers_a14b, tmp_path, capsys, fields, message):
    root = tmp_path / "ck"
    shutil.copytree(diffusers_a14b, root)
    config_path = root / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, **fields}))
    capsys.readouterr()
    assert main(["check", "--task", "t2v-A14B", "--ckpt_dir", str(root)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wanlite: error: ") and message in err[0], err
    assert "Traceback" not in captured.err + captured.out


def test_other_layout_vae_without_config_is_one_line(tmp_path):
    """The diffusers test VAE saved as a ComfyUI single file (official names, no config.json): wanlite reads the
    released stage layout off nothing, so it names the mismatch instead of dividing by zero."""
    ref = _diffusers_vae("2.1")
    state = {vae_key_from_diffusers(k, False, 1): v for k, v in ref.state_dict().items()}
    path = tmp_path / "vae" / "odd_vae.safetensors"
    path.parent.mkdir()
    save_safetensors(state, path)
    with pytest.raises(CheckpointError) as info:
        prepare_vae(component_from_file("vae", path), "t2v-A14B")
    text = str(info.value)
    assert "\n" not in text and text.endswith(
        "the decoder's first conv gives 3 channels, which do not fit dim_mult [1, 2, 4, 4]; a VAE with other stage "
        "widths needs its diffusers config.json (dim_mult) beside the weights")


def test_wan22_stage_widths_that_do_not_divide_are_one_line(tmp_path, capsys):
    root = write_fixture("ti2v-5B", "diffusers", tmp_path / "ck")
    config_path = root / "vae" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "dim_mult": [1, 3, 3, 4]}))
    assert main(["check", "--task", "ti2v-5B", "--ckpt_dir", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        "dim_mult [1, 3, 3, 4] at widths 8 / 8 does not fit the Wan2.2 VAE's stage shortcuts; wanlite supports "
        "stages whose widths divide evenly, e.g. [1, 2, 4, 4]"), err
