"""`tunelab push` (tunelab/hub.py) against a small Hub on 127.0.0.1: a thread serving the part of the
Hub API that `HfApi.create_repo` and `HfApi.upload_folder` use (huggingface_hub 2.4):

    POST /api/repos/create                          {name, organization, visibility}
    POST /api/validate-yaml                         the model card's metadata (README.md)
    POST /api/models/{repo}/preupload/{revision}    which files go inside the commit ("regular")
    POST /api/models/{repo}/commit/{revision}       NDJSON: a header, then each file base64-encoded

huggingface_hub reads HF_ENDPOINT when it is imported, so the command runs in a subprocess with
the environment set. The files that arrive are compared byte for byte with the folder."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import save_file

from tunelab.cli import main

CARD = "---\nlibrary_name: transformers\ntags:\n- tunelab\n---\n\n# A tiny model\n\nTrained with tunelab.\n"


class FakeHub(BaseHTTPRequestHandler):
    """The Hub's answers; each request is noted in `server.requests`, each commit's files in
    `server.commits`. The namespace `denied` is refused with HTTP 403, as the Hub refuses a
    namespace the token may not write to."""

    def log_message(self, *args):  # quiet
        pass

    def reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.requests.append(("GET", self.path, self.headers.get("Authorization"), None))
        self.reply(404, {"error": "Repository not found"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append(("POST", self.path, self.headers.get("Authorization"), body))
        base = f"http://127.0.0.1:{self.server.server_port}"
        parts = self.path.split("?")[0].strip("/").split("/")  # api, models, org, name, verb, revision
        if parts == ["api", "repos", "create"]:
            request = json.loads(body)
            if request["organization"] == "denied":
                return self.reply(
                    403, {"error": "You don't have the rights to create a model under this namespace"}
                )
            return self.reply(200, {"url": f"{base}/{request['organization']}/{request['name']}"})
        if parts == ["api", "validate-yaml"]:  # the card's metadata, checked before the upload
            return self.reply(200, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and parts[4:] == ["preupload", "main"]:
            files = json.loads(body)["files"]
            return self.reply(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                },
            )
        if parts[:2] == ["api", "models"] and parts[4:] == ["commit", "main"]:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            assert lines[0]["key"] == "header"
            files = {
                line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines[1:]
                if line["key"] == "file"
            }
            self.server.commits.append(("/".join(parts[2:4]), lines[0]["value"]["summary"], files))
            oid = "0123456789abcdef0123456789abcdef01234567"
            return self.reply(
                200, {"commitUrl": f"{base}/{parts[2]}/{parts[3]}/commit/{oid}", "commitOid": oid}
            )
        return self.reply(404, {"error": f"not served here: {self.path}"})


@pytest.fixture
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.requests, server.commits = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def finished_run(tmp_path):
    """A run folder whose final/ holds a model card, a config, random weights and a nested file."""
    final = tmp_path / "run" / "final"
    (final / "extra").mkdir(parents=True)
    (final / "README.md").write_text(CARD)
    (final / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    save_file(
        {"w": torch.randn(16, 8, generator=torch.Generator().manual_seed(0))}, final / "model.safetensors"
    )
    (final / "extra" / "notes.txt").write_text("nested\n")
    return tmp_path / "run"


DRIVER = """
import contextlib, io, json, sys
from tunelab.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    results.append({"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def push_commands(hub, tmp_path, *commands: list) -> list[dict]:
    """`tunelab push ARGS` for each ARGS, through `tunelab.cli.main` in one subprocess (one import of
    torch and transformers) whose huggingface_hub talks to `hub` with the token `hf_tunelab_test`.
    Each result: {status, stdout, stderr}."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
    }
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{hub.server_port}",
        HF_TOKEN="hf_tunelab_test",
        HF_HOME=str(tmp_path / "hf-home"),  # no stored token but this one
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    argvs = [["push", *map(str, command)] for command in commands]
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(argvs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_push_to_a_local_hub(hub, finished_run, tmp_path):
    """1. The repository is created private with the token, and one commit carries every file of
    final/, byte for byte, at its path (the card as README.md). 2. --export uploads that folder
    instead, to a public repository. 3. A namespace the Hub refuses (HTTP 403) is one line naming
    the status, without a traceback, and commits nothing."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.gguf").write_bytes(b"GGUF" + bytes(range(64)))
    private, exported, refused = push_commands(
        hub,
        tmp_path,
        [finished_run, "--repo", "me/tiny-model", "--private"],
        [finished_run, "--repo", "me/tiny-gguf", "--export", export],
        [finished_run, "--repo", "denied/tiny-model"],
    )
    assert private["status"] == 0, private["stderr"]
    assert "pushed" in private["stdout"] and "me/tiny-model" in private["stdout"]
    creates = [json.loads(body) for _, path, _, body in hub.requests if path == "/api/repos/create"]
    assert creates == [
        {"name": "tiny-model", "organization": "me", "visibility": "private"},
        {"name": "tiny-gguf", "organization": "me"},  # public: no visibility asked for
        {"name": "tiny-model", "organization": "denied"},
    ]
    assert all(auth == "Bearer hf_tunelab_test" for _, _, auth, _ in hub.requests)
    final = finished_run / "final"
    local = {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    (repo, message, files), (gguf_repo, _, gguf_files) = hub.commits
    assert repo == "me/tiny-model" and "tunelab" in message
    assert files == local and files["README.md"].decode() == CARD

    assert exported["status"] == 0, exported["stderr"]
    assert (gguf_repo, gguf_files) == ("me/tiny-gguf", {"model.gguf": b"GGUF" + bytes(range(64))})

    assert refused["status"] == 2
    assert refused["stderr"].startswith("tunelab push: error: pushing ") and "HTTP 403" in refused["stderr"]
    assert len(refused["stderr"].strip().splitlines()) == 1 and "Traceback" not in refused["stderr"]
    assert len(hub.commits) == 2


def test_push_errors_before_any_request(finished_run, tmp_path, monkeypatch, capsys):
    """No final/, an --export that is not a folder, and no token are one line each (in-process: none
    of them reaches the network)."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    cases = [
        ([str(tmp_path)], "no final/ folder"),
        ([str(finished_run), "--export", str(tmp_path / "missing")], "not a folder"),
        ([str(finished_run)], "no Hugging Face token: log in with `hf auth login`, or set HF_TOKEN"),
    ]
    for args, message in cases:
        assert main(["push", *args, "--repo", "me/tiny-model"]) == 2
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1
