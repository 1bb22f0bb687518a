"""longctx: long-context fine-tuning of RoPE language models on DeepSpeed."""

from pathlib import Path

# In a checkout, kernels/, launcher/ and ds_configs/ sit beside this folder; an install maps them to
# longctx.kernels, longctx.launcher and longctx.ds_configs (pyproject's package-dir). They have no __init__.py on purpose: with the checkout root on
# sys.path (python -m pytest, python -c from the root) a regular package named `kernels` would shadow the
# installed `kernels` that transformers imports, while a folder without one never shadows an installed package.
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "kernels" / "flash_attn" / "__init__.py").is_file() and (_CHECKOUT / "launcher" / "run.py").is_file():
    __path__.append(str(_CHECKOUT))
