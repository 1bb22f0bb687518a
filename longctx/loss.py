"""Causal-LM loss without full logits: the output projection and cross-entropy run per chunk.

Labels arrive already shifted (labels[t] is the token that position t predicts, -100 where
nothing is predicted), so chunks and sequence-parallel shards need no neighbour's token.

The gradients of the hidden states and of the output projection are made in the forward
pass, chunk by chunk, while each chunk's logits exist anyway; backward only scales them by
the incoming gradient. So no logits are recomputed and no (tokens x vocab) tensor outlives
its chunk. DeepSpeed's `TiledFusedLogitsLoss` works the same way but scales only the hidden
states' gradient in backward: a trained output projection would get its gradient unscaled
(wrong under any loss scaling, which the train loop applies), hence this function.
"""

from __future__ import annotations

import torch

from longctx.data import IGNORE_INDEX


def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                   make_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum of token losses, d(sum)/d(logits) in the logits' dtype or None) of one chunk.
    The softmax runs in fp32 (as transformers' loss) and in place: the chunk holds one fp32
    (tokens x vocab) tensor, where torch.logsumexp would hold a second, and it is freed before the
    caller's matmuls with the gradient."""
    dtype = logits.dtype
    logits = logits.float()
    valid = labels != IGNORE_INDEX
    target = labels.masked_fill(~valid, 0).unsqueeze(1)
    target_logit = logits.gather(1, target).squeeze(1)
    top = logits.amax(dim=1, keepdim=True)
    sums = logits.sub_(top).exp_().sum(dim=1, keepdim=True)  # logits now hold exp(logit - top)
    loss = torch.where(valid, (top + sums.log()).squeeze(1) - target_logit, 0.0).sum()
    if not make_grad:
        return loss, None
    # softmax - onehot(target), zero on ignored tokens: one pass scales each row by valid / sum
    valid = valid.unsqueeze(1).float()
    logits.mul_(valid / sums).scatter_add_(1, target, -valid)
    return loss, logits.to(dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens: int, make_grads: bool):
        h = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1)
        need_h = make_grads and ctx.needs_input_grad[0]
        need_w = make_grads and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_tokens):
            hc, yc = h[start:start + chunk_tokens], y[start:start + chunk_tokens]
            loss, grad_logits = _cross_entropy(hc @ weight.t(), yc, need_h or need_w)
            total += loss
            if need_h:
                grad_h[start:start + chunk_tokens] = grad_logits @ weight
            if need_w:
                grad_w += (grad_logits.t() @ hc).float()
            del grad_logits  # before the next chunk's logits exist
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h.view(hidden.shape) if need_h else None, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)  # accumulated over chunks in fp32
        return grad_h, grad_w, None, None, None


def chunked_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Sum of token losses of `hidden @ weight.T` against `labels`, `chunk_tokens` tokens at a time."""
    if chunk_tokens < 1:
        raise ValueError(f"train.loss_chunk_tokens={chunk_tokens}: must be >= 1")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens, torch.is_grad_enabled())


def causal_lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of predicted tokens) for one micro-batch."""
    lm = unwrap_causal_lm(model)
    hidden = lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    head = lm.get_output_embeddings()
    if head.bias is not None:
        raise ValueError("chunked loss supports bias-free output projections only")
    loss_sum = chunked_lm_loss(hidden, head.weight, labels, chunk_tokens)
    return loss_sum, (labels != IGNORE_INDEX).sum()
