"""`python -m tunelab ...` is the same as `tunelab ...`."""

from tunelab.cli import console

console()
