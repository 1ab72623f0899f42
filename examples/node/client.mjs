#!/usr/bin/env node
// wsbridge example client (Node): drives the four bridges of a running wsbridged.
//
//   DFX     CreateMeasurement, then StreamMeasurement with results subscribed
//   NLX     a Converse conversation: text turns, then the first offered choice
//   Emogg   Request "ping", then Subscribe to a channel until some events came
//   Nexora  CreateChat, then SendMessage: the streamed answer, chunk by chunk
//
// It prints what it receives, writes a JSON summary when asked (--summary FILE), and
// exits 0 only when every bridge it drove did what was expected (1 otherwise, 2 for a
// usage or set-up error). The services are loaded from wsbridge's proto/ at start-up
// (@grpc/proto-loader): nothing is generated or hand-written. Against the demo
// (scripts/run.sh):
//
//   cd examples/node && npm ci && node client.mjs
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';
import protobuf from 'protobufjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const BRIDGES = ['dfx', 'nlx', 'emogg', 'nexora'];

const USAGE = `usage: node client.mjs [options]
  --target ADDR            wsbridged's gRPC address (default $WSBRIDGE_TARGET, else
                           127.0.0.1:50051, the demo's; unix:/tmp/wsbridge/wsbridged.sock
                           works too)
  --bridges LIST           comma-separated bridges to drive (default dfx,nlx,emogg,nexora)
  --timeout S              deadline of each call in seconds (default 30)
  --summary FILE           also write what was received as JSON to FILE ('-' = stdout)
  --proto-dir DIR          wsbridge's proto/ (default: the repository's, ../../proto)
 DFX:    --dfx-study-id ID (demo)  --dfx-chunks N (4)  --dfx-chunk-ms MS (250)
         --dfx-token T (x-dfx-device-token metadata)
 NLX:    --nlx-text TEXT (repeatable; 'Hello there', 'choices please')
         --nlx-conversation-id ID (resume)  --nlx-no-choice
         --nlx-api-key K  --nlx-deployment-key K  --nlx-channel-key K (metadata)
 Emogg:  --emogg-channel C (session_emotions_counts)  --emogg-key K (demo-session:1s)
         --emogg-events N (3)  --emogg-token T (x-emogg-token metadata)
 Nexora: --nexora-agent-id ID (demo-agent)  --nexora-chat-id ID (skip CreateChat)
         --nexora-message TEXT  --nexora-token T (x-nexora-token metadata)`;

class Failure extends Error {}

function usageError(message) {
  console.error(`client.mjs: ${message}\n${USAGE}`);
  process.exit(2);
}

function parseOptions() {
  const str = (def) => ({ type: 'string', default: def });
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        help: { type: 'boolean', short: 'h' },
        target: str(process.env.WSBRIDGE_TARGET || '127.0.0.1:50051'),
        bridges: str(BRIDGES.join(',')),
        timeout: str('30'),
        summary: { type: 'string' },
        'proto-dir': str(path.join(HERE, '..', '..', 'proto')),
        'dfx-study-id': str('demo'),
        'dfx-chunks': str('4'),
        'dfx-chunk-ms': str('250'),
        'dfx-token': { type: 'string' },
        'nlx-text': { type: 'string', multiple: true },
        'nlx-conversation-id': str(''),
        'nlx-no-choice': { type: 'boolean', default: false },
        'nlx-api-key': { type: 'string' },
        'nlx-deployment-key': { type: 'string' },
        'nlx-channel-key': { type: 'string' },
        'emogg-channel': str('session_emotions_counts'),
        'emogg-key': str('demo-session:1s'),
        'emogg-events': str('3'),
        'emogg-token': { type: 'string' },
        'nexora-agent-id': str('demo-agent'),
        'nexora-chat-id': { type: 'string' },
        'nexora-message': str('What is the status of my repository?'),
        'nexora-token': { type: 'string' },
      },
    }));
  } catch (err) {
    usageError(err.message);
  }
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const int = (name, min) => {
    const n = Number(values[name]);
    if (!Number.isInteger(n) || n < min) usageError(`--${name} takes a whole number >= ${min}`);
    return n;
  };
  const o = {
    target: values.target,
    bridges: values.bridges.split(',').map((b) => b.trim()).filter(Boolean),
    timeout: Number(values.timeout),
    summary: values.summary,
    protoDir: values['proto-dir'],
    dfx: { studyId: values['dfx-study-id'], chunks: int('dfx-chunks', 2),
           chunkMs: int('dfx-chunk-ms', 1), token: values['dfx-token'] },
    nlx: { texts: values['nlx-text'] ?? ['Hello there', 'choices please'],
           conversationId: values['nlx-conversation-id'], noChoice: values['nlx-no-choice'],
           apiKey: values['nlx-api-key'], deploymentKey: values['nlx-deployment-key'],
           channelKey: values['nlx-channel-key'] },
    emogg: { channel: values['emogg-channel'], key: values['emogg-key'],
             events: int('emogg-events', 1), token: values['emogg-token'] },
    nexora: { agentId: values['nexora-agent-id'], chatId: values['nexora-chat-id'],
              message: values['nexora-message'], token: values['nexora-token'] },
  };
  const unknown = o.bridges.filter((b) => !BRIDGES.includes(b));
  if (unknown.length || !o.bridges.length) {
    usageError(`--bridges takes a comma-separated subset of ${BRIDGES.join(',')}`);
  }
  if (!(o.timeout > 0)) usageError('--timeout takes seconds > 0');
  return o;
}

// --- Loading the services from proto/ ---------------------------------------------------

function loadServices(protoDir) {
  const files = ['dfx', 'nlx', 'emogg', 'nexora'].map((b) => `wsbridge/${b}/v1/${b}.proto`);
  if (!fs.existsSync(path.join(protoDir, files[0]))) {
    console.error(`client.mjs: ${protoDir} is not wsbridge's proto/ directory: pass --proto-dir`);
    process.exit(2);
  }
  // keepCase: field names as in the .proto (measurement_id); oneofs: `event.event` names
  // the member that is set; defaults: absent fields read as their zero values.
  const definition = protoLoader.loadSync(files, {
    includeDirs: [protoDir], keepCase: true, longs: String, enums: String, defaults: true,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(definition).wsbridge;
  // google.rpc.Status / ErrorInfo, to read the reason of a failed call.
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => path.join(protoDir, target);
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);
  return {
    dfx: pkg.dfx.v1.DfxService, nlx: pkg.nlx.v1.NlxService, emogg: pkg.emogg.v1.EmoggService,
    nexora: pkg.nexora.v1.NexoraService,
    Status: root.lookupType('google.rpc.Status'), ErrorInfo: root.lookupType('google.rpc.ErrorInfo'),
  };
}

// --- Helpers -----------------------------------------------------------------------------

const say = (line) => console.log(line);

function metadata(pairs) {
  const md = new grpc.Metadata();
  for (const [k, v] of Object.entries(pairs)) if (v) md.add(k, v);
  return md;
}

const deadline = (seconds) => ({ deadline: new Date(Date.now() + seconds * 1000) });

function unary(client, method, request, md, seconds) {
  return new Promise((resolve, reject) => {
    client[method](request, md, deadline(seconds), (err, response) => (err ? reject(err) : resolve(response)));
  });
}

function describeError(services, err) {
  const out = { code: grpc.status[err.code] ?? 'UNKNOWN', message: err.details ?? err.message };
  for (const bin of err.metadata?.get('grpc-status-details-bin') ?? []) {
    const status = services.Status.decode(bin);
    for (const any of status.details) {
      if (any.type_url.endsWith('/google.rpc.ErrorInfo')) {
        const info = services.ErrorInfo.decode(any.value);
        Object.assign(out, { reason: info.reason, domain: info.domain, metadata: info.metadata ?? {} });
      }
    }
  }
  return out;
}

// --- DFX ---------------------------------------------------------------------------------

// A stand-in for the DFX Extraction SDK's chunk payload, in the layout the bundled
// emulator reads ("WSBE" | u32 LE order | u32 LE duration_ms | body). A real DFX
// measurement sends the SDK's payloads unchanged instead.
function demoPayload(order, durationMs) {
  const header = Buffer.alloc(12);
  header.write('WSBE', 0, 'latin1');
  header.writeUInt32LE(order, 4);
  header.writeUInt32LE(durationMs, 8);
  return Buffer.concat([header, Buffer.from('example-client')]);
}

async function runDfx(s, channelOptions, o) {
  const client = new s.dfx(o.target, grpc.credentials.createInsecure(), channelOptions);
  try {
    const md = () => metadata({ 'x-dfx-device-token': o.dfx.token });
    const created = await unary(client, 'CreateMeasurement', { study_id: o.dfx.studyId }, md(), o.timeout);
    const mid = created.measurement_id;
    say(`  measurement ${mid} created (study ${o.dfx.studyId})`);
    const n = o.dfx.chunks;
    const summary = { measurement_id: mid, chunks_sent: n, accepted: [], results: 0,
                      last_acked_chunk_order: -1, last_result_chunk_order: null };
    // The whole measurement (paced to real time by the bridge) must fit in one deadline.
    const call = client.StreamMeasurement(md(), deadline(o.timeout + (n * o.dfx.chunkMs) / 1000));
    for (let i = 0; i < n; i++) {
      const stage = i === 0 ? 'STAGE_FIRST' : i === n - 1 ? 'STAGE_LAST' : 'STAGE_CHUNK';
      call.write({ measurement_id: i === 0 ? mid : '', subscribe_results: i === 0, stage,
                   payload: demoPayload(i, o.dfx.chunkMs), duration_ms: o.dfx.chunkMs });
    }
    call.end();  // half-close after LAST, as StreamMeasurement asks
    for await (const event of call) {
      if (event.event === 'chunk_accepted') {
        const a = event.chunk_accepted;
        summary.accepted.push(a.chunk_order);
        summary.last_acked_chunk_order = a.chunk_order;
        say(`  chunk ${a.chunk_order} accepted: data id ${a.measurement_data_id}`);
      } else if (event.event === 'result') {
        summary.results += 1;
        const body = JSON.parse(event.result.json_body || '{}');
        summary.last_result_chunk_order = body.ChunkOrder ?? null;
        say(`  result for chunk ${body.ChunkOrder}: ${JSON.stringify(body.Results ?? body)}` +
            (event.result.after_reconnect ? ' (after a reconnect)' : ''));
      }
    }
    if (summary.last_acked_chunk_order !== n - 1) {
      throw new Failure(`the LAST chunk (${n - 1}) was not acknowledged; acknowledged: ${summary.accepted}`);
    }
    if (summary.results === 0) throw new Failure('the stream ended without results');
    say(`  ${summary.accepted.length} chunks accepted, ${summary.results} results`);
    return summary;
  } finally {
    client.close();
  }
}

// --- NLX ---------------------------------------------------------------------------------

async function runNlx(s, channelOptions, o) {
  const client = new s.nlx(o.target, grpc.credentials.createInsecure(), channelOptions);
  const summary = { conversation_id: '', turns: [], responses: [], failed: [] };
  const call = client.Converse(
    metadata({ 'x-nlx-api-key': o.nlx.apiKey, 'x-nlx-deployment-key': o.nlx.deploymentKey,
               'x-nlx-channel-key': o.nlx.channelKey }),
    deadline(o.timeout * (o.nlx.texts.length + 2)));
  const events = call[Symbol.asyncIterator]();
  let turn = 0;
  const send = (t, label) => {
    call.write({ conversation_id: turn === 0 ? o.nlx.conversationId : '', turn: t });
    turn += 1;
    summary.turns.push(label);
    say(`  > turn ${turn}: ${label}`);
  };
  // Events up to the response (or failure) of turn `number`; null when it failed.
  const answerOf = async (number) => {
    for (let next = await events.next(); !next.done; next = await events.next()) {
      const event = next.value;
      if (event.event === 'opened') {
        summary.conversation_id = event.opened.conversation_id;
        say(`  conversation ${event.opened.conversation_id} ${event.opened.resumed ? 'resumed' : 'opened'}`);
      } else if (event.event === 'response') {
        const r = event.response;
        const t = Number(r.turn);
        for (const m of r.messages) {
          say(`  < ${t ? `turn ${t}` : 'unsolicited'}: ${m.text}`);
          for (const c of m.choices) say(`      choice ${c.choice_id}: ${c.choice_text}`);
        }
        if (t) {
          summary.responses.push({ turn: t, texts: r.messages.map((m) => m.text),
                                   choices: r.messages.flatMap((m) => m.choices.map((c) => c.choice_id)) });
        }
        if (t === number) return r;
      } else if (event.event === 'turn_failed') {
        const f = event.turn_failed;
        say(`  ! turn ${f.turn} failed: ${f.message} (${f.reason})`);
        summary.failed.push({ turn: Number(f.turn), reason: f.reason, message: f.message });
        if (Number(f.turn) === number) return null;
      } else if (event.event === 'reconnected') {
        say(`  (socket reconnected, attempt ${event.reconnected.attempt})`);
      } else if (event.event === 'unknown') {
        say(`  (unknown frame: ${event.unknown.json})`);
      }
    }
    return null;
  };
  try {
    let last = null;
    for (const text of o.nlx.texts) {
      send({ text }, text);
      last = await answerOf(turn);
      if (last === null) break;
    }
    const choices = last ? last.messages.flatMap((m) => m.choices) : [];
    if (choices.length && !o.nlx.noChoice) {
      send({ structured: { choice_id: choices[0].choice_id } },
           `choose ${choices[0].choice_id} (${choices[0].choice_text})`);
      await answerOf(turn);
    }
    call.end();  // half-close: the stream ends once every turn was answered
    await answerOf(-1);  // read on until it ends: unsolicited pushes, then OK or an error
  } finally {
    call.cancel();  // no-op once ended; frees the conversation if we failed half-way
    client.close();
  }
  if (summary.failed.length) throw new Failure(`${summary.failed.length} turn(s) failed: ${JSON.stringify(summary.failed)}`);
  if (summary.responses.length !== turn) throw new Failure(`${turn} turns sent, ${summary.responses.length} answered`);
  if (!summary.responses.every((r) => r.texts.some((t) => t))) {
    throw new Failure(`a response carried no message text: ${JSON.stringify(summary.responses)}`);
  }
  return summary;
}

// --- Emogg -------------------------------------------------------------------------------

async function runEmogg(s, channelOptions, o) {
  const client = new s.emogg(o.target, grpc.credentials.createInsecure(), channelOptions);
  const md = () => metadata({ 'x-emogg-token': o.emogg.token });
  const summary = { channel: o.emogg.channel, key: o.emogg.key, subscription_id: '', events: 0,
                    events_on_subscription: 0, event_types: [], gaps: 0 };
  try {
    const pong = await unary(client, 'Request', { path: 'ping' }, md(), o.timeout);
    summary.ping = JSON.parse(pong.json_body || '{}');
    say(`  ping: status ${pong.status}, ${pong.json_body}`);
    const call = client.Subscribe({ channel: o.emogg.channel, key: o.emogg.key }, md(), deadline(o.timeout));
    try {
      for await (const message of call) {
        for (const u of message.updates) {
          if (u.update === 'subscribed') {
            summary.subscription_id = u.subscribed.subscription_id;
            say(`  subscribed to ${u.subscribed.channel} / ${u.subscribed.key} as ${u.subscribed.subscription_id}`);
          } else if (u.update === 'event') {
            const e = u.event;
            summary.events += 1;
            if (e.subscription_id === summary.subscription_id) summary.events_on_subscription += 1;
            if (!summary.event_types.includes(e.type)) summary.event_types.push(e.type);
            const when = e.timestamp
              ? new Date(Number(e.timestamp.seconds) * 1000 + Math.floor(e.timestamp.nanos / 1e6)).toISOString()
              : e.timestamp_raw;
            say(`  event ${e.type} at ${when}${e.replayed ? ' (replayed)' : ''}: ${e.json_data}`);
          } else if (u.update === 'gap') {
            summary.gaps += 1;
            say(`  gap: events may be missing (${u.gap.reason})`);
          }
        }
        if (summary.events >= o.emogg.events) break;
      }
    } finally {
      call.cancel();  // leaving releases our share of the upstream subscription
    }
  } finally {
    client.close();
  }
  if (summary.events < o.emogg.events) {
    throw new Failure(`the subscription ended after ${summary.events} of ${o.emogg.events} events`);
  }
  if (summary.events_on_subscription !== summary.events) {
    throw new Failure(`events arrived for another subscription than ${summary.subscription_id}`);
  }
  return summary;
}

// --- Nexora ------------------------------------------------------------------------------

async function runNexora(s, channelOptions, o) {
  const client = new s.nexora(o.target, grpc.credentials.createInsecure(), channelOptions);
  const md = () => metadata({ 'x-nexora-token': o.nexora.token });
  try {
    let chatId = o.nexora.chatId;
    if (!chatId) {
      chatId = (await unary(client, 'CreateChat', { agent_id: o.nexora.agentId }, md(), o.timeout)).chat_id;
      say(`  chat ${chatId} created with agent ${o.nexora.agentId}`);
    }
    const summary = { chat_id: chatId, client_message_id: '', message_id: '', answer: '', events: [],
                      done: false, duplicate: false };
    say(`  > ${o.nexora.message}`);
    let lineOpen = false;
    const endLine = () => {
      if (lineOpen) process.stdout.write('\n');
      lineOpen = false;
    };
    const call = client.SendMessage({ chat_id: chatId, content: o.nexora.message }, md(), deadline(o.timeout));
    for await (const event of call) {
      const kind = event.event;
      summary.events.push(kind);
      summary.message_id = event.message_id || summary.message_id;
      if (kind === 'chunk') {
        // Streamed text goes out as it arrives, on one line.
        if (!lineOpen) process.stdout.write('  < ');
        lineOpen = true;
        process.stdout.write(event.chunk.content);
        summary.answer += event.chunk.content;
        continue;
      }
      endLine();
      if (kind === 'accepted') {
        summary.client_message_id = event.accepted.client_message_id;
        say(`  accepted as ${event.accepted.client_message_id}${event.accepted.generated ? ' (generated)' : ''}`);
      } else if (kind === 'tool_call') {
        say(`  [tool ${event.tool_call.tool} called with ${event.tool_call.input_json}]`);
      } else if (kind === 'tool_result') {
        say(`  [tool ${event.tool_result.tool} returned ${event.tool_result.result_json}]`);
      } else if (kind === 'sub_agent_start') {
        say(`  [${event.sub_agent_start.agent_name} started task ${event.sub_agent_start.task_id}]`);
      } else if (kind === 'sub_agent_complete') {
        say(`  [task ${event.sub_agent_complete.task_id} done: ${event.sub_agent_complete.result}]`);
      } else if (kind === 'restarted') {
        // The bridge resent the message after a drop: what was shown is superseded.
        summary.answer = '';
        say(`  [answer restarted (resend ${event.restarted.attempt}): discard the text above]`);
      } else if (kind === 'duplicate') {
        summary.duplicate = true;
        say(`  [already answered upstream as ${event.duplicate.message_id}]`);
      } else if (kind === 'done') {
        summary.done = true;
        say(`  [done: message ${event.message_id}]`);
      } else if (kind === 'unknown') {
        say(`  [event ${event.unknown.type}: ${event.unknown.json}]`);
      }
    }
    endLine();
    if (!summary.done && !summary.duplicate) throw new Failure('the answer stream ended without done');
    if (summary.done && !summary.answer) throw new Failure('the answer had no text');
    return summary;
  } finally {
    client.close();
  }
}

// --- Main --------------------------------------------------------------------------------

const RUNNERS = { dfx: runDfx, nlx: runNlx, emogg: runEmogg, nexora: runNexora };

async function waitReady(s, o) {
  const probe = new s.dfx(o.target, grpc.credentials.createInsecure());
  try {
    await new Promise((resolve, reject) =>
      probe.waitForReady(new Date(Date.now() + o.timeout * 1000), (err) => (err ? reject(err) : resolve())));
  } finally {
    probe.close();
  }
}

async function main() {
  const o = parseOptions();
  const s = loadServices(o.protoDir);
  const summary = { target: o.target, ok: true, bridges: {} };
  try {
    await waitReady(s, o);
  } catch {
    say(`cannot reach wsbridged at ${o.target} within ${o.timeout}s: is it running (scripts/run.sh)?`);
    return 1;
  }
  const channelOptions = {};
  for (const name of o.bridges) {
    say(`== ${name} ==`);
    const started = performance.now();
    let result;
    try {
      result = { ...(await RUNNERS[name](s, channelOptions, o)), ok: true };
    } catch (err) {
      if (err instanceof Failure) {
        result = { ok: false, error: { code: 'CLIENT_CHECK', message: err.message } };
        say(`  FAILED: ${err.message}`);
      } else if (typeof err?.code === 'number') {
        const e = describeError(s, err);
        result = { ok: false, error: e };
        say(`  FAILED: ${e.code}: ${e.message}${e.reason ? ` (reason ${e.reason})` : ''}`);
      } else {
        throw err;
      }
    }
    result.seconds = Math.round(performance.now() - started) / 1000;
    summary.bridges[name] = result;
    summary.ok = summary.ok && result.ok;
  }
  const failed = Object.entries(summary.bridges).filter(([, r]) => !r.ok).map(([n]) => n);
  say(`== ${summary.ok ? 'all OK' : `FAILED: ${failed.join(', ')}`} ==`);
  const text = JSON.stringify(summary, null, 2);
  if (o.summary === '-') say(text);
  else if (o.summary) fs.writeFileSync(o.summary, text);
  return summary.ok ? 0 : 1;
}

process.exitCode = await main();
