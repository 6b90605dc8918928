"""Scalar heads on a causal LM backbone (reward and value), and the saved reward model.

A head is a Linear(H, 1) on the backbone's final hidden states (`output_hidden_states=True`,
`hidden_states[-1]`, after the last norm), so any `AutoModelForCausalLM` and every fine-tuning
method work unchanged (the head is not part of the method: it always trains in full):

    reward   r(x, y) = w^T h_last + b       h_last = hidden state of the last non-padding token
    value    V_t     = w^T h_t + b          at every position (PPO's critic, on the policy itself)

A head is attached to the model as a submodule (`model.reward_head`, `model.value_head`), so the
optimizer, checkpoints and resume see it like any trainable parameter, and detached before the
method saves its artifact.

A reward model is saved, wherever the method allows it, in the format every tool reads: a
Hugging Face `XForSequenceClassification` with one label, whose bias-free `score` Linear(H, 1) is
the reward head (full and partial fine-tuning: a model folder that `AutoModelForSequenceClassification`
loads; LoRA: a PEFT adapter with `task_type: SEQ_CLS` and `score` in `modules_to_save`). Training
pools like that class does: at the last token of each row that is not the padding token (when the
tokenizer pads with EOS, that is the token before a final EOS). Bottleneck adapters and prefixes,
which other tools cannot load anyway, keep the earlier tunelab format:

    reward_head.safetensors   {"weight": (1, H), "bias": (1,)}, float32
    reward_model.json         {"format": "tunelab-reward-model", "hidden_size", "pooling": "last_token",
                               "template", "method", "base_model"}

`reward_model.json` is written in both cases (it records the chat template the model was trained
with). `load_reward_model` reads all of these, and any one-label sequence classifier from the hub
or a folder (PPO, GRPO, `tunelab score`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.errors import TunelabError, one_line
from tunelab.logprobs import final_hidden
from tunelab.models import load_tokenizer, looks_like_local_path
from tunelab.rl.advantages import last_token_index

REWARD_HEAD, VALUE_HEAD = "reward_head", "value_head"
HEAD_FILE, CONFIG_FILE = "reward_head.safetensors", "reward_model.json"
FORMAT = "tunelab-reward-model"
NOT_PAD = "last_non_pad_token"  # pooling of rewards saved since classifiers were adopted; "last_token" before
CLASSIFIER_METHODS = ("full", "partial", "lora")  # saved as XForSequenceClassification (or its adapter)
SCORE = "score"  # the classification head's name in XForSequenceClassification


def hidden_size(model: PreTrainedModel) -> int:
    return model.config.get_text_config().hidden_size


def attach_head(model: PreTrainedModel, name: str, zero_init: bool = False, bias: bool = True) -> nn.Linear:
    """Add a trainable float32 Linear(H, 1) as `model.<name>`; N(0, 1/(H+1)) weights, or zeros; a
    zero bias, or none (a reward head: a constant cancels in r_chosen - r_rejected, and the
    sequence-classification `score` layer it is saved as has none)."""
    if hasattr(model, name):
        raise RuntimeError(f"the model already has a {name}; attach a head once, detach it before saving")
    size = hidden_size(model)
    head = nn.Linear(size, 1, bias=bias).to(device=next(model.parameters()).device, dtype=torch.float32)
    with torch.no_grad():
        if zero_init:
            head.weight.zero_()
        else:
            head.weight.normal_(0.0, 1.0 / (size + 1) ** 0.5)
        if bias:
            head.bias.zero_()
    head.requires_grad_(True)
    model.add_module(name, head)
    return head


def detach_head(model: PreTrainedModel, name: str) -> nn.Linear:
    """Remove `model.<name>` (before the method saves the model) and return it."""
    head = getattr(model, name)
    del model._modules[name]
    return head


def pooling_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None
) -> torch.Tensor:
    """Where a row may be pooled: its attended tokens, less the padding token's id when given (as
    `XForSequenceClassification` pools), unless that leaves a row nothing: (B, T) -> (B, T) bool."""
    mask = attention_mask.bool()
    if pad_token_id is None:
        return mask
    not_pad = mask & (input_ids != pad_token_id)
    return torch.where(not_pad.any(dim=1, keepdim=True), not_pad, mask)


def pooled_rewards(head: nn.Linear, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The head on the last set position of `mask` in each row: hidden (B, T, H), mask (B, T) -> (B,)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, last_token_index(mask)]  # (B, H)
    return head(last.to(head.weight.dtype)).squeeze(-1)


def token_values(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """The head at every position: hidden (B, T, H) -> (B, T)."""
    return head(hidden.to(head.weight.dtype)).squeeze(-1)


def sequence_rewards(
    model: PreTrainedModel,
    head: nn.Linear,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """r(x, y) for each padded row (any padding side), pooled as `pooling_mask` says: (B, T) -> (B,)."""
    hidden = final_hidden(model, input_ids, attention_mask)  # (B, T, H)
    return pooled_rewards(head, hidden, pooling_mask(input_ids, attention_mask, pad_token_id))


def save_reward_head(final_dir: Path, head: nn.Linear, template: str, method: str, base_model: str) -> None:
    """Write the head and its JSON description into the run's `final/` folder."""
    tensors = {"weight": head.weight.detach().float().cpu().contiguous()}
    if head.bias is not None:
        tensors["bias"] = head.bias.detach().float().cpu()
    save_file(tensors, str(final_dir / HEAD_FILE), metadata={"format": "pt"})
    write_reward_info(final_dir, head.in_features, template, method, base_model, pooling=NOT_PAD)


def write_reward_info(final_dir: Path, size: int, template: str, method: str, base_model: str, pooling: str):
    """`reward_model.json`: what tunelab needs beside the weights (the template above all)."""
    config = {
        "format": FORMAT,
        "hidden_size": size,
        "pooling": pooling,
        "template": template,
        "method": method,
        "base_model": base_model,
    }
    (final_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def as_classifier(model: PreTrainedModel, head: nn.Linear, pad_token_id: int | None) -> PreTrainedModel:
    """`model`'s architecture as `XForSequenceClassification` with one label: the same backbone
    module (shared, not copied) and `head` as its bias-free `score`. What a reward run saves."""
    from transformers import AutoModelForSequenceClassification

    if head.bias is not None:
        raise TunelabError("a reward head saved as a sequence classifier must have no bias")
    config = copy.deepcopy(model.config)
    config.num_labels, config.pad_token_id = 1, pad_token_id
    with torch.device("meta"):
        classifier = AutoModelForSequenceClassification.from_config(config)
    prefix = classifier.base_model_prefix
    setattr(classifier, prefix, getattr(model, prefix))
    score = nn.Linear(head.in_features, 1, bias=False).to(device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        score.weight.copy_(head.weight)
    setattr(classifier, SCORE, score)
    classifier.config.architectures = [type(classifier).__name__]
    return classifier


def add_score_to_adapter(adapter_dir: Path, head: nn.Linear) -> None:
    """Make a LoRA adapter saved from a classifier view PEFT's SEQ_CLS adapter: the score layer's
    trained weight among its tensors and `score` in `modules_to_save` (PEFT's own layout)."""
    from tunelab.methods.adapter_files import CONFIG_FILE as ADAPTER_CONFIG
    from tunelab.methods.adapter_files import WEIGHTS_FILE, read_adapter_config, read_adapter_weights

    config = read_adapter_config(adapter_dir)
    tensors = read_adapter_weights(adapter_dir)
    tensors[f"base_model.model.{SCORE}.weight"] = head.weight.detach().float().cpu().contiguous()
    config["modules_to_save"] = sorted({*(config.get("modules_to_save") or []), SCORE})
    config["task_type"] = "SEQ_CLS"
    save_file(tensors, str(adapter_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@dataclass
class RewardModel:
    """A loaded reward model: a one-label sequence classifier (`head` None), or a backbone with a
    tunelab head; its tokenizer, and the template it was trained with (None: not known)."""

    model: PreTrainedModel
    head: nn.Linear | None
    tokenizer: PreTrainedTokenizerBase
    template: str | None
    path: Path | str
    pad_token_id: int | None = None
    """Pooling of a tunelab head: skip this token id at the end of rows (None: the last attended token)."""

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """r(x, y) of each padded row: (B, T) -> (B,) float32."""
        device = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if self.head is None:  # the classifier pools itself, at the last non-padding token
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
        return sequence_rewards(self.model, self.head, input_ids, attention_mask, self.pad_token_id).float()


def _read_info(folder: Path) -> dict:
    """`reward_model.json` of a tunelab reward model, or {} where there is none."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return {}
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
        raise TunelabError(f"{path}: unknown reward-model format {info.get('format')!r}")
    return info


def _is_classifier_folder(folder: Path) -> bool:
    config_path = folder / "config.json"
    if not config_path.is_file():
        return False
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


def load_classifier(
    source: str | Path, dtype: str = "float32", device: str | torch.device = "auto"
) -> PreTrainedModel:
    """A one-label `XForSequenceClassification`: a hub id or model folder, or a tunelab/PEFT SEQ_CLS
    LoRA adapter (its base, itself possibly an earlier run, loaded as a causal LM and viewed as a
    classifier). Anything with another number of labels is a `TunelabError`."""
    from transformers import AutoModelForSequenceClassification

    from tunelab.methods import get_method
    from tunelab.methods.adapter_files import is_adapter_folder
    from tunelab.models import DTYPES, resolve_device
    from tunelab.trained import adapter_base, adapter_method_of, load_start

    folder = Path(source)
    if folder.is_dir() and is_adapter_folder(folder):
        causal, _ = load_start(adapter_base(folder), dtype=dtype, device=device)
        # The padding id comes with the tokenizer (`load_reward_model` sets it).
        model = as_classifier(causal, nn.Linear(hidden_size(causal), 1, bias=False), pad_token_id=None)
        get_method(adapter_method_of(folder)).load(model, folder, trainable=False)
    else:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(source), dtype=DTYPES[dtype], trust_remote_code=False
            )
        except (OSError, ValueError) as err:
            raise TunelabError(
                f"cannot load a sequence classifier from {str(source)!r}: {one_line(err)}"
            ) from None
        model = model.to(resolve_device(device) if isinstance(device, str) else device)
    if model.config.num_labels != 1:
        raise TunelabError(
            f"reward model {source}: a sequence classifier with {model.config.num_labels} labels; a reward "
            "model gives one score (num_labels 1)"
        )
    return model.eval().requires_grad_(False)


def load_reward_model(
    path: str | Path, dtype: str = "float32", device: str | torch.device = "auto"
) -> RewardModel:
    """Load a reward model: a tunelab reward run (folder or `final/`, in either format of the module
    docstring), or any one-label sequence classifier (hub id or folder)."""
    from tunelab.trained import resolve_model_dir, tokenizer_source

    folder = resolve_model_dir(path)
    local = folder.exists()
    if not local and looks_like_local_path(str(path)):
        raise TunelabError(f"reward model {str(path)!r} does not exist; train one with `objective: reward`")
    info = _read_info(folder) if local else {}
    if local and (folder / HEAD_FILE).is_file():
        if not info:
            raise TunelabError(f"{folder}: a reward head without {CONFIG_FILE}")
        return _load_with_head(folder, info, dtype, device)
    if local and not (_is_classifier_folder(folder) or (folder / "adapter_config.json").is_file()):
        raise TunelabError(
            f"{path} is not a reward model: neither a tunelab reward run nor a sequence classifier "
            "(config.json with an XForSequenceClassification architecture); train one with objective reward"
        )
    source = str(folder) if local else str(path)
    model = load_classifier(source, dtype, device)
    tokenizer = load_tokenizer(tokenizer_source(source) if local else source)
    if model.config.pad_token_id is None:  # the classifier finds each row's end by the padding token
        model.config.pad_token_id = tokenizer.pad_token_id
    return RewardModel(model, None, tokenizer, info.get("template"), source)


def _load_with_head(folder: Path, info: dict, dtype: str, device) -> RewardModel:
    """A reward model in the head-beside-the-model format."""
    from tunelab.trained import load_trained

    model, tokenizer, _ = load_trained(folder, dtype=dtype, device=device)
    if hidden_size(model) != info["hidden_size"]:
        raise TunelabError(
            f"{folder}: the head expects hidden size {info['hidden_size']}, the backbone has {hidden_size(model)}"
        )
    tensors = load_file(str(folder / HEAD_FILE))
    head = nn.Linear(info["hidden_size"], 1, bias="bias" in tensors)
    head.load_state_dict(tensors)
    head = head.to(device=next(model.parameters()).device).eval().requires_grad_(False)
    model.eval().requires_grad_(False)
    pad = tokenizer.pad_token_id if info.get("pooling") == NOT_PAD else None
    return RewardModel(model, head, tokenizer, info["template"], folder, pad)
