"""Our kernels/ and launcher/ folders never shadow installed packages, wherever a user runs from."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import importlib.util, sys
sys.path.insert(0, {root!r})
from transformers import AutoModelForCausalLM  # transformers >= 5.25 imports Hugging Face's `kernels` package
import longctx.model, longctx.kernels.flash_attn, longctx.launcher.run
spec = importlib.util.find_spec("kernels")
assert spec is None or spec.origin is None or not spec.origin.startswith({root!r} + "/kernels/"), spec
print(longctx.kernels.flash_attn.__file__)
"""


def test_transformers_and_longctx_import_with_the_checkout_root_first_on_sys_path(tmp_path):
    for cwd in (ROOT, tmp_path):  # from the root itself ('' first on sys.path) and from elsewhere
        proc = subprocess.run([sys.executable, "-c", CHECK.format(root=str(ROOT))], cwd=cwd, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == str(ROOT / "kernels" / "flash_attn" / "__init__.py")


def test_an_installed_wheel_finds_its_launcher_kernels_and_deepspeed_templates(tmp_path):
    """An install has no checkout beside it: what the checkout finds by its folders, the wheel must carry."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("longctx-*.whl")
    subprocess.run([*pip, "install", str(wheel), "--no-deps", "-q", "--target", str(tmp_path / "site")],
                   check=True, capture_output=True, timeout=300)
    check = ("import longctx, longctx.kernels.flash_attn\n"
             "from longctx.launcher.dsconfig import template\n"
             "print(longctx.__file__, [template(s)['zero_optimization']['stage'] for s in range(4)])")
    proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(tmp_path / "site" / "longctx" / "__init__.py"), "[0,", "1,", "2,", "3]"]
