"""Scalar heads on a causal LM backbone (reward and value), and the saved reward model.

A head is a Linear(H, 1) on the backbone's final hidden states (`output_hidden_states=True`,
`hidden_states[-1]`, after the last norm), so any `AutoModelForCausalLM` and every fine-tuning
method work unchanged (the head is not part of the method: it always trains in full):

    reward   r(x, y) = w^T h_last + b       h_last = hidden state of the last non-padding token
    value    V_t     = w^T h_t + b          at every position (PPO's critic, on the policy itself)

A head is attached to the model as a submodule (`model.reward_head`, `model.value_head`), so the
optimizer, checkpoints and resume see it like any trainable parameter, and detached before the
method saves its artifact.

The reward model's `final/` folder is the method's usual artifact (a Hugging Face model folder, or
an adapter folder naming its base model) with the tokenizer, plus

    reward_head.safetensors   {"weight": (1, H), "bias": (1,)}, float32
    reward_model.json         {"format": "tunelab-reward-model", "hidden_size", "pooling": "last_token",
                               "template", "method", "base_model"}

`load_reward_model` loads it back through `tunelab.methods.load_trained` (PPO, `tunelab score`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.errors import TunelabError
from tunelab.logprobs import final_hidden
from tunelab.rl.advantages import last_token_index

REWARD_HEAD, VALUE_HEAD = "reward_head", "value_head"
HEAD_FILE, CONFIG_FILE = "reward_head.safetensors", "reward_model.json"
FORMAT = "tunelab-reward-model"


def hidden_size(model: PreTrainedModel) -> int:
    return model.config.get_text_config().hidden_size


def attach_head(model: PreTrainedModel, name: str, zero_init: bool = False) -> nn.Linear:
    """Add a trainable float32 Linear(H, 1) as `model.<name>`; N(0, 1/(H+1)) weights, or zeros."""
    if hasattr(model, name):
        raise RuntimeError(f"the model already has a {name}; attach a head once, detach it before saving")
    size = hidden_size(model)
    head = nn.Linear(size, 1).to(device=next(model.parameters()).device, dtype=torch.float32)
    with torch.no_grad():
        if zero_init:
            head.weight.zero_()
        else:
            head.weight.normal_(0.0, 1.0 / (size + 1) ** 0.5)
        head.bias.zero_()
    head.requires_grad_(True)
    model.add_module(name, head)
    return head


def detach_head(model: PreTrainedModel, name: str) -> nn.Linear:
    """Remove `model.<name>` (before the method saves the model) and return it."""
    head = getattr(model, name)
    del model._modules[name]
    return head


def pooled_rewards(head: nn.Linear, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head on the last non-padding token of each row: hidden (B, T, H), mask (B, T) -> (B,)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, last_token_index(attention_mask)]  # (B, H)
    return head(last.to(head.weight.dtype)).squeeze(-1)


def token_values(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """The head at every position: hidden (B, T, H) -> (B, T)."""
    return head(hidden.to(head.weight.dtype)).squeeze(-1)


def sequence_rewards(
    model: PreTrainedModel, head: nn.Linear, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """r(x, y) for each padded row (any padding side): (B, T) -> (B,)."""
    return pooled_rewards(head, final_hidden(model, input_ids, attention_mask), attention_mask)


def save_reward_head(final_dir: Path, head: nn.Linear, template: str, method: str, base_model: str) -> None:
    """Write the head and its JSON description into the run's `final/` folder."""
    tensors = {
        "weight": head.weight.detach().float().cpu().contiguous(),
        "bias": head.bias.detach().float().cpu(),
    }
    save_file(tensors, str(final_dir / HEAD_FILE), metadata={"format": "pt"})
    config = {
        "format": FORMAT,
        "hidden_size": head.in_features,
        "pooling": "last_token",
        "template": template,
        "method": method,
        "base_model": base_model,
    }
    (final_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


@dataclass
class RewardModel:
    """A loaded reward model: backbone, head, tokenizer and the template it was trained with."""

    model: PreTrainedModel
    head: nn.Linear
    tokenizer: PreTrainedTokenizerBase
    template: str
    path: Path

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """r(x, y) of each padded row: (B, T) -> (B,) float32."""
        device = self.head.weight.device
        return sequence_rewards(
            self.model, self.head, input_ids.to(device), attention_mask.to(device)
        ).float()


def load_reward_model(
    path: str | Path, dtype: str = "float32", device: str | torch.device = "auto"
) -> RewardModel:
    """Load a reward model saved by the `reward` objective (a run folder or its `final/`)."""
    from tunelab.trained import load_trained, resolve_model_dir

    folder = resolve_model_dir(path)
    if not folder.exists():
        raise TunelabError(f"reward model {str(path)!r} does not exist; train one with `objective: reward`")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise TunelabError(
            f"{path} is not a tunelab reward model (no {CONFIG_FILE}); train one with objective reward"
        )
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT:
        raise TunelabError(f"{config_path}: unknown reward-model format {config.get('format')!r}")
    model, tokenizer, _ = load_trained(folder, dtype=dtype, device=device)
    if hidden_size(model) != config["hidden_size"]:
        raise TunelabError(
            f"{folder}: the head expects hidden size {config['hidden_size']}, the backbone has {hidden_size(model)}"
        )
    tensors = load_file(str(folder / HEAD_FILE))
    head = nn.Linear(config["hidden_size"], 1)
    head.load_state_dict({"weight": tensors["weight"], "bias": tensors["bias"]})
    head = head.to(device=next(model.parameters()).device).eval().requires_grad_(False)
    model.eval().requires_grad_(False)
    return RewardModel(model, head, tokenizer, config["template"], folder)
