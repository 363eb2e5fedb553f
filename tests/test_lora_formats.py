"""LoRAs as trainers write them (LyCORIS LoHa / LoKr, PEFT adapter folders, ai-toolkit's two-expert files) and
the runtime branch on every targeted layer, the fp32 embeddings and head included."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wanlite.errors import WanliteError
from wanlite.loading.checkpoints import discover
from wanlite.loading.models import expert_components, load_dit
from wanlite.lora import lora_sets, map_lora, read_tensors
from wanlite.lora.keys import expert_half
from wanlite.specs import TINY_DIT_SPECS
from wanlite.testing.fixtures import write_fixture

TASK = "t2v-A14B"
OUTSIDE_BLOCKS = ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                  "time_projection.1", "head.head")
IN_BLOCK = ("blocks.0.self_attn.q", "blocks.0.cross_attn.o", "blocks.1.ffn.0", "blocks.1.ffn.2")


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    return expert_components(discover(write_fixture(TASK, "official", tmp_path_factory.mktemp("lf") / "ck")), TASK)


def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 16, 2, 8, 8, generator=g), torch.tensor([900.0, 700.0]),
            torch.randn(2, 7, TINY_DIT_SPECS[TASK].text_dim, generator=g))


def shape_of(model, name):
    return tuple(model.get_submodule(name).weight.shape)


def forward(experts, lora_file=None, mode="auto", dtype=torch.float32, role="high_noise", **files):
    sets = {} if lora_file is None else lora_sets([str(lora_file)], [], [], {role: experts[role]}, TASK, mode)
    model = load_dit(experts[role], TASK, dtype, lora=sets.get(role))
    with torch.no_grad():
        return model(*inputs()).float(), sets.get(role)


@pytest.mark.parametrize("layer", OUTSIDE_BLOCKS + IN_BLOCK)
def test_a_runtime_branch_changes_its_layer_as_merging_does(tmp_path, experts, layer):
    """Each targeted layer alone: the runtime branch moves the output exactly as the merged weight does (before
    the fix, the four fp32 layers lost their branch while it was still counted as applied)."""
    base_model = load_dit(experts["high_noise"], TASK, torch.float32)
    out_f, in_f = shape_of(base_model, layer)
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "one.safetensors"
    save_file({f"diffusion_model.{layer}.lora_down.weight": torch.randn(4, in_f, generator=g) * 0.3,
               f"diffusion_model.{layer}.lora_up.weight": torch.randn(out_f, 4, generator=g) * 0.3}, str(path))
    base, _ = forward(experts)
    merged, merged_set = forward(experts, path, "merge")
    branched, branch_set = forward(experts, path, "runtime")
    moved = (merged - base).abs().max()
    assert moved > 1e-3  # the LoRA does something here
    assert (branched - merged).abs().max() <= 1e-4 * max(1.0, float(moved))
    assert (merged_set.counts["merged"], branch_set.counts["runtime"]) == (1, 1)


def test_the_distill_lora_layout_matches_in_both_modes_under_fp8(tmp_path, experts):
    """Pairs on every block Linear and on the embeddings and head, plus .diff / .diff_b deltas (the 4-step
    distill LoRAs' layout): fp8 weights take them as branches; the output matches merging within fp8 noise."""
    model = load_dit(experts["high_noise"], TASK, torch.float32)
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or name in OUTSIDE_BLOCKS:
            out_f, in_f = module.weight.shape
            tensors[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.2
            tensors[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.2
    tensors["diffusion_model.head.head.diff_b"] = torch.randn(model.head.head.bias.shape, generator=g) * 0.1
    path = tmp_path / "distill.safetensors"
    save_file(tensors, str(path))
    from wanlite.quant import parse_quant, sqnr

    outs = {}
    for mode in ("merge", "runtime"):
        sets = lora_sets([str(path)], [], [], {"high_noise": experts["high_noise"]}, TASK, mode)
        quant = None if mode == "merge" else parse_quant("fp8")
        m = load_dit(experts["high_noise"], TASK, torch.bfloat16, quant, sets["high_noise"])
        with torch.no_grad():
            outs[mode] = m(*inputs()).float()
    base = load_dit(experts["high_noise"], TASK, torch.bfloat16, parse_quant("fp8"))
    with torch.no_grad():
        plain = base(*inputs()).float()
    effect = outs["merge"] - plain
    assert sqnr(effect, outs["runtime"] - plain) >= 28  # measured 32.8 dB (fp8 noise); -0.07 dB with the four lost


def loha_tensors(prefix, out_f, in_f, rank=3, alpha=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {f"{prefix}.hada_w1_a": torch.randn(out_f, rank, generator=g) * 0.3,
         f"{prefix}.hada_w1_b": torch.randn(rank, in_f, generator=g) * 0.3,
         f"{prefix}.hada_w2_a": torch.randn(out_f, rank, generator=g) * 0.3,
         f"{prefix}.hada_w2_b": torch.randn(rank, in_f, generator=g) * 0.3, f"{prefix}.alpha": torch.tensor(alpha)}
    want = (alpha / rank) * (t[f"{prefix}.hada_w1_a"] @ t[f"{prefix}.hada_w1_b"]) * (
        t[f"{prefix}.hada_w2_a"] @ t[f"{prefix}.hada_w2_b"])
    return t, want


def lokr_tensors(prefix, out_f, in_f, form, alpha=4.0, seed=0):
    """LoKr factors with w1 [2, 2]: `low` stores w2 low-rank (rank 2), `full` whole, `both` w1 low-rank too."""
    g = torch.Generator().manual_seed(seed)
    a2, b2 = out_f // 2, in_f // 2
    w1 = torch.randn(2, 2, generator=g)
    t = {f"{prefix}.alpha": torch.tensor(alpha)}
    if form == "both":
        t[f"{prefix}.lokr_w1_a"], t[f"{prefix}.lokr_w1_b"] = torch.randn(2, 1, generator=g), torch.randn(1, 2, generator=g)
        w1 = t[f"{prefix}.lokr_w1_a"] @ t[f"{prefix}.lokr_w1_b"]
    else:
        t[f"{prefix}.lokr_w1"] = w1
    if form == "full":
        w2 = t[f"{prefix}.lokr_w2"] = torch.randn(a2, b2, generator=g) * 0.1
        scale = 1.0  # LyCORIS / ComfyUI: no low-rank factor, no alpha scaling
    else:
        t[f"{prefix}.lokr_w2_a"], t[f"{prefix}.lokr_w2_b"] = (torch.randn(a2, 2, generator=g) * 0.3,
                                                            torch.randn(2, b2, generator=g) * 0.3)
        w2 = t[f"{prefix}.lokr_w2_a"] @ t[f"{prefix}.lokr_w2_b"]
        scale = alpha / 2
    return t, scale * torch.kron(w1, w2)


@pytest.mark.parametrize("kind", ["loha", "lokr-low", "lokr-full", "lokr-both"])
@pytest.mark.parametrize("naming", ["musubi", "native"])
def test_lycoris_updates_merge_and_branch_to_the_trainers_delta(tmp_path, experts, kind, naming):
    model = load_dit(experts["high_noise"], TASK, torch.float32)
    tensors, wants = {}, {}
    for i, name in enumerate(("blocks.0.self_attn.q", "blocks.1.ffn.0", "head.head")):
        out_f, in_f = shape_of(model, name)
        prefix = "lora_unet_" + name.replace(".", "_") if naming == "musubi" else f"diffusion_model.{name}"
        t, wants[name] = (loha_tensors(prefix, out_f, in_f, seed=i) if kind == "loha"
                          else lokr_tensors(prefix, out_f, in_f, kind.split("-")[1], seed=i))
        tensors |= t
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(path))
    mapped = map_lora(path, read_tensors(path), model)
    assert not mapped.unmatched
    for name, want in wants.items():  # the update each layer gets, as the trainer defines it
        got = mapped.kron[name].delta() if name in mapped.kron else (
            mapped.low_rank[name].up * mapped.low_rank[name].scale) @ mapped.low_rank[name].down
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    reference = load_dit(experts["high_noise"], TASK, torch.float32)
    with torch.no_grad():
        for name, want in wants.items():
            reference.get_submodule(name).weight += 0.8 * want
        expected = reference(*inputs())
    for mode in ("merge", "runtime"):
        sets = lora_sets([f"{path}:0.8"], [], [], {"high_noise": experts["high_noise"]}, TASK, mode)
        got_model = load_dit(experts["high_noise"], TASK, torch.float32, lora=sets["high_noise"])
        with torch.no_grad():
            got = got_model(*inputs())
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), mode


def test_musubi_lokr_with_a_full_w2_divides_alpha_by_its_larger_side(tmp_path, experts):
    model = load_dit(experts["high_noise"], TASK, torch.float32)
    out_f, in_f = shape_of(model, "blocks.0.self_attn.q")
    tensors, want = lokr_tensors("lora_unet_blocks_0_self_attn_q", out_f, in_f, "full", alpha=4.0)
    tensors["lokr_factor"] = torch.tensor(2)  # musubi-tuner records its factorization
    path = tmp_path / "musubi.safetensors"
    save_file(tensors, str(path))
    got = map_lora(path, read_tensors(path), model).kron["blocks.0.self_attn.q"].delta()
    assert torch.allclose(got, want * 4.0 / max(out_f // 2, in_f // 2), atol=1e-6)


def test_tucker_lycoris_is_refused_with_the_reason(tmp_path, experts):
    model = load_dit(experts["high_noise"], TASK, torch.float32)
    out_f, in_f = shape_of(model, "blocks.0.self_attn.q")
    tensors, _ = loha_tensors("diffusion_model.blocks.0.self_attn.q", out_f, in_f)
    tensors["diffusion_model.blocks.0.self_attn.q.hada_t1"] = torch.zeros(3, 3, 1, 1)
    path = tmp_path / "tucker.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(WanliteError, match="Tucker-decomposed LyCORIS update"):
        map_lora(path, read_tensors(path), model)


@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_adapter_folder_applies_its_alpha_over_rank(tmp_path, experts, rslora):
    model = load_dit(experts["high_noise"], TASK, torch.float32)
    folder = tmp_path / "adapter"
    folder.mkdir()
    g = torch.Generator().manual_seed(3)
    tensors, want = {}, {}
    for name, rank in (("blocks.0.self_attn.q", 4), ("blocks.1.ffn.2", 2)):
        out_f, in_f = shape_of(model, name)
        down, up = torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)
        tensors[f"base_model.model.{name}.lora_A.weight"] = down
        tensors[f"base_model.model.{name}.lora_B.weight"] = up
        alpha = 6.0 if name.endswith("ffn.2") else 16.0
        want[name] = (alpha / (rank ** 0.5 if rslora else rank)) * up @ down
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "rank_pattern": {"ffn.2": 2}, "alpha_pattern": {"ffn.2": 6},
         "use_rslora": rslora}), encoding="utf-8")
    for given in (folder, folder / "adapter_model.safetensors"):  # the folder, or its weights file
        mapped = map_lora(Path(given), read_tensors(Path(given)), model)
        for name, delta in want.items():
            pair = mapped.low_rank[name]
            assert torch.allclose(pair.scale * pair.up @ pair.down, delta, atol=1e-5)


def test_ai_toolkit_two_expert_file_applies_each_half_to_its_expert(tmp_path, experts):
    model = load_dit(experts["high_noise"], TASK, torch.float32)
    g = torch.Generator().manual_seed(4)
    halves = {}
    for stage in ("transformer_1", "transformer_2"):
        out_f, in_f = shape_of(model, "blocks.0.self_attn.q")
        halves[stage] = {"blocks.0.self_attn.q.lora_A.weight": torch.randn(4, in_f, generator=g),
                         "blocks.0.self_attn.q.lora_B.weight": torch.randn(out_f, 4, generator=g) * 0.1}
    combined = {f"diffusion_model.{stage}.{k}": v for stage, t in halves.items() for k, v in t.items()}
    save_file(combined, str(tmp_path / "both.safetensors"))
    save_file({f"diffusion_model.{k}": v for k, v in halves["transformer_1"].items()}, str(tmp_path / "high.safetensors"))
    save_file({f"diffusion_model.{k}": v for k, v in halves["transformer_2"].items()}, str(tmp_path / "low.safetensors"))
    one = lora_sets([str(tmp_path / "both.safetensors")], [], [], experts, TASK, "merge")
    split = lora_sets([], [str(tmp_path / "high.safetensors")], [str(tmp_path / "low.safetensors")], experts, TASK,
                      "merge")
    for role in ("high_noise", "low_noise"):
        a = load_dit(experts[role], TASK, torch.float32, lora=one[role]).blocks[0].self_attn.q.weight
        b = load_dit(experts[role], TASK, torch.float32, lora=split[role]).blocks[0].self_attn.q.weight
        assert torch.equal(a, b)
    assert not torch.equal(one["high_noise"].loras[0][0].low_rank["blocks.0.self_attn.q"].up,
                           one["low_noise"].loras[0][0].low_rank["blocks.0.self_attn.q"].up)
    with pytest.raises(WanliteError, match="holds LoRAs for two experts"):
        expert_half(combined, "main", tmp_path / "both.safetensors")
