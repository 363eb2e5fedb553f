import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from wanlite.errors import CheckpointError
from wanlite.loading.checkpoints import discover
from wanlite.loading.models import expert_components, load_dit, load_t5, load_vae
from wanlite.loading.safetensors_file import SafetensorsFile, read_header
from wanlite.models.blocks import keeps_fp32
from wanlite.testing.fixtures import build_tiny_models, write_fixture

TASKS = ("t2v-A14B", "i2v-A14B", "ti2v-5B")
LAYOUTS = ("official", "diffusers", "comfy")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {(t, lay): write_fixture(t, lay, root / f"{t}-{lay}") for t in TASKS for lay in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("task", TASKS)
def test_every_layout_loads_every_component_exactly(fixtures, task, layout):
    dits, vae, t5 = build_tiny_models(task)  # the same seed the fixture writer used
    stored = torch.float16 if layout == "comfy" else torch.float32  # ComfyUI files are fp16 here
    ckpt = discover(fixtures[task, layout])
    experts = expert_components(ckpt, task)
    assert set(experts) == set(dits)
    for role, comp in experts.items():
        assert comp.layout == layout
        loaded = load_dit(comp, task, dtype=torch.float32)
        for name, ref in dits[role].state_dict().items():
            assert torch.equal(loaded.state_dict()[name], ref.to(stored).float()), (role, name)
    loaded_vae = load_vae(ckpt.vae, task)  # fp32 in every fixture layout
    for name, ref in vae.state_dict().items():
        assert torch.equal(loaded_vae.state_dict()[name], ref), name
    loaded_t5 = load_t5(ckpt.t5, dtype=torch.float32)
    t5_stored = torch.bfloat16 if layout == "official" else stored  # the official .pth is bf16
    for name, ref in t5.state_dict().items():
        assert torch.equal(loaded_t5.state_dict()[name], ref.to(t5_stored).float()), name
    assert ckpt.tokenizer is not None and ckpt.tokenizer.is_dir()


def test_experts_are_told_apart(fixtures):
    dits, _, _ = build_tiny_models("t2v-A14B")
    for layout in LAYOUTS:
        experts = expert_components(discover(fixtures["t2v-A14B", layout]), "t2v-A14B")
        high = load_dit(experts["high_noise"], "t2v-A14B", torch.float32)
        w = "blocks.0.self_attn.q.weight"
        assert torch.allclose(high.state_dict()[w], dits["high_noise"].state_dict()[w], atol=1e-3)
        assert not torch.allclose(high.state_dict()[w], dits["low_noise"].state_dict()[w], atol=1e-3)


def test_bf16_load_keeps_fp32_islands_and_matches_forward(fixtures):
    comp = expert_components(discover(fixtures["ti2v-5B", "official"]), "ti2v-5B")["main"]
    dit = load_dit(comp, "ti2v-5B", dtype=torch.bfloat16)
    for name, t in dit.state_dict().items():
        assert t.dtype == (torch.float32 if keeps_fp32(name) else torch.bfloat16), name
    ref = build_tiny_models("ti2v-5B")[0]["main"]
    x, ctx = torch.randn(1, 48, 2, 4, 4), [torch.randn(6, 64)]
    with torch.no_grad():
        a, b = dit(x, torch.tensor([700]), ctx), ref(x, torch.tensor([700]), ctx)
    assert float((a - b).norm() / b.norm()) < 0.05


def test_cli_module_writes_fixture(tmp_path):
    from wanlite.testing.__main__ import main

    assert main(["--task", "ti2v-5B", "--layout", "comfy", "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "diffusion_models" / "wan2.2_ti2v_5B_fp16.safetensors").is_file()


# --- bad input: one clear line naming the file ---

def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_expert_folder(fixtures, tmp_path):
    import shutil

    root = _copy(fixtures["t2v-A14B", "official"], tmp_path / "ck")
    shutil.rmtree(root / "low_noise_model")
    with pytest.raises(CheckpointError, match="low-noise expert of t2v-A14B is missing"):
        expert_components(discover(root), "t2v-A14B")


def test_index_pointing_to_missing_shard(fixtures, tmp_path):
    root = _copy(fixtures["t2v-A14B", "official"], tmp_path / "ck")
    (root / "high_noise_model" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"lists shard diffusion_pytorch_model-00002-of-00002\.safetensors, which is missing"):
        discover(root)


def test_truncated_safetensors(fixtures, tmp_path):
    root = _copy(fixtures["ti2v-5B", "comfy"], tmp_path / "ck")
    f = root / "diffusion_models" / "wan2.2_ti2v_5B_fp16.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        discover(root)
    assert str(f) in str(err.value)


def test_checkpoint_for_another_task(fixtures):
    comp = expert_components(discover(fixtures["ti2v-5B", "comfy"]), "ti2v-5B")["main"]
    with pytest.raises(CheckpointError, match=r"holds a ti2v-5B transformer .* --task t2v-A14B needs 16 in / 16 out"):
        load_dit(comp, "t2v-A14B")


def test_vae_for_another_task(fixtures):
    ckpt = discover(fixtures["ti2v-5B", "official"])
    with pytest.raises(CheckpointError, match="Wan2.2 VAE but --task t2v-A14B decodes with the Wan2.1 VAE"):
        load_vae(ckpt.vae, "t2v-A14B")


class Payload:  # a pickled object that is not a tensor
    pass


def test_pth_with_non_tensor_payload(tmp_path):
    bad = tmp_path / "Wan2.1_VAE.pth"
    torch.save({"decoder.middle.0.residual.0.gamma": Payload()}, bad)
    with pytest.raises(CheckpointError, match="weights_only") as err:
        discover(tmp_path)
    assert str(bad) in str(err.value)
    torch.save({"decoder.middle.0.residual.0.gamma": "a string"}, bad)
    with pytest.raises(CheckpointError, match="is not a tensor"):
        discover(tmp_path)


def test_missing_path():
    with pytest.raises(CheckpointError, match="does not exist"):
        discover("/nonexistent/wan")


# --- the safetensors header validator ---

def _raw_file(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header,data,message", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8, "its shape needs 8"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}}, b"\0" * 8, "spans bytes"),
    ({"w": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "overlap"),
])
def test_header_validation(tmp_path, header, data, message):
    with pytest.raises(CheckpointError, match=message):
        read_header(_raw_file(tmp_path / "x.safetensors", header, data))


def test_header_length_beyond_file(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(CheckpointError, match="beyond the format's limit"):
        read_header(f)
    f.write_bytes(struct.pack("<Q", 5000) + b"{}")
    with pytest.raises(CheckpointError, match="truncated: its header alone needs 5008 bytes"):
        read_header(f)


def test_chunked_cast_read_is_exact(tmp_path, monkeypatch):
    import wanlite.loading.safetensors_file as sf

    monkeypatch.setattr(sf, "SCRATCH_BYTES", 64)  # force many chunks
    t = torch.randn(37, 11)
    save_file({"t": t}, str(tmp_path / "t.safetensors"))
    with SafetensorsFile(tmp_path / "t.safetensors") as f:
        assert torch.equal(f.read("t", torch.bfloat16), t.to(torch.bfloat16))
        assert torch.equal(f.read("t"), t)


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_DONTNEED"), reason="no madvise on this OS")
def test_pth_pages_leave_the_resident_set_once_copied(tmp_path):
    """A .pth is memory-mapped; each tensor's pages are dropped from RSS after its copy, so loading holds the
    copy, not the copy and the file (the umT5 stage of bench/results/stage_memory.json), and the data read
    again afterwards is still right."""
    import psutil

    from wanlite.loading.stream import PthSource

    stored = torch.randn(64, 1024, 1024)  # 268 MB
    torch.save({"w": stored}, tmp_path / "w.pth")
    source = PthSource(tmp_path / "w.pth")
    before = psutil.Process().memory_info().rss
    [(_, copy)] = list(source.fill([("w", stored.shape, torch.float32)]))
    grown = psutil.Process().memory_info().rss - before
    assert grown < 1.4 * stored.nbytes, grown / stored.nbytes  # without dropping the pages: about 2x
    assert torch.equal(copy, stored) and torch.equal(source.tensors["w"], stored)


def test_fill_reads_ahead_in_file_order_and_reuses_two_buffers_for_transient_weights(tmp_path):
    """Every tensor arrives exact, in file order across shards; transient ones (the caller quantizes and drops
    them) alternate between two buffers while the others are fresh tensors the caller may keep."""
    from wanlite.loading.stream import SafetensorsSource

    g = torch.Generator().manual_seed(0)
    shards = [{f"{s}.{k}": torch.randn(5 + k, 7, generator=g) for k in range(4)} for s in "ab"]
    for i, tensors in enumerate(shards):
        save_file(tensors, str(tmp_path / f"{i}.safetensors"))
    source = SafetensorsSource([tmp_path / "1.safetensors", tmp_path / "0.safetensors"])
    stored = {k: v for tensors in shards for k, v in tensors.items()}
    plan = [(k, v.shape, torch.bfloat16) for k, v in reversed(stored.items())]
    transient = frozenset(k for k in stored if k.endswith((".1", ".2", ".3")))
    seen, buffers = [], []
    for key, tensor in source.fill(plan, transient):
        assert torch.equal(tensor, stored[key].to(torch.bfloat16)), key
        seen.append(key)
        if key in transient:
            buffers.append(tensor.untyped_storage().data_ptr())
    assert seen == [*shards[1], *shards[0]]  # shard order as given, file order inside each
    assert len(set(buffers)) == 2 and len(buffers) == 6
