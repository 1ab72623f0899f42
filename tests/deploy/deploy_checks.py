"""Checks of the deployment files (deploy/k8s, deploy/docker) shared by the tests.

Every check returns a list of problems (strings); an empty list means the files are
right. The tests assert on these lists, and the mutation tests assert that a
deliberately broken copy of the manifests yields the expected problem, so no check
can pass vacuously.
"""

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import tempfile

import yaml

WSBRIDGED_CONTAINER = "wsbridged"
CONFIG_FLAG = "--config"
# Health service names the daemon publishes: "" is SERVING while every bridge serves
# (readiness); the admin service is SERVING while the process runs (liveness, startup).
# Both go NOT_SERVING when the drain starts.
LIVENESS_SERVICE = "wsbridge.admin.v1.AdminService"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                 "h": 3600.0}


def ParseDuration(text):
    """Seconds of a config duration such as "10s", "1.5s", "500ms" or "1m30s"."""
    text = str(text).strip()
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"not a duration: {text!r}")
    return total


def ListenPort(address):
    """(host, port) of "host:port" / "[v6]:port"."""
    host, _, port = str(address).rpartition(":")
    return host.strip("[]"), int(port)


def Overlays(k8s_dir):
    """Every directory under k8s_dir that kustomize can render, base first."""
    k8s_dir = pathlib.Path(k8s_dir)
    found = sorted(p.parent for p in k8s_dir.rglob("kustomization.yaml"))
    return [p for p in found if p.name == "base"] + [p for p in found if p.name != "base"]


def Render(kubectl, directory):
    """The objects `kubectl kustomize directory` renders, or raises with its stderr."""
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def PodTemplates(objects):
    """(object, pod spec, pod metadata) of every workload that runs pods."""
    out = []
    for obj in objects:
        kind = obj.get("kind")
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            template = obj["spec"]["template"]
            out.append((obj, template.get("spec", {}), template.get("metadata", {})))
        elif kind == "Pod":
            out.append((obj, obj.get("spec", {}), obj.get("metadata", {})))
    return out


def _Name(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def _AllContainers(pod_spec):
    return list(pod_spec.get("initContainers") or []) + list(pod_spec.get("containers") or [])


def _SecretNodes(node, path="config"):
    """(path, mapping) of every Secret-shaped value ({env|file|value: ...})."""
    if isinstance(node, dict):
        keys = set(node)
        if keys and keys <= {"env", "file", "value"}:
            yield path, node
            return
        for key, value in node.items():
            yield from _SecretNodes(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _SecretNodes(value, f"{path}[{i}]")


def _TlsFilePaths(config):
    """(path, file) of server TLS files; they hold keys and belong in a Secret."""
    tls = (config.get("server") or {}).get("tls") or {}
    for field in ("cert_file", "key_file", "client_ca_file"):
        if tls.get(field):
            yield f"config.server.tls.{field}", tls[field]


def _MountFor(container, volumes, path):
    """(volumeMount, volume) whose mountPath holds `path`, deepest first, or (None, None)."""
    best = (None, None)
    for mount in container.get("volumeMounts") or []:
        mount_path = mount["mountPath"].rstrip("/")
        if path == mount_path or path.startswith(mount_path + "/"):
            if best[0] is None or len(mount_path) > len(best[0]["mountPath"].rstrip("/")):
                best = (mount, volumes.get(mount["name"]))
    return best


class PodUnderTest:
    """A rendered pod template that runs wsbridged, with its config resolved."""

    def __init__(self, obj, pod_spec, pod_meta, objects):
        self.obj = obj
        self.name = _Name(obj)
        self.spec = pod_spec
        self.meta = pod_meta
        self.objects = objects
        self.volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
        self.containers = _AllContainers(pod_spec)
        self.wsbridged = next(c for c in self.containers if c["name"] == WSBRIDGED_CONTAINER)
        self.is_init = any(c is self.wsbridged for c in pod_spec.get("initContainers") or [])
        self.config_path = None
        self.config_text = None
        self.config = None

    def ResolveConfig(self):
        """Finds the config file the container is started with; returns problems."""
        args = list(self.wsbridged.get("command") or []) + list(self.wsbridged.get("args") or [])
        if CONFIG_FLAG not in args or args.index(CONFIG_FLAG) + 1 >= len(args):
            return [f"{self.name}: wsbridged is not started with {CONFIG_FLAG} FILE (args {args})"]
        self.config_path = args[args.index(CONFIG_FLAG) + 1]
        mount, volume = _MountFor(self.wsbridged, self.volumes, self.config_path)
        if mount is None or volume is None or "configMap" not in volume:
            return [f"{self.name}: {self.config_path} is not on a ConfigMap volume"]
        key = os.path.relpath(self.config_path, mount["mountPath"])
        if mount.get("subPath"):
            return [f"{self.name}: the config is mounted with subPath, so updates never "
                    "reach the pod and kustomize's rollout-on-change is bypassed"]
        cm_name = volume["configMap"]["name"]
        cm = next((o for o in self.objects
                   if o.get("kind") == "ConfigMap" and o["metadata"]["name"] == cm_name), None)
        if cm is None:
            return [f"{self.name}: ConfigMap {cm_name} is not part of the rendered objects"]
        for item in volume["configMap"].get("items") or []:
            if item["path"] == key:
                key = item["key"]
        if key not in (cm.get("data") or {}):
            return [f"{self.name}: ConfigMap {cm_name} has no key {key} for {self.config_path}"]
        self.config_text = cm["data"][key]
        self.config = yaml.safe_load(self.config_text) or {}
        return []


def FindPods(objects):
    """The pods that run wsbridged (PodUnderTest list) and problems on the way."""
    pods, problems = [], []
    for obj, spec, meta in PodTemplates(objects):
        names = [c["name"] for c in _AllContainers(spec)]
        if names.count(WSBRIDGED_CONTAINER) > 1:
            problems.append(f"{_Name(obj)}: more than one wsbridged container")
        if WSBRIDGED_CONTAINER in names:
            pod = PodUnderTest(obj, spec, meta, objects)
            problems += pod.ResolveConfig()
            pods.append(pod)
    return pods, problems


# ---- checks on one pod -------------------------------------------------------------

def CheckSecrets(pod):
    problems = []
    env = {e["name"]: e for e in pod.wsbridged.get("env") or []}
    for path, node in _SecretNodes(pod.config):
        if "value" in node:
            problems.append(f"{pod.name}: {path} inlines a secret value; use env: or file:")
        if "env" in node:
            var = env.get(node["env"])
            if var is None:
                if any("secretRef" in s for s in pod.wsbridged.get("envFrom") or []):
                    continue
                problems.append(f"{pod.name}: {path} names env {node['env']}, which the "
                                "wsbridged container does not set")
            elif "secretKeyRef" not in (var.get("valueFrom") or {}):
                problems.append(f"{pod.name}: env {node['env']} ({path}) is not taken from a "
                                "Secret (valueFrom.secretKeyRef)")
        if "file" in node:
            problems += _CheckOnSecretVolume(pod, path, node["file"])
    for path, file in _TlsFilePaths(pod.config):
        problems += _CheckOnSecretVolume(pod, path, file)
    # Literal values of credential-looking variables in any container are inlined secrets.
    for container in pod.containers:
        for var in container.get("env") or []:
            if re.search(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY", var["name"], re.I) and \
                    "value" in var:
                problems.append(f"{pod.name}: container {container['name']} sets "
                                f"{var['name']} literally; take it from a Secret")
    return problems


def _CheckOnSecretVolume(pod, path, file):
    mount, volume = _MountFor(pod.wsbridged, pod.volumes, file)
    if volume is None:
        return [f"{pod.name}: {path} ({file}) is on no mounted volume"]
    if "secret" not in volume and "csi" not in volume:
        return [f"{pod.name}: {path} ({file}) is not on a Secret volume"]
    return []


def CheckProbes(pod):
    problems = []
    server = pod.config.get("server") or {}
    admin = pod.config.get("admin") or {}
    tls = bool(server.get("tls"))
    grpc_port = ListenPort(server["listen"])[1] if server.get("listen") else None
    admin_port = ListenPort(admin["listen"])[1] if admin.get("listen") else None
    ports = {p["containerPort"] for p in pod.wsbridged.get("ports") or []}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = pod.wsbridged.get(kind)
        if not probe:
            problems.append(f"{pod.name}: wsbridged has no {kind}")
            continue
        if "grpc" in probe:
            if tls:
                problems.append(f"{pod.name}: {kind} is a gRPC probe, but the gRPC listener "
                                "uses TLS, which the kubelet's gRPC probe cannot speak")
            if grpc_port is None:
                problems.append(f"{pod.name}: {kind} is a gRPC probe, but server.listen is "
                                "empty")
            elif probe["grpc"].get("port") != grpc_port:
                problems.append(f"{pod.name}: {kind} probes gRPC port "
                                f"{probe['grpc'].get('port')}, config listens on {grpc_port}")
            else:
                host = ListenPort(server["listen"])[0]
                if host in ("127.0.0.1", "localhost", "::1"):
                    problems.append(f"{pod.name}: {kind} targets {server['listen']}, a "
                                    "loopback listener the kubelet cannot reach")
            want = "" if kind == "readinessProbe" else LIVENESS_SERVICE
            if (probe["grpc"].get("service") or "") != want:
                problems.append(f"{pod.name}: {kind} checks service "
                                f"{probe['grpc'].get('service')!r}, expected {want!r}")
        elif "httpGet" in probe:
            if not tls:
                problems.append(f"{pod.name}: {kind} is HTTP although the gRPC listener is "
                                "plaintext: use a native gRPC probe (grpc.health.v1)")
            want = "/readyz" if kind == "readinessProbe" else "/healthz"
            if probe["httpGet"].get("path") != want:
                problems.append(f"{pod.name}: {kind} gets {probe['httpGet'].get('path')}, "
                                f"expected {want}")
            if admin_port is None or probe["httpGet"].get("port") not in (admin_port, "admin"):
                problems.append(f"{pod.name}: {kind} gets port "
                                f"{probe['httpGet'].get('port')}, admin listens on {admin_port}")
        else:
            problems.append(f"{pod.name}: {kind} is neither gRPC nor HTTP")
    for port, what in ((grpc_port, "gRPC"), (admin_port, "admin")):
        if port is not None and port not in ports:
            problems.append(f"{pod.name}: {what} port {port} is not a containerPort")
    return problems


def PreStopSeconds(container):
    """Seconds a preStop `sleep N` hook waits (0 without one)."""
    hook = ((container.get("lifecycle") or {}).get("preStop")) or {}
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = (hook.get("exec") or {}).get("command") or []
    if command and os.path.basename(command[0]) == "sleep":
        return ParseDuration(command[1] if re.search(r"[a-z]$", command[1]) else command[1] + "s")
    if command:
        raise ValueError(f"unrecognised preStop hook {command}")
    return 0.0


def CheckGracePeriod(pod):
    problems = []
    shutdown = pod.config.get("shutdown") or {}
    drain = ParseDuration(shutdown.get("drain_timeout", "10s"))
    deadline = ParseDuration(shutdown.get("deadline", "15s"))
    if not deadline > drain:
        problems.append(f"{pod.name}: shutdown.deadline ({deadline}s) must exceed "
                        f"drain_timeout ({drain}s)")
    grace = pod.spec.get("terminationGracePeriodSeconds", 30)
    pre_stop = PreStopSeconds(pod.wsbridged)
    if not grace > pre_stop + deadline:
        problems.append(f"{pod.name}: terminationGracePeriodSeconds ({grace}) must exceed "
                        f"preStop ({pre_stop}s) + shutdown.deadline ({deadline}s)")
    return problems


def CheckSecurity(pod):
    problems = []
    pod_sc = pod.spec.get("securityContext") or {}
    for c in pod.containers:
        sc = c.get("securityContext") or {}
        where = f"{pod.name}: container {c['name']}"
        if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
            problems.append(f"{where} may run as root (runAsNonRoot not true)")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{where} runs as UID 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where} allows privilege escalation")
        if sc.get("privileged"):
            problems.append(f"{where} is privileged")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            problems.append(f"{where} does not drop ALL capabilities")
        if (sc.get("capabilities") or {}).get("add"):
            problems.append(f"{where} adds capabilities")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where} has a writable root file system")
    if pod.spec.get("hostNetwork") or pod.spec.get("hostPID") or pod.spec.get("hostIPC"):
        problems.append(f"{pod.name}: uses host namespaces")
    return problems


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|k|M|G)?$")
_QUANTITY_SCALE = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024,
                   "Mi": 1024 ** 2, "Gi": 1024 ** 3}


def ParseQuantity(q):
    match = _QUANTITY.match(str(q))
    if not match:
        raise ValueError(f"not a quantity: {q!r}")
    return float(match.group(1)) * _QUANTITY_SCALE[match.group(2)]


def CheckResources(pod):
    problems = []
    for c in pod.containers:
        res = c.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        where = f"{pod.name}: container {c['name']}"
        for what in ("cpu", "memory"):
            if what not in req:
                problems.append(f"{where} has no {what} request")
        if "memory" not in lim:
            problems.append(f"{where} has no memory limit")
        for what in ("cpu", "memory"):
            if what in req and what in lim and ParseQuantity(req[what]) > ParseQuantity(lim[what]):
                problems.append(f"{where}: {what} request exceeds its limit")
    return problems


def CheckScrape(pod):
    annotations = pod.meta.get("annotations") or {}
    admin = pod.config.get("admin") or {}
    if not admin.get("listen"):
        return [f"{pod.name}: admin.listen is empty, so there is no /metrics to scrape"]
    port = ListenPort(admin["listen"])[1]
    problems = []
    if annotations.get("prometheus.io/scrape") != "true":
        problems.append(f"{pod.name}: pod lacks prometheus.io/scrape: \"true\"")
    if annotations.get("prometheus.io/port") != str(port):
        problems.append(f"{pod.name}: prometheus.io/port is "
                        f"{annotations.get('prometheus.io/port')}, admin listens on {port}")
    if annotations.get("prometheus.io/path", "/metrics") != "/metrics":
        problems.append(f"{pod.name}: prometheus.io/path is not /metrics")
    return problems


def CheckUnixSocket(pod):
    """A Unix socket must sit on an emptyDir shared with another container."""
    server = pod.config.get("server") or {}
    socket = server.get("unix_socket")
    if not socket:
        return []
    problems = []
    mount, volume = _MountFor(pod.wsbridged, pod.volumes, socket)
    if volume is None or "emptyDir" not in volume:
        return [f"{pod.name}: the Unix socket {socket} is not on an emptyDir volume"]
    sharers = [c["name"] for c in pod.containers if c is not pod.wsbridged and
               any(m["name"] == mount["name"] for m in c.get("volumeMounts") or [])]
    if not sharers:
        problems.append(f"{pod.name}: no other container mounts {mount['name']}, so nothing "
                        f"can reach {socket}")
    mode = int(str(server.get("unix_socket_mode", "0660")), 8)
    if mode & 0o007:
        problems.append(f"{pod.name}: unix_socket_mode {oct(mode)} opens the socket to others")
    if pod.is_init and pod.wsbridged.get("restartPolicy") != "Always":
        problems.append(f"{pod.name}: wsbridged is an init container without restartPolicy: "
                        "Always, so it exits before the application starts")
    return problems


def SimulatePod(pod, workdir, config_override=None):
    """Lays out what the kubelet would give wsbridged: the pod's environment
    (placeholder values for Secret references) and its volumes under `workdir`
    (ConfigMap config, Secret files with throwaway PEM material or placeholder text,
    empty emptyDirs), with mount paths in the config rewritten to match.
    Returns (config file, environment)."""
    root = pathlib.Path(workdir) / pod.name.replace("/", "_")
    root.mkdir(parents=True, exist_ok=True)
    text = pod.config_text if config_override is None else config_override(pod.config)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for var in pod.wsbridged.get("env") or []:
        env[var["name"]] = var.get("value", f"placeholder-{var['name'].lower()}")
    referenced = {node["file"] for _, node in _SecretNodes(pod.config) if "file" in node}
    referenced |= {f for _, f in _TlsFilePaths(pod.config)}
    mounts = sorted(pod.wsbridged.get("volumeMounts") or [],
                    key=lambda m: -len(m["mountPath"]))
    for mount in mounts:
        local = root / mount["name"]
        local.mkdir(parents=True, exist_ok=True)
        volume = pod.volumes.get(mount["name"]) or {}
        if "secret" in volume:
            for path in referenced:
                if path.startswith(mount["mountPath"].rstrip("/") + "/"):
                    _WriteSecretFile(local / os.path.relpath(path, mount["mountPath"]), root)
        text = text.replace(mount["mountPath"].rstrip("/") + "/", str(local) + "/")
    config_file = root / "wsbridged.yaml"
    config_file.write_text(text)
    return config_file, env


def CheckWsbridgedConfig(pod, wsbridged, workdir):
    """Runs `wsbridged --config FILE --check` on the pod's config as the pod would
    see it (SimulatePod)."""
    config_file, env = SimulatePod(pod, workdir)
    result = subprocess.run([wsbridged, CONFIG_FLAG, str(config_file), "--check"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        return [f"{pod.name}: wsbridged --check rejects the ConfigMap's config "
                f"(exit {result.returncode}): {result.stderr.strip() or result.stdout.strip()}"]
    return []


def _WriteSecretFile(path, root):
    path.parent.mkdir(parents=True, exist_ok=True)
    pki = root / "pki"
    if not (pki / "tls.crt").exists():
        pki.mkdir(exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                        "-subj", "/CN=wsbridge.test", "-addext",
                        "subjectAltName=DNS:wsbridge.test", "-keyout", str(pki / "tls.key"),
                        "-out", str(pki / "tls.crt")], check=True, capture_output=True)
    name = path.name
    if name.endswith((".crt", ".pem")) or "ca" in name:
        shutil.copy(pki / "tls.crt", path)
    elif name.endswith(".key"):
        shutil.copy(pki / "tls.key", path)
    else:
        path.write_text("placeholder-secret\n")


# ---- checks on a whole rendering -----------------------------------------------------

def _Selects(selector, labels):
    match = (selector or {}).get("matchLabels") or selector or {}
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def CheckObjects(objects, name):
    """Checks across the rendered objects of one overlay."""
    problems = []
    for obj in objects:
        if obj.get("kind") == "Secret":
            problems.append(f"{name}: renders Secret {obj['metadata']['name']}; secrets are "
                            "created by the operator and only referenced here")
    workloads = {(o["kind"], o["metadata"]["name"]): o for o in objects
                 if o.get("kind") in ("Deployment", "StatefulSet")}
    hpas = [o for o in objects if o.get("kind") == "HorizontalPodAutoscaler"]
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        target = workloads.get((ref["kind"], ref["name"]))
        if target is None:
            problems.append(f"{name}: HPA {hpa['metadata']['name']} scales "
                            f"{ref['kind']}/{ref['name']}, which is not rendered")
            continue
        if "replicas" in target["spec"]:
            problems.append(f"{name}: {ref['kind']}/{ref['name']} sets replicas although an "
                            "HPA owns the count")
        if hpa["spec"].get("minReplicas", 1) < 2:
            problems.append(f"{name}: HPA minReplicas < 2 leaves no replica during a drain")
        rolling = (target["spec"].get("strategy") or {}).get("rollingUpdate") or {}
        if str(rolling.get("maxUnavailable", "25%")) not in ("0", "0%"):
            problems.append(f"{name}: {ref['name']} rollout may take a replica away before its "
                            "successor is ready (maxUnavailable != 0)")
    pod_labels = [(o, o["spec"]["template"]["metadata"].get("labels") or {})
                  for o in workloads.values()]
    for obj in objects:
        if obj.get("kind") == "PodDisruptionBudget":
            if not any(_Selects(obj["spec"].get("selector"), labels) for _, labels in pod_labels):
                problems.append(f"{name}: PDB {obj['metadata']['name']} selects no pods")
        if obj.get("kind") == "Service":
            selected = [(o, l) for o, l in pod_labels if _Selects(obj["spec"].get("selector"), l)]
            if not selected:
                problems.append(f"{name}: Service {obj['metadata']['name']} selects no pods")
            for o, _ in selected:
                spec = o["spec"]["template"]["spec"]
                ports = {p.get("name"): p["containerPort"] for c in _AllContainers(spec)
                         for p in c.get("ports") or []}
                for port in obj["spec"].get("ports") or []:
                    target = port.get("targetPort", port["port"])
                    if target not in ports and target not in ports.values():
                        problems.append(f"{name}: Service {obj['metadata']['name']} targets "
                                        f"port {target}, which {_Name(o)} does not expose")
    if hpas and not any(o.get("kind") == "PodDisruptionBudget" for o in objects):
        problems.append(f"{name}: an autoscaled pool without a PodDisruptionBudget")
    return problems


def CheckOverlay(kubectl, directory, wsbridged=None):
    """Every check on one kustomize directory; returns problems."""
    name = str(directory)
    try:
        objects = Render(kubectl, directory)
    except RuntimeError as e:
        return [str(e)]
    problems = CheckObjects(objects, name)
    pods, found = FindPods(objects)
    problems += found
    if not pods:
        problems.append(f"{name}: no pod runs a container named {WSBRIDGED_CONTAINER}")
    with tempfile.TemporaryDirectory(prefix="wsbridge-deploy-") as workdir:
        for pod in pods:
            if pod.config is None:
                continue
            for check in (CheckSecrets, CheckProbes, CheckGracePeriod, CheckSecurity,
                          CheckResources, CheckScrape, CheckUnixSocket):
                problems += check(pod)
            if wsbridged:
                problems += CheckWsbridgedConfig(pod, wsbridged, workdir)
    return [f"{p}" for p in problems]


# ---- the Dockerfile ------------------------------------------------------------------

def ParseDockerfile(text):
    """[(instruction, arguments)] with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        instruction, _, args = current.partition(" ")
        lines.append((instruction.upper(), args.strip()))
        current = ""
    return lines


def Stages(instructions):
    """[{'from': image, 'name': alias, 'body': [(instr, args)]}]"""
    stages = []
    for instruction, args in instructions:
        if instruction == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append({"from": words[0], "name": alias, "body": []})
        elif stages:
            stages[-1]["body"].append((instruction, args))
    return stages


def _JsonArgs(args):
    import json
    args = args.strip()
    if args.startswith("["):
        return json.loads(args)
    return shlex.split(args)


_SECRETISH = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|PRIVATE", re.I)


def CheckDockerfile(text, binary_rel_path, runtime_packages_needed=(), k8s_config_path=None):
    """binary_rel_path: wsbridged's path relative to the CMake build dir (e.g.
    "daemon/wsbridged"). runtime_packages_needed: Debian packages the binary's direct
    shared-library dependencies come from, minus what bookworm-slim always has."""
    problems = []
    stages = Stages(ParseDockerfile(text))
    if len(stages) < 2:
        return [f"Dockerfile: expected a build stage and a runtime stage, found {len(stages)}"]
    build = next((s for s in stages if s["name"] == "build"), None)
    final = stages[-1]
    if build is None:
        problems.append("Dockerfile: no stage named 'build'")
    elif not re.fullmatch(r"debian:bookworm(@sha256:[0-9a-f]{64})?", build["from"]):
        problems.append(f"Dockerfile: build stage is FROM {build['from']}, not debian:bookworm")
    if not re.fullmatch(r"debian:bookworm-slim(@sha256:[0-9a-f]{64})?", final["from"]):
        problems.append(f"Dockerfile: runtime stage is FROM {final['from']}, not "
                        "debian:bookworm-slim")

    body = final["body"]
    users = [a for i, a in body if i == "USER"]
    if not users:
        problems.append("Dockerfile: the runtime stage sets no USER (it would run as root)")
    else:
        uid = users[-1].split(":")[0]
        if not uid.isdigit():
            problems.append(f"Dockerfile: USER {users[-1]} is not numeric, so runAsNonRoot "
                            "cannot verify it")
        elif int(uid) == 0:
            problems.append("Dockerfile: USER is root")

    build_dir = None
    if build is not None:
        for instruction, args in build["body"]:
            if instruction == "RUN":
                match = re.search(r"cmake\s[^&;]*?-B\s*(\S+)", args)
                if match:
                    build_dir = match.group(1)
                if "-DWSBRIDGE_SANITIZE=ON" in args:
                    problems.append("Dockerfile: the image is built with sanitizers")
        workdir = next((a for i, a in reversed(build["body"]) if i == "WORKDIR"), "/")
        if build_dir is None:
            problems.append("Dockerfile: the build stage runs no `cmake ... -B DIR`")
        else:
            build_dir = os.path.normpath(os.path.join(workdir, build_dir))
    copies = [a for i, a in body if i == "COPY" and "--from=build" in a]
    binary_dest = None
    if not copies:
        problems.append("Dockerfile: the runtime stage copies nothing from the build stage")
    elif build_dir is not None:
        want = os.path.normpath(os.path.join(build_dir, binary_rel_path))
        sources = []
        for args in copies:
            words = [w for w in args.split() if not w.startswith("--")]
            sources.append(words[:-1])
            if want in [os.path.normpath(w) for w in words[:-1]]:
                binary_dest = words[-1]
        if binary_dest is None:
            problems.append(f"Dockerfile: nothing copies {want} (where CMake puts wsbridged) "
                            f"from the build stage; copied: {sources}")

    entry = next((a for i, a in reversed(body) if i == "ENTRYPOINT"), None)
    cmd = next((a for i, a in reversed(body) if i == "CMD"), None)
    if entry is None:
        problems.append("Dockerfile: no ENTRYPOINT")
    else:
        entry_words = _JsonArgs(entry)
        if not entry.strip().startswith("["):
            problems.append("Dockerfile: ENTRYPOINT in shell form: SIGTERM would reach the "
                            "shell, not wsbridged")
        if binary_dest is not None and entry_words[0] != binary_dest:
            problems.append(f"Dockerfile: ENTRYPOINT runs {entry_words[0]}, the binary is "
                            f"copied to {binary_dest}")
        args = entry_words[1:] + (_JsonArgs(cmd) if cmd else [])
        if CONFIG_FLAG not in args:
            problems.append("Dockerfile: wsbridged is not started with --config by default")
        elif k8s_config_path is not None and args[args.index(CONFIG_FLAG) + 1] != k8s_config_path:
            problems.append(f"Dockerfile: default config {args[args.index(CONFIG_FLAG) + 1]} "
                            f"differs from the manifests' {k8s_config_path}")
    for stage in stages:
        for instruction, args in stage["body"]:
            if instruction in ("ENV", "ARG", "LABEL"):
                for word in re.split(r"[\s=]+", args):
                    if _SECRETISH.search(word):
                        problems.append(f"Dockerfile: {instruction} {args} looks like a baked-in "
                                        "secret; pass secrets at run time")
                        break
            if instruction in ("COPY", "ADD"):
                words = [w for w in args.split() if not w.startswith("--")]
                for w in words[:-1]:
                    if re.search(r"\.(pem|key|crt|p12|env)$|secret|token", w, re.I):
                        problems.append(f"Dockerfile: {instruction} {w} puts secret material in "
                                        "the image")
            if instruction == "RUN" and re.search(r"--mount=type=secret", args) is None and \
                    re.search(r"(TOKEN|PASSWORD)=\S", args):
                problems.append(f"Dockerfile: RUN sets a credential inline: {args[:60]}")
    installed = set()
    for instruction, args in body:
        if instruction == "RUN" and "apt-get install" in args:
            segment = args.split("apt-get install", 1)[1].split("&&")[0]
            installed |= {w for w in segment.split() if not w.startswith("-")}
    for package in runtime_packages_needed:
        if package not in installed:
            problems.append(f"Dockerfile: the runtime stage does not install {package}, which "
                            "wsbridged links against")
    if "ca-certificates" not in installed:
        problems.append("Dockerfile: no ca-certificates in the runtime stage: wss:// upstreams "
                        "could not be verified")
    return problems


def RuntimePackagesNeeded(binary):
    """Debian packages that hold the binary's direct (DT_NEEDED) libraries, except those
    every bookworm-slim image has (_SlimBasePackages)."""
    dynamic = subprocess.run(["readelf", "-d", binary], capture_output=True, text=True,
                             check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)
    ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    paths = dict(re.findall(r"^\s*(\S+) => (\S+)", ldd, re.M))
    base = _SlimBasePackages()
    packages = set()
    for soname in needed:
        path = paths.get(soname)
        if path is None or path == "not":
            raise RuntimeError(f"{binary}: {soname} does not resolve")
        owner = _DpkgOwner(path).split(":")[0]
        if owner not in base:
            packages.add(owner)
    return sorted(packages)


def _SlimBasePackages():
    """Essential and priority-required packages and everything they depend on: what a
    debian:bookworm-slim image always contains (computed from this Debian host)."""
    listing = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Essential}\t${Priority}\t${Pre-Depends}, "
         "${Depends}\n"], capture_output=True, text=True, check=True).stdout
    depends, todo = {}, []
    for line in listing.splitlines():
        name, essential, priority, deps = (line.split("\t") + ["", "", ""])[:4]
        depends[name] = [re.split(r"[\s(:]", alt.split("|")[0].strip())[0]
                         for alt in deps.split(",") if alt.strip()]
        if essential == "yes" or priority == "required":
            todo.append(name)
    base = set()
    while todo:
        name = todo.pop()
        if name not in base:
            base.add(name)
            todo.extend(depends.get(name, []))
    return base


def _DpkgOwner(path):
    """The package that owns a library file (tries the /usr-merged spellings too)."""
    candidates = [path, os.path.realpath(path)]
    candidates += ["/usr" + c for c in list(candidates) if not c.startswith("/usr/")]
    for candidate in candidates:
        result = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True,
                                check=False)
        if result.returncode == 0:
            # "libgrpc++1.51:amd64: /usr/lib/..." (several owners are comma-separated)
            return result.stdout.split(": ", 1)[0].split(",")[0].strip()
    raise RuntimeError(f"no Debian package owns {path}")
