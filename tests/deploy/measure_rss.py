"""Measures wsbridged's resident memory (VmRSS, /proc/PID/status) idle and with N
upstream sessions, each with one open result stream, against the DFX emulator. The
figures behind the resource requests and limits in deploy/k8s (docs/deploy.md,
"Resources"). Not a test: it prints a table.

  /usr/bin/python3 tests/deploy/measure_rss.py --wsbridged build/daemon/wsbridged \
      --emulator build/tests/upstreams/wsbridge-emulator [--sessions 1,10,100,500]
"""

import argparse
import json
import os
import pathlib
import select
import signal
import subprocess
import sys
import tempfile
import time

import grpc


def _ReadJsonLine(proc, deadline_s=30):
    deadline = time.monotonic() + deadline_s
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise RuntimeError("process did not print its listening line")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            data += os.read(proc.stdout.fileno(), 4096)
    return json.loads(data.split(b"\n")[0])


def _Status(pid):
    fields = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            fields[key] = int(value.split()[0])
    return fields


def _CpuSeconds(pid):
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _Field1(value):
    data = value.encode()
    return b"\x0a" + _Varint(len(data)) + data


def _Varint(n):
    out = b""
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out += bytes([byte | 0x80])
        else:
            return out + bytes([byte])


def _ParseField1(message):
    # CreateMeasurementResponse { string measurement_id = 1; }
    assert message[0] == 0x0A
    length, pos, shift = 0, 1, 0
    while True:
        byte = message[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if not byte & 0x80:
            break
    return message[pos:pos + length].decode()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--wsbridged", required=True)
    parser.add_argument("--emulator", required=True)
    parser.add_argument("--sessions", default="1,10,100,500,1000")
    parser.add_argument("--hold", type=float, default=30,
                        help="seconds to measure CPU with every session open and idle")
    parser.add_argument("--tls", action="store_true",
                        help="wss:// upstream (self-signed certificate, verified)")
    args = parser.parse_args()
    steps = [int(n) for n in args.sessions.split(",")]

    tmp = tempfile.TemporaryDirectory(prefix="wsbridge-rss-")
    emulator_args = [args.emulator, "--dfx", "127.0.0.1:0"]
    upstream_tls = "allow_plaintext: true"
    if args.tls:
        cert, key = pathlib.Path(tmp.name) / "up.crt", pathlib.Path(tmp.name) / "up.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                        "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                        "-keyout", str(key), "-out", str(cert)], check=True,
                       capture_output=True)
        emulator_args += ["--tls-cert", str(cert), "--tls-key", str(key)]
        upstream_tls = f'tls: {{ca_file: "{cert}", server_name: localhost}}'
    emulator = subprocess.Popen(emulator_args, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
    daemon = None
    streams = []
    try:
        url = _ReadJsonLine(emulator)["url"]
        config = pathlib.Path(tmp.name) / "wsbridged.yaml"
        config.write_text(f"""
server: {{listen: "127.0.0.1:0"}}
admin: {{listen: "127.0.0.2:0"}}
log: {{level: warn}}
bridges:
  - name: dfx
    dfx:
      upstream: {{url: "{url}", {upstream_tls}}}
      allow_call_token: true
      max_sessions: {max(steps) + 10}
""")
        daemon = subprocess.Popen([args.wsbridged, "--config", str(config)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        target = _ReadJsonLine(daemon)["grpc"]
        channel = grpc.insecure_channel(target)
        health = channel.unary_unary("/grpc.health.v1.Health/Check")
        health(b"", timeout=10)
        rows = [("idle (listening, no session)", _Status(daemon.pid))]
        create = channel.unary_unary("/wsbridge.dfx.v1.DfxService/CreateMeasurement")
        subscribe = channel.unary_stream("/wsbridge.dfx.v1.DfxService/SubscribeResults")
        opened = 0
        for n in steps:
            while opened < n:
                token = [("x-dfx-device-token", f"rss-token-{opened:05d}")]
                mid = _ParseField1(create(_Field1("study-1"), metadata=token, timeout=30))
                stream = subscribe(_Field1(mid), metadata=token)
                stream.initial_metadata()  # the upstream acknowledged the subscription
                streams.append(stream)
                opened += 1
            rows.append((f"{n} sessions, {n} result streams", _Status(daemon.pid)))
        print(f"{'state':<34} {'VmRSS KiB':>10} {'VmHWM KiB':>10} {'threads':>8} "
              f"{'KiB per added session':>22}")
        previous = None
        for label, s in rows:
            n = int(label.split()[0]) if label[0].isdigit() else 0
            per = ""
            if previous is not None and n > previous[0]:
                per = f"{(s['VmRSS'] - previous[1]) / (n - previous[0]):.1f}"
            previous = (n, s["VmRSS"])
            print(f"{label:<34} {s['VmRSS']:>10} {s['VmHWM']:>10} {s['Threads']:>8} {per:>22}")
        setup_cpu = _CpuSeconds(daemon.pid)
        print(f"CPU to open {opened} sessions (TLS handshake, login, create, subscribe): "
              f"{setup_cpu:.2f}s total, {1000 * setup_cpu / max(opened, 1):.2f} ms each")
        # Idle sessions still cost CPU: keepalive pings and health polling.
        before, start = _CpuSeconds(daemon.pid), time.monotonic()
        time.sleep(args.hold)  # a measurement over wall time, not a wait for a condition
        used = _CpuSeconds(daemon.pid) - before
        print(f"CPU with {opened} idle sessions: {1000 * used / (time.monotonic() - start):.1f} "
              f"millicores over {args.hold:.0f}s; VmRSS {_Status(daemon.pid)['VmRSS']} KiB")
    finally:
        for stream in streams:
            stream.cancel()
        for proc in (daemon, emulator):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
