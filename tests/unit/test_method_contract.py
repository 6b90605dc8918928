"""The method contract (`tunelab.methods.Method`), checked the same way for every method.

One table, `TABLE`, lists each method with its options on the tiny architectures it runs on; every
test below runs over the rows it applies to:

- every method module defines every member of the contract, with its signature;
- identity at init: a freshly applied method computes the base model's logits exactly (prefix
  tuning is the documented exception: any key changes the softmax normaliser);
- `apply` makes exactly the method's parameters trainable, as many as its formula says;
- `disabled` (and the `Reference` built on it) gives the base model's logits with randomised
  weights, nested too, and restores the adapted model after; methods that cannot be disabled raise,
  and the reference is a frozen copy;
- merged == unmerged where the method merges (LoRA);
- save/load round trip with randomised weights: `load` leaves the whole model frozen,
  `load(trainable=True)` makes exactly the method's parameters trainable;
- a few AdamW steps lower the loss and change exactly the trainable parameters, and a checkpoint of
  those parameters restores the trained model;
- `disabled` and `load` on a model without the method raise `RuntimeError`.

Adapter weights are randomised (LoRA's B and the adapters' up-projection included) before every
check that zero-initialised weights would pass trivially. Method-specific behaviour (the LoRA layer's
maths, adapter placements, prefix tuning's KV cache) is tested in test_lora.py, test_adapter.py and
test_prefix.py.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.errors import TunelabError
from tunelab.methods import (
    METHOD_MODULES,
    Method,
    adapter,
    count_parameters,
    full,
    get_method,
    lora,
    partial,
    prefix,
    trainable_parameters,
)
from tunelab.reference import Reference
from tunelab.tiny import ARCHITECTURES
from tunelab.weights import load_into

# GPT-2 and Phi-3 fuse q, k, v into one layer, so `[q_proj, v_proj]` (LoRA's default) names nothing there.
ATTENTION_TARGETS = {"gpt2": ["c_attn"], "phi3": ["qkv_proj"]}
M = 4  # prefix positions
BOTTLENECK = 8
DISABLES_TO_BASE = {"full": False, "partial": False, "lora": True, "adapter": True, "prefix": True}


@dataclass(frozen=True)
class Case:
    """One method with one set of options, run on each of `architectures`."""

    method: str
    label: str
    options: Callable[[str], object]
    """The method's `Options` for an architecture."""
    owns: Callable[[str], bool]
    """Is the parameter of this name one the method trains?"""
    architectures: tuple[str, ...] = ARCHITECTURES
    identity_at_init: bool = True
    exact_round_trip: bool = True
    """False where `save` folds a reparameterisation (the prefix MLP): equal up to rounding."""
    merges: bool = False


def _lora_owns(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".trained_module." in name


def _last_layer_owns(name: str) -> bool:  # the tiny models have 2 decoder layers
    return re.search(r"\.(layers|h)\.1\.", name) is not None


CASES = [
    Case(
        "lora",
        "attention",
        lambda arch: lora.Options(
            r=4, alpha=8, target_modules=ATTENTION_TARGETS.get(arch, ["q_proj", "v_proj"])
        ),
        _lora_owns,
        merges=True,
    ),
    Case(
        "lora",
        "all-linear",
        lambda arch: lora.Options(r=4, alpha=8, target_modules="all-linear", modules_to_save=["lm_head"]),
        _lora_owns,
        merges=True,
    ),
    Case(
        "lora",
        "dora",
        lambda arch: lora.Options(r=4, alpha=8, target_modules="all-linear", use_dora=True),
        lambda name: _lora_owns(name) or name.endswith(".lora_magnitude_vector"),
        merges=True,
    ),
    *[
        Case(
            "adapter",
            placement,
            lambda arch, placement=placement: adapter.Options(
                placement=placement, bottleneck=BOTTLENECK, activation="gelu", scale=2.0
            ),
            lambda name: ".adapter." in name,
        )
        for placement in ("houlsby", "pfeiffer", "parallel")
    ],
    Case(
        "prefix",
        "",
        lambda arch: prefix.Options(num_virtual_tokens=M),
        lambda name: name.startswith(prefix.ENCODER_NAME + "."),
        identity_at_init=False,  # any key changes the softmax normaliser
    ),
    Case(
        "prefix",
        "mlp",
        lambda arch: prefix.Options(num_virtual_tokens=M, prefix_projection=True, encoder_hidden_size=24),
        lambda name: name.startswith(prefix.ENCODER_NAME + "."),
        identity_at_init=False,
        exact_round_trip=False,
    ),
    Case("full", "", lambda arch: full.Options(), lambda name: True, ("llama", "gpt2")),
    Case("partial", "", lambda arch: partial.Options(last_layers=1), _last_layer_owns, ("llama", "gpt2")),
]


@dataclass(frozen=True)
class Row:
    """A case on one architecture: one row of the table the tests run over."""

    case: Case
    arch: str

    @property
    def options(self) -> object:
        return self.case.options(self.arch)

    @property
    def module(self) -> Method:
        return get_method(self.case.method)

    @property
    def id(self) -> str:
        return "-".join(part for part in (self.case.method, self.case.label, self.arch) if part)


TABLE = [Row(case, arch) for case in CASES for arch in case.architectures]
ADAPTER_ROWS = [row for row in TABLE if DISABLES_TO_BASE[row.case.method]]
WHOLE_MODEL_ROWS = [row for row in TABLE if not DISABLES_TO_BASE[row.case.method]]


def rows(selected: list[Row]):
    return pytest.mark.parametrize("row", selected, ids=[row.id for row in selected])


# --- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_models(tiny_model_dirs) -> dict[str, torch.nn.Module]:
    """Architecture -> the tiny base model, loaded once (tests take deep copies)."""
    return {
        arch: AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch], dtype=torch.float32).eval()
        for arch in ARCHITECTURES
    }


@pytest.fixture(scope="module")
def base_logits(base_models) -> dict[str, torch.Tensor]:
    return {arch: logits(model) for arch, model in base_models.items()}


def fresh(base_models, row: Row) -> torch.nn.Module:
    """A copy of the row's base model, without the method."""
    return copy.deepcopy(base_models[row.arch])


def applied(base_models, row: Row, seed: int = 0) -> torch.nn.Module:
    """A copy of the row's base model with the method applied (random parts drawn from `seed`)."""
    model = fresh(base_models, row)
    torch.manual_seed(seed)
    row.module.apply(model, row.options)
    return model


def batch() -> dict[str, torch.Tensor]:
    """Two rows of 8 tokens, the second right-padded by 3 (pad id 0, masked, no loss)."""
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [9, 8, 77, 6, 5, 0, 0, 0]])  # (B, T)
    mask = (ids != 0).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def logits(model: torch.nn.Module) -> torch.Tensor:
    inputs = batch()
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return out.logits  # (B, T, V)


def randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """Add N(0, 0.2^2) noise to every trainable parameter, so that zero-initialised parts (LoRA's B,
    the adapters' up-projection) are no longer zero and the method changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))


def owned(model: torch.nn.Module, row: Row) -> set[str]:
    """Names of the model's parameters that the row's method trains."""
    names = {name for name, _ in model.named_parameters() if row.case.owns(name)}
    assert names, "the method must own some parameters"
    return names


def formula(model: torch.nn.Module, row: Row) -> int:
    """The number of trainable parameters the method's maths gives."""
    config = model.config
    layers, d = config.num_hidden_layers, config.hidden_size
    if row.case.method == "lora":
        low_rank = sum(m.r * (m.in_features + m.out_features) for m in lora.lora_layers(model).values())
        low_rank += sum(m.out_features for m in lora.lora_layers(model).values() if m.use_dora)  # DoRA's m
        copies = sum(
            p.numel() for m in lora.saved_modules(model).values() for p in m.trained_module.parameters()
        )
        return low_rank + copies
    if row.case.method == "adapter":
        return adapter.trainable_parameter_formula(d, BOTTLENECK, row.options.placement, layers)
    if row.case.method == "prefix":
        kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)  # GPT-2: no GQA
        kv_dim = kv_heads * (d // config.num_attention_heads)
        if row.options.prefix_projection:
            e = row.options.encoder_hidden_size
            return M * kv_dim + (kv_dim * e + e) + (e * layers * 2 * kv_dim + layers * 2 * kv_dim)
        return M * layers * 2 * kv_dim
    return sum(p.numel() for name, p in model.named_parameters() if row.case.owns(name))


# --- the contract ----------------------------------------------------------------------------------


def test_the_protocol_lists_the_members_checked_here():
    members = {name for name in vars(Method) if not name.startswith("_")} | set(Method.__annotations__)
    assert members == {"Options", "DISABLES_TO_BASE", "apply", "save", "load", "disabled"}


@pytest.mark.parametrize("name", sorted(METHOD_MODULES))
def test_every_method_module_defines_every_member(name):
    module = get_method(name)
    assert isinstance(module, Method)
    assert dataclasses.is_dataclass(module.Options)
    assert module.DISABLES_TO_BASE is DISABLES_TO_BASE[name]
    for member in ("apply", "save", "load", "disabled"):
        wanted = list(inspect.signature(getattr(Method, member)).parameters.values())[1:]  # drop self
        found = list(inspect.signature(getattr(module, member)).parameters.values())
        assert [(p.name, p.default) for p in found] == [(p.name, p.default) for p in wanted], member


@rows(TABLE)
def test_apply_trains_exactly_the_methods_parameters(base_models, base_logits, row):
    model = applied(base_models, row)
    assert set(trainable_parameters(model)) == owned(model, row)
    assert count_parameters(model)[0] == formula(model, row)
    if row.case.identity_at_init:
        assert torch.equal(logits(model), base_logits[row.arch])
    else:  # a random prefix changes every attention's normaliser
        assert not torch.allclose(logits(model), base_logits[row.arch], atol=1e-4)


@rows(ADAPTER_ROWS)
def test_disabled_gives_the_base_model_and_restores(base_models, base_logits, row):
    model = applied(base_models, row)
    randomise(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, base_logits[row.arch], atol=1e-4), "the method must change outputs"
    with row.module.disabled(model) as disabled_model:
        assert disabled_model is model
        assert torch.equal(logits(model), base_logits[row.arch])
        with row.module.disabled(model):  # nested
            assert torch.equal(logits(model), base_logits[row.arch])
        assert torch.equal(logits(model), base_logits[row.arch])
    assert torch.equal(logits(model), adapted)

    reference = Reference(model, row.module)
    assert reference.copy is None and reference.kind == f"{row.case.method} disabled"
    with reference.model() as policy_ref:
        assert policy_ref is model and torch.equal(logits(policy_ref), base_logits[row.arch])
    assert torch.equal(logits(model), adapted)


@rows(WHOLE_MODEL_ROWS)
def test_whole_model_methods_cannot_disable_and_keep_a_frozen_copy(base_models, base_logits, row, tmp_path):
    model = applied(base_models, row)
    with pytest.raises(RuntimeError, match="cannot be disabled"):
        with row.module.disabled(model):
            pass
    with pytest.raises(RuntimeError, match="not an adapter"):
        row.module.load(fresh(base_models, row), tmp_path)

    reference = Reference(model, row.module)
    assert reference.copy is not None and reference.kind == "frozen copy"
    randomise(model)  # as training would
    with reference.model() as policy_ref:
        assert policy_ref is not model and torch.equal(logits(policy_ref), base_logits[row.arch])
    assert not any(p.requires_grad for p in reference.copy.parameters())


@rows([row for row in TABLE if row.case.merges])
def test_merged_equals_unmerged(base_models, base_logits, row):
    model = applied(base_models, row)
    base = base_logits[row.arch]
    base_weights = {name: p.clone() for name, p in base_models[row.arch].named_parameters()}
    randomise(model)
    unmerged = logits(model)

    lora.merge(model)
    merged_weights = {
        name: layer.base_layer.weight.clone() for name, layer in lora.lora_layers(model).items()
    }
    assert not any(torch.equal(w, base_weights[f"{name}.weight"]) for name, w in merged_weights.items())
    lora.merge(model)  # idempotent
    assert all(
        torch.equal(layer.base_layer.weight, merged_weights[name])
        for name, layer in lora.lora_layers(model).items()
    )
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-4)
    with lora.disabled(model):
        torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-4)

    lora.unmerge(model)
    for name, layer in lora.lora_layers(model).items():
        for key, p in layer.base_layer.named_parameters():
            torch.testing.assert_close(p, base_weights[f"{name}.{key}"], atol=1e-6, rtol=0)
    with lora.disabled(model):
        torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-4)


@rows(ADAPTER_ROWS)
def test_save_load_round_trip(base_models, row, tmp_path):
    model = applied(base_models, row)
    randomise(model)
    expected = logits(model)
    row.module.save(model, row.options, tmp_path, "tiny-base")

    loaded = fresh(base_models, row)
    row.module.load(loaded, tmp_path)
    assert trainable_parameters(loaded) == {}, "a loaded artifact is frozen by default"
    if row.case.exact_round_trip:
        assert torch.equal(logits(loaded), expected)
    else:
        torch.testing.assert_close(logits(loaded), expected, rtol=1e-6, atol=1e-6)

    trainable = fresh(base_models, row)
    row.module.load(trainable, tmp_path, trainable=True)
    assert set(trainable_parameters(trainable)) == owned(trainable, row)
    frozen = dict(loaded.named_parameters())
    assert all(torch.equal(p, frozen[name]) for name, p in trainable.named_parameters())


@rows(TABLE)
def test_training_changes_exactly_the_trainable_parameters(base_models, row):
    model = applied(base_models, row)
    trainable = trainable_parameters(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    inputs = batch()

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**inputs).loss.item()

    loss_before = eval_loss()
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    torch.manual_seed(0)
    for _ in range(3):  # LoRA's A and the adapters' down-projection get gradients from step 2 on
        model.train()
        model(**inputs).loss.backward()
        assert all(p.grad is None for name, p in model.named_parameters() if name not in trainable)
        optimizer.step()
        optimizer.zero_grad()
    assert eval_loss() < loss_before
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == set(trainable)

    # A checkpoint holds only the trainable parameters: loaded into a freshly applied model (other
    # random draws), it gives back the trained model.
    resumed = applied(base_models, row, seed=1)
    load_into(trainable_parameters(resumed), {n: p.detach() for n, p in trainable.items()}, "checkpoint")
    assert torch.equal(logits(resumed), logits(model))


@pytest.mark.parametrize("name", [name for name, disables in DISABLES_TO_BASE.items() if disables])
def test_a_model_without_the_method_cannot_be_disabled(base_models, name):
    with pytest.raises(RuntimeError, match="holds no"):
        with get_method(name).disabled(copy.deepcopy(base_models["llama"])):
            pass


def test_load_into_is_strict_names_the_file_and_copies_nothing_on_error():
    """Every `load` and training checkpoints go through `tunelab.weights.load_into`."""
    targets = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    with pytest.raises(TunelabError) as error:
        load_into(targets, {"a": torch.ones(3, 2), "c": torch.ones(1)}, "some/file.safetensors", hint="retry")
    message = str(error.value)
    assert message.startswith("some/file.safetensors does not fit the model")
    assert "missing ['b']" in message and "unexpected ['c']" in message and message.endswith("; retry")
    assert "a saved (3, 2), model (2, 3)" in message
    assert not targets["a"].any(), "nothing is copied when the file does not fit"

    load_into(targets, {"a": torch.ones(2, 3, dtype=torch.float64), "b": torch.arange(4.0)}, "f")
    assert targets["a"].dtype == torch.float32 and targets["a"].eq(1).all()
    assert torch.equal(targets["b"], torch.arange(4.0))
    load_into(targets, {"a": torch.ones(2, 3), "b": torch.ones(4)}, "f", place=lambda saved, like: 2 * saved)
    assert targets["b"].eq(2).all()


@pytest.mark.parametrize(
    "config, weights, expected",
    [
        (b"", None, r"adapter_config.json: not valid JSON \(line 1, column 1"),
        (b"[1, 2]", None, r"adapter_config.json: must hold a JSON object, not a list"),
        (b'{"peft_type": "\xff"}', None, r"adapter_config.json: not UTF-8 text"),
        (b"{}", b"", r"adapter_model.safetensors: not a readable safetensors file"),
        (b"{}", b"\x00" * 100, r"adapter_model.safetensors: not a readable safetensors file"),
    ],
)
def test_unreadable_adapter_files_are_errors_naming_the_file(tmp_path, config, weights, expected):
    from tunelab.methods.adapter_files import read_adapter_config, read_adapter_weights

    (tmp_path / "adapter_config.json").write_bytes(config)
    if weights is not None:
        (tmp_path / "adapter_model.safetensors").write_bytes(weights)
    with pytest.raises(TunelabError, match=expected) as caught:
        read_adapter_config(tmp_path) if weights is None else read_adapter_weights(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_adapter_config_fields_are_checked_by_name(tmp_path):
    from tunelab.methods.adapter_files import config_field

    config = {"r": "four", "target_modules": 5, "hidden_size": 8}
    assert config_field(config, tmp_path, "hidden_size", "int") == 8
    assert config_field(config, tmp_path, "lora_dropout", "number", required=False, default=0.0) == 0.0
    for key, kind, problem in (
        ("r", "int", "r: must be an integer, not 'four'"),
        ("target_modules", "str-list", "target_modules: must be a string or a list of strings, not 5"),
        ("num_layers", "int", "num_layers: missing"),
    ):
        with pytest.raises(TunelabError, match=f"adapter_config.json: {problem}"):
            config_field(config, tmp_path, key, kind)
