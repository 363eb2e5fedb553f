"""`--ckpt_dir` at a ComfyUI models/ folder holding several Wan models: the files that fit the task are picked
by their tensors; several fitting one role stop with one line that lists them and names the flag."""
import shutil
from pathlib import Path

import pytest

from wanlite.cli import main
from wanlite.loading.checkpoints import comfy_components
from wanlite.testing.fixtures import write_fixture
from wanlite.testing.tokenizer import write_tiny_tokenizer


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    """ComfyUI/models with T2V and I2V experts, TI2V-5B, both VAEs, a umT5, a LoRA and an unrelated file."""
    root = tmp_path_factory.mktemp("ComfyUI")
    models = root / "models"
    for task in ("t2v-A14B", "i2v-A14B", "ti2v-5B"):
        write_fixture(task, "comfy", models)
    (models / "loras").mkdir()
    (models / "loras" / "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors").write_bytes(b"not read")
    (models / "checkpoints").mkdir()
    return root


@pytest.mark.parametrize("task, files", [
    ("t2v-A14B", {"high_noise_model": "wan2.2_t2v_high_noise_14B_fp16", "low_noise_model": "wan2.2_t2v_low_noise_14B_fp16",
                  "vae": "wan_2.1_vae"}),
    ("i2v-A14B", {"high_noise_model": "wan2.2_i2v_high_noise_14B_fp16", "low_noise_model": "wan2.2_i2v_low_noise_14B_fp16",
                  "vae": "wan_2.1_vae"}),
    ("ti2v-5B", {"dit": "wan2.2_ti2v_5B_fp16", "vae": "wan2.2_vae"}),
])
def test_each_task_finds_its_files(comfyui, task, files, capsys):
    picked = comfy_components(comfyui / "models", task)
    assert {flag: path.name.removesuffix(".safetensors") for flag, path in picked.items()} == {
        **files, "t5": "umt5_xxl_fp16"}
    assert main(["check", "--task", task, "--ckpt_dir", str(comfyui / "models")]) == 0
    assert f"ok: every {task} component" in capsys.readouterr().out


def test_the_comfyui_folder_itself_works(comfyui, capsys):
    assert main(["check", "--task", "ti2v-5B", "--ckpt_dir", str(comfyui)]) == 0


def test_two_files_for_one_role_ask_the_user(comfyui, tmp_path, capsys):
    models = tmp_path / "models"
    shutil.copytree(comfyui / "models", models)
    (models / "unet").mkdir()
    other = models / "unet" / "my_t2v_high_noise_finetune.safetensors"
    shutil.copy(models / "diffusion_models" / "wan2.2_t2v_high_noise_14B_fp16.safetensors", other)
    assert main(["check", "--task", "t2v-A14B", "--ckpt_dir", str(models)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "2 files fit the high-noise expert of t2v-A14B" in err
    assert "diffusion_models/wan2.2_t2v_high_noise_14B_fp16.safetensors" in err and "unet/my_t2v" in err
    assert "--high_noise_model FILE" in err
    assert main(["check", "--task", "t2v-A14B", "--ckpt_dir", str(models), "--high_noise_model", str(other)]) == 0
    assert main(["check", "--task", "i2v-A14B", "--ckpt_dir", str(models)]) == 0  # the copy is no i2v expert


def test_plan_and_the_python_api_read_the_folder_too(comfyui, capsys):
    from wanlite.pipelines.request import Request
    from wanlite.pipelines.resolve import resolve
    from wanlite.planner import hypothetical

    assert main(["plan", "--task", "t2v-A14B", "--ckpt_dir", str(comfyui / "models"), "--vram", "12"]) == 0
    job = resolve(Request(task="t2v-A14B", prompt="x", ckpt_dir=comfyui / "models"), hypothetical(12, 32))
    files = {flag: Path(path).name for flag, path in job.weights.files}
    assert files["high_noise_model"] == "wan2.2_t2v_high_noise_14B_fp16.safetensors" and files["vae"] == "wan_2.1_vae.safetensors"


def test_tokenizer_can_live_anywhere_in_the_folder(comfyui, tmp_path, capsys):
    models = tmp_path / "models"
    shutil.copytree(comfyui / "models", models)
    shutil.rmtree(models / "text_encoders" / "umt5-xxl")
    assert main(["check", "--task", "ti2v-5B", "--ckpt_dir", str(models)]) == 2
    assert "no umT5 tokenizer found" in capsys.readouterr().err
    write_tiny_tokenizer(models / "text_encoders" / "google" / "umt5-xxl", 384)
    assert main(["check", "--task", "ti2v-5B", "--ckpt_dir", str(models)]) == 0
