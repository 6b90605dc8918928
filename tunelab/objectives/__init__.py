"""Training objectives: each a readable, top-to-bottom recipe with `Options` and `run(config)`.

Every objective works with every method (tunelab/methods/).
"""

OBJECTIVE_MODULES = {
    "sft": "tunelab.objectives.sft",
    "reward": "tunelab.objectives.reward",
    "dpo": "tunelab.objectives.dpo",
    "kto": "tunelab.objectives.kto",
    "ppo": "tunelab.objectives.ppo",
    "grpo": "tunelab.objectives.grpo",
}


def get_objective(name: str):
    """The module implementing objective `name`."""
    import importlib

    from tunelab.errors import TunelabError

    if name not in OBJECTIVE_MODULES:
        raise TunelabError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVE_MODULES)}")
    return importlib.import_module(OBJECTIVE_MODULES[name])
