"""Model cards (tunelab/model_card.py): in every final/, merged and exported folder, parsed as hub
metadata by huggingface_hub itself, with the run's figures and the command that reproduces it."""

from __future__ import annotations

import json

import pytest
import yaml
from huggingface_hub import ModelCard, metadata_load

import tunelab
from tests.helpers import sft_config
from tunelab.model_card import base_metadata, hub_datasets, results_table, write_run_card


@pytest.fixture(scope="module")
def lora_run(llama_dir, instruction_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("card-run") / "run"
    train_file, eval_file = instruction_data
    method = {"name": "lora", "r": 4, "alpha": 8}
    tunelab.train(
        sft_config(llama_dir, train_file, run, "train.max_steps=3", method=method, eval_file=eval_file)
    )
    return run


def hub_card(path):
    """The card as the hub reads it: (ModelCard, metadata dict)."""
    return ModelCard.load(path), metadata_load(path)


def test_final_card_of_a_lora_run(lora_run):
    card, metadata = hub_card(lora_run / "final" / "README.md")
    assert metadata["library_name"] == "peft" and card.data.library_name == "peft"
    assert metadata["tags"] == ["tunelab", "lora", "sft"]
    assert "base_model" not in metadata  # a local base folder is not a hub id
    summary = json.loads((lora_run / "summary.json").read_text())
    for key in ("eval_loss", "final_train_loss", "exact_match"):
        value = summary[key]
        assert f"| {key} | | {value:.4f} |" in card.text or f"| {key} | | {value} |" in card.text
    assert "method: **lora** (r=4, alpha=8" in card.text and "objective: **sft**" in card.text
    assert "tunelab train config.yaml" in card.text
    shown = yaml.safe_load(card.text.split("```yaml\n")[1].split("```")[0])
    assert shown == yaml.safe_load((lora_run / "config.yaml").read_text())


def test_merged_and_exported_folders_have_cards(lora_run, tmp_path):
    from tunelab.export.gguf_out import export_gguf
    from tunelab.merging import merge_adapter

    merged = merge_adapter(lora_run, tmp_path / "merged")
    card, metadata = hub_card(merged / "README.md")
    assert metadata["library_name"] == "transformers" and "merged" in metadata["tags"]
    assert "merged into its base" in card.text and "tunelab train config.yaml" in card.text

    exported = export_gguf(lora_run, tmp_path / "gguf", "q8_0")
    card, metadata = hub_card(exported.card)
    assert metadata["library_name"] == "gguf" and metadata["tags"] == ["tunelab", "lora", "sft", "gguf"]
    assert exported.gguf_file.name in card.text and "(LoRA adapter merged into its base)" in card.text
    assert "ollama create" in card.text


def test_card_metadata_from_the_base_and_the_data(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: Qwen/Qwen2.5-0.5B\n---\n# base\n")
    assert base_metadata(str(base)) == {"base_model": "Qwen/Qwen2.5-0.5B", "license": "apache-2.0"}
    (base / "README.md").unlink()
    (base / "config.json").write_text(json.dumps({"license": "mit"}))
    assert base_metadata(str(base)) == {"license": "mit"}
    assert base_metadata("Qwen/Qwen2.5-0.5B") == {"base_model": "Qwen/Qwen2.5-0.5B"}
    data = {"train": [{"path": "tatsu-lab/alpaca"}, {"path": str(tmp_path / "x.jsonl")}]}
    assert hub_datasets(data) == ["tatsu-lab/alpaca"] and hub_datasets({"train": "openai/gsm8k"}) == [
        "openai/gsm8k"
    ]

    final = tmp_path / "final"
    final.mkdir()
    config = {
        "model": {"name_or_path": "Qwen/Qwen2.5-0.5B"},
        "method": {"name": "full"},
        "objective": {"name": "dpo", "beta": 0.1},
        "data": {"train": "trl-lib/ultrafeedback_binarized", "template": "chat"},
        "train": {"lr": 5e-7, "epochs": 1.0},
        "output_dir": "runs/qwen-dpo",
    }
    summary = {"eval_loss_before": 0.6931, "eval_loss": 0.5, "steps": 10, "final_dir": "runs/qwen-dpo/final"}
    card, metadata = hub_card(write_run_card(final, config, summary))
    assert metadata == {
        "base_model": "Qwen/Qwen2.5-0.5B",
        "library_name": "transformers",
        "tags": ["tunelab", "full", "dpo"],
        "datasets": ["trl-lib/ultrafeedback_binarized"],
    }
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B"
    assert "| eval_loss | 0.6931 | 0.5000 |" in card.text and "| steps | | 10 |" in card.text


def test_results_table_pairs_before_and_after():
    rows = results_table({"accuracy_before": 0.5, "accuracy": 0.75, "steps": 3, "final_dir": "x"})
    assert rows == [
        "| figure | before | after |",
        "|---|---|---|",
        "| accuracy | 0.5000 | 0.7500 |",
        "| steps | | 3 |",
    ]
