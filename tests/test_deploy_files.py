"""The team stack's files: deploy/docker-compose.yml against the Compose Specification's JSON schema and the
stack's own rules; the work-pool base job templates (deploy/work-pools/) rendered as a worker renders them,
then accepted by a real Prefect server on loopback; `prefect deploy` of prefect.yaml's GPU deployments against
it; and their pull steps run for real: git clone through a Prefect variable, `dvc pull` from an S3 server with
the keys of Prefect Secret blocks. Every process started here is stopped by its id.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker.types
import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from prefect.utilities.templating import apply_values, find_placeholders
from prefect.workers.base import BaseJobConfiguration

from pipeline.core.config import lock_url_problem
from tests.conftest import REPO
from tests.servers import SeaweedS3, Service, free_port

DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
TEMPLATES = {"docker": DEPLOY / "work-pools" / "docker.json", "kubernetes": DEPLOY / "work-pools" / "kubernetes.json"}
POOLS = {"pipeline-docker": ("pneumo-docker", "docker"), "pipeline-k8s-gpu": ("pneumo-k8s-gpu", "kubernetes")}
# ${VAR}, ${VAR:-default}, ${VAR:?error}; not $${VAR}, which compose passes on to the container's shell
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(?::?[-?])[^}]*)?\}")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", re.IGNORECASE)


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def template(kind: str) -> dict[str, Any]:
    return json.loads(TEMPLATES[kind].read_text())


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """The Compose Specification's schema as check-jsonschema ships it (`--builtin-schema vendor.compose-spec`)."""
    schema = json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def long_running(services: dict[str, Any]) -> dict[str, Any]:
    """Services `up -d` keeps running: not one-shot (restart "no"), not build-only (a profile)."""
    return {n: s for n, s in services.items() if s.get("restart") != "no" and not s.get("profiles")}


def lock_versions() -> dict[str, str]:
    pins = (line.split("==") for line in (REPO / "requirements.lock").read_text().splitlines() if "==" in line)
    return {name.strip().lower(): version.strip() for name, version in pins}


def test_compose_file_matches_the_compose_spec() -> None:
    doc = compose()
    assert schema_errors(doc) == []
    broken = copy.deepcopy(doc)
    broken["services"]["mlflow"]["depends_on"]["postgres"]["condition"] = "service_ready"
    broken["services"]["seaweedfs"]["helthcheck"] = broken["services"]["seaweedfs"].pop("healthcheck")
    errors = schema_errors(broken)
    assert any("service_ready" in e for e in errors) and any("helthcheck" in e for e in errors), errors


def test_compose_services_are_pinned_healthy_and_ordered() -> None:
    services = compose()["services"]
    for name, service in services.items():
        image = service["image"]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest" and "${" not in image, f"{name}: image {image!r} is not pinned"
        if "build" in service:
            dockerfile = COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]
            for base in re.findall(r"^FROM\s+(\S+)", dockerfile.read_text(), re.MULTILINE):
                assert re.search(r":\d+\.\d+\.\d+", base), (
                    f"{dockerfile.name}: base image {base} not pinned to a release"
                )
    running = long_running(services)
    assert {"postgres", "seaweedfs", "mlflow", "prefect-server", "prefect-worker"} <= set(running)
    for name, service in running.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            expected = "service_healthy" if dependency in running else "service_completed_successfully"
            assert spec["condition"] == expected, f"{name} -> {dependency}: {spec}"
    assert services["mlflow"]["depends_on"]["create-buckets"]["condition"] == "service_completed_successfully"
    # The MLflow server image: the client's version from requirements.lock, plus the drivers for the stores.
    pins = dict(re.findall(r"([\w-]+)==([\w.]+)", (DEPLOY / "mlflow.Dockerfile").read_text()))
    locked = lock_versions()
    assert {name: locked[name] for name in pins} == pins and {"mlflow", "psycopg2-binary", "boto3"} <= set(pins)


def test_compose_volumes_are_named_and_data_lives_in_them() -> None:
    doc = compose()
    named = set(doc["volumes"])
    used: set[str] = set()
    for name, service in doc["services"].items():
        for volume in service.get("volumes", []):
            source, _target, *mode = volume.split(":")
            if source in named:
                used.add(source)
            elif source == "/var/run/docker.sock":
                assert name == "prefect-worker", f"{name} mounts the Docker socket"
            else:  # configuration from this folder, read-only
                assert source.startswith("./") and mode == ["ro"], f"{name}: {volume}"
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} is missing"
    assert used == named, f"declared but unused: {named - used}"
    mounts = {
        s: {v.split(":")[1]: v.split(":")[0] for v in doc["services"][s]["volumes"]} for s in ("postgres", "seaweedfs")
    }
    assert mounts["postgres"]["/var/lib/postgresql/data"] in named and mounts["seaweedfs"]["/data"] in named


def test_mlflow_serves_artifacts_from_s3_and_runs_on_postgres() -> None:
    mlflow = compose()["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    assert command.startswith("mlflow server")
    assert re.search(r"--backend-store-uri[= ]postgresql://\S+@postgres:5432/", command), command
    assert re.search(r"--artifacts-destination[= ]s3://", command) and "--serve-artifacts" in command.split()
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"


def test_compose_has_no_secrets_and_every_variable_is_in_the_env_example() -> None:
    doc, text = compose(), COMPOSE.read_text()
    for name, service in doc["services"].items():
        for key, value in service.get("environment", {}).items():
            if SECRET_KEY.search(key):
                assert INTERPOLATION.fullmatch(str(value)), f"{name}: {key} must come from deploy/.env"
        for value in strings(service):
            for password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", value):
                assert INTERPOLATION.fullmatch(password), f"{name}: a literal password in {value!r}"
    used = set(INTERPOLATION.findall(text))
    example = dict(
        line.split("=", 1)
        for line in (DEPLOY / ".env.example").read_text().splitlines()
        if re.match(r"^[A-Z][A-Z0-9_]*=", line)
    )
    assert used == set(example), f"only in the compose file: {used - set(example)}; unused: {set(example) - used}"
    assert all("change-me" in example[key] for key in example if SECRET_KEY.search(key))
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/.env"], cwd=REPO, check=False)
    assert ignored.returncode == 0, "deploy/.env (the real credentials) must be git-ignored"


def test_compose_and_pools_agree_on_image_and_network() -> None:
    doc = compose()
    image = doc["services"]["pipeline-image"]["image"]
    for kind in TEMPLATES:
        assert template(kind)["variables"]["properties"]["image"]["default"] == image, kind
    docker_vars = template("docker")["variables"]["properties"]
    assert docker_vars["networks"]["default"] == [doc["networks"]["default"]["name"]]
    assert docker_vars["env"]["default"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    worker = " ".join(doc["services"]["prefect-worker"]["command"])
    assert "--pool pneumo-docker --type docker" in worker and "/work-pools/docker.json" in worker


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_templates_declare_every_variable_they_use(kind: str) -> None:
    tpl = template(kind)
    assert set(tpl) == {"job_configuration", "variables"}
    used = {p.name for p in find_placeholders(json.dumps(tpl["job_configuration"]))}
    declared = set(tpl["variables"]["properties"])
    assert used <= declared, f"undeclared: {used - declared}"
    assert {"command", "env", "image", "labels", "name", "gpu_count"} <= used
    jsonschema.validators.validator_for(tpl["variables"]).check_schema(tpl["variables"])
    defaults = BaseJobConfiguration._get_base_config_defaults(tpl["variables"]["properties"])
    jsonschema.validate(defaults, tpl["variables"])  # the defaults satisfy the schema a server checks jobs against


def render(kind: str, values: dict[str, Any]) -> dict[str, Any]:
    """The job configuration a worker builds (BaseJobConfiguration.from_template_and_values, without the block and
    variable look-ups): the variables' defaults, overridden by the deployment's job variables."""
    tpl = template(kind)
    variables = BaseJobConfiguration._get_base_config_defaults(tpl["variables"]["properties"]) | values
    jsonschema.validate(variables, tpl["variables"])
    return apply_values(tpl["job_configuration"], variables)


def test_kubernetes_template_requests_gpus_on_selected_tolerated_nodes() -> None:
    pod = render("kubernetes", {"gpu_count": 2, "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}})
    pod = pod["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    default = render("kubernetes", {})["job_manifest"]["spec"]["template"]["spec"]
    assert default["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1} and "nodeSelector" not in default
    with pytest.raises(jsonschema.ValidationError, match="Maybe"):
        render("kubernetes", {"tolerations": [{"key": "gpu", "operator": "Maybe"}]})


K8S_VERSION = "1.33"  # validated against this Kubernetes API's OpenAPI schemas, unknown fields rejected


def test_kubernetes_manifests_match_the_api_schemas() -> None:
    manifests = [
        (f.name, doc) for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(f.read_text())
    ]
    rendered = render("kubernetes", {"gpu_count": 2, "node_selector": {"pool": "gpu"}})["job_manifest"]
    for container in rendered["spec"]["template"]["spec"]["containers"]:  # as prefect-kubernetes' worker does
        container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]
    manifests.append(("work-pools/kubernetes.json (rendered)", rendered))
    assert {doc["kind"] for _, doc in manifests} == {"Service", "Job"}
    for name, doc in manifests:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} ({doc['kind']}): {e.message}")
    broken = copy.deepcopy(next(doc for _, doc in manifests if doc["kind"] == "Job"))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_docker_template_requests_gpus_as_docker_py_expects() -> None:
    config = render("docker", {"gpu_count": 2})
    assert config["image"] == "pneumo-worker:0.1.0" and config["networks"] == ["pneumo"]
    # What prefect-docker passes on to docker-py's containers.create (container_create_kwargs).
    host = docker.types.HostConfig(version="1.44", **config["container_create_kwargs"])
    assert host["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": 2, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert render("docker", {})["container_create_kwargs"]["device_requests"][0]["count"] == 1


# --- against real servers -------------------------------------------------------------------------------


class Stack:
    """A Prefect server (and SeaweedFS) on loopback, the GPU pools created from the templates with the CLI."""

    def __init__(self, root: Path, env: dict[str, str], api: str, s3: SeaweedS3) -> None:
        self.root, self.env, self.api, self.s3 = root, env, api, s3

    def prefect(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["prefect", *args], cwd=cwd or self.root, env=self.env, capture_output=True, text=True, check=False
        )

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.api}{path}", timeout=30)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("deploy")
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_"))}
    env |= {
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
        "PREFECT_HOME": str(root / "prefect_home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    server = Service(
        "prefect server",
        [f"{bin_dir}/prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
        root,
        root / "prefect.log",
    )
    s3: SeaweedS3 | None = None
    try:
        s3 = SeaweedS3(root / "seaweedfs")  # starts while the Prefect server migrates its database
        server.wait_healthy(f"http://127.0.0.1:{port}/api/health", timeout=180)
        stack = Stack(root, env, env["PREFECT_API_URL"], s3)
        for pool, kind in POOLS.values():
            created = stack.prefect(
                "work-pool", "create", pool, "--type", kind, "--base-job-template", str(TEMPLATES[kind])
            )
            assert created.returncode == 0, created.stdout + created.stderr
        # What a team sets once (deploy/README.md): the S3 keys as Secret blocks for the DVC pull step.
        secrets = subprocess.run(
            [sys.executable, "-c", SAVE_SECRETS, s3.access_key, s3.secret_key, LOCK_URL],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert secrets.returncode == 0, secrets.stderr
        yield stack
    finally:
        server.stop()
        if s3 is not None:
            s3.stop()
        assert server.proc.poll() is not None and (s3 is None or s3.service.proc.poll() is not None)


SAVE_SECRETS = """
import sys
from prefect.blocks.system import Secret
Secret(value=sys.argv[1]).save("pneumo-s3-access-key-id", overwrite=True)
Secret(value=sys.argv[2]).save("pneumo-s3-secret-access-key", overwrite=True)
Secret(value=sys.argv[3]).save("pneumo-registry-lock-url", overwrite=True)
"""
LOCK_URL = "postgresql://pneumo:lock-s3cret@postgres:5432/mlflow"  # the stack's MLflow database

JOB_ENV = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.workers.base import BaseJobConfiguration

async def main() -> None:
    async with get_client() as client:
        envs = {}
        for pool in sys.argv[1:]:
            template = (await client.read_work_pool(pool)).base_job_template
            config = await BaseJobConfiguration.from_template_and_values(template, {"gpu_count": 1}, client=client)
            envs[pool] = config.env
    print(json.dumps(envs))

asyncio.run(main())
"""


@pytest.mark.slow
def test_flow_runs_on_the_gpu_pools_share_the_registry_lock(stack: Stack) -> None:
    """Flow runs in containers or pods each have their own clone: a lock file would serialise nothing between
    them. The pools give every run the stack's PostgreSQL lock URL, from a Secret block, never stored in the pool."""
    pools = [pool for pool, _ in POOLS.values()]
    done = subprocess.run(
        [sys.executable, "-c", JOB_ENV, *pools], env=stack.env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    envs = json.loads(done.stdout.strip().splitlines()[-1])
    for pool in pools:
        assert envs[pool]["PNEUMO_REGISTRY_LOCK_URL"] == LOCK_URL  # as the worker builds the flow run's job
        assert envs[pool]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert "lock-s3cret" not in stack.get(f"/work_pools/{pool}").text
        assert lock_url_problem(LOCK_URL) is None


@pytest.mark.slow
def test_server_accepts_the_gpu_templates_and_rejects_a_broken_one(stack: Stack, tmp_path: Path) -> None:
    for pool, kind in POOLS.values():
        read = stack.get(f"/work_pools/{pool}")
        assert read.status_code == 200, read.text
        body = read.json()
        assert body["type"] == kind and body["base_job_template"] == template(kind)
        assert "gpu_count" in body["base_job_template"]["variables"]["properties"]
    k8s = stack.get("/work_pools/pneumo-k8s-gpu").json()["base_job_template"]["variables"]["properties"]
    assert {"node_selector", "tolerations"} <= set(k8s)

    broken = template("kubernetes")
    del broken["variables"]["properties"]["gpu_count"]  # still used by the job manifest
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    refused = stack.prefect(
        "work-pool", "create", "pneumo-broken", "--type", "kubernetes", "--base-job-template", str(path)
    )
    assert refused.returncode != 0 and stack.get("/work_pools/pneumo-broken").status_code == 404
    assert "gpu_count" in refused.stdout + refused.stderr


def project(stack: Stack) -> Path:
    """What `prefect deploy` reads: prefect.yaml and the flow's entrypoint (the package itself is installed)."""
    root = stack.root / "project"
    if not (root / "prefect.yaml").exists():
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / "prefect.yaml", root / "prefect.yaml")
        shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture(scope="module")
def deployed(stack: Stack) -> subprocess.CompletedProcess[str]:
    """`prefect deploy` of the GPU deployments from (a copy of) the project root."""
    return stack.prefect("--no-prompt", "deploy", "-n", "pipeline-docker", "-n", "pipeline-k8s-gpu", cwd=project(stack))


@pytest.mark.slow
def test_prefect_deploy_points_the_gpu_deployments_at_their_pools(
    stack: Stack, deployed: subprocess.CompletedProcess[str]
) -> None:
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    for name, (pool, _) in POOLS.items():
        deployment = stack.get(f"/deployments/name/pneumonia-pipeline/{name}").json()
        assert deployment["work_pool_name"] == pool and deployment["job_variables"] == {"gpu_count": 1}
        steps = [(next(iter(s)), next(iter(s.values()))) for s in deployment["pull_steps"]]
        assert [s for s, _ in steps] == [
            "prefect.deployments.steps.git_clone",
            "prefect.deployments.steps.set_working_directory",
            "prefect.deployments.steps.run_shell_script",
            "prefect.deployments.steps.run_shell_script",
        ]
        assert steps[0][1]["repository"] == "{{ prefect.variables.pneumo_git_repository }}"  # resolved at run time
        assert steps[2][1]["script"].startswith("pip install") and steps[3][1]["script"].startswith("dvc pull")
        assert stack.s3.secret_key not in json.dumps(deployment), "a secret was stored in the deployment"
    # The server checks job variables against the pool's schema: a bad toleration is refused.
    refused = stack.prefect(
        "--no-prompt",
        "deploy",
        "-n",
        "pipeline-k8s-gpu",
        "--job-variable",
        json.dumps({"tolerations": [{"key": "nvidia.com/gpu", "operator": "Maybe"}]}),
        cwd=project(stack),
    )
    assert refused.returncode != 0 and "Maybe" in refused.stdout + refused.stderr


RUN_PULL_STEPS = """
import asyncio, json, sys, urllib.request
from prefect.deployments.steps.core import run_steps
api, name = sys.argv[1:3]
deployment = json.load(urllib.request.urlopen(f"{api}/deployments/name/pneumonia-pipeline/{name}"))
# All but `pip install .`, which would replace the project installed in this test's virtualenv.
steps = [s for s in deployment["pull_steps"] if next(iter(s.values())).get("id") != "install"]
outputs = asyncio.run(run_steps(steps))
print(json.dumps({"directory": outputs["directory"], "dvc": outputs["dvc-pull"]["stdout"]}))
"""


@pytest.mark.slow
def test_pull_steps_clone_the_code_and_pull_the_data_from_s3(
    stack: Stack, deployed: subprocess.CompletedProcess[str]
) -> None:
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    src = stack.root / "origin"
    src.mkdir()
    s3env = {**stack.env, "AWS_ACCESS_KEY_ID": stack.s3.access_key, "AWS_SECRET_ACCESS_KEY": stack.s3.secret_key}

    def sh(*cmd: str, env: dict[str, str] = stack.env) -> None:
        done = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{cmd}: {done.stderr[-2000:]}"

    stack.s3.create_bucket("dvc")
    sh("git", "init", "-q", "-b", "main")
    sh("dvc", "init", "-q")
    (src / "data").mkdir()
    (src / "data" / "images.txt").write_text("person1_bacteria_1.jpeg\n")
    sh("dvc", "remote", "add", "-d", "team", "s3://dvc/store")
    sh("dvc", "remote", "modify", "team", "endpointurl", stack.s3.endpoint)
    sh("dvc", "remote", "modify", "team", "region", stack.s3.region)
    sh("dvc", "add", "-q", "data/images.txt")
    sh("git", "add", "-A")
    sh("git", "-c", "user.name=pneumo", "-c", "user.email=pneumo@example.org", "commit", "-q", "-m", "data")
    sh("dvc", "push", "-q", env=s3env)
    for variable, value in (("pneumo_git_repository", f"file://{src}"), ("pneumo_git_branch", "main")):
        assert stack.prefect("variable", "set", variable, value, "--overwrite").returncode == 0
    worker = stack.root / "worker"
    worker.mkdir()
    # A bare worker: no AWS_* variables, no project checkout; the keys come from the Secret blocks.
    pulled = subprocess.run(
        [sys.executable, "-c", RUN_PULL_STEPS, stack.api, "pipeline-docker"],
        cwd=worker,
        env=stack.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert pulled.returncode == 0, pulled.stdout[-2000:] + pulled.stderr[-3000:]
    clone = worker / json.loads(pulled.stdout.strip().splitlines()[-1])["directory"]
    assert (clone / "data" / "images.txt").read_text() == "person1_bacteria_1.jpeg\n"
    assert (clone / ".git").is_dir() and not (clone / ".dvc" / "config.local").exists()


# --- reaching the stack from elsewhere (deploy/README.md, "Work pools and deployments") ----------------------

README = DEPLOY / "README.md"
STACK_HOST = "pneumo-stack.example.org"  # the README's and .env.example's name for the stack's host


def test_postgres_is_published_for_the_registration_lock() -> None:
    """The lock URL of Kubernetes pods, laptops and other Docker hosts names the stack's host: PostgreSQL must be
    published there (on 5432 by default, which the ExternalName Service `postgres` keeps)."""
    postgres = compose()["services"]["postgres"]
    assert postgres["ports"] == ["${POSTGRES_PORT:-5432}:5432"]
    example = (DEPLOY / ".env.example").read_text()
    assert re.search(r"^POSTGRES_PORT=5432$", example, re.MULTILINE) and re.search(r"^MLFLOW_PORT=5000$", example, re.M)


def readme_lock_urls() -> dict[str, str]:
    """The lock URLs deploy/README.md stores as Secret blocks: block name -> URL."""
    return dict(
        (name, url)
        for url, name in re.findall(
            r"PNEUMO_REGISTRY_LOCK_URL=(\S+) python -c '\n.*\n.*\.save\(\"([\w-]+)\"", README.read_text()
        )
    )


def test_readme_documents_a_lock_url_for_each_network() -> None:
    """`postgres` resolves on the stack's Docker network and, through k8s/stack-services.yaml, in the cluster;
    laptops and other Docker hosts use the stack host's name and the published port."""
    text, urls = README.read_text(), readme_lock_urls()
    assert urls == {
        "pneumo-registry-lock-url": "postgresql://<POSTGRES_USER>:<POSTGRES_PASSWORD>@postgres:5432/<MLFLOW_DB>",
        "pneumo-registry-lock-url-external": (
            f"postgresql://<POSTGRES_USER>:<POSTGRES_PASSWORD>@{STACK_HOST}:5432/<MLFLOW_DB>"
        ),
    }
    assert f"export PNEUMO_REGISTRY_LOCK_URL={urls['pneumo-registry-lock-url-external']}" in text  # laptops
    assert "reachable\nonly inside the stack's network" not in text
    assert urlsplit(LOCK_URL).hostname == "postgres" and urlsplit(LOCK_URL).port == 5432  # what the tests save
    # In the cluster: the pools' host names as ExternalName Services of the stack's host, ports as published.
    services = {
        doc["metadata"]["name"]: doc["spec"]
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / "stack-services.yaml").read_text())
    }
    env = template("kubernetes")["variables"]["properties"]["env"]["default"]
    assert set(services) == {urlsplit(env["MLFLOW_TRACKING_URI"]).hostname, "postgres"}
    assert all(s == {"type": "ExternalName", "externalName": STACK_HOST} for s in services.values())
    assert urlsplit(env["MLFLOW_TRACKING_URI"]).port == 5000 and "stack-services.yaml" in text


def test_readme_gives_docker_hosts_elsewhere_a_pool_that_reaches_the_stack(tmp_path: Path) -> None:
    """The README's derived template for a Docker worker on another host: no `pneumo` network, both URLs by the
    stack host's name, the lock still a Secret block's placeholder (resolved by the worker, never stored)."""
    snippet = re.search(r"^python -c '\n(.*?)'$", README.read_text(), re.MULTILINE | re.DOTALL)
    assert snippet is not None and "docker.json" in snippet.group(1)
    (tmp_path / "deploy").symlink_to(DEPLOY)
    subprocess.run([sys.executable, "-c", snippet.group(1)], cwd=tmp_path, check=True)
    derived = json.loads((tmp_path / "docker-gpu2.json").read_text())
    variables = BaseJobConfiguration._get_base_config_defaults(derived["variables"]["properties"])
    jsonschema.validate(variables, derived["variables"])
    config = apply_values(derived["job_configuration"], variables | {"gpu_count": 1})
    assert (
        config["networks"] == []
        and config["image"] == template("docker")["variables"]["properties"]["image"]["default"]
    )
    assert config["env"]["MLFLOW_TRACKING_URI"] == f"http://{STACK_HOST}:5000"
    block = re.fullmatch(r"\{\{ prefect\.blocks\.secret\.([\w-]+) \}\}", config["env"]["PNEUMO_REGISTRY_LOCK_URL"])
    assert block is not None and urlsplit(readme_lock_urls()[block.group(1)]).hostname == STACK_HOST
    # Everything else as in the stack's own pool.
    derived["variables"]["properties"]["networks"] = template("docker")["variables"]["properties"]["networks"]
    derived["variables"]["properties"]["env"] = template("docker")["variables"]["properties"]["env"]
    assert derived == template("docker")


def test_multiworker_job_runs_the_cli_from_the_shared_project(tmp_path: Path) -> None:
    """The pipeline image has the locked dependencies, not the project (deploy/Dockerfile): the Job's pods must
    run the CLI from the project folder on the shared volume. Run its start script and args as the pod would,
    with /shared standing in for the volume and no `pneumo` on PATH, `train` swapped for `--help`."""
    job = next(
        d for d in yaml.safe_load_all((DEPLOY / "k8s" / "multiworker-job.yaml").read_text()) if d["kind"] == "Job"
    )
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "pneumo" not in lock_versions() and "pip install" not in container["command"][2]  # installs nothing
    shared = tmp_path / "shared"
    shared.mkdir()
    # The project folder on the volume (claim pneumo-shared): its code, a copy so that it is not the installed one.
    shutil.copytree(REPO / "pipeline", shared / "project" / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/shared" and container["workingDir"].startswith("/shared/")

    def on_volume(value: str) -> str:
        return value.replace("/shared", str(shared))

    env = {e["name"]: on_volume(e["value"]) for e in container["env"]}
    assert env["PYTHONPATH"] == str(shared / "project")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # the image's python
    (bin_dir / "python").chmod(0o755)
    env |= {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "JOB_COMPLETION_INDEX": "1"}
    assert shutil.which("pneumo", path=env["PATH"]) is None  # as in the image
    args = container["args"]
    assert args[:3] == ["python", "-m", "pipeline.steps.cli"] and args[-1] == "train"
    script = [*container["command"], *(on_volume(a) for a in args[:-1]), "--help"]
    where = "import pipeline.steps.cli as c, os; print(c.__file__); print(os.environ['TF_CONFIG'])"
    outputs = []
    for cmd in (script, [*container["command"], "python", "-c", where]):
        done = subprocess.run(
            cmd, cwd=on_volume(container["workingDir"]), env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout)
    assert outputs[0].startswith("usage: pneumo")
    module, tf_config = outputs[1].strip().splitlines()
    assert module == str(shared / "project" / "pipeline" / "steps" / "cli.py")  # the volume's code, not the venv's
    assert json.loads(tf_config)["task"] == {"type": "worker", "index": 1}
