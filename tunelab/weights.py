"""Copying saved tensors into a model's live tensors, strictly.

Adapters (`tunelab.methods`) and training checkpoints (`tunelab.training.checkpoint`) both load a
file of name -> tensor into the tensors of a model that was built to receive it. The load is strict:
with T the live tensors and S the saved ones,

    names(S) == names(T)   and   shape(S[n]) == shape(T[n]) for every name n,

checked for every name before anything is copied, so a file that does not fit leaves the model as
it was and the error names the file and every kind of disagreement (missing, unexpected, shape).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from tunelab.errors import TunelabError

SHOWN = 5  # names listed per kind of disagreement


def _listed(names: list[str]) -> str:
    more = f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return f"{names[:SHOWN]}{more}"


def mismatches(targets: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """How `tensors` fails to fit `targets`: one phrase per kind (missing, unexpected, shapes); empty
    when every name is on both sides with the same shape."""
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    shapes = [
        f"{name} saved {tuple(tensors[name].shape)}, model {tuple(target.shape)}"
        for name, target in targets.items()
        if name in tensors and tuple(tensors[name].shape) != tuple(target.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listed(unexpected)}")
    if shapes:
        problems.append(f"shapes differ: {'; '.join(shapes[:SHOWN])}{' ...' if len(shapes) > SHOWN else ''}")
    return problems


def load_into(
    targets: Mapping[str, torch.Tensor],
    tensors: Mapping[str, torch.Tensor],
    source: str,
    hint: str = "",
    place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Copy `tensors[name]` into `targets[name]` for every name, in place and without gradients.

    `source` names the file in the error (`TunelabError`: the user chose a file that does not fit),
    `hint` ends it. `place(saved, target)` prepares a saved tensor for its target (e.g. cuts this
    rank's shard of it); by default the copy converts device and dtype itself.
    """
    problems = mismatches(targets, tensors)
    if problems:
        raise TunelabError(
            f"{source} does not fit the model: {', '.join(problems)}" + (f"; {hint}" if hint else "")
        )
    with torch.no_grad():
        for name, target in targets.items():
            saved = tensors[name]
            target.copy_(place(saved, target) if place is not None else saved)
