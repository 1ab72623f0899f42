#!/usr/bin/python3
"""Polyglot check: a Python gRPC client (Debian's python3-grpcio) talks to wsbridged.

Generates Python stubs with protoc + grpc_python_plugin, starts the real wsbridged on
port 0, reads its "listening" line, calls grpc.health.v1.Health/Check and
wsbridge.admin.v1.AdminService over TCP and the Unix socket, then stops it with SIGTERM.
"""
import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time


def read_listening(proc, timeout):
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            continue
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "listening":
                return event
    raise RuntimeError("wsbridged did not print its listening line")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--wsbridged", required=True)
    parser.add_argument("--protoc", required=True)
    parser.add_argument("--plugin", default="/usr/bin/grpc_python_plugin")
    parser.add_argument("--proto-dir", required=True)
    parser.add_argument("--health-proto-dir", required=True)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="wsbridge-py-") as tmp:
        gen = os.path.join(tmp, "gen")
        os.mkdir(gen)
        # health.proto goes in at the top level: generated as grpc/health/v1/*.py it
        # would be shadowed by the installed `grpc` package. The proto package (and so
        # the wire names) stays grpc.health.v1.
        health_dir = os.path.join(tmp, "health")
        os.mkdir(health_dir)
        with open(os.path.join(args.health_proto_dir, "grpc/health/v1/health.proto")) as src, \
                open(os.path.join(health_dir, "health.proto"), "w") as dst:
            dst.write(src.read())
        subprocess.run([args.protoc, "--plugin=protoc-gen-grpc_python=" + args.plugin,
                        "-I", args.proto_dir, "-I", health_dir, "-I", "/usr/include",
                        "--python_out=" + gen, "--grpc_python_out=" + gen,
                        "wsbridge/admin/v1/admin.proto", "health.proto"],
                       check=True)
        sys.path.insert(0, gen)
        import grpc  # noqa: E402
        import health_pb2  # noqa: E402
        import health_pb2_grpc  # noqa: E402
        from wsbridge.admin.v1 import admin_pb2, admin_pb2_grpc  # noqa: E402

        socket_path = os.path.join(tmp, "wsbridged.sock")
        config = os.path.join(tmp, "wsbridged.yaml")
        with open(config, "w") as f:
            f.write('server:\n  listen: "127.0.0.1:0"\n  unix_socket: %s\n'
                    'admin:\n  listen: "127.0.0.1:0"\n'
                    'shutdown:\n  drain_timeout: 1s\n  deadline: 5s\n' % socket_path)
        proc = subprocess.Popen([args.wsbridged, "--config", config], stdout=subprocess.PIPE)
        try:
            event = read_listening(proc, 30)
            for target in (event["grpc"], "unix:" + event["unix"]):
                with grpc.insecure_channel(target) as channel:
                    health = health_pb2_grpc.HealthStub(channel)
                    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING, reply
                    admin = admin_pb2_grpc.AdminServiceStub(channel)
                    sessions = admin.ListSessions(admin_pb2.ListSessionsRequest(), timeout=10)
                    assert len(sessions.sessions) == 0, sessions
                    try:
                        admin.CloseSession(admin_pb2.CloseSessionRequest(id=""), timeout=10)
                        raise AssertionError("CloseSession with an empty id succeeded")
                    except grpc.RpcError as e:
                        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)  # shutdown.deadline 5s, plus slack for a loaded machine
            assert code == 0, "wsbridged exited with %d" % code
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print("python client OK")


if __name__ == "__main__":
    main()
