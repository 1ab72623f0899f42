"""Renders every Kustomize directory under deploy/k8s with `kubectl kustomize` and
checks the objects: probes, config (through the real `wsbridged --check`), secrets,
grace period, security context, resources, scrape annotations, pool objects."""

import argparse
import pathlib
import sys
import unittest

import yaml

import deploy_checks as dc

ARGS = None
EXPECTED = ("base", "overlays/sidecar", "overlays/pool", "overlays/pool-mtls")


class K8sManifestsTest(unittest.TestCase):

    def setUp(self):
        self.k8s = pathlib.Path(ARGS.repo) / "deploy" / "k8s"

    def test_expected_overlays_exist(self):
        found = {str(p.relative_to(self.k8s)) for p in dc.Overlays(self.k8s)}
        for name in EXPECTED:
            self.assertIn(name, found)

    def test_every_overlay_passes_every_check(self):
        overlays = dc.Overlays(self.k8s)
        self.assertTrue(overlays)
        for directory in overlays:
            with self.subTest(overlay=str(directory.relative_to(self.k8s))):
                problems = dc.CheckOverlay(ARGS.kubectl, directory, ARGS.wsbridged)
                self.assertEqual([], problems, "\n" + "\n".join(problems))

    def _Pod(self, overlay):
        objects = dc.Render(ARGS.kubectl, self.k8s / overlay)
        pods, problems = dc.FindPods(objects)
        self.assertEqual([], problems)
        self.assertEqual(1, len(pods))
        return objects, pods[0]

    def test_sidecar_shares_a_unix_socket_with_the_application(self):
        _, pod = self._Pod("overlays/sidecar")
        socket = pod.config["server"]["unix_socket"]
        self.assertTrue(pod.is_init, "wsbridged should be a native sidecar")
        self.assertEqual("Always", pod.wsbridged["restartPolicy"])
        app = [c for c in pod.spec["containers"]]
        self.assertEqual(1, len(app))
        target = {e["name"]: e.get("value") for e in app[0]["env"]}["WSBRIDGE_TARGET"]
        self.assertEqual(f"unix://{socket}", target)
        # The application authenticates with the same Secret wsbridged checks against.
        token_env = pod.config["server"]["auth_token"]["env"]
        ref = {e["name"]: e for e in pod.wsbridged["env"]}[token_env]["valueFrom"]
        app_ref = {e["name"]: e for e in app[0]["env"]}["WSBRIDGE_AUTH_TOKEN"]["valueFrom"]
        self.assertEqual(ref, app_ref)

    def test_pool_has_service_autoscaler_and_budget(self):
        objects, pod = self._Pod("overlays/pool")
        kinds = sorted(o["kind"] for o in objects)
        for kind in ("Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Deployment"):
            self.assertIn(kind, kinds)
        self.assertIn("auth_token", pod.config["server"])
        services = [o for o in objects if o["kind"] == "Service"]
        grpc_port = dc.ListenPort(pod.config["server"]["listen"])[1]
        for service in services:
            self.assertIn(grpc_port, [p["port"] for p in service["spec"]["ports"]])

    def test_pool_mtls_requires_client_certificates(self):
        _, pod = self._Pod("overlays/pool-mtls")
        tls = pod.config["server"]["tls"]
        self.assertTrue(tls["require_client_cert"])
        self.assertTrue(tls["client_ca_file"])
        self.assertEqual("/readyz", pod.wsbridged["readinessProbe"]["httpGet"]["path"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", required=True)
    parser.add_argument("--kubectl", required=True)
    parser.add_argument("--wsbridged", required=True)
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest)
