"""Drift checks for everything a deployment reads: cluster configs, job specs, image, local stack.

No cluster is needed. The KubeRay manifests are validated against the CRD schemas the operator
installs (``../shared/schemas/kuberay`` beside the checkout), the launcher config against the
``ray-schema.json`` in the installed Ray wheel, and versions, entrypoints, file references,
resource arithmetic and credentials are checked across the repository.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from sarjepa_dist.cli import build_parser
from sarjepa_dist.config import load_config
from sarjepa_dist.jobs import NON_PATH_ENCODERS, JobSpec, is_relative_local_path, load_job_spec, storage_paths

REPO = Path(__file__).resolve().parents[1]
KUBERAY_SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "ray-cluster.aws.yaml"
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
COMPOSE = REPO / "infra" / "minio" / "docker-compose.yaml"
LOCK = REPO / "infra" / "constraints.txt"
JOB_SPECS = sorted((REPO / "jobs").glob("*.job.yaml"))
GIB = 2**30

# Instance types the launcher config names: (vCPU, memory GiB, GPUs), from the EC2 documentation.
EC2_INSTANCE_TYPES = {"m6i.2xlarge": (8, 32, 0), "c6i.8xlarge": (32, 64, 0), "p5.48xlarge": (192, 2048, 8)}
# Host memory one Ray Train worker needs beside the object store (decode buffers, CUDA context,
# pinned batches, the model on CPU while it loads); a pod below this per worker swaps or OOMs.
HOST_GIB_PER_GPU_WORKER = 32
HOST_GIB_PER_CPU_WORKER = 4
OBJECT_STORE_FRACTION = 0.3  # Ray's default share of a node's memory for the object store
HEAD_MIN_GIB = 8  # GCS, dashboard, job supervisor and the driver


IMAGE_WORKDIR = "/opt/sarjepa"  # where the Dockerfile puts the repository's jobs/ and package


def repo_path(path: str) -> Path:
    """A path an entrypoint names: relative to the working dir, or inside the image (= the repository)."""
    return REPO / (path[len(IMAGE_WORKDIR) + 1:] if path.startswith(IMAGE_WORKDIR + "/") else path)


def manifests() -> list[tuple[Path, dict]]:
    return [(p, doc) for p in sorted(KUBERAY.glob("*.yaml")) for doc in yaml.safe_load_all(p.read_text()) if doc]


def ray_manifests() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in manifests() if d.get("apiVersion", "").startswith("ray.io/")]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    return pins


# --- KubeRay manifests against the CRD schemas -------------------------------------------------

def strict(schema: dict) -> dict:
    """The CRD schema as the API server enforces it: unknown fields refused where the schema
    lists properties and does not preserve unknown fields (README in the schema folder)."""
    schema = copy.deepcopy(schema)

    def walk(node: dict) -> None:
        if not isinstance(node, dict):
            return
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for sub in (node.get("properties") or {}).values():
            walk(sub)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        for key in ("anyOf", "allOf", "oneOf"):
            for sub in node.get(key) or []:
                walk(sub)

    walk(schema)
    return schema


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    if not KUBERAY_SCHEMAS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {KUBERAY_SCHEMAS} (a checkout of the shared folder "
                    f"beside the repository); the manifests cannot be checked against them")
    crd = yaml.load((KUBERAY_SCHEMAS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=yaml.CSafeLoader)
    version = api_version.split("/", 1)[1]
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert entry["served"], f"{api_version} {kind} is not served by this KubeRay"
    return jsonschema.Draft7Validator(strict(entry["schema"]["openAPIV3Schema"]))


def crd_errors(doc: dict) -> list[str]:
    validator = crd_validator(doc["kind"], doc["apiVersion"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("path, doc", ray_manifests(), ids=lambda x: getattr(x, "name", ""))
def test_kuberay_manifest_validates_against_the_crd(path, doc):
    assert crd_errors(doc) == [], path


def test_crd_check_is_strict():
    _, doc = next((p, d) for p, d in ray_manifests() if d["kind"] == "RayCluster")
    doc = copy.deepcopy(doc)
    doc["spec"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}       # a typo the server refuses
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "2"                   # wrong type
    doc["spec"]["authOptions"] = {"mode": "tokens"}                        # not in the enum
    errors = "\n".join(crd_errors(doc))
    assert "rayStartParam" in errors and "'2' is not of type 'integer'" in errors and "tokens" in errors


def test_worker_groups_spell_out_what_the_server_would_default():
    for path, doc in ray_manifests():
        for group in cluster_spec(doc)["workerGroupSpecs"]:
            assert {"minReplicas", "maxReplicas", "replicas"} <= set(group), (path, group["groupName"])
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (path, group["groupName"])


def test_token_auth_is_on_everywhere():
    for path, doc in ray_manifests():
        assert cluster_spec(doc).get("authOptions", {}).get("mode") == "token", path
    cfg = launcher()
    head, workers = cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]
    assert any("RAY_AUTH_MODE=token ray start --head" in c for c in head)
    assert any("RAY_AUTH_MODE=token ray start --address" in c for c in workers)
    assert any("test -s ~/.ray/auth_token" in c for c in head), "the head must refuse to start without the token"
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "export RAY_AUTH_MODE=token" in (REPO / "infra" / "dev" / "cluster.sh").read_text()


def test_storage_manifest_holds_no_secret():
    kinds = [doc["kind"] for _, doc in manifests()]
    assert "Secret" not in kinds
    for path, doc in ray_manifests():
        spec = cluster_spec(doc)
        for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            assert template["spec"].get("serviceAccountName") == "sarjepa", path  # IRSA
            for container in template["spec"]["containers"]:
                for source in container.get("envFrom", []):
                    if "secretRef" in source:
                        assert source["secretRef"].get("optional") is True, path


# --- the launcher config against Ray's own schema ----------------------------------------------

def test_launcher_validates_against_the_ray_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = launcher()
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(cfg)]
    assert errors == []
    validate_config(prepare_config(copy.deepcopy(cfg)))  # Ray's own checks after filling its defaults


def test_launcher_config_is_private_and_gpu_ready():
    cfg = launcher()
    assert cfg["provider"]["use_internal_ips"] is True
    for name, node in cfg["available_node_types"].items():
        nc = node["node_config"]
        assert nc.get("SubnetIds"), f"{name}: no subnets: Ray would pick any subnet, public ones included"
        # Ray's fallback AMI predates CUDA 13; the DLAMI parameter resolves to a current one at launch
        assert nc.get("ImageId", "").startswith("resolve:ssm:/aws/service/deeplearning/"), name
        assert "Name" in nc["IamInstanceProfile"], name
    run_options = " ".join(cfg["docker"].get("run_options", []))
    assert "--shm-size" not in run_options, "a fixed /dev/shm caps the object store; Ray sizes it per node"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start


def test_instance_profiles_grant_what_the_autoscaler_needs():
    aws = CLUSTER / "aws"
    autoscaler = json.loads((aws / "autoscaler-policy.json").read_text())
    actions = {a for st in autoscaler["Statement"] for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances",
            "iam:PassRole", "ssm:GetParameters"} <= actions
    pass_role = next(st for st in autoscaler["Statement"] if st["Action"] == "iam:PassRole")
    worker_profile = launcher()["available_node_types"]["gpu_worker"]["node_config"]["IamInstanceProfile"]["Name"]
    assert pass_role["Resource"].endswith(f":role/{worker_profile}")
    s3 = json.loads((aws / "s3-policy.json").read_text())
    buckets = {re.match(r"arn:aws:s3:::([^/]+)", st["Resource"]).group(1) for st in s3["Statement"]}
    used = set()
    for spec_path in JOB_SPECS:
        text = spec_path.read_text() + (REPO / "jobs" / "pretrain.yaml").read_text()
        used |= set(re.findall(r"s3://([a-z0-9.-]+)/", text))
    used.discard("sarjepa")  # the local stack's bucket
    assert used <= buckets, f"job specs use buckets the instance profiles cannot reach: {used - buckets}"
    json.loads((aws / "ec2-trust.json").read_text())


# --- resources: every job's workers fit the cluster it names -----------------------------------

def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity in plain units (CPUs, bytes)."""
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def kuberay_pods(doc: dict) -> tuple[dict, list[dict]]:
    """(head, worker groups) as {cpu, gpu, memory_gib, shm_gib, max_pods}: what `ray start` gets per pod."""
    def pod(group: dict) -> dict:
        container = group["template"]["spec"]["containers"][0]
        limits = container["resources"]["limits"]
        params = group.get("rayStartParams") or {}
        shm = [v for v in group["template"]["spec"].get("volumes", []) if v["name"] == "dshm"]
        return {
            "name": group.get("groupName", "head"),
            "cpu": float(params.get("num-cpus", _quantity(limits["cpu"]))),
            "gpu": float(params.get("num-gpus", _quantity(limits.get("nvidia.com/gpu", 0)))),
            "memory_gib": _quantity(limits["memory"]) / GIB,
            "shm_gib": _quantity(shm[0]["emptyDir"]["sizeLimit"]) / GIB if shm else None,
            "max_pods": group.get("maxReplicas", 1),
        }

    spec = cluster_spec(doc)
    return pod(spec["headGroupSpec"]), [pod(g) for g in spec["workerGroupSpecs"]]


def launcher_nodes(cfg: dict) -> tuple[dict, list[dict]]:
    def node(name: str, nt: dict) -> dict:
        vcpu, mem, gpus = EC2_INSTANCE_TYPES[nt["node_config"]["InstanceType"]]
        res = nt["resources"]
        return {"name": name, "cpu": float(res.get("CPU", vcpu)), "gpu": float(res.get("GPU", gpus)),
                "memory_gib": float(mem), "shm_gib": None, "max_pods": nt.get("max_workers", 0),
                "hardware": (vcpu, gpus)}

    types = cfg["available_node_types"]
    head = node(cfg["head_node_type"], types[cfg["head_node_type"]])
    return head, [node(n, t) for n, t in types.items() if n != cfg["head_node_type"]]


def placement_problems(num_workers: int, cpus_per_worker: float, gpus_per_worker: float,
                       head: dict, groups: list[dict]) -> list[str]:
    """Why ``num_workers`` Ray Train workers of this shape cannot all run on this cluster (empty: they can)."""
    problems = []
    per_worker_gib = HOST_GIB_PER_GPU_WORKER if gpus_per_worker else HOST_GIB_PER_CPU_WORKER
    capacity = 0
    for pod in ([head] if head["cpu"] > 0 else []) + groups:  # a head with CPUs takes workers too
        fit = math.floor(pod["cpu"] / cpus_per_worker) if cpus_per_worker else math.inf
        if gpus_per_worker:
            fit = min(fit, math.floor(pod["gpu"] / gpus_per_worker))
            if pod["gpu"] and pod["cpu"] < pod["gpu"] / gpus_per_worker * cpus_per_worker:
                problems.append(f"{pod['name']}: {pod['cpu']:g} CPUs cannot feed {pod['gpu']:g} GPUs at "
                                f"{cpus_per_worker:g} CPUs per worker: {pod['gpu'] - fit * gpus_per_worker:g} GPUs stranded")
        if fit <= 0:
            continue
        placed = min(fit, num_workers)
        usable_gib = pod["memory_gib"] * (1 - OBJECT_STORE_FRACTION)
        if usable_gib < placed * per_worker_gib:
            problems.append(f"{pod['name']}: {placed} workers need {placed * per_worker_gib} GiB beside the object "
                            f"store, the pod has {usable_gib:.0f} GiB")
        if pod["shm_gib"] is not None and pod["shm_gib"] < pod["memory_gib"] * OBJECT_STORE_FRACTION:
            problems.append(f"{pod['name']}: /dev/shm {pod['shm_gib']:g} GiB is smaller than the object store "
                            f"({pod['memory_gib'] * OBJECT_STORE_FRACTION:.0f} GiB)")
        capacity += fit * pod["max_pods"]
    if capacity < num_workers:
        problems.append(f"{num_workers} workers x ({cpus_per_worker:g} CPU, {gpus_per_worker:g} GPU) but the "
                        f"cluster places at most {capacity}")
    if head["memory_gib"] < HEAD_MIN_GIB:
        problems.append(f"head: {head['memory_gib']:g} GiB < {HEAD_MIN_GIB} GiB for GCS, dashboard and driver")
    return problems


def cluster_shape(path: Path) -> tuple[dict, list[dict]]:
    if path.resolve() == LAUNCHER.resolve():
        return launcher_nodes(launcher())
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") in ("RayCluster", "RayJob")]
    return kuberay_pods(doc)


def job_placements() -> list[tuple[str, Path, object]]:
    cases = []
    for spec_path in JOB_SPECS:
        spec = load_job_spec(spec_path)
        for cluster in spec.clusters:
            cfg = load_config(spec_path.parent / (spec.working_dir or ".") / spec.config, spec.set)
            cases.append((spec_path.name, (spec_path.parent / cluster).resolve(), cfg))
    for path, doc in ray_manifests():
        if doc["kind"] == "RayJob":
            args = build_parser().parse_args(shlex.split(doc["spec"]["entrypoint"])[3:])
            cases.append((path.name, path, load_config(repo_path(args.config), args.overrides)))
    return cases


@pytest.mark.parametrize("job, cluster, cfg", job_placements(), ids=lambda x: getattr(x, "name", x) if not isinstance(x, str) else x)
def test_job_workers_fit_the_cluster_it_names(job, cluster, cfg):
    head, groups = cluster_shape(cluster)
    t = cfg.train
    assert placement_problems(t.num_workers, t.cpus_per_worker, 1.0 if t.use_gpu else 0.0, head, groups) == []


def test_placement_check_catches_the_shapes_that_never_ran():
    # 16 x (8 CPU + 1 GPU) on 2 pods x (48 CPU, 8 GPU): 6 workers per pod, 2 GPUs stranded on each
    head = {"name": "head", "cpu": 0.0, "gpu": 0.0, "memory_gib": 32.0, "shm_gib": None, "max_pods": 1}
    pods = [{"name": "gpu", "cpu": 48.0, "gpu": 8.0, "memory_gib": 480.0, "shm_gib": 64.0, "max_pods": 2}]
    problems = "\n".join(placement_problems(16, 8, 1, head, pods))
    assert "GPUs stranded" in problems and "places at most 12" in problems and "/dev/shm 64 GiB" in problems


def test_launcher_resources_match_the_hardware():
    _, nodes = launcher_nodes(launcher())
    for node in nodes:
        assert (node["cpu"], node["gpu"]) <= tuple(map(float, node["hardware"])), node["name"]


# --- versions agree across lock, image, manifests and launcher ---------------------------------

def dockerfile_base() -> re.Match:
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cu(\d+)$", DOCKERFILE.read_text(), re.M)
    assert base, "the image must start FROM rayproject/ray:<ray>-py<python>-cu<cuda>, pinned by version"
    return base


def test_versions_agree():
    pins = lock_pins()
    base = dockerfile_base()
    assert base.group(1) == pins["ray"], "image Ray != locked Ray"
    assert (int(base.group(2)), int(base.group(3))) == sys.version_info[:2], \
        "image Python != the Python the lock was made with"
    cuda = pins["nvidia-cuda-runtime"].split(".")
    assert base.group(4) == f"{cuda[0]}{cuda[1]}", "image CUDA != the CUDA of the locked torch build"
    for path, doc in ray_manifests():
        assert cluster_spec(doc)["rayVersion"] == pins["ray"], path
    pyproject = (REPO / "pyproject.toml").read_text()
    for name in ("ray", "torch"):
        floor = re.search(rf'"{name}(?:\[[^\]]*\])?>=([\d.]+)"', pyproject).group(1)
        assert tuple(map(int, floor.split("."))) <= tuple(map(int, pins[name].split("."))), name
    required = re.search(r'requires-python = ">=(\d+)\.(\d+)"', pyproject)
    assert (int(required.group(1)), int(required.group(2))) <= sys.version_info[:2]


def test_every_config_runs_the_same_image_tagged_with_the_project_version():
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    images = {launcher()["docker"]["image"]}
    for _, doc in ray_manifests():
        spec = cluster_spec(doc)
        for group in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
            images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    assert len(images) == 1, images
    assert images.pop().endswith(f":{version}")
    assert f"sarjepa-dist:{version} ." in DOCKERFILE.read_text()  # the build command in its header


def test_image_installs_exactly_the_lock():
    text = DOCKERFILE.read_text()
    assert f"WORKDIR {IMAGE_WORKDIR}" in text and "COPY jobs ./jobs" in text  # what RayJob entrypoints name
    assert "pip install --no-cache-dir -r /tmp/lock/constraints.txt" in text
    assert "pip install --no-cache-dir --no-deps ." in text, "the package must not re-resolve dependencies"
    assert "check_lock.py /tmp/lock/constraints.txt" in text
    assert "COPY infra/constraints.txt infra/docker/check_lock.py /tmp/lock/" in text


def test_lock_check_reports_drift(tmp_path):
    sys.path.insert(0, str(REPO / "infra" / "docker"))
    try:
        import check_lock
    finally:
        sys.path.pop(0)
    assert check_lock.mismatches(LOCK.read_text()) == []  # this environment is the lock
    drifted = LOCK.read_text().replace(f"ray=={lock_pins()['ray']}", "ray==2.50.0")
    assert check_lock.mismatches(drifted) == [f"ray: {lock_pins()['ray']} installed, lock: 2.50.0"]
    assert "not installed" in check_lock.mismatches("no-such-package-sarjepa==1.0\n")[0]


# --- entrypoints, files, storage paths --------------------------------------------------------

def entrypoints() -> list[tuple[str, str]]:
    found = [(p.name, load_job_spec(p).entrypoint()) for p in JOB_SPECS]
    found += [(p.name, d["spec"]["entrypoint"]) for p, d in ray_manifests() if d["kind"] == "RayJob"]
    return found


@pytest.mark.parametrize("where, entrypoint", entrypoints())
def test_entrypoint_parses_and_names_existing_files(where, entrypoint):
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "sarjepa_dist.cli"], where
    args = build_parser().parse_args(argv[3:])
    config = getattr(args, "config", None)
    assert config and repo_path(config).is_file(), f"{where}: config {config!r} does not exist"
    cfg = load_config(repo_path(config), args.overrides)
    relative = {k: v for k, v in storage_paths(cfg, args.command, []).items() if is_relative_local_path(v)}
    assert relative == {}, f"{where}: relative storage paths on a cluster: {relative}"


def test_job_specs_name_existing_clusters():
    for spec_path in JOB_SPECS:
        for cluster in load_job_spec(spec_path).clusters:
            assert (spec_path.parent / cluster).is_file(), (spec_path.name, cluster)


def test_interpreter_probe_covers_every_runtime_dependency():
    """`sarjepa submit` probes the cluster's python for these modules; a new dependency must join them."""
    from importlib import metadata

    from sarjepa_dist.jobs import RUNTIME_MODULES

    pyproject = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
    names = re.findall(r'^\s*"([A-Za-z0-9_.-]+)', block, re.M)
    provided = metadata.packages_distributions()
    for name in names:
        modules = {m for m, dists in provided.items() if name.lower() in {d.lower() for d in dists}}
        assert modules & set(RUNTIME_MODULES), f"{name}: none of its modules {sorted(modules)} is probed"


def test_non_path_encoders_match_the_few_shot_module():
    from sarjepa_dist.fewshot.sources import BASELINES

    assert set(NON_PATH_ENCODERS) == {"random-init", *BASELINES}


def test_submit_help_names_real_spec_keys():
    sub = build_parser()._subparsers._group_actions[0].choices["submit"]
    spec_help = next(a.help for a in sub._actions if a.dest == "spec")
    named = set(re.findall(r"'(\w+)'", spec_help))
    assert named and named <= set(JobSpec.__dataclass_fields__), named


REFERENCE = re.compile(r"(?<![\w/.-])((?:cluster|jobs|infra|docs|sarjepa_dist|tests|benchmarks)/[\w./-]*\w)")


def referencing_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "docs" / "DEPLOY.md"]
    for folder in ("cluster", "jobs", "infra"):
        files += [p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in ("", ".md", ".yaml", ".sh", ".py")]
    return files


def test_every_referenced_repository_file_exists():
    missing = []
    for path in referencing_files():
        for ref in REFERENCE.findall(path.read_text()):
            ref = ref.rstrip(".")
            if "..." in ref or "*" in ref:  # patterns and elisions, not files
                continue
            if not (REPO / ref).exists():
                missing.append(f"{path.relative_to(REPO)}: {ref}")
    assert missing == []


def test_readme_run_names_match_the_configs():
    readme = (REPO / "README.md").read_text()
    names = {load_config(p).train.name for p in (REPO / "jobs").glob("*.yaml") if not p.name.endswith(".job.yaml")}
    for run in re.findall(r"runs/([\w-]+)/checkpoint_", readme):
        assert run in names, f"README names run {run!r}; the configs' train.name values are {sorted(names)}"


# --- credentials --------------------------------------------------------------------------------

CREDENTIAL_PATTERNS = [
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"(?i)(?<![a-z0-9])(?:aws_secret_access_key|secret_access_key|secret_key|password|passwd|auth_token|token)"
                r"\b[\"']?[ \t]*[:=][ \t]*[\"']?(?![$~/{<?])([^\s\"',}#]{4,})"), "a secret value"),
    (re.compile(r"(?m)^kind:\s*Secret\b"), "a Kubernetes Secret"),
]


def credential_findings(text: str) -> list[str]:
    found = []
    for pattern, what in CREDENTIAL_PATTERNS:
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(f"line {line}: {what}")
    return found


def test_no_credential_values_in_deployment_files():
    findings = []
    for folder in ("cluster", "jobs", "infra"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and path.name != "constraints.txt":
                findings += [f"{path.relative_to(REPO)} {f}" for f in credential_findings(path.read_text())]
    assert findings == []


@pytest.mark.parametrize("text", [
    "kind: Secret\nstringData:\n  AWS_SECRET_ACCESS_KEY: REPLACE_ME\n",
    "environment:\n  MINIO_ROOT_PASSWORD: minioadmin\n",
    "export AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP\n",
    "aws_secret_access_key = wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY\n",
    "RAY_AUTH_TOKEN: 0123456789abcdef0123456789abcdef\n",
])
def test_credential_scan_finds_values(text):
    assert credential_findings(text)


@pytest.mark.parametrize("text", [
    "MINIO_ROOT_PASSWORD: ${MINIO_ROOT_PASSWORD:?export MINIO_ROOT_PASSWORD}\n",
    "- secretRef: {name: sarjepa-s3, optional: true}\n",
    "token auth needs the synced token\n",
    'export AWS_SECRET_ACCESS_KEY="$MINIO_ROOT_PASSWORD"\n',
])
def test_credential_scan_passes_references(text):
    assert credential_findings(text) == []


# --- the local S3 store (MinIO compose) ---------------------------------------------------------

def test_minio_compose_is_pinned_loopback_and_makes_its_bucket():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    for name, service in services.items():
        image = service["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: unpinned {image}"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port} published beyond loopback"
    command = services["minio"]["command"]
    assert "--console-address :9001" in command, "inside the container the console must listen beyond loopback"
    maker = next(s for s in services.values() if "mc" in s["image"])
    assert "mc mb --ignore-existing local/sarjepa" in " ".join(maker["command"])
    assert maker["depends_on"]["minio"]["condition"] == "service_healthy"


# --- the deployment guide's AWS commands, against a local S3/IAM endpoint ------------------------

def doc_blocks(marker: str) -> str:
    text = (REPO / "docs" / "DEPLOY.md").read_text()
    match = re.search(rf"<!-- run-against-moto: {marker} -->\n```bash\n(.*?)```", text, re.S)
    assert match, f"docs/DEPLOY.md lost its {marker!r} block"
    return match.group(1)


@pytest.mark.slow
@pytest.mark.s3
def test_deploy_doc_aws_blocks_run(tmp_path):
    """The guide's bucket, IAM and data commands, verbatim but for the CLI path, run with `aws`
    against a moto server; then the roles and profiles they made are what the configs name."""
    import os
    import shutil
    import subprocess

    import boto3

    from sarjepa_dist.local_s3 import TEST_CREDENTIALS, local_s3_endpoint

    if shutil.which("aws") is None:
        pytest.skip("the AWS CLI (`aws`) is not installed on this machine")
    script = doc_blocks("aws-setup") + doc_blocks("data").replace(".venv/bin/sarjepa", f"'{sys.executable}' -m sarjepa_dist.cli")
    with local_s3_endpoint(set_env=False) as url:
        env = {**os.environ, **TEST_CREDENTIALS, "AWS_ENDPOINT_URL": url, "PYTHONPATH": str(REPO),
               "HOME": str(tmp_path)}
        env.pop("AWS_PROFILE", None)
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", **{
            "aws_access_key_id": TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]})
        node_types = launcher()["available_node_types"]
        for name in {nt["node_config"]["IamInstanceProfile"]["Name"] for nt in node_types.values()}:
            roles = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Roles"]
            assert [r["RoleName"] for r in roles] == [name]
        attached = {p["PolicyName"] for p in iam.list_attached_role_policies(RoleName="sarjepa-ray-head")["AttachedPolicies"]}
        assert attached == {"sarjepa-s3", "sarjepa-ray-autoscaler"}
        assert "10 classes" in done.stdout or "500" in done.stdout, done.stdout[-1000:]
