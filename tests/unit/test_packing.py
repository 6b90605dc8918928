"""Padding-free packing: a packed row gives the same per-example logits, losses and gradients as
the padded batch, on every tiny architecture, and attention never crosses examples."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import tunelab
from tests.helpers import sft_config
from tunelab.data.collate import count_targets, pad_batch, to_device
from tunelab.data.packing import is_packed, model_inputs, pack_batch, real_tokens
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunelab.errors import TunelabError
from tunelab.kernels.packed_attention import PACKED_ATTENTION, use_packed_attention
from tunelab.logprobs import model_lm_loss_sum
from tunelab.tiny import ARCHITECTURES
from tunelab.training.metrics import read_metrics


def examples(vocab: int, lengths=(9, 23, 4, 15), seed: int = 0, prompt: int = 3) -> list[TokenizedExample]:
    """Random examples; the first `prompt` tokens of each are prompt (label -100). With `prompt=0`
    every token has its label, the first one included (as text data has), so only `pack_batch`'s
    masking keeps the last token of one example from predicting the first of the next."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(10, vocab, (n,), generator=g).tolist()
        out.append(TokenizedExample(ids, [IGNORE_INDEX] * min(prompt, n) + ids[prompt:]))
    return out


def load(model_dir, packed: bool):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    if packed:
        use_packed_attention(model)
    return model


def test_pack_batch_fields():
    exs = examples(100, lengths=(3, 5, 2))
    batch = pack_batch(exs)
    assert batch["input_ids"].shape == (1, 10)
    assert batch["input_ids"][0].tolist() == [t for e in exs for t in e.input_ids]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 8, 10] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 5
    # The first token of every example carries no label: nothing predicts across a boundary.
    labels = batch["labels"][0].tolist()
    assert labels[0] == labels[3] == labels[8] == IGNORE_INDEX
    assert count_targets(batch["labels"]) == sum(e.num_targets for e in exs)
    assert is_packed(batch) and not is_packed(pad_batch(exs, 0))
    assert real_tokens(batch) == real_tokens(pad_batch(exs, 0)) == 10
    moved = to_device(batch, torch.device("cpu"))
    assert set(model_inputs(moved)) == {"input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"}
    assert moved["max_length_q"] == 5 and set(model_inputs(moved, "flash_attention_2")) == {
        "input_ids",
        "position_ids",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
    }


def test_pack_batch_masks_the_first_label_of_every_example():
    """Every token labelled: the packed labels are the examples' own except at each offset c_i,
    where -100 stops the last token of example i from predicting the first of example i + 1."""
    full = examples(100, lengths=(3, 5, 2, 1, 4), prompt=0)
    batch = pack_batch(full)
    labels, starts = batch["labels"][0].tolist(), batch["cu_seq_lens_q"][:-1].tolist()
    assert starts == [0, 3, 8, 10, 11]
    assert all(labels[c] == IGNORE_INDEX for c in starts)
    own = [label for e in full for label in e.labels]
    assert [y for i, y in enumerate(labels) if i not in starts] == [
        y for i, y in enumerate(own) if i not in starts
    ]
    assert IGNORE_INDEX not in own  # so every -100 above is pack_batch's
    assert count_targets(batch["labels"]) == sum(e.num_targets for e in full) == 10


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_logits_and_losses_equal_padded(tiny_model_dirs, arch):
    padded_model, packed_model = load(tiny_model_dirs[arch], False), load(tiny_model_dirs[arch], True)
    exs = examples(padded_model.config.vocab_size)
    padded, packed = pad_batch(exs, 0), pack_batch(exs)
    with torch.no_grad():
        logits_padded = padded_model(**model_inputs(padded)).logits  # (B, T, V)
        logits_packed = packed_model(**model_inputs(packed)).logits  # (1, N, V)
    start = 0
    for row, example in enumerate(exs):
        n = len(example.input_ids)
        torch.testing.assert_close(
            logits_packed[0, start : start + n], logits_padded[row, :n], atol=2e-5, rtol=1e-4
        )
        start += n
    # Prompt-masked examples, and examples labelled from their first token (text data): the
    # packed loss counts no prediction across a boundary, so it equals the padded one.
    for labelled in (exs, examples(padded_model.config.vocab_size, prompt=0)):
        padded, packed = pad_batch(labelled, 0), pack_batch(labelled)
        for chunked in (True, False):
            loss_padded = model_lm_loss_sum(padded_model, padded, chunk_size=7, chunked=chunked)
            loss_packed = model_lm_loss_sum(packed_model, packed, chunk_size=7, chunked=chunked)
            torch.testing.assert_close(loss_packed, loss_padded, atol=1e-4, rtol=1e-5)


def test_packed_gradients_equal_padded(llama_dir):
    """Every token labelled (the first one too): the gradients equal the padded batch's."""
    padded_model, packed_model = load(llama_dir, False), load(llama_dir, True)
    exs = examples(padded_model.config.vocab_size, prompt=0)
    model_lm_loss_sum(padded_model, pad_batch(exs, 0)).backward()
    model_lm_loss_sum(packed_model, pack_batch(exs)).backward()
    for (name, a), (_, b) in zip(
        padded_model.named_parameters(), packed_model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_attention_does_not_cross_examples(llama_dir):
    """Changing one example's tokens changes no other example's logits (earlier or later)."""
    model = load(llama_dir, True)
    exs = examples(model.config.vocab_size)
    changed = [exs[0], examples(model.config.vocab_size, lengths=(23,), seed=9)[0], exs[2], exs[3]]
    with torch.no_grad():
        a = model(**model_inputs(pack_batch(exs))).logits[0]  # (N, V)
        b = model(**model_inputs(pack_batch(changed))).logits[0]
    bounds = pack_batch(exs)["cu_seq_lens_q"].tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if i == 1:
            assert not torch.allclose(a[start:end], b[start:end])
        else:
            torch.testing.assert_close(a[start:end], b[start:end])


def test_plain_batches_still_work_with_packed_attention(llama_dir):
    """The switched model computes padded batches (and generation) as plain SDPA does."""
    plain, switched = load(llama_dir, False), load(llama_dir, True)
    assert switched.config._attn_implementation == PACKED_ATTENTION
    batch = pad_batch(examples(plain.config.vocab_size), 0)
    with torch.no_grad():
        torch.testing.assert_close(
            switched(**model_inputs(batch)).logits, plain(**model_inputs(batch)).logits
        )
        prompt = batch["input_ids"][:1, :5]
        assert torch.equal(
            switched.generate(prompt, max_new_tokens=4, do_sample=False),
            plain.generate(prompt, max_new_tokens=4, do_sample=False),
        )


def test_unsupported_attention_is_an_error(llama_dir):
    model = load(llama_dir, False)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(TunelabError, match="packing needs"):
        use_packed_attention(model)


@pytest.mark.parametrize("data", ["instruction", "text"])
def test_packed_training_takes_the_same_steps(tiny_model_dirs, instruction_data, tmp_path, data):
    """SFT with data.packing=true trains on the same micro-batches, so its losses match: on
    instruction data (prompts masked) and on text data (every token a target)."""
    model_dir, train_file = tiny_model_dirs["llama"], instruction_data[0]
    if data == "text":
        records = [json.loads(line) for line in train_file.read_text().splitlines()]
        train_file = tmp_path / "text.jsonl"
        train_file.write_text(
            "".join(
                json.dumps({"text": f"{r['instruction']} {r['input']} {r['output']}"}) + "\n" for r in records
            )
        )
    tunelab.train(sft_config(model_dir, train_file, tmp_path / "padded"))
    tunelab.train(sft_config(model_dir, train_file, tmp_path / "packed", "data.packing=true"))
    padded, packed = read_metrics(tmp_path / "padded"), read_metrics(tmp_path / "packed")
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], rel=1e-4)
    # Same real tokens per step; tokens/s is measured on real tokens either way.
    assert [r["tokens"] for r in packed] == [r["tokens"] for r in padded]
