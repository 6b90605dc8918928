"""Prefix tuning against PEFT 0.21.2: our saved prefix loads into PEFT and PEFT's into tunelab,
giving the same logits. PEFT's forward counts real tokens from m (the cached prefix length), as we
do, so plain calls (no position ids) agree. PEFT works on all six tiny architectures with
transformers 5.23 and 5.24, so every one is checked.

Generation: PEFT 0.21.2's prefix `generate` breaks under transformers 5.24 (which renamed the
forward's `past_key_values` to `cache`): its greedy tokens then differ from the ones its own
forward passes choose, and from its 5.23 tokens, which are ours (ours stay the same under both
versions: tests/unit/test_prefix.py checks generate against plain forwards). For that pair of
versions the generation test checks our side, PEFT's forward, and that PEFT's generate still
disagrees (so it says when PEFT is fixed).
"""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from packaging.version import Version

from tunelab.methods import prefix
from tunelab.models import load_model
from tunelab.tiny import ARCHITECTURES
from tunelab.trained import adapter_method_of

M = 4
PEFT_GENERATE_BROKEN = Version(transformers.__version__) >= Version("5.24") and Version(
    peft.__version__
) <= Version("0.21.2")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is faster than a thread pool waiting on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences, the second right-padded by 2 (PEFT numbers positions 0.. regardless of padding,
    which agrees with ours for right padding)."""
    ids = torch.randint(6, 400, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_peft_loads_our_prefix(arch, tiny_model_dirs, tmp_path):
    model_dir = str(tiny_model_dirs[arch])
    ids, mask = _batch()
    ours = load_model(model_dir, device="cpu").eval()
    torch.manual_seed(0)
    prefix.apply(ours, prefix.Options(num_virtual_tokens=M))
    prefix.save(ours, prefix.Options(num_virtual_tokens=M), tmp_path, model_dir)
    assert adapter_method_of(tmp_path) == "prefix"

    theirs = peft.PeftModel.from_pretrained(load_model(model_dir, device="cpu"), str(tmp_path)).eval()
    with torch.no_grad():
        expected = ours(input_ids=ids, attention_mask=mask).logits
        got = theirs(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_we_load_pefts_prefix(arch, tiny_model_dirs, tmp_path):
    model_dir = str(tiny_model_dirs[arch])
    ids, mask = _batch()
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=M)
    theirs = peft.get_peft_model(load_model(model_dir, device="cpu"), config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.normal_()
    theirs.save_pretrained(str(tmp_path))

    ours = load_model(model_dir, device="cpu").eval()
    prefix.load(ours, tmp_path)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


def test_we_load_pefts_reparameterised_prefix(llama_dir, tmp_path):
    """PEFT saves a `prefix_projection` prefix folded through its MLP; it loads as plain vectors."""
    ids, mask = _batch()
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=M, prefix_projection=True, encoder_hidden_size=24
    )
    torch.manual_seed(2)
    theirs = peft.get_peft_model(load_model(str(llama_dir), device="cpu"), config).eval()
    theirs.save_pretrained(str(tmp_path))

    ours = load_model(str(llama_dir), device="cpu").eval()
    prefix.load(ours, tmp_path)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_matches_peft(arch, tiny_model_dirs, tmp_path):
    """Greedy decoding of left-padded prompts. Ours: each step's logits are those of one forward over
    the whole sequence (positions from the mask, or given) and its tokens their argmax; PEFT's
    forward, given the same position ids,
    computes the same logits. PEFT's generate then gives our tokens and step logits, except with
    the broken pair of versions (module docstring), where its tokens differ from those its own
    forward chooses (when that stops being true, PEFT is fixed: drop PEFT_GENERATE_BROKEN)."""
    model_dir = str(tiny_model_dirs[arch])
    ours = load_model(model_dir, device="cpu").eval()
    torch.manual_seed(3)
    prefix.apply(ours, prefix.Options(num_virtual_tokens=M))
    prefix.save(ours, prefix.Options(num_virtual_tokens=M), tmp_path, model_dir)
    theirs = peft.PeftModel.from_pretrained(load_model(model_dir, device="cpu"), str(tmp_path)).eval()

    prompts = torch.randint(6, 400, (2, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompts)
    prompts[0, :2], mask[0, :2] = 0, 0
    new_tokens = 4
    settings = dict(
        input_ids=prompts,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        got = ours.generate(**settings)
        full_mask = torch.cat([mask, torch.ones(2, new_tokens, dtype=mask.dtype)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # counted from the first real token
        inputs = dict(input_ids=got.sequences, attention_mask=full_mask, position_ids=positions)
        ours_forward, theirs_forward = ours(**inputs).logits, theirs(**inputs).logits  # (2, 9, V)
        ours_from_mask = ours(input_ids=got.sequences, attention_mask=full_mask).logits  # positions ours
        expected = theirs.generate(**settings)
    width = prompts.shape[1]
    assert got.sequences.shape == (2, width + new_tokens) and len(got.logits) == new_tokens
    for step, logits in enumerate(got.logits):
        torch.testing.assert_close(logits, ours_forward[:, width - 1 + step], rtol=1e-4, atol=1e-4)
        assert torch.equal(got.sequences[:, width + step], logits.argmax(-1))
    real = full_mask.bool()
    torch.testing.assert_close(ours_from_mask[real], ours_forward[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs_forward[real], ours_forward[real], rtol=1e-5, atol=1e-5)
    if PEFT_GENERATE_BROKEN:  # our tokens are the greedy tokens of PEFT's own forward (just checked)
        assert not torch.equal(expected.sequences, got.sequences), "PEFT's prefix generate works again"
        return
    assert torch.equal(got.sequences, expected.sequences)
    for step_got, step_expected in zip(got.logits, expected.logits, strict=True):
        torch.testing.assert_close(step_got, step_expected, rtol=1e-5, atol=1e-5)
