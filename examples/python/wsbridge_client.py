#!/usr/bin/python3
"""wsbridge example client (Python): drives the four bridges of a running wsbridged.

  DFX     CreateMeasurement, then StreamMeasurement with results subscribed
  NLX     a Converse conversation: text turns, then the first offered choice
  Emogg   Request "ping", then Subscribe to a channel until some events came
  Nexora  CreateChat, then SendMessage: the streamed answer, chunk by chunk

It prints what it receives, writes a JSON summary when asked (--summary FILE), and
exits 0 only when every bridge it drove did what was expected (1 otherwise, 2 for a
usage or set-up error).

Stubs are generated from proto/ at start-up by protoc + grpc_python_plugin (Debian:
protobuf-compiler, protobuf-compiler-grpc, python3-grpcio) into a temporary directory;
nothing generated is kept. Run it against the demo (scripts/run.sh) with no options:

  /usr/bin/python3 examples/python/wsbridge_client.py
"""
import argparse
import importlib
import json
import os
import queue
import shutil
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BRIDGES = ("dfx", "nlx", "emogg", "nexora")
PROTOS = [
    "wsbridge/dfx/v1/dfx.proto",
    "wsbridge/nlx/v1/nlx.proto",
    "wsbridge/emogg/v1/emogg.proto",
    "wsbridge/nexora/v1/nexora.proto",
    "google/rpc/status.proto",
    "google/rpc/error_details.proto",
]


class Failure(Exception):
    """A bridge answered, but not what this client expected."""


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Drive the DFX, NLX, Emogg and Nexora bridges of a running wsbridged.")
    p.add_argument("--target", default=os.environ.get("WSBRIDGE_TARGET") or "127.0.0.1:50051",
                   help="wsbridged's gRPC address (default: $WSBRIDGE_TARGET, else the demo's "
                        "127.0.0.1:50051; unix:/tmp/wsbridge/wsbridged.sock works too)")
    p.add_argument("--bridges", default=",".join(BRIDGES),
                   help="comma-separated bridges to drive, in order (default: all four)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="deadline of each call in seconds (default 30)")
    p.add_argument("--summary", metavar="FILE",
                   help="also write what was received as JSON to FILE ('-' = stdout)")
    g = p.add_argument_group("stub generation")
    g.add_argument("--proto-dir", default=os.path.join(HERE, "..", "..", "proto"),
                   help="wsbridge's proto/ directory (default: the repository's)")
    g.add_argument("--protoc", default=shutil.which("protoc") or "/usr/bin/protoc")
    g.add_argument("--grpc-python-plugin", default=shutil.which("grpc_python_plugin")
                   or "/usr/bin/grpc_python_plugin")
    g.add_argument("--proto-include", default="/usr/include",
                   help="where google/protobuf/*.proto are (default /usr/include)")
    g = p.add_argument_group("DFX")
    g.add_argument("--dfx-study-id", default="demo")
    g.add_argument("--dfx-chunks", type=int, default=4,
                   help="chunks to stream, FIRST ... LAST (default 4, at least 2)")
    g.add_argument("--dfx-chunk-ms", type=int, default=250,
                   help="real-time duration of each chunk in ms (default 250)")
    g.add_argument("--dfx-token", help="device token sent as x-dfx-device-token metadata "
                                       "(default: the bridge's configured token)")
    g = p.add_argument_group("NLX")
    g.add_argument("--nlx-text", action="append",
                   help="a user turn (repeatable; default: 'Hello there', 'choices please')")
    g.add_argument("--nlx-conversation-id", default="",
                   help="resume this conversation (default: start a new one)")
    g.add_argument("--nlx-no-choice", action="store_true",
                   help="do not answer the last response's choices with the first one")
    g.add_argument("--nlx-api-key", help="x-nlx-api-key metadata (default: the bridge's)")
    g.add_argument("--nlx-deployment-key", help="x-nlx-deployment-key metadata")
    g.add_argument("--nlx-channel-key", help="x-nlx-channel-key metadata")
    g = p.add_argument_group("Emogg")
    g.add_argument("--emogg-channel", default="session_emotions_counts")
    g.add_argument("--emogg-key", default="demo-session:1s",
                   help="the channel's key (default demo-session:1s: session id and frequency)")
    g.add_argument("--emogg-events", type=int, default=3,
                   help="events to receive before leaving the subscription (default 3)")
    g.add_argument("--emogg-token", help="x-emogg-token metadata (default: the bridge's)")
    g = p.add_argument_group("Nexora")
    g.add_argument("--nexora-agent-id", default="demo-agent",
                   help="agent the new chat talks to (default demo-agent)")
    g.add_argument("--nexora-chat-id", help="use this chat instead of creating one")
    g.add_argument("--nexora-message", default="What is the status of my repository?")
    g.add_argument("--nexora-token", help="x-nexora-token metadata (default: the bridge's)")
    args = p.parse_args(argv)
    args.bridges = [b.strip() for b in args.bridges.split(",") if b.strip()]
    unknown = [b for b in args.bridges if b not in BRIDGES]
    if unknown or not args.bridges:
        p.error("--bridges takes a comma-separated subset of %s, got %r" %
                (",".join(BRIDGES), ",".join(unknown) or "nothing"))
    if args.dfx_chunks < 2:
        p.error("--dfx-chunks must be at least 2 (a FIRST and a LAST chunk)")
    if args.dfx_chunk_ms < 1:
        p.error("--dfx-chunk-ms must be positive")
    if args.emogg_events < 1:
        p.error("--emogg-events must be at least 1")
    if not args.nlx_text:
        args.nlx_text = ["Hello there", "choices please"]
    return args


def generate_stubs(args, out_dir):
    """protoc + grpc_python_plugin: the stubs of the four services, into out_dir."""
    for tool, flag in ((args.protoc, "--protoc"), (args.grpc_python_plugin, "--grpc-python-plugin")):
        if not (tool and os.access(tool, os.X_OK)):
            raise SystemExit("cannot run %s (%s): install Debian's protobuf-compiler and "
                             "protobuf-compiler-grpc, or pass %s" % (tool, flag, flag))
    cmd = [args.protoc, "--plugin=protoc-gen-grpc_python=" + args.grpc_python_plugin,
           "-I", args.proto_dir, "-I", args.proto_include,
           "--python_out=" + out_dir, "--grpc_python_out=" + out_dir] + PROTOS
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit("protoc failed (is --proto-dir %s wsbridge's proto/?):\n%s" %
                         (args.proto_dir, done.stderr))
    sys.path.insert(0, out_dir)


class Stubs:
    """The generated modules, imported once protoc has run."""

    def __init__(self):
        m = importlib.import_module
        self.grpc = m("grpc")
        self.dfx, self.dfx_grpc = m("wsbridge.dfx.v1.dfx_pb2"), m("wsbridge.dfx.v1.dfx_pb2_grpc")
        self.nlx, self.nlx_grpc = m("wsbridge.nlx.v1.nlx_pb2"), m("wsbridge.nlx.v1.nlx_pb2_grpc")
        self.emogg = m("wsbridge.emogg.v1.emogg_pb2")
        self.emogg_grpc = m("wsbridge.emogg.v1.emogg_pb2_grpc")
        self.nexora = m("wsbridge.nexora.v1.nexora_pb2")
        self.nexora_grpc = m("wsbridge.nexora.v1.nexora_pb2_grpc")
        self.status = m("google.rpc.status_pb2")
        self.details = m("google.rpc.error_details_pb2")


def say(*parts):
    print(*parts, flush=True)


def metadata(**pairs):
    return [(k, v) for k, v in pairs.items() if v] or None


def describe_error(s, err):
    """The gRPC error with its google.rpc.ErrorInfo (reason, metadata), as a dict."""
    out = {"code": err.code().name if err.code() else "UNKNOWN", "message": err.details() or ""}
    for key, value in (err.trailing_metadata() or ()):
        if key != "grpc-status-details-bin":
            continue
        status = s.status.Status()
        status.ParseFromString(value)
        for any_detail in status.details:
            info = s.details.ErrorInfo()
            if any_detail.Unpack(info):
                out["reason"] = info.reason
                out["domain"] = info.domain
                out["metadata"] = dict(info.metadata)
    return out


# --- DFX --------------------------------------------------------------------------------

def demo_payload(order, duration_ms):
    """A stand-in for the DFX Extraction SDK's chunk payload, in the layout the bundled
    emulator reads ("WSBE" | u32 LE order | u32 LE duration_ms | body). A real DFX
    measurement sends the SDK's payloads unchanged instead."""
    return b"WSBE" + struct.pack("<II", order, duration_ms) + b"example-client"


def run_dfx(s, channel, args):
    stub = s.dfx_grpc.DfxServiceStub(channel)
    md = metadata(**{"x-dfx-device-token": args.dfx_token})
    created = stub.CreateMeasurement(s.dfx.CreateMeasurementRequest(study_id=args.dfx_study_id),
                                     timeout=args.timeout, metadata=md)
    mid = created.measurement_id
    say("  measurement %s created (study %s)" % (mid, args.dfx_study_id))
    n = args.dfx_chunks

    def chunks():
        for i in range(n):
            stage = s.dfx.STAGE_FIRST if i == 0 else (s.dfx.STAGE_LAST if i == n - 1 else s.dfx.STAGE_CHUNK)
            c = s.dfx.MeasurementChunk(stage=stage, payload=demo_payload(i, args.dfx_chunk_ms),
                                       duration_ms=args.dfx_chunk_ms)
            if i == 0:
                c.measurement_id = mid
                c.subscribe_results = True
            yield c
        # Returning half-closes the stream: after LAST, as StreamMeasurement asks.

    summary = {"measurement_id": mid, "chunks_sent": n, "accepted": [], "results": 0,
               "last_acked_chunk_order": -1, "last_result_chunk_order": None}
    # The whole measurement (paced to real time by the bridge) must fit in one deadline.
    deadline = args.timeout + n * args.dfx_chunk_ms / 1000.0
    for event in stub.StreamMeasurement(chunks(), timeout=deadline, metadata=md):
        if event.HasField("chunk_accepted"):
            a = event.chunk_accepted
            summary["accepted"].append(a.chunk_order)
            summary["last_acked_chunk_order"] = a.chunk_order
            say("  chunk %d accepted: data id %s" % (a.chunk_order, a.measurement_data_id))
        elif event.HasField("result"):
            summary["results"] += 1
            body = json.loads(event.result.json_body or "{}")
            order = body.get("ChunkOrder")
            summary["last_result_chunk_order"] = order
            results = body.get("Results", body)
            say("  result for chunk %s: %s%s" % (order, json.dumps(results, sort_keys=True),
                                                 " (after a reconnect)" if event.result.after_reconnect else ""))
    if summary["last_acked_chunk_order"] != n - 1:
        raise Failure("the LAST chunk (%d) was not acknowledged; acknowledged: %s" % (n - 1, summary["accepted"]))
    if summary["results"] == 0:
        raise Failure("the stream ended without results")
    say("  %d chunks accepted, %d results" % (len(summary["accepted"]), summary["results"]))
    return summary


# --- NLX --------------------------------------------------------------------------------

def run_nlx(s, channel, args):
    stub = s.nlx_grpc.NlxServiceStub(channel)
    md = metadata(**{"x-nlx-api-key": args.nlx_api_key,
                     "x-nlx-deployment-key": args.nlx_deployment_key,
                     "x-nlx-channel-key": args.nlx_channel_key})
    outgoing = queue.Queue()

    def requests():
        while True:
            req = outgoing.get()
            if req is None:
                return  # half-close: the stream ends once every turn was answered
            yield req

    summary = {"conversation_id": "", "turns": [], "responses": [], "failed": []}
    call = stub.Converse(requests(), timeout=args.timeout * (len(args.nlx_text) + 2), metadata=md)
    events = iter(call)
    turn = 0

    def send(turn_msg, label):
        nonlocal turn
        req = s.nlx.ConverseRequest(turn=turn_msg)
        if turn == 0 and args.nlx_conversation_id:
            req.conversation_id = args.nlx_conversation_id
        outgoing.put(req)
        turn += 1
        summary["turns"].append(label)
        say("  > turn %d: %s" % (turn, label))

    def answer_of(number):
        """Events up to the response (or failure) of turn `number`."""
        for event in events:
            kind = event.WhichOneof("event")
            if kind == "opened":
                summary["conversation_id"] = event.opened.conversation_id
                say("  conversation %s %s" % (event.opened.conversation_id,
                                              "resumed" if event.opened.resumed else "opened"))
            elif kind == "response":
                r = event.response
                texts = [m.text for m in r.messages]
                choices = [(c.choice_id, c.choice_text) for m in r.messages for c in m.choices]
                label = "turn %d" % r.turn if r.turn else "unsolicited"
                for m in r.messages:
                    say("  < %s: %s" % (label, m.text))
                    for c in m.choices:
                        say("      choice %s: %s" % (c.choice_id, c.choice_text))
                if r.turn:
                    summary["responses"].append({"turn": r.turn, "texts": texts,
                                                 "choices": [c[0] for c in choices]})
                if r.turn == number:
                    return r
            elif kind == "turn_failed":
                f = event.turn_failed
                say("  ! turn %d failed: %s (%s)" % (f.turn, f.message, f.reason))
                summary["failed"].append({"turn": f.turn, "reason": f.reason, "message": f.message})
                if f.turn == number:
                    return None
            elif kind == "reconnected":
                say("  (socket reconnected, attempt %d)" % event.reconnected.attempt)
            elif kind == "unknown":
                say("  (unknown frame: %s)" % event.unknown.json)
        return None

    try:
        last = None
        for text in args.nlx_text:
            send(s.nlx.Turn(text=text), text)
            last = answer_of(turn)
            if last is None:
                break
        choices = [c for m in last.messages for c in m.choices] if last is not None else []
        if choices and not args.nlx_no_choice:
            send(s.nlx.Turn(structured=s.nlx.StructuredRequest(choice_id=choices[0].choice_id)),
                 "choose %s (%s)" % (choices[0].choice_id, choices[0].choice_text))
            answer_of(turn)
    except BaseException:
        call.cancel()  # closes the conversation's socket at once
        raise
    finally:
        outgoing.put(None)
    answer_of(-1)  # read on until the stream ends: unsolicited pushes, then OK or an error
    if summary["failed"]:
        raise Failure("%d turn(s) failed: %s" % (len(summary["failed"]), summary["failed"]))
    if len(summary["responses"]) != turn:
        raise Failure("%d turns sent, %d answered" % (turn, len(summary["responses"])))
    if not all(any(t for t in r["texts"]) for r in summary["responses"]):
        raise Failure("a response carried no message text: %s" % summary["responses"])
    return summary


# --- Emogg ------------------------------------------------------------------------------

def run_emogg(s, channel, args):
    stub = s.emogg_grpc.EmoggServiceStub(channel)
    md = metadata(**{"x-emogg-token": args.emogg_token})
    summary = {"channel": args.emogg_channel, "key": args.emogg_key, "subscription_id": "",
               "events": 0, "events_on_subscription": 0, "event_types": [], "gaps": 0}
    pong = stub.Request(s.emogg.RequestRequest(path="ping"), timeout=args.timeout, metadata=md)
    summary["ping"] = json.loads(pong.json_body or "{}")
    say("  ping: status %d, %s" % (pong.status, pong.json_body))

    call = stub.Subscribe(s.emogg.SubscribeRequest(channel=args.emogg_channel, key=args.emogg_key),
                          timeout=args.timeout, metadata=md)
    try:
        for message in call:
            for u in message.updates:
                kind = u.WhichOneof("update")
                if kind == "subscribed":
                    summary["subscription_id"] = u.subscribed.subscription_id
                    say("  subscribed to %s / %s as %s" % (u.subscribed.channel, u.subscribed.key,
                                                         u.subscribed.subscription_id))
                elif kind == "event":
                    e = u.event
                    summary["events"] += 1
                    if e.subscription_id == summary["subscription_id"]:
                        summary["events_on_subscription"] += 1
                    if e.type not in summary["event_types"]:
                        summary["event_types"].append(e.type)
                    when = e.timestamp.ToJsonString() if e.HasField("timestamp") else e.timestamp_raw
                    say("  event %s at %s%s: %s" % (e.type, when, " (replayed)" if e.replayed else "",
                                                    e.json_data))
                elif kind == "gap":
                    summary["gaps"] += 1
                    say("  gap: events may be missing (%s)" % u.gap.reason)
            if summary["events"] >= args.emogg_events:
                break
    finally:
        call.cancel()  # leaving releases our share of the upstream subscription
    if summary["events"] < args.emogg_events:
        raise Failure("the subscription ended after %d of %d events" % (summary["events"], args.emogg_events))
    if summary["events_on_subscription"] != summary["events"]:
        raise Failure("events arrived for another subscription than %s" % summary["subscription_id"])
    return summary


# --- Nexora -----------------------------------------------------------------------------

def run_nexora(s, channel, args):
    stub = s.nexora_grpc.NexoraServiceStub(channel)
    md = metadata(**{"x-nexora-token": args.nexora_token})
    chat_id = args.nexora_chat_id
    if not chat_id:
        chat_id = stub.CreateChat(s.nexora.CreateChatRequest(agent_id=args.nexora_agent_id),
                                  timeout=args.timeout, metadata=md).chat_id
        say("  chat %s created with agent %s" % (chat_id, args.nexora_agent_id))
    summary = {"chat_id": chat_id, "client_message_id": "", "message_id": "", "answer": "",
               "events": [], "done": False, "duplicate": False}
    say("  > %s" % args.nexora_message)
    line_open = False

    def end_line():
        nonlocal line_open
        if line_open:
            sys.stdout.write("\n")
            line_open = False

    for event in stub.SendMessage(s.nexora.SendMessageRequest(chat_id=chat_id, content=args.nexora_message),
                                  timeout=args.timeout, metadata=md):
        kind = event.WhichOneof("event")
        summary["events"].append(kind)
        summary["message_id"] = event.message_id or summary["message_id"]
        if kind == "chunk":
            # Streamed text goes out as it arrives, on one line.
            if not line_open:
                sys.stdout.write("  < ")
                line_open = True
            sys.stdout.write(event.chunk.content)
            sys.stdout.flush()
            summary["answer"] += event.chunk.content
            continue
        end_line()
        if kind == "accepted":
            summary["client_message_id"] = event.accepted.client_message_id
            say("  accepted as %s%s" % (event.accepted.client_message_id,
                                        " (generated)" if event.accepted.generated else ""))
        elif kind == "tool_call":
            say("  [tool %s called with %s]" % (event.tool_call.tool, event.tool_call.input_json))
        elif kind == "tool_result":
            say("  [tool %s returned %s]" % (event.tool_result.tool, event.tool_result.result_json))
        elif kind == "sub_agent_start":
            say("  [%s started task %s]" % (event.sub_agent_start.agent_name, event.sub_agent_start.task_id))
        elif kind == "sub_agent_complete":
            say("  [task %s done: %s]" % (event.sub_agent_complete.task_id, event.sub_agent_complete.result))
        elif kind == "restarted":
            # The bridge resent the message after a drop: what was shown is superseded.
            summary["answer"] = ""
            say("  [answer restarted (resend %d): discard the text above]" % event.restarted.attempt)
        elif kind == "duplicate":
            summary["duplicate"] = True
            say("  [already answered upstream as %s]" % event.duplicate.message_id)
        elif kind == "done":
            summary["done"] = True
            say("  [done: message %s]" % event.message_id)
        elif kind == "unknown":
            say("  [event %s: %s]" % (event.unknown.type, event.unknown.json))
    end_line()
    if not summary["done"] and not summary["duplicate"]:
        raise Failure("the answer stream ended without done")
    if summary["done"] and not summary["answer"]:
        raise Failure("the answer had no text")
    return summary


RUNNERS = {"dfx": run_dfx, "nlx": run_nlx, "emogg": run_emogg, "nexora": run_nexora}


def main(argv):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wsbridge-example-py-") as gen:
        generate_stubs(args, gen)
        s = Stubs()
        grpc = s.grpc
        summary = {"target": args.target, "ok": True, "bridges": {}}
        with grpc.insecure_channel(args.target) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=args.timeout)
            except grpc.FutureTimeoutError:
                say("cannot reach wsbridged at %s within %gs: is it running (scripts/run.sh)?" %
                    (args.target, args.timeout))
                return 1
            for name in args.bridges:
                say("== %s ==" % name)
                started = time.monotonic()
                try:
                    result = RUNNERS[name](s, channel, args)
                    result["ok"] = True
                except grpc.RpcError as err:
                    result = {"ok": False, "error": describe_error(s, err)}
                    e = result["error"]
                    say("  FAILED: %s: %s%s" % (e["code"], e["message"],
                                                " (reason %s)" % e["reason"] if e.get("reason") else ""))
                except Failure as err:
                    result = {"ok": False, "error": {"code": "CLIENT_CHECK", "message": str(err)}}
                    say("  FAILED: %s" % err)
                result["seconds"] = round(time.monotonic() - started, 3)
                summary["bridges"][name] = result
                summary["ok"] = summary["ok"] and result["ok"]
        say("== %s ==" % ("all OK" if summary["ok"] else "FAILED: " + ", ".join(
            n for n, r in summary["bridges"].items() if not r["ok"])))
        if args.summary == "-":
            print(json.dumps(summary, indent=2, sort_keys=True))
        elif args.summary:
            with open(args.summary, "w") as f:
                json.dump(summary, f, indent=2, sort_keys=True)
        return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
