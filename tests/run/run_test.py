#!/usr/bin/python3
"""The one-command demo and the shipped configs, run for real.

demo: runs scripts/run.sh against an existing build (WSBRIDGE_BUILD_DIR: nothing is
installed or built) with every port 0 and a private Unix socket, waits for its "ready"
banner, then checks through Python gRPC stubs (protoc + grpc_python_plugin) that all four
bridges answer: health SERVING per bridge service over TCP and the Unix socket, /readyz,
and one real call per bridge (DFX CreateMeasurement, NLX Send, Emogg Request and a
Subscribe event, Nexora CreateChat + SendMessage). Then SIGINT to run.sh: it must stop
wsbridged and the emulator in that order and exit 0, leaving no process and no files.

production-check: `wsbridged --config deploy/config/example-production.yaml --check`
accepts the production config once the env and file secrets it names exist (the paths
are pointed into a temp dir), and refuses it, naming the secret, while one is missing.
"""
import argparse
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

BRIDGE_SERVICES = {
    "dfx": "wsbridge.dfx.v1.DfxService",
    "nlx": "wsbridge.nlx.v1.NlxService",
    "emogg": "wsbridge.emogg.v1.EmoggService",
    "nexora": "wsbridge.nexora.v1.NexoraService",
}


def fail(message):
    raise AssertionError(message)


class Output:
    """Collects a process's merged stdout/stderr and waits for patterns in it."""

    def __init__(self, proc):
        self.proc = proc
        self.text = ""

    def pump(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, timeout))
        if not ready:
            return False
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if not chunk:
            return None  # EOF
        self.text += chunk.decode("utf-8", "replace")
        return True

    def wait_for(self, pattern, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text, re.M)
            if m:
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                fail("%s did not appear within %ds; output so far:\n%s" % (what, timeout, self.text))
            if self.pump(left) is None:
                fail("run.sh ended (status %s) before %s; output:\n%s"
                     % (self.proc.wait(), what, self.text))

    def read_to_end(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pump(deadline - time.monotonic()) is None:
                return
        fail("run.sh kept its output open %ds after the stop signal; output:\n%s"
             % (timeout, self.text))


def generate_stubs(args, tmp):
    gen = os.path.join(tmp, "gen")
    os.mkdir(gen)
    # health.proto at the top level: as grpc/health/v1/*.py it would be shadowed by the
    # installed `grpc` package. Its proto package (the wire names) stays grpc.health.v1.
    health_dir = os.path.join(tmp, "health")
    os.mkdir(health_dir)
    with open(os.path.join(args.health_proto_dir, "grpc/health/v1/health.proto")) as src, \
            open(os.path.join(health_dir, "health.proto"), "w") as dst:
        dst.write(src.read())
    protos = ["wsbridge/%s/v1/%s.proto" % (b, b) for b in BRIDGE_SERVICES]
    subprocess.run([args.protoc, "--plugin=protoc-gen-grpc_python=" + args.plugin,
                    "-I", args.proto_dir, "-I", health_dir, "-I", "/usr/include",
                    "--python_out=" + gen, "--grpc_python_out=" + gen] + protos + ["health.proto"],
                   check=True)
    sys.path.insert(0, gen)


def processes_with_marker(marker):
    """Pids of processes whose environment holds marker (inherited from run.sh)."""
    needle = ("WSBRIDGE_RUN_TEST_MARKER=" + marker).encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open("/proc/%s/environ" % pid, "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            pass  # gone, or not ours to read
    return found


def check_bridges(grpc_target, unix_target):
    import grpc
    import health_pb2
    import health_pb2_grpc
    from wsbridge.dfx.v1 import dfx_pb2, dfx_pb2_grpc
    from wsbridge.emogg.v1 import emogg_pb2, emogg_pb2_grpc
    from wsbridge.nexora.v1 import nexora_pb2, nexora_pb2_grpc
    from wsbridge.nlx.v1 import nlx_pb2, nlx_pb2_grpc

    for target in (grpc_target, unix_target):
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in [""] + list(BRIDGE_SERVICES.values()):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    fail("%s: health of %r is %s, not SERVING" % (target, service, reply))

    with grpc.insecure_channel(grpc_target) as channel:
        # DFX: a measurement created through the demo device token.
        dfx = dfx_pb2_grpc.DfxServiceStub(channel)
        created = dfx.CreateMeasurement(dfx_pb2.CreateMeasurementRequest(study_id="demo"),
                                        timeout=20)
        if not created.measurement_id:
            fail("DFX CreateMeasurement returned no measurement_id: %s" % created)

        # NLX: a new conversation with the demo keys; the emulator echoes the turn.
        nlx = nlx_pb2_grpc.NlxServiceStub(channel)
        sent = nlx.Send(nlx_pb2.SendRequest(turn=nlx_pb2.Turn(text="hello from the run test")),
                        timeout=20)
        texts = [m.text for m in sent.response.messages]
        if not sent.conversation_id or not any('you said "hello from the run test"' in t
                                                for t in texts):
            fail("NLX Send answered %s" % sent)

        # Emogg: a request answered by id, and a channel event (the emulator emits one a
        # second in the demo).
        emogg = emogg_pb2_grpc.EmoggServiceStub(channel)
        pong = emogg.Request(emogg_pb2.RequestRequest(path="ping"), timeout=20)
        if pong.status != 200 or '"ts"' not in pong.json_body:
            fail("Emogg Request(ping) answered %s" % pong)
        stream = emogg.Subscribe(emogg_pb2.SubscribeRequest(
            channel="session_emotions_counts", key="demo-session:1s"), timeout=20)
        kinds = []
        for message in stream:
            kinds += [u.WhichOneof("update") for u in message.updates]
            if "event" in kinds:
                break
        stream.cancel()
        if kinds[:1] != ["subscribed"] or "event" not in kinds:
            fail("Emogg Subscribe gave %s, not subscribed then an event" % kinds)

        # Nexora: a chat created with the demo API key, then a streamed answer.
        nexora = nexora_pb2_grpc.NexoraServiceStub(channel)
        chat = nexora.CreateChat(nexora_pb2.CreateChatRequest(agent_id="demo-agent"), timeout=20)
        if not chat.chat_id:
            fail("Nexora CreateChat returned no chat_id")
        events = list(nexora.SendMessage(nexora_pb2.SendMessageRequest(
            chat_id=chat.chat_id, content="hello"), timeout=30))
        kinds = [e.WhichOneof("event") for e in events]
        if not kinds or kinds[0] != "accepted" or kinds[-1] != "done" or "chunk" not in kinds:
            fail("Nexora SendMessage events: %s" % kinds)


def run_demo(args):
    with tempfile.TemporaryDirectory(prefix="wsbridge-run-test-") as tmp:
        generate_stubs(args, tmp)
        run_tmp = os.path.join(tmp, "tmp")  # run.sh's own scratch dir goes here
        os.mkdir(run_tmp)
        marker = uuid.uuid4().hex
        env = dict(os.environ,
                   WSBRIDGE_BUILD_DIR=args.build_dir,
                   WSBRIDGE_GRPC_LISTEN="127.0.0.1:0",
                   WSBRIDGE_ADMIN_LISTEN="127.0.0.1:0",
                   WSBRIDGE_UNIX_SOCKET=os.path.join(tmp, "sock", "wsbridged.sock"),
                   WSBRIDGE_EMULATOR_PORTS="0",
                   TMPDIR=run_tmp,
                   WSBRIDGE_RUN_TEST_MARKER=marker)
        # SIGINT at its default in run.sh, as in a terminal: a shell cannot trap a signal
        # that was ignored when it started (as it is under a backgrounded ctest).
        proc = subprocess.Popen(["bash", args.run_sh], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        out = Output(proc)
        try:
            out.wait_for(r"^Ctrl-C stops", 120, "the ready banner")
            if not re.search(r"^wsbridge demo is ready: bridges dfx, nlx, emogg and nexora "
                             r"are serving", out.text, re.M):
                fail("no ready line naming the four bridges:\n" + out.text)
            grpc_target = re.search(r"^  gRPC \(TCP\): +(127\.0\.0\.1:\d+)$", out.text, re.M)
            unix_target = re.search(r"^  gRPC \(Unix\): +(unix:\S+)$", out.text, re.M)
            admin = re.search(r"^  admin HTTP: +(http://127\.0\.0\.1:\d+) ", out.text, re.M)
            pids = re.search(r"^  processes: +wsbridged pid (\d+), wsbridge-emulator pid (\d+)$",
                             out.text, re.M)
            if not (grpc_target and unix_target and admin and pids):
                fail("the banner lacks an address or the pids:\n" + out.text)
            if unix_target.group(1) != "unix:" + env["WSBRIDGE_UNIX_SOCKET"]:
                fail("the Unix socket override was not used: " + unix_target.group(1))
            if grpc_target.group(1).endswith(":50051"):
                fail("port 0 was not used for gRPC")
            with urllib.request.urlopen(admin.group(1) + "/readyz", timeout=10) as r:
                if r.status != 200 or r.read() != b"ready\n":
                    fail("/readyz is not 200 ready")

            check_bridges(grpc_target.group(1), unix_target.group(1))

            daemon_pid, emulator_pid = int(pids.group(1)), int(pids.group(2))
            proc.send_signal(signal.SIGINT)
            out.read_to_end(60)  # the demo's shutdown.deadline is 5s; slack for load
            code = proc.wait(timeout=10)
            if code != 0:
                fail("run.sh exited %d after SIGINT; output:\n%s" % (code, out.text))
            tail = out.text[out.text.index("Ctrl-C stops"):]
            order = ["run: SIGINT received", "run: stopping wsbridged",
                     "draining: health is NOT_SERVING", "server: stopped",
                     "run: stopping wsbridge-emulator", "run: stopped cleanly"]
            positions = [tail.find(s) for s in order]
            if -1 in positions or positions != sorted(positions):
                fail("shutdown messages missing or out of order %s:\n%s" % (positions, tail))
            for pid in (daemon_pid, emulator_pid):
                try:
                    os.kill(pid, 0)
                    fail("process %d is still running after run.sh exited" % pid)
                except ProcessLookupError:
                    pass
            left = processes_with_marker(marker)
            if left:
                fail("processes left behind: %s" % left)
            if os.listdir(run_tmp):
                fail("run.sh left files in its scratch dir: %s" % os.listdir(run_tmp))
            if os.path.exists(env["WSBRIDGE_UNIX_SOCKET"]):
                fail("the Unix socket was not removed")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for pid in processes_with_marker(marker):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    print("run.sh demo OK: four bridges answered, stopped cleanly")


def run_production_check(args):
    with tempfile.TemporaryDirectory(prefix="wsbridge-prod-check-") as tmp:
        with open(args.production_config) as f:
            yaml = f.read()
        # The file names absolute paths; point them into the temp dir.
        for prefix, local in (("/etc/wsbridge/", "etc/"),
                              ("/var/run/secrets/wsbridge/", "secrets/")):
            if prefix not in yaml:
                fail("%s names no path under %s" % (args.production_config, prefix))
            yaml = yaml.replace(prefix, os.path.join(tmp, local))
        files = sorted(set(re.findall(re.escape(tmp) + r"/[\w./-]+", yaml)))
        env_names = sorted(set(re.findall(r"^\s*env: (\w+)\s*$", yaml, re.M)))
        if len(env_names) < 2 or not any("/secrets/" in f for f in files):
            fail("expected env and file secrets in the production config: %s %s"
                 % (env_names, files))
        for path in files:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write("placeholder-for-the-check\n")
        config = os.path.join(tmp, "production.yaml")
        with open(config, "w") as f:
            f.write(yaml)
        env = {k: v for k, v in os.environ.items() if k not in env_names}
        env.update({name: "check-" + name.lower() for name in env_names})

        def check(environment):
            return subprocess.run([args.wsbridged, "--config", config, "--check"],
                                  capture_output=True, text=True, env=environment, timeout=60)

        ok = check(env)
        if ok.returncode != 0 or ok.stdout.strip() != "config OK":
            fail("--check refused the production config (%d): %s%s"
                 % (ok.returncode, ok.stdout, ok.stderr))
        # Each env secret is needed: without it the check fails and names it.
        for name in env_names:
            missing = check({k: v for k, v in env.items() if k != name})
            if missing.returncode != 2 or ('"%s" is not set' % name) not in missing.stderr:
                fail("--check without %s: %d %s" % (name, missing.returncode, missing.stderr))
        # And each secret file: without it the check fails and names the file.
        for path in (f for f in files if "/secrets/" in f):
            os.rename(path, path + ".away")
            missing = check(env)
            os.rename(path + ".away", path)
            if missing.returncode != 2 or path not in missing.stderr:
                fail("--check without %s: %d %s" % (path, missing.returncode, missing.stderr))
        print("production config OK with %s and %d files" % (", ".join(env_names), len(files)))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    demo = sub.add_parser("demo")
    demo.add_argument("--run-sh", required=True)
    demo.add_argument("--build-dir", required=True)
    demo.add_argument("--protoc", required=True)
    demo.add_argument("--plugin", default="/usr/bin/grpc_python_plugin")
    demo.add_argument("--proto-dir", required=True)
    demo.add_argument("--health-proto-dir", required=True)
    prod = sub.add_parser("production-check")
    prod.add_argument("--wsbridged", required=True)
    prod.add_argument("--production-config", required=True)
    args = parser.parse_args()
    if args.mode == "demo":
        run_demo(args)
    else:
        run_production_check(args)


if __name__ == "__main__":
    main()
