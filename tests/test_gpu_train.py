"""The launcher on one GPU: bf16 training through DeepSpeed (NCCL), checkpoint and export."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_run_on_one_gpu_trains_checkpoints_and_exports(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "launcher/run.py", "--config", "recipes/demo-cpu.yaml", f"train.out_dir={out}",
         "train.max_steps=12", "train.save_every=6", "lora.enabled=true", "lora.train_embeddings=false",
         "lora.train_norms=false", "train.lr=3e-3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(rows) == 12 and sum(losses[-3:]) < sum(losses[:3]), losses
    assert 0 < rows[-1]["peak_mem_gib"] < 10
    assert json.loads((out / "ds_config.json").read_text())["bf16"]["enabled"] is True
    changes = json.loads((out / "run.json").read_text())["changes"]
    assert any("fused Triton kernel" in c for c in changes) and "attention: longctx_auto" in changes
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert model.dtype == torch.bfloat16
    assert (out / "adapter" / "adapter_config.json").exists()
