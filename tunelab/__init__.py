"""tunelab: fine-tune pre-trained language models.

import tunelab
config = tunelab.load_config("configs/demo.yaml", ["train.max_steps=100"])
summary = tunelab.train(config)
"""

from __future__ import annotations

__version__ = "0.1.0"

from tunelab.config import RunConfig, load_config


def train(config: RunConfig | str) -> dict:
    """Run the config's objective (sft, reward, dpo, ppo, grpo); returns the run summary."""
    from tunelab.allocator import bound_shape_caches, return_freed_memory, threshold_for
    from tunelab.objectives import get_objective

    bound_shape_caches()  # oneDNN keeps no more than 16 primitives per cache as row lengths change
    if not isinstance(config, RunConfig):
        config = load_config(config)
    # Freed activations go back to the system, not to glibc's heap; sooner when all weights train.
    return_freed_memory(threshold_for(config.method.name))
    return get_objective(config.objective.name).run(config)


__all__ = ["RunConfig", "load_config", "train", "__version__"]
