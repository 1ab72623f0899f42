// Conformance: the vendor's public DFX client (@nuralogix.ai/dfx-api-client, pinned in
// package-lock.json) drives wsbridge-emulator. If the vendor's own client gets the
// answers it expects, the emulator speaks the real wire protocol, and so the bridge
// tested against the emulator does too.
//
//   node --experimental-websocket conformance.mjs /path/to/wsbridge-emulator
//
// Exit 0 when every check passed; 1 with the failed check on stderr otherwise.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import assert from 'node:assert/strict';
import client from '@nuralogix.ai/dfx-api-client';

const TOKEN = 'conformance-device-token';
const WAIT_MS = 10000;

const emulatorPath = process.argv[2] ?? process.env.WSBRIDGE_EMULATOR;
if (!emulatorPath) {
  console.error('usage: conformance.mjs PATH_TO_wsbridge-emulator (or set WSBRIDGE_EMULATOR)');
  process.exit(2);
}
if (typeof WebSocket === 'undefined') {
  console.error('no global WebSocket: run node 20 with --experimental-websocket');
  process.exit(2);
}

// Emulator SDK chunk: "WSBE" | u32 LE chunk_order | u32 LE duration_ms | body, base64.
function chunk(order, durationMs, body = 'sdk-bytes') {
  const head = Buffer.alloc(12);
  head.write('WSBE', 0, 'latin1');
  head.writeUInt32LE(order, 4);
  head.writeUInt32LE(durationMs, 8);
  return Buffer.concat([head, Buffer.from(body)]).toString('base64');
}

function startEmulator() {
  const child = spawn(emulatorPath, ['--dfx', '127.0.0.1:0', '--dfx-token', TOKEN], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  const url = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('emulator printed no listener line')), WAIT_MS);
    createInterface({ input: child.stdout }).once('line', (line) => {
      clearTimeout(timer);
      const info = JSON.parse(line);
      assert.equal(info.api, 'dfx', `listener line ${line}`);
      resolve(info.url);
    });
    child.once('error', reject);
    exited.then(({ code }) => reject(new Error(`emulator exited early with ${code}`)));
  });
  return { child, url, exited };
}

// One vendor client with a queue of what its onmessage received.
class Session {
  constructor(wsUrl, token) {
    this.api = client();
    // The client builds the socket URL from setUrl's wss entry (its host root).
    this.api.setUrl(wsUrl.replace(/^ws/, 'http'), wsUrl);
    assert.equal(this.api.setSession({ deviceToken: token }), true);
    this.messages = [];
    this.waiters = [];
    this.closed = new Promise((resolve) => {
      this.api.websocket.onclose = (e) => resolve(e);
    });
    this.api.websocket.onerror = (e) => {
      this.error = e;
      this.wake();
    };
    this.api.websocket.onmessage = (requestId, status, message, actionId) => {
      this.messages.push({ requestId, status, message, actionId });
      this.wake();
    };
  }

  // The seed page says connect() logs in with session.deviceToken; in 1.0.73 the
  // token is connect()'s argument, so hand it the session's token.
  connect() {
    this.api.websocket.connect(this.api.getSession().deviceToken);
  }

  wake() {
    for (const w of this.waiters.splice(0)) w();
  }

  // The first received message matching `pred` (removed from the queue).
  async next(what, pred) {
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      const i = this.messages.findIndex(pred);
      if (i >= 0) return this.messages.splice(i, 1)[0];
      if (this.error) throw new Error(`socket error while waiting for ${what}`);
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(`timed out waiting for ${what}; queue: ${JSON.stringify(this.messages)}`);
      }
      await new Promise((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  answer(actionId) {
    return this.next(`an answer to ${actionId}`, (m) => m.actionId === actionId);
  }

  send(actionId, data) {
    this.api.websocket.sendMessage(actionId, data);
    return data;
  }

  async call(actionId, data) {
    this.send(actionId, data);
    return this.answer(actionId);
  }
}

function expectError(m, status, code, what) {
  assert.equal(m.status, status, `${what}: status (${JSON.stringify(m)})`);
  assert.equal(m.message.Code, code, `${what}: Code (${JSON.stringify(m)})`);
  assert.equal(typeof m.message.Message, 'string', `${what}: Message`);
}

const { ActionId } = (await import('@nuralogix.ai/dfx-api-client')).enums;
const LOGIN = ActionId.ORGANIZATIONS.LOGIN_WITH_TOKEN;
const STATUS = ActionId.GENERAL.STATUS;
const DATA = ActionId.MEASUREMENTS.DATA;
const SUBSCRIBE = ActionId.MEASUREMENTS.SUBSCRIBE_RESULTS;
const CREATE = '0504'; // MEASUREMENTS.CREATE: the client's enum lists only WebSocket-era ids

async function happyPath(url) {
  const s = new Session(url, TOKEN);
  s.connect();
  const login = await s.answer(LOGIN);
  assert.equal(login.status, '200', `login: ${JSON.stringify(login)}`);
  assert.deepEqual(login.message, {});
  assert.match(login.requestId, /^0718[A-Za-z]{6}$/);

  const status = await s.call(STATUS, {});
  assert.equal(status.status, '200');
  assert.equal(status.message.Status, 'OK');

  const created = await s.call(CREATE, { StudyID: 'conformance-study', Resolution: 100 });
  assert.equal(created.status, '200', `create: ${JSON.stringify(created)}`);
  const mid = created.message.ID;
  assert.equal(typeof mid, 'string');
  assert.ok(mid.length > 0);

  const subBody = s.send(SUBSCRIBE, { Params: { ID: mid } });
  const subRid = subBody.RequestID; // the client copies its request id into the body
  assert.match(subRid, /^0510[A-Za-z]{6}$/);
  const subscribed = await s.next('the subscription answer', (m) => m.requestId === subRid);
  assert.equal(subscribed.status, '200');
  assert.deepEqual(subscribed.message, {});

  const stages = [
    ['FIRST::PROCESS', 0],
    ['CHUNK::PROCESS', 1],
    ['LAST::PROCESS', 2],
  ];
  let dataMs = 0;
  for (const [action, order] of stages) {
    if (order === 1) {
      // Out of order before the real chunk 1: refused, and the order is unchanged.
      const skipped = await s.call(DATA, { Params: { ID: mid }, Action: 'CHUNK::PROCESS', Payload: chunk(2, 500) });
      expectError(skipped, '400', 'MISALIGNED_CHUNK', 'chunk 2 before chunk 1');
      assert.equal(skipped.message.Message, 'ChunkOrder 2 was sent before ChunkOrder 1');
    }
    s.send(DATA, { Params: { ID: mid }, Action: action, Payload: chunk(order, 500) });
    dataMs += 500;
    // The chunk's answer comes first, then its result on the subscription's id.
    const ack = await s.next(`answer to ${action}`, () => true);
    assert.equal(ack.actionId, DATA, `first frame after ${action} is its answer: ${JSON.stringify(ack)}`);
    assert.equal(ack.status, '200', `${action}: ${JSON.stringify(ack)}`);
    assert.equal(ack.message.ChunkOrder, order);
    assert.equal(typeof ack.message.ID, 'string');
    const result = await s.next(`result of ${action}`, (m) => m.requestId === subRid);
    assert.equal(result.status, '200');
    assert.equal(result.actionId, SUBSCRIBE);
    assert.equal(result.message.ID, mid);
    assert.equal(result.message.MeasurementDataID, ack.message.ID);
    assert.equal(result.message.ChunkOrder, order);
    assert.equal(result.message.Status, undefined); // no end-of-results marker
    assert.equal(result.message.Results.DataMs, dataMs);
  }

  const closed = await s.call(DATA, { Params: { ID: mid }, Action: 'CHUNK::PROCESS', Payload: chunk(3, 500) });
  expectError(closed, '400', 'MEASUREMENT_CLOSED', 'chunk after LAST');

  const unknown = await s.call(DATA, { Params: { ID: 'no-such-measurement' }, Action: 'FIRST::PROCESS', Payload: chunk(0, 500) });
  expectError(unknown, '404', 'INVALID_MEASUREMENT', 'unknown measurement');

  const second = (await s.call(CREATE, { StudyID: 'conformance-study' })).message.ID;
  const garbage = await s.call(DATA, { Params: { ID: second }, Action: 'FIRST::PROCESS', Payload: Buffer.from('not sdk data').toString('base64') });
  expectError(garbage, '400', 'UNPACKER_RPC_ERROR', 'payload that is not SDK data');
  // More than the 5 s window of data in one go can never be real time.
  const tooFast = await s.call(DATA, { Params: { ID: second }, Action: 'FIRST::PROCESS', Payload: chunk(0, 6000) });
  expectError(tooFast, '429', 'RATE_LIMIT', 'six seconds of data at once');
  const noStudy = await s.call(CREATE, { Resolution: 100 });
  expectError(noStudy, '400', 'INVALID_PARAMETER', 'create without StudyID');

  assert.equal(s.messages.length, 0, `unexpected frames: ${JSON.stringify(s.messages)}`);
  s.api.websocket.disconnect();
  await s.closed;
}

async function badToken(url) {
  const s = new Session(url, 'bad-device-token');
  s.connect();
  const login = await s.answer(LOGIN);
  expectError(login, '401', 'INVALID_TOKEN', 'login with a refused token');
  assert.ok(!JSON.stringify(login.message).includes('bad-device-token'), 'token echoed back');
  const refused = await s.call(CREATE, { StudyID: 'conformance-study' });
  expectError(refused, '401', 'NOT_AUTHENTICATED', 'create without login');
  s.api.websocket.disconnect();
  await s.closed;
}

const emulator = startEmulator();
let failed = false;
try {
  const url = await emulator.url;
  assert.match(url, /^ws:\/\/127\.0\.0\.1:\d+$/);
  await happyPath(url);
  console.log('ok - vendor client: login, create, subscribe, FIRST/CHUNK/LAST with results, errors');
  await badToken(url);
  console.log('ok - vendor client: refused token, then NOT_AUTHENTICATED');
} catch (e) {
  failed = true;
  console.error('FAIL -', e?.stack ?? e);
} finally {
  emulator.child.kill('SIGTERM');
  const { code, signal } = await emulator.exited;
  if (code !== 0) {
    failed = true;
    console.error(`FAIL - emulator exited with code ${code} signal ${signal} on SIGTERM`);
  }
}
process.exit(failed ? 1 : 0);
