"""Every method under both strategies: 2 ranks x batch 4 take the steps of 1 process x batch 8 and
save the same `final/` artifact (one launch of 8 runs, about 15 s on 2 idle cores)."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

import tunelab
from tests.distributed.launch import assert_close_weights, launch, metric, write_config
from tests.helpers import sft_config

# Every method under 2 ranks (~30 s of launches): `make test-slow`. `make test` keeps DDP and FSDP
# on full and LoRA (test_distributed_training.py) and the sharded-loading checks (test_sharded.py),
# within its 10-minute budget.
pytestmark = pytest.mark.slow

METHODS = {
    "partial": {"name": "partial", "last_layers": 1, "modules": ["lm_head"]},
    "adapter": {"name": "adapter", "placement": "houlsby"},
    "prefix": {"name": "prefix"},
    "lora": {"name": "lora", "r": 4, "target_modules": "all-linear", "modules_to_save": ["lm_head"]},
}
COMMON = ["train.max_steps=4", "train.lr=3e-3"]


@pytest.fixture(scope="module")
def method_runs(tiny_model_dirs, instruction_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed-methods")
    model_dir, train_file = tiny_model_dirs["llama"], instruction_data[0]
    plan = []
    for name, method in METHODS.items():
        tunelab.train(sft_config(model_dir, train_file, root / f"single_{name}", *COMMON, method=method))
        for strategy in ("ddp", "fsdp"):
            overrides = [*COMMON, "train.batch_size=4", f"train.strategy={strategy}"]
            config = sft_config(model_dir, train_file, root / f"{strategy}_{name}", *overrides, method=method)
            plan.append({"config": write_config(config, root / f"{strategy}_{name}.yaml")})
    launch(plan, root)
    return root


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", list(METHODS))
def test_method_under_two_ranks_equals_one_process(method_runs, name, strategy):
    single, multi = method_runs / f"single_{name}", method_runs / f"{strategy}_{name}"
    assert metric(multi, "loss") == pytest.approx(metric(single, "loss"), rel=1e-5)
    files = sorted(p.name for p in (single / "final").iterdir())
    assert sorted(p.name for p in (multi / "final").iterdir()) == files
    weights = next(f for f in files if f.endswith(".safetensors"))
    assert_close_weights(load_file(multi / "final" / weights), load_file(single / "final" / weights))
