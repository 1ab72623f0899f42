"""Runs the real wsbridged with each overlay's config, environment and volumes as the
pod would have them (listeners moved to loopback port 0; upstreams moved to a closed
loopback port, so no real third-party service is ever contacted), and performs what
the kubelet, Prometheus and the callers would: the configured probes, a scrape, a call
over the sidecar's Unix socket, an unauthenticated call that must be refused, and
SIGTERM, after which the process must exit 0 within the grace period."""

import argparse
import copy
import json
import os
import pathlib
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request

import grpc
import yaml

import deploy_checks as dc

ARGS = None
SERVING, NOT_SERVING = 1, 2
START_DEADLINE_S = 30


def _HealthRequest(service):
    data = service.encode()
    return (b"\x0a" + bytes([len(data)]) + data) if data else b""


def _HealthStatus(response):
    # HealthCheckResponse { ServingStatus status = 1; } — absent means UNKNOWN (0).
    return response[1] if len(response) >= 2 and response[0] == 0x08 else 0


def _Raw(x):
    return x


class RunningPod:
    """wsbridged started from one rendered pod."""

    def __init__(self, pod, workdir):
        self.pod = pod

        def Local(config):
            config = copy.deepcopy(config)
            if (config.get("server") or {}).get("listen"):
                config["server"]["listen"] = "127.0.0.1:0"
            if (config.get("admin") or {}).get("listen"):
                # A loopback address of its own: the two listeners never share one.
                config["admin"]["listen"] = "127.0.0.2:0"
            # The real upstreams are never contacted: a bridge with a default token
            # connects at start, so its URL goes to a closed loopback port instead.
            for bridge in config.get("bridges") or []:
                for kind in bridge.values():
                    if isinstance(kind, dict) and "upstream" in kind:
                        scheme = kind["upstream"]["url"].split("://")[0]
                        kind["upstream"]["url"] = f"{scheme}://127.0.0.1:1"
            return yaml.safe_dump(config)

        self.config_file, self.env = dc.SimulatePod(pod, workdir, Local)
        self.workdir = self.config_file.parent
        self.stderr = open(self.workdir / "stderr.log", "w+")
        self.proc = subprocess.Popen([ARGS.wsbridged, "--config", str(self.config_file)],
                                     env=self.env, stdout=subprocess.PIPE,
                                     stderr=self.stderr)
        self.listening = self._ReadListening()

    def _ReadListening(self):
        deadline = time.monotonic() + START_DEADLINE_S
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"{self.pod.name}: wsbridged did not report listening: "
                                     f"{self.Logs()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    continue
                line += chunk
        return json.loads(line.decode().splitlines()[0])

    def Logs(self):
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read()[-2000:]

    def Channel(self, target=None, credentials=None):
        target = target or self.listening["grpc"]
        if credentials is not None:
            return grpc.secure_channel(target, credentials, options=[
                ("grpc.ssl_target_name_override", "wsbridge.test")])
        return grpc.insecure_channel(target)

    def Health(self, channel, service):
        check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=_Raw, response_deserializer=_Raw)
        return _HealthStatus(check(_HealthRequest(service), timeout=10))

    def Http(self, path):
        url = f"http://{self.listening['admin']}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def RssKiB(self):
        for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def Stop(self, timeout):
        """SIGTERM, then the exit status (None if it outlived `timeout` and was killed)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def Close(self):
        if self.proc.poll() is None:
            self.Stop(5)
        self.proc.stdout.close()
        self.stderr.close()


class K8sLiveTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="wsbridge-k8s-live-")
        self.addCleanup(self.tmp.cleanup)

    def Start(self, overlay):
        objects = dc.Render(ARGS.kubectl, pathlib.Path(ARGS.repo) / "deploy" / "k8s" / overlay)
        pods, problems = dc.FindPods(objects)
        self.assertEqual([], problems)
        self.assertEqual(1, len(pods))
        running = RunningPod(pods[0], self.tmp.name)
        self.addCleanup(running.Close)
        return running

    def CheckProbes(self, running, credentials=None):
        container = running.pod.wsbridged
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container[kind]
            with self.subTest(probe=kind):
                if "grpc" in probe:
                    # No bearer token, like the kubelet's probe.
                    with running.Channel() as channel:
                        status = running.Health(channel, probe["grpc"].get("service", ""))
                    if kind == "readinessProbe":
                        # Readiness follows the upstreams, which are unreachable here.
                        self.assertIn(status, (SERVING, NOT_SERVING))
                    else:
                        self.assertEqual(SERVING, status)
                else:
                    code, body = running.Http(probe["httpGet"]["path"])
                    if kind == "readinessProbe":
                        self.assertIn(code, (200, 503), body)
                    else:
                        self.assertEqual(200, code, body)

    def CheckScrape(self, running):
        annotations = running.pod.meta["annotations"]
        code, body = running.Http(annotations.get("prometheus.io/path", "/metrics"))
        self.assertEqual(200, code)
        self.assertIn("wsbridge_ready", body)

    def CheckDrainExit(self, running):
        grace = running.pod.spec["terminationGracePeriodSeconds"]
        code = running.Stop(timeout=grace - dc.PreStopSeconds(running.pod.wsbridged))
        self.assertEqual(0, code, running.Logs())

    def Report(self, running):
        # Printed for docs/deploy.md ("Resources"); not asserted.
        print(f"\n{running.pod.name}: idle VmRSS {running.RssKiB()} KiB", file=sys.stderr)

    def CallAdmin(self, channel, token=None):
        list_sessions = channel.unary_unary("/wsbridge.admin.v1.AdminService/ListSessions",
                                            request_serializer=_Raw,
                                            response_deserializer=_Raw)
        metadata = [("authorization", f"Bearer {token}")] if token else None
        return list_sessions(b"", timeout=10, metadata=metadata)

    def test_pool(self):
        running = self.Start("overlays/pool")
        self.CheckProbes(running)
        self.CheckScrape(running)
        # The port the Service exposes refuses callers without the token...
        with running.Channel() as channel:
            with self.assertRaises(grpc.RpcError) as caught:
                self.CallAdmin(channel)
            self.assertEqual(grpc.StatusCode.UNAUTHENTICATED, caught.exception.code())
            # ...and serves callers with it.
            self.CallAdmin(channel, running.env["WSBRIDGE_AUTH_TOKEN"])
        self.Report(running)
        self.CheckDrainExit(running)

    def test_sidecar(self):
        running = self.Start("overlays/sidecar")
        self.CheckProbes(running)
        self.CheckScrape(running)
        socket = pathlib.Path(running.listening["unix"])
        self.assertTrue(stat.S_ISSOCK(socket.stat().st_mode))
        self.assertEqual(0o660, stat.S_IMODE(socket.stat().st_mode))
        # The TCP port the probes use serves nothing else without the token.
        with running.Channel() as channel:
            with self.assertRaises(grpc.RpcError) as caught:
                self.CallAdmin(channel)
            self.assertEqual(grpc.StatusCode.UNAUTHENTICATED, caught.exception.code())
        # The application's path: the Unix socket, with the shared token.
        with running.Channel(f"unix://{socket}") as channel:
            self.CallAdmin(channel, running.env["WSBRIDGE_AUTH_TOKEN"])
        self.Report(running)
        self.CheckDrainExit(running)

    def test_pool_mtls(self):
        running = self.Start("overlays/pool-mtls")
        self.CheckProbes(running)
        self.CheckScrape(running)
        pki = running.workdir / "pki"
        cert, key = (pki / "tls.crt").read_bytes(), (pki / "tls.key").read_bytes()
        with running.Channel(credentials=grpc.ssl_channel_credentials(
                root_certificates=cert, private_key=key, certificate_chain=cert)) as channel:
            self.assertIn(running.Health(channel, ""), (SERVING, NOT_SERVING))
            self.CallAdmin(channel)
        with running.Channel(credentials=grpc.ssl_channel_credentials(
                root_certificates=cert)) as channel:
            with self.assertRaises(grpc.RpcError):
                self.CallAdmin(channel)
        self.Report(running)
        self.CheckDrainExit(running)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", required=True)
    parser.add_argument("--kubectl", required=True)
    parser.add_argument("--wsbridged", required=True)
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest)
