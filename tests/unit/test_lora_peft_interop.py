"""LoRA files interoperate with PEFT 0.21 (an independent implementation) in both directions.

tunelab -> PEFT: an adapter saved by `lora.save` (random A and B, perturbed saved modules) loads with
`peft.PeftModel.from_pretrained` and gives the same logits (max abs diff < 1e-5 in float32).
PEFT -> tunelab: an adapter built and saved by PEFT (its A, B and modules_to_save copies
randomised) loads with `lora.load` and with `tunelab.methods.load_trained`, giving PEFT's logits.
Llama (nn.Linear), GPT-2 (transposed Conv1D, `fan_in_fan_out`) and Phi-3 (fused qkv_proj) are used.
"""

from __future__ import annotations

import copy
import functools
import json
import warnings

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.methods import lora
from tunelab.trained import load_trained

CASES = [
    # (arch, target_modules, modules_to_save, use_rslora)
    ("llama", ["q_proj", "v_proj"], ["lm_head"], False),
    ("llama", r".*\.(k_proj|down_proj)", ["embed_tokens"], True),
    ("gpt2", ["c_attn"], ["lm_head"], False),
    ("gpt2", "all-linear", [], True),
    ("phi3", "all-linear", ["lm_head"], False),
]
IDS = [f"{arch}-{i}" for i, (arch, *_) in enumerate(CASES)]


@functools.cache
def _loaded(model_dir) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def load(model_dir) -> torch.nn.Module:
    """A fresh copy of the model in `model_dir` (loaded from disk once per test session)."""
    return copy.deepcopy(_loaded(model_dir))


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [9, 8, 7, 6, 5, 4, 3, 2]])  # (B, T)
    with torch.no_grad():
        return model(input_ids=ids).logits  # (B, T, V)


def randomise_named(model: torch.nn.Module, markers: tuple[str, ...], seed: int = 1) -> int:
    """Randomise every parameter whose name holds one of `markers`; return how many were touched."""
    gen = torch.Generator().manual_seed(seed)
    touched = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(m in name for m in markers):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
                touched += 1
    return touched


def assert_close_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert (actual - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize(("arch", "targets", "to_save", "rslora"), CASES, ids=IDS)
def test_tunelab_adapter_loads_in_peft(tiny_model_dirs, tmp_path, arch, targets, to_save, rslora):
    base_dir = tiny_model_dirs[arch]
    options = lora.Options(r=4, alpha=8, target_modules=targets, modules_to_save=to_save, use_rslora=rslora)
    model = load(base_dir)
    base = logits(model)
    lora.apply(model, options)
    assert randomise_named(model, (".lora_A.", ".lora_B.", ".trained_module."))
    expected = logits(model)
    assert (expected - base).abs().max() > 1e-3
    lora.save(model, options, tmp_path / "adapter", str(base_dir))

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (arch == "gpt2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(load(base_dir), tmp_path / "adapter").eval()
    problems = [
        str(w.message)
        for w in caught
        if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()
    ]
    assert not problems, problems
    assert_close_logits(logits(peft_model), expected)


@pytest.mark.parametrize(("arch", "targets", "to_save", "rslora"), CASES, ids=IDS)
def test_peft_adapter_loads_in_tunelab(tiny_model_dirs, tmp_path, arch, targets, to_save, rslora):
    base_dir = tiny_model_dirs[arch]
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        modules_to_save=to_save or None,
        use_rslora=rslora,
        fan_in_fan_out=arch == "gpt2",
        task_type="CAUSAL_LM",
    )
    base = logits(load(base_dir))
    peft_model = peft.get_peft_model(load(base_dir), config)
    assert randomise_named(peft_model, (".lora_A.", ".lora_B.", ".modules_to_save."))
    peft_model.eval()
    expected = logits(peft_model)
    assert (expected - base).abs().max() > 1e-3
    peft_model.save_pretrained(tmp_path / "peft-adapter")

    model = load(base_dir)
    lora.load(model, tmp_path / "peft-adapter")
    assert_close_logits(logits(model), expected)
    assert len(lora.lora_layers(model)) == sum(
        isinstance(m, peft.tuners.lora.LoraLayer) for m in peft_model.modules()
    )

    trained, _, method = load_trained(tmp_path / "peft-adapter", device="cpu")
    assert method == "lora"
    assert_close_logits(logits(trained), expected)


def test_reward_model_adapter_with_score_head(tiny_model_dirs, tmp_path):
    """A reward model (sequence classification, head `score` in modules_to_save) saves as PEFT's
    SEQ_CLS adapter and loads in PEFT and in tunelab with the same scores."""
    from transformers import AutoModelForSequenceClassification

    reward_dir = tmp_path / "reward-base"
    AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dirs["llama"], num_labels=1
    ).save_pretrained(reward_dir)

    def load_reward() -> torch.nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()

    def scores(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=torch.tensor([[5, 17, 42, 99, 7, 3]])).logits  # (B, 1)

    options = lora.Options(r=4, alpha=8, modules_to_save=["score"])
    model = load_reward()
    lora.apply(model, options)
    assert randomise_named(model, (".lora_A.", ".lora_B.", ".trained_module."))
    expected = scores(model)
    lora.save(model, options, tmp_path / "adapter", str(reward_dir))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"

    assert_close_logits(
        scores(peft.PeftModel.from_pretrained(load_reward(), tmp_path / "adapter").eval()), expected
    )
    fresh = load_reward()
    lora.load(fresh, tmp_path / "adapter")
    assert_close_logits(scores(fresh), expected)
