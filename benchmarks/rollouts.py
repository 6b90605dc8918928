"""Rollout generation speed: tunelab's PPO/GRPO sampler against TRL's GRPO generation, same model.

Both sample B prompts x G completions in one batched call with the KV cache:

- tunelab: `tunelab.rl.rollouts.generate_rollouts` with keyed sampling (what `ppo` and `grpo` run:
  one uniform number per token from a hash of (seed, step, row, position));
- TRL 1.16's GRPOTrainer without vLLM: `model.generate` with the `GenerationConfig` its trainer
  builds (do_sample, temperature 1, top_p 1, top_k 0, min_p None, repetition_penalty 1,
  `disable_compile=True`), on the prompts repeated G times, as its sampler lays them out.

Generated tokens (up to and including each row's first EOS) per second of wall time, each side
timed in alternation (`--repeats` rounds, median), on the benchmark workload's model (random
weights rarely stop early, so both generate about `--max-new-tokens` per row).

    python benchmarks/rollouts.py [--shape small] [--prompts 8] [--generations 8] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.workload import alpaca_prompt, build


def trl_generation_config(tokenizer, max_new_tokens: int):
    """The GenerationConfig TRL 1.16's GRPOTrainer builds with its defaults (no vLLM)."""
    from transformers import GenerationConfig
    from trl import GRPOConfig

    args = GRPOConfig(
        output_dir="/tmp/unused", max_completion_length=max_new_tokens, report_to=[], use_cpu=True, bf16=False
    )
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id],
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        cache_implementation=args.cache_implementation,
        disable_compile=True,
    )


def trl_tokens(model, tokenizer, prompts: list[str], config) -> int:
    """Generate as TRL's GRPO does; the count of completion tokens up to the first EOS."""
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=config)
    completions = out[:, inputs["input_ids"].shape[1] :]
    is_eos = completions == tokenizer.eos_token_id
    ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.tensor(completions.shape[1]))
    return int(ends.sum())


def tunelab_tokens(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, step: int) -> int:
    """Generate as tunelab's `grpo` does (keyed sampling); the count of response tokens."""
    from tunelab.rl.rollouts import generate_rollouts, sampling_keys

    keys = sampling_keys(0, step, list(range(len(prompt_ids))))
    rollout = generate_rollouts(model, tokenizer, prompt_ids, max_new_tokens, keys=keys)
    return int(rollout.response_mask.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small")
    parser.add_argument("--cache", default=".cache/bench")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    workload = build(Path(args.cache), args.shape)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workload.model_dir)
    model = AutoModelForCausalLM.from_pretrained(workload.model_dir).eval()
    rows = [json.loads(line) for line in workload.eval_alpaca.read_text().splitlines()[: args.prompts]]
    texts = [alpaca_prompt(row) for row in rows for _ in range(args.generations)]  # (B * G) prompts
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    config = trl_generation_config(tokenizer, args.max_new_tokens)
    rates: dict[str, list[float]] = {"tunelab": [], "trl": []}
    for step in range(args.repeats):
        for side in ("tunelab", "trl"):
            start = time.perf_counter()
            if side == "tunelab":
                tokens = tunelab_tokens(model, tokenizer, prompt_ids, args.max_new_tokens, step)
            else:
                tokens = trl_tokens(model, tokenizer, texts, config)
            rates[side].append(tokens / (time.perf_counter() - start))
    result = {
        "shape": args.shape,
        "rows": len(texts),
        "max_new_tokens": args.max_new_tokens,
        "tunelab_tokens_per_s": statistics.median(rates["tunelab"]),
        "trl_tokens_per_s": statistics.median(rates["trl"]),
    }
    result["ratio"] = result["tunelab_tokens_per_s"] / result["trl_tokens_per_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
