"""`tunelab push RUN --repo NAME [--private] [--export PATH]`: a run's model onto the Hugging Face Hub."""

from __future__ import annotations

import argparse

HELP = "upload a run's final/ (or an export folder) to a Hugging Face Hub repository"
DESCRIPTION = (
    "Create the Hub repository NAME (user/name or org/name; an existing one is kept) and upload the "
    "run's final/ folder to it as it is, model card included, or the folder given with --export. "
    "The token is HF_TOKEN or the one `hf auth login` stored; HF_ENDPOINT chooses another Hub."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run folder (its final/ is uploaded) or a final/ folder")
    parser.add_argument("--repo", required=True, help="the Hub repository, user/name or org/name")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument(
        "--export", default=None, help="upload this folder (an export of the run) instead of final/"
    )


def run(args: argparse.Namespace) -> int:
    """Push and print where the files went."""
    from tunelab.hub import push

    pushed = push(args.run, args.repo, private=args.private, export=args.export)
    print(f"pushed {pushed.folder} to {pushed.repo_url} ({pushed.commit_url})")
    return 0
