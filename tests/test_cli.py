import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wanlite.cli import main
from wanlite.testing.fixtures import write_fixture

REPO = Path(__file__).resolve().parents[1]
ARCHS = ["t2v-A14B", "i2v-A14B", "ti2v-5B", "s2v-14B", "animate-14B", "vae2.1", "vae2.2", "umt5-xxl-encoder"]
COUNTS = {"t2v-A14B": (1095, 14_288_491_584), "ti2v-5B": (825, 4_999_787_712),
          "animate-14B": (1441, 17274817108),
          "s2v-14B": (1260, 16295755609), "umt5-xxl-encoder": (242, None),
          "vae2.1": (194, 126_892_531), "vae2.2": (196, 704_688_668)}


@pytest.mark.parametrize("arch", ARCHS)
def test_info_json_manifest_equals_official(arch, manifests, capsys):
    assert main(["info", "--arch", arch, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["manifest"] == manifests[arch]
    keys, params = COUNTS.get(arch, (None, None))
    assert keys is None or out["keys"] == keys
    assert params is None or out["parameters"] == params
    assert out["bytes"]["bf16"] > out["bytes"]["Q8_0"] >= out["bytes"]["fp8"] > out["bytes"]["Q4_K"] or arch.startswith("vae")


def test_info_table_and_both_entry_points():
    script = shutil.which("wanlite", path=str(Path(sys.executable).parent))  # the console script of this env
    assert script, "pip install -e . should have created the wanlite command"
    for cmd in ([sys.executable, "cli.py"], [script]):
        run = subprocess.run(cmd + ["info", "--arch", "t2v-A14B"], cwd=REPO, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert "14,288,491,584 parameters" in run.stdout and "28.58 GB" in run.stdout


def test_unknown_arch_is_one_line_exit_2():
    run = subprocess.run([sys.executable, "cli.py", "info", "--arch", "t2v-14B"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "choose one of" in run.stderr


@pytest.fixture(scope="module")
def official_t2v(tmp_path_factory):
    return write_fixture("t2v-A14B", "official", tmp_path_factory.mktemp("ck") / "t2v")


def test_check_reports_a_complete_checkpoint(official_t2v, capsys):
    assert main(["check", "--task", "t2v-A14B", "--ckpt_dir", str(official_t2v)]) == 0
    out = capsys.readouterr().out
    assert "high-noise" in out and "low-noise" in out and out.rstrip().endswith("match")


def _broken(src, dst, damage):
    shutil.copytree(src, dst)
    damage(dst)
    return dst


def _truncate(p):
    p.write_bytes(p.read_bytes()[:1000])


@pytest.mark.parametrize("damage,task,message", [
    (lambda d: shutil.rmtree(d / "high_noise_model"), "t2v-A14B", "high-noise expert of t2v-A14B is missing"),
    (lambda d: (d / "low_noise_model" / "diffusion_pytorch_model-00001-of-00002.safetensors").unlink(), "t2v-A14B",
     "which is missing"),
    (lambda d: _truncate(d / "low_noise_model" / "diffusion_pytorch_model-00002-of-00002.safetensors"), "t2v-A14B",
     "truncated"),
    (lambda d: None, "i2v-A14B", "holds a t2v-A14B transformer"),
    (lambda d: (d / "Wan2.1_VAE.pth").write_bytes(b"not a pickle"), "t2v-A14B", "Wan2.1_VAE.pth: not a plain"),
])
def test_check_bad_input_one_line_exit_2(official_t2v, tmp_path, damage, task, message):
    root = _broken(official_t2v, tmp_path / "ck", damage)
    run = subprocess.run([sys.executable, "cli.py", "check", "--task", task, "--ckpt_dir", str(root)],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    line = run.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert line.startswith("wanlite: error: ") and message in line, line
