"""Hub publishing against a local fake Hub, and offline loading from a Hub-layout cache.

The fake Hub is a stdlib ``http.server`` on 127.0.0.1 implementing what huggingface_hub (1.x and 2.x) calls for
``create_repo``, the model-card lookup, ``validate-yaml``, ``preupload`` and ``commit`` (regular uploads: file
contents base64 in the NDJSON commit payload). ``HF_ENDPOINT`` must be set before huggingface_hub is imported,
so pushes run in a subprocess.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
import yaml

from grace_quant import AutoModelForVision2Seq, GraceConfig
from grace_quant.integrations.hub import GraceHubError, grace_model_card, push_to_hub
from grace_quant.testing import tiny_inputs

TOKEN = "hf_fake_token_for_tests_0123456789"
CARD = {
    "base_model": "org/tiny-llava-fp",
    "teacher": "org/tiny-llava-teacher",
    "training_settings": {"final beta": 0.27, "steps": 40},
    "eval_results": {"VQAv2 (val, 1k)": 61.5},
}
REPO_PATH = re.compile(r"^/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)$")


class FakeHub:
    """A minimal Hub: accepts ``Bearer TOKEN`` only, stores committed files under ``root/<org>/<name>/``."""

    def __init__(self, root: Path, token: str, read_only: tuple[str, ...] = ("org/readonly",)):
        self.root, self.token, self.read_only = root, token, read_only
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.unexpected: list[str] = []
        self.created: dict[str, dict] = {}
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def files(self, repo: str) -> dict[str, bytes]:
        folder = self.root / repo
        return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _reply(self, status: int, body: object = None, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _route(self) -> None:
        hub, path = self.hub, urlsplit(self.path).path
        hub.requests.append((self.command, path, self.headers.get("Authorization")))
        authorised = self.headers.get("Authorization") == f"Bearer {hub.token}"
        body = self._body() if self.command == "POST" else b""
        match = REPO_PATH.match(path)
        if self.command == "POST" and path == "/api/repos/create":
            if not authorised:
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            hub.created[repo] = payload
            return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo, "id": repo})
        if self.command == "GET" and path.startswith("/api/models/"):  # repo_info (create_repo's 401/403 fallback)
            return self._reply(401, {"error": "Invalid credentials"}) if not authorised else self._reply(404, {})
        if self.command in ("HEAD", "GET") and "/resolve/" in path:  # no file exists yet (README.md lookup)
            return self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        if self.command == "POST" and path == "/api/validate-yaml":
            yaml.safe_load(json.loads(body)["content"].split("---")[1])  # the front matter must parse
            return self._reply(200, {"errors": [], "warnings": []})
        if self.command == "POST" and match and match.group(2) == "preupload":
            if not authorised:
                return self._reply(401, {"error": "Invalid credentials"})
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return self._reply(200, {"files": modes})
        if self.command == "POST" and match and match.group(2) == "commit":
            repo = match.group(1)
            if not authorised:
                return self._reply(401, {"error": "Invalid credentials"})
            if repo in hub.read_only:
                return self._reply(403, {"error": "You don't have the rights to commit to this repo"})
            staged = {}
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    assert item["value"]["encoding"] == "base64"
                    staged[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] != "header":
                    return self._reply(400, {"error": f"unsupported commit item {item['key']}"})
            for name, data in staged.items():  # only a complete commit is stored
                target = hub.root / repo / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            oid = hashlib.sha1(body).hexdigest()
            return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})
        hub.unexpected.append(f"{self.command} {path}")
        return self._reply(404, {"error": "not implemented by FakeHub"})

    do_GET = do_HEAD = do_POST = _route


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs(model)).logits


def _subprocess_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    (tmp / "tmpdir").mkdir(exist_ok=True)
    env.update(
        HF_HOME=str(tmp / "hf_home"),  # no stored token from the real home
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        TMPDIR=str(tmp / "tmpdir"),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    env.update(extra)
    return env


def _run(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def grace_dir(fp_checkpoint, tmp_path_factory) -> Path:
    """A packed GRACE checkpoint of the tiny LLaVA."""
    model = AutoModelForVision2Seq.from_pretrained(
        fp_checkpoint("llava"), quantization_config=GraceConfig(group_size=32, mode="packed")
    )
    folder = tmp_path_factory.mktemp("grace_llava")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def grace_model(grace_dir):
    return AutoModelForVision2Seq.from_pretrained(grace_dir)


PUSH_SCRIPT = """
import json, os, sys
args = json.loads(sys.argv[1])
from huggingface_hub import constants
assert constants.ENDPOINT == os.environ["HF_ENDPOINT"], constants.ENDPOINT
import grace_quant
from grace_quant.cli import main
from grace_quant.integrations.hub import GraceHubError, push_to_hub

model = grace_quant.AutoModelForVision2Seq.from_pretrained(args["src"])
out = {}
def attempt(name, fn):
    try:
        out[name] = {"ok": str(fn())}
    except GraceHubError as exc:
        out[name] = {"error": str(exc)}
attempt("grace", lambda: push_to_hub(model, "org/grace-tiny", token=args["token"], **args["card"]))
attempt("transformers", lambda: model.push_to_hub("org/tf-tiny", token=args["token"]))
attempt("denied", lambda: push_to_hub(model, "org/denied", token="hf_wrong_token_987654321"))
attempt("readonly", lambda: push_to_hub(model, "org/readonly", token=args["token"]))
os.environ["GQ_TEST_TOKEN"] = args["token"]
out["cli"] = main(["push", args["src"], "org/cli-tiny", "--token-env", "GQ_TEST_TOKEN", "--private"])
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def pushed(grace_dir, tmp_path_factory):
    """Run every push scenario once in a subprocess against one FakeHub; yield (results, hub, process, tmp)."""
    tmp = tmp_path_factory.mktemp("push")
    hub = FakeHub(tmp / "server", TOKEN)
    try:
        env = _subprocess_env(tmp, HF_ENDPOINT=hub.url)
        args = json.dumps({"src": str(grace_dir), "token": TOKEN, "card": CARD})
        process = _run(PUSH_SCRIPT, env, args)
        results = json.loads(process.stdout.split("RESULT ", 1)[1])
        yield types.SimpleNamespace(results=results, hub=hub, process=process, tmp=tmp)
    finally:
        hub.close()


def test_model_card_describes_the_checkpoint(grace_model):
    card = grace_model_card(grace_model, repo_id="org/grace-tiny", **CARD)
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["base_model"] == CARD["base_model"]
    assert {"grace", "int4", "quantized"} <= set(meta["tags"])
    qconfig = grace_model.config.quantization_config
    assert f"| bits | {qconfig.bits} |" in body and f"| group size | {qconfig.group_size} |" in body
    assert all(f"`{name}`" in body for name in qconfig.modules_to_not_convert)
    assert "| final beta | 0.27 |" in body and "| VQAv2 (val, 1k) | 61.5 |" in body
    assert CARD["teacher"] in body
    assert "pip install grace-quant" in body and "import grace_quant" in body
    assert 'AutoModelForVision2Seq.from_pretrained("org/grace-tiny")' in body
    bare = yaml.safe_load(grace_model_card(grace_model).split("---\n")[1])
    assert "base_model" not in bare


def test_model_card_refuses_non_grace_models(fp_checkpoint):
    fp_model = AutoModelForVision2Seq.from_pretrained(fp_checkpoint("llava"))
    with pytest.raises(ValueError, match="needs a GRACE model"):
        grace_model_card(fp_model)


def test_push_to_hub_uploads_a_loadable_checkpoint_and_card(pushed, grace_model, grace_dir):
    assert "ok" in pushed.results["grace"], pushed.results
    assert pushed.results["grace"]["ok"].startswith(f"{pushed.hub.url}/org/grace-tiny/commit/")
    files = pushed.hub.files("org/grace-tiny")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert files["README.md"].decode() == grace_model_card(grace_model, repo_id="org/grace-tiny", **CARD)
    reloaded = AutoModelForVision2Seq.from_pretrained(pushed.hub.root / "org/grace-tiny")
    assert torch.equal(_logits(reloaded), _logits(grace_model))
    assert not pushed.hub.unexpected, pushed.hub.unexpected
    auth = {header for _, path, header in pushed.hub.requests if "grace-tiny" in path}
    assert auth == {f"Bearer {TOKEN}"}


def test_transformers_push_to_hub_works_for_grace_models(pushed, grace_model):
    assert "ok" in pushed.results["transformers"], pushed.results
    reloaded = AutoModelForVision2Seq.from_pretrained(pushed.hub.root / "org/tf-tiny")
    assert torch.equal(_logits(reloaded), _logits(grace_model))


def test_transformers_push_to_hub_uploads_the_grace_card(pushed, grace_model):
    """model.push_to_hub (transformers' own) publishes the GRACE card, which says how to load the model."""
    card = pushed.hub.files("org/tf-tiny")["README.md"].decode()
    assert card == grace_model_card(grace_model, repo_id="org/tf-tiny")
    assert "import grace_quant" in card and "automatically generated" not in card


def pickles(files: dict[str, bytes]) -> list[str]:
    """Names of uploaded files that are pickles (raw, or torch.save's zip of one)."""
    return [name for name, data in files.items() if data[:1] == b"\x80" or data[:2] == b"PK" or name.endswith(".bin")]


def test_no_publishing_path_uploads_a_pickle(pushed):
    for repo in ("org/grace-tiny", "org/tf-tiny", "org/cli-tiny"):
        files = pushed.hub.files(repo)
        assert "model.safetensors" in files and pickles(files) == [], (repo, sorted(files))


def test_cli_push_uploads_the_folder_as_is(pushed, grace_dir):
    assert pushed.results["cli"] == 0
    files = pushed.hub.files("org/cli-tiny")
    for name in ("config.json", "model.safetensors"):
        assert files[name] == (grace_dir / name).read_bytes()
    assert "import grace_quant" in files["README.md"].decode() and not (grace_dir / "README.md").exists()
    created = pushed.hub.created["org/cli-tiny"]  # hub 2.x sends visibility, hub 1.x private
    assert created.get("visibility") == "private" or created.get("private") is True


def test_unauthorised_push_gives_a_clear_error(pushed):
    message = pushed.results["denied"].get("error", "")
    assert "not authorised to write to org/denied" in message and "HTTP 401" in message
    assert "hf auth login" in message
    assert not (pushed.hub.root / "org/denied").exists()


def test_failed_push_leaves_no_local_or_remote_files(pushed):
    message = pushed.results["readonly"].get("error", "")
    assert "HTTP 403" in message
    assert not (pushed.hub.root / "org/readonly").exists()
    assert not list((pushed.tmp / "tmpdir").glob("grace-push-*"))  # the temp folders are gone


def test_the_token_is_never_printed(pushed):
    output = pushed.process.stdout + pushed.process.stderr
    assert TOKEN not in output and "hf_wrong_token_987654321" not in output


def test_offline_push_gives_a_clear_error(grace_model, monkeypatch, tmp_path, caplog):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(GraceHubError, match=r"offline mode \(HF_HUB_OFFLINE=1\)") as info:
        push_to_hub(grace_model, "org/offline", token=TOKEN)
    assert TOKEN not in str(info.value) and TOKEN not in caplog.text
    assert not list(tmp_path.iterdir())


UNREACHABLE_SCRIPT = """
import json, sys
import grace_quant
from grace_quant.integrations.hub import GraceHubError, push_to_hub
model = grace_quant.AutoModelForVision2Seq.from_pretrained(sys.argv[1])
try:
    push_to_hub(model, "org/unreachable", token=sys.argv[2])
except GraceHubError as exc:
    print("RESULT " + json.dumps({"error": str(exc), "cause": type(exc.__cause__).__name__}))
"""


def test_unreachable_network_gives_a_clear_error(grace_dir, tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = _subprocess_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    process = _run(UNREACHABLE_SCRIPT, env, str(grace_dir), TOKEN)
    result = json.loads(process.stdout.split("RESULT ", 1)[1])
    assert f"cannot reach the Hub at http://127.0.0.1:{port}" in result["error"]
    assert result["cause"] == "ConnectError"  # httpx (hub 1.x) / httpx2 (hub 2.x), not an OSError
    assert TOKEN not in process.stdout + process.stderr


CACHE_SCRIPT = """
import sys, torch
import grace_quant
from grace_quant.testing import tiny_inputs
model = grace_quant.AutoModelForVision2Seq.from_pretrained("org/grace-cached")
with torch.no_grad():
    torch.save(model(**tiny_inputs(model)).logits, sys.argv[1])
"""


def test_from_pretrained_reads_a_hub_cache_offline(grace_dir, grace_model, tmp_path):
    commit = hashlib.sha1(b"grace-cached").hexdigest()
    repo = tmp_path / "hub" / "models--org--grace-cached"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for path in grace_dir.iterdir():  # the real layout: content-addressed blobs, snapshot entries are symlinks
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copy2(path, blob)
        os.symlink(os.path.relpath(blob, repo / "snapshots" / commit), repo / "snapshots" / commit / path.name)
    env = _subprocess_env(
        tmp_path, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9"
    )
    _run(CACHE_SCRIPT, env, str(tmp_path / "logits.pt"))
    assert torch.equal(torch.load(tmp_path / "logits.pt"), _logits(grace_model))


TRAINER_PUSH_SCRIPT = """
import json, sys
args = json.loads(sys.argv[1])
import torch
from safetensors.torch import save_file
from grace_quant import GraceConfig, GraceTrainer, GraceTrainingArguments, quantize_model
from grace_quant.testing import collate, tiny_dataset, tiny_inputs, tiny_model

student = quantize_model(tiny_model("llava"), GraceConfig(group_size=32))
teacher = tiny_model("llava", seed=1, hidden=96)
targs = GraceTrainingArguments(
    output_dir=args["out"], max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True,
    save_strategy="no", push_to_hub=True, hub_model_id="org/trainer-tiny", hub_token=args["token"],
    disable_tqdm=True,
)
trainer = GraceTrainer(model=student, teacher_model=teacher, args=targs, train_dataset=tiny_dataset(student, 4),
                       data_collator=collate)
trainer.train()
trainer.push_to_hub()
student.eval()
with torch.no_grad():
    save_file({"logits": student(**tiny_inputs(student)).logits}, args["logits"])
print("RESULT " + json.dumps({"beta": trainer.controller.beta}))
"""


def test_grace_trainer_push_uploads_packed_int4_and_the_grace_card(tmp_path):
    """Trainer.push_to_hub saves through save_model (packed INT4), never the qat-master checkpoint format."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from grace_quant import GraceQuantLinear
    from grace_quant.surgery import grace_layers

    hub = FakeHub(tmp_path / "server", TOKEN)
    try:
        env = _subprocess_env(tmp_path, HF_ENDPOINT=hub.url)
        args = {"out": str(tmp_path / "run"), "token": TOKEN, "logits": str(tmp_path / "logits.safetensors")}
        process = _run(TRAINER_PUSH_SCRIPT, env, json.dumps(args))
        beta = json.loads(process.stdout.split("RESULT ", 1)[1])["beta"]
        files = hub.files("org/trainer-tiny")
        assert {"config.json", "model.safetensors", "README.md"} <= set(files)
        with safe_open(str(hub.root / "org/trainer-tiny" / "model.safetensors"), framework="pt") as handle:
            assert handle.metadata()["grace_checkpoint"] == "packed"
        card = files["README.md"].decode()
        assert "import grace_quant" in card and f"{round(beta, 6)}" in card
        assert pickles(files) == [] and "training_args.json" in files, sorted(files)  # no training_args.bin
        model = AutoModelForVision2Seq.from_pretrained(hub.root / "org/trainer-tiny")
        assert all(isinstance(layer, GraceQuantLinear) for _, layer in grace_layers(model))
        assert torch.equal(_logits(model), load_file(args["logits"])["logits"])
        assert TOKEN not in process.stdout + process.stderr
    finally:
        hub.close()
