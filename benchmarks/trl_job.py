"""The peer's whole job, as a TRL user writes it: `SFTTrainer` on a model path, its defaults, bf16.

    python -m benchmarks.trl_job --model MODEL --train train_trl.jsonl --method lora --out OUT \
        --lr 2e-4 --epochs 1 --batch-size 8 --max-length 512

`benchmarks.defaults` runs this as one process and times it from start to exit. Only what the
workload fixes is set (batch, epochs or steps, lr, max length; LoRA r and alpha so the adapter is
tunelab's: alpha 16, q_proj and v_proj, no dropout); everything else is TRL's default: the model
loaded from its path in float32 (`model_init_kwargs` default) under bf16 autocast (`bf16=True`,
TRL's default; `--fp32` turns it off), gradient checkpointing on, loss on completions only, a
linear schedule. The job ends as a user's does: `trainer.save_model(OUT)` (the PEFT adapter, or
the full model). The seconds of `trainer.train()` alone are printed as `TRAIN_LOOP_SECONDS s` (the
loop's share).

A `.gguf` model is loaded first (TRL reads a path's config without `gguf_file`), by transformers,
which dequantises it, in float32: what TRL loads a path in; then unmarked as quantised, since TRL
refuses to train a model transformers marks as quantised by GGUF.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("WANDB_DISABLED", "true")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder or .gguf file")
    parser.add_argument("--train", required=True, help="prompt/completion JSONL")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="-1: the epochs decide")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument(
        "--fp32",
        action="store_true",
        help="bf16=False: float32 training, TRL's fastest setting on a CPU that emulates bf16 (AVX2)",
    )
    args = parser.parse_args()

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    folder, extra = args.model, {}
    if args.model.endswith(".gguf"):
        folder, extra = str(Path(args.model).parent), {"gguf_file": Path(args.model).name}
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    model = folder
    if extra:  # TRL reads a model path's config without `gguf_file`: a GGUF user loads it first,
        # in TRL's default dtype for a path (float32)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)
        # transformers marks it quantised by GGUF (every tensor is dequantised) and TRL then refuses
        # to train it: unmark it, as `tunelab.export.gguf_in.plain_model` does
        model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
        del model.config.quantization_config
    peft_config = None
    if args.method == "lora":
        peft_config = LoraConfig(r=args.rank, lora_alpha=args.alpha, task_type="CAUSAL_LM")
    config = SFTConfig(
        output_dir=args.out,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        max_length=args.max_length,
        use_cpu=not torch.cuda.is_available(),  # TRL asks for it on a CPU-only machine (bf16 check)
        **({"bf16": False} if args.fp32 else {}),
        report_to=[],
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=load_dataset("json", data_files=args.train, split="train"),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    started = time.perf_counter()
    trainer.train()
    print(f"TRAIN_LOOP_SECONDS {time.perf_counter() - started:.3f}", flush=True)  # benchmarks.defaults
    trainer.save_model(args.out)


if __name__ == "__main__":
    main()
