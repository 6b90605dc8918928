"""Setting up a run: seeds, output folder, model + tokenizer, the method, precision.

Every objective starts with `setup_run(config)`; what it returns is everything a loop needs.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.allocator import bound_shape_caches
from tunelab.config import RunConfig
from tunelab.console import note
from tunelab.errors import TunelabError
from tunelab.file_modes import match_umask
from tunelab.methods import get_method, parameter_report, trainable_parameters
from tunelab.model_card import write_run_card
from tunelab.models import resolve_device
from tunelab.trained import StartingPoint, adapter_base, resolve_model_dir, start_model, start_tokenizer
from tunelab.training import distributed, sharded_load
from tunelab.training.checkpoint import written
from tunelab.training.distributed import Parallel
from tunelab.training.saved_tensors import lean_autocast


@dataclass
class Run:
    """A set-up run: what every training loop needs."""

    config: RunConfig
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    method: ModuleType
    device: torch.device
    output_dir: Path
    config_yaml: str
    is_main: bool = True
    """Only the main process prints, logs and writes files (distributed runs)."""
    dist: Parallel = field(default_factory=Parallel)
    """This process's place in a torchrun launch and the collectives a loop needs (one process:
    identities); see `tunelab.training.distributed`."""
    scaler: torch.amp.GradScaler | None = None
    """Dynamic loss scaling for `train.precision: fp16` (float16 gradients underflow without it);
    None for fp32 and bf16."""
    start: StartingPoint | None = None
    """Where the model started: a base model, or an earlier run (`tunelab.trained`)."""

    def autocast(self):
        """The forward-pass precision context (bf16/fp16 autocast, or nothing for fp32). Uncompiled,
        the pass saves nothing that backward can rebuild exactly (`lean_autocast`): no bf16 copy,
        and with the fused kernels no norm or SwiGLU output (float32 too)."""
        precision, compiled = self.config.train.precision, self.config.train.compile
        if precision == "fp32":
            fused = self.config.train.fused_kernels is True and not compiled
            return lean_autocast(self.device.type, None) if fused else contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        if compiled:
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        return lean_autocast(self.device.type, dtype)

    @property
    def global_batch(self) -> int:
        """Examples (pairs, prompts) of one micro-batch over all processes: `train.batch_size x
        processes`; each process takes its rows (tunelab/training/distributed.py)."""
        return self.config.train.batch_size * self.dist.world_size

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, through the loss scaler under fp16: the loss is multiplied by the
        current scale S, so that small float16 gradients do not flush to zero; the optimizer step
        divides by S again (`tunelab.training.loop.apply_gradients`)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def print(self, text: str) -> None:
        """A progress note on the main process (`tunelab.console.note`)."""
        if self.is_main:
            note(text)


def seed_everything(seed: int) -> None:
    """Seed Python and torch (CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)


def prepare_model(
    config: RunConfig,
    device: torch.device | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    skeleton: torch.nn.Module | None = None,
):
    """Load model (+ tokenizer, unless given) and apply the method: (model, tokenizer, method module,
    starting point). The model may be an earlier run (`tunelab.trained.start_model`), or a
    `skeleton` whose weights each FSDP rank reads later (`tunelab.training.sharded_load`)."""
    device = device or resolve_device(config.model.device)
    bound_shape_caches()  # oneDNN's per-shape caches, read at the first matmul (tunelab.allocator)
    tokenizer = tokenizer or start_tokenizer(config)
    model, start = start_model(config, device, skeleton)
    method = get_method(config.method.name)
    if config.train.precision != "fp32":
        # Master weights: trainable parameters in float32, the frozen base stays in model.dtype.
        for p in trainable_parameters(model).values():
            if p.dtype != torch.float32:
                p.data = sharded_load.cast(p.data, torch.float32)  # a skeleton's placeholder stays one
    if config.model.gradient_checkpointing:
        # Every `checkpoint_every`-th decoder layer (transformers numbers its GradientCheckpointingLayers).
        model.activation_checkpointing_enable(
            {"use_reentrant": False}, every_n_layers=config.model.checkpoint_every
        )
        model.config.use_cache = False
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if config.train.fused_kernels:
        use_fused_kernels(model)
    if config.train.compile:
        compile_blocks(model)
    if not trainable_parameters(model):
        raise TunelabError(f"method {config.method.name!r} left no trainable parameter")
    return model, tokenizer, method, start


def use_fused_kernels(model: PreTrainedModel) -> None:
    """`train.fused_kernels`: the C++ RMSNorm and SwiGLU (`tunelab.kernels.cpu_fused`) for the model's
    Llama-family norms and MLPs, and the cross-entropy rows for its linear LM head; one line says what
    was fused, and which modules were not."""
    from tunelab.kernels import cpu_fused

    if not cpu_fused.build():
        return  # the builder printed why
    counts = cpu_fused.apply_fused_kernels(model)
    fused = []
    if counts["norm"] or counts["mlp"]:
        fused.append(f"{counts['norm']} RMSNorm, {counts['mlp']} SwiGLU MLP modules")
    else:
        fused.append(f"none of {type(model).__name__}'s norms or MLPs (not Llama-style)")
    if counts["loss"]:
        fused.append("the LM head's cross-entropy")
    note(f"[tunelab] fused kernels: {', '.join(fused)} (C++, CPU)")


def compile_blocks(model: PreTrainedModel) -> None:
    """`torch.compile` every decoder block, with dynamic shapes (`train.compile`). Fuses norms, rotary
    embeddings, activations and the adapters' small ops; the embedding, the chunked loss and packed
    attention (`tunelab.kernels.packed_attention`, excluded from compilation) stay eager. Compiling per block
    keeps one graph for all blocks and survives changing sequence lengths without recompiling."""
    from tunelab.methods.inject import decoder_layers

    _, layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)


def setup_run(config: RunConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> Run:
    """Seed, create the output folder, load and transform the model (with `tokenizer`, which the
    recipes load first to read and check their data before the model loads: a bad record fails in
    seconds, not after a large model's load). Under torchrun, join the process group first; the
    recipe makes the model data-parallel (`run.dist.wrap`) once it is complete (heads attached,
    reference copy made)."""
    parallel = distributed.init(config)
    is_main = parallel.is_main
    seed_everything(config.train.seed)
    output_dir = Path(config.output_dir)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = yaml.safe_dump(config.to_dict(), sort_keys=False)  # written by StepLoop, see there
    # Under FSDP: a skeleton, filled shard by shard when `run.dist.wrap` shards it (or a whole load).
    parallel.sharded_start, skeleton, loading = sharded_load.plan(config, parallel)
    model, tokenizer, method, start = prepare_model(config, parallel.device, tokenizer, skeleton)
    device = next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type) if config.train.precision == "fp16" else None
    run = Run(
        config, model, tokenizer, method, device, output_dir, config_yaml, is_main, parallel, scaler, start
    )
    run.print(f"[tunelab] model {start.describe()} ({type(model).__name__}) on {run.device}")
    run.print(f"[tunelab] method {config.method.name}: {parameter_report(model)}")
    if loading:
        run.print(loading)
    for line in config.default_notes:  # what the `auto` defaults became, and their fallbacks
        run.print(line)
    return run


def gathered_model(run: Run) -> PreTrainedModel | None:
    """All ranks of a sharded (FSDP) run: gather the trained parameters; rank 0 gets a plain CPU copy
    of the trained model (base model reloaded + method applied + trained tensors), the others None.

    Only trainable parameters are gathered: everything else is the base model, as in a checkpoint.
    Trainable modules the method did not create (a reward head an objective attached) are not in
    the copy: save those with `run.dist.full_state_dict`."""
    weights = distributed.gather_trainable(run.model, run.is_main)
    if not run.is_main:
        return None
    model, _, _, _ = prepare_model(run.config, torch.device("cpu"))
    with torch.no_grad():
        for name, p in trainable_parameters(model).items():
            p.copy_(weights[name])
    return model


def saved_base(run: Run) -> str:
    """The base an adapter of this run names: what it started from, or, for an earlier adapter that
    trained further, that adapter's own base (the adapter is the same one, continued)."""
    name = run.config.model.name_or_path
    if run.start is not None and run.start.continued:
        return adapter_base(resolve_model_dir(name))
    return name


def save_final(run: Run, view: Callable[[PreTrainedModel], PreTrainedModel] | None = None) -> Path:
    """Write `OUTPUT_DIR/final/`: the method's artifact plus the tokenizer, through `final.tmp/` so
    that an earlier `final/` stays whole until the new one is. Every rank calls it (FSDP gathers the
    trained parameters); rank 0 writes. `view(model)` is saved in place of the model when given
    (a reward run saves its model as a sequence classifier)."""
    final = run.output_dir / "final"
    model = gathered_model(run) if run.dist.sharded else run.model
    if not run.is_main:
        return final
    if view is not None:
        model = view(model)
    tmp, old = run.output_dir / "final.tmp", run.output_dir / "final.old"
    with written(tmp, f"the final model {final}", "the checkpoints and any earlier final/ are intact"):
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        run.method.save(model, run.config.method.options, tmp, saved_base(run))
        run.tokenizer.save_pretrained(tmp)
        match_umask(tmp)  # safetensors writes 0600 files
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)  # an earlier final/ stays whole until the new one has its name
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def report_data(run: Run, train: int, eval_: int, unit: str, details: str, notes: list[str]) -> None:
    """Print (rank 0) what the run reads: `train` / `eval_` records of `unit`, `details` (format,
    template) and the data notes (truncations, skipped records)."""
    run.print(f"[tunelab] data: {train} train / {eval_} eval {unit}, {details}")
    for line in notes:
        run.print(f"[tunelab] data: {line}")


def write_summary(run: Run, summary: dict, final: Path) -> dict:
    """Rank 0: add `final_dir` to `summary`, write `OUTPUT_DIR/summary.json` and print the summary on
    one line. Returns it. Recipes save `final/` before their last evaluation, so that an evaluation
    that fails never costs the trained model."""
    summary = {**summary, "final_dir": str(final)}
    if run.is_main:
        (run.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        started_from = run.start.describe() if run.start is not None else None
        write_run_card(final, run.config.to_dict(), summary, started_from)  # final/README.md
        run.print(
            "[tunelab] "
            + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
        )
    return summary


def before_and_after(before: dict, after: dict) -> dict:
    """Held-out figures before training (as `NAME_before`) and after it (as `NAME`)."""
    return {**{f"{key}_before": value for key, value in before.items()}, **after}
