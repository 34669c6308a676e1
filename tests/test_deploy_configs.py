"""The configs in deploy/ and the walkthrough in docs/deploy.md: they parse, name the real builder with
arguments it accepts, target resources the cluster configs offer, and serve.yaml runs under `serve run`."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from moeshard.actors.pool.expert_pool import make_placement
from moeshard.cluster.cli.main import build_parser
from moeshard.cluster.model.config import ModelConfig
from moeshard.deploy.app import ServingCoordinator, build_app
from moeshard.deploy.config import ServeArgs

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DOCS = REPO / "docs" / "deploy.md"


# -- loading ----------------------------------------------------------------------------------------
def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _doc_blocks(lang: str) -> list[str]:
    """The fenced code blocks of docs/deploy.md in ``lang``, dedented (list items indent theirs)."""
    pattern = re.compile(r"^([ \t]*)```(\w*)\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
    return [textwrap.dedent(m.group(3)) for m in pattern.finditer(DOCS.read_text()) if m.group(2) == lang]


def _serve_configs() -> dict[str, dict]:
    """Every full Serve config: deploy/serve.yaml, the RayService's serveConfigV2, the docs' examples."""
    configs = {"serve.yaml": _load("serve.yaml")}
    configs["rayservice.yaml:serveConfigV2"] = yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])
    docs = [yaml.safe_load(b) for b in _doc_blocks("yaml")]
    configs.update({f"docs/deploy.md:{i}": c for i, c in enumerate(docs) if "applications" in c})
    return configs


def _doc_args_fragments() -> list[dict]:
    """The docs' yaml snippets of application args (not whole configs)."""
    docs = [yaml.safe_load(b) for b in _doc_blocks("yaml")]
    return [c for c in docs if "applications" not in c]


def _kuberay_resources(group: dict) -> dict:
    """A KubeRay group's custom resources: rayStartParams.resources is a JSON object quoted as a string."""
    raw = group.get("rayStartParams", {}).get("resources")
    if raw is None:
        return {}
    value = json.loads(raw)
    return json.loads(value) if isinstance(value, str) else value


def _app_targets(app: dict) -> tuple[set[str], set[str]]:
    """Custom resources an app's expert actors and its coordinator (the Serve replica) ask for."""
    cluster = app["args"].get("engine", {}).get("cluster", {})
    experts = {key for entry in cluster.get("actor_resources") or [] for key in entry if not key.startswith("node:")}
    coordinator = {
        key for d in app.get("deployments", []) for key in (d.get("ray_actor_options") or {}).get("resources", {})
    }
    return experts, coordinator


CONFIGS = _serve_configs()
APPS = [(name, app) for name, config in CONFIGS.items() for app in config["applications"]]


# -- every file parses --------------------------------------------------------------------------------
def test_every_deploy_yaml_parses():
    names = sorted(p.name for p in DEPLOY.glob("*.yaml"))
    assert {"serve.yaml", "cluster.yaml", "rayservice.yaml"} <= set(names)
    for name in names:
        assert isinstance(_load(name), dict), name


def test_docs_have_serve_configs():
    assert any(name.startswith("docs/") for name in CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_serve_config_matches_ray_serve_schema(name):
    ServeDeploySchema.model_validate(CONFIGS[name])


# -- applications: the builder exists and accepts the args ----------------------------------------------
@pytest.mark.parametrize("name,app", APPS, ids=[name for name, _ in APPS])
def test_import_path_is_the_builder(name, app):
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder)
    assert builder is build_app


@pytest.mark.parametrize("name,app", APPS, ids=[name for name, _ in APPS])
def test_args_validate_and_build(name, app, tiny_mixtral_dir):
    args = {**app["args"], "model_dir": str(tiny_mixtral_dir)}
    validated = ServeArgs(**args)
    config = validated.engine_config()  # EngineConfig and ClusterConfig, as the replica builds them
    if config.cluster.expert_actors:
        placement = make_placement(config, ModelConfig.from_model_dir(tiny_mixtral_dir))
        assert placement.num_actors == config.cluster.expert_actors
    assert isinstance(build_app(args), serve.Application)
    for deployment in app.get("deployments", []):
        assert deployment["name"] == ServingCoordinator.name
        assert deployment.get("num_replicas", validated.coordinators) == validated.coordinators  # one setting, not two


@pytest.mark.parametrize("fragment", _doc_args_fragments())
def test_docs_args_fragments_validate(fragment, tiny_mixtral_dir):
    config = ServeArgs(model_dir=str(tiny_mixtral_dir), **fragment).engine_config()
    placement = make_placement(config, ModelConfig.from_model_dir(tiny_mixtral_dir))
    assert placement.num_actors == config.cluster.expert_actors


def test_docs_moeshard_serve_commands_parse():
    commands = [c for c in re.findall(r"moeshard serve [^'\n`]*", DOCS.read_text()) if "--help" not in c]
    assert commands
    for command in commands:
        argv = shlex.split(command)[1:]
        args = build_parser().parse_args(argv)  # exits on a flag that does not exist
        assert args.command == "serve", command


# -- the cluster launcher config ---------------------------------------------------------------------------
def test_cluster_launcher_config():
    config = _load("cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in config, key
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers and all(t["node_config"].get("InstanceType") for t in types.values())
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= config["max_workers"]
    # The synced checkout is installed on every node.
    remote = [r for r, local in config["file_mounts"].items() if local == "."]
    assert remote and any(f"pip install {remote[0]}" in c for c in config["setup_commands"])


def test_cluster_launcher_config_passes_ray_validation():
    import jsonschema
    import ray.autoscaler

    config = _load("cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    try:  # what `ray up` runs before launching anything (a private module: may move between Ray versions)
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        return
    validate_config(prepare_config(config))


def test_cluster_launcher_offers_what_the_apps_target():
    config = _load("cluster.yaml")
    types = config["available_node_types"]
    head = set(types[config["head_node_type"]]["resources"])
    workers = {key for name, t in types.items() if name != config["head_node_type"] for key in t["resources"]}
    docs_apps = [app for name, app in APPS if name.startswith("docs/")]
    for app in docs_apps:
        experts, coordinator = _app_targets(app)
        assert experts <= workers, experts
        assert coordinator <= head, coordinator
    for key in _docs_ray_start_resources():
        assert key in head | workers, key


def _docs_ray_start_resources() -> set[str]:
    found = re.findall(r"--resources '(\{.*?\})'", DOCS.read_text())
    assert found
    return {key for raw in found for key in json.loads(raw)}


# -- the KubeRay RayService ----------------------------------------------------------------------------------
def _gpu_limits(group: dict) -> list:
    limits = [c.get("resources", {}).get("limits", {}) for c in group["template"]["spec"]["containers"]]
    return [lim["nvidia.com/gpu"] for lim in limits if "nvidia.com/gpu" in lim]


def test_rayservice_manifest():
    manifest = _load("rayservice.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    cluster = manifest["spec"]["rayClusterConfig"]
    head, workers = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    assert head["template"]["spec"]["containers"]
    assert any(_gpu_limits(g) for g in workers), "no worker group requests nvidia.com/gpu"
    assert not _gpu_limits(head)  # expert actors take GPUs; the coordinator runs on CPU
    for group in [head, *workers]:
        # KubeRay passes rayStartParams to `ray start`: every value must be a string.
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), group.get("rayStartParams")
    images = {c["image"] for g in [head, *workers] for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1 and cluster["rayVersion"] in images.pop()  # one image, on the manifest's Ray


def test_rayservice_offers_what_its_app_targets():
    manifest = _load("rayservice.yaml")
    cluster = manifest["spec"]["rayClusterConfig"]
    head = set(_kuberay_resources(cluster["headGroupSpec"]))
    gpu = {key for g in cluster["workerGroupSpecs"] for key in _kuberay_resources(g)}
    app = CONFIGS["rayservice.yaml:serveConfigV2"]["applications"][0]
    experts, coordinator = _app_targets(app)
    assert experts and experts <= gpu
    assert coordinator and coordinator <= head
    assert _docs_ray_start_resources() <= head | gpu
    # Expert actors: one per GPU pod.
    assert app["args"]["expert_actors"] == sum(g["replicas"] for g in cluster["workerGroupSpecs"])


def test_rayservice_mounts_the_model_everywhere():
    manifest = _load("rayservice.yaml")
    cluster = manifest["spec"]["rayClusterConfig"]
    model_dir = CONFIGS["rayservice.yaml:serveConfigV2"]["applications"][0]["args"]["model_dir"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        mounts = [m["mountPath"] for c in group["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])]
        assert any(model_dir.startswith(m.rstrip("/") + "/") for m in mounts), (group.get("groupName", "head"), mounts)


def test_ray_versions_agree():
    image = _load("cluster.yaml")["docker"]["image"]
    ray_version = _load("rayservice.yaml")["spec"]["rayClusterConfig"]["rayVersion"]
    assert image.startswith(f"rayproject/ray:{ray_version}-")
    dockerfile = _doc_blocks("dockerfile")
    assert dockerfile and dockerfile[0].splitlines()[0] == f"FROM {image}"


# -- serve.yaml under the real `serve run` --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def _serve_command() -> list[str]:
    cli = Path(sys.executable).with_name("serve")
    if cli.is_file():
        return [str(cli)]
    return [sys.executable, "-c", "import sys; from ray.serve.scripts import cli; sys.exit(cli())"]


def _stop(proc: subprocess.Popen, ray_tmp: Path, pids_mentioning) -> None:
    """Ctrl-C, as a user would; then kill what is left of the process group and of its Ray processes."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    for pid in pids_mentioning(str(ray_tmp)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_serve_yaml_runs_under_serve_run(tmp_path, tmp_path_factory, tiny_checkpoint_factory, pids_mentioning):
    config = _load("serve.yaml")
    port = _free_port()
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"]["model_dir"] = str(tiny_checkpoint_factory("deploy_tiny", with_tokenizer=True))
    cluster = app["args"].setdefault("engine", {}).setdefault("cluster", {})
    cluster["cpus_per_actor"] = 0.5  # the server and the yaml's expert actors on a 2-core machine
    cluster["startup_timeout_s"] = 120
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))

    ray_tmp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # start a local Ray, as `serve run` does on a fresh machine
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [*_serve_command(), "run", str(path)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # let Ctrl-C reach it
    )
    try:
        deadline = time.monotonic() + 240
        status, body = 0, {}
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, body = _get(f"http://127.0.0.1:{port}/v1/models")
            except OSError:
                status = 0
            if status == 200:
                break
            time.sleep(0.5)
        tail = "\n".join((tmp_path / "serve.log").read_text().splitlines()[-30:])
        assert status == 200, f"serve run did not answer (exit code {proc.poll()}):\n{tail}"
        assert [m["id"] for m in body["data"]] == [app["args"]["model_name"]]
        status, health = _get(f"http://127.0.0.1:{port}/health")
        assert status == 200, health
        assert [a["state"] for a in health["expert_actors"]] == ["ok"] * app["args"]["expert_actors"]
    finally:
        _stop(proc, ray_tmp, pids_mentioning)
        log.close()


def test_the_replica_asks_for_its_coordinator_cpus_or_a_cpu_per_expert_thread(tiny_mixtral_dir):
    def cpus(**args) -> float:
        app = build_app({"model_dir": str(tiny_mixtral_dir), **args})
        return app._bound_deployment.ray_actor_options["num_cpus"]

    assert cpus() == 1
    assert cpus(engine={"expert_threads": 3}) == 3
    assert cpus(expert_actors=2) == 1
    assert cpus(expert_actors=2, engine={"cluster": {"coordinator_cpus": 3}}) == 3
    assert cpus(engine={"expert_threads": 2, "cluster": {"coordinator_cpus": 4}}) == 4
