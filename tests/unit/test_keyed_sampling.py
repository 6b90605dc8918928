"""Keyed sampling of rollouts (tunelab/rl/rollouts.py): inverting the CDF at a hashed uniform number
draws from softmax(z / tau) within the nucleus, and a row's response depends on its key and prompt only."""

from __future__ import annotations

import pytest
import torch
from transformers import TopPLogitsWarper

from tunelab.models import load_model, load_tokenizer
from tunelab.rl.rollouts import KeyedSampling, generate_rollouts, hash32, sampling_keys, top_p_filter


def _draw(logits: torch.Tensor, draws: int, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Token frequencies of `draws` keyed samples from one row of logits (V,) -> (V,)."""
    sampler = KeyedSampling(sampling_keys(7, 3, list(range(draws))), 0, temperature, top_p)
    scores = sampler(torch.zeros(draws, 0, dtype=torch.long), logits.expand(draws, -1))
    return torch.bincount(scores.argmax(-1), minlength=logits.numel()).float() / draws


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_frequencies_follow_the_tempered_softmax(temperature):
    """40,000 draws over 8 tokens: every frequency within 4 standard errors of softmax(z / tau)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 0.3])
    expected = (logits / temperature).softmax(-1)
    got = _draw(logits, 40_000, temperature)
    standard_error = (expected * (1 - expected) / 40_000).sqrt()
    assert ((got - expected).abs() <= 4 * standard_error + 1e-4).all(), (got, expected)


def test_top_p_keeps_hugging_face_nucleus_and_renormalises():
    """The nucleus is transformers' `TopPLogitsWarper`'s; draws fall inside it, in proportion."""
    rows = torch.randn(16, 50, generator=torch.Generator().manual_seed(0)) * 2
    for top_p in (0.3, 0.7, 0.95):
        ours = top_p_filter(rows, top_p)
        theirs = TopPLogitsWarper(top_p)(None, rows.clone())
        assert torch.equal(ours.isinf(), theirs.isinf())
    logits = rows[0]
    kept = ~top_p_filter(logits[None], 0.7)[0].isinf()
    got = _draw(logits, 20_000, top_p=0.7)
    assert got[~kept].sum() == 0
    expected = logits.masked_fill(~kept, float("-inf")).softmax(-1)
    assert (got - expected).abs().max() < 0.02


def test_hash_is_32_bit_and_spreads_neighbours():
    """Consecutive inputs give unrelated 32-bit outputs: uniform bits, no shared low bits."""
    values = hash32(torch.arange(100_000))
    assert int(values.min()) >= 0 and int(values.max()) < 2**32
    assert len(set(values.tolist())) == 100_000  # a bijection on 32-bit words
    bits = torch.stack([(values >> b) & 1 for b in range(32)]).float().mean(1)
    assert ((bits - 0.5).abs() < 0.01).all()


def test_a_response_depends_only_on_its_key_and_prompt(llama_dir):
    """The same prompt and key give the same response alone, in a batch with longer prompts (more
    left padding) and in another order; another step's key gives another response."""
    model = load_model(str(llama_dir), device="cpu").eval()
    tokenizer = load_tokenizer(str(llama_dir))
    short, long_a, long_b = [5, 9, 13], [7, 8, 9, 10, 11, 12, 40], [21, 22, 23, 24, 25]
    keys = sampling_keys(0, 1, [0, 1, 2])

    def sample(prompts, positions, step=1):
        rollout = generate_rollouts(
            model, tokenizer, prompts, 12, 1.0, 1.0, keys=sampling_keys(0, step, positions)
        )
        return rollout.completion_ids

    alone = sample([short], [0])
    batch = sample([short, long_a, long_b], [0, 1, 2])
    reordered = sample([long_b, short, long_a], [2, 0, 1])
    assert len(alone[0]) > 0 and keys.shape == (3,)
    assert batch[0] == alone[0] == reordered[1]
    assert batch[1] == reordered[2] and batch[2] == reordered[0]
    other_steps = [sample([short], [0], step=s)[0] for s in range(2, 6)]
    assert any(ids != alone[0] for ids in other_steps)
