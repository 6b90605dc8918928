"""`tunelab export RUN_OR_MODEL --format gguf`: a trained model as one GGUF file for llama.cpp and
Ollama, with a `Modelfile` and a model card beside it.

The source is anything `tunelab.trained.load_trained` loads: a run folder, its `final/`, a model
folder, a `.gguf` file, or a LoRA adapter folder, which is merged into its base in memory first
(`W + (alpha/r) B A`, `tunelab.methods.lora.merge_and_unload`), so exporting a LoRA run equals
exporting its `tunelab merge` output. Bottleneck adapters and prefixes are not weight deltas: GGUF has
no place for them (merge refuses them too). The model is loaded in float32 on the CPU and each tensor
is converted (`gguf_tensors`), encoded and written in turn, so that at most one converted tensor is in
memory beside the model. The file is written as `NAME.gguf.tmp` and renamed when complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from tunelab.console import progress
from tunelab.errors import TunelabError, one_line
from tunelab.export.gguf_tensors import (
    FILE_TYPES,
    TensorPlan,
    architecture_of,
    encode,
    gguf_values,
    plan_tensors,
    write_hyperparameters,
)
from tunelab.export.gguf_vocab import VocabInfo, tokenization_mismatches, write_tokenizer
from tunelab.export.modelfile import write_modelfile
from tunelab.runinfo import run_data_config
from tunelab.trained import load_trained, resolve_model_dir


@dataclass
class Exported:
    """What `export_gguf` wrote."""

    gguf_file: Path
    modelfile: Path
    card: Path
    tensors: int
    notes: list[str] = field(default_factory=list)


def source_name(source: Path) -> str:
    """A name for the model: the run's folder name (not `final`), else the folder's or file's stem."""
    source = source.resolve()
    if source.name == "final":
        source = source.parent
    return source.stem if source.suffix == ".gguf" else source.name


def output_paths(source: Path, out: str | Path | None, file_type: str) -> tuple[Path, Path]:
    """(folder, file): `--out` ending in `.gguf` names the file; any other `--out` names the folder;
    without one, a run folder gets `RUN/gguf/`, anything else a sibling folder `NAME-gguf/`."""
    name = source_name(source)
    if out is not None and str(out).endswith(".gguf"):
        return Path(out).parent, Path(out)
    if out is not None:
        folder = Path(out)
    elif (source / "final").is_dir() or source.name == "final":
        folder = (source if source.name != "final" else source.parent) / "gguf"
    else:
        folder = source.resolve().parent / f"{name}-gguf"
    return folder, folder / f"{name}-{file_type}.gguf"


def load_for_export(source: str | Path):
    """The source as a plain Hugging Face model in float32 on the CPU (a LoRA adapter merged in):
    (model, tokenizer, method)."""
    from tunelab.methods import lora

    model, tokenizer, method = load_trained(source, dtype="float32", device="cpu")
    if method == "lora":
        model = lora.merge_and_unload(model)
    elif method != "full":
        raise TunelabError(
            f"{resolve_model_dir(source)}: a {method!r} adapter is not a weight delta and GGUF has no place for "
            "it; only full models and LoRA adapters (merged on export) can be exported"
        )
    return model, tokenizer, method


def export_gguf(source: str | Path, out: str | Path | None = None, file_type: str = "f16") -> Exported:
    """Export `source` (see the module docstring) as a GGUF of `file_type` (f32, f16, bf16, q8_0), with
    an Ollama `Modelfile` and a model card (`README.md`) in the same folder."""
    from tunelab.model_card import write_export_card

    if file_type not in FILE_TYPES:
        raise TunelabError(f"--type {file_type!r}: choose one of {sorted(FILE_TYPES)}")
    source = Path(source)
    if not source.exists():
        raise TunelabError(f"{source} does not exist")
    model, tokenizer, method = load_for_export(source)
    folder, path = output_paths(source, out, file_type)
    plans = plan_tensors(model, file_type)
    vocab = write_gguf(model, tokenizer, plans, path, file_type, source_name(source))
    data = run_data_config(resolve_model_dir(source)) if source.is_dir() else None
    template = data.template if data is not None else "auto"
    modelfile = write_modelfile(folder, path.name, tokenizer, vocab.stop_tokens, template)
    card = write_export_card(folder, resolve_model_dir(source), path.name, file_type, method)
    notes = vocab.notes + tokenizer_notes(path, tokenizer)
    fallback = [p.gguf_name for p in plans if p.storage != FILE_TYPES[file_type][1] and len(p.shape) > 1]
    if fallback:
        notes.append(
            f"{len(fallback)} matrices written f16 (rows not whole {file_type} blocks): {fallback[:3]}"
        )
    return Exported(path, modelfile, card, len(plans), notes)


def write_gguf(model, tokenizer, plans: list[TensorPlan], path: Path, file_type: str, name: str) -> VocabInfo:
    """Write the file: metadata (general, the architecture's keys, the tokenizer), the tensor table,
    then each tensor converted and encoded in turn under a progress bar; through `NAME.gguf.tmp`."""
    arch = architecture_of(model.config)
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[file_type][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rows = model.get_input_embeddings().weight.shape[0]
    write_hyperparameters(writer, model.config, rows)
    vocab = write_tokenizer(writer, tokenizer, rows, eos_ids)
    for plan in plans:
        writer.add_tensor_info(
            plan.gguf_name, plan.shape, np.dtype(np.float32), plan.nbytes, raw_dtype=plan.storage
        )
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = progress(len(plans), f"GGUF {file_type}")
        for plan in plans:
            writer.write_tensor_data(encode(gguf_values(model, plan), plan.storage))
            bar.update(1)
        bar.close()
        writer.close()
        tmp.replace(path)
    except OSError as err:
        writer.close()
        raise TunelabError(f"cannot write {path}: {one_line(err)}") from None
    return vocab


def tokenizer_notes(path: Path, tokenizer) -> list[str]:
    """A note when the tokenizer rebuilt from the written file splits text differently
    (`gguf_vocab.tokenization_mismatches`), or when it could not be rebuilt to check."""
    try:
        differ, probes = tokenization_mismatches(path, tokenizer)
    except Exception as err:  # transformers' reader lacks this architecture (Gemma) or this tokenizer kind
        return [
            f"tokenization not checked (transformers cannot rebuild this file's tokenizer: {one_line(err)})"
        ]
    if not differ:
        return []
    return [
        f"the tokenizer rebuilt from the file splits {differ} of {probes} probe texts into other tokens "
        "than the model's tokenizer: runtimes reading the file (llama.cpp, Ollama) will feed the "
        "model token sequences it was not trained on"
    ]
