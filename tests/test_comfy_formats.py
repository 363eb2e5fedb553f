"""ComfyUI weight files: mixed-precision `comfy_quant` files (nvfp4, mxfp8, ConvRot int8, float8) read back to the
weights they encode, `check` and `generate` agreeing on them, refusals, and `wanlite convert --to fp8` output as
ComfyUI's two loaders read it (their rules emulated below, from Comfy-Org/ComfyUI's code)."""
import json

import pytest
import torch
from safetensors import safe_open

from wanlite.cli import main
from wanlite.errors import CheckpointError
from wanlite.loading.checkpoints import component_from_file, discover
from wanlite.loading.models import load_dit
from wanlite.loading.stream import open_source
from wanlite.quant import QLinear, parse_quant, sqnr
from wanlite.testing.fixtures import write_fixture
from wanlite.testing.quant_files import comfy_marker, convrot_hadamard, write_comfy_mixed

PREFIX = "model.diffusion_model."
# weight SQNR vs the dense fixture (measured: nvfp4 19.8, mxfp8 31.3, ConvRot int8 42.6, float8 31.8 dB)
FLOORS = {"nvfp4": 18, "mxfp8": 29, "int8_convrot": 40, "float8_e4m3fn": 30}
SIX = ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
       "head.head")


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    root = write_fixture("ti2v-5B", "comfy", tmp_path_factory.mktemp("ti2v") / "comfy")
    ref = load_dit(discover(root).dits["main"], "ti2v-5B", torch.float32)
    return root, {k: v.clone() for k, v in ref.state_dict().items()}


def _weight(model, name):
    module = model.get_submodule(name[: -len(".weight")])
    return module.dequantize(torch.float32) if isinstance(module, QLinear) else module.weight.float()


@pytest.mark.parametrize("header", [False, True])
@pytest.mark.parametrize("fmt", list(FLOORS))
def test_comfy_mixed_file_loads_the_weights_it_encodes(ti2v, tmp_path, fmt, header):
    _, state = ti2v
    path, encoded = write_comfy_mixed(state, tmp_path / f"wan_{fmt}.safetensors", {}, fmt, header_metadata=header)
    model = load_dit(component_from_file("dit", path), "ti2v-5B", torch.float32)
    assert len(encoded) == 20  # every block matmul
    for name, want in encoded.items():
        got = _weight(model, name)
        assert (got - want).abs().max().item() <= 1e-6  # bit-exact dequantization (fp32)
        assert sqnr(state[name], got) > FLOORS[fmt]
    # the six Linears outside the blocks are unmarked bf16 and stay dense
    assert type(model.head.head) is torch.nn.Linear
    assert isinstance(model.blocks[0].ffn[0], QLinear) == (fmt == "float8_e4m3fn")


def test_convrot_is_undone_not_read_as_plain_int8(ti2v, tmp_path):
    _, state = ti2v
    path, _ = write_comfy_mixed(state, tmp_path / "rot.safetensors", {}, "int8_convrot")
    name = "blocks.0.ffn.0.weight"
    with safe_open(str(path), "pt") as f:
        q = f.get_tensor(PREFIX + name).float() * f.get_tensor(PREFIX + name[:-6] + "weight_scale")
    assert sqnr(state[name], q) < 3  # the rotated matrix is nothing like the weight
    rows, cols = q.shape
    unrotated = (q.reshape(rows, cols // 256, 256) @ convrot_hadamard(256)).reshape(rows, cols)
    assert sqnr(state[name], unrotated) > 40


def test_quant_config_requantizes_decoded_formats(ti2v, tmp_path):
    _, state = ti2v
    path, _ = write_comfy_mixed(state, tmp_path / "nv.safetensors", {}, "nvfp4")
    model = load_dit(component_from_file("dit", path), "ti2v-5B", torch.float32, parse_quant("fp8"))
    q = model.blocks[1].self_attn.o
    assert isinstance(q, QLinear) and q.family == "fp8"
    assert sqnr(state["blocks.1.self_attn.o.weight"], q.dequantize()) > 18


def _ckpt_with(root, tmp_path, build):
    """A copy of the ComfyUI fixture folder whose transformer file is replaced by `build(path)`."""
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(root, folder)
    dit = next((folder / "diffusion_models").glob("*.safetensors"))
    dit.unlink()
    build(dit)
    return folder


def test_check_and_generate_agree_on_a_mixed_file(ti2v, tmp_path, capsys):
    root, state = ti2v
    formats = {"blocks.0.self_attn.q.weight": "mxfp8", "blocks.0.ffn.2.weight": "int8_convrot",
               "blocks.1.cross_attn.k.weight": "float8_e4m3fn"}
    folder = _ckpt_with(root, tmp_path, lambda p: write_comfy_mixed(state, p, formats, "nvfp4"))
    assert main(["check", "--task", "ti2v-5B", "--ckpt_dir", str(folder)]) == 0
    assert "ok: every ti2v-5B component is present" in capsys.readouterr().out
    stored = set(open_source(list(discover(folder).dits["main"].files)).formats().values())  # what check lists
    assert {"nvfp4", "mxfp8", "int8_convrot", "float8_e4m3fn"} <= stored
    assert main(["generate", "--task", "ti2v-5B", "--prompt", "a red square", "--size", "64*64", "--frame_num", "5",
                 "--sample_steps", "2", "--base_seed", "1", "--ckpt_dir", str(folder),
                 "--save_file", str(tmp_path / "a.mp4")]) == 0
    assert (tmp_path / "a.mp4").stat().st_size > 0


def test_unreadable_comfy_format_is_refused_by_check_in_one_line(ti2v, tmp_path, capsys):
    root, state = ti2v

    def build(path):
        write_comfy_mixed(state, path, {}, "float8_e4m3fn")
        from safetensors.torch import load_file, save_file

        sd = load_file(str(path))
        sd[PREFIX + "blocks.1.ffn.0.comfy_quant"] = comfy_marker({"format": "convrot_w4a4"})
        save_file(sd, str(path))

    folder = _ckpt_with(root, tmp_path, build)
    assert main(["check", "--task", "ti2v-5B", "--ckpt_dir", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layer 'model.diffusion_model.blocks.1.ffn.0' is stored as ComfyUI 'convrot_w4a4'" \
        in err[0] and "use a bf16, fp8_scaled or GGUF file" in err[0]


@pytest.mark.parametrize("damage,message", [
    ("drop_tensor_scale", r"needs a weight_scale_2 \(tensor scale\) of 1 values, found missing"),
    ("short_block_scales", r"needs a weight_scale \(e4m3 block scales\) of 8192 values, found float8_e4m3fn \[511"),
    ("bad_marker", r"is not a JSON object with a \"format\""),
    ("bad_groupsize", r"convrot_groupsize 48; ConvRot needs a power of 4"),
])
def test_damaged_comfy_files_are_refused(ti2v, tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    _, state = ti2v
    fmt = "int8_convrot" if damage == "bad_groupsize" else "nvfp4"
    path, _ = write_comfy_mixed(state, tmp_path / "d.safetensors", {}, fmt)
    sd = load_file(str(path))
    layer = PREFIX + "blocks.0.ffn.0."
    if damage == "drop_tensor_scale":
        del sd[layer + "weight_scale_2"]
    elif damage == "short_block_scales":
        sd[layer + "weight_scale"] = sd[layer + "weight_scale"][:-1]
    elif damage == "bad_marker":
        sd[layer + "comfy_quant"] = torch.tensor(list(b"not json"), dtype=torch.uint8)
    else:
        sd[layer + "comfy_quant"] = comfy_marker({"format": "int8_tensorwise", "convrot": True,
                                                  "convrot_groupsize": 48})
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=message):
        load_dit(component_from_file("dit", path), "ti2v-5B")


# ---- `wanlite convert --to fp8` as ComfyUI reads it ----

def legacy_comfy_linears(sd: dict) -> dict[str, torch.Tensor]:
    """Legacy ComfyUI (Comfy-Org/ComfyUI a125cd84, Oct 2025): `model_detection.model_config_from_unet` takes the
    `scaled_fp8` sentinel's dtype (float32 -> e4m3fn); `ops.scaled_fp8_ops` builds every Linear in that dtype
    with `scale_weight` = 1 unless the file has one; `model_base.load_model_weights` -> `load_state_dict`
    copies each weight into the fp8 parameter; the forward multiplies by `scale_weight`."""
    sentinel = sd[PREFIX + "scaled_fp8"]
    dtype = torch.float8_e4m3fn if sentinel.dtype == torch.float32 else sentinel.dtype
    out = {}
    for key, t in sd.items():
        if key.endswith(".weight") and t.dim() == 2:  # every 2-D weight of the Wan DiT is a Linear
            scale = sd.get(key[: -len("weight")] + "scale_weight", torch.ones(()))
            out[key[len(PREFIX):]] = t.to(dtype).float() * scale.float()
    return out


def current_comfy_linears(sd: dict, metadata: dict) -> dict[str, torch.Tensor]:
    """Current ComfyUI: `sd.load_diffusion_model_state_dict` strips the prefix, `utils.convert_old_quants` turns
    `_quantization_metadata` (or, without it, the sentinel's `scale_weight` layers) into per-layer
    `comfy_quant` markers; `ops.mixed_precision_ops` loads a marked layer as its format's QuantizedTensor
    (float8: weight.to(fp8) · weight_scale) and an unmarked one in the compute dtype (bf16)."""
    sd = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    if "_quantization_metadata" in metadata:
        layers = json.loads(metadata["_quantization_metadata"])["layers"]
    elif "scaled_fp8" in sd:
        sd.pop("scaled_fp8")
        layers = {}
        for key in list(sd):
            if key.endswith(".scale_weight"):
                layer = key[: -len(".scale_weight")]
                sd[layer + ".weight_scale"] = sd.pop(key)
                layers[layer] = {"format": "float8_e4m3fn"}
    else:
        layers = {}
    for layer, conf in layers.items():
        sd[layer + ".comfy_quant"] = comfy_marker(conf)
    out = {}
    for key, t in sd.items():
        if not (key.endswith(".weight") and t.dim() == 2):
            continue
        layer = key[: -len(".weight")]
        marker = sd.get(layer + ".comfy_quant")
        if marker is None:
            out[key] = t.to(torch.bfloat16).float()
        else:
            conf = json.loads(bytes(marker.tolist()).decode("utf-8"))
            assert conf["format"] == "float8_e4m3fn"
            out[key] = t.to(torch.float8_e4m3fn).float() * sd[layer + ".weight_scale"].float()
    return out


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_convert_fp8_keeps_the_six_linears_full_precision_in_comfyui(ti2v, tmp_path):
    root, state = ti2v
    out = tmp_path / "wan_fp8.safetensors"
    assert main(["convert", "--ckpt_dir", str(root), "--task", "ti2v-5B", "--to", "fp8", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    for layer in SIX:  # stored bf16, unmarked, no scale: nothing tells a loader to cast them
        assert sd[PREFIX + layer + ".weight"].dtype == torch.bfloat16
        assert not any(PREFIX + layer + "." + s in sd for s in ("comfy_quant", "scale_weight", "weight_scale"))
    marked = {k[len(PREFIX):-len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant")}
    assert len(marked) == 20 and all(m.startswith("blocks.") for m in marked)
    for layer in marked:
        assert json.loads(bytes(sd[PREFIX + layer + ".comfy_quant"].tolist())) == {"format": "float8_e4m3fn"}
        assert torch.equal(sd[PREFIX + layer + ".scale_weight"], sd[PREFIX + layer + ".weight_scale"])

    ours = load_dit(component_from_file("dit", out), "ti2v-5B", torch.float32)
    current = current_comfy_linears(sd, metadata)
    no_sentinel = current_comfy_linears({k: v for k, v in sd.items() if not k.endswith("scaled_fp8")}, metadata)
    legacy = legacy_comfy_linears(sd)
    for layer in SIX:  # bf16 everywhere but legacy ComfyUI (measured 0.2 % rel RMSE; legacy fp8 cast ~2-3 %)
        name = layer + ".weight"
        assert _rel(_weight(ours, name), state[name]) < 0.004
        assert _rel(current[name], state[name]) < 0.004 and torch.equal(current[name], no_sentinel[name])
        assert 0.01 < _rel(legacy[name], state[name]) < 0.1  # legacy casts every Linear to fp8: the known limit
    for layer in marked:  # the block matmuls: one fp8 model, whichever loader reads it
        name = layer + ".weight"
        assert torch.equal(current[name], _weight(ours, name)) and torch.equal(legacy[name], current[name])
        assert torch.equal(no_sentinel[name], current[name])
        assert sqnr(state[name], current[name]) > 30
