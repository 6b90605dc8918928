"""What both benchmark runners share: timing, peak memory, a common eval loss, FLOP counts.

Throughput is *real* tokens per second: tokens that are not padding, fed to the model, counted
over the timed steps only (the first `warmup` steps are excluded for both trainers: they include
one-time costs such as allocator growth and, with `train.compile`, compilation).

Model FLOPs (the "useful" work of one step, as in MFU) for a batch of examples of lengths T_i, of
which N_tgt are target positions:

    matmul:    k * 2 * P_body * sum_i T_i   +   k_head * 2 * P_head * N_tgt
    attention: k * 4 * L * d_attn * sum_i T_i (T_i + 1) / 2         (QK^T and PV, causal half)

with P_body the decoder blocks' matmul parameters, P_head the LM head's, k = 3 for full
fine-tuning (forward, input gradient, weight gradient) and k = 2 for LoRA (the frozen weights
need no weight gradient; the adapters' own 6 * P_lora per token are added). The LM head is
counted at target positions only: logits elsewhere are not needed for the loss. Padding, recompute
(gradient checkpointing) and logits nobody needs are *not* counted, so a trainer that wastes
compute gets a lower MFU.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

IGNORE_INDEX = -100


def add_workload_arguments(parser) -> None:
    """The arguments both runners take, with the same defaults: so both train the same workload
    with the same hyperparameters."""
    parser.add_argument("--cache", default="benchmarks/.cache")
    parser.add_argument("--shape", default="small")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="steps excluded from the timing")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-eval", action="store_true")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_kb(key: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB (`VmRSS`, `VmHWM`, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    raise KeyError(key)


class StepTimer:
    """Wall-clock time and real tokens at the end of every optimizer step."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []  # (time, cumulative real tokens)
        self.start = time.perf_counter()

    def mark(self, cumulative_tokens: int) -> None:
        self.marks.append((time.perf_counter(), cumulative_tokens))

    def summary(self, warmup: int) -> dict:
        """Throughput over steps warmup+1 .. end (real tokens / s) and mean step time."""
        if len(self.marks) <= warmup:
            raise ValueError(f"only {len(self.marks)} steps ran; need more than warmup={warmup}")
        t0, n0 = self.marks[warmup - 1] if warmup > 0 else (self.start, 0)
        t1, n1 = self.marks[-1]
        steps = len(self.marks) - warmup
        return {
            "timed_steps": steps,
            "timed_seconds": t1 - t0,
            "timed_tokens": n1 - n0,
            "tokens_per_s": (n1 - n0) / (t1 - t0),
            "seconds_per_step": (t1 - t0) / steps,
            "warmup_seconds": t0 - self.start,
        }


def eval_batches(model_dir: str, eval_file: str, max_length: int = 512, batch_size: int = 8) -> list[dict]:
    """Held-out records tokenised the same way for every trainer: alpaca prompt (no loss) +
    output + eos (loss), right-padded batches."""
    from transformers import AutoTokenizer

    from benchmarks.workload import alpaca_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in open(eval_file)]
    examples = []
    for r in rows:
        prompt = tokenizer(alpaca_prompt(r))["input_ids"]
        completion = tokenizer(r["output"] + tokenizer.eos_token)["input_ids"]
        ids = (prompt + completion)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
        examples.append((ids, labels))
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        labels = torch.full((len(chunk), width), IGNORE_INDEX)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, lab) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(lab)
            mask[row, : len(ids)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


@torch.no_grad()
def eval_loss(model, batches: list[dict]) -> float:
    """Per-target-token cross-entropy on the held-out batches, in float32, no autocast."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shift_logits = logits[:, :-1]  # (B, T-1, V)
        shift_labels = batch["labels"][:, 1:]  # (B, T-1)
        total += float(
            torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)),
                shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
        count += int((shift_labels != IGNORE_INDEX).sum())
    return total / count


def matmul_params(config) -> tuple[int, int]:
    """(P_body, P_head): matmul weights of the decoder blocks and of the LM head (Llama/Qwen2 shapes)."""
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = d * config.num_attention_heads * head_dim
    kv = 2 * d * config.num_key_value_heads * head_dim
    body = layers * (2 * q + kv + 3 * d * inter)  # q, o, k+v, gate/up/down
    return body, d * config.vocab_size


def step_flops(config, lengths: list[int], targets: int, method: str, lora_params: int = 0) -> float:
    """Model FLOPs of one optimizer step over examples of `lengths` with `targets` target tokens."""
    body, head = matmul_params(config)
    k = 3 if method == "full" else 2
    tokens = sum(lengths)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d_attn = config.num_attention_heads * head_dim
    attention = k * 4 * config.num_hidden_layers * d_attn * sum(t * (t + 1) / 2 for t in lengths)
    return k * 2 * body * tokens + k * 2 * head * targets + attention + 6 * lora_params * tokens


def lora_param_count(config, r: int) -> int:
    """Parameters of LoRA rank r on every linear layer of the decoder blocks."""
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    dq = config.num_attention_heads * head_dim
    dkv = config.num_key_value_heads * head_dim
    shapes = [(d, dq), (d, dkv), (d, dkv), (dq, d), (d, inter), (d, inter), (inter, d)]
    return layers * sum(r * (a + b) for a, b in shapes)


def emit(result: dict) -> None:
    """Print the run's result as the last line of stdout, for the driver."""
    print("RESULT " + json.dumps(result), flush=True)
