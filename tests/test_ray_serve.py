"""The API on Ray Serve (`dreamllm_hf.serve.ray_deployment`): two CPU replicas of the shipped demo model behind one
HTTP address, deployed as `dreamllm-hf serve --api --ray` deploys them and driven by the official `openai` client.
Both replicas answer; a replica killed with SIGKILL while documents stream fails only its own requests, Ray brings it
back and the deployment keeps answering. One local Ray for the module (about a minute); `serve_config.yaml`'s builder
and the command's options are checked without it."""

import importlib
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest


ray = pytest.importorskip("ray", reason="Ray Serve is the `serve` extra: pip install 'dreamllm-hf[serve]'")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

import yaml  # noqa: E402 (a dependency of Ray)
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from dreamllm_hf.cli import build_parser  # noqa: E402
from dreamllm_hf.serve import cli as serve_cli  # noqa: E402
from dreamllm_hf.serve.ray_deployment import (  # noqa: E402
    REPLICA_ID_HEADER,
    REPLICA_PID_HEADER,
    DreamLLMDeployment,
    serve_on_ray,
)
from dreamllm_hf.shapes_world.demo_model_path import DEMO_MODEL_PATH  # noqa: E402


SERVE_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "serve" / "serve_config.yaml"
STORY = [{"role": "user", "content": "Tell me a story."}]
TEXT_ONLY = {"modalities": ["text"]}  # documents without pictures: their content is a plain string
REQUEST_TIMEOUT_S = 60  # one request, on a machine shared with other work
DEPLOY_TIMEOUT_S = 240  # Ray, its controller and proxy, two replicas importing torch and loading the model
RECOVERY_TIMEOUT_S = 150  # Ray notices the dead replica (its health check runs every 10 s) and loads a new one


def config_application() -> dict:
    """The application of the shipped Serve config, as Ray reads it."""
    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    (application,) = config.applications
    return application.model_dump()


def build_from_config(**overrides):
    """What `serve run examples/serve/serve_config.yaml` deploys: the config's builder called on its `args`."""
    application = config_application()
    module, attribute = application["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attribute)
    return builder({**application["args"], **overrides})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def base_url():
    """Two CPU replicas behind http://127.0.0.1:PORT/v1 on a local Ray of 2 CPUs; Serve and Ray shut down after the
    module, also when a test or the deployment fails."""
    # Read when Ray starts, and inherited by its processes: no usage reports, and no API key from the environment
    # (the replicas would read it as `serve --api` does).
    saved = {name: os.environ.pop(name, None) for name in ("RAY_USAGE_STATS_ENABLED", "DREAMLLM_API_KEY")}
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    port = free_port()
    # address="local": a Ray of our own, never a cluster that something else on the machine started.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        # What `dreamllm-hf serve --api --ray --replicas 2 --gpus-per-replica 0` runs, on the Ray started above.
        # It waits for the replicas without a deadline (a replica that cannot start is retried): wait for it in a
        # thread, so that a stuck deployment fails the module instead of hanging it.
        failure = []
        deploy = dict(host="127.0.0.1", port=port, replicas=2, gpus_per_replica=0, blocking=False)
        deploying = threading.Thread(
            target=lambda: _record_failure(failure, serve_on_ray, DEMO_MODEL_PATH, **deploy), daemon=True
        )
        deploying.start()
        deploying.join(DEPLOY_TIMEOUT_S)
        assert not deploying.is_alive(), f"the two replicas were not ready after {DEPLOY_TIMEOUT_S} s"
        assert not failure, f"the deployment failed: {failure[0]!r}"
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for name, value in saved.items():
                os.environ.pop(name, None)
                if value is not None:
                    os.environ[name] = value


def _record_failure(failure: list, function, *args, **kwargs):
    try:
        function(*args, **kwargs)
    except BaseException as error:  # handed to the test's thread, which reports it
        failure.append(error)


@pytest.fixture(scope="module")
def client(base_url):
    # No retries: a request that a dead replica fails must show as failed, not be sent again.
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)


@pytest.fixture(scope="module")
def model(client) -> str:
    """The served model's name, as `GET /v1/models` lists it."""
    (card,) = client.models.list().data
    return card.id


def ask(client, model: str, seed: int, max_tokens: int = 16):
    """One document, and the replica that wrote it: the pid of its process and Ray's id for it."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=STORY, max_tokens=max_tokens, seed=seed, extra_body=TEXT_ONLY
    )
    return int(raw.headers[REPLICA_PID_HEADER]), (raw.headers[REPLICA_ID_HEADER], raw.parse())


def ask_until_both_answer(client, model: str, seeds, tries: int = 30) -> dict:
    """{pid: (replica id, completion)} of the replicas that answered the same requests (`seeds`, sent together),
    sent again until two replicas have answered. Every request must be answered."""
    from concurrent.futures import ThreadPoolExecutor

    answers = {}
    with ThreadPoolExecutor(len(seeds)) as pool:
        for _ in range(tries):
            futures = [pool.submit(ask, client, model, seed) for seed in seeds]
            # Each request has the client's timeout, so this returns or raises; `result` re-raises a request's error.
            answers.update(future.result(timeout=REQUEST_TIMEOUT_S + 5) for future in futures)
            if len(answers) >= 2:
                return answers
    raise AssertionError(f"{tries} rounds of {len(seeds)} requests were all answered by one replica: {set(answers)}")


def is_replica_process(pid: int) -> bool:
    """Whether `pid` is a live Ray Serve replica actor on this machine (Ray titles them `ray::ServeReplica:...`)."""
    try:
        return b"ServeReplica" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False


class Stream(threading.Thread):
    """One streamed document read in a thread: the replica that took it (known from the headers, which come before
    the first token), its text and finish reason, or the error that ended it."""

    def __init__(self, client, model: str, seed: int):
        super().__init__(daemon=True)
        self.client, self.model, self.seed = client, model, seed
        self.pid, self.text, self.finish_reason, self.error = None, "", None, None
        self.started = threading.Event()

    def run(self):
        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model=self.model,
                messages=STORY,
                max_tokens=400,
                seed=self.seed,
                stream=True,
                extra_body=TEXT_ONLY,
            )
            self.pid = int(raw.headers[REPLICA_PID_HEADER])
            self.started.set()
            for chunk in raw.parse():
                for choice in chunk.choices:
                    self.text += choice.delta.content or ""
                    self.finish_reason = choice.finish_reason or self.finish_reason
        except Exception as error:  # what a client sees when the replica dies under it
            self.error = error
        finally:
            self.started.set()


def test_shipped_config_builds_the_deployment():
    """The config's builder turns its `args` (numbers from YAML, or strings as `serve run key=value` passes them)
    into the deployment Ray runs, and names the argument it refuses."""
    deployment = build_from_config(replicas="3", gpus_per_replica=0.5, cpus_per_replica=2)._bound_deployment
    assert deployment.name == "DreamLLM"
    assert deployment.num_replicas == 3
    assert deployment.ray_actor_options["num_gpus"] == 0.5
    assert deployment.ray_actor_options["num_cpus"] == 2
    with pytest.raises(ValueError, match="`replicas` must be a positive integer, got '0'"):
        build_from_config(replicas="0")
    with pytest.raises(ValueError, match=r"gpus_per_replica.*\[0, 1\]"):
        build_from_config(gpus_per_replica=2)
    with pytest.raises(ValueError, match="unknown application arguments \\['replica'\\]"):
        build_from_config(replica=2)
    with pytest.raises(ValueError, match="has no model_index.json"):
        build_from_config(model=str(SERVE_CONFIG.parent))


def test_serve_ray_options(monkeypatch):
    """`serve --api --ray`'s options reach the deployment; they are refused without `--ray` (or `--api`) and out of
    range, with argparse's one-line error."""
    args = build_parser().parse_args(["serve", "--api", "--ray", "--replicas", "3", "--gpus-per-replica", "0.5"])
    deployed = {}
    monkeypatch.setattr(
        "dreamllm_hf.serve.ray_deployment.serve_on_ray", lambda model, **options: deployed.update(options)
    )
    assert serve_cli.run_serve(args) == 0
    assert (deployed["replicas"], deployed["gpus_per_replica"], deployed["port"]) == (3, 0.5, 8000)
    assert deployed["max_queue"] == args.max_queue and deployed["host"] == "127.0.0.1"
    for argv in (["--api", "--replicas", "2"], ["--ray"], ["--api", "--ray", "--gpus-per-replica", "2"]):
        with pytest.raises(SystemExit) as raised:
            serve_cli.run_serve(build_parser().parse_args(["serve", *argv]))
        assert raised.value.code == 2, argv


def test_a_replica_whose_model_thread_stopped_fails_its_health_check():
    """Ray replaces a replica whose `check_health` raises: one whose process lives on but whose model thread
    stopped."""

    check_health = DreamLLMDeployment.func_or_class.check_health  # the method of the class Ray runs, without Ray
    engine = SimpleNamespace(is_running=True)
    replica = SimpleNamespace(_app=SimpleNamespace(state=SimpleNamespace(engine=engine)))
    check_health(replica)
    engine.is_running = False
    with pytest.raises(RuntimeError, match="model thread has stopped"):
        check_health(replica)


def test_two_replicas_answer_the_same_requests_alike(client, model):
    """Both replicas answer behind the one address, each in a process of its own, and the same seeded request gets
    the same document from either (each replica loads the same model and serves the same app)."""
    answers = ask_until_both_answer(client, model, seeds=[7, 7, 7, 7])
    assert len(answers) == 2 and os.getpid() not in answers
    assert all(is_replica_process(pid) for pid in answers)
    assert len({replica_id for replica_id, _ in answers.values()}) == 2
    texts = {completion.choices[0].message.content for _, completion in answers.values()}
    assert len(texts) == 1 and texts != {""}, texts


def test_a_killed_replica_fails_only_its_requests_and_comes_back(client, model):
    # Documents of 400 tokens stream six at a time until both replicas have started on some (Ray spreads them).
    streams, deadline = [], time.monotonic() + REQUEST_TIMEOUT_S
    while len({stream.pid for stream in streams} - {None}) < 2:
        assert time.monotonic() < deadline, "the streams did not reach two replicas"
        if all(stream.started.is_set() for stream in streams):
            assert len(streams) < 24, "24 streams all went to one replica"
            wave = [Stream(client, model, seed) for seed in range(len(streams), len(streams) + 6)]
            for stream in wave:
                stream.start()
            streams += wave
        time.sleep(0.01)
    victim = next(stream.pid for stream in streams if stream.pid is not None)
    survivor = next(stream.pid for stream in streams if stream.pid not in (None, victim))
    os.kill(victim, signal.SIGKILL)
    for stream in streams:
        stream.join(REQUEST_TIMEOUT_S + 5)
    assert not any(stream.is_alive() for stream in streams), "a stream hung after the kill"

    # The survivor's documents are written to the end, as if nothing had happened.
    survived = [stream for stream in streams if stream.pid == survivor]
    assert survived
    for stream in survived:
        assert stream.error is None, repr(stream.error)
        assert stream.finish_reason is not None and stream.text
        alone = ask(client, model, stream.seed, max_tokens=400)[1][1]
        assert stream.text == alone.choices[0].message.content
    # The killed replica's documents were cut off: the client is told, it is not left waiting.
    killed = [stream for stream in streams if stream.pid in (victim, None)]
    assert any(isinstance(stream.error, openai.APIError) for stream in killed), [repr(s.error) for s in killed]

    # Ray starts a new replica: a new process answers, beside the survivor.
    deadline, pids = time.monotonic() + RECOVERY_TIMEOUT_S, set()
    while not pids - {victim, survivor}:
        assert time.monotonic() < deadline, f"no new replica answered within {RECOVERY_TIMEOUT_S} s: {pids}"
        try:
            pids.add(ask(client, model, seed=1, max_tokens=4)[0])
        except openai.APIError:  # a request routed to the dead replica before Ray knew
            pass
        time.sleep(0.5)
    assert not is_replica_process(victim)

    # Later requests are all answered, by both replicas again.
    answers = ask_until_both_answer(client, model, seeds=[3, 3, 3, 3])
    assert victim not in answers and all(is_replica_process(pid) for pid in answers)
