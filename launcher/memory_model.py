"""Will it fit? A per-rank memory model of one training step.

The model counts bytes the way PyTorch allocates them at the step's peak, which comes in the
backward pass while every saved activation of the forward is still alive:

    peak = weights + gradients + optimizer states + communication buffers
         + activations kept across layers (layer inputs, or everything without checkpointing)
         + max(working set of the layer being recomputed and differentiated,
               working set of the loss)

Each of our features is a switch (attention kernel, checkpointing policy, chunked loss, tiled
MLP, DeepSpeed vs plain torch), so the same model also describes plain Hugging Face training.
Byte counts per token follow what autograd saves in transformers' Llama layers; the
comments name the tensors, as `bench/memory_peak.py` finds them alive at a step's peak.
`launcher/fit.py` searches it for settings that fit; `longctx plan` (`launcher/plan.py`) prints it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from longctx.activation_checkpointing import PROCESS_HOST_BYTES, Layout, choose_layout, layout_for
from longctx.config import LORA_TARGETS_ALL, check_offload
from longctx.s2_attention import kv_repeat
from longctx.launcher.dsconfig import template
from longctx.sequence_parallel import check_layout

GiB = 2**30
# Not visible to max_memory_allocated but taken from the card: CUDA context, cuBLAS/cuDNN
# workspaces, NCCL channels, and blocks the caching allocator cannot reuse.
GPU_RESERVED_BYTES = 2 * GiB
ATTENTION_KINDS = ("flash", "cudnn", "sdpa-flash", "sdpa-mask", "eager")


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only RoPE model that decide its memory (from config.json)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_config_dir(cls, path: str) -> "ModelShape":
        c = json.loads((Path(path) / "config.json").read_text())
        heads = c["num_attention_heads"]
        return cls(hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=heads,
                   kv_heads=c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                   intermediate=c["intermediate_size"], vocab=c["vocab_size"], tied=bool(c.get("tie_word_embeddings")))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear in one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_params(self) -> int:
        return sum(i * o for i, o in self.linears().values()) + 2 * self.hidden  # + two norms

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        embeddings = self.head_params * (1 if self.tied else 2)
        return self.layers * self.layer_params + embeddings + self.hidden  # + final norm

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        return self.layers * sum(r * (i + o) for name, (i, o) in self.linears().items() if name in targets)

    @property
    def nf4_layer_bytes(self) -> int:
        """One decoder layer's linears in NF4 (model.quantize=nf4)."""
        return sum(nf4_bytes(o, i) for i, o in self.linears().values())


# bitsandbytes' NF4 layout, as longctx/quantize.py stores it (tests/test_quantize.py checks the count against the
# stored tensors): 64 weights share one scale; the scales are quantised to 8 bits in blocks of 256, each with an
# fp32 scale of its own; per tensor one fp32 offset and the code books of the 16 NF4 and 256 scale levels, in fp32
NF4_BLOCK, NF4_SCALE_BLOCK = 64, 256


def nf4_bytes(rows: int, cols: int) -> int:
    """Bytes one (rows x cols) weight takes in NF4 with double-quantised scales: about 0.516 per weight."""
    n = rows * cols
    blocks = -(-n // NF4_BLOCK)
    return n // 2 + blocks + 4 * -(-blocks // NF4_SCALE_BLOCK) + 4 * (1 + 16 + 256)


@dataclass(frozen=True)
class Features:
    """How the step is computed; every choice that changes memory is a switch."""

    act_bytes: int = 2  # bf16 weights and activations (4: fp32)
    lora_r: Optional[int] = 16  # None: full fine-tune
    lora_targets: tuple[str, ...] = tuple(LORA_TARGETS_ALL)
    extra_trainable: int = 0  # LongLoRA: embeddings and norms trained beside the adapters
    adapter_fp32: bool = False  # peft's default upcast: adapters in fp32, each adapted linear keeps an fp32 copy of its input
    # flash: O(seq), ours | cudnn: O(seq), SDPA's cuDNN backend (a larger backward workspace) | sdpa-flash:
    # O(seq), SDPA's flash backend (an fp32 dq accumulator) | sdpa-mask: dense (seq x seq) mask | eager: scores
    attention: str = "flash"
    attention_group: int = 0  # S²-Attn (attention.train_pattern=s2): a query sees keys of its group only; 0: full
    loss: str = "chunked"  # chunked: logits per chunk, recomputed | full: (seq x vocab) logits in fp32
    loss_chunk_tokens: int = 4096
    mlp_tile_tokens: int = 0  # 0: untiled MLP
    mlp_tile_from: int = 0  # tiles only from this many tokens per rank (train.tiled_mlp=auto)
    norm: str = "torch"  # torch: RMSNorm keeps a float32 copy of its input | fused: our kernel keeps the input
    engine: str = "deepspeed"  # deepspeed: ZeRO buffers, bf16 master weights | torch: plain optimizer, no ZeRO
    micro_batch: int = 1
    quantize: str = "none"  # nf4: the decoder layers' linears frozen in 4 bits (QLoRA)

    @property
    def norms_trainable(self) -> bool:
        return self.lora_r is None or self.extra_trainable > 0


@dataclass(frozen=True)
class Settings:
    """What the planner may choose."""

    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    sp: int = 1
    checkpointing: str = "full"
    gpu_checkpoint_layers: int = 0  # checkpointing=offload: top layers whose inputs stay on the GPU

    def describe(self) -> str:
        offload = [n for n, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on]
        return (f"zero_stage={self.zero_stage} offload={'+'.join(offload) or 'none'} sp={self.sp} "
                f"checkpointing={self.checkpointing}")


@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 1
    gpu_mem: int = 80 * GiB
    host_mem: int = 512 * GiB

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


MODEL_LOAD = "model load (before training)"
# Parts of the GPU peak present at only one of the two moments that can be the peak (Estimate.phases)
PHASE_PARTS = ("not-checkpointed layers", "offloaded inputs reloaded", "final hidden states", "loss working set",
               "layer working set")


@dataclass
class Estimate:
    seq_len: int
    settings: Settings
    gpu: dict[str, int]  # bytes per rank; the two working sets are alternatives: only the larger counts
    host: dict[str, int]  # bytes per node
    gpu_limit: int
    host_limit: int
    layout: Layout  # the checkpointing layout of the decoder layers (auto resolved)
    transient: int  # gradients and workspaces alive while a not-checkpointed layer runs backward

    def phases(self) -> dict[str, int]:
        """Bytes beyond the steady part at the two moments that can be the peak: the loss and the
        backward of the not-checkpointed top layers, then the recompute of checkpointed layers
        (the plain layers' activations and the final hidden states are freed by then)."""
        g = self.gpu
        top = g["not-checkpointed layers"] + max(g["final hidden states"] + g["loss working set"], self.transient)
        recompute = g["offloaded inputs reloaded"] + g["layer working set"]
        return {"loss and the top layers without checkpointing": top, "recompute of a checkpointed layer": recompute}

    @property
    def gpu_peak(self) -> int:
        steady = {k: v for k, v in self.gpu.items() if k not in PHASE_PARTS}
        return sum(steady.values()) + max(self.phases().values())

    @property
    def host_peak(self) -> int:
        h = dict(self.host)
        # loading happens before training: the larger of the two moments
        return max(h.pop(MODEL_LOAD), sum(h.values()))

    @property
    def fits(self) -> bool:
        return self.gpu_peak <= self.gpu_limit and self.host_peak <= self.host_limit

    def as_dict(self) -> dict:
        return {"seq_len": self.seq_len, "settings": asdict(self.settings), "layout": asdict(self.layout), "fits": self.fits,
                "phases_gib": {k: _gib(v) for k, v in self.phases().items()},
                "gpu_peak_gib": _gib(self.gpu_peak), "gpu_limit_gib": _gib(self.gpu_limit),
                "host_peak_gib": _gib(self.host_peak), "host_limit_gib": _gib(self.host_limit),
                "gpu_gib": {k: _gib(v) for k, v in self.gpu.items()},
                "host_gib": {k: _gib(v) for k, v in self.host.items()}}


def _gib(n: int) -> float:
    return round(n / GiB, 3)


def _check(shape: ModelShape, settings: Settings, cluster: Cluster, seq_len: int) -> None:
    check_layout(settings.sp, cluster.world, seq_len, shape.heads, shape.kv_heads)  # the rule the run applies
    check_offload(settings.zero_stage, settings.offload_optimizer, settings.offload_params)


def trainable_params(shape: ModelShape, f: Features) -> int:
    if f.lora_r is None:
        return shape.params
    return shape.lora_params(f.lora_r, f.lora_targets) + f.extra_trainable


def model_states(shape: ModelShape, f: Features, s: Settings, world: int) -> tuple[dict[str, int], dict[str, int]]:
    """(GPU bytes per rank, host bytes per rank) of weights, gradients, optimizer and buffers."""
    b, trainable = f.act_bytes, trainable_params(shape, f)
    if f.engine == "torch" or b == 4:
        # trainable weights kept in fp32 (peft's default for adapters), fp32 grads, Adam m and v
        weight_b, grad_b, optim_b = (4 if f.engine == "torch" else b), 4, 8
    else:
        # DeepSpeed bf16: bf16 weights and gradients; fp32 master copy, Adam m and v in the optimizer
        weight_b, grad_b, optim_b = b, b, 12
    frozen = shape.params - trainable if f.lora_r is not None else 0
    weights = frozen * b + trainable * weight_b
    if f.quantize == "nf4":  # the layers' linears in 4 bits, embeddings, norms and head as they were
        linears = sum(i * o for i, o in shape.linears().values())
        weights += shape.layers * (shape.nf4_layer_bytes - linears * b)
    zero = s.zero_stage if f.engine == "deepspeed" else 0
    gpu, host = {}, {}
    if zero == 3:
        # partitioned; each rank gathers the layer it runs and prefetches the next (or the head)
        live = (shape.layer_params + max(shape.layer_params, shape.head_params)) * b
        gpu["weights"] = live + (0 if s.offload_params else weights // world)
        host["offloaded parameters"] = weights // world if s.offload_params else 0
    else:
        gpu["weights"] = weights
    grads = trainable * grad_b // (world if zero >= 2 else 1)
    optim = trainable * optim_b // (world if zero >= 1 else 1)
    if s.offload_optimizer:
        # ZeRO-Offload: gradients stream to host fp32 partitions, Adam runs there
        gpu["gradients"], gpu["optimizer states"] = 0, 0
        host["offloaded optimizer"] = optim + trainable * 4 // world
    else:
        gpu["gradients"], gpu["optimizer states"] = grads, optim
    gpu["communication buffers"] = _comm_buffers(zero, b) if f.engine == "deepspeed" else 0
    return gpu, host


def _comm_buffers(zero: int, b: int) -> int:
    """Bucket sizes from our DeepSpeed templates; reduce buckets are doubled by overlap_comm."""
    if zero == 0:
        return 0
    z = template(zero)["zero_optimization"]
    reduce = z.get("reduce_bucket_size", 0) * b * (2 if z.get("overlap_comm") else 1)
    gather = z.get("allgather_bucket_size", 0) if zero == 2 else z.get("stage3_prefetch_bucket_size", 0)
    return reduce + gather * b


ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


def saved_halves(shape: ModelShape, f: Features) -> tuple[int, int]:
    """Bytes autograd keeps per token for the attention half and the MLP half of one decoder layer
    run without checkpointing (linear part); each half is an RMSNorm and what follows it."""
    b, h, d = f.act_bytes, shape.hidden, shape.head_dim
    # RMSNorm: its input (transformers: the fp32 upcast that pow and mul save; fused: the input
    # and one fp32 1/rms), its output (saved by the next linears), and, in transformers, the
    # normalised input when the norm weight is trained (the kernel recomputes it)
    trained = b * h if f.norms_trainable and f.norm == "torch" else 0
    norm = _norm_input(f, h) + b * h + trained
    # q and k after RoPE, v, the kernel's output (o_proj's input is a view of it), its logsumexp
    attention = b * d * (2 * shape.heads + 2 * shape.kv_heads) + 4 * shape.heads
    if f.attention_group:  # S²-Attn: o_proj reads the two halves' outputs joined (one rolled back) in a copy, and
        # a kv head serving query heads of both halves makes every kv head repeated
        repeat = kv_repeat(shape.heads, shape.kv_heads, shape.heads // 2)
        attention += b * d * (shape.heads + 2 * shape.kv_heads * (repeat - 1))
    # SwiGLU: gate (SiLU's input), SiLU's output, up, and their product (down_proj's input); a tiled
    # MLP keeps only its input (the norm's output) and recomputes the rest, adapters included
    mlp = 0 if f.mlp_tile_tokens else 4 * b * shape.intermediate
    attention_adapters = mlp_adapters = 0
    for name, (fan_in, _) in shape.linears().items():
        if f.lora_r is None or name not in f.lora_targets:
            continue
        # lora_B keeps lora_A's output; an fp32 adapter keeps its own fp32 copy of the input
        kept = f.lora_r * (4 if f.adapter_fp32 else b) + (4 * fan_in if f.adapter_fp32 else 0)
        if name in ATTENTION_LINEARS:
            attention_adapters += kept
        elif not f.mlp_tile_tokens:
            mlp_adapters += kept
    return norm + attention + attention_adapters, norm + mlp + mlp_adapters


def saved_per_token(shape: ModelShape, f: Features) -> int:
    """Bytes autograd keeps per token for one decoder layer run without checkpointing (linear part)."""
    return sum(saved_halves(shape, f))


def _norm_input(f: Features, h: int) -> int:
    return 4 * h if f.norm == "torch" else f.act_bytes * h + 4


def attended_keys(f: Features, seq_len: int) -> int:
    """Keys one query's scores span: the sequence, or with S²-Attn its group (scores and masks are per group)."""
    return min(f.attention_group, seq_len) if f.attention_group else seq_len


def quadratic_saved(shape: ModelShape, f: Features, seq_len: int, sp: int) -> int:
    """Bytes one layer keeps that grow with seq^2, or seq x group with S²-Attn (per rank, per micro-batch)."""
    keys = attended_keys(f, seq_len)
    if f.attention == "eager":
        # fp32 softmax output and its cast to the compute dtype, for this rank's heads
        return f.micro_batch * (shape.heads // sp) * seq_len * keys * (4 + f.act_bytes)
    if f.attention == "sdpa-mask":
        # SDPA turns the boolean document mask into an additive bias it saves for backward
        return f.micro_batch * seq_len * keys * f.act_bytes
    return 0


def attention_workspace(shape: ModelShape, f: Features) -> int:
    """Bytes per token the attention kernel's backward allocates for itself."""
    heads = shape.heads - shape.heads // 2 if f.attention_group else shape.heads  # S²: one call per half of the heads
    hd = heads * shape.head_dim
    # ours: the row sums of dO * O; SDPA's flash backend: an fp32 dq accumulator; cuDNN: one block of
    # 8 bytes per query element plus its own row sums (measured on an H200 at 32 query / 8 kv heads)
    return {"flash": 4 * heads, "sdpa-flash": 4 * hd, "cudnn": 8 * hd + 4 * heads}.get(f.attention, 0)


def backward_working_sets(shape: ModelShape, f: Features, tokens: int, sp: int) -> tuple[int, int]:
    """Gradients and workspaces alive, beyond saved activations, while the attention half and while
    the MLP half of one layer runs backward."""
    b, h, d = f.act_bytes, shape.hidden, shape.head_dim
    qkv = b * d * (shape.heads + 2 * shape.kv_heads)
    residual = 2 * b * h  # the gradient flowing in, and the one flowing out being summed
    # the gradient of the kernel's output, dq, dk and dv (and the all-to-all's copies of them)
    attention = residual + b * shape.heads * d + qkv * (2 if sp > 1 else 1) + attention_workspace(shape, f)
    if f.mlp_tile_tokens:
        tile = min(f.mlp_tile_tokens, tokens)
        # a tile recomputes its 4 intermediates and their 3 gradients; the input gradient is whole
        return tokens * attention, tokens * (residual + b * h) + tile * 7 * b * shape.intermediate
    return tokens * attention, tokens * (residual + 3 * b * shape.intermediate)


def loss_working_set(shape: ModelShape, f: Features, tokens: int) -> int:
    """Logits-related bytes at the loss's backward."""
    v = shape.vocab
    if f.loss == "full":
        # logits in the compute dtype (returned by the model), their fp32 copy's log_softmax
        # (saved), and in backward the fp32 gradient of log_softmax's output and of its input
        return tokens * v * (f.act_bytes + 4 + 4 + 4)
    # longctx.loss makes the gradients in forward, a chunk at a time, with the softmax in place: the
    # chunk's fp32 logits beside the bf16 matmul output they are cast from, then beside the bf16 gradient
    # cast from them; a trained output projection also gets an fp32 gradient of its own, held until backward
    head_grad = v * shape.hidden * 4 if f.lora_r is None else 0
    return min(f.loss_chunk_tokens, tokens) * v * (4 + f.act_bytes) + head_grad


def estimate(shape: ModelShape, f: Features, s: Settings, cluster: Cluster, seq_len: int,
             layout: Optional[Layout] = None) -> Estimate:
    """The per-rank GPU peak and per-node host memory of one training step at seq_len; `layout`
    replaces the one the checkpointing policy gives (to predict a run whose layout is known)."""
    _check(shape, s, cluster, seq_len)
    b, h, world = f.act_bytes, shape.hidden, cluster.world
    if seq_len // s.sp < f.mlp_tile_from:
        f = replace(f, mlp_tile_tokens=0)
    tokens = f.micro_batch * seq_len // s.sp  # tokens this rank holds between attention calls
    gpu, host_rank = model_states(shape, f, s, world)
    attention_saved, mlp_saved = (tokens * n for n in saved_halves(shape, f))
    attention_saved += quadratic_saved(shape, f, seq_len, s.sp)
    layer_saved = attention_saved + mlp_saved
    layer_input = tokens * b * h
    attention_ws, mlp_ws = backward_working_sets(shape, f, tokens, s.sp)
    # a not-checkpointed layer at the same two moments: its saved tensors are counted among the plain
    # layers', and its MLP half's are freed before the attention half's backward
    transient = max(mlp_ws, attention_ws - mlp_saved)
    # A recomputed layer at its backward's two moments: the MLP half with everything the layer saved,
    # then the attention half once the MLP half's tensors are freed. The first norm's input is the kept
    # layer input itself when fused (counted among the inputs); the recomputed output is freed at once.
    recompute = max(layer_saved + mlp_ws, attention_saved + attention_ws) - (layer_input if f.norm == "fused" else 0)
    gpu["layer inputs kept"] = 0  # this and the next two filled below, once the layout is known
    gpu["offloaded inputs reloaded"] = 0
    gpu["not-checkpointed layers"] = 0
    # the final norm's saved input and output, and the hidden states handed to the loss
    gpu["final hidden states"] = tokens * (_norm_input(f, h) + 2 * b * h)
    mask = {"sdpa-mask": 1, "eager": b}.get(f.attention, 0)
    gpu["attention mask"] = f.micro_batch * seq_len * attended_keys(f, seq_len) * mask
    if f.quantize == "nf4":  # bitsandbytes multiplies by a dequantised copy of the 4-bit weight, freed after each matmul
        gpu["dequantised weight"] = max(i * o for i, o in shape.linears().values()) * b
    gpu["layer working set"] = recompute
    gpu["loss working set"] = loss_working_set(shape, f, tokens)
    gpu_limit = cluster.gpu_mem - GPU_RESERVED_BYTES
    if layout is None and s.checkpointing == "auto":
        room = gpu_limit - sum(v for k, v in gpu.items() if k not in PHASE_PARTS)
        layout = choose_layout(shape.layers, layer_input, layer_saved,
                               recompute_room=room - gpu["layer working set"],
                               top_room=room - max(gpu["final hidden states"] + gpu["loss working set"], transient))
    elif layout is None:
        layout = layout_for(s.checkpointing, shape.layers, s.gpu_checkpoint_layers)
    gpu["layer inputs kept"] = layout.gpu * layer_input
    # backward frees kept inputs as it goes down, so reloaded ones add only where they outnumber them
    gpu["offloaded inputs reloaded"] = (layout.inputs_in_backward - layout.gpu) * layer_input
    gpu["not-checkpointed layers"] = layout.plain * layer_saved
    if layout.host + layout.gpu == 0:
        gpu["layer working set"] = transient  # nothing is recomputed
    if layout.host:
        host_rank["offloaded activations"] = layout.host * layer_input
    ranks_here = min(cluster.gpus_per_node, world)
    host = {name: ranks_here * n for name, n in host_rank.items()}
    host["processes"] = ranks_here * PROCESS_HOST_BYTES
    host[MODEL_LOAD] = ranks_here * (PROCESS_HOST_BYTES + load_bytes(shape, f, s, world))
    return Estimate(seq_len, s, gpu, host, gpu_limit, cluster.host_mem, layout, transient)


def load_bytes(shape: ModelShape, f: Features, s: Settings, world: int) -> int:
    """Host bytes one rank holds while it builds or loads the model, before training."""
    block = max(shape.layer_params, shape.head_params) * f.act_bytes  # the module being built, or read
    if f.quantize == "nf4":
        return block  # a block at a time, quantized on the device before the next
    if s.zero_stage == 3:
        return shape.params * f.act_bytes // world + block  # built under zero.Init: its partition only
    return shape.params * f.act_bytes  # the whole model, before DeepSpeed partitions or moves it
