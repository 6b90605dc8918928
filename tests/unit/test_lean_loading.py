"""Lean loading (`tunelab.models.load_model`): no whole float32 copy held beside a cast one.

Peak memory is measured in a subprocess: its peak RSS (VmHWM) is reset after the imports
(`/proc/self/clear_refs` 5), so peak - baseline is what loading alone took. With W the weights in
the requested dtype and t the largest tensor stored in the checkpoint:

    bf16 checkpoint -> bf16:   peak <= 1.2 W   (transformers maps the file; nothing is copied)
    fp32 checkpoint -> bf16:   peak <= W + 3 t  (cast tensor by tensor; before: the whole float32
                                                 file resident plus the cast copy, 3 W = W + 8 t)

The cast itself needs W + 1.5 t (one float32 tensor and its bf16 copy); the rest of the allowance is
glibc's: it keeps freed blocks of a few MB on its heap rather than unmapping them, so the peak RSS
runs 1.3-2.0 t above W from run to run (a clean-clone CI run once saw 2.01 t).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GenerationConfig

from tunelab.models import load_model
from tunelab.tiny import tiny_config

MEASURE = """
import json, sys
from transformers import AutoConfig, AutoModelForCausalLM
from tunelab.models import load_model

folder, dtype = sys.argv[1], sys.argv[2]
AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(folder))]  # import its code first


def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))


open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
baseline = status("VmRSS")
model = load_model(folder, dtype=dtype, device="cpu")
peak = status("VmHWM") - baseline
unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.state_dict().values()}
print(json.dumps({"peak": peak * 1024, "weights": sum(unique.values())}))
"""


def write_checkpoint(folder: Path, dtype: torch.dtype, tensors: dict, config) -> None:
    folder.mkdir()
    config.save_pretrained(folder)
    save_file({name: t.to(dtype) for name, t in tensors.items()}, folder / "model.safetensors")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A ~34M-parameter Llama saved in float32 (134 MB) and in bfloat16 (67 MB); largest tensor
    8192 x 512. Big enough that a float32 copy shows against the import noise (a few MB)."""
    root = tmp_path_factory.mktemp("lean")
    config = tiny_config(
        "llama", vocab_size=8192, hidden=512, layers=6, heads=8, kv_heads=8, intermediate=2048
    )
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(shape, generator=generator) * 0.02 for n, shape in shapes.items()}
    write_checkpoint(root / "fp32", torch.float32, tensors, config)
    write_checkpoint(root / "bf16", torch.bfloat16, tensors, config)
    return {"fp32": root / "fp32", "bf16": root / "bf16", "largest": max(t.numel() for t in tensors.values())}


def measure(folder: Path, dtype: str) -> dict:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset the peak RSS")
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder), dtype], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bf16_checkpoint_loads_as_bf16_within_1_2x_its_weights(checkpoints):
    result = measure(checkpoints["bf16"], "bfloat16")
    assert result["peak"] <= 1.2 * result["weights"], result


def test_fp32_checkpoint_loads_as_bf16_one_tensor_at_a_time(checkpoints):
    result = measure(checkpoints["fp32"], "bfloat16")
    largest_fp32 = 4 * checkpoints["largest"]
    assert result["peak"] <= result["weights"] + 3 * largest_fp32, result


def test_cast_load_gives_what_from_pretrained_gives(checkpoints, tmp_path):
    """The tensor-by-tensor cast is the same model as transformers' own load: same names, same
    values, same dtypes, same generation config and name_or_path; a sharded checkpoint too."""
    folder = checkpoints["fp32"]
    GenerationConfig(eos_token_id=2, max_new_tokens=7).save_pretrained(folder)
    ours = load_model(str(folder), dtype="bfloat16", device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert type(ours) is type(theirs)
    assert ours.generation_config.max_new_tokens == 7
    assert ours.name_or_path == ours.config.name_or_path == theirs.name_or_path == str(folder)
    expected = theirs.state_dict()
    assert list(ours.state_dict()) == list(expected)
    for name, tensor in ours.state_dict().items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected[name]), name
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20MB")
    sharded = tmp_path / "sharded"
    assert (sharded / "model.safetensors.index.json").exists()
    as_float = load_model(str(sharded), dtype="float32", device="cpu")
    for name, tensor in as_float.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name].float()), name
