"""quant/: formats on toy layers (SQNR), the shared high-precision rule, K-quant encoders checked with gguf-py,
pre-quantized files in the layouts other tools write, quantize-on-load, `wanlite convert` and bad input."""
import copy
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from wanlite.archs import manifest
from wanlite.cli import main
from wanlite.errors import CheckpointError, WanliteError
from wanlite.loading.checkpoints import component_from_file, discover
from wanlite.loading.models import load_dit, load_t5
from wanlite.quant import (FORMATS, DenseConfig, Fp8WeightConfig, GGUFWeightConfig, Int8WeightConfig, QLinear,
                           is_quantizable, parse_quant, quantize_, sqnr, weight_bytes)
from wanlite.quant.fp8 import fp8_from_hp, scaled_mm_linear
from wanlite.quant.gguf_dequant import BLOCKS, dequantize
from wanlite.quant.gguf_quantize import quantize as gguf_quantize
from wanlite.testing.fixtures import build_tiny_models, write_fixture
from wanlite.testing.quant_files import write_comfy_fp8_scaled, write_gguf_with_gguf_py

# output SQNR floors on a 512->256 toy linear (measured: fp8 31.6, e5m2 25.6, int8 ~48, Q8_0 48.4,
# Q6_K 36.5, Q5_K 30.9, Q4_K 25.0, Q4_0 23.5 dB)
SQNR_FLOOR = {"fp8": 28, "fp8-e5m2": 22, "int8": 40, "gguf-q8_0": 40, "gguf-q6_k": 33, "gguf-q5_k": 28,
              "gguf-q4_k": 22, "gguf-q4_0": 20}


def toy(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(512, 256)), torch.randn(8, 512)


@pytest.mark.parametrize("name", list(SQNR_FLOOR))
def test_format_sqnr_on_a_toy_linear(name):
    model, x = toy()
    ref = model(x)
    quantize_(model, parse_quant(name), filter_fn=lambda n, m: isinstance(m, nn.Linear))
    assert not isinstance(model[0], nn.Linear) or name == "int8"  # torchao keeps the Linear, swaps its weight
    with torch.no_grad():
        assert sqnr(ref, model(x)) > SQNR_FLOOR[name]


@pytest.mark.parametrize("backend", ["torchao", "bnb", "quanto"])
def test_int8_backends(backend):
    model, x = toy(1)
    ref = model(x)
    quantize_(model, Int8WeightConfig(backend=backend), filter_fn=lambda n, m: isinstance(m, nn.Linear))
    with torch.no_grad():
        assert sqnr(ref, model(x)) > 40


def test_unusable_backend_is_one_clear_line(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("libbitsandbytes_cpu.so: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    model, _ = toy()
    with pytest.raises(WanliteError, match=r"--quant-backend bnb cannot run on this machine .*use --quant-backend "
                                           r"torchao"):
        quantize_(model, Int8WeightConfig(backend="bnb"), filter_fn=lambda n, m: isinstance(m, nn.Linear))


def test_one_high_precision_rule_for_every_format():
    keep = ["patch_embedding.weight", "text_embedding.0.weight", "time_embedding.2.weight",
            "time_projection.1.weight", "head.head.weight", "blocks.3.modulation", "blocks.3.norm3.weight",
            "blocks.3.self_attn.q.bias", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "shared.weight", "blocks.0.pos_embedding.embedding.weight"]
    quantized = ["blocks.3.self_attn.q.weight", "blocks.3.cross_attn.o.weight", "blocks.39.ffn.0.weight",
                 "blocks.39.ffn.2.weight", "encoder.block.5.layer.1.DenseReluDense.wi_0.weight",
                 "encoder.block.5.layer.0.SelfAttention.o.weight"]
    assert not any(is_quantizable(n, (64, 64)) for n in keep)
    assert all(is_quantizable(n, (64, 64)) for n in quantized)
    shapes = manifest("t2v-A14B")
    assert sum(is_quantizable(n, s) for n, s in shapes.items()) == 40 * 10  # q k v o, q k v o, ffn.0, ffn.2


def test_weight_bytes_match_the_published_sizes():
    shapes = manifest("t2v-A14B")
    gb = {fmt: weight_bytes(shapes, fmt) / 1e9 for fmt in FORMATS}
    assert gb["bf16"] == pytest.approx(28.6, abs=0.1)
    # 14.05 B block-matmul weights at 1 byte (4.5 bits) + 0.24 B high-precision parameters in bf16
    assert gb["fp8"] == pytest.approx(14.5, abs=0.1) and gb["Q4_K"] == pytest.approx(8.4, abs=0.1)


def test_quantized_modules_hold_exactly_the_format_bytes():
    dits, _, _ = build_tiny_models("ti2v-5B")
    for name in ("gguf-q8_0", "gguf-q4_k", "fp8"):
        model = quantize_(copy.deepcopy(dits["main"]), parse_quant(name))
        qlinears = [m for m in model.modules() if isinstance(m, QLinear)]
        assert len(qlinears) == 2 * 10  # every block matmul, nothing else
        for m in qlinears:
            if m.family == "gguf":
                values, nbytes = BLOCKS[m.qtype]
                assert m.qdata.nbytes == m.in_features * m.out_features // values * nbytes
            else:
                assert m.qdata.dtype == torch.float8_e4m3fn and m.scale.shape == (m.out_features,)


@pytest.mark.parametrize("qtype,reference", [("Q4_K", "Q4_0"), ("Q5_K", "Q5_0"), ("Q6_K", "Q8_0")])
def test_k_quant_encoder_is_read_back_by_gguf_py(qtype, reference):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    torch.manual_seed(0)
    w = torch.randn(64, 1024) * 0.02
    w[:, ::97] *= 8  # outlier columns, as real weights have
    raw = gguf_quantize(w, qtype)
    theirs = torch.from_numpy(gguf_dequantize(raw.numpy(), GGMLQuantizationType[qtype]).reshape(w.shape)).float()
    assert torch.equal(theirs, dequantize(raw, qtype, tuple(w.shape)))
    err = ((theirs - w).norm() / w.norm()).item()
    ref_raw = gguf_quantize(w, reference)  # gguf-py's own encoder for the legacy type
    ref_err = ((dequantize(ref_raw, reference, tuple(w.shape)) - w).norm() / w.norm()).item()
    # Q4_K <= Q4_0, Q5_K <= Q5_0; Q6_K has 4x coarser steps than Q8_0, measured 3.0x its error
    assert err <= ref_err * (3.5 if qtype == "Q6_K" else 1.0)


def test_scaled_mm_path_matches_the_dequantized_weight():
    torch.manual_seed(0)
    w, x, b = torch.randn(64, 128), torch.randn(2, 5, 128), torch.randn(64)
    for granularity in ("channel", "tensor"):
        q = fp8_from_hp(w, "e4m3fn", granularity)
        ref = torch.nn.functional.linear(x, q.dequantize(torch.float32), b)
        assert sqnr(ref, scaled_mm_linear(x, q.qdata, q.scale, b)) > 25
        assert scaled_mm_linear(x, q.qdata, q.scale, b).shape == ref.shape


def test_fp8_upcast_scales_either_side_the_same():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = QLinear(fp8_from_hp(lin.weight.detach()), lin.bias.detach())
    for rows in (1, 200):  # few rows: scale the output; many rows: scale the weight
        x = torch.randn(rows, 64)
        ref = torch.nn.functional.linear(x, q.dequantize(torch.float32), lin.bias)
        assert torch.allclose(q(x), ref, atol=1e-5)


@pytest.fixture(scope="module")
def t2v_expert(tmp_path_factory):
    """A tiny t2v-A14B checkpoint (official layout) and a fixed input for its high-noise expert."""
    root = write_fixture("t2v-A14B", "official", tmp_path_factory.mktemp("t2v"))
    ref = load_dit(discover(root).dits["high_noise"], "t2v-A14B", torch.float32)
    g = torch.Generator().manual_seed(0)
    spec = ref.spec
    inputs = (torch.randn(1, spec.in_dim, 2, 8, 8, generator=g), torch.tensor([900.0]),
              [torch.randn(7, spec.text_dim, generator=g)])
    with torch.no_grad():
        out = ref(*inputs)
    return root, ref, inputs, out


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_comfy_fp8_scaled_file_loads_as_stored(t2v_expert, tmp_path):
    root, ref, inputs, out = t2v_expert
    path = write_comfy_fp8_scaled(ref.state_dict(), tmp_path / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors")
    comp = component_from_file("high_noise_model", path)
    assert comp.kind == "dit" and comp.role == "high_noise"
    fp8 = load_dit(comp, "t2v-A14B", torch.float32)
    q = fp8.blocks[0].self_attn.q
    assert isinstance(q, QLinear) and q.qdata.dtype == torch.float8_e4m3fn and q.scale.numel() == 1 and q.fast_matmul
    dense = load_dit(comp, "t2v-A14B", torch.float32, DenseConfig())
    assert type(dense.blocks[0].self_attn.q) is nn.Linear
    assert torch.allclose(_run(fp8, inputs), _run(dense, inputs), atol=1e-5)  # same weights, two paths
    assert sqnr(out, _run(fp8, inputs)) > 30


def test_comfy_two_element_sentinel_forbids_fp8_matmuls(t2v_expert, tmp_path):
    _, ref, _, _ = t2v_expert
    path = write_comfy_fp8_scaled(ref.state_dict(), tmp_path / "fp8.safetensors", sentinel_elems=2)
    model = load_dit(component_from_file("high_noise_model", path), "t2v-A14B", torch.float32)
    assert not model.blocks[0].ffn[0].fast_matmul


def test_fp8_file_missing_its_scales_fails(t2v_expert, tmp_path):
    _, ref, _, _ = t2v_expert
    path = write_comfy_fp8_scaled(ref.state_dict(), tmp_path / "fp8.safetensors",
                                  drop_scale="blocks.1.ffn.2.weight")
    with pytest.raises(CheckpointError, match=r"'model.diffusion_model.blocks.1.ffn.2.weight' is stored as "
                                              r"float8_e4m3fn but has no scale"):
        load_dit(component_from_file("high_noise_model", path), "t2v-A14B")


def test_gguf_written_by_gguf_py_loads_with_mixed_types(t2v_expert, tmp_path):
    root, ref, inputs, out = t2v_expert
    mixed = {"blocks.0.ffn.2.weight": "Q5_1", "blocks.1.self_attn.v.weight": "Q4_0"}
    path = write_gguf_with_gguf_py(ref.state_dict(), tmp_path / "high_noise.gguf", "Q8_0", mixed=mixed)
    comp = component_from_file("high_noise_model", path)
    assert comp.layout == "gguf"
    model = load_dit(comp, "t2v-A14B", torch.float32)
    assert model.blocks[0].ffn[2].qtype == "Q5_1" and model.blocks[1].self_attn.v.qtype == "Q4_0"
    assert model.blocks[0].self_attn.q.qtype == "Q8_0" and model.patch_embedding.weight.dim() == 5
    dense = load_dit(comp, "t2v-A14B", torch.float32, DenseConfig())
    assert torch.allclose(_run(model, inputs), _run(dense, inputs), atol=1e-5)
    assert sqnr(out, _run(model, inputs)) > 30


def test_gguf_of_another_task_is_refused(t2v_expert, tmp_path):
    _, ref, _, _ = t2v_expert
    path = write_gguf_with_gguf_py(ref.state_dict(), tmp_path / "t2v.gguf")
    with pytest.raises(CheckpointError, match="holds a t2v-A14B transformer .* --task ti2v-5B"):
        load_dit(component_from_file("dit", path), "ti2v-5B")


def test_gguf_of_another_architecture_is_refused(t2v_expert, tmp_path):
    _, ref, _, _ = t2v_expert
    path = write_gguf_with_gguf_py(ref.state_dict(), tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(CheckpointError, match="architecture .llama., not a Wan model"):
        load_dit(component_from_file("dit", path), "t2v-A14B")


@pytest.mark.parametrize("name,floor", [("fp8", 30), ("int8", 40), ("gguf-q8_0", 40), ("gguf-q4_k", 22)])
def test_quantize_on_load(t2v_expert, name, floor):
    root, _, inputs, out = t2v_expert
    model = load_dit(discover(root).dits["high_noise"], "t2v-A14B", torch.float32, parse_quant(name))
    linears = [m for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, nn.Linear)]
    if name != "int8":
        assert not linears  # every block matmul was swapped as it arrived
    assert type(model.head.head) is nn.Linear and model.head.head.weight.dtype == torch.float32
    assert sqnr(out, _run(model, inputs)) > floor


def _plain_fp8(w, dtype, granularity):
    fmax = torch.finfo(dtype).max
    amax = w.float().abs().amax(dim=1)
    scale = (amax if granularity == "channel" else amax.amax()).div(fmax).clamp(min=1e-12).reshape(-1, 1)
    return (w.float() / scale).clamp(-fmax, fmax).to(dtype), scale.reshape(-1)


def _plain_int8(w):
    scale = (w.float().abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    return (w.float() / scale).round().clamp(-127, 127).to(torch.int8), scale.reshape(-1)


@pytest.mark.parametrize("source", [torch.bfloat16, torch.float16, torch.float32])
def test_fast_fp8_and_int8_match_a_plain_reference(source):
    """The chunked, threaded quantizers give the bytes of the one-expression formulas, on rows that are not a
    multiple of any chunk, a zero row, a row below the 1e-12 scale floor and a row of huge values."""
    from wanlite.quant.int8 import int8_from_hp

    torch.manual_seed(0)
    w = torch.randn(203, 5000) * 0.02
    w[3] = 0
    w[7] *= 1e-12
    w[11] *= 1e3 if source != torch.float16 else 1
    w = w.to(source)
    for name, dtype in (("e4m3fn", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        for granularity in ("channel", "tensor"):
            got, (qdata, scale) = fp8_from_hp(w, name, granularity), _plain_fp8(w, dtype, granularity)
            assert torch.equal(got.qdata.view(torch.uint8), qdata.view(torch.uint8))  # all 1,015,000 equal
            assert torch.equal(got.scale, scale)
    got, (qdata, scale) = int8_from_hp(w), _plain_int8(w)
    assert torch.equal(got.qdata, qdata) and torch.equal(got.scale, scale)


def _write_in_order(path, tensors, order):
    """A safetensors file whose data lies in `order` (writers sort by name; other files need not)."""
    import struct

    header, offset = {}, 0
    for key in order:
        n = tensors[key].numel() * tensors[key].element_size()
        header[key] = {"dtype": "F32", "shape": list(tensors[key].shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key in order:
            f.write(tensors[key].contiguous().numpy().tobytes())


def test_quantize_on_load_is_exact_in_any_tensor_order(t2v_expert, tmp_path):
    """Weights read into the loader's reused buffers quantize to the bytes `fp8_from_hp` gives the dense
    weight, also when every weight comes before its bias in the file (so it waits, copied, for the bias)."""
    from safetensors.torch import load_file

    root, *_ = t2v_expert
    comp = discover(root).dits["high_noise"]
    dense = load_dit(comp, "t2v-A14B", torch.bfloat16, DenseConfig())
    tensors = {k: v for f in comp.files for k, v in load_file(str(f)).items()}
    weights_first = sorted(tensors, key=lambda k: (not k.endswith(".weight"), k))
    _write_in_order(tmp_path / "dit.safetensors", tensors, weights_first)
    for loaded in (load_dit(comp, "t2v-A14B", torch.bfloat16, Fp8WeightConfig()),
                   load_dit(component_from_file("dit", tmp_path / "dit.safetensors"), "t2v-A14B", torch.bfloat16,
                        Fp8WeightConfig())):
        quantized = {n: m for n, m in loaded.named_modules() if isinstance(m, QLinear)}
        assert len(quantized) > 10
        for name, module in quantized.items():
            ref = fp8_from_hp(dense.get_submodule(name).weight)
            assert torch.equal(module.qdata.view(torch.uint8), ref.qdata.view(torch.uint8)), name
            assert torch.equal(module.scale, ref.scale) and torch.equal(module.bias, dense.get_submodule(name).bias)


def test_load_reports_the_quantizer_speed(t2v_expert):
    from wanlite.loading.progress import reading

    root, *_ = t2v_expert
    comp = discover(root).dits["high_noise"]
    events = []
    with reading("transformer", comp.files, events.append):
        load_dit(comp, "t2v-A14B", torch.bfloat16, GGUFWeightConfig("Q8_0"))
    done = events[-1]
    assert done["event"] == "loaded" and done["quantized_bytes"] > 0 and done["quantize_MBps"] > 0
    with reading("transformer", comp.files, events.append):
        load_dit(comp, "t2v-A14B", torch.bfloat16)
    assert "quantized_bytes" not in events[-1]


@pytest.mark.parametrize("name", ["fp8", "gguf-q8_0"])
def test_quantize_on_load_lets_each_dense_weight_go(t2v_expert, monkeypatch, name):
    """Peak RAM follows the quantized size only if no dense block weight outlives its quantization."""
    import weakref

    from wanlite.loading.stream import SafetensorsSource

    root, *_ = t2v_expert
    seen, most_alive = [], 0
    fill = SafetensorsSource.fill

    def tracking_fill(self, plan, *transient):
        nonlocal most_alive
        for key, tensor in fill(self, plan, *transient):
            if key.startswith("blocks.") and tensor.ndim == 2:
                most_alive = max(most_alive, sum(r() is not None for r in seen))
                seen.append(weakref.ref(tensor))
            yield key, tensor

    monkeypatch.setattr(SafetensorsSource, "fill", tracking_fill)
    load_dit(discover(root).dits["high_noise"], "t2v-A14B", torch.bfloat16, parse_quant(name))
    assert len(seen) > 10 and most_alive <= 1  # at most the one weight still waiting for its bias


def test_t5_quantize_on_load(tmp_path):
    root = write_fixture("ti2v-5B", "diffusers", tmp_path / "ck")
    ckpt = discover(root)
    ref = load_t5(ckpt.t5, torch.float32)
    q8 = load_t5(ckpt.t5, torch.float32, GGUFWeightConfig("Q8_0"))
    assert isinstance(q8.encoder.block[0].layer[1].DenseReluDense.wi_0, QLinear)
    assert type(q8.shared) is nn.Embedding
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert sqnr(ref(ids).last_hidden_state, q8(ids).last_hidden_state) > 35


@pytest.mark.parametrize("to,floor", [("fp8", 30), ("int8", 40), ("gguf-q8_0", 40), ("gguf-q4_k", 22),
                                      ("gguf-q6_k", 33)])
def test_convert_both_experts_and_load_them(t2v_expert, tmp_path, to, floor):
    root, _, inputs, out = t2v_expert
    assert main(["convert", "--ckpt_dir", str(root), "--task", "t2v-A14B", "--to", to,
                 "--out", str(tmp_path / "out")]) == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) == 2 and not any(f.endswith(".tmp") for f in files)
    ckpt = discover(tmp_path / "out")
    assert set(ckpt.dits) == {"high_noise", "low_noise"}
    model = load_dit(ckpt.dits["high_noise"], "t2v-A14B", torch.float32)
    assert isinstance(model.blocks[0].ffn[0], QLinear)
    assert sqnr(out, _run(model, inputs)) > floor
    if to.startswith("gguf"):
        from gguf import GGUFReader

        reader = GGUFReader(ckpt.dits["high_noise"].files[0])
        arch = reader.fields["general.architecture"]
        assert bytes(arch.parts[arch.data[0]]).decode() == "wan"
        patch = next(t for t in reader.tensors if t.name == "patch_embedding.weight")
        assert patch.tensor_type.name == "F32" and len(patch.shape) == 5


def test_convert_writes_comfyui_scaled_fp8_keys(t2v_expert, tmp_path):
    from safetensors import safe_open

    root = t2v_expert[0]
    assert main(["convert", "--ckpt_dir", str(root), "--task", "t2v-A14B", "--to", "fp8",
                 "--out", str(tmp_path)]) == 0
    path = next(tmp_path.glob("*high_noise*.safetensors"))
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.diffusion_model.blocks.0.ffn.0.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.diffusion_model.blocks.0.ffn.0.scale_weight").numel() == 1
        assert f.get_tensor("model.diffusion_model.scaled_fp8").dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.diffusion_model.head.modulation").dtype == torch.float32
    assert all(k.startswith("model.diffusion_model.") for k in keys)


def test_convert_bad_target_exits_2_and_writes_nothing(t2v_expert, tmp_path, capsys):
    assert main(["convert", "--ckpt_dir", str(t2v_expert[0]), "--task", "t2v-A14B", "--to", "gguf-q3_k",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["wanlite: error: --to 'gguf-q3_k' is unknown; choose one of fp8, int8, gguf-q8_0, gguf-q6_k, "
                   "gguf-q5_k, gguf-q4_k, gguf-q4_0"]
    assert not (tmp_path / "out").exists()


def test_interrupted_convert_leaves_no_partial_file(t2v_expert, tmp_path, monkeypatch):
    import wanlite.pipelines.convert as convert_mod

    calls = []

    def failing(tensor, qtype):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return gguf_quantize(tensor, qtype)

    monkeypatch.setattr(convert_mod, "gguf_quantize", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_mod.convert(t2v_expert[0], "t2v-A14B", "gguf-q8_0", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_generate_with_component_files_and_quant(tmp_path):
    from wanlite.pipelines.video_io import read_mp4_metadata

    root = write_fixture("ti2v-5B", "comfy", tmp_path / "comfy")
    assert main(["convert", "--ckpt_dir", str(root), "--task", "ti2v-5B", "--to", "gguf-q8_0",
                 "--out", str(tmp_path / "q8.gguf")]) == 0
    common = ["generate", "--task", "ti2v-5B", "--prompt", "a red square", "--size", "64*64", "--frame_num", "5",
              "--sample_steps", "2", "--base_seed", "1"]
    files = ["--dit", str(tmp_path / "q8.gguf"), "--t5", str(next((root / "text_encoders").glob("*.safetensors"))),
             "--vae", str(next((root / "vae").glob("*.safetensors")))]
    assert main(common + files + ["--save_file", str(tmp_path / "a.mp4")]) == 0  # no --ckpt_dir at all
    assert read_mp4_metadata(tmp_path / "a.mp4")["job"]["weights"]["quant"] == "auto"
    assert main(common + ["--ckpt_dir", str(root), "--quant", "fp8", "--save_file", str(tmp_path / "b.mp4")]) == 0
    assert read_mp4_metadata(tmp_path / "b.mp4")["job"]["weights"]["quant"] == "fp8"


@pytest.mark.parametrize("args,message", [
    (["--quant", "q2"], "--quant 'q2' is unknown; choose one of auto, none, fp8"),
    (["--quant", "int8", "--quant-backend", "tensorrt"], "--quant-backend 'tensorrt' is unknown"),
    (["--task", "t2v-A14B", "--dit", "X"], "--dit is for single-model tasks; t2v-A14B has two experts"),
    (["--high_noise_model", "X"], "--high_noise_model / --low_noise_model are for the A14B tasks"),
])
def test_bad_quant_and_component_flags_exit_2(tmp_path, capsys, args, message):
    base = ["generate", "--task", "ti2v-5B", "--prompt", "p", "--ckpt_dir", str(tmp_path)]
    if "--task" in args:
        base = base[:1] + base[3:]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_component_file_of_the_wrong_kind_is_named(tmp_path, capsys):
    root = write_fixture("ti2v-5B", "comfy", tmp_path / "comfy")
    vae = next((root / "vae").glob("*.safetensors"))
    assert main(["generate", "--task", "ti2v-5B", "--prompt", "p", "--ckpt_dir", str(root), "--t5", str(vae)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("holds a Wan VAE, not a umT5 text encoder; pass it with --vae")


def test_check_reports_stored_formats(t2v_expert, tmp_path, capsys):
    root = t2v_expert[0]
    assert main(["convert", "--ckpt_dir", str(root), "--task", "t2v-A14B", "--to", "gguf-q4_k",
                 "--out", str(tmp_path)]) == 0
    for name in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"):
        (tmp_path / name).write_bytes((root / name).read_bytes())
    shutil.copytree(root / "google", tmp_path / "google")
    capsys.readouterr()
    assert main(["check", "--task", "t2v-A14B", "--ckpt_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "gguf" in out and "Q4_K" in out


def test_parse_quant_names():
    assert json.dumps({"quant": parse_quant("gguf-q4_k").name}) == '{"quant": "gguf-q4_k"}'
    assert parse_quant("auto") is None and isinstance(parse_quant("fp8"), Fp8WeightConfig)
    assert np.isclose(FORMATS["Q4_K"].bits_per_weight, 4.5)


# floors ~2 dB under what the bundled model measures on this clip (fp8 28.9, int8 36.9, Q8_0 30.9, Q4_K 27.3 dB);
# a broken format lands far lower
@pytest.mark.parametrize("name,floor", [("fp8", 27), ("int8", 35), ("gguf-q8_0", 29), ("gguf-q4_k", 25)])
def test_bundled_tiny_model_generates_quantized(name, floor, tmp_path):
    """--quant on the bundled tiny-t2v: the same clip as the fp32 run, within a PSNR floor per format, and the
    square still moves the same way."""
    from wanlite import generate
    from wanlite.eval import measure_motion, psnr
    from wanlite.tiny import checkpoint_dir

    kw = dict(task="tiny-t2v", prompt="a red square moving right on a black background", seed=0, dtype="fp32",
              ckpt_dir=checkpoint_dir("tiny-t2v"), output_dir=tmp_path)
    reference = generate(**kw).frames
    out = generate(**kw, quant=name)
    assert out.frames.shape == reference.shape and psnr(out.frames, reference) >= floor
    assert measure_motion(out.frames, "red").direction == measure_motion(reference, "red").direction == "right"


def test_comfy_fp8_scaled_text_encoder_file(tmp_path):
    """`--t5 umt5_xxl_fp8_e4m3fn_scaled.safetensors`: ComfyUI's scaled fp8 umT5 loads with its matmuls kept fp8."""
    from safetensors.torch import load_file, save_file

    from wanlite.loading.checkpoints import component_from_file

    root = write_fixture("ti2v-5B", "comfy", tmp_path / "comfy")
    dense = load_file(next((root / "text_encoders").glob("*.safetensors")))
    scaled = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, t in dense.items():
        if key.endswith(".weight") and t.dim() == 2 and ".block." in key:
            scale = t.abs().max().float() / 448
            scaled[key] = (t.float() / scale).to(torch.float8_e4m3fn)
            scaled[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            scaled[key] = t
    save_file(scaled, str(tmp_path / "umt5_fp8_scaled.safetensors"))
    ref = load_t5(discover(root).t5, torch.float32)
    fp8 = load_t5(component_from_file("t5", tmp_path / "umt5_fp8_scaled.safetensors"), torch.float32)
    assert isinstance(fp8.encoder.block[0].layer[0].SelfAttention.q, QLinear)
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert sqnr(ref(input_ids=ids).last_hidden_state, fp8(input_ids=ids).last_hidden_state) > 30
