"""The chunked LM loss equals the plain one (value and gradients), and keeps no logits tensor.

Reference: `lm_loss_sum` on the full logits h W^T + b, then autograd. The fused path computes
dL/dh = (softmax(z) - onehot(y)) W and dL/dW = (softmax(z) - onehot(y))^T h chunk by chunk.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.data.collate import pad_batch
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunelab.logprobs import model_lm_loss_sum
from tunelab.losses.causal_lm import chunked_lm_loss_sum, lm_loss_sum
from tunelab.models import no_logits
from tunelab.tiny import ARCHITECTURES


class Doubled(torch.nn.Module):
    """A head that is not a plain `nn.Linear` (takes the checkpointed path)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return 2 * self.linear(x)


def problem(seed=0, hidden=16, vocab=50, bias=False, train_head=True):
    torch.manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=bias)
    head.requires_grad_(train_head)
    h = torch.randn(3, 11, hidden, requires_grad=True)  # (B, T, H)
    labels = torch.randint(0, vocab, (3, 11))  # (B, T)
    labels[:, :4] = IGNORE_INDEX  # prompt
    labels[2, 7:] = IGNORE_INDEX  # padding
    return h, head, labels


def grads(loss, h, head):
    wrt = [h] + [p for p in head.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, wrt)


def reference(h, head, labels, softcap=None):
    logits = head(h)  # (B, T, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return lm_loss_sum(logits, labels)


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_equals_plain(chunk_size, bias, train_head, softcap):
    h, head, labels = problem(bias=bias, train_head=train_head)
    plain = reference(h, head, labels, softcap)
    chunked = chunked_lm_loss_sum(h, head, labels, chunk_size, softcap)
    torch.testing.assert_close(chunked, plain)
    # Scaled like the training loop does (loss / units) so backward's incoming gradient is not 1.
    for a, b in zip(grads(chunked / 7, h, head), grads(plain / 7, h, head), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_other_heads_take_the_checkpointed_path():
    h, head, labels = problem()
    wrapped = Doubled(head)
    plain = lm_loss_sum(wrapped(h), labels)
    chunked = chunked_lm_loss_sum(h, wrapped, labels, chunk_size=4)
    torch.testing.assert_close(chunked, plain)
    for a, b in zip(grads(chunked, h, head), grads(plain, h, head), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_no_logits_are_kept_for_backward():
    """Autograd keeps no (n, V) logits tensor: only (N, H) gradients and the (V, H) weight gradient
    (the fused path) or (n, H) chunk inputs (the checkpointed path). The plain loss keeps all logits."""
    h, head, labels = problem(vocab=4000)
    vocab, width = head.out_features, head.in_features

    def saved_shapes(fn) -> list[tuple[int, ...]]:
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return shapes

    def logits_like(shapes):
        return [s for s in shapes if vocab in s and s not in ((vocab, width), (width, vocab))]

    assert logits_like(saved_shapes(lambda: reference(h, head, labels)))
    assert not logits_like(saved_shapes(lambda: chunked_lm_loss_sum(h, head, labels, chunk_size=4)))
    generic = saved_shapes(lambda: chunked_lm_loss_sum(h, Doubled(head), labels, chunk_size=4))
    assert not logits_like(generic)


def test_bf16_autocast_is_close():
    h, head, labels = problem()
    plain = reference(h, head, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = chunked_lm_loss_sum(h, head, labels, chunk_size=5)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=2e-2, atol=0)
    for a, b in zip(grads(chunked, h, head), grads(plain, h, head), strict=True):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_no_target_gives_zero_with_a_gradient():
    h, head, labels = problem()
    labels[:] = IGNORE_INDEX
    loss = chunked_lm_loss_sum(h, head, labels)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert h.grad is not None and float(h.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2"])
def test_model_loss_chunked_equals_full_logits(tiny_model_dirs, arch):
    """Through a whole model (Gemma ties the head to the embedding; GPT-2 too)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch])
    vocab = model.config.vocab_size
    exs = []
    for n in (5, 12, 9):
        ids = torch.randint(10, vocab, (n,)).tolist()
        exs.append(TokenizedExample(ids, [IGNORE_INDEX] * 2 + ids[2:]))
    batch = pad_batch(exs, 0)
    full = model_lm_loss_sum(model, batch, chunked=False)
    full.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = model_lm_loss_sum(model, batch, chunk_size=4, chunked=True)
    chunked.backward()
    torch.testing.assert_close(chunked, full)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_no_logits_keeps_no_position_and_the_same_hidden_states(tiny_model_dirs, arch):
    """`logits_to_keep=no_logits(...)` (what the loss-from-hidden forwards pass) works on every
    architecture: zero positions of logits, and the final hidden states of a plain forward."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch])
    ids = torch.randint(10, model.config.vocab_size, (2, 7))  # (B, T)
    with torch.no_grad():
        plain = model(input_ids=ids, output_hidden_states=True)
        none = model(input_ids=ids, output_hidden_states=True, logits_to_keep=no_logits(ids.device))
    assert none.logits.shape[:2] == (2, 0) and plain.logits.shape[:2] == (2, 7)
    torch.testing.assert_close(none.hidden_states[-1], plain.hidden_states[-1], rtol=0, atol=0)
