"""One benchmark run of the peer: TRL's `SFTTrainer`, with a PEFT LoRA or full fine-tuning.

    python -m benchmarks.run_trl --cache benchmarks/.cache --method lora --precision bf16 --steps 30

Prints `RESULT {json}` (see `benchmarks.common`). Run in its own process so that the peak RSS is
this run's alone. Settings: the data set as prompt/completion (loss on completions only), batch 8,
max length 512, AdamW at a constant `lr`, clip 1.0, no eval, logging every step. Everything else
is TRL's default, gradient checkpointing included (`--no-gradient-checkpointing`: faster here, at
about 1.5x the memory).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


def main() -> None:
    from benchmarks import common

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_workload_arguments(parser)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--packing", action="store_true", help="TRL packing (bfd, padding-free)")
    parser.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="turn off TRL's default activation checkpointing (faster, more memory)",
    )
    args = parser.parse_args()

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from benchmarks.workload import build

    started = time.perf_counter()
    workload = build(args.cache, args.shape)
    tokenizer = AutoTokenizer.from_pretrained(workload.model_dir)
    model = AutoModelForCausalLM.from_pretrained(workload.model_dir, dtype=torch.float32).to(args.device)
    dataset = load_dataset("json", data_files=str(workload.train_trl), split="train")
    peft_config = None
    if args.method == "lora":
        peft_config = LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear",
            task_type="CAUSAL_LM",
        )  # fmt: skip
    config = SFTConfig(
        output_dir=str(workload.root / "trl-out"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=args.max_length,
        packing=args.packing,
        completion_only_loss=True,
        bf16=args.precision == "bf16",
        fp16=False,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
    )

    batches: list[tuple[list[int], int]] = []  # (example lengths, target tokens) per collated batch

    class Recorder(TrainerCallback):
        def __init__(self):
            self.timer = common.StepTimer()
            self.tokens = 0
            self.lengths: list[list[int]] = []
            self.targets: list[int] = []

        def on_train_begin(self, *a, **k):
            self.timer = common.StepTimer()

        def on_step_end(self, *a, **k):
            lengths, targets = batches.pop(0)
            self.tokens += sum(lengths)
            self.lengths.append(lengths)
            self.targets.append(targets)
            self.timer.mark(self.tokens)

    recorder = Recorder()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[recorder],
    )
    collate = trainer.data_collator

    def recording_collator(features):
        batch = collate(features)
        if "attention_mask" in batch:
            lengths = [int(n) for n in batch["attention_mask"].sum(1)]
        else:  # padding-free: one row, position ids restart at 0 for each example
            starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [
                batch["position_ids"].size(1)
            ]
            lengths = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        batches.append((lengths, int((batch["labels"][:, 1:] != common.IGNORE_INDEX).sum())))
        return batch

    trainer.data_collator = recording_collator
    setup_seconds = time.perf_counter() - started
    trainer.train()
    peak = common.peak_rss_mb()
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    timing = recorder.timer.summary(args.warmup)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    timed = slice(args.warmup, None)
    timed_lengths = [n for b in recorder.lengths[timed] for n in b]
    padded = sum(len(b) * max(b) for b in recorder.lengths[timed]) if not args.packing else sum(timed_lengths)
    model_cfg = trainer.model.config
    lora = common.lora_param_count(model_cfg, args.rank) if args.method == "lora" else 0
    flops = sum(
        common.step_flops(model_cfg, b, t, args.method, lora)
        for b, t in zip(recorder.lengths[timed], recorder.targets[timed], strict=True)
    )
    result = {
        "trainer": "trl",
        "shape": args.shape,
        "device": args.device,
        "method": args.method,
        "precision": args.precision,
        "packing": args.packing,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps": len(losses),
        **timing,
        "model_flops_per_s": flops / timing["timed_seconds"],
        "padding_fraction": 1 - sum(timed_lengths) / padded,
        "peak_rss_mb": peak,
        "peak_gpu_mb": gpu_peak,
        "setup_seconds": setup_seconds,
        "losses": losses,
        "threads": torch.get_num_threads(),
    }
    if not args.no_eval:
        batches_eval = common.eval_batches(str(workload.model_dir), str(workload.eval_alpaca))
        result["eval_loss"] = common.eval_loss(trainer.model.float(), batches_eval)
    common.emit(result)


if __name__ == "__main__":
    main()
