"""Activation checkpointing per decoder layer, with layer inputs optionally in pinned host memory.

A checkpointed decoder layer runs forward saving only its input; backward recomputes the layer
from that input and differentiates it. An offloaded layer's input goes to a pinned host buffer,
copied on a side stream while the following layers compute, and in backward the input of the
layer below is copied back while the current layer is recomputed, so both copies hide under
compute. Counted from the bottom, a `Layout` gives each layer one of three treatments:

    host   checkpointed, input in pinned host memory      (cheapest on the GPU)
    gpu    checkpointed, input on the GPU                  (no copies)
    plain  not checkpointed: autograd keeps everything     (no recompute: fastest)

Plain layers sit on top: backward reaches them first and frees their activations before any
checkpointed layer is recomputed. Policies (recipe key `train.checkpointing`):

    none     every layer plain
    full     every layer gpu
    offload  every layer host but the last `train.gpu_checkpoint_layers`, which are gpu
    auto     `choose_layout` from the planner's GPU budget: all inputs on the GPU if they fit
             (else as many as fit, the rest in host memory), then as many plain layers as the
             rest of the budget holds

The layers are patched through transformers' own hook (`GradientCheckpointingLayer`), so the
model stays a transformers model and `CheckpointHandle.undo()` restores it exactly.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
from tqdm import tqdm
from transformers.modeling_layers import GradientCheckpointingLayer

from longctx.loss import unwrap_causal_lm

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GiB = 2**30
# A training process's own host memory beside the pinned buffers (Python, torch, CUDA libraries,
# data): 3.2 GiB measured in a 400K-token run of bench/single_gpu.py on an H100, rounded up. The
# planner counts the same amount per rank, so both agree on the longest sequence the host holds.
PROCESS_HOST_BYTES = 4 * GiB
# Offloaded inputs on the GPU at once in backward: the one being recomputed and the one prefetched.
IN_FLIGHT = 2


class HostMemoryError(RuntimeError):
    """Offloaded activations would not fit in host memory; raised before training starts."""


@dataclass(frozen=True)
class Layout:
    """How many decoder layers, from the bottom, are host, gpu and plain (see the module doc)."""

    host: int
    gpu: int
    plain: int

    @property
    def layers(self) -> int:
        return self.host + self.gpu + self.plain

    @property
    def inputs_in_backward(self) -> int:
        """Most layer inputs on the GPU at once while checkpointed layers are recomputed. Backward
        frees each kept input as its layer finishes, top down, and offloaded inputs come back only
        below the kept ones: the lowest kept layer runs beside the first prefetch, then two
        offloaded inputs are there at a time (the one recomputed, the one prefetched)."""
        return max(self.gpu, min(IN_FLIGHT, self.host + min(self.gpu, 1)))

    def describe(self) -> str:
        if self.host == self.gpu == 0:
            return "activation checkpointing: off"
        parts = [f"{n} {what}" for n, what in ((self.host, "with inputs in host memory"),
                                               (self.gpu, "with inputs in device memory"),
                                               (self.plain, "not checkpointed (no recompute)")) if n]
        return "decoder layers, bottom to top: " + "; ".join(parts)


def layout_for(policy: str, n_layers: int, gpu_layers: Optional[int] = None) -> Layout:
    """The layout of an explicit policy (none | full | offload)."""
    if policy == "none":
        return Layout(0, 0, n_layers)
    if policy == "full":
        return Layout(0, n_layers, 0)
    if policy == "offload":
        kept = min(n_layers, max(0, gpu_layers or 0))
        return Layout(n_layers - kept, kept, 0)
    raise ValueError(f"train.checkpointing={policy!r}: the layout of none|full|offload; 'auto' is planned by the "
                     "launcher (launcher/run.py), which passes its layout")


def choose_layout(n_layers: int, input_bytes: int, plain_bytes: int, recompute_room: int, top_room: int) -> Layout:
    """The `auto` layout: the fastest that fits. GPU bytes for kept activations are bounded twice:
    `recompute_room` while a checkpointed layer is recomputed (inputs on the GPU, plain layers
    already freed) and `top_room` at the loss and the plain layers' backward (inputs and plain
    layers' activations). Inputs on the GPU come first (each saves two copies), then plain layers
    (each saves a recompute); when not every input fits, the rest go to host memory."""
    if n_layers * input_bytes > recompute_room or n_layers * input_bytes > top_room:
        on_gpu = min(n_layers, max(0, min(recompute_room, top_room) // max(1, input_bytes)))
        return Layout(n_layers - on_gpu, on_gpu, 0)
    extra = max(1, plain_bytes - input_bytes)  # a gpu layer turned plain: its activations instead of its input
    plain = min(n_layers, (top_room - n_layers * input_bytes) // extra)
    return Layout(0, n_layers - plain, plain)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (inside a PEFT wrapper or not)."""
    lm = unwrap_causal_lm(model)
    return lm.get_decoder().layers


def layer_input_bytes(model_config: PretrainedConfig, seq_len: int, micro_batch: int, dtype_bytes: int = 2) -> int:
    """Bytes of one decoder layer's input: what checkpointing keeps per layer."""
    return micro_batch * seq_len * model_config.hidden_size * dtype_bytes


def _proc_bytes(path: str, key: str) -> int:
    """A `key: N kB` line of a /proc file, in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{path} has no {key} line")


def available_host_bytes() -> int:
    """MemAvailable of this machine (what can be pinned without pushing others to swap)."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def resident_host_bytes() -> int:
    """This process's resident memory (VmRSS): already missing from MemAvailable."""
    return _proc_bytes("/proc/self/status", "VmRSS")


def require_host_memory(need_bytes: int, available_bytes: Optional[int] = None,
                        resident_bytes: Optional[int] = None, reserve_bytes: int = PROCESS_HOST_BYTES) -> None:
    """Refuse at start, with the numbers, when offloaded activations would not fit in host memory. As in the
    planner, the process may use `reserve_bytes` beside them; what it holds already is out of MemAvailable, so
    only the rest of that reserve is asked for (else a run the planner passed at launch is refused here)."""
    available = available_host_bytes() if available_bytes is None else available_bytes
    resident = resident_host_bytes() if resident_bytes is None else resident_bytes
    more = max(0, reserve_bytes - resident)
    if need_bytes + more > available:
        raise HostMemoryError(
            f"train.checkpointing: offloaded layer inputs need {need_bytes / GiB:.1f} GiB of pinned host memory "
            f"(+{more / GiB:.1f} GiB for the process, which holds {resident / GiB:.1f}), only "
            f"{available / GiB:.1f} GiB available; shorten data.seq_len, keep more layers on the GPU "
            "(train.gpu_checkpoint_layers), or use more GPUs (parallel.sp)")


class RngState:
    """CPU and device generator states at a forward, replayed in its recompute (dropout masks)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


@dataclass(eq=False)
class _Stash:
    """One layer's saved input: a GPU tensor, or a host buffer plus the event of its copy."""

    index: int
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    gpu: Optional[torch.Tensor] = None
    host: Optional[torch.Tensor] = None
    ready: Optional[torch.cuda.Event] = None  # the copy this stash waits for (to host, then to GPU)
    below: Optional["_Stash"] = None  # the layer under this one in the same forward pass


class LayerInputOffloader:
    """Keeps decoder-layer inputs between forward and backward, on the GPU or in pinned host memory."""

    def __init__(self, n_layers: int, gpu_layers: int):
        self.n_layers = n_layers
        self.offloaded = frozenset(range(max(0, n_layers - gpu_layers)))
        self._host: dict[int, torch.Tensor] = {}  # flat buffer per offloaded layer, reused every step
        self._writer: dict[int, _Stash] = {}  # the stash whose input each buffer holds now
        self._pinned: list[int] = []  # data pointers registered with CUDA, unregistered in close()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: Optional[_Stash] = None

    @property
    def host_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._host.values())

    def reserve(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        """Allocate (and pin) every host buffer now, so a step never pins and a shortage shows at start."""
        numel = int(torch.Size(shape).numel())
        # pinning takes about a minute per 100 GiB: shown by the first rank of each node
        quiet = device.type != "cuda" or int(os.environ.get("LOCAL_RANK", 0)) != 0
        for index in tqdm(sorted(self.offloaded), desc="pinning layer-input buffers", unit="layer", disable=quiet):
            self._buffer(index, numel, dtype, device)

    def _buffer(self, index: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._host.get(index)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            self._unpin(buf)
            buf = torch.empty(numel, dtype=dtype)
            if device.type == "cuda":
                # Registered at its exact size: torch's pinned allocator rounds to a power of two,
                # which would nearly double the host memory of a 384K-token run.
                nbytes = buf.numel() * buf.element_size()
                err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
                if int(err) != 0:
                    raise HostMemoryError(f"pinning {nbytes / GiB:.1f} GiB of host memory failed (cudaError {int(err)})")
                self._pinned.append(buf.data_ptr())
            self._host[index] = buf
        return buf[:numel]

    def _unpin(self, buf: Optional[torch.Tensor]) -> None:
        if buf is not None and buf.data_ptr() in self._pinned:
            torch.cuda.synchronize()  # no copy may still be reading or writing it
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
            self._pinned.remove(buf.data_ptr())

    def close(self) -> None:
        """Unpin and free the host buffers."""
        for buf in self._host.values():
            self._unpin(buf)
        self._host.clear()
        self._writer.clear()
        self._last = None

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def save(self, index: int, hidden: torch.Tensor) -> _Stash:
        """Keep `hidden` for layer `index`'s backward; an offloaded copy starts now, asynchronously."""
        below = self._last if self._last is not None and self._last.index == index - 1 else None
        stash = _Stash(index, hidden.shape, hidden.dtype, hidden.device, below=below)
        if index not in self.offloaded:
            stash.gpu = hidden
        else:
            host = self._buffer(index, hidden.numel(), hidden.dtype, hidden.device).view(hidden.shape)
            if hidden.is_cuda:
                stream = self._stream(hidden.device)
                stream.wait_stream(torch.cuda.current_stream(hidden.device))
                with torch.cuda.stream(stream):
                    host.copy_(hidden, non_blocking=True)
                    stash.ready = torch.cuda.Event()
                    stash.ready.record(stream)
                # The caller frees `hidden` once the next layer has run; keep its memory from
                # being reused until the copy on the side stream has read it.
                hidden.record_stream(stream)
            else:
                host.copy_(hidden)
            stash.host = host
            self._writer[index] = stash
        self._last = stash
        return stash

    def prefetch(self, stash: _Stash) -> None:
        """Start copying an offloaded input back to the GPU (no-op when on the GPU or under way)."""
        if stash.gpu is not None:
            return
        if self._writer.get(stash.index) is not stash:
            raise RuntimeError(
                f"decoder layer {stash.index}: its offloaded input was overwritten by a later forward pass; "
                "with offloaded checkpointing each forward must be followed by its backward")
        if not stash.device.type == "cuda":
            stash.gpu = stash.host.clone()
            return
        compute = torch.cuda.current_stream(stash.device)
        # Allocated in the compute stream's order; the side stream waits for the compute work
        # queued so far, so it never writes memory an earlier kernel is still using.
        gpu = torch.empty(stash.shape, dtype=stash.dtype, device=stash.device)
        stream = self._stream(stash.device)
        stream.wait_stream(compute)
        with torch.cuda.stream(stream):
            gpu.copy_(stash.host, non_blocking=True)
            stash.ready = torch.cuda.Event()
            stash.ready.record(stream)
        stash.gpu = gpu

    def load(self, stash: _Stash) -> torch.Tensor:
        """The saved input on the GPU, ready for the compute stream; prefetches the layer below."""
        self.prefetch(stash)
        if stash.ready is not None:
            torch.cuda.current_stream(stash.device).wait_event(stash.ready)
        if stash.below is not None and stash.below.index in self.offloaded:
            self.prefetch(stash.below)
        hidden, stash.gpu, stash.host, stash.below = stash.gpu, None, None, None
        if self._writer.get(stash.index) is stash:
            del self._writer[stash.index]
        if self._last is stash:
            self._last = None
        return hidden

    def checkpoint(self, index: int, run: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        """Layer `index` applied to `hidden` with its input saved here (the hook transformers calls)."""
        if not torch.is_grad_enabled():
            return run(hidden)
        for value in _tensors(getattr(run, "keywords", {}).values()):
            if value.requires_grad:
                raise ValueError(f"decoder layer {index}: a keyword input requires grad; checkpointing "
                                 "recomputes from the hidden states alone and would drop its gradient")
        # Frozen embeddings (LoRA): the function must still be in the graph for the layers' adapters to
        # receive gradients. An empty tensor that requires grad puts it there; making `hidden` itself a
        # leaf would keep it alive (autograd holds leaves) even when its copy is in host memory.
        anchor = None if hidden.requires_grad else hidden.new_empty(0).requires_grad_()
        return _CheckpointedLayer.apply(run, self, index, hidden, anchor)


def _tensors(values) -> Iterator[torch.Tensor]:
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            yield from _tensors(v)


class _CheckpointedLayer(torch.autograd.Function):
    """forward: run the layer without saving; backward: reload the input, recompute, differentiate."""

    @staticmethod
    def forward(ctx, run, offloader: LayerInputOffloader, index: int, hidden: torch.Tensor,
                anchor: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.run, ctx.offloader = run, offloader
        ctx.rng = RngState(hidden.device)
        ctx.stash = offloader.save(index, hidden)  # the copy overlaps the layer's own forward
        return run(hidden)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden = ctx.offloader.load(ctx.stash).detach().requires_grad_(ctx.needs_input_grad[3])
        saved = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.add(t.untyped_storage().data_ptr())
            return t

        with torch.enable_grad(), ctx.rng.restored(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = ctx.run(hidden)
        if out.untyped_storage().data_ptr() not in saved:
            # Backward needs the output's graph, not its values (nothing in the layer saved them): freed
            # now, a whole layer output less at the peak.
            out.untyped_storage().resize_(0)
        # Parameter gradients accumulate here, as in reentrant checkpointing (DeepSpeed's hooks see them).
        if out.requires_grad:  # not when neither the layer nor what is below it trains
            torch.autograd.backward(out, grad_out)
        ctx.run = ctx.stash = None
        return None, None, None, hidden.grad, None


@dataclass
class CheckpointHandle:
    """What `apply_checkpointing` changed; `undo()` restores the layers and frees host buffers."""

    layout: Layout
    offloader: LayerInputOffloader
    _restore: Callable[[], None]

    def undo(self) -> None:
        self._restore()
        self.offloader.close()


_UNSET = object()


def apply_checkpointing(model: torch.nn.Module, layout: Layout) -> CheckpointHandle:
    """Give the decoder layers the treatments of `layout` (host, gpu, plain from the bottom).
    Takes effect in training mode with gradients enabled."""
    layers = decoder_layers(model)
    if layout.layers != len(layers):
        raise ValueError(f"checkpointing layout covers {layout.layers} decoder layers, the model has {len(layers)}")
    for layer in layers:
        if not isinstance(layer, GradientCheckpointingLayer):
            raise ValueError(f"{type(layer).__name__} is not a transformers GradientCheckpointingLayer; "
                             "cannot checkpoint it through transformers' hook")
    checkpointed = layout.host + layout.gpu
    offloader = LayerInputOffloader(checkpointed, layout.gpu)
    before = [(layer, layer.__dict__.get("gradient_checkpointing", _UNSET),
               layer.__dict__.get("_gradient_checkpointing_func", _UNSET)) for layer in layers]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < checkpointed
        if index < checkpointed:
            layer._gradient_checkpointing_func = functools.partial(offloader.checkpoint, index)

    def restore() -> None:
        for layer, flag, func in before:
            for name, value in (("gradient_checkpointing", flag), ("_gradient_checkpointing_func", func)):
                if value is _UNSET:
                    layer.__dict__.pop(name, None)
                else:
                    setattr(layer, name, value)

    return CheckpointHandle(layout, offloader, restore)
