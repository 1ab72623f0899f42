#!/usr/bin/python3
"""The docs cannot rot: checks README.md, examples/README.md and docs/ against the code and runs their commands.

  --check config    every field of every config message (proto/wsbridge/config/v1) has a row in
                    docs/config.md, with the default the loader applies; no row names a field
                    that does not exist; the full example configs pass `wsbridged --check`.
  --check metrics   every metric the daemon and the bridges register (scraped from /metrics of a
                    real wsbridged with all four bridges, plus the names registered in the
                    sources) has a row in docs/operations.md with its type and labels; no row
                    names a metric that does not exist.
  --check links     every relative link of README.md and docs/ names a file that exists, and
                    a heading of it for #anchors.
  --check commands  every command of the ```sh blocks of README.md and docs/**/*.md is run
                    against a real wsbridged running the demo config (deploy/config/demo.yaml:
                    bridges dfx, nlx, emogg, nexora) in front of a real wsbridge-emulator,
                    both started here on free ports.

Conventions of the ```sh blocks (docs/operations.md, "Commands in the docs"):
  - A block runs as one bash script from the repository root, command after command, so a
    variable set by one command is seen by the next. Every command must exit 0, unless its
    last line ends with `# exit N` (then it must exit N).
  - A line `# => TEXT` right after a command: the command's output (stdout + stderr) must
    contain TEXT.
  - The demo's addresses are replaced by the test daemon's: 127.0.0.1:50051 (gRPC), the Unix
    socket /tmp/wsbridge/wsbridged.sock, 127.0.0.1:9090 (admin). WSBRIDGE_TARGET is set to
    the gRPC address. wsbridged, wsbridge-emulator and wsbridgectl are on PATH.
  - Commands that cannot run here (they need docker or kubectl, start the demo on its
    fixed ports, or run the whole test suite) are listed in NOT_RUN below with the test
    that covers them; commands that run until stopped are listed in LONG_RUNNING with the
    output that shows they started (the test starts them, waits for it, stops them with
    SIGTERM and expects exit 0). An entry no doc uses any more is an error too.
"""
import argparse
import glob
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

# Command (whitespace-normalised) -> (why it is not run here, the test that covers it).
NOT_RUN = {
    "scripts/run.sh": (
        "starts the demo on its fixed ports and runs until Ctrl-C",
        "run_script_test (tests/run/): runs scripts/run.sh for real on free ports"),
    "scripts/test.sh": (
        "is the whole test suite (it runs this test)",
        ".ci/run"),
    'export PATH="$PWD/build/run/tools/wsbridgectl:$PATH"': (
        "would put the demo's build on PATH; this test puts its own build there",
        "this test (every later command runs the wsbridgectl of its build)"),
    "docker build -f deploy/docker/Dockerfile -t registry.example/wsbridged:0.1.0 .": (
        "needs a container engine", "deploy_dockerfile"),
    "docker run --rm -e WSBRIDGE_AUTH_TOKEN=x -e WSBRIDGE_DFX_DEVICE_TOKEN=x -v "
    "$PWD/my.yaml:/etc/wsbridge/wsbridged.yaml:ro registry.example/wsbridged:0.1.0 --config "
    "/etc/wsbridge/wsbridged.yaml --check": (
        "needs a container engine", "deploy_dockerfile"),
    "kubectl create secret generic wsbridge-dfx --from-literal=device-token=\"$DFX_DEVICE_TOKEN\"": (
        "needs a Kubernetes cluster", "deploy_k8s_manifests, deploy_k8s_live"),
    "kubectl create secret generic wsbridge-caller --from-literal=auth-token=\"$(openssl rand -hex 32)\"": (
        "needs a Kubernetes cluster", "deploy_k8s_manifests, deploy_k8s_live"),
    "kubectl create secret generic wsbridge-server-tls --from-file=tls.crt=server.crt "
    "--from-file=tls.key=server.key --from-file=ca.crt=clients-ca.crt": (
        "needs a Kubernetes cluster", "deploy_k8s_manifests, deploy_k8s_live"),
    "kubectl apply -k deploy/k8s/overlays/sidecar": (
        "needs a Kubernetes cluster", "deploy_k8s_manifests, deploy_k8s_live"),
    "kubectl apply -k deploy/k8s/overlays/pool": (
        "needs a Kubernetes cluster", "deploy_k8s_manifests, deploy_k8s_live"),
    "kubectl apply -k deploy/k8s/overlays/pool-mtls": (
        "needs a Kubernetes cluster", "deploy_k8s_manifests, deploy_k8s_live"),
    # The Node example needs `npm ci` in examples/node (node_modules in the source tree);
    # its test installs the same lockfile into the build tree and runs the same client.
    "cd examples/node": (
        "would install node_modules into the source tree",
        "examples_node_client (tests/examples/): npm ci into the build tree, then the client"),
    "npm ci": (
        "would install node_modules into the source tree",
        "examples_node_client (tests/examples/): npm ci into the build tree, then the client"),
    "node client.mjs": (
        "needs examples/node/node_modules", "examples_node_client (all four bridges)"),
    "node client.mjs --bridges emogg --emogg-events 5": (
        "needs examples/node/node_modules", "examples_node_client (all four bridges)"),
    "node client.mjs --bridges dfx --dfx-chunks 8 --summary -": (
        "needs examples/node/node_modules", "examples_node_client (all four bridges)"),
}

# Command -> text its output shows once it is up (it runs until SIGTERM).
LONG_RUNNING = {
    "wsbridge-emulator --emogg 127.0.0.1:0 --emogg-token demo --emogg-event-interval 1000":
        '"api":"emogg"',
}

DEADLINE_S = 60  # a start-up, a block of commands: generous for a loaded 2-core machine


class Failure(Exception):
    pass


# ----------------------------------------------------------------------------------------
# Markdown helpers.

def fenced_blocks(text, langs):
    """(language, first line number, body lines) of every fenced block in `langs`."""
    out = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if m:
            lang, start, body = m.group(1), i + 1, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if lang in langs:
                out.append((lang, start + 1, body))
        i += 1
    return out


def sections(text):
    """{heading word: section text} for headings of level 2-4 (the first word after #s)."""
    out = {}
    current, buf = None, []
    for line in text.split("\n"):
        m = re.match(r"^#{2,4} +`?([A-Za-z_][\w.]*)`?", line)
        if m:
            if current is not None:
                out.setdefault(current, "\n".join(buf))
            current, buf = m.group(1), []
        elif current is not None:
            buf.append(line)
    if current is not None:
        out.setdefault(current, "\n".join(buf))
    return out


def table_rows(text):
    """Rows of the markdown tables in `text` as lists of stripped cells."""
    rows = []
    for line in text.split("\n"):
        if line.startswith("|") and not re.match(r"^\|[\s|:-]+\|\s*$", line):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def doc_files(source):
    files = [os.path.join(source, "README.md"), os.path.join(source, "examples", "README.md")]
    files += sorted(glob.glob(os.path.join(source, "docs", "**", "*.md"), recursive=True))
    return files


# ----------------------------------------------------------------------------------------
# Processes: the emulator with all four APIs and wsbridged with the four bridges.

def read_json_lines(proc, want, what):
    """Reads JSON lines from proc.stdout until want(events) is true; returns the events."""
    deadline = time.monotonic() + DEADLINE_S
    buf, events = b"", []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
            if want(events):
                return events
    raise Failure("%s did not print what it listens on within %ds (exit code %s)"
                  % (what, DEADLINE_S, proc.poll()))


def http_get(url, timeout=10):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Env:
    """wsbridge-emulator (dfx, nlx, emogg, nexora on port 0) and wsbridged in front of it."""

    def __init__(self, args, tmp):
        self.args, self.tmp, self.procs = args, tmp, []

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        # The demo itself (deploy/config/demo.yaml, as scripts/run.sh runs it) with only its
        # addresses changed: the emulator's URLs and the daemon's listeners on free ports.
        import yaml
        with open(os.path.join(self.args.source, "deploy", "config", "demo.yaml")) as f:
            config = yaml.safe_load(f)
        bridges = [([k for k in b if k != "name"][0], b) for b in config.get("bridges", [])]
        kinds = {kind: b[kind] for kind, b in bridges}
        secret = lambda kind, field: (kinds.get(kind, {}).get(field) or {}).get("value")
        # The emulator accepts exactly the demo's credentials, as run.sh starts it.
        cmd = [self.args.emulator, "--dfx", "127.0.0.1:0", "--nlx", "127.0.0.1:0",
               "--emogg", "127.0.0.1:0", "--emogg-event-interval", "1000",
               "--nexora", "127.0.0.1:0"]
        for flag, kind, field in (("--dfx-token", "dfx", "device_token"),
                                  ("--emogg-token", "emogg", "token"),
                                  ("--nexora-api-key", "nexora", "api_key")):
            if secret(kind, field):
                cmd += [flag, secret(kind, field)]
        emu = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                               stderr=open(os.path.join(self.tmp, "emulator.log"), "w"))
        self.procs.append(emu)
        events = read_json_lines(emu, lambda ev: len({e.get("api") for e in ev}) >= 4,
                                 "wsbridge-emulator")
        urls = {e["api"]: e["url"] for e in events}
        for kind, b in bridges:
            if kind not in urls:
                raise Failure("deploy/config/demo.yaml has a %s bridge the emulator does not serve"
                              % kind)
            b[kind].setdefault("upstream", {}).update(url=urls[kind], allow_plaintext=True)
        self.socket = os.path.join(self.tmp, "wsbridged.sock")
        config.setdefault("server", {}).update(listen="127.0.0.1:0", unix_socket=self.socket)
        config["admin"] = {"listen": "127.0.0.1:0"}
        path = os.path.join(self.tmp, "wsbridged.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        self.log_path = os.path.join(self.tmp, "wsbridged.log")
        d = subprocess.Popen([self.args.wsbridged, "--config", path], stdout=subprocess.PIPE,
                             stderr=open(self.log_path, "w"))
        self.procs.append(d)
        listening = read_json_lines(
            d, lambda ev: any(e.get("event") == "listening" for e in ev), "wsbridged")
        ev = [e for e in listening if e.get("event") == "listening"][0]
        self.grpc, self.admin = ev["grpc"], ev["admin"]
        # Ready = every bridge's upstream session is usable (/readyz 200).
        deadline = time.monotonic() + DEADLINE_S
        status, body = 0, ""
        while time.monotonic() < deadline:
            status, body = http_get("http://%s/readyz" % self.admin)
            if status == 200:
                return
            if d.poll() is not None:
                break
            time.sleep(0.05)  # polling the condition, bounded by the deadline
        raise Failure("wsbridged did not become ready within %ds: /readyz %s %s\n%s"
                      % (DEADLINE_S, status, body.strip(), self.log()))

    def log(self):
        try:
            with open(self.log_path) as f:
                return "wsbridged log (last lines):\n" + "".join(f.readlines()[-30:])
        except OSError:
            return ""

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs = []


# ----------------------------------------------------------------------------------------
# --check config

def check_config(args):
    doc_path = os.path.join(args.source, "docs", "config.md")
    with open(doc_path) as f:
        doc = f.read()
    errors = []
    with tempfile.TemporaryDirectory(prefix="wsbridge-docs-") as tmp:
        protos = sorted(os.path.relpath(p, os.path.join(args.source, "proto"))
                        for p in glob.glob(os.path.join(args.source, "proto", "wsbridge",
                                                        "config", "v1", "*.proto")))
        subprocess.run([args.protoc, "-I", os.path.join(args.source, "proto"),
                        "-I", "/usr/include", "--python_out=" + tmp] + protos, check=True)
        sys.path.insert(0, tmp)
        import importlib
        modules = [importlib.import_module(p[:-len(".proto")].replace("/", ".") + "_pb2")
                   for p in protos]
        options_pb2 = importlib.import_module("wsbridge.config.v1.options_pb2")
        from google.protobuf import descriptor as pbd

        messages = []
        for m in modules:
            for msg in m.DESCRIPTOR.message_types_by_name.values():
                if msg.full_name == "wsbridge.config.v1.FieldRules":
                    continue  # the loader's annotation on fields, not a config message
                messages.append(msg)
        docs = sections(doc)
        type_names = {pbd.FieldDescriptor.TYPE_STRING: "string", pbd.FieldDescriptor.TYPE_BOOL: "bool",
                      pbd.FieldDescriptor.TYPE_UINT32: "uint32", pbd.FieldDescriptor.TYPE_DOUBLE: "double",
                      pbd.FieldDescriptor.TYPE_INT32: "int32", pbd.FieldDescriptor.TYPE_UINT64: "uint64",
                      pbd.FieldDescriptor.TYPE_INT64: "int64"}
        for msg in messages:
            section = docs.get(msg.name)
            if section is None:
                errors.append("docs/config.md: no section for config message %s (%s): add a "
                              "heading `### %s` with a table row per field"
                              % (msg.name, msg.file.name, msg.name))
                continue
            rows = {}
            for cells in table_rows(section):
                m = re.match(r"^`(\w+)`$", cells[0])
                if m:
                    rows[m.group(1)] = cells
            for field in msg.fields:
                row = rows.pop(field.name, None)
                where = "%s.%s (%s)" % (msg.name, field.name, msg.file.name)
                if row is None:
                    errors.append("docs/config.md: field %s is not documented: add a row "
                                  "| `%s` | type | default | example | meaning | to the %s section"
                                  % (where, field.name, msg.name))
                    continue
                if len(row) < 5 or not all(row[:5]):
                    errors.append("docs/config.md: the row of %s needs five non-empty cells "
                                  "(field, type, default, example, meaning), has %r" % (where, row))
                    continue
                rules = field.GetOptions().Extensions[options_pb2.rules]
                if rules.default_value and "`%s`" % rules.default_value not in row[2]:
                    errors.append("docs/config.md: %s: the default column says %r; the loader "
                                  "applies `%s` (options.proto default_value)"
                                  % (where, row[2], rules.default_value))
                if rules.required and "required" not in row[2].lower():
                    errors.append("docs/config.md: %s is required: say so in the default column"
                                  % where)
                if field.type == pbd.FieldDescriptor.TYPE_MESSAGE:
                    expected = field.message_type.name
                    if field.message_type.GetOptions().map_entry:
                        expected = "map"
                    elif field.message_type.full_name == "google.protobuf.Duration":
                        expected = "duration"
                else:
                    expected = type_names.get(field.type, "")
                if expected and expected not in row[1]:
                    errors.append("docs/config.md: %s: the type column says %r, the proto says %s"
                                  % (where, row[1], expected))
            for stale in rows:
                errors.append("docs/config.md: the %s section documents `%s`, which %s does not "
                              "have (renamed or removed?)" % (msg.name, stale, msg.full_name))

        # The complete example configs load.
        n = 0
        for _, line, body in fenced_blocks(doc, {"yaml"}):
            text = "\n".join(body)
            if not re.match(r"^server:", text, re.M):
                continue
            n += 1
            path = os.path.join(tmp, "example%d.yaml" % n)
            with open(path, "w") as f:
                f.write(text + "\n")
            env = dict(os.environ)
            for name in re.findall(r"\benv: *([A-Z_][A-Z0-9_]*)", text):
                env[name] = "docs-test-value"
            r = subprocess.run([args.wsbridged, "--config", path, "--check"], env=env,
                               capture_output=True, text=True, timeout=DEADLINE_S)
            if r.returncode != 0:
                errors.append("docs/config.md:%d: the example config does not pass "
                              "`wsbridged --check`:\n%s%s" % (line, r.stdout, r.stderr))
        if n == 0:
            errors.append("docs/config.md: no complete example config (a ```yaml block "
                          "starting with `server:`)")
        print("config: %d messages, %d fields checked; %d example config(s) run through --check"
              % (len(messages), sum(len(m.fields) for m in messages), n))
    return errors


# ----------------------------------------------------------------------------------------
# --check metrics

def registered_in_sources(source):
    """{name: type} of metrics registered in daemon/ and bridges/ (GetX calls, # TYPE lines)."""
    found = {}
    kinds = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram"}
    for path in glob.glob(os.path.join(source, "daemon", "**", "*.cc"), recursive=True) + \
            glob.glob(os.path.join(source, "bridges", "**", "*.cc"), recursive=True):
        with open(path) as f:
            text = f.read()
        for kind, name in re.findall(r"Get(Counter|Gauge|Histogram)\(\s*\"(wsbridge_\w+)\"", text):
            found[name] = kinds[kind]
        for name, kind in re.findall(r"# TYPE (wsbridge_\w+) (\w+)", text):
            found[name] = kind
    return found


def scrape(env):
    """{name: (type, set of label names)} from the daemon's /metrics."""
    status, body = http_get("http://%s/metrics" % env.admin)
    if status != 200:
        raise Failure("/metrics answered %d" % status)
    types, labels = {}, {}
    for line in body.split("\n"):
        m = re.match(r"^# TYPE (\w+) (\w+)$", line)
        if m:
            types[m.group(1)] = m.group(2)
            labels.setdefault(m.group(1), set())
            continue
        m = re.match(r"^(\w+?)(_bucket|_sum|_count)?(\{(.*)\})? ", line)
        if m and not line.startswith("#"):
            name = m.group(1) if m.group(1) in types else m.group(1) + (m.group(2) or "")
            if name not in types:
                continue
            for label in re.findall(r"(\w+)=\"", m.group(4) or ""):
                if label != "le":
                    labels[name].add(label)
    return {n: (t, labels.get(n, set())) for n, t in types.items()}


def grpc_health_check(target):
    """One real gRPC call (grpc.health.v1.Health/Check, service ""), so per-call metrics exist."""
    import grpc
    with grpc.insecure_channel(target) as channel:
        # An empty HealthCheckRequest is zero bytes; the answer is status SERVING = 1.
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        reply = check(b"", timeout=10)
        if reply != b"\x08\x01":
            raise Failure("health check of %s did not answer SERVING: %r" % (target, reply))


def check_metrics(args):
    doc_path = os.path.join(args.source, "docs", "operations.md")
    with open(doc_path) as f:
        doc = f.read()
    errors = []
    with tempfile.TemporaryDirectory(prefix="wsbridge-docs-") as tmp, Env(args, tmp) as env:
        grpc_health_check(env.grpc)
        deadline = time.monotonic() + DEADLINE_S
        scraped = scrape(env)
        # A call is counted when gRPC reports it done, a moment after the answer.
        while "wsbridge_grpc_requests_total" not in scraped and time.monotonic() < deadline:
            time.sleep(0.05)
            scraped = scrape(env)
    sources = registered_in_sources(args.source)
    names = set(scraped) | set(sources)
    wsbridge_names = {n for n in names if n.startswith("wsbridge_")}
    if len(wsbridge_names) < 5:
        errors.append("found only %d wsbridge_ metrics (%s): the scrape or the source scan is "
                      "broken" % (len(wsbridge_names), ", ".join(sorted(wsbridge_names))))
    rows = {}
    for cells in table_rows(doc):
        m = re.match(r"^`(\w+)`$", cells[0]) if cells else None
        if m and (m.group(1).startswith("wsbridge_") or m.group(1) in scraped):
            rows[m.group(1)] = cells
    for name in sorted(names):
        row = rows.pop(name, None)
        kind, labels = scraped.get(name, (sources.get(name), set()))
        if row is None:
            errors.append("docs/operations.md: metric %s (%s) is not in the metrics table: add "
                          "| `%s` | %s | labels | meaning |" % (name, kind, name, kind))
            continue
        if len(row) < 4:
            errors.append("docs/operations.md: the row of %s needs four cells (name, type, "
                          "labels, meaning)" % name)
            continue
        if kind and row[1] != kind:
            errors.append("docs/operations.md: %s is a %s, the table says %r" % (name, kind, row[1]))
        if name in sources and sources[name] != kind:
            errors.append("%s is registered as a %s in the sources but scraped as a %s"
                          % (name, sources[name], kind))
        documented = set(re.findall(r"`(\w+)`", row[2]))
        for label in sorted(labels - documented):
            errors.append("docs/operations.md: %s has the label `%s`; its labels column says %r"
                          % (name, label, row[2]))
    for stale in rows:
        errors.append("docs/operations.md: the metrics table lists %s, which the daemon does not "
                      "register (renamed or removed?)" % stale)
    print("metrics: %d metrics (%d scraped, %d found in the sources) checked"
          % (len(names), len(scraped), len(sources)))
    return errors


# ----------------------------------------------------------------------------------------
# --check links

def anchor(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(path):
    with open(path) as f:
        text = f.read()
    out = set()
    in_fence = False
    for line in text.split("\n"):
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence:
            m = re.match(r"^#{1,6} +(.*)$", line)
            if m:
                out.add(anchor(m.group(1)))
    return out


def check_links(args):
    """Every relative link of README.md and docs/ names a file that exists (and a heading
    of it, for #anchors)."""
    errors, n = [], 0
    for path in doc_files(args.source):
        with open(path) as f:
            text = f.read()
        text = re.sub(r"```.*?```", "", text, flags=re.S)  # code is not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # http:, https:, mailto:
            n += 1
            file_part, _, frag = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part \
                else path
            where = os.path.relpath(path, args.source)
            if not os.path.exists(dest):
                errors.append("%s: the link (%s) names %s, which does not exist"
                              % (where, target, os.path.relpath(dest, args.source)))
            elif frag and dest.endswith(".md") and frag not in anchors_of(dest):
                errors.append("%s: the link (%s): %s has no heading with the anchor #%s"
                              % (where, target, os.path.relpath(dest, args.source), frag))
    print("links: %d relative links checked" % n)
    return errors


# ----------------------------------------------------------------------------------------
# --check commands

def normalise(command):
    return " ".join(re.sub(r"\\\n", " ", command).split())


def strip_comment(command):
    """The command without its `# ...` comments (to the end of each line; quotes respected)."""
    out, quote, comment = [], None, False
    for i, c in enumerate(command):
        if comment:
            if c != "\n":
                continue
            comment = False
        elif quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or command[i - 1] in " \t\n"):
            comment = True
            continue
        out.append(c)
    return "".join(out).rstrip()


def parse_commands(body):
    """[(command text, expected exit, [expected output texts])] of one ```sh block."""
    commands, current = [], None
    lines = list(body)
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        m = re.match(r"^# => ?(.*)$", stripped)
        if m and commands:
            commands[-1][2].append(m.group(1))
            i += 1
            continue
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        text = line
        # Continuations: a trailing backslash, pipe or &&, or an open quote.
        while i + 1 < len(lines) and (strip_comment(text).endswith(("\\", "|", "&&"))
                                      or strip_comment(text).count("'") % 2 == 1):
            i += 1
            text += "\n" + lines[i]
        exit_code = 0
        m = re.search(r"#\s*exit (\d+)\s*$", text)
        if m:
            exit_code = int(m.group(1))
        commands.append([text, exit_code, []])
        i += 1
    return commands


def substitute(text, env):
    text = text.replace("unix:/tmp/wsbridge/wsbridged.sock", "unix:" + env.socket)
    text = text.replace("/tmp/wsbridge/wsbridged.sock", env.socket)
    text = text.replace("127.0.0.1:50051", env.grpc)
    text = text.replace("127.0.0.1:9090", env.admin)
    return text


def run_long_running(command, marker, shell_env, cwd):
    p = subprocess.Popen(["bash", "-c", "exec " + command], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env=shell_env, cwd=cwd)
    try:
        deadline = time.monotonic() + DEADLINE_S
        out = b""
        while marker.encode() not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
        if marker.encode() not in out:
            return "did not show %r within %ds; output: %s" % (marker, DEADLINE_S, out.decode())
        p.send_signal(signal.SIGTERM)
        code = p.wait(timeout=30)
        if code != 0:
            return "exited %d after SIGTERM (expected 0)" % code
        return None
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def check_commands(args):
    errors = []
    used_not_run, used_long = set(), set()
    blocks = []
    for path in doc_files(args.source):
        with open(path) as f:
            text = f.read()
        for lang, line, body in fenced_blocks(text, {"sh", "bash", "shell", "console"}):
            blocks.append((os.path.relpath(path, args.source), line, parse_commands(body)))
    needs_ctl = any("wsbridgectl" in c[0] for _, _, cmds in blocks for c in cmds
                    if normalise(strip_comment(c[0])) not in NOT_RUN)
    if needs_ctl and not (args.wsbridgectl and os.access(args.wsbridgectl, os.X_OK)):
        raise Failure(
            "the docs' commands use wsbridgectl, but it is not built (looked for %r): build the "
            "`wsbridgectl` target (tools/wsbridgectl/) in this build directory, then run this "
            "test again" % (args.wsbridgectl or "no wsbridgectl target in this build"))
    ran = 0
    with tempfile.TemporaryDirectory(prefix="wsbridge-docs-") as tmp, Env(args, tmp) as env:
        bindir = os.path.join(tmp, "bin")
        os.mkdir(bindir)
        for name, path in (("wsbridged", args.wsbridged), ("wsbridge-emulator", args.emulator),
                           ("wsbridgectl", args.wsbridgectl)):
            if path and os.path.exists(path):
                os.symlink(os.path.abspath(path), os.path.join(bindir, name))
        shell_env = dict(os.environ)
        shell_env.update(PATH=bindir + os.pathsep + shell_env.get("PATH", "/usr/bin:/bin"),
                         WSBRIDGE_TARGET=env.grpc, HOME=tmp, TMPDIR=tmp)
        shell_env.pop("WSBRIDGE_TOKEN", None)
        for doc, line, commands in blocks:
            script = ["set -u", "__rc=0"]
            for n, (text, exit_code, expects) in enumerate(commands):
                key = normalise(strip_comment(text))
                if key in NOT_RUN:
                    used_not_run.add(key)
                    continue
                if key in LONG_RUNNING:
                    used_long.add(key)
                    why = run_long_running(substitute(strip_comment(text), env), LONG_RUNNING[key],
                                           shell_env, args.source)
                    ran += 1
                    if why:
                        errors.append("%s:%d: `%s` %s" % (doc, line, key, why))
                    continue
                ran += 1
                out = os.path.join(tmp, "out%d" % n)
                script.append("__cmd=$(cat <<'__WSBRIDGE_DOC_CMD__'\n%s\n__WSBRIDGE_DOC_CMD__\n)"
                              % substitute(text, env))
                script.append('{ eval "$__cmd"; } >%s 2>&1 </dev/null; __rc=$?' % out)
                script.append('if [ "$__rc" != %d ]; then echo "FAILED (exit $__rc, expected %d): '
                              '$__cmd"; cat %s; exit 1; fi' % (exit_code, exit_code, out))
                for e in expects:
                    script.append("if ! grep -qF -- %s %s; then echo \"FAILED: the output of "
                                  "$__cmd does not contain %s\"; cat %s; exit 1; fi"
                                  % (shquote(e), out, shquote(e).replace('"', '\\"'), out))
            if len(script) == 2:
                continue
            try:
                r = subprocess.run(["bash", "-c", "\n".join(script)], env=shell_env,
                                   cwd=args.source, capture_output=True, text=True,
                                   timeout=DEADLINE_S * 2, start_new_session=True)
            except subprocess.TimeoutExpired as e:
                errors.append("%s:%d: the block's commands did not finish within %ds: %s"
                              % (doc, line, DEADLINE_S * 2, e.stdout))
                continue
            if r.returncode != 0:
                errors.append("%s:%d: %s%s" % (doc, line, r.stdout, r.stderr))
        if errors:
            errors.append(env.log())
    for key in sorted(set(NOT_RUN) - used_not_run):
        errors.append("NOT_RUN lists `%s`, which no doc has any more: remove the entry" % key)
    for key in sorted(set(LONG_RUNNING) - used_long):
        errors.append("LONG_RUNNING lists `%s`, which no doc has any more: remove the entry" % key)
    print("commands: %d run from %d ```sh blocks; %d not run here (each covered by its test)"
          % (ran, len(blocks), len(used_not_run)))
    return errors


def shquote(s):
    return "'" + s.replace("'", "'\\''") + "'"


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", required=True,
                        choices=["config", "metrics", "commands", "links"])
    parser.add_argument("--source", required=True, help="the repository root")
    parser.add_argument("--wsbridged", help="wsbridged (config, metrics, commands)")
    parser.add_argument("--emulator", help="wsbridge-emulator (metrics, commands)")
    parser.add_argument("--wsbridgectl", default="", help="wsbridgectl (commands); empty = not built")
    parser.add_argument("--protoc", help="protoc (config)")
    args = parser.parse_args()
    try:
        errors = {"config": check_config, "metrics": check_metrics,
                  "commands": check_commands, "links": check_links}[args.check](args)
    except Failure as e:
        errors = [str(e)]
    if errors:
        print("\n".join("FAIL: " + e for e in errors if e), file=sys.stderr)
        sys.exit(1)
    print("%s: OK" % args.check)


if __name__ == "__main__":
    main()
