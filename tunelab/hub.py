"""`tunelab push`: a trained run's model onto the Hugging Face Hub, through `huggingface_hub`.

    HfApi.create_repo(NAME, private=..., exist_ok=True)      POST {endpoint}/api/repos/create
    HfApi.upload_folder(NAME, FOLDER)                          POST .../preupload/main, then .../commit/main

The folder goes as it is: the run's `final/` (the model or adapter, the tokenizer and the model card
`README.md` when the run wrote one), or an export folder given instead. Small files travel inside
the commit; large ones (weights) go to the Hub's large-file storage first, as the Hub decides in its
answer to "preupload". The token is the usual one (`HF_TOKEN`, else the one `hf auth login`
stored); the endpoint is `HF_ENDPOINT` (read by huggingface_hub when it is imported), else
https://huggingface.co. Every failure a user can fix is one line: no `final/`, no token, offline
mode, the Hub unreachable, or its HTTP error (status and message).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError, one_line


@dataclass
class Pushed:
    """Where a push went."""

    folder: Path
    """The local folder uploaded."""
    repo_url: str
    """The repository's page."""
    commit_url: str
    """The commit that holds the upload."""


def folder_to_push(run: str | Path, export: str | Path | None = None) -> Path:
    """`export` when given (a folder), else the run's `final/` (a run folder, or `final/` itself)."""
    if export is not None:
        folder = Path(export)
        if not folder.is_dir():
            raise TunelabError(f"--export {export}: not a folder")
    else:
        run = Path(run)
        folder = run if run.name == "final" else run / "final"
        if not folder.is_dir():
            raise TunelabError(
                f"{run}: no final/ folder (the run has not finished training); push a finished run, or an "
                "export folder with --export PATH"
            )
    if not any(path.is_file() for path in folder.rglob("*")):
        raise TunelabError(f"{folder}: the folder is empty")
    return folder


def push(run: str | Path, repo: str, private: bool = False, export: str | Path | None = None) -> Pushed:
    """Create the Hub repository `repo` (`user/name` or `org/name`; kept if it exists) and upload the
    folder of `folder_to_push` to it (one commit; huggingface_hub splits a very large folder)."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    folder = folder_to_push(run, export)
    token = get_token()
    if not token:
        raise TunelabError("no Hugging Face token: log in with `hf auth login`, or set HF_TOKEN")
    if constants.HF_HUB_OFFLINE:
        raise TunelabError("HF_HUB_OFFLINE is set: unset it to push to the Hub")
    api = HfApi(token=token)
    try:
        # not private: the namespace's default (public, unless an organisation says otherwise)
        repo_url = api.create_repo(repo, private=True if private else None, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_url.repo_id, folder_path=folder, commit_message=f"Upload {folder} with tunelab"
        )
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "no status"
        raise TunelabError(
            f"pushing {folder} to {repo} at {api.endpoint}: HTTP {status}: {one_line(error)}"
        ) from None
    except ValueError as error:  # a repository name the Hub refuses, checked before any request
        raise TunelabError(f"--repo {repo}: {one_line(error)}") from None
    except transport_errors() as error:
        raise TunelabError(f"cannot reach {api.endpoint} to push {folder}: {one_line(error)}") from None
    return Pushed(folder, str(repo_url), commit.commit_url)


def transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's errors for a request that got no answer (refused, unreachable, timed out):
    `httpx2.RequestError` under huggingface_hub 2, `httpx.RequestError` under 1."""
    errors = []
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).RequestError)
        except ImportError:
            continue
    return tuple(errors)
