"""The memory planner: counts against hand-computed numbers and transformers' own parameter
counts, the measured plain-Hugging-Face anchor, each feature switch, the search, the CLI,
the launcher's refusal, and the recipes' planner comments."""

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from longctx.activation_checkpointing import Layout
from longctx.config import LORA_TARGETS_ALL, PLANNER_CHOICES, ConfigError, load_recipe
from longctx.launcher.fit import candidates, choose, from_recipe, longest_fitting, refusal, resolve_auto
from longctx.launcher.memory_model import (GiB, Cluster, Features, ModelShape, Settings, attention_workspace, estimate,
                                           loss_working_set, model_states, saved_per_token)
from longctx.launcher.plan import main, parse_bytes

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "llama3-8b-lora-1gpu.yaml")
# Llama-3.1-8B's published architecture
LLAMA_8B = ModelShape(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256)
ONE_H100 = Cluster(nodes=1, gpus_per_node=1, gpu_mem=80 * GiB, host_mem=125 * GiB)
# plain Hugging Face: SDPA without a mask (flash), gradient checkpointing, LoRA r=16 on all
# linears with peft's fp32 adapters, bf16, full logits, torch AdamW
PLAIN_HF = Features(engine="torch", adapter_fp32=True, loss="full", attention="sdpa-flash")
HF_SETTINGS = Settings(zero_stage=0, checkpointing="full")


@pytest.mark.parametrize("config_dir", ["longctx/assets/demo-llama", "longctx/assets/llama-3.1-70b"])
def test_parameter_count_equals_transformers(config_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / config_dir))
    assert ModelShape.from_config_dir(ROOT / config_dir).params == sum(p.numel() for p in model.parameters())


def test_lora_count_equals_peft_on_the_demo_model():
    from longctx.model import add_lora, build_model, scaled_config

    recipe = load_recipe(str(ROOT / "recipes/demo-cpu.yaml"), ["lora.enabled=true", "lora.train_embeddings=false",
                                                               "lora.train_norms=false", "lora.r=8"])
    config, _ = scaled_config(recipe)
    model = add_lora(build_model(recipe, config, torch.float32, torch.device("cpu")), recipe.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ModelShape.from_config_dir(ROOT / "longctx/assets/demo-llama").lora_params(8, tuple(LORA_TARGETS_ALL)) == trainable


def test_8b_counts_by_hand():
    assert LLAMA_8B.params == 8_030_261_248
    assert LLAMA_8B.lora_params(16, tuple(LORA_TARGETS_ALL)) == 41_943_040  # peft prints this for Llama-3-8B
    # per token per layer, bf16, LoRA with frozen norms: two norms (fp32 input 4h + bf16 output 2h);
    # q and k after RoPE, v and the kernel output, which o_proj reads as a view (2 bytes x 128 x
    # (32 + 8 + 8 + 32)), the fp32 logsumexp (4 x 32); SwiGLU 4 x 2 x 14336; 7 adapters x 2 bytes x r
    norms = 2 * (4 * 4096 + 2 * 4096)
    attention = 2 * 128 * (32 + 8 + 8 + 32) + 4 * 32
    assert saved_per_token(LLAMA_8B, Features()) == norms + attention + 4 * 2 * 14336 + 7 * 16 * 2
    # a tiled MLP keeps its input alone (the norm's output): its adapters are recomputed with each tile
    assert saved_per_token(LLAMA_8B, Features(mlp_tile_tokens=4096)) == norms + attention + 4 * 16 * 2


def test_zero3_full_finetune_states_by_hand():
    f = Features(lora_r=None)
    gpu, host = model_states(LLAMA_8B, f, Settings(zero_stage=3), world=8)
    p, layer, head = LLAMA_8B.params, LLAMA_8B.layer_params, LLAMA_8B.head_params
    assert gpu["weights"] == p * 2 // 8 + (layer + head) * 2  # shard + one layer gathered + the head prefetched
    assert gpu["gradients"] == p * 2 // 8 and gpu["optimizer states"] == p * 12 // 8
    gpu, host = model_states(LLAMA_8B, f, Settings(zero_stage=2, offload_optimizer=True), world=8)
    assert gpu["weights"] == p * 2 and gpu["optimizer states"] == 0 and gpu["gradients"] == 0
    assert host["offloaded optimizer"] == p * 12 // 8 + p * 4 // 8  # fp32 master, m, v, and the fp32 gradient


def test_loss_and_attention_switches_by_hand():
    n = 16384
    assert loss_working_set(LLAMA_8B, PLAIN_HF, n) == n * 128256 * (2 + 12)
    assert loss_working_set(LLAMA_8B, Features(), n) == 4096 * 128256 * (4 + 2)
    sdpa_mask = estimate(LLAMA_8B, Features(attention="sdpa-mask"), Settings(), ONE_H100, n)
    flash = estimate(LLAMA_8B, Features(), Settings(), ONE_H100, n)
    assert sdpa_mask.gpu["attention mask"] == n * n
    assert sdpa_mask.gpu["layer working set"] - flash.gpu["layer working set"] == n * n * 2  # its bf16 bias
    eager = estimate(LLAMA_8B, Features(attention="eager"), Settings(sp=2), Cluster(gpus_per_node=2), n)
    flash2 = estimate(LLAMA_8B, Features(), Settings(sp=2), Cluster(gpus_per_node=2), n)
    assert eager.gpu["layer working set"] - flash2.gpu["layer working set"] == 16 * n * n * (4 + 2)


def test_s2_attention_scores_and_masks_span_one_group():
    n, group = 16384, 4096
    eager = Features(attention="eager")
    full = estimate(LLAMA_8B, eager, Settings(sp=2), Cluster(gpus_per_node=2), n)
    s2 = estimate(LLAMA_8B, replace(eager, attention_group=group), Settings(sp=2), Cluster(gpus_per_node=2), n)
    # each of this rank's 16 heads keeps (seq x group) fp32 probabilities and their bf16 cast, not (seq x seq); the
    # recomputed layer keeps one more copy of the attention output (below) for this rank's n/2 tokens
    copy = n // 2 * LLAMA_8B.heads * LLAMA_8B.head_dim * 2
    assert full.gpu["layer working set"] - s2.gpu["layer working set"] == 16 * n * (n - group) * (4 + 2) - copy
    assert s2.gpu["attention mask"] == n * group * 2
    # linear-memory kernels keep what they kept, and a layer without checkpointing one more copy of the output: o_proj
    # reads the halves' outputs joined (an 8B step at 64K with 14 such layers ran out of memory on an H100 where full
    # attention's peak was 74.4 GiB, BENCHMARKS.md)
    plain = Layout(0, 0, LLAMA_8B.layers)
    flash = estimate(LLAMA_8B, Features(), Settings(), ONE_H100, n, plain)
    s2 = estimate(LLAMA_8B, Features(attention_group=group), Settings(), ONE_H100, n, plain)
    extra = {k: s2.gpu[k] - flash.gpu[k] for k in flash.gpu if s2.gpu[k] != flash.gpu[k]}
    assert extra == {"not-checkpointed layers": LLAMA_8B.layers * n * LLAMA_8B.heads * LLAMA_8B.head_dim * 2}
    # a recipe: groups of a quarter of the sequence by default; auto runs a row of one document's groups as rows of
    # their own through SDPA, whose cuDNN backward workspace then covers one half of the heads at a time
    _, f, _ = from_recipe(load_recipe(RECIPE, ["attention.train_pattern=s2", f"data.seq_len={n}"]))
    assert (f.attention, f.attention_group) == ("cudnn", n // 4)
    cudnn = replace(Features(attention="cudnn"), attention_group=group)
    assert attention_workspace(LLAMA_8B, cudnn) * 2 == attention_workspace(LLAMA_8B, Features(attention="cudnn"))


def test_s2_counts_the_output_copy_and_the_kv_heads_it_repeats():
    # per token and layer in bf16: one more output (heads x dim); Llama-8B's 32 heads split 16 / 16 over 8 kv heads
    # of 4, so no kv head serves both halves. SmolLM2's 9 split 4 / 5 over 3 kv heads of 3: kv head 1 serves both,
    # so all three are repeated 3x (tests/test_s2_attention.py holds the code to what is kept)
    smollm2 = ModelShape(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152)
    for shape, repeated_kv in ((LLAMA_8B, 0), (smollm2, 2 * 3 * 2)):
        extra = saved_per_token(shape, Features(attention_group=1024)) - saved_per_token(shape, Features())
        assert extra == 2 * shape.head_dim * (shape.heads + repeated_kv)


def test_plain_hf_anchor_16k_fits_near_47_gib_and_32k_does_not():
    """The project's measured anchor on an H100 80 GB: 16K trains at ~47 GiB peak, 32K runs out of memory."""
    at_16k = estimate(LLAMA_8B, PLAIN_HF, HF_SETTINGS, ONE_H100, 16384)
    assert at_16k.fits and abs(at_16k.gpu_peak / GiB - 47) <= 47 * 0.1
    assert not estimate(LLAMA_8B, PLAIN_HF, HF_SETTINGS, ONE_H100, 32768).fits
    assert 16384 <= longest_fitting(LLAMA_8B, PLAIN_HF, HF_SETTINGS, ONE_H100) < 32768


def test_each_feature_lowers_the_peak_at_long_sequences():
    seq, s = 65536, Settings(zero_stage=2, checkpointing="full")
    steps = [PLAIN_HF, replace(PLAIN_HF, loss="chunked"), replace(PLAIN_HF, loss="chunked", adapter_fp32=False,
                                                                    engine="deepspeed"),
             Features(mlp_tile_tokens=8192)]
    peaks = [estimate(LLAMA_8B, f, s, ONE_H100, seq).gpu_peak for f in steps]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks)
    offload = estimate(LLAMA_8B, steps[-1], replace(s, checkpointing="offload"), ONE_H100, seq)
    assert offload.gpu_peak < peaks[-1] and offload.host["offloaded activations"] == 32 * seq * 4096 * 2


def test_longest_fitting_is_the_boundary():
    s = Settings(checkpointing="offload")
    f = Features(mlp_tile_tokens=8192)
    n = longest_fitting(LLAMA_8B, f, s, ONE_H100)
    assert n % 1024 == 0 and n > 128 * 1024
    assert estimate(LLAMA_8B, f, s, ONE_H100, n).fits
    assert not estimate(LLAMA_8B, f, s, ONE_H100, n + 1024).fits


def test_choose_takes_the_cheapest_settings_that_fit():
    node = Cluster(nodes=1, gpus_per_node=8, gpu_mem=80 * GiB, host_mem=1024 * GiB)
    short = choose(LLAMA_8B, Features(), node, 8192, Settings(), set(PLANNER_CHOICES))
    assert short.settings == Settings(zero_stage=1, sp=1, checkpointing="auto")
    assert short.layout.plain == 32  # at 8K every layer's activations fit: nothing is recomputed
    long = choose(LLAMA_8B, Features(), node, 1 << 20, Settings(), set(PLANNER_CHOICES))
    assert long.fits and long.settings.sp > 1
    # fixed keys stay as given: sp=1 at 1M tokens cannot fit on one 80 GB GPU without offloading
    assert choose(LLAMA_8B, Features(), node, 1 << 20, Settings(sp=1), {"zero_stage", "checkpointing"}) is None


def test_auto_checkpointing_spends_what_the_gpu_has_left():
    f, s = Features(mlp_tile_tokens=4096, mlp_tile_from=32768), Settings(checkpointing="auto")
    layouts = {n: estimate(LLAMA_8B, f, s, ONE_H100, n * 1024).layout for n in (16, 64, 256)}
    assert layouts[16].host == 0 and 0 < layouts[16].plain < 32  # some layers skip the recompute
    assert layouts[64].host == 0 and layouts[64].plain < layouts[16].plain
    assert layouts[256].host > 0 and layouts[256].plain == 0  # inputs go to host memory
    for n in (16, 64, 256):
        est = estimate(LLAMA_8B, f, s, ONE_H100, n * 1024)
        assert est.fits and est.gpu_peak <= est.gpu_limit
        assert est.host.get("offloaded activations", 0) == est.layout.host * n * 1024 * 4096 * 2
    # auto reaches at least as far as offloading everything does (further where host memory runs out first)
    assert longest_fitting(LLAMA_8B, f, s, ONE_H100) >= longest_fitting(
        LLAMA_8B, f, replace(s, checkpointing="offload"), ONE_H100)


def test_parallel_auto_replaces_only_the_free_settings():
    path = str(ROOT / "recipes/llama3-8b-1node.yaml")
    node = Cluster(nodes=1, gpus_per_node=8, gpu_mem=80 * GiB, host_mem=1024 * GiB)
    fixed = load_recipe(path, [])
    assert resolve_auto(fixed, node) == (fixed, None)
    recipe, line = resolve_auto(load_recipe(path, ["parallel.auto=[sp,zero_stage]", "parallel.sp=1"]), node)
    assert (recipe.parallel.sp, recipe.parallel.zero_stage) == (4, 2)
    for sp, stage in ((2, 3), (4, 1)):  # the cheaper neighbours do not fit a 512K full fine-tune
        shape, f, s = from_recipe(load_recipe(path, [f"parallel.sp={sp}", f"parallel.zero_stage={stage}"]))
        assert not estimate(shape, f, s, node, 524288).fits
    assert recipe.train.checkpointing == fixed.train.checkpointing and recipe.data == fixed.data
    assert line.startswith("parallel.auto=sp,zero_stage: planner chose zero_stage=2 offload=none sp=4")
    with pytest.raises(ConfigError, match=r"parallel.auto=\['sp'\]: no choice fits data.seq_len=8388608 on 8 GPU"):
        resolve_auto(load_recipe(path, ["parallel.auto=[sp]", "data.seq_len=8388608"]), node)


# Measured peaks of one 8B LoRA or QLoRA step, each with its device, date and command (bench/results/planner/)
PEAKS = json.loads((ROOT / "bench/results/planner/measured-peaks.json").read_text())["rows"]
H100_SHARE = Cluster(gpu_mem=int(79.18 * GiB), host_mem=125 * GiB)  # what the benchmarks allowed a process


def layout_reported(changes: list[str]) -> list[int]:
    """(host, gpu, plain) from the layout line a run's model changes report."""
    line = next(c for c in changes if c.startswith("decoder layers, bottom to top: "))
    counts = {what: int(n) for n, what in (part.split(" ", 1) for part in line.split(": ", 1)[1].split("; "))}
    return [counts.get(what, 0) for what in ("with inputs in host memory", "with inputs in device memory",
                                             "not checkpointed (no recompute)")]


@pytest.mark.parametrize("row", PEAKS, ids=lambda r: f"{Path(r.get('recipe', 'llama3-8b')).stem.split('-')[1]}-"
                         f"{r.get('stack', 'longctx')}-{r['tokens'] // 1024}k-"
                         + "/".join(map(str, r["layout"]))
                         + "".join("-" + o.split("=")[1] for o in r["overrides"]) + f"-{r['status']}")
def test_prediction_is_never_below_a_measured_peak_and_at_most_3_percent_above_near_the_limit(row):
    """Never below a measured peak (a run the planner passes must fit); at most 3% above it where the peak is over
    half the GPU, where the longest sequence it promises is decided; a step that ran out of memory is refused."""
    if "result" in row:  # the row is what its run wrote
        run = next(r for r in json.loads((ROOT / row["result"]).read_text())
                   if r["stack"] == row.get("stack", "longctx") and r["seq_len"] == row["tokens"])
        assert (run["status"], run["peak_gpu_gib"], layout_reported(run["changes"])) == \
               (row["status"], row["peak_gib"], row["layout"])
    if "run" in row:  # a launcher run's directory: its steps after the first (the first has no AdamW moments yet)
        steps = [json.loads(line) for line in (ROOT / row["run"] / "metrics.jsonl").read_text().splitlines()]
        record = json.loads((ROOT / row["run"] / "run.json").read_text())
        assert (round(max(s["peak_mem_gib"] for s in steps[1:]), 1), layout_reported(record["changes"])) == \
               (row["peak_gib"], row["layout"])
    recipe = load_recipe(str(ROOT / row.get("recipe", "recipes/llama3-8b-lora-1gpu.yaml")),
                         [f"data.seq_len={row['tokens']}", *row["overrides"]])
    est = estimate(*from_recipe(recipe), H100_SHARE, row["tokens"], Layout(*row["layout"]))
    if row["status"] == "oom":
        assert not est.fits
        return
    assert est.fits
    assert row["peak_gib"] <= est.gpu_peak / GiB
    if row["peak_gib"] > H100_SHARE.gpu_mem / GiB / 2:
        assert est.gpu_peak / GiB <= 1.03 * row["peak_gib"]


def planned(recipe, cluster: Cluster):
    return estimate(*from_recipe(recipe), cluster, recipe.data.seq_len)


def test_refusal_when_offloaded_inputs_exceed_host_memory():
    recipe = load_recipe(str(ROOT / "recipes/llama3-8b-lora-1gpu.yaml"), ["data.seq_len=409600"])
    assert planned(recipe, Cluster(gpu_mem=80 * GiB, host_mem=124 * GiB)).fits  # as a 400K run on an H100 had it
    small = Cluster(gpu_mem=80 * GiB, host_mem=64 * GiB)
    assert not planned(recipe, small).fits
    reason = refusal(recipe, small, planned(recipe, small))
    assert re.search(r"predicts [0-9.]+ GiB of host memory per node \([0-9.]+ GiB of offloaded layer inputs\), "
                     r"64.0 GiB available; longest that fits as written: \d+", reason)


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("512G") == 512 * 2**30 and parse_bytes("2TiB") == 2 * 2**40
    for bad in ("lots", "0", "1.5.5GiB"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a positive size"):
            parse_bytes(bad)


@pytest.mark.parametrize("flag, value, expected", [
    ("--nodes", "0", "argument --nodes: '0': not a whole number >= 1"),
    ("--free", "sp,bogus", "argument --free: bogus: not one of zero_stage,offload,sp,checkpointing"),
    ("--gpu-mem", "0", "argument --gpu-mem: '0': not a positive size"),
    ("--mlp-tile-tokens", "-1", "argument --mlp-tile-tokens: '-1': not a whole number >= 0"),
])
def test_cli_flags_are_checked(flag, value, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        main([RECIPE, f"{flag}={value}"])


def test_cli_mlp_tile_tokens_zero_plans_an_untiled_mlp(capsys):
    peaks = []
    for args in ([], ["--mlp-tile-tokens", "0"], ["train.tiled_mlp=never"]):
        main([RECIPE, "--json", *args])
        peaks.append(json.loads(capsys.readouterr().out)["recipe"]["gpu_peak_gib"])
    assert peaks[1] == peaks[2] > peaks[0]


def test_cli_json_and_table(capsys):
    demo = str(ROOT / "recipes/demo-cpu.yaml")
    assert main([demo, "--json", "--gpu-mem", "16GiB", "data.seq_len=4096"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recipe"]["fits"] and out["recipe"]["seq_len"] == 4096
    assert out["recipe_longest_seq_len"] >= 4096 and out["chosen"]["fits"]
    assert main([demo, "--gpu-mem", "1GiB", "--free", "", "data.seq_len=131072", "--loss", "full"]) == 1
    table = capsys.readouterr().out
    assert "does NOT fit" in table and "loss working set" in table and "no setting of (none free)" in table
    with pytest.raises(ConfigError, match=r"parallel.sp=2: must divide the number of ranks \(1\)"):
        main([demo, "parallel.sp=2"])


def test_refusal_names_the_numbers_and_passes_what_fits():
    demo = str(ROOT / "recipes/demo-cpu.yaml")
    assert planned(load_recipe(demo, []), Cluster(gpus_per_node=2, gpu_mem=80 * GiB)).fits
    recipe, small = load_recipe(demo, ["data.seq_len=1048576"]), Cluster(gpu_mem=8 * GiB)
    assert not planned(recipe, small).fits
    reason = refusal(recipe, small, planned(recipe, small))
    assert re.search(r"predicts [0-9.]+ GiB per GPU, [0-9.]+ GiB usable of 8.0; longest that fits as written: \d+", reason)


@pytest.mark.parametrize("name", ["llama3-8b-lora-1gpu", "llama3-8b-1node", "llama3-70b-multinode",
                                  "llama3-8b-qlora-1gpu", "llama3-70b-qlora-1gpu"])
def test_recipe_comment_states_the_planner_prediction(name, capsys):
    path = ROOT / "recipes" / f"{name}.yaml"
    text = path.read_text()
    if not (ROOT / re.search(r"config: (\S+)", text).group(1) / "config.json").exists():
        pytest.skip("the model config asset is not in this tree yet")
    flags, peak, longest = re.search(r"# planner \(([^)]*)\): peak ([0-9.]+) GiB per GPU; "
                                     r"longest sequence with these settings ([0-9,]+)", text).groups()
    assert main([str(path), "--json", *flags.split()]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recipe"]["gpu_peak_gib"] == pytest.approx(float(peak), abs=0.05)
    assert out["recipe_longest_seq_len"] == int(longest.replace(",", ""))


def test_sp_candidates_are_the_degrees_the_run_accepts():
    # 12 query / 4 kv heads: sp 3 and 6 split the query heads but neither split nor repeat the kv heads evenly
    shape = replace(LLAMA_8B, heads=12, kv_heads=4)
    sps = {s.sp for s in candidates(shape, Cluster(nodes=1, gpus_per_node=6, gpu_mem=80 * GiB), Settings(), {"sp"})}
    assert sps == {1, 2}
    with pytest.raises(ConfigError, match="parallel.sp=3: the model cannot be split"):
        estimate(shape, Features(), Settings(sp=3), Cluster(nodes=1, gpus_per_node=6, gpu_mem=80 * GiB), 3072)
