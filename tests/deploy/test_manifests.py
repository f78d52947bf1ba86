"""The deploy/ artifacts are complete and valid: the runtime image, the Knative Service, the
OpenWhisk action document, the KubeRay RayService, the Ray Serve config and the Kubernetes services
they need.

Core Kubernetes kinds are checked with kubernetes-validate's strict schemas; the custom resources
against their upstream CRD schemas (vendored in schemas/, see its README) and OpenWhisk's action
document against its API's ActionPut schema, all strictly (unknown fields fail, as with the API
server's strict field validation). Beyond shape, every runtime's init value must be one the
runtime accepts and must name the KeyService and store services the cluster actually has.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from veil.runtime.tee_action import core_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SCHEMAS = Path(__file__).parent / "schemas"
K8S_VERSION = "1.37.0"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def strict(schema: Any) -> Any:
    """A CRD/OpenAPI schema as the API server applies it with strict field validation."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


def _validate(instance: Any, schema: dict[str, Any]) -> None:
    validator = jsonschema.Draft7Validator(strict(schema))
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


def _core(doc: dict[str, Any]) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    try:
        kv.validate(doc, K8S_VERSION, strict=True)
    except kv.ValidationError as exc:
        where = "/".join(map(str, getattr(exc, "path", ()))) or "?"
        what = getattr(exc, "message", str(exc).splitlines()[0])
        raise AssertionError(f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}: {where}: {what}") from None


def _pod_template(template: dict[str, Any], name: str) -> dict[str, Any]:
    """An embedded pod template as the core kind PodTemplate, for kubernetes-validate."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def _crd_schema(file: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / file).read_text())["schema"]


def _service_urls() -> dict[str, str]:
    """In-cluster URL of every Service in deploy/kubernetes/services.yaml."""
    urls = {}
    for doc in _docs(DEPLOY / "kubernetes" / "services.yaml"):
        if doc["kind"] == "Service":
            meta, port = doc["metadata"], doc["spec"]["ports"][0]["port"]
            urls[meta["name"]] = f"http://{meta['name']}.{meta['namespace']}.svc.cluster.local:{port}"
    return urls


def check_init(init: Any, *, in_cluster: bool = True) -> None:
    """A TEE init value the runtime accepts, naming a KeyService and an HTTP store service."""
    assert isinstance(init, dict) and init.get("kind") == "tee", init
    for name in ("keyservice_url", "store"):
        assert isinstance(init.get(name), str) and urlsplit(init[name]).scheme in ("http", "https"), (name, init)
    core_config(init)  # the runtime's own checks of the sizes
    if in_cluster:
        urls = _service_urls()
        assert init["keyservice_url"] == urls["veil-keyservice"], init
        assert init["store"] == urls["veil-store"], init


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# -- the image --------------------------------------------------------------------------------------
def test_dockerfile_installs_ray_honours_veil_host_and_runs_the_runtime():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r'^ARG VEIL_EXTRAS="ray"$', text, re.M), "the default image must install veil[ray]"
    assert 'pip install --no-compile ".${VEIL_EXTRAS:+[$VEIL_EXTRAS]}"' in text
    assert re.search(r"^\s+VEIL_HOST=0\.0\.0\.0 \\$", text, re.M), "containers must listen beyond loopback"
    assert re.search(r"^\s+VEIL_PORT=8080$", text, re.M) and re.search(r"^EXPOSE 8080$", text, re.M)
    assert re.search(r'^CMD \["python", "-m", "veil.runtime"\]$', text, re.M)
    assert re.search(r"^USER 10001$", text, re.M)
    # and the runtime honours it: VEIL_HOST wins over the OpenWhisk default
    main = (REPO / "src" / "veil" / "runtime" / "__main__.py").read_text()
    assert 'os.environ.get(\n        "VEIL_HOST"' in main


# -- Kubernetes services -----------------------------------------------------------------------------
def test_kubernetes_services_are_valid_core_objects():
    docs = _docs(DEPLOY / "kubernetes" / "services.yaml")
    assert {d["kind"] for d in docs} >= {"Namespace", "Service", "StatefulSet", "Deployment"}
    for doc in docs:
        _core(doc)
    assert set(_service_urls()) == {"veil-keyservice", "veil-store"}
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    ks = by_name[("StatefulSet", "veil-keyservice")]["spec"]["template"]["spec"]["containers"][0]
    assert ks["command"] == ["python", "-m", "veil.keyservice"] and "0.0.0.0" in ks["args"]
    store = by_name[("Deployment", "veil-store")]["spec"]["template"]["spec"]["containers"][0]
    assert store["command"][-2:] == ["store", "serve"] and "--write-token-file" in store["args"]


# -- Knative -----------------------------------------------------------------------------------------
def test_knative_service_is_valid_and_complete():
    (doc,) = _docs(DEPLOY / "knative" / "service.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("serving.knative.dev/v1", "Service")
    _validate(doc, _crd_schema("knative-service-v1.json"))
    # the revision's pod spec, less Knative's own fields, is a valid core pod template
    spec = copy.deepcopy(doc["spec"]["template"]["spec"])
    concurrency = spec.pop("containerConcurrency")
    spec.pop("timeoutSeconds")
    for c in spec["containers"]:  # Knative defaults a probe's port to the container's port
        for probe in ("readinessProbe", "livenessProbe"):
            if "httpGet" in c.get(probe, {}):
                c[probe]["httpGet"].setdefault("port", c["ports"][0]["containerPort"])
    _core(_pod_template({"metadata": doc["spec"]["template"]["metadata"], "spec": spec}, "veil-tee"))
    (container,) = spec["containers"]
    env = _env(container)
    # the init value is whole (the old '{"kind": "tee"}' made the process exit at start)
    check_init(json.loads(env["VEIL_INIT"]))
    assert env["VEIL_HOST"] == "0.0.0.0" and env["VEIL_PORT"] == str(container["ports"][0]["containerPort"])
    assert int(env["VEIL_THREADS"]) == concurrency
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["VEIL_SIM_ROOT"] == f"{mounts['sim-root']}/sim-root.key"


# -- OpenWhisk ---------------------------------------------------------------------------------------
# OpenWhisk's default system limits (common/scala/src/main/resources/application.conf)
OW_LIMITS = {"memory": (128, 512), "timeout": (100, 300_000), "logs": (0, 10)}


def openwhisk_actions() -> dict[str, dict[str, Any]]:
    return yaml.safe_load((DEPLOY / "openwhisk" / "action.yaml").read_text())["actions"]


def test_openwhisk_action_is_a_valid_action_put_with_the_init_value_as_init_parameter():
    schema = json.loads((SCHEMAS / "openwhisk-action-put.json").read_text())
    actions = openwhisk_actions()
    assert "veil-tee" in actions
    for name, action in actions.items():
        _validate(action, schema)
        assert action["name"] == name and action["exec"] == {"kind": "blackbox", "image": action["exec"]["image"]}
        for limit, (lo, hi) in OW_LIMITS.items():
            assert lo <= action["limits"][limit] <= hi, (name, limit)
        params = {p["key"]: p for p in action["parameters"]}
        init = params["VEIL_INIT"]
        # an init parameter (delivered in /init's value.env), never a default /run parameter
        assert init["init"] is True and isinstance(init["value"], str)
        check_init(json.loads(init["value"]), in_cluster=False)
        assert all(p.get("init") is True for p in params.values()), "every setting is an init parameter"
        assert params["VEIL_THREADS"]["value"] == str(action["limits"]["concurrency"])
        annotations = {a["key"]: a["value"] for a in action["annotations"]}
        assert annotations["provide-api-key"] is False


# -- Ray ---------------------------------------------------------------------------------------------
def _check_serve_config(config: dict[str, Any]) -> list[dict[str, Any]]:
    """A Serve config Ray itself accepts, whose args are a FunctionSpec (and RayOptions)."""
    schema = pytest.importorskip("ray.serve.schema")
    schema.ServeDeploySchema.model_validate(config)
    from veil.platform.ray_serve.options import RayOptions
    from veil.platform.spec import FunctionSpec

    args_list = []
    for app in config["applications"]:
        assert app["import_path"] == "veil.platform.ray_serve:app_builder"
        args = app["args"]
        unknown = set(args) - set(FunctionSpec.__dataclass_fields__) - {"ray", "routing"}
        assert not unknown, f"not FunctionSpec fields: {unknown}"
        FunctionSpec(**{k: v for k, v in args.items() if k not in ("ray", "routing")}).validate()
        if "ray" in args:
            RayOptions.from_json(args["ray"])
        args_list.append(args)
    return args_list


def test_serve_config_is_accepted_by_ray_and_has_a_whole_init_value():
    (args,) = _check_serve_config(yaml.safe_load((DEPLOY / "ray" / "serve_config.yaml").read_text()))
    check_init(args["init_value"], in_cluster=False)


def test_rayservice_is_valid_and_pins_replicas_to_the_tee_group():
    (doc,) = _docs(DEPLOY / "ray" / "rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    _validate(doc, _crd_schema("kuberay-rayservice-v1.json"))
    cluster = doc["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}
    for name, group in groups.items():
        _core(_pod_template(group["template"], name))
    (args,) = _check_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    check_init(args["init_value"])
    import ray

    assert cluster["rayVersion"] == ray.__version__, "the image's Ray and the cluster's must match"
    # replicas need the `tee` resource, which only the TEE worker group offers
    wanted = set(args["ray"]["resources"])
    offered = {
        name: set(json.loads(json.loads(g["rayStartParams"].get("resources", '"{}"')))) for name, g in groups.items()
    }
    assert wanted == {"tee"} and offered["tee"] >= wanted and not offered["head"] & wanted
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"
    # the simulation root the replicas' runtimes are told about is mounted on that group
    (worker,) = groups["tee"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
    assert args["env"]["VEIL_SIM_ROOT"] == f"{mounts['sim-root']}/sim-root.key"


def test_strict_validation_catches_a_misspelt_field():
    """The checks above would see a typo (the API server would refuse it or drop it silently)."""
    (doc,) = _docs(DEPLOY / "knative" / "service.yaml")
    doc["spec"]["template"]["spec"]["containerConcurency"] = 4
    with pytest.raises(AssertionError, match="containerConcurency"):
        _validate(doc, _crd_schema("knative-service-v1.json"))
    action = openwhisk_actions()["veil-tee"]
    action["limits"]["memorySize"] = 512
    with pytest.raises(AssertionError, match="memorySize"):
        _validate(action, json.loads((SCHEMAS / "openwhisk-action-put.json").read_text()))
    services = _docs(DEPLOY / "kubernetes" / "services.yaml")
    deployment = next(d for d in services if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(AssertionError):
        _core(deployment)
