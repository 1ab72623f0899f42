#!/usr/bin/python3
"""The example clients (examples/python, examples/node) against the real daemon.

Starts wsbridge-emulator with all four APIs on 127.0.0.1 port 0, writes a wsbridged
config for the URLs it prints (gRPC on 127.0.0.1:0), starts wsbridged and reads its
"listening" line, then runs one example client against it twice:
  1. all four bridges: exit 0, and its JSON summary shows a DFX measurement whose LAST
     chunk was acknowledged with results, an NLX conversation whose every turn was
     answered (the emulator's words, so the turn reached it), Emogg events on the
     subscribed channel, a Nexora answer streamed in chunks and ended by done;
  2. an Emogg channel key the emulator does not know: exit non-zero, summary naming
     NOT_FOUND (the client reports failures instead of printing nothing).
The Node client is installed first with `npm ci` from its package-lock.json, into the
build tree; a failed install fails the test (it is never skipped).
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

NLX_KEYS = ("nlx-emulator-api-key", "nlx-emulator-deployment", "nlx-emulator-channel")


class Drain(threading.Thread):
    """Reads a child's stdout to the end so its pipe never fills; keeps the text for
    the failure report. read_json waits (with a deadline) for JSON lines."""

    def __init__(self, proc, name):
        super().__init__(daemon=True)
        self.proc, self.name = proc, name
        self.lines = []
        self.cond = threading.Condition()
        self.closed = False

    def run(self):
        for raw in iter(self.proc.stdout.readline, b""):
            with self.cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait_json(self, predicate, count, timeout):
        """The first `count` JSON lines matching predicate, within timeout seconds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = []
                for line in self.lines:
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(obj, dict) and predicate(obj):
                        found.append(obj)
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    raise AssertionError("%s: wanted %d line(s), got %d before %s; output:\n%s" % (
                        self.name, count, len(found), "it exited" if self.closed else "the deadline",
                        self.tail()))
                self.cond.wait(left)

    def tail(self, n=40):
        return "\n".join(self.lines[-n:])


def start(cmd, name):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    drain = Drain(proc, name)
    drain.start()
    return proc, drain


def stop(proc, timeout=30):
    """SIGTERM, then wait; kill only if it does not exit in time. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("process %d ignored SIGTERM for %ds" % (proc.pid, timeout))
    return proc.returncode


def write_config(path, urls):
    api, deployment, channel = NLX_KEYS
    config = """\
server:
  listen: "127.0.0.1:0"
log:
  level: warn
shutdown:
  drain_timeout: 1s
  deadline: 10s
bridges:
  - name: dfx
    dfx:
      upstream: {url: "%(dfx)s", allow_plaintext: true}
      device_token: {value: example-device-token}
  - name: nlx
    nlx:
      upstream: {url: "%(nlx)s", allow_plaintext: true}
      api_key: {value: %(api)s}
      deployment_key: {value: %(deployment)s}
      channel_key: {value: %(channel)s}
      language: en-US
  - name: emogg
    emogg:
      upstream: {url: "%(emogg)s", allow_plaintext: true}
      token: {value: example-emogg-token}
  - name: nexora
    nexora:
      upstream: {url: "%(nexora)s", allow_plaintext: true}
      api_key: {value: nxr_example_key}
""" % dict(urls, api=api, deployment=deployment, channel=channel)
    with open(path, "w") as f:
        f.write(config)


def check(cond, what, summary):
    if not cond:
        raise AssertionError("%s\nsummary: %s" % (what, json.dumps(summary, indent=2, sort_keys=True)))


def check_full_run(summary, nlx_texts, nexora_message):
    b = summary.get("bridges", {})
    check(summary.get("ok") is True and set(b) == {"dfx", "nlx", "emogg", "nexora"},
          "the client did not report all four bridges OK", summary)
    dfx = b["dfx"]
    n = dfx["chunks_sent"]
    check(dfx["accepted"] == list(range(n)), "DFX: not every chunk was acknowledged in order", summary)
    check(dfx["last_acked_chunk_order"] == n - 1, "DFX: the LAST chunk was not acknowledged", summary)
    check(dfx["results"] > 0, "DFX: no results", summary)
    check(dfx["last_result_chunk_order"] == n - 1, "DFX: the last result is not the LAST chunk's", summary)
    nlx = b["nlx"]
    check(bool(nlx["conversation_id"]), "NLX: no conversation id", summary)
    check(not nlx["failed"], "NLX: failed turns", summary)
    responses = nlx["responses"]
    check([r["turn"] for r in responses] == list(range(1, len(nlx_texts) + 2)),
          "NLX: each text turn and the choice turn should have one response, in order", summary)
    # The emulator answers `Turn <n>: you said "<text>"`, offers choices to a turn whose
    # first word is "choices", and answers a chosen choice with "You chose <id>."
    check(responses[0]["texts"] == ['Turn 1: you said "%s"' % nlx_texts[0]],
          "NLX: the first turn's response does not quote it", summary)
    check(responses[1]["choices"] == ["choice-economy", "choice-business"],
          "NLX: the 'choices' turn's response does not offer the emulator's choices", summary)
    chosen = responses[1]["choices"][0]
    check(summary["bridges"]["nlx"]["turns"][2].startswith("choose %s" % chosen),
          "NLX: the client did not choose the first choice", summary)
    check(any("You chose %s" % chosen in t for t in responses[-1]["texts"]),
          "NLX: the choice turn was not answered with the choice", summary)
    emogg = b["emogg"]
    check(emogg["subscription_id"] != "", "Emogg: no subscribed update", summary)
    check(emogg["events"] >= 3 and emogg["events_on_subscription"] == emogg["events"],
          "Emogg: fewer than 3 events, or events of another subscription", summary)
    check(emogg["event_types"] == ["sec"], "Emogg: session_emotions_counts events are 'sec'", summary)
    check("ts" in emogg["ping"], "Emogg: ping answered without ts", summary)
    nexora = b["nexora"]
    check(nexora["done"] and nexora["events"][-1] == "done" and nexora["events"][0] == "accepted",
          "Nexora: the answer did not start with accepted and end in done", summary)
    check(nexora["events"].count("chunk") >= 2, "Nexora: the answer was not streamed in chunks", summary)
    check(nexora_message in nexora["answer"], "Nexora: the joined answer does not echo the message", summary)
    check(bool(nexora["chat_id"]) and bool(nexora["message_id"]), "Nexora: no chat or message id", summary)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--client", choices=("python", "node"), required=True)
    p.add_argument("--examples-dir", required=True, help="the source tree's examples/")
    p.add_argument("--proto-dir", required=True)
    p.add_argument("--emulator", required=True)
    p.add_argument("--wsbridged", required=True)
    p.add_argument("--protoc", default="/usr/bin/protoc")
    p.add_argument("--grpc-python-plugin", default="/usr/bin/grpc_python_plugin")
    p.add_argument("--node", default="node")
    p.add_argument("--npm", default="npm")
    p.add_argument("--work-dir", help="where npm ci installs the Node client (build tree)")
    args = p.parse_args()

    if args.client == "python":
        client = ["/usr/bin/python3", os.path.join(args.examples_dir, "python", "wsbridge_client.py"),
                  "--proto-dir", args.proto_dir, "--protoc", args.protoc,
                  "--grpc-python-plugin", args.grpc_python_plugin]
    else:
        for tool in (args.node, args.npm):
            if shutil.which(tool) is None:
                sys.exit("FAIL - %s not found: install nodejs >= 20 and npm" % tool)
        src = os.path.join(args.examples_dir, "node")
        os.makedirs(args.work_dir, exist_ok=True)
        for f in ("package.json", "package-lock.json", "client.mjs"):
            shutil.copy(os.path.join(src, f), args.work_dir)
        install = subprocess.run([args.npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund",
                                  "--loglevel=error"], cwd=args.work_dir)
        if install.returncode != 0:
            sys.exit("FAIL - npm ci of the pinned @grpc/grpc-js, @grpc/proto-loader and protobufjs failed "
                     "(is the npm registry reachable?)")
        client = [args.node, os.path.join(args.work_dir, "client.mjs"), "--proto-dir", args.proto_dir]

    nlx_texts = ["Hello there", "choices please"]
    nexora_message = "status of the example repo?"
    with tempfile.TemporaryDirectory(prefix="wsbridge-examples-") as tmp:
        emulator, emulator_out = start(
            [args.emulator, "--dfx", "127.0.0.1:0", "--nlx", "127.0.0.1:0", "--emogg", "127.0.0.1:0",
             "--nexora", "127.0.0.1:0", "--emogg-event-interval", "100"], "wsbridge-emulator")
        daemon = None
        try:
            lines = emulator_out.wait_json(lambda o: "api" in o and "url" in o, 4, 30)
            urls = {line["api"]: line["url"] for line in lines}
            assert set(urls) == {"dfx", "nlx", "emogg", "nexora"}, urls
            config = os.path.join(tmp, "wsbridged.yaml")
            write_config(config, urls)
            daemon, daemon_out = start([args.wsbridged, "--config", config], "wsbridged")
            target = daemon_out.wait_json(lambda o: o.get("event") == "listening", 1, 30)[0]["grpc"]

            def run_client(extra, name):
                summary_path = os.path.join(tmp, name + ".json")
                cmd = client + ["--target", target, "--timeout", "20", "--summary", summary_path] + extra
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                print("$ %s\n%s%s" % (" ".join(cmd), done.stdout, done.stderr), flush=True)
                summary = None
                if os.path.exists(summary_path):
                    with open(summary_path) as f:
                        summary = json.load(f)
                return done.returncode, summary

            extra = ["--emogg-key", "example-session:1s", "--emogg-events", "3",
                     "--nexora-message", nexora_message]
            for text in nlx_texts:
                extra += ["--nlx-text", text]
            code, summary = run_client(extra, "all")
            assert code == 0, "the client exited %d\nwsbridged:\n%s" % (code, daemon_out.tail())
            assert summary is not None, "the client wrote no summary"
            check_full_run(summary, nlx_texts, nexora_message)

            code, summary = run_client(["--bridges", "emogg", "--emogg-key", "unknown-session:1s"], "bad")
            assert code == 1, "an unknown Emogg channel key should make the client exit 1, got %d" % code
            err = (summary or {}).get("bridges", {}).get("emogg", {}).get("error", {})
            check(summary["ok"] is False and err.get("code") == "NOT_FOUND",
                  "the failed subscription should be reported as NOT_FOUND", summary)

            assert stop(daemon) == 0, "wsbridged exited non-zero:\n%s" % daemon_out.tail()
            assert stop(emulator) == 0, "wsbridge-emulator exited non-zero"
        finally:
            for proc in (daemon, emulator):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
    print("%s example client OK" % args.client)


if __name__ == "__main__":
    main()
