import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_only_under_wanlite(tmp_path):
    """quant/, cache/ and cli.py ship as wanlite.quant, wanlite.cache, wanlite.cli; nothing generic at top level."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("wanlite-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert all(n.startswith(("wanlite/", "wanlite-")) for n in names), [n for n in names if not n.startswith("wanlite")]
    for required in ("wanlite/cli.py", "wanlite/quant/__init__.py", "wanlite/cache/__init__.py",
                     "wanlite/cache/curves/tiny-t2v.json", "wanlite/lora/keys.py",
                     "wanlite/models/dit.py", "wanlite/testing/fixtures.py",
                     # the bundled tiny models travel inside the package, in their official layout
                     "wanlite/tiny/checkpoints/tiny-t2v/Wan2.1_VAE.pth",
                     "wanlite/tiny/checkpoints/tiny-t2v/high_noise_model/diffusion_pytorch_model-00001-of-00001.safetensors",
                     "wanlite/tiny/checkpoints/tiny-t2v/google/umt5-xxl/spiece.model",
                     "wanlite/tiny/checkpoints/tiny-ti2v/Wan2.2_VAE.pth"):
        assert required in names, required


def test_generic_names_do_not_leak_outside_the_checkout(tmp_path):
    code = ("import importlib.util, wanlite.cli, wanlite.quant, wanlite.cache; "
            "print([m for m in ('quant', 'cache', 'cli') if importlib.util.find_spec(m)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
