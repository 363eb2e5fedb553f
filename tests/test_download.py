"""`wanlite download` and `--ckpt_dir OWNER/NAME` against a local Hub on 127.0.0.1 (wanlite.testing.local_hub):
the real huggingface_hub code lists, resolves, redirects, resumes and caches; nothing leaves this machine."""
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanlite.cli import main
from wanlite.pipelines.request import Request
from wanlite.pipelines.resolve import resolve
from wanlite.planner import hypothetical
from wanlite.testing.local_hub import LocalHub
from wanlite.tiny import checkpoint_dir

TI2V = "Wan-AI/Wan2.2-TI2V-5B"


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Network allowed (CI sets HF_HUB_OFFLINE=1, which huggingface_hub read at import), every Hugging Face
    path inside tmp_path, small download chunks so a dropped connection leaves bytes to resume from."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    for name, value in (("HF_HUB_OFFLINE", False), ("HF_HOME", str(home)), ("HF_HUB_CACHE", str(home / "hub")),
                        ("HF_TOKEN_PATH", str(home / "token")), ("HF_STORED_TOKENS_PATH", str(home / "stored")),
                        ("DOWNLOAD_CHUNK_SIZE", 64 * 1024)):
        monkeypatch.setattr(constants, name, value)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def official_ti2v() -> dict:
    return LocalHub.from_folder(TI2V, checkpoint_dir("tiny-ti2v"))


def test_official_download_resumes_a_dropped_connection_and_checks(online, capsys):
    shard = "diffusion_pytorch_model-00001-of-00001.safetensors"
    out = online / "ti2v"
    with LocalHub(official_ti2v(), drop_once={f"{TI2V}/{shard}"}) as hub:
        assert main(["download", "--task", "ti2v-5B", "--format", "official", "--to", str(out),
                     "--endpoint", hub.endpoint]) == 0
        ranges = [r for method, path, r in hub.requests if method == "GET" and path.startswith("/cdn/") and r]
        assert ranges and int(ranges[0].split("=")[1].rstrip("-")) > 0  # resumed where the drop cut it
        first = len(hub.requests)
        assert main(["download", "--task", "ti2v-5B", "--format", "official", "--to", str(out),
                     "--endpoint", hub.endpoint]) == 0
        # complete files are not fetched again
        assert not [p for m, p, _ in hub.requests[first:] if m == "GET" and not p.startswith("/api/")]
    for name, data in official_ti2v()[TI2V].items():
        assert (out / name).read_bytes() == data
    text = capsys.readouterr().out
    assert "ok: every ti2v-5B component arrived" in text and f"--ckpt_dir {out}" in text


def _gguf_hub(tmp_path: Path) -> dict:
    """The repos a t2v-A14B GGUF download reads: QuantStack's experts (two quants each), Comfy-Org's umT5 and
    VAE, the official repo (its fp32 experts must stay untouched, its tokenizer is fetched)."""
    from wanlite.testing.quant_files import write_gguf_with_gguf_py

    tiny = checkpoint_dir("tiny-t2v")
    gguf = {}
    for role, tag in (("high_noise", "HighNoise"), ("low_noise", "LowNoise")):
        state = load_file(tiny / f"{role}_model" / "diffusion_pytorch_model-00001-of-00001.safetensors")
        for quant in ("Q4_K_M", "Q8_0"):
            path = write_gguf_with_gguf_py(state, tmp_path / f"{tag}-{quant}.gguf", "Q8_0")
            gguf[f"{tag}/Wan2.2-T2V-A14B-{tag}-{quant}.gguf"] = path.read_bytes()

    def as_safetensors(pth: str) -> bytes:
        path = tmp_path / (pth + ".safetensors")
        save_file(torch.load(tiny / pth, weights_only=True), str(path))
        return path.read_bytes()

    official = LocalHub.from_folder("Wan-AI/Wan2.2-T2V-A14B", tiny)["Wan-AI/Wan2.2-T2V-A14B"]
    return {"QuantStack/Wan2.2-T2V-A14B-GGUF": gguf,
            "Comfy-Org/Wan_2.1_ComfyUI_repackaged": {
                "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors":
                    as_safetensors("models_t5_umt5-xxl-enc-bf16.pth")},
            "Comfy-Org/Wan_2.2_ComfyUI_Repackaged": {
                "split_files/vae/wan_2.1_vae.safetensors": as_safetensors("Wan2.1_VAE.pth")},
            "Wan-AI/Wan2.2-T2V-A14B": official}


def test_gguf_download_fetches_one_quant_per_expert_and_nothing_else(online, capsys):
    (online / "src").mkdir()
    repos = _gguf_hub(online / "src")
    out = online / "gguf"
    with LocalHub(repos) as hub:
        assert main(["download", "--task", "t2v-A14B", "--format", "gguf-q4_k_m", "--to", str(out),
                     "--endpoint", hub.endpoint]) == 0
        resolved = {re.sub(r"^.*?/resolve/[^/]+/", "", p) for m, p, _ in hub.requests if "/resolve/" in p}
    assert resolved == {"HighNoise/Wan2.2-T2V-A14B-HighNoise-Q4_K_M.gguf",
                        "LowNoise/Wan2.2-T2V-A14B-LowNoise-Q4_K_M.gguf",
                        "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                        "split_files/vae/wan_2.1_vae.safetensors",
                        *(f"google/umt5-xxl/{f}" for f in ("spiece.model", "tokenizer.json", "tokenizer_config.json"))}
    assert not (out / "high_noise_model").exists()
    text = capsys.readouterr().out
    assert "t2v-A14B as gguf-q4_k_m: 7 files" in text and "ok: every t2v-A14B component arrived" in text


def test_missing_files_are_one_line_errors_and_nothing_half_written(online, capsys):
    repos = official_ti2v()
    del repos[TI2V]["Wan2.2_VAE.pth"]
    with LocalHub(repos) as hub:
        assert main(["download", "--task", "ti2v-5B", "--format", "official", "--to", "a",
                     "--endpoint", hub.endpoint]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no file like Wan2.2_VAE.pth in Wan-AI/Wan2.2-TI2V-5B" in err
    assert not (online / "a").exists()  # stopped before fetching anything
    shard = "diffusion_pytorch_model-00001-of-00001.safetensors"
    with LocalHub(official_ti2v(), hidden={f"{TI2V}/{shard}"}) as hub:  # listed, then 404
        assert main(["download", "--task", "ti2v-5B", "--format", "official", "--to", "b",
                     "--endpoint", hub.endpoint]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{TI2V}/{shard}: the file is gone from the repo" in err
    assert not (online / "b" / shard).exists()


def test_a_full_disk_stops_before_the_first_byte(online, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with LocalHub(official_ti2v()) as hub:
        assert main(["download", "--task", "ti2v-5B", "--format", "official", "--to", "c",
                     "--endpoint", hub.endpoint]) == 2
        assert not [p for m, p, _ in hub.requests if "/resolve/" in p]
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the files need 5.2 MB but its disk has 1.0 kB free" in err


def test_dry_run_needs_no_network_and_auto_asks_the_planner(capsys):
    assert main(["download", "--task", "t2v-A14B", "--format", "gguf-q4_k_m", "--lora", "lightning",
                 "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "HighNoise-Q4_K_M.gguf" in text and "LowNoise-Q4_K_M.gguf" in text
    assert "diffusion_pytorch_model" not in text  # never the fp32 experts for a GGUF
    assert "umt5_xxl_fp8_e4m3fn_scaled" in text and "high_noise_model.safetensors" in text
    assert main(["download", "--task", "t2v-A14B", "--vram", "12", "--dry-run"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "runs" in head and " as official" not in head and " as bf16" not in head
    assert main(["download", "--task", "t2v-A14B", "--gpu", "RTX 3060", "--dry-run"]) == 0  # a named card
    assert "the plan for RTX 3060, 12 GB VRAM" in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize("argv, message", [
    (["--format", "fp8", "--vram", "12"], "--gpu / --vram / --ram choose the format with --format auto"),
    (["--task", "ti2v-5B", "--lora", "lightning"], "exist for t2v-A14B and i2v-A14B"),
    (["--task", "s2v-14B", "--format", "diffusers"], "s2v-14B has no diffusers repo"),
    (["--format", "bf16"], "HF_HUB_OFFLINE is set"),  # CI's setting: downloading needs it unset
])
def test_bad_input_is_one_line_exit_2(argv, message, capsys):
    argv = argv if "--task" in argv else ["--task", "t2v-A14B", *argv]
    assert main(["download", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


def test_ckpt_dir_repo_id_reads_the_hf_cache_offline(online, monkeypatch, capsys):
    from huggingface_hub import constants, snapshot_download

    with LocalHub(official_ti2v()) as hub:  # as `hf download Wan-AI/Wan2.2-TI2V-5B` leaves it
        snapshot_download(TI2V, endpoint=hub.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["check", "--task", "ti2v-5B", "--ckpt_dir", TI2V]) == 0
    assert "ok: every ti2v-5B component" in capsys.readouterr().out
    job = resolve(Request(task="ti2v-5B", prompt="x", ckpt_dir=TI2V), hypothetical(24, 64))  # the Python API too
    assert Path(job.weights.ckpt_dir).is_relative_to(online / "hf" / "hub")
    assert main(["check", "--task", "ti2v-5B", "--ckpt_dir", "Nobody/Nothing"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds no snapshot of that repo" in err and str(online / "hf" / "hub") in err


def test_existing_folder_wins_over_a_repo_id(online, capsys):
    shutil.copytree(checkpoint_dir("tiny-ti2v"), online / "Wan-AI" / "Wan2.2-TI2V-5B")
    assert main(["check", "--task", "ti2v-5B", "--ckpt_dir", TI2V]) == 0
