"""The cross-entropy of a linear layer's logits, computed without holding those logits for the whole batch.

``linear_cross_entropy(hidden, weight, bias, labels)`` is
``F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=-100)`` (reduction ``sum`` or ``mean``), the
MLM decoder and its loss in one step. The autograd Function `ChunkedLinearCrossEntropy` walks the rows
(positions) in chunks: the forward computes each chunk's logits, keeps only each row's logsumexp and target
logit, and drops the chunk; the backward recomputes each chunk's logits to form softmax - onehot and
accumulates the gradients of ``hidden``, ``weight`` and ``bias``. What it saves for the backward is the inputs
and one float per row, never an (n, vocab) tensor, and no fp32 copy of the logits outlives a chunk.

Dtypes: the matmuls run in the inputs' dtype (bf16 under `torch.autocast`, as the dense decoder would); each
chunk's logits are upcast to fp32 for the logsumexp and softmax, and the weight and bias gradients accumulate
in fp32 over chunks. Where ``liger_kernel`` is installed and the tensors are on CUDA, liger-kernel's
``LigerFusedLinearCrossEntropyLoss`` (Triton, same contract) runs instead; `linear_cross_entropy` says which
ran. Mean over no targets is NaN and the sum 0, as in ``torch.nn.functional.cross_entropy`` (and HF's heads,
which call it); the gradients are then zero.

Targets that fit one chunk (``chunk`` left to `chunk_rows`; sparse prediction's usual case below BERT-base
batches) take ``one_chunk``: torch's linear and cross-entropy, whose backward keeps the fp32 log-probabilities
of those rows (at most one chunk, ``CHUNK_BYTES``) instead of recomputing the matmul.

The logits come back too (detached, the inputs' dtype, (n, vocab)): what a head reports as its ``logits``.
The chunked path writes them chunk by chunk as it goes; liger's path computes them once more under no_grad.
"""

from __future__ import annotations

import importlib.util

import torch

IGNORE_INDEX = -100
REDUCTIONS = ("sum", "mean")
KERNELS = ("chunked", "one_chunk", "liger")
CHUNK_BYTES = 1 << 25


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: as many as keep one chunk's fp32 logits within ``CHUNK_BYTES`` (32 MiB: 274 rows of
    BERT's 30,522-word vocabulary), whatever the batch. (liger-kernel sizes chunks to the hidden states, which
    on a CPU with a narrow model makes chunks of a few rows, each re-reading the whole decoder weight.)"""
    return max(1, CHUNK_BYTES // (4 * vocab))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``labels`` (rows at ``IGNORE_INDEX``
    count nothing), with the logits as a second, non-differentiable output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int):
        rows, vocab = hidden.shape[0], weight.shape[0]
        logits = hidden.new_empty((rows, vocab))
        lse = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        target = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        valid = labels != IGNORE_INDEX
        safe = torch.where(valid, labels, 0)
        with torch.autocast(hidden.device.type, enabled=False):  # the caller chose the dtype
            for start in range(0, rows, chunk):
                part = slice(start, start + chunk)
                block = torch.nn.functional.linear(hidden[part], weight, bias)
                logits[part] = block
                block = block.float()
                lse[part] = torch.logsumexp(block, dim=-1)
                target[part] = block.gather(1, safe[part, None]).squeeze(1)
        loss = torch.where(valid, lse - target, 0.0).sum()
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(logits)
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss, _grad_logits):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        valid = labels != IGNORE_INDEX
        safe = torch.where(valid, labels, 0)
        rows, chunk = hidden.shape[0], ctx.chunk
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, rows, chunk):
                part = slice(start, start + chunk)
                block = torch.nn.functional.linear(hidden[part], weight, bias).float()
                probs = torch.exp(block - lse[part, None])  # softmax, from the forward's logsumexp
                probs.scatter_add_(1, safe[part, None], torch.full_like(lse[part, None], -1.0))
                # ignored rows: exactly 0 (also when grad_loss is inf, the mean over no targets)
                grad = torch.where(valid[part, None], probs * grad_loss, 0.0)
                if need_bias:
                    grad_bias += grad.sum(0)
                grad = grad.to(hidden.dtype)
                if need_hidden:
                    grad_hidden[part] = grad @ weight
                if need_weight:
                    grad_weight += (grad.t() @ hidden[part]).float()
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None


def liger_available(device: torch.device) -> bool:
    """Whether liger-kernel's fused linear cross-entropy can run here (installed, CUDA tensors)."""
    return device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def _liger(hidden, weight, bias, labels):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    result = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(weight, hidden, labels, bias)
    # a tensor; (loss, z_loss) or CrossEntropyOutput in liger versions asked for more
    loss = result[0] if isinstance(result, tuple) else getattr(result, "loss", result)
    with torch.no_grad():
        logits = torch.nn.functional.linear(hidden, weight, bias)
    return loss.float(), logits


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, reduction: str = "mean", chunk: int | None = None,
                         kernel: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(loss, logits, kernel)``: the cross-entropy of ``hidden (n, width) @ weight.T + bias`` against
    ``labels (n,)`` (fp32; -100 ignored; ``reduction`` sum or mean), the (n, vocab) logits (detached), and
    the kernel that ran (``chunked``, ``one_chunk`` (module docstring), or ``liger`` where installed on CUDA;
    ``kernel`` forces one).
    Under `torch.autocast` the matmuls run in its dtype, as ``nn.Linear`` would. ``chunk``: rows per chunk
    (None: `chunk_rows`)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy reduction={reduction!r} is invalid; allowed: 'sum', 'mean'")
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"linear_cross_entropy kernel={kernel!r} is invalid; allowed: None, 'chunked', 'one_chunk', "
                         "'liger'")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"linear_cross_entropy chunk={chunk!r} is invalid; allowed: None or an int >= 1")
    device = hidden.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    if bias is None:  # one code path: a zero bias that takes no gradient
        bias = torch.zeros(weight.shape[0], dtype=dtype, device=device)
    bias = bias.to(dtype)
    labels = labels.to(device)
    fits = chunk is None and hidden.shape[0] <= chunk_rows(weight.shape[0])
    chunk = chunk or chunk_rows(weight.shape[0])
    if kernel is None:  # rows that fit one chunk: torch's kernels, without the chunked backward's recomputation
        kernel = "liger" if liger_available(device) else "one_chunk" if fits else "chunked"
    if kernel == "liger":
        loss, logits = _liger(hidden, weight, bias, labels)
    elif kernel == "one_chunk":
        with torch.autocast(device.type, enabled=False):
            logits = torch.nn.functional.linear(hidden, weight, bias)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        logits = logits.detach()
    else:
        loss, logits = ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk)
    if reduction == "mean":
        loss = loss / (labels != IGNORE_INDEX).sum()  # 0 / 0 = nan over no targets, as torch
    return loss, logits, kernel
