"""Model cards: the `README.md` of every `final/`, merged folder and GGUF export folder.

A card is the Hugging Face hub's format: YAML metadata between `---` lines, then Markdown.

    base_model     the base's hub id (a local base contributes its own card's base_model, if any)
    library_name   peft (an adapter folder), transformers (a model folder) or gguf (an export)
    tags           tunelab, the method, the objective (and gguf, merged)
    datasets       the training sources that are hub ids
    license        the base folder's card or config.json says it

The body says what was trained and how: method and its options, objective, data, the key
hyperparameters, held-out figures before and after training (`summary.json`: `NAME_before` and
`NAME`), and the command plus the full `config.yaml` that reproduce the run. Everything comes from
the run folder's own records (`config.yaml`, `summary.json`); a folder that is not a run's gets a
card that says where the model came from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tunelab.errors import TunelabError, one_line
from tunelab.trained import resolve_model_dir

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HYPERPARAMETERS = (
    "max_steps",
    "epochs",
    "batch_size",
    "grad_accum",
    "lr",
    "schedule",
    "warmup_steps",
    "precision",
    "seed",
)
DATA_OPTIONS = ("format", "template", "max_length", "packing", "train_on_prompt")
REFERENCE_OBJECTIVES = ("dpo", "kto", "ppo", "grpo")  # objectives with a reference policy pi_ref


def is_hub_id(name: object) -> bool:
    """`owner/name` that is not a local path."""
    return isinstance(name, str) and bool(HUB_ID.match(name)) and not Path(name).exists()


def front_matter(readme: Path) -> dict:
    """The YAML metadata of a card (`{}` when there is none or it does not parse)."""
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.DOTALL)
    try:
        data = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_metadata(base: str) -> dict:
    """base_model and license for a base model named by hub id or local folder (or .gguf file)."""
    if is_hub_id(base):
        return {"base_model": base}
    folder = resolve_model_dir(
        Path(base).expanduser()
    )  # an earlier run: its final/, whose card names the base
    folder = folder.parent if folder.is_file() else folder
    card = front_matter(folder / "README.md")
    metadata = {key: card[key] for key in ("base_model", "license") if card.get(key)}
    config = folder / "config.json"
    if "license" not in metadata and config.is_file():
        try:
            license_ = json.loads(config.read_text()).get("license")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            license_ = None
        if isinstance(license_, str):
            metadata["license"] = license_
    return metadata


def hub_datasets(data: dict) -> list[str]:
    """The training sources of a `data` section that are hub ids."""
    sources = data.get("train")
    sources = sources if isinstance(sources, list) else [sources]
    names = [s.get("path") if isinstance(s, dict) else s for s in sources]
    return [name for name in names if is_hub_id(name)]


def run_record(model_dir: Path) -> tuple[dict, dict] | None:
    """(config, summary) of the run whose `final/` is `model_dir` (or that `model_dir` is), if it is one."""
    for folder in (model_dir, model_dir.parent):
        config = folder / "config.yaml"
        if config.is_file() and (folder / "final").exists():
            summary = folder / "summary.json"
            loaded = json.loads(summary.read_text()) if summary.is_file() else {}
            return yaml.safe_load(config.read_text()) or {}, loaded
    return None


def _options(section: dict) -> str:
    options = {k: v for k, v in section.items() if k != "name" and v is not None}
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def _figure(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def results_table(summary: dict) -> list[str]:
    """Markdown rows: each held-out figure before and after training, then the other figures."""
    paired = [k for k in summary if f"{k}_before" in summary]
    rows = ["| figure | before | after |", "|---|---|---|"]
    rows += [f"| {k} | {_figure(summary[f'{k}_before'])} | {_figure(summary[k])} |" for k in paired]
    rest = [k for k in summary if k not in paired and not k.endswith("_before") and k != "final_dir"]
    rows += [f"| {k} | | {_figure(summary[k])} |" for k in rest]
    return rows


def training_body(config: dict, summary: dict, started_from: str | None = None) -> list[str]:
    """The body's sections on a run: method, objective, data, hyperparameters, results, reproduction.
    `started_from`: the starting model in words (`tunelab.trained.StartingPoint.describe`)."""
    model, method, objective = config.get("model", {}), config.get("method", {}), config.get("objective", {})
    data, train = config.get("data", {}), config.get("train", {})
    start = started_from or model.get("name_or_path")
    reference = (
        [f"- reference policy: the starting model, `{start}`"]
        if objective.get("name") in REFERENCE_OBJECTIVES
        else []
    )
    lines = [
        f"Fine-tuned from `{start}` with tunelab.",
        "",
        "## Training",
        "",
        f"- method: **{method.get('name')}** ({_options(method)})",
        f"- objective: **{objective.get('name')}** ({_options(objective)})",
        *reference,
        f"- data: `{data.get('train')}`"
        + (f", eval `{data.get('eval')}`" if data.get("eval") else "")
        + " ("
        + ", ".join(f"{k}={data.get(k)}" for k in DATA_OPTIONS if k in data)
        + ")",
        "- hyperparameters: " + ", ".join(f"{k}={train.get(k)}" for k in HYPERPARAMETERS if k in train),
        "",
    ]
    if summary:
        lines += [
            "## Results",
            "",
            "From `summary.json`; held-out figures before training where measured:",
            "",
        ]
        lines += results_table(summary) + [""]
    lines += [
        "## Reproduce",
        "",
        "Save the configuration below as `config.yaml`, then:",
        "",
        "```bash",
        "tunelab train config.yaml",
        "```",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return lines


def write_card(path: Path, metadata: dict, title: str, body: list[str]) -> Path:
    """Write the card to `path`; a failed write (full disk, a vanished folder) is one line."""
    try:
        path.write_text(card_text(metadata, title, body), encoding="utf-8")
    except OSError as err:
        raise TunelabError(f"cannot write the model card {path}: {one_line(err)}") from None
    return path


def card_text(metadata: dict, title: str, body: list[str]) -> str:
    """A card: YAML front matter (keys with no value left out), a title, the body."""
    metadata = {k: v for k, v in metadata.items() if v}
    head = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).rstrip()
    return f"---\n{head}\n---\n\n# {title}\n\n" + "\n".join(body).rstrip() + "\n"


def _metadata(config: dict, library: str, extra_tags: list[str]) -> dict:
    tags = ["tunelab", config.get("method", {}).get("name"), config.get("objective", {}).get("name")]
    return {
        **base_metadata(str(config.get("model", {}).get("name_or_path", ""))),
        "library_name": library,
        "tags": [t for t in dict.fromkeys([*tags, *extra_tags]) if t],
        "datasets": hub_datasets(config.get("data", {})),
    }


def _library(model_dir: Path) -> str:
    return "peft" if (model_dir / "adapter_config.json").is_file() else "transformers"


def write_run_card(final: Path, config: dict, summary: dict, started_from: str | None = None) -> Path:
    """Write `final/README.md` for a finished run (`tunelab.training.setup.write_summary` calls it)."""
    metadata = _metadata(config, _library(final), [])
    name = Path(str(config.get("output_dir", final.parent))).name
    return write_card(final / "README.md", metadata, name, training_body(config, summary, started_from))


def write_merged_card(out_dir: Path, adapter_dir: Path) -> Path:
    """Write `README.md` of a merged model (`tunelab merge`): the adapter's run, merged."""
    record = run_record(adapter_dir)
    note = [f"The LoRA adapter `{adapter_dir}` merged into its base (`tunelab merge`): a plain model.", ""]
    if record:
        config, summary = record
        metadata = _metadata(config, "transformers", ["merged"])
        body = note + training_body(config, summary)
    else:
        base = json.loads((adapter_dir / "adapter_config.json").read_text()).get(
            "base_model_name_or_path", ""
        )
        metadata = {
            **base_metadata(str(base)),
            "library_name": "transformers",
            "tags": ["tunelab", "lora", "merged"],
        }
        body = note
    return write_card(out_dir / "README.md", metadata, out_dir.name, body)


def write_export_card(folder: Path, source: Path, gguf_name: str, file_type: str, method: str) -> Path:
    """Write `README.md` of a GGUF export folder: the file, how to run it, and the run it came from."""
    usage = [
        f"`{gguf_name}`: a GGUF ({file_type}) export of `{source}`"
        + (" (LoRA adapter merged into its base)" if method == "lora" else "")
        + ", written by `tunelab export`.",
        "",
        "```bash",
        "ollama create my-model -f Modelfile   # then: ollama run my-model",
        f"llama-cli -m {gguf_name} -p 'Hello'",
        "```",
        "",
    ]
    record = run_record(source)
    if record:
        config, summary = record
        metadata = _metadata(config, "gguf", ["gguf"])
        body = usage + training_body(config, summary)
    else:
        card = front_matter(source / "README.md") if source.is_dir() else {}
        metadata = {
            "base_model": card.get("base_model"),
            "license": card.get("license"),
            "library_name": "gguf",
            "tags": ["tunelab", "gguf"],
        }
        body = usage
    return write_card(folder / "README.md", metadata, Path(gguf_name).stem, body)
