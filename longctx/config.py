"""The recipe schema: typed sections, defaults in one place, eager validation.

A recipe is a YAML file merged over these dataclasses, then `a.b=value` overrides from the
command line. Every field documents itself in `metadata["help"]`; a Literal type names its
allowed values, and `min` and `max` in the metadata bound numbers, so a bad value is rejected
here, naming the key, before any model, data or process group exists.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A recipe value that cannot run. The message is one line naming the key."""


def _f(default: Any, help: str, **rules: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


# The choices of a key are its Literal type; the code that acts on them imports the type or its values
Dtype = Literal["auto", "bf16", "fp32"]
Quantize = Literal["none", "nf4"]
RopeMethod = Literal["none", "auto", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope", "theta"]
AttentionBackend = Literal["auto", "triton", "sdpa", "flex", "eager"]
TrainPattern = Literal["full", "s2"]
CorpusUnit = Literal["files", "packages"]
Checkpointing = Literal["auto", "none", "full", "offload"]
TiledMlp = Literal["auto", "always", "never"]  # not on/off: YAML reads those as booleans
OnNonfinite = Literal["stop", "skip"]
ZeroStage = Literal[0, 1, 2, 3]
PlannerChoice = Literal["zero_stage", "offload", "sp", "checkpointing"]  # what parallel.auto may leave to the planner
Evaluation = Literal["ppl", "needle", "middle"]
ROPE_METHODS = list(get_args(RopeMethod))
ATTENTION_BACKENDS = list(get_args(AttentionBackend))
CHECKPOINTING = list(get_args(Checkpointing))
TILED_MLP = list(get_args(TiledMlp))
PLANNER_CHOICES = list(get_args(PlannerChoice))
EVALUATIONS = list(get_args(Evaluation))
LORA_TARGETS_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelSection:
    path: Optional[str] = _f(None, "local Hugging Face model directory (config, weights, tokenizer); "
                             "given on the command line, it replaces the recipe's model.config")
    config: Optional[str] = _f(None, "config-only directory (config + tokenizer): the model is built with random "
                               "weights; given on the command line, it replaces the recipe's model.path")
    tokenizer: Optional[str] = _f(None, "tokenizer directory; default: model.path or model.config")
    dtype: Dtype = _f("auto", "training dtype of weights and activations; auto = bf16 on GPU, fp32 on CPU")
    quantize: Quantize = _f("none", "frozen base weights of the decoder layers' linears: none (model.dtype) or "
                            "nf4 (4-bit NF4 with double-quantised scales, QLoRA; needs lora.enabled)")
    trust_remote_code: bool = _f(False, "run the Python code a model directory ships (its config's auto_map); "
                                 "a directory that needs it is refused unless true")


@dataclass
class RopeSection:
    method: RopeMethod = _f("none", "RoPE scaling method; auto picks one from the target length")
    target_length: Optional[int] = _f(None, "context length to reach; default data.seq_len", min=1)
    factor: Optional[float] = _f(None, "scaling factor; default target / original context", min=1.0)
    theta: Optional[float] = _f(None, "new base frequency (method theta)", min=1.0)
    beta_fast: Optional[float] = _f(None, "yarn: fast boundary (rotations)", min=0.0)
    beta_slow: Optional[float] = _f(None, "yarn: slow boundary (rotations)", min=0.0)
    mscale: Optional[float] = _f(None, "yarn: mscale", min=0.0)
    mscale_all_dim: Optional[float] = _f(None, "yarn: mscale_all_dim", min=0.0)
    attention_factor: Optional[float] = _f(None, "yarn/longrope: attention scaling override", min=0.0)
    truncate: Optional[bool] = _f(None, "yarn: truncate the correction range to integers")
    low_freq_factor: Optional[float] = _f(None, "llama3: low frequency factor", min=0.0)
    high_freq_factor: Optional[float] = _f(None, "llama3: high frequency factor", min=0.0)
    short_factor: Optional[list[float]] = _f(None, "longrope: per-dimension factors for short inputs")
    long_factor: Optional[list[float]] = _f(None, "longrope: per-dimension factors for long inputs")


@dataclass
class AttentionSection:
    backend: AttentionBackend = _f("auto", "attention kernel; auto picks per device and batch")
    train_pattern: TrainPattern = _f("full", "attention in training: full (causal over each document) or s2 "
                                     "(LongLoRA's shifted sparse attention: causal within groups of attention.s2_group "
                                     "tokens, half of the heads shifted by half a group); evaluation, generation and "
                                     "export always use full attention")
    s2_group: int = _f(0, "train_pattern=s2: tokens per group, an even divisor of data.seq_len; 0 = a quarter of "
                       "data.seq_len (the paper's choice)", min=0)


@dataclass
class DataSection:
    path: Optional[str] = _f(None, "jsonl/json/parquet/txt file or a folder of them; "
                             "empty = the embedded corpus (Python sources + passkey episodes)")
    seq_len: int = _f(1024, "tokens per packed training sequence", min=8)
    min_doc_tokens: int = _f(0, "drop documents shorter than this many tokens", min=0)
    max_documents: Optional[int] = _f(None, "use at most this many documents (embedded corpus: module files or "
                                      "packages; the passkey episodes come on top)", min=1)
    corpus_unit: CorpusUnit = _f("files", "embedded corpus: one document per standard-library module file, or per "
                                 "package (its files joined: documents of 10K to 5M tokens, for long targets)")
    passkey_documents: int = _f(64, "embedded corpus: at least this many passkey episodes (the passkey "
                                "evaluation's prompt over training text, loss on the key only), in windows of "
                                "their own", min=0)
    passkey_tokens: int = _f(0, "embedded corpus: the longest passkey episode, in tokens (lengths are "
                             "log-uniform from 1/32 of it); 0 = data.seq_len", min=0)
    num_proc: int = _f(2, "tokenizer processes", min=1)


@dataclass
class TrainSection:
    seed: int = _f(0, "seed for weights, data order and dropout", min=0)
    max_steps: int = _f(30, "optimizer steps", min=1)
    out_dir: str = _f("out/run", "run directory: config, metrics, checkpoints, export")
    save_every: int = _f(0, "checkpoint every N steps; 0 = only at the end", min=0)
    keep_checkpoints: int = _f(2, "complete checkpoints kept on disk", min=1)
    resume: str = _f("auto", "auto (newest complete checkpoint in out_dir), never, or a checkpoint path")
    lr: float = _f(2e-4, "peak learning rate", min=0.0, exclusive_min=True)
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of lr", min=0.0, max=1.0)
    warmup_steps: int = _f(0, "linear warm-up steps", min=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", min=0.0)
    micro_batch_size: int = _f(1, "sequences per rank per forward pass", min=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", min=1)
    grad_clip: float = _f(1.0, "gradient norm clip; 0 = off", min=0.0)
    loss_chunk_tokens: int = _f(4096, "tokens per chunk of the output projection + loss", min=1)
    checkpointing: Checkpointing = _f("auto", "activation checkpointing per decoder layer: none, full (inputs on the "
                                      "GPU), offload (inputs in pinned host memory), auto (the planner fits inputs on "
                                      "the GPU or host, and leaves top layers unchecked when memory allows)")
    gpu_checkpoint_layers: int = _f(0, "checkpointing=offload: how many top layers keep their inputs on the GPU",
                                    min=0)
    tiled_mlp: TiledMlp = _f("auto", "apply the MLP over sequence tiles (auto: once tokens per rank x MLP width "
                                  "reach an 8B's at 32K tokens)")
    mlp_tile_tokens: int = _f(4096, "tokens per MLP tile", min=1)
    export: bool = _f(True, "write <out_dir>/hf (merged) and <out_dir>/adapter at the end")
    on_nonfinite: OnNonfinite = _f("stop", "a step whose loss or gradients are NaN/Inf: stop (exit with a line "
                                   "naming the step; the last checkpoint stays the newest) or skip (no update, "
                                   "counted in metrics)")
    tensorboard: bool = _f(False, "also log loss, lr and tokens/s through DeepSpeed's TensorBoard monitor into "
                           "<out_dir>/tensorboard")


@dataclass
class ParallelSection:
    zero_stage: ZeroStage = _f(2, "DeepSpeed ZeRO stage")
    offload_optimizer: bool = _f(False, "keep optimizer states in host memory (ZeRO >= 1)")
    offload_params: bool = _f(False, "keep parameters in host memory (ZeRO 3)")
    sp: int = _f(1, "sequence-parallel degree (ranks that share one sequence)", min=1)
    timeout_s: int = _f(1800, "seconds a rank waits for the others in a collective (a dead or hung rank ends "
                        "the job after this); covers rank 0 tokenising the data and writing a checkpoint", min=1)
    auto: list[PlannerChoice] = _f([], "settings the memory planner chooses at launch (cheapest that fits "
                                   "data.seq_len)")


@dataclass
class LoraSection:
    enabled: bool = _f(False, "train LoRA adapters instead of all weights")
    r: int = _f(16, "adapter rank", min=1)
    alpha: float = _f(32.0, "adapter scaling numerator (scale = alpha / r)", min=0.0, exclusive_min=True)
    dropout: float = _f(0.0, "adapter dropout", min=0.0, max=1.0)
    targets: list[str] = _f(list(LORA_TARGETS_ALL), "module names that get adapters")
    train_embeddings: bool = _f(False, "LongLoRA: also train the input embeddings")
    train_norms: bool = _f(False, "LongLoRA: also train the normalisation layers")


@dataclass
class EvalSection:
    at_end: list[Evaluation] = _f([], "evaluations run after training on the exported model")
    lengths: list[int] = _f([256, 512, 1024], "context lengths (tokens) for ppl and needle", each_min=1)
    depths: list[float] = _f([0.0, 0.5, 1.0], "needle depths, fractions of the context", each_min=0.0, each_max=1.0)
    trials: int = _f(2, "needles per (length, depth) cell", min=1)


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    rope: RopeSection = field(default_factory=RopeSection)
    attention: AttentionSection = field(default_factory=AttentionSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    eval: EvalSection = field(default_factory=EvalSection)


@functools.cache
def _walk() -> tuple[dict[str, Field], dict[str, Any]]:
    """The one walk over the sections: every recipe key, dotted (`train.lr`), in schema order, with its dataclass
    field and its type (the annotation resolved)."""
    keys, types = {}, {}

    def walk(cls: type, prefix: str) -> None:
        hints = get_type_hints(cls)
        for f in fields(cls):
            if f.default is MISSING and is_dataclass(f.default_factory):
                walk(f.default_factory, f"{prefix}{f.name}.")
            else:
                keys[prefix + f.name], types[prefix + f.name] = f, hints[f.name]

    walk(Recipe, "")
    return keys, types


def schema() -> dict[str, Field]:
    """Every recipe key, dotted, with its dataclass field: default, help and rules."""
    return _walk()[0]


def key_type(key: str) -> Any:
    """A key's type, Optional removed: str, int, list[int], Literal["full", "s2"], list[Literal[...]]."""
    t = _walk()[1][key]
    if get_origin(t) is Union:
        t = next(a for a in get_args(t) if a is not type(None))
    return t


def choices(key: str) -> tuple[list, bool] | None:
    """The values a key allows when its type is a Literal, and whether they apply to each item of a list."""
    t = key_type(key)
    each = get_origin(t) is list
    t = get_args(t)[0] if each else t
    return (list(get_args(t)), each) if get_origin(t) is Literal else None


def _choice_error(key: str, value: Any) -> ConfigError | None:
    found = choices(key)
    if found is None:
        return None
    allowed, each = found
    names = "|".join(str(c) for c in allowed)
    ok = lambda v: any(v == a and type(v) is type(a) for a in allowed)  # noqa: E731 (True is not 1)
    if each:
        bad = [v for v in (value if isinstance(value, list) else [value]) if not ok(v)]
        return ConfigError(f"{key}: {bad[0]!r} is not one of {names}") if bad else None
    return None if ok(value) else ConfigError(f"{key}={value!r}: must be one of {names}")


def _unknown_key_error(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(schema()), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{key}: unknown key{hint}")


def _is_text(key: str) -> bool:
    """Whether a key's values are words: str, or a Literal of strings (a list of them is YAML)."""
    t = key_type(key)
    return t is str or (get_origin(t) is Literal and all(isinstance(c, str) for c in get_args(t)))


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"{item}: overrides are written key=value (e.g. train.max_steps=10)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key in schema() and _is_text(key) and raw not in ("", "null", "~"):
        return key, raw  # text as typed: `on`, `yes` or `1e3` stay strings, not YAML's bool or float
    try:  # YAML typing, as in a recipe file: 10 -> int, true -> bool, [a,b] -> list, null -> None
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _merge(base: DictConfig, key: str, value: Any) -> None:
    if key not in schema():
        raise _unknown_key_error(key)
    try:
        OmegaConf.update(base, key, value, merge=True, force_add=False)
    except OmegaConfBaseException as e:  # a value outside a Literal's choices is named as validation names it
        raise (_choice_error(key, value) or _type_error(key, value, e)) from None


def _type_error(key: str, value: Any, err: Exception) -> ConfigError:
    return ConfigError(f"{key}={value!r}: wrong type ({str(err).splitlines()[0]})")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        if v is None and not prefix and k in {f.name for f in fields(Recipe)}:
            continue  # a section whose keys are all commented out: YAML reads it as null
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


MODEL_SOURCES = {"model.path": "config", "model.config": "path"}


def load_recipe(path: Optional[str], overrides: list[str] = ()) -> Recipe:
    """Recipe file + `a.b=value` overrides -> a validated Recipe. Raises ConfigError."""
    base = OmegaConf.structured(Recipe)
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path}: no such recipe file")
        try:
            raw = OmegaConf.load(path)
        except yaml.MarkedYAMLError as e:  # the mark is where the parser gave up, 0-based
            mark = e.problem_mark or e.context_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
            # the context says what was open, e.g. a `[` that was never closed, and where
            opened = (f"; {e.context} at {e.context_mark.line + 1}:{e.context_mark.column + 1}"
                      if e.context and e.context_mark and e.problem_mark
                      and (e.context_mark.line, e.context_mark.column) != (mark.line, mark.column) else "")
            raise ConfigError(f"--config {where}: not valid YAML ({e.problem or e.context}{opened})") from None
        except Exception as e:
            raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, DictConfig):
            raise ConfigError(f"--config {path}: a recipe is a mapping of sections")
        for key, value in flatten(OmegaConf.to_container(raw)).items():
            _merge(base, key, value)
    for item in overrides:
        key, value = _parse_override(item)
        if key in MODEL_SOURCES and value is not None:  # one source of weights: the command line's replaces the file's
            base.model[MODEL_SOURCES[key]] = None
        _merge(base, key, value)
    recipe: Recipe = OmegaConf.to_object(base)
    validate(recipe)
    return recipe


def _check_field(key: str, value: Any, meta: dict) -> None:
    if value is None:
        return
    items = value if isinstance(value, list) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in items):
        raise ConfigError(f"{key}={value!r}: must be a finite number")
    error = _choice_error(key, value)
    if error:
        raise error
    if "each_min" in meta or "each_max" in meta:
        lo, hi = meta.get("each_min", -math.inf), meta.get("each_max", math.inf)
        if not value:
            raise ConfigError(f"{key}=[]: needs at least one value")
        for v in value:
            if not lo <= v <= hi:
                bounds = f"in [{lo}, {hi}]" if "each_max" in meta else f">= {lo}"
                raise ConfigError(f"{key}: {v!r} must be {bounds}")
    if "min" in meta:
        lo = meta["min"]
        if value < lo or (meta.get("exclusive_min") and value == lo):
            rel = ">" if meta.get("exclusive_min") else ">="
            raise ConfigError(f"{key}={value!r}: must be {rel} {lo}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{key}={value!r}: must be <= {meta['max']}")


def _is_model_dir(path: str, need: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, need))


def _check_out_dir(path: str) -> None:
    """The run directory, or the nearest folder above it that exists, must be a writable directory."""
    for where in (path, *map(str, Path(path).parents)):
        if os.path.exists(where):
            if not os.path.isdir(where):
                raise ConfigError(f"train.out_dir={path!r}: {where} is a file, not a directory")
            if not os.access(where, os.W_OK | os.X_OK):
                raise ConfigError(f"train.out_dir={path!r}: {where} is not writable")
            return


def s2_group(r: Recipe) -> int:
    """Tokens per S²-Attn group (attention.s2_group, or its default: a quarter of the sequence)."""
    return r.attention.s2_group or r.data.seq_len // 4


def _check_s2(r: Recipe) -> None:
    """Groups tile every window and shift by half a group. No rule involves parallel.sp: Ulysses hands attention
    whole sequences (for a share of the heads), so groups never meet a shard boundary."""
    a, n = r.attention, r.data.seq_len
    if a.train_pattern != "s2":
        if a.s2_group:
            raise ConfigError(f"attention.s2_group={a.s2_group}: applies to attention.train_pattern=s2 only "
                              f"(got {a.train_pattern})")
        return
    group = s2_group(r)
    if n % group or group % 2:
        evens = [d for d in range(2, n + 1, 2) if n % d == 0]
        near = sorted(evens, key=lambda d: abs(math.log(d * 4 / n)))[:3]
        given = f"{a.s2_group}" if a.s2_group else f"0 (a quarter of data.seq_len: {n / 4:g})"
        raise ConfigError(f"attention.s2_group={given}: must be an even divisor of data.seq_len={n}; allowed: "
                          f"{'|'.join(map(str, sorted(near))) or 'none, data.seq_len is odd'}"
                          f"{'|...' if len(evens) > len(near) else ''}")


def model_dir(recipe: Recipe) -> str:
    """The directory the model's config (and weights, for model.path) come from."""
    return recipe.model.path or recipe.model.config


def model_key(recipe: Recipe) -> str:
    """The recipe key that names the model directory, for messages."""
    return "model.path" if recipe.model.path else "model.config"


def check_offload(zero_stage: int, optimizer: bool, params: bool) -> None:
    """Offload is a ZeRO feature: optimizer states from stage 1, parameters at stage 3 (the planner checks its
    candidates by the same rule)."""
    if params and zero_stage != 3:
        raise ConfigError(f"parallel.offload_params=true: needs parallel.zero_stage=3 (got {zero_stage})")
    if optimizer and zero_stage == 0:
        raise ConfigError("parallel.offload_optimizer=true: needs parallel.zero_stage >= 1 (got 0)")


def validate(r: Recipe) -> None:
    """Field rules from the schema, then the rules that span fields."""
    for key, f in schema().items():
        _check_field(key, functools.reduce(getattr, key.split("."), r), f.metadata)
    m = r.model
    if (m.path is None) == (m.config is None):
        raise ConfigError("model.path / model.config: set exactly one (weights dir, or config-only dir for random init)")
    for key, path in (("model.path", m.path), ("model.config", m.config)):
        if path is not None and not _is_model_dir(path, "config.json"):
            raise ConfigError(f"{key}={path!r}: not a directory with a config.json")
    if m.tokenizer is not None and not os.path.isdir(m.tokenizer):
        raise ConfigError(f"model.tokenizer={m.tokenizer!r}: no such directory")
    _check_out_dir(r.train.out_dir)
    if r.data.path is not None and not os.path.exists(r.data.path):
        raise ConfigError(f"data.path={r.data.path!r}: no such file or directory")
    p = r.parallel
    check_offload(p.zero_stage, p.offload_optimizer, p.offload_params)
    if r.data.seq_len % p.sp:
        raise ConfigError(f"data.seq_len={r.data.seq_len}: must be divisible by parallel.sp={p.sp}")
    t = r.train
    if t.gpu_checkpoint_layers and t.checkpointing != "offload":
        raise ConfigError(f"train.gpu_checkpoint_layers={t.gpu_checkpoint_layers}: applies to train.checkpointing=offload "
                          f"only (got {t.checkpointing})")
    _check_s2(r)
    if r.lora.enabled and not r.lora.targets:
        raise ConfigError("lora.targets=[]: LoRA needs at least one target module")
    if m.quantize == "nf4" and not r.lora.enabled:
        raise ConfigError("model.quantize=nf4: 4-bit base weights are frozen and train only under LoRA; set "
                          "lora.enabled=true, or model.quantize=none (allowed: none|nf4)")
    if m.quantize == "nf4" and p.zero_stage == 3:
        raise ConfigError("model.quantize=nf4: needs parallel.zero_stage <= 2 (ZeRO-3 does not partition 4-bit "
                          "weights; they are a quarter of bf16's already)")


def to_yaml(r: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(r))


def default_of(f: Field) -> Any:
    """A key's default value, for `longctx keys`."""
    return f.default if f.default is not MISSING else f.default_factory()
