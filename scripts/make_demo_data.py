"""Regenerate the bundled demo data set: `python scripts/make_demo_data.py` (see tunelab/demo_data.py)."""

from tunelab.demo_data import main

if __name__ == "__main__":
    main()
