"""Rebuild the shipped demo base model `models/demo-base/` from nothing (see tunelab/demo.py).

python scripts/make_demo_model.py [--out models/demo-base] [--steps 5000]
"""

import argparse
import shutil
from pathlib import Path

from tunelab.demo import DEMO_MODEL, PRETRAIN_STEPS, ensure_demo_model

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(DEMO_MODEL))
    parser.add_argument("--steps", type=int, default=PRETRAIN_STEPS)
    args = parser.parse_args()
    shutil.rmtree(Path(args.out), ignore_errors=True)
    print(ensure_demo_model(Path(args.out), pretrain_steps=args.steps))
