"""Static checks of deploy/docker/Dockerfile (no container engine is needed): stages,
non-root user, no secrets baked in, the copied binary path is where CMake builds
wsbridged, and the runtime stage installs the libraries wsbridged links against."""

import argparse
import os
import pathlib
import sys
import unittest

import deploy_checks as dc

ARGS = None
# Sanitizer runtimes appear in sanitizer builds only; the image is a Release build.
_SANITIZER_RUNTIMES = ("libasan", "libubsan", "liblsan", "libtsan")


def _Inputs():
    repo = pathlib.Path(ARGS.repo)
    text = (repo / "deploy" / "docker" / "Dockerfile").read_text()
    rel = os.path.relpath(os.path.realpath(ARGS.wsbridged), os.path.realpath(ARGS.build_dir))
    needed = [p for p in dc.RuntimePackagesNeeded(ARGS.wsbridged)
              if not p.startswith(_SANITIZER_RUNTIMES)]
    base = dc.Render(ARGS.kubectl, repo / "deploy" / "k8s" / "base")
    pods, _ = dc.FindPods(base)
    return text, rel, needed, pods[0].config_path


class DockerfileTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.text, cls.rel, cls.needed, cls.config_path = _Inputs()

    def Check(self, text):
        return dc.CheckDockerfile(text, self.rel, self.needed, self.config_path)

    def test_dockerfile_passes(self):
        problems = self.Check(self.text)
        self.assertEqual([], problems, "\n" + "\n".join(problems))

    def test_binary_links_against_grpc_from_debian(self):
        # Guards the package mapping itself: a lookup that found nothing would make
        # the library check vacuous.
        self.assertIn("libgrpc++1.51", self.needed)

    def test_dockerignore_keeps_build_trees_and_keys_out(self):
        ignore = (pathlib.Path(ARGS.repo) / "deploy" / "docker" /
                  "Dockerfile.dockerignore").read_text().split()
        for pattern in ("build", ".git", "**/*.key", "**/*.pem"):
            self.assertIn(pattern, ignore)

    # Each break below must be caught, or the check above proves nothing.
    def AssertCaught(self, old, new, expected):
        self.assertIn(old, self.text)
        problems = self.Check(self.text.replace(old, new, 1))
        self.assertTrue(any(expected in p for p in problems),
                        f"expected a problem containing {expected!r}, got {problems}")

    def test_catches_root_user(self):
        self.AssertCaught("USER 65532:65532", "USER 0", "USER is root")

    def test_catches_named_user(self):
        self.AssertCaught("USER 65532:65532", "USER wsbridge", "not numeric")

    def test_catches_missing_user(self):
        self.AssertCaught("USER 65532:65532\n", "", "sets no USER")

    def test_catches_wrong_binary_path(self):
        self.AssertCaught(f"/src/build/{self.rel}", "/src/build/wsbridged", "nothing copies")

    def test_catches_fat_runtime_image(self):
        self.AssertCaught("FROM debian:bookworm-slim", "FROM debian:bookworm", "bookworm-slim")

    def test_catches_baked_in_secret(self):
        self.AssertCaught("USER 65532:65532", "ENV WSBRIDGE_AUTH_TOKEN=abc\nUSER 65532:65532",
                          "baked-in secret")

    def test_catches_copied_key(self):
        self.AssertCaught("USER 65532:65532", "COPY server.key /etc/wsbridge/\nUSER 65532:65532",
                          "secret material")

    def test_catches_missing_runtime_library(self):
        self.AssertCaught("      libgrpc++1.51 \\\n", "", "does not install libgrpc++1.51")

    def test_catches_shell_form_entrypoint(self):
        self.AssertCaught('ENTRYPOINT ["/usr/local/bin/wsbridged"]',
                          "ENTRYPOINT /usr/local/bin/wsbridged", "shell form")

    def test_catches_config_path_drift(self):
        self.AssertCaught(f'"{self.config_path}"]', '"/config/wsbridged.yaml"]',
                          "differs from the manifests")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", required=True)
    parser.add_argument("--kubectl", required=True)
    parser.add_argument("--wsbridged", required=True)
    parser.add_argument("--build-dir", required=True)
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest)
