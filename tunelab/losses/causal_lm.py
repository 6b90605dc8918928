"""Causal language-model loss, summed over target tokens.

    L_sum = - sum_{b,t : y[b,t+1] != -100} log softmax(h[b,t] W^T)[y[b,t+1]]

The sum (not the mean) is returned, so that a training step can divide by the target tokens of
*all* its accumulated micro-batches (batch 8 x 1 gives the same step as 1 x 8).

`chunked_lm_loss_sum` computes the same sum from the final hidden states without a (B, T, V)
logits tensor. It gathers the N target positions only (prompt and padding positions need no
logits), then runs the LM head and the cross-entropy on chunks of C of them. For a plain linear
head the gradient is computed chunk by chunk *inside the forward pass* (a fused linear
cross-entropy, as in Liger-Kernel, Hsu et al. 2024, arXiv:2410.10989): for chunk c with logits
z = h W^T (n, V) and p = softmax(z),

    dL/dz = p - onehot(y)                     (n, V), freed after the chunk
    dL/dh = (dL/dz) W                         (n, H), kept for backward
    dL/dW += (dL/dz)^T h                      (V, H), only when W trains

so peak memory for logits is O(C x V) in both passes, and backward only scales the stored
gradients by the incoming gradient: no second LM-head matmul, no recompute. Other heads (wrapped
by a method, e.g. LoRA's `modules_to_save`) take the generic path: each chunk under activation
checkpointing, which stores only its (n, H) input and recomputes its logits in backward.

With soft-capping (`c tanh(z / c)`, Gemma 2) the gradient picks up the factor 1 - tanh^2(z / c).
Under autocast the matmuls run in the autocast dtype and the softmax in float32.

Each chunk makes one pass of exp over its (n, V) logits: p = softmax(z) gives the gradient, and
the loss lse - z_y = z_max - z_y - log p_max is read off p at the row's largest logit, where
p_max = exp(z_max - lse) >= 1/V cannot underflow (a separate logsumexp would be a second exp pass
over the (n, V) logits, measurably slower forward and backward on CPU). A head that
`tunelab.kernels.cpu_fused.apply_fused_kernels` marked (`train.fused_kernels` on the CPU) takes the
loss and dL/dz of each chunk from one C++ pass per row instead (`cross_entropy_rows`: the same
formulas, each row of logits read from memory once), written over the chunk's logits, so one (n, V)
array lives per chunk instead of two.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunelab.kernels import cpu_fused

IGNORE_INDEX = -100


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over positions whose (shifted) label is not -100.

    logits: (B, T, V); labels: (B, T). Returns a float32 scalar.
    """
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def target_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states that predict a target, and those targets: ((N, H), (N,)).

    hidden: (B, T, H); labels: (B, T). Position t predicts label t + 1.
    """
    shift_labels = labels[:, 1:]  # (B, T-1)
    keep = shift_labels != IGNORE_INDEX  # (B, T-1)
    return hidden[:, :-1, :][keep], shift_labels[keep]


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, y_i), gradients computed chunk by chunk in forward (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap, dtype, fused_rows):
        # hidden (N, H), weight (V, H), bias (V,) or None, targets (N,); fused_rows: the C++ rows
        need_h = hidden.requires_grad
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        w = weight.to(dtype)  # (V, H)
        b = bias.to(dtype) if bias is not None else None
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = None  # (V, H) float32, from the first chunk on
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, targets.numel(), chunk_size):
                h = hidden[start : start + chunk_size].to(dtype)  # (n, H)
                y = targets[start : start + chunk_size]  # (n,)
                z = F.linear(h, w, b)  # (n, V), in `dtype`
                if softcap is not None:
                    capped = torch.tanh(z.float() / softcap)  # (n, V)
                    z = softcap * capped
                if fused_rows:  # the C++ rows: loss and gradient, each row read once (cpu_fused)
                    losses, g_lp = cpu_fused.cross_entropy_rows(
                        z, y, need_h or need_w or need_b, in_place=True
                    )
                    total += losses.sum()
                    if g_lp is None:
                        continue
                    g = None  # a bias's gradient, below, sums the rounded rows
                else:
                    # One exp pass: p = softmax(z) in float32. The loss lse - z_y is read off p at the
                    # row's argmax, where p_max = exp(z_max - lse) >= 1 / V never underflows:
                    # lse - z_y = z_max - z_y - log p_max.
                    g = torch.softmax(z, dim=-1, dtype=torch.float32)  # p: (n, V)
                    z_max = z.amax(dim=-1).float()  # (n,)
                    z_y = z.gather(1, y[:, None]).squeeze(1).float()  # (n,)
                    total += (z_max - z_y - torch.log(g.amax(dim=-1))).sum()
                    if not (need_h or need_w or need_b):
                        continue
                    g[torch.arange(y.numel(), device=y.device), y] -= 1.0  # p - onehot(y)
                    if softcap is not None:
                        g.mul_(1.0 - capped.square_())
                    g_lp = g.to(dtype)  # (n, V)
                if need_h:
                    grad_h[start : start + chunk_size] = g_lp @ w  # (n, H)
                if need_w and grad_w is None:
                    grad_w = (g_lp.t() @ h).float()  # (V, H): the first chunk's, widened (0 + x = x)
                elif need_w and dtype == torch.float32:
                    grad_w.addmm_(g_lp.t(), h)  # (V, H)
                elif need_w:
                    grad_w.add_(g_lp.t() @ h)  # (V, H), widened to float32 as it adds
                if need_b:
                    grad_b += (g if g is not None else g_lp.float()).sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        scale = grad_out.float()
        return (
            (grad_h * scale).to(h_dtype) if grad_h is not None else None,
            (grad_w * scale).to(w_dtype) if grad_w is not None else None,
            (grad_b * scale).to(b_dtype) if grad_b is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


def _chunk_loss(head, h, y, softcap):
    logits = head(h).float()  # (n, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, y, reduction="sum")


def chunked_lm_loss_sum(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_size: int = 1024,
    softcap: float | None = None,
) -> torch.Tensor:
    """The same sum as `lm_loss_sum`, from final hidden states, only at target positions, in chunks.

    hidden: (B, T, H) final-norm hidden states; head: the LM head module, (n, H) -> (n, V) (a plain
    `nn.Linear` takes the fused path; any other module the checkpointed one); labels: (B, T).
    `softcap` applies `c * tanh(z / c)` to the logits. Returns a float32 scalar.
    """
    targets_hidden, targets = target_positions(hidden, labels)  # (N, H), (N,)
    if targets.numel() == 0:
        return hidden.sum() * 0.0
    if type(head) is torch.nn.Linear:
        dtype = _compute_dtype(head.weight)
        fused_rows = cpu_fused.takes_loss(head, dtype, softcap)
        return _FusedLinearCrossEntropy.apply(
            targets_hidden, head.weight, head.bias, targets, chunk_size, softcap, dtype, fused_rows
        )
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        h = targets_hidden[start : start + chunk_size]  # (n, H)
        y = targets[start : start + chunk_size]  # (n,)
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss, head, h, y, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, y, softcap)
    return total
