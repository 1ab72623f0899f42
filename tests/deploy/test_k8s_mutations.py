"""Breaks a copy of deploy/k8s in one place at a time and checks that the manifest
checks report exactly that break: none of them can pass vacuously."""

import argparse
import pathlib
import shutil
import sys
import tempfile
import unittest

import deploy_checks as dc

ARGS = None

# (name, file under deploy/k8s, old text, new text, overlay to render, expected problem)
MUTATIONS = [
    ("short_grace_period", "base/deployment.yaml", "terminationGracePeriodSeconds: 40",
     "terminationGracePeriodSeconds: 25", "base", "terminationGracePeriodSeconds (25)"),
    ("sidecar_grace_period", "overlays/sidecar/to-sidecar.yaml", "value: 60", "value: 15",
     "overlays/sidecar", "terminationGracePeriodSeconds (15)"),
    ("deadline_not_after_drain", "overlays/pool/wsbridged.yaml", "deadline: 25s",
     "deadline: 20s", "overlays/pool", "must exceed drain_timeout"),
    ("probe_wrong_port", "base/deployment.yaml", "grpc:\n              port: 50051\n"
     "            periodSeconds: 5", "grpc:\n              port: 50052\n            periodSeconds: 5",
     "base", "readinessProbe probes gRPC port 50052"),
    ("listener_moved", "overlays/pool/wsbridged.yaml", 'listen: "0.0.0.0:50051"',
     'listen: "0.0.0.0:50052"', "overlays/pool", "config listens on 50052"),
    ("loopback_listener", "overlays/sidecar/wsbridged.yaml", 'listen: "0.0.0.0:50051"',
     'listen: "127.0.0.1:50051"', "overlays/sidecar", "loopback listener"),
    ("http_probe_on_plaintext", "overlays/pool-mtls/wsbridged.yaml", "  tls:\n",
     "  tls_off:\n", "overlays/pool-mtls", "use a native gRPC probe"),
    ("liveness_follows_upstreams", "base/deployment.yaml",
     "              service: wsbridge.admin.v1.AdminService\n            periodSeconds: 10",
     "            periodSeconds: 10", "base", "livenessProbe checks service None"),
    ("missing_probe", "base/deployment.yaml", "          livenessProbe:\n",
     "          livenessProbeX:\n", "base", "wsbridged has no livenessProbe"),
    ("inlined_secret", "overlays/pool/wsbridged.yaml", "auth_token: {env: WSBRIDGE_AUTH_TOKEN}",
     "auth_token: {value: hunter2}", "overlays/pool", "inlines a secret value"),
    ("env_secret_not_from_secret", "base/deployment.yaml",
     "            - name: WSBRIDGE_DFX_DEVICE_TOKEN\n              valueFrom:\n"
     "                secretKeyRef:\n                  name: wsbridge-dfx\n"
     "                  key: device-token\n",
     "            - name: WSBRIDGE_DFX_DEVICE_TOKEN\n              value: dev-token-123\n",
     "base", "sets WSBRIDGE_DFX_DEVICE_TOKEN literally"),
    ("env_not_set", "overlays/pool/wsbridged.yaml", "{env: WSBRIDGE_DFX_DEVICE_TOKEN}",
     "{env: WSBRIDGE_OTHER_TOKEN}", "overlays/pool", "does not set"),
    ("tls_key_on_configmap", "overlays/pool-mtls/wsbridged.yaml",
     "key_file: /var/run/secrets/wsbridge/tls/tls.key", "key_file: /etc/wsbridge/tls.key",
     "overlays/pool-mtls", "is not on a Secret volume"),
    ("secret_rendered", "overlays/pool/kustomization.yaml", "patches:\n",
     "secretGenerator:\n  - name: wsbridge-caller\n    literals: [auth-token=abc]\npatches:\n",
     "overlays/pool", "renders Secret"),
    ("writable_root", "base/deployment.yaml", "readOnlyRootFilesystem: true",
     "readOnlyRootFilesystem: false", "base", "writable root file system"),
    ("privilege_escalation", "overlays/sidecar/to-sidecar.yaml",
     "allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true", "overlays/sidecar",
     "container app allows privilege escalation"),
    ("capabilities_kept", "base/deployment.yaml", 'drop: ["ALL"]', 'drop: ["NET_RAW"]', "base",
     "does not drop ALL"),
    ("root_allowed", "base/deployment.yaml", "            runAsNonRoot: true\n",
     "            runAsNonRoot: false\n", "base", "container wsbridged may run as root"),
    ("no_memory_limit", "base/deployment.yaml", "              memory: 512Mi\n", "",
     "base", "has no memory limit"),
    ("scrape_wrong_port", "base/deployment.yaml", 'prometheus.io/port: "9090"',
     'prometheus.io/port: "9091"', "base", "prometheus.io/port is 9091"),
    ("no_scrape", "base/deployment.yaml", 'prometheus.io/scrape: "true"',
     'prometheus.io/scrape: "false"', "base", "prometheus.io/scrape"),
    ("socket_open_to_others", "overlays/sidecar/wsbridged.yaml", 'unix_socket_mode: "0660"',
     'unix_socket_mode: "0666"', "overlays/sidecar", "opens the socket to others"),
    ("socket_not_shared", "overlays/sidecar/socket-volume.yaml",
     "        - name: app\n          volumeMounts:\n            - name: wsbridge-socket\n",
     "        - name: app\n          volumeMounts:\n            - name: other\n",
     "overlays/sidecar", "no other container mounts wsbridge-socket"),
    ("sidecar_not_restarting", "overlays/sidecar/to-sidecar.yaml", "value: Always",
     "value: OnFailure", "overlays/sidecar", "without restartPolicy: Always"),
    ("hpa_single_replica", "overlays/pool/hpa.yaml", "minReplicas: 2", "minReplicas: 1",
     "overlays/pool", "minReplicas < 2"),
    ("replicas_fight_hpa", "overlays/pool/kustomization.yaml", "      - op: remove\n"
     "        path: /spec/replicas", "      - op: add\n        path: /spec/paused\n"
     "        value: false", "overlays/pool", "sets replicas although an HPA"),
    ("rollout_drops_capacity", "overlays/pool/deployment-patch.yaml", "maxUnavailable: 0",
     "maxUnavailable: 1", "overlays/pool", "maxUnavailable != 0"),
    ("pdb_selects_nothing", "overlays/pool/pdb.yaml",
     "    matchLabels:\n      app.kubernetes.io/name: wsbridge",
     "    matchLabels:\n      app.kubernetes.io/name: nothing", "overlays/pool",
     "PDB wsbridge selects no pods"),
    ("service_selects_nothing", "overlays/pool/service.yaml",
     "  selector:\n    app.kubernetes.io/name: wsbridge\n  ports:",
     "  selector:\n    app.kubernetes.io/name: nothing\n  ports:", "overlays/pool",
     "Service wsbridge selects no pods"),
    ("config_rejected_by_wsbridged", "overlays/pool/wsbridged.yaml", "  io_threads: 2\n",
     "  io_threads: 2\n  no_such_setting: 1\n", "overlays/pool", "wsbridged --check rejects"),
    ("config_bad_url_rejected", "overlays/sidecar/wsbridged.yaml", 'url: "wss://api.deepaffex.ai"',
     'url: "ws://api.deepaffex.ai"', "overlays/sidecar", "wsbridged --check rejects"),
    ("kustomize_error", "overlays/pool/kustomization.yaml", "  - pdb.yaml\n",
     "  - pdb-missing.yaml\n", "overlays/pool", "kubectl kustomize"),
]


class K8sMutationTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="wsbridge-k8s-mut-")
        self.k8s = pathlib.Path(self.tmp.name) / "k8s"
        shutil.copytree(pathlib.Path(ARGS.repo) / "deploy" / "k8s", self.k8s)

    def tearDown(self):
        self.tmp.cleanup()

    def test_unbroken_copy_passes(self):
        for overlay in dc.Overlays(self.k8s):
            self.assertEqual([], dc.CheckOverlay(ARGS.kubectl, overlay, ARGS.wsbridged))

    def test_each_break_is_reported(self):
        for name, path, old, new, overlay, expected in MUTATIONS:
            with self.subTest(mutation=name):
                file = self.k8s / path
                original = file.read_text()
                self.assertIn(old, original, f"mutation {name} no longer applies to {path}")
                file.write_text(original.replace(old, new, 1))
                try:
                    problems = dc.CheckOverlay(ARGS.kubectl, self.k8s / overlay, ARGS.wsbridged)
                finally:
                    file.write_text(original)
                self.assertTrue(any(expected in p for p in problems),
                                f"{name}: expected a problem containing {expected!r}, got "
                                f"{problems}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", required=True)
    parser.add_argument("--kubectl", required=True)
    parser.add_argument("--wsbridged", required=True)
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest)
