"""Our kernels/ and launcher/ folders never shadow installed packages, wherever a user runs from."""

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
        assert proc.stdout.strip() == str(ROOT / "kernels" / "flash_attn.py")
