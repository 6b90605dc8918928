"""The held-out loss of a finished whole-job run (`benchmarks.defaults`), by the same code for both.

    python -m benchmarks.trained_eval --trainer tunelab --out RUN --base MODEL --tokenizer TOK \
        --eval eval.jsonl

Loads what the run saved, in float32 on CPU: tunelab's `RUN/final` through `tunelab.trained.
load_trained`; TRL's `RUN` as a PEFT adapter on `MODEL` (a folder or a `.gguf` file) or as a full
model. Then `benchmarks.common.eval_loss` on `common.eval_batches(TOK, eval.jsonl)`: the per-token
cross-entropy of `output + eos` after the alpaca prompt, in float32, no autocast. Prints
`RESULT {"eval_loss": ...}`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def trl_model(out: str, base: str):
    """TRL's saved model: a PEFT adapter (`adapter_config.json`) on `base`, else a full model."""
    import torch
    from transformers import AutoModelForCausalLM

    if not (Path(out) / "adapter_config.json").exists():
        return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    from peft import PeftModel

    folder, extra = base, {}
    if base.endswith(".gguf"):
        folder, extra = str(Path(base).parent), {"gguf_file": Path(base).name}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)
    if extra:  # unmarked as quantised by GGUF, as `benchmarks.trl_job` trained it
        model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
        del model.config.quantization_config
    return PeftModel.from_pretrained(model, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", choices=["tunelab", "trl"], required=True)
    parser.add_argument("--out", required=True, help="the run's output folder")
    parser.add_argument("--base", required=True, help="the base model (folder or .gguf)")
    parser.add_argument("--tokenizer", required=True, help="a tokenizer folder for the eval batches")
    parser.add_argument("--eval", required=True, help="held-out alpaca JSONL")
    args = parser.parse_args()

    from benchmarks import common

    if args.trainer == "tunelab":
        from tunelab.trained import load_trained

        model, _, _ = load_trained(Path(args.out) / "final", dtype="float32", device="cpu")
    else:
        model = trl_model(args.out, args.base)
    batches = common.eval_batches(args.tokenizer, args.eval)
    common.emit({"eval_loss": common.eval_loss(model, batches)})


if __name__ == "__main__":
    main()
