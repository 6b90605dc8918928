"""One generation path (tunelab/generation.py) for evaluation and rollouts: one EOS rule, the same
responses whatever the batching."""

from __future__ import annotations

import pytest
import torch

from tunelab.evaluate import generate_responses
from tunelab.generation import eos_token_ids, generate
from tunelab.models import load_model, load_tokenizer
from tunelab.rl.rollouts import generate_rollouts

PROMPTS = [[5, 9, 13], [7, 8, 9, 10, 11, 12, 40], [21, 22, 23, 24, 25], [30, 31]]


@pytest.fixture()
def model_and_tokenizer(llama_dir):
    return load_model(str(llama_dir), device="cpu"), load_tokenizer(str(llama_dir))


def test_eos_ids_are_the_tokenizer_and_generation_config_ones(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert eos_token_ids(model, tokenizer) == [tokenizer.eos_token_id]
    model.generation_config.eos_token_id = [40, tokenizer.eos_token_id, 7]
    assert eos_token_ids(model, tokenizer) == sorted({40, 7, tokenizer.eos_token_id})


def test_evaluation_and_rollouts_stop_at_a_generation_config_eos(model_and_tokenizer):
    """A token that only the generation config calls EOS ends the response in both callers: the
    rollout keeps it as the last response token, the text leaves it out."""
    model, tokenizer = model_and_tokenizer
    free = generate(model, tokenizer, PROMPTS, 8, options={"do_sample": False})
    assert not free.ended.any()  # the random tiny model never says EOS by itself
    stop = free.ids[0][3]  # row 0's fourth token becomes an end-of-sequence token
    first = free.ids[0].index(stop)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    rollout = generate_rollouts(model, tokenizer, PROMPTS, 8, greedy=True)
    assert rollout.ended[0] and rollout.completion_ids[0] == free.ids[0][: first + 1]
    assert rollout.response_mask[0].sum() == first + 1
    assert (rollout.input_ids[0, rollout.prompt_length + first + 1 :] == tokenizer.pad_token_id).all()
    texts = generate_responses(model, tokenizer, PROMPTS, 8)
    assert texts[0] == tokenizer.decode(free.ids[0][:first], skip_special_tokens=True)
    assert texts == rollout.completions


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batches_give_the_responses_of_one_batch(model_and_tokenizer, batch_size):
    """Each batch is padded to its own longest prompt, and the responses come back in one block."""
    model, tokenizer = model_and_tokenizer
    whole = generate(model, tokenizer, PROMPTS, 6, options={"do_sample": False})
    split = generate(model, tokenizer, PROMPTS, 6, batch_size, options={"do_sample": False})
    assert split.ids == whole.ids and split.texts == whole.texts
    assert torch.equal(split.prompt_ids, whole.prompt_ids) and split.prompt_ids.shape == (4, 7)
    assert (split.prompt_mask.sum(dim=1) == torch.tensor([len(p) for p in PROMPTS])).all()
    model.train()  # the mode the model was in comes back
    generate(model, tokenizer, PROMPTS[:1], 2, options={"do_sample": False})
    assert model.training
