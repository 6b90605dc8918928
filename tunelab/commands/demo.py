"""`tunelab demo [--config configs/demo.yaml] [key=value ...]`: the offline before/after demo."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tunelab.commands.arguments import add_overrides

HELP = "offline demo: evaluate, fine-tune and re-evaluate a small model on bundled data"
DESCRIPTION = (
    "Evaluates the shipped demo base model (models/demo-base; rebuilt by "
    "scripts/make_demo_model.py if missing) on the held-out split of data/demo, fine-tunes it with "
    "the config, evaluates again and prints a before/after table. Nothing is downloaded. The "
    "config, data and model are found in the repository from any working directory; the run is "
    "written to the config's output_dir (runs/demo) under the working directory."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/demo.yaml", help="run config (method, hyperparameters)")
    add_overrides(parser)


def run(args) -> int:
    import tunelab
    from tunelab.console import note
    from tunelab.data.dataset import prepare_data
    from tunelab.demo import bundled, ensure_demo_model, locate_bundled_inputs
    from tunelab.evaluate import evaluate_loss, exact_match
    from tunelab.models import load_model, load_tokenizer

    config = tunelab.load_config(bundled(args.config), args.overrides)
    ensure_demo_model()
    locate_bundled_inputs(config)
    tokenizer = load_tokenizer(config.model.name_or_path)
    base = load_model(config.model.name_or_path, config.model.dtype, config.model.device)
    data = prepare_data(config.data, tokenizer, seed=config.train.seed)
    note(f"[demo] evaluating the base model on {len(data.eval.examples)} held-out records ...")
    before = evaluate_loss(base, data.eval.examples, tokenizer.pad_token_id, config.eval.batch_size)
    before["exact_match"], _ = exact_match(
        base,
        tokenizer,
        data.eval.conversations,
        data.template,
        config.eval.max_new_tokens,
        config.eval.batch_size,
        config.eval.num_examples,
    )
    del base
    started = time.perf_counter()
    after = tunelab.train(config)
    minutes = (time.perf_counter() - started) / 60
    rows = [
        (
            "exact match (held-out)",
            f"{100 * before['exact_match']:.1f}%",
            f"{100 * after['exact_match']:.1f}%",
        ),
        ("eval loss", f"{before['eval_loss']:.3f}", f"{after['eval_loss']:.3f}"),
        ("eval perplexity", f"{before['eval_perplexity']:.1f}", f"{after['eval_perplexity']:.2f}"),
    ]
    output_dir = Path(config.output_dir).resolve()
    (output_dir / "demo.json").write_text(json.dumps({"before": before, "after": after}, indent=2))
    print(f"\n[demo] method {config.method.name}, {after['steps']} steps in {minutes:.1f} min\n")
    print(f"| {'metric':<24} | {'before':>8} | {'after':>8} |")
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 10}|")
    for name, b, a in rows:
        print(f"| {name:<24} | {b:>8} | {a:>8} |")
    print(f"\n[demo] written to {output_dir}: loss.png, demo.json; model: {after['final_dir']}")
    print(
        f"[demo] try: tunelab generate {config.output_dir} --prompt 'Reverse the order of the words.' --input 'red owl sun'"
    )
    return 0
