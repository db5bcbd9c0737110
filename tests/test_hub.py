"""The model card and the upload path, against a minimal fake of the Hub's HTTP API on 127.0.0.1.

huggingface_hub 2.4 talks to: GET /api/whoami-v2 (token check), POST /api/repos/create, POST
/api/models/{repo}/branch/{branch}, POST /api/validate-yaml (README metadata, before a commit), POST
/api/models/{repo}/preupload/{revision} (regular vs LFS/Xet per file), POST /api/models/{repo}/commit/{revision}
(NDJSON: a header line, then one line per file), and GET /api/agent-harnesses (a public telemetry list). The fake
answers "regular" for every file, so the small test files travel base64-encoded inside the commit and no LFS/Xet
transfer is involved.
"""

import base64
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from huggingface_hub import ModelCard, constants

from dreamllm_hf.cli import main
from dreamllm_hf.conversion import HubPushError, push_to_hub
from dreamllm_hf.conversion.verify import ParityCheck, VerificationReport
from dreamllm_hf.model_card import ConvertedFolder, build_model_card


FIXTURE = Path(__file__).parent / "fixtures" / "original_tiny"
TOKEN = "hf_fake_write_token"


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------------
# a fake Hub


class FakeHub:
    def __init__(self):
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.commits: list[dict] = []
        self.endpoint = ""
        self.refuse_commits = False

    def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict]:
        if method == "GET" and path == "/api/agent-harnesses":  # huggingface_hub's public, best-effort telemetry list
            return 200, {"standardEnvVars": [], "harnesses": {}}
        self.requests.append({"method": method, "path": path, "auth": headers.get("authorization"), "body": body})
        if headers.get("authorization") != f"Bearer {TOKEN}":
            return 401, {"error": "Invalid credentials in Authorization header"}
        if method == "GET" and path == "/api/whoami-v2":
            return 200, {"type": "user", "name": "tester", "orgs": [], "auth": {"type": "access_token"}}
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization'] or 'tester'}/{payload['name']}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}
            self.repos[repo_id] = {"private": payload.get("visibility") == "private", "branches": {"main": {}}}
            return 200, {"url": f"{self.endpoint}/{repo_id}"}
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                metadata = yaml.safe_load(match.group(1)) if match else None
            except yaml.YAMLError as error:
                return 400, {"errors": [{"message": str(error)}]}
            if not isinstance(metadata, dict):
                return 400, {"errors": [{"message": "no YAML metadata block"}]}
            return 200, {"errors": [], "warnings": []}
        match = re.match(r"^/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)$", path)
        if method == "POST" and match:
            repo_id, action, revision = match.group(1), match.group(2), unquote(match.group(3))
            repo = self.repos.get(repo_id)
            if repo is None:
                return 404, {"error": "Repository not found"}
            if action == "branch":
                if revision in repo["branches"]:
                    return 409, {"error": "Reference already exists"}
                repo["branches"][revision] = dict(repo["branches"]["main"])
                return 200, {}
            if revision not in repo["branches"]:
                return 404, {"error": f"Invalid rev id: {revision}"}
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                    ]
                }
            if self.refuse_commits:
                return 422, {"error": "simulated: the commit was refused"}
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header, files = lines[0], {}
            for line in lines[1:]:
                if line["key"] != "file":
                    return 400, {"error": f"the fake Hub does not take {line['key']} operations"}
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            repo["branches"][revision].update(files)
            oid = f"{len(self.commits) + 1:040x}"
            self.commits.append({"repo_id": repo_id, "revision": revision, "header": header["value"], "files": files})
            return 200, {
                "commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}",
                "commitOid": oid,
                "pullRequestUrl": None,
            }
        return 404, {"error": f"fake Hub: no route for {method} {path}"}


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    hub = FakeHub()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _read_body(self) -> bytes:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                body = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return body
                    body += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("content-length") or 0))

        def _serve(self):
            status, payload = hub.handle(self.command, urlsplit(self.path).path, self.headers, self._read_body())
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; this server is local
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf_home" / ".agent_harnesses.json"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    yield hub
    server.shutdown()
    server.server_close()


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------------------
# the model card


def _info(verification=None) -> dict:
    return {
        "converter": {"name": "dreamllm_hf", "version": "0.1.0"},
        "source": {"base_model": "RunpeiDong/dreamllm-7b-chat-v1.0", "files": {}},
        "dtype": "bfloat16",
        "tensors": 412,
        "bytes": 3_411_286,
        "shards": 3,
        "components": {"mllm": {"tensors": 80, "bytes": 518_848, "shards": 1}},
        "ignored_release_keys": ["pytorch_model.bin:model.layers.0.self_attn.rotary_emb.inv_freq"],
        "config": {"num_dream_queries": 64, "special_token_ids": {"<s>": 1, "</s>": 2, "[PAD]": 32000}},
        "verification": verification,
    }


def test_model_card_metadata_parses_back():
    report = VerificationReport(
        checks=[ParityCheck("logits, image + text sequence", [1, 19, 1008], 0.0, 4.49, 5.5e-4)], weights_compared=412
    )
    card = build_model_card(ConvertedFolder(_info(report.to_dict()), repo_id="someone/dreamllm-7b"))
    again = ModelCard(str(card))  # parse the rendered text back
    data = again.data.to_dict()
    assert data["license"] == "other" and data["license_link"].startswith("https://huggingface.co/RunpeiDong/")
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "any-to-any"
    assert data["base_model"] == "RunpeiDong/dreamllm-7b-chat-v1.0"
    assert {"text-to-image", "image-to-text", "any-to-any", "arxiv:2309.11499"} <= set(data["tags"])
    front_matter = str(card).split("---\n")[1]
    assert yaml.safe_load(front_matter) == data  # plain YAML, what the Hub parses
    text = again.text
    for needle in (
        "DreamLLMText2ImagePipeline.from_pipe(pipe)",
        "allow_images=False",
        "max_images=2",
        "BitsAndBytesConfig",
        "load_in_4bit=True",
        "dtype=torch.float16",
        '"someone/dreamllm-7b"',
        "## Limitations",
        "@inproceedings{dong2024dreamllm",
        "| logits, image + text sequence | 1x19x1008 | 0 | 4.49 |",
        "412 tensors bit-identical",
        "64 learned *dream queries*",
        "(bos 1, eos 2, pad 32000)",
    ):
        assert needle in text, needle
    assert "generation_mode" not in text  # deprecated: the card shows the current API
    unverified = build_model_card(ConvertedFolder(_info(), repo_id="someone/dreamllm-7b")).text
    assert "was not verified" in unverified and "| check |" not in unverified


def test_model_card_takes_user_fields_and_template(tmp_path):
    card = build_model_card(
        ConvertedFolder(_info(), repo_id="a/b"),
        fields={
            "license": "apache-2.0",
            "license_name": None,
            "license_link": None,
            "tags": ["mine"],
            "datasets": ["x/y"],
        },
    )
    data = ModelCard(str(card)).data.to_dict()
    assert data["license"] == "apache-2.0" and "license_name" not in data and data["tags"] == ["mine"]
    assert data["datasets"] == ["x/y"]
    template = tmp_path / "card.md"
    template.write_text("---\n{{ card_data }}\n---\n\n# {{ title }} by me\n\n{{ dtype }}, {{ tensors }} tensors\n")
    card = build_model_card(ConvertedFolder(_info(), repo_id="a/b"), template=template, fields={"license": "mit"})
    assert ModelCard(str(card)).data.license == "mit"
    assert card.text.strip() == "# b by me\n\nbfloat16, 412 tensors"


def _release_shaped_folder(folder: Path) -> Path:
    """The configs (no weights) of a pipeline folder shaped like the released 7B: DreamLLMConfig() and SD 2.1-base."""
    from dreamllm_hf import DreamLLMConfig
    from dreamllm_hf.conversion.original_layout import KNOWN_DIFFUSION_IDS

    DreamLLMConfig().save_pretrained(folder / "mllm")
    for name in ("unet", "vae", "scheduler"):
        shutil.copytree(KNOWN_DIFFUSION_IDS["stabilityai/stable-diffusion-2-1-base"] / name, folder / name)
    return folder


def test_model_card_facts_come_from_the_configuration(converted_tiny, tmp_path):
    """The card of the tiny fixture describes the tiny model; the same code on the 7B configs describes the 7B."""
    from dreamllm_hf.model_card import model_facts

    info = json.loads((converted_tiny / "conversion.json").read_text())
    tiny = build_model_card(ConvertedFolder(info, repo_id="someone/tiny")).text
    for needle in (
        "| language model | LLaMA 2 layers x 64 (4 heads, MLP 128), vocabulary 1008 |",
        "| vision tower | CLIP ViT 3 layers x 32 on 28 px, patch 14 (4 image tokens, layer -2 read) |",
        "| dream queries | 4, conditioning 4 x 16 |",
        "| pictures | 16x16: the UNet's sample size 8 x the VAE's factor 2 |",
        "Pictures are 16x16 by default",
        "4 learned *dream queries*",
        "(bos 1, eos 2, pad 1000)",
        'AutoProcessor.from_pretrained("someone/tiny", subfolder="mllm")',
    ):
        assert needle in tiny, needle
    for claim in ("7B", "ViT-L/14", "512x512", "2.1-base", "256 tokens", "6 GB"):
        assert claim not in tiny.split("## Limitations")[0], claim

    facts = model_facts(_release_shaped_folder(tmp_path / "release"))
    release = build_model_card(ConvertedFolder({**info, "config": facts}, repo_id="someone/dreamllm-7b")).text
    for needle in (
        "| language model | LLaMA 32 layers x 4096 (32 heads, MLP 11008), vocabulary 32008 |",
        "| vision tower | CLIP ViT 24 layers x 1024 on 224 px, patch 14 (256 image tokens, layer -2 read) |",
        "| dream queries | 64, conditioning 64 x 1024 |",
        "| pictures | 512x512: the UNet's sample size 64 x the VAE's factor 8 |",
        "(bos 1, eos 2, pad 32000)",
    ):
        assert needle in release, needle


# ----------------------------------------------------------------------------------------------------------------------
# uploads


def test_push_uploads_one_commit(fake_hub, converted_tiny, tmp_path):
    folder = shutil.copytree(converted_tiny, tmp_path / "converted")
    before = local_files(folder)
    argv = [
        "push",
        str(folder),
        "tester/dreamllm-tiny",
        "--private",
        "--revision",
        "dev",
        "--commit-message",
        "Add weights",
        "--card-field",
        "license=apache-2.0",
    ]
    assert main(argv) == 0
    assert local_files(folder) == before  # the folder is not modified

    paths = [(r["method"], r["path"]) for r in fake_hub.requests]
    assert ("POST", "/api/repos/create") in paths and ("POST", "/api/models/tester/dreamllm-tiny/branch/dev") in paths
    assert ("POST", "/api/validate-yaml") in paths  # README metadata checked before the commit
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in fake_hub.requests)
    create = json.loads(next(r["body"] for r in fake_hub.requests if r["path"] == "/api/repos/create"))
    assert (
        create["name"] == "dreamllm-tiny" and create["organization"] == "tester" and create["visibility"] == "private"
    )

    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    assert commit["revision"] == "dev" and commit["header"]["summary"] == "Add weights"
    uploaded = commit["files"]
    assert set(uploaded) == set(before)
    assert {
        "model_index.json",
        "mllm/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "processor/tokenizer.json",
        "scheduler/scheduler_config.json",
        "conversion.json",
    } <= set(uploaded)
    assert all(uploaded[name] == before[name] for name in before if name != "README.md")
    readme = ModelCard(uploaded["README.md"].decode())  # rendered again for the repository
    assert readme.data.license == "apache-2.0" and '"tester/dreamllm-tiny"' in readme.text
    assert fake_hub.repos["tester/dreamllm-tiny"]["private"] is True
    assert set(fake_hub.repos["tester/dreamllm-tiny"]["branches"]["dev"]) == set(before)


def test_push_to_existing_repo_keeps_card_when_asked(fake_hub, converted_tiny):
    info = push_to_hub(converted_tiny, "tester/again", update_card=True)
    assert info.oid == "1".rjust(40, "0")
    info = push_to_hub(converted_tiny, "tester/again", update_card=False)  # the repo exists: 409 is fine
    assert len(fake_hub.commits) == 2 and fake_hub.commits[1]["revision"] == "main"
    assert fake_hub.commits[1]["files"]["README.md"] == (converted_tiny / "README.md").read_bytes()


def test_convert_then_push_after_verification(fake_hub, tmp_path, capsys):
    output = tmp_path / "out"
    argv = [
        "convert",
        "--original",
        str(FIXTURE),
        "--output",
        str(output),
        "--verify",
        "--no-progress",
        "--push-to-hub",
        "tester/dreamllm-tiny-hf",
        "--commit-message",
        "Convert",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "verification PASSED" in printed and "Uploaded to tester/dreamllm-tiny-hf" in printed
    assert fake_hub.requests[0]["path"] == "/api/whoami-v2"  # the token is checked before converting
    (commit,) = fake_hub.commits
    assert commit["header"]["summary"] == "Convert" and set(commit["files"]) == set(local_files(output))
    card = ModelCard(commit["files"]["README.md"].decode())
    assert "| logits, image + text sequence |" in card.text and "| pass |" in card.text
    assert json.loads(commit["files"]["conversion.json"])["verification"]["passed"] is True


def test_nothing_is_uploaded_when_verification_fails(fake_hub, tmp_path, monkeypatch, capsys):
    from dreamllm_hf.conversion import verify

    def failing(*args, **kwargs):
        return VerificationReport(checks=[ParityCheck("logits", [1], 3.0, 1.0, 1e-4)])

    monkeypatch.setattr(verify, "verify_conversion", failing)
    output = tmp_path / "out"
    argv = [
        "convert",
        "--original",
        str(FIXTURE),
        "--output",
        str(output),
        "--verify",
        "--no-progress",
        "--push-to-hub",
        "tester/never",
    ]
    assert main(argv) == 1
    assert "does not match the original" in capsys.readouterr().err
    assert not output.exists() and not list(tmp_path.glob(".out.*"))
    assert [r["path"] for r in fake_hub.requests] == ["/api/whoami-v2"]  # no repo, no upload
    assert fake_hub.commits == [] and fake_hub.repos == {}


def test_push_refuses_without_token_or_offline(fake_hub, converted_tiny, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubPushError, match="No Hugging Face token"):
        push_to_hub(converted_tiny, "tester/x")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert (
        main(["convert", "--original", str(FIXTURE), "--output", str(tmp_path / "out"), "--push-to-hub", "tester/x"])
        == 1
    )
    assert not (tmp_path / "out").exists()  # refused before converting
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE"):
        push_to_hub(converted_tiny, "tester/x")
    with pytest.raises(HubPushError, match="not a converted DreamLLM folder"):
        push_to_hub(tmp_path, "tester/x")
    assert fake_hub.commits == [] and fake_hub.repos == {}


def test_refused_commit_is_reported(fake_hub, converted_tiny, capsys):
    fake_hub.refuse_commits = True
    assert main(["push", str(converted_tiny), "tester/refused"]) == 1
    assert "nothing was committed" in capsys.readouterr().err
    assert fake_hub.commits == [] and fake_hub.repos["tester/refused"]["branches"]["main"] == {}


def test_demo_card_goes_through_the_one_generator(tmp_path):
    """The shipped demo card is what `write_demo_model_card` writes (through the one `build_model_card`), byte for
    byte: without an evaluation, all but the evaluation's section; with the figures the shipped card states, all of
    it."""
    import re

    from dreamllm_hf.shapes_world.demo_model_path import DEMO_MODEL_PATH
    from dreamllm_hf.shapes_world.demo_training import write_demo_model_card

    folder = shutil.copytree(DEMO_MODEL_PATH, tmp_path / "demo", ignore=shutil.ignore_patterns("README.md"))
    path = write_demo_model_card(folder)  # the training report only: no evaluation figures
    card = ModelCard.load(path)
    assert card.data.license == "apache-2.0" and card.data.library_name == "diffusers"
    assert {"dreamllm", "shapes-world"} <= set(card.data.tags)
    written, shipped = path.read_text(), (DEMO_MODEL_PATH / "README.md").read_text()
    assert "Not measured yet" in written and "| `caption_accuracy` | 0.979 |" in shipped

    def without_evaluation(text: str) -> str:
        return re.sub(r"## Evaluation .*?## Components", "## Components", text, flags=re.S)

    assert without_evaluation(written) == without_evaluation(shipped)
    # Facts from the folder's configs, not from a template.
    for needle in (
        "LLaMA 4 layers x 128 (4 heads, MLP 256), vocabulary 520",
        "CLIP ViT 3 layers x 64 on 32 px, patch 4 (64 image tokens, layer -2 read)",
        "`UNet2DConditionModel` on 4x8x8 latents, blocks (32, 64)",
        "`DDIMScheduler` (trailing timesteps) on the training schedule: 1000 steps, `squaredcos_cap_v2`, v-prediction",
    ):
        assert needle in written, needle

    # With the figures the shipped card states, the evaluation's section is the shipped one too.
    def number(pattern: str) -> str:
        return re.search(pattern, shipped).group(1)

    evaluation = {
        key: float(number(rf"\| `{key}` \| ([0-9.]+) \|"))
        for key in ("caption_accuracy", "t2i_accuracy", "interleaved_match", "chat_caption_accuracy")
    }
    evaluation["interleaved_pictures"] = int(number(r"\| (\d+) pictures in \d+ sampled stories"))
    evaluation["settings"] = {
        "num_caption_pictures": int(number(r"\| (\d+) held-out pictures, greedy")),
        "t2i_per_caption": int(number(r"12 captions x (\d+) seeds")),
        "num_stories": int(number(r"pictures in (\d+) sampled stories")),
        "num_inference_steps": int(number(r"Settings: (\d+) DDIM steps")),
        "guidance_scale": float(number(r"guidance scale ([0-9.]+), seed")),
        "seed": int(number(r"guidance scale [0-9.]+, seed (\d+)\.")),
    }
    assert write_demo_model_card(folder, evaluation=evaluation).read_text() == shipped
