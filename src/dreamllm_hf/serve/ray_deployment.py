"""The OpenAI-compatible API as a Ray Serve deployment: replicas on the GPUs of one machine or of a Ray cluster.

Each replica is a Ray actor that loads the pipeline from a model folder and serves the same FastAPI app as
`dreamllm-hf serve --api` on that folder ([`build_api_app`], with the same defaults and model name) with its own
scheduler, so documents that reach one replica are batched together there. Ray's HTTP proxy routes the requests among
the replicas, and the Serve controller starts a new replica when one dies. Three ways in:

- `dreamllm-hf serve --api --ray --replicas N --gpus-per-replica G` ([`serve_on_ray`]);
- `serve run serve_config.yaml` / `serve deploy serve_config.yaml`, or `serve run
  dreamllm_hf.serve.ray_deployment:build_application replicas=2` ([`build_application`], Ray's application builder);
- from Python: `serve.run(bind_deployment(model_dir, replicas=2))`.

Ray Serve is an optional extra (`pip install 'dreamllm-hf[serve]'`); only this module imports it.
"""

import argparse
import os
from pathlib import Path
from typing import Any

from ray import serve

from .. import checks
from .engine import DEFAULT_MAX_QUEUE


# Every answer says which replica wrote it: Ray's id for the replica (unique within the deployment) and the process id
# of its actor. A client, a load test or an operator can then tell the replicas apart behind the one address.
REPLICA_ID_HEADER = "x-dreamllm-replica"
REPLICA_PID_HEADER = "x-dreamllm-replica-pid"

DEPLOYMENT_NAME = "DreamLLM"
APPLICATION_NAME = "dreamllm"

# The CPUs a replica reserves when not told: its work is on its GPU, or, on a CPU, in torch's threads (Ray sets as many
# as the replica's CPUs); one CPU keeps a replica from being refused a node for want of CPUs.
DEFAULT_CPUS_PER_REPLICA = 1.0

# The options of `dreamllm-hf serve --api` a deployment passes to its replicas (their defaults are the command's).
API_OPTIONS = ("api_key", "max_queue", "max_request_mb")

# The numbers a deployment takes, each with its range (`max_queue` and `max_request_mb` as the command line reads them).
NUMBER_ARGUMENTS = {
    "replicas": checks.POSITIVE_INT,
    "gpus_per_replica": checks.GPUS_PER_REPLICA,
    "cpus_per_replica": checks.POSITIVE_NUMBER,
    "max_queue": checks.POSITIVE_INT,
    "max_request_mb": checks.POSITIVE_NUMBER,
}


class ReplicaHeadersMiddleware:
    """Adds the replica's headers to every HTTP answer. Plain ASGI rather than Starlette's `BaseHTTPMiddleware`, so
    that a streamed answer goes out chunk by chunk and a client's disconnect still reaches the app."""

    def __init__(self, app, replica_id: str, pid: int):
        self.app = app
        self.headers = [
            (REPLICA_ID_HEADER.encode(), replica_id.encode("latin-1")),
            (REPLICA_PID_HEADER.encode(), str(pid).encode()),
        ]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class DreamLLMDeployment:
    """
    One replica: the API of `dreamllm-hf serve --api --model MODEL_DIR`, its pipeline on `device`.

    The app is built in the replica (Ray's late-bound ingress, `__serve_build_asgi_app__`), not pickled by the driver:
    it holds the replica's pipeline and scheduler, which exist only once the replica has loaded the model.

    Args:
        model_dir (`str`): a pipeline folder (`model_index.json`), at the same path on every node that runs a replica.
        device (`str`, *optional*): `cuda`, `cpu`, ... (default: `cuda` where Ray gave the replica a GPU, else `cpu`).
        api_options (`dict`, *optional*): `serve --api`'s `api_key`, `max_queue`, `max_request_mb` (default: the
            command's defaults; the key, as for the command, from `$DREAMLLM_API_KEY` in the replica's environment).
    """

    def __init__(self, model_dir: str, device: str | None = None, api_options: dict | None = None):
        if device is None:
            # A replica without a GPU of its own may still see the node's GPUs (Ray leaves CUDA_VISIBLE_DEVICES alone
            # for it): ask Ray what it was given rather than torch what exists.
            import ray

            device = "cuda" if ray.get_gpu_ids() else "cpu"
        self._arguments = _serve_api_arguments(model_dir, device, api_options or {})
        self._app = None

    def __serve_build_asgi_app__(self):
        from .cli import build_api

        self._app = build_api(self._arguments)  # loads the pipeline
        replica_id = serve.get_replica_context().replica_id.unique_id
        self._app.add_middleware(ReplicaHeadersMiddleware, replica_id=replica_id, pid=os.getpid())
        return self._app

    def check_health(self):
        """Ray calls this every `health_check_period_s` (10 s) and replaces the replica when it raises. A live process
        is not enough: its model thread may have stopped (a CUDA error, say) while the app answers only 503s."""
        engine = getattr(self._app.state, "engine", None) if self._app is not None else None
        if engine is not None and not engine.is_running:
            raise RuntimeError("the replica's model thread has stopped; Ray replaces the replica")


def _serve_api_arguments(model_dir: str, device: str, api_options: dict) -> argparse.Namespace:
    """`dreamllm-hf serve --api`'s options for a replica, read by the command's own parser: the replica then serves
    what the command serves on the same folder, every option it is not given at the command's default."""
    from .cli import add_serve_parser

    parser = argparse.ArgumentParser(prog="dreamllm-hf")
    add_serve_parser(parser.add_subparsers())
    argv = ["serve", "--api", "--model", str(model_dir), "--device", device]
    for name, value in api_options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


def bind_deployment(
    model_dir: str | os.PathLike | None = None,
    *,
    replicas: int = 1,
    gpus_per_replica: float | None = None,
    cpus_per_replica: float = DEFAULT_CPUS_PER_REPLICA,
    device: str | None = None,
    **api_options,
) -> serve.Application:
    """
    The deployment, its replicas and resources set, bound to a model folder: what `serve.run` takes.

    Args:
        model_dir (`str` or `os.PathLike`, *optional*): a pipeline folder (default: the shipped demo model).
        replicas (`int`, defaults to 1): how many replicas Ray keeps running (each loads the whole pipeline).
        gpus_per_replica (`float`, *optional*): GPUs Ray reserves for each replica, in [0, 1] (0.5: two replicas share
            a GPU; 0: the replica runs on the CPU). Default: 1 where the Ray cluster (or, before `ray.init`, this
            machine) has a GPU, else 0.
        cpus_per_replica (`float`, defaults to 1): CPUs Ray reserves for each replica (on a CPU, torch's threads).
        device (`str`, *optional*): the replicas' torch device (default: `cuda` with a GPU, else `cpu`).
        **api_options: `serve --api`'s options (`api_key`, `max_queue`, `max_request_mb`); `None` or left out: the
            command's default.
    """
    unknown = sorted(set(api_options) - set(API_OPTIONS))
    if unknown:
        raise TypeError(f"bind_deployment() got unknown options {unknown}; the API's options are {list(API_OPTIONS)}.")
    given = dict(api_options, replicas=replicas, gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica)
    for name, value in given.items():
        if name in NUMBER_ARGUMENTS:
            NUMBER_ARGUMENTS[name].check(name, value, optional=name not in ("replicas", "cpus_per_replica"))
    model_dir = _checked_model_dir(model_dir)
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if _gpus_available() else 0.0
    if gpus_per_replica == 0 and device is None:
        device = "cpu"
    options = {name: value for name, value in api_options.items() if value is not None}
    # Ray lets a replica hold only `max_ongoing_requests` requests (5 by default) and queues the rest in front of it.
    # The scheduler batches every document it holds, so let it hold as many as its own queue admits.
    max_ongoing = options.get("max_queue", DEFAULT_MAX_QUEUE)
    deployment = DreamLLMDeployment.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        max_ongoing_requests=max_ongoing,
    )
    return deployment.bind(str(model_dir), device, options)


def build_application(args: dict[str, Any]) -> serve.Application:
    """
    Ray Serve's application builder: `serve run dreamllm_hf.serve.ray_deployment:build_application replicas=2`, or
    the `import_path` of a Serve config file (`serve_config.yaml`), whose `args` it receives.

    `args` holds `bind_deployment`'s arguments under the same names (`model` for the folder); values may be strings
    (as `serve run key=value` passes them) or numbers (as YAML does).
    """
    known = ("model", "replicas", "gpus_per_replica", "cpus_per_replica", "device", *API_OPTIONS)
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ValueError(f"unknown application arguments {unknown}; the arguments are {list(known)}.")
    values = {}
    for name, value in args.items():
        if name in NUMBER_ARGUMENTS and isinstance(value, str):
            try:
                value = NUMBER_ARGUMENTS[name].parse(value)
            except argparse.ArgumentTypeError as error:  # "must be a positive integer, got '0'"
                raise ValueError(f"application argument `{name}` {error}") from None
        values[name] = value
    return bind_deployment(values.pop("model", None), **values)


def serve_on_ray(
    model_dir: str | os.PathLike | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    gpus_per_replica: float | None = None,
    blocking: bool = True,
    **options,
):
    """
    `dreamllm-hf serve --api --ray`: joins the Ray cluster at `RAY_ADDRESS` (or the one `ray start` began on this
    machine; else starts a local Ray), runs the deployment on `host:port` and, with `blocking=True`, serves until
    interrupted, then removes it. `options` are `bind_deployment`'s. With `blocking=False` it returns the ingress
    `DeploymentHandle` and leaves Ray running (stop it with `serve.shutdown()` and `ray.shutdown()`).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # before Ray starts: no usage reports
    model_dir = _checked_model_dir(model_dir)  # before Ray starts, which takes a while
    if not ray.is_initialized():
        ray.init()
    application = bind_deployment(model_dir, replicas=replicas, gpus_per_replica=gpus_per_replica, **options)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(application, name=APPLICATION_NAME, route_prefix="/")
    if not blocking:
        return handle
    print(f"DreamLLM on Ray Serve: http://{host}:{port}/v1 ({replicas} replica{'s' * (replicas != 1)})", flush=True)
    try:
        _wait_for_interrupt()
    finally:
        serve.delete(APPLICATION_NAME)
    return handle


def _checked_model_dir(model_dir: str | os.PathLike | None) -> Path:
    from ..shapes_world.demo_model_path import DEMO_MODEL_PATH

    model_dir = Path(model_dir or DEMO_MODEL_PATH).resolve()
    if not (model_dir / "model_index.json").is_file():
        raise ValueError(
            f"{model_dir} has no model_index.json; give a folder written by `dreamllm-hf convert`, "
            "`dreamllm-hf train-demo` or `DreamLLMPipeline.save_pretrained` (at the same path on every node)."
        )
    return model_dir


def _wait_for_interrupt():
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def _gpus_available() -> bool:
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()


__all__ = [
    "REPLICA_ID_HEADER",
    "REPLICA_PID_HEADER",
    "DreamLLMDeployment",
    "ReplicaHeadersMiddleware",
    "bind_deployment",
    "build_application",
    "serve_on_ray",
]
