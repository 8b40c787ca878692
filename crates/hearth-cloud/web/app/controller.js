// The browser controller, the counterpart of the CLI's controller.rs:
// its identity (an ECDSA P-256 signing key and an ECDH P-256 HPKE key,
// both generated here as non-extractable WebCrypto keys), pairing, signed
// commands, and verification of everything a device says. The cloud only
// carries bytes; nothing it says about a device's state is believed.

import * as api from "./api.js";
import * as store from "./store.js";
import * as cose from "./cose.js";
import * as e2e from "./e2e.js";
import * as pairing from "./pairing.js";
import * as x509 from "./x509.js";
import { encode } from "./cbor.js";
import { b64url, fromB64url, sha256, toHex } from "./bytes.js";

const PROTOCOL_VERSION = 1;
const SHARE_CODE_PREFIX = "hearth-controller:1:";

let identity = null;

// This browser's controller identity, made on first use. ADR 0007: unlike
// the CLI (which derives its HPKE key from its signing key), the browser
// makes a second, independent key pair, since a non-extractable key
// cannot be fed into a derivation.
export async function getIdentity() {
  if (identity) return identity;
  let id = await store.get("identity");
  if (!id) {
    const signing = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, false, ["sign", "verify"]);
    const enc = await crypto.subtle.generateKey({ name: "ECDH", namedCurve: "P-256" }, false, ["deriveBits"]);
    const pub = new Uint8Array(await crypto.subtle.exportKey("raw", signing.publicKey));
    const encPub = new Uint8Array(await crypto.subtle.exportKey("raw", enc.publicKey));
    id = {
      signing: signing.privateKey,
      pub,
      enc: enc.privateKey,
      encPub,
      controller: toHex((await sha256(pub)).slice(0, 16)),
    };
    await store.put("identity", id);
  }
  identity = id;
  return id;
}

export async function encFingerprint() {
  const id = await getIdentity();
  return toHex((await sha256(id.encPub)).slice(0, 8));
}

// What an owner pastes to share a device with this controller (the same
// format as the CLI's `hearth key`).
export async function shareCode() {
  const id = await getIdentity();
  return `${SHARE_CODE_PREFIX}${b64url(id.pub)}.${b64url(id.encPub)}`;
}

function parseShareCode(code) {
  const rest = code.trim().startsWith(SHARE_CODE_PREFIX) ? code.trim().slice(SHARE_CODE_PREFIX.length) : null;
  if (!rest || !rest.includes(".")) throw new Error("That is not a share code (the other person finds it under Settings, or with `hearth key`).");
  const [k, e] = rest.split(".");
  const key = fromB64url(k);
  const enc = fromB64url(e);
  if (key.length !== 65 || enc.length !== 65) throw new Error("The share code's keys are not P-256 points.");
  return { key, enc };
}

// ---- accounts ----

export async function login(email, password, signup) {
  const creds = { email, password };
  if (signup) await api.call("POST", "/api/v1/signup", creds);
  const s = await api.call("POST", "/api/v1/login", creds);
  await api.setSession({ token: s.token, expires_at: s.expires_at, email });
  // Register this controller's public key with the account, so the cloud
  // can route for it; the devices, not the cloud, decide what it may do.
  const id = await getIdentity();
  await api.call("POST", "/api/v1/controllers", { public_key: b64url(id.pub), name: `web@${navigator.platform || "browser"}`.slice(0, 64) });
}

// The account's controllers as the cloud lists them (for people: what
// each may do is on the devices' access lists).
export async function controllers() {
  return (await api.call("GET", "/api/v1/controllers")).controllers || [];
}

export async function renameController(c, name) {
  await api.call("POST", "/api/v1/controllers", { public_key: c.public_key, name });
}

export async function removeController(c) {
  await api.call("DELETE", `/api/v1/controllers/${c.id}`);
}

// Changing the password ends every session of the account (this one too).
export async function changePassword(oldPassword, newPassword) {
  await api.call("POST", "/api/v1/password", { old_password: oldPassword, new_password: newPassword });
  await api.setSession(null);
}

export async function logout() {
  try {
    await api.call("POST", "/api/v1/logout");
  } catch {
    // The local token is forgotten whatever the cloud says.
  }
  await api.setSession(null);
}

// ---- devices ----

async function knownDevices() {
  return (await store.get("devices")) || {};
}

async function remember(id, info) {
  const all = await knownDevices();
  all[id] = { ...(all[id] || {}), ...info };
  await store.put("devices", all);
}

export async function setRoom(id, room) {
  await remember(id, { room });
}

let caPem = null;
async function manufacturerCa() {
  if (caPem === null) {
    const r = await fetch("/app/manufacturer-ca.pem", { credentials: "omit" });
    caPem = r.ok ? await r.text() : "";
  }
  return caPem;
}

// The key to check a device's signatures with: the one pairing proved, or
// (for a device shared with us) the one in its certificate, if that chains
// to the manufacturer CA. Like the CLI's device_key.
async function deviceKey(dev) {
  const known = (await knownDevices())[dev.id];
  if (known && known.key) return { key: await cose.verifyKey(known.key), how: "paired" };
  if (!dev.certificate) return null;
  try {
    const c = await x509.verifyDeviceCert(await manufacturerCa(), dev.certificate);
    if (c.device !== dev.id) return null;
    return { key: await cose.verifyKey(c.key), how: "certified" };
  } catch {
    return null;
  }
}

// The account's devices, each with its verified state (or why not).
export async function list() {
  const v = await api.call("GET", "/api/v1/devices");
  const known = await knownDevices();
  const out = [];
  for (const d of v.devices || []) {
    const dk = await deviceKey(d);
    const dev = { ...d, room: (known[d.id] && known[d.id].room) || "", keyHow: dk && dk.how, state: null, problem: null };
    dev.verifyKey = dk && dk.key;
    if (!dk) dev.problem = "cannot verify: device key unknown";
    else if (d.last_state) {
      try {
        const s = await openState(dev, fromB64url(d.last_state));
        dev.state = s.state;
        dev.seq = s.seq;
        dev.at = s.at;
      } catch (e) {
        dev.problem = describeOpenError(e);
      }
    }
    // The last report was sealed before this controller could read it
    // (just paired or just shared): ask the device once for its state.
    if (dev.verifyKey && dev.online && (!dev.state || dev.problem)) {
      try {
        const r = await send(dev, { op: "get_state" });
        dev.state = r.state;
        dev.problem = null;
      } catch {
        // Keep what the listing said.
      }
    }
    out.push(dev);
  }
  return out;
}

export function describeOpenError(e) {
  if (e instanceof e2e.OpenError) {
    if (e.kind === "not_a_recipient") return "encrypted, not for this controller";
    if (e.kind === "undecryptable") return "REJECTED: does not decrypt";
    return `REJECTED: ${e.message}`;
  }
  return `REJECTED: ${e.message}`;
}

export async function openState(dev, bytes) {
  const id = await getIdentity();
  return e2e.openState(bytes, dev.id, dev.verifyKey, id.controller, { privateKey: id.enc, publicRaw: id.encPub });
}

// Pairs with a device in setup mode; returns its id.
export async function pair(label, name, room) {
  const parsed = pairing.parseLabel(label);
  const id = await getIdentity();
  const pending = await pairing.start(parsed.secret, id.pub);
  const body = {
    code_lookup: await pairing.lookup(parsed.secret),
    name,
    request: { controller_key: b64url(id.pub), nonce: b64url(pending.nonce), mac: b64url(pending.mac) },
  };
  if (parsed.device) body.device = parsed.device;
  let answer;
  try {
    answer = await api.call("POST", "/api/v1/pair", body);
  } catch (e) {
    if (e.status === 404) throw new Error("No device in setup mode with this code is online. Is it powered and connected? Was it reset?");
    throw e;
  }
  // The MAC under the setup secret proves the key belongs to the device on
  // the label; a cloud in the middle cannot fake it.
  const paired = await pairing.finish(pending, answer.response, parsed.device, id.controller);
  await remember(paired.device, { key: paired.deviceKey, room });
  // ADR 0006: tell the device our HPKE key in a signed command, so it
  // seals its reports for this controller from now on.
  const dev = { id: paired.device, verifyKey: await cose.verifyKey(paired.deviceKey) };
  const r = await send(dev, { op: "register_key", key: id.encPub });
  if (r.outcome.outcome === "refused") throw new Error(`the device refused this browser's encryption key: ${explain(r.outcome.reason)}`);
  return paired.device;
}

// Commands to one device go one at a time: the device refuses a counter
// that is not above the last one it accepted from this controller, so two
// commands in flight at once (a tap while the list refreshes) could arrive
// in the wrong order and the earlier-signed one be refused as a replay.
const queues = new Map();

// Signs `command` for `dev`, sends it, and returns the device's verified
// (and decrypted) answer. Like the CLI's send().
export function send(dev, command) {
  const prev = queues.get(dev.id) || Promise.resolve();
  const run = prev.catch(() => {}).then(() => sendNow(dev, command));
  queues.set(dev.id, run);
  run.finally(() => {
    if (queues.get(dev.id) === run) queues.delete(dev.id);
  }).catch(() => {});
  return run;
}

async function sendNow(dev, command) {
  const id = await getIdentity();
  const counter = await store.nextCounter();
  const payload = {
    v: PROTOCOL_VERSION,
    device: dev.id,
    controller: id.controller,
    counter,
    issued_at: Math.floor(Date.now() / 1000),
    command,
  };
  const envelope = await cose.sign(id.signing, cose.Kind.Command, hexBytes(id.controller), encode(payload));
  let answer;
  try {
    answer = await api.call("POST", `/api/v1/devices/${dev.id}/command`, { envelope: b64url(envelope) });
  } catch (e) {
    if (e.status === 503) throw new Error(`${dev.name || "The device"} is offline.`);
    if (e.status === 404) throw new Error("Not paired with this device (it is not on this account).");
    throw e;
  }
  const r = await e2e.openResult(fromB64url(answer.result), dev.id, dev.verifyKey, id.controller, { privateKey: id.enc, publicRaw: id.encPub });
  if (r.controller !== id.controller || r.counter !== counter) throw new Error("The device's answer is for another command (possible replay by the cloud).");
  return r;
}

function hexBytes(h) {
  return Uint8Array.from(h.match(/../g), (x) => parseInt(x, 16));
}

// A sentence for a refusal (acl::Refusal::explain, with the numbers).
export function explain(reason) {
  if (typeof reason === "object" && reason) {
    const [k, v] = Object.entries(reason)[0];
    if (k === "too_many_switches") return `safety interlock: too many switches, try again in ${v.retry_after_secs} s`;
    if (k === "over_power_lockout") return `safety interlock: switched off for over-power, try again in ${v.retry_after_secs} s`;
    if (k === "rules_conflict") return `the rules were changed meanwhile (now version ${v.current}): reload and redo the edit`;
    return k.replace(/_/g, " ");
  }
  return (
    {
      malformed: "the device could not read the command",
      not_paired: "this controller is not paired with the device",
      bad_signature: "the command's signature is not valid",
      wrong_device: "the command was signed for another device",
      replayed: "the command was already used (replay refused)",
      stale: "the command is too old or from the future (check the clock)",
      not_permitted: "not allowed: this controller's role does not allow that",
      unsupported: "the device cannot do that",
      expired: "this controller's access to the device has expired",
      over_power_latched: "safety interlock: switched off for over-power too often; press the device's button to reset",
      invalid_rules: "the device rejected the rule set as invalid",
    }[reason] || String(reason)
  );
}

// ---- sharing ----

// `scope` is the grant's limits (acl::Scope): {until (unix s), read_only, max_on_secs}, each optional.
export async function share(dev, code, role, scope = {}) {
  const { key, enc } = parseShareCode(code);
  const controller = toHex((await sha256(key)).slice(0, 16));
  const limits = {};
  if (scope.until) limits.until = scope.until;
  if (scope.read_only) limits.read_only = true;
  if (scope.max_on_secs) limits.max_on_secs = scope.max_on_secs;
  const command = { op: "add_controller", key: b64url(key), enc, role };
  if (Object.keys(limits).length) command.scope = limits;
  const r = await send(dev, command);
  if (r.outcome.outcome === "refused") return { refused: explain(r.outcome.reason) };
  // Only now, on the device's signed word, ask the cloud to route for the
  // account that registered that controller. Routing grants nothing.
  let warning = null;
  try {
    await api.call("POST", `/api/v1/devices/${dev.id}/members`, { controller });
  } catch (e) {
    warning = `The device accepted the grant, but the cloud will not route for that account: ${e.message}`;
  }
  return { controller, warning };
}

export async function access(dev) {
  const r = await send(dev, { op: "get_access" });
  if (r.outcome.outcome === "refused") return { refused: explain(r.outcome.reason) };
  return { entries: r.access || [], at: r.at };
}

export async function revoke(dev, controller) {
  const r = await send(dev, { op: "remove_controller", controller });
  if (r.outcome.outcome === "refused") return { refused: explain(r.outcome.reason) };
  try {
    await api.call("DELETE", `/api/v1/devices/${dev.id}/members/${controller}`);
  } catch (e) {
    if (e.status !== 404) return { warning: `The cloud may still route this device for that account: ${e.message}` };
  }
  return {};
}

// ---- rules ----

export async function getRules(dev) {
  const r = await send(dev, { op: "get_rules" });
  if (r.outcome.outcome === "refused") return { refused: explain(r.outcome.reason) };
  if (r.outcome.outcome !== "rules") throw new Error("the device answered without its rules");
  return { rules: JSON.parse(r.outcome.rules) };
}

export async function setRules(dev, baseVersion, rules) {
  const r = await send(dev, { op: "set_rules", base_version: baseVersion, rules: JSON.stringify(rules) });
  if (r.outcome.outcome === "refused") return { refused: explain(r.outcome.reason) };
  return {};
}

// A motion rule across devices, as `hearth rules motion SENSOR --target
// PLUG` makes it (crates/hearth/src/lan.rs motion_rule): first a signed
// AddController on the target granting the sensor's device key "member,
// switch only" (the target's access list then lets it switch, never
// share, revoke or change rules), then a signed SetRules on the sensor
// with the rule, on the version just read. `opts`: {offAfterSecs, when
// ("always" | "after_sunset" | {between: {start, end}}), lan, allowCloud}.
// Both devices must have been paired by this browser: their keys are the
// ones pairing proved, which go into the grant and the rule.
export async function motionRule(sensor, target, opts) {
  const known = await knownDevices();
  const sensorKey = known[sensor.id] && known[sensor.id].key;
  const targetKey = known[target.id] && known[target.id].key;
  if (!sensorKey || !targetKey) throw new Error("Both devices must have been paired from this browser (their keys come from pairing).");
  if (!(opts.offAfterSecs >= 10 && opts.offAfterSecs <= 86400)) throw new Error("Switch off after 10 s to 24 h without motion.");
  // The HPKE key of the grant is a placeholder whose private half is
  // dropped at once; the sensor registers its own with its first command.
  const placeholder = await crypto.subtle.generateKey({ name: "ECDH", namedCurve: "P-256" }, false, ["deriveBits"]);
  const enc = new Uint8Array(await crypto.subtle.exportKey("raw", placeholder.publicKey));
  const grant = await send(target, { op: "add_controller", key: b64url(sensorKey), enc, role: "member", scope: { switch_only: true } });
  if (grant.outcome.outcome === "refused") return { refused: `${target.name} refused the grant: ${explain(grant.outcome.reason)}` };
  const current = await getRules(sensor);
  if (current.refused) return { refused: `${sensor.name} refused to show its rules: ${current.refused}` };
  const set = current.rules;
  if (opts.when === "after_sunset" && !set.location) return { refused: `"after sunset" needs ${sensor.name}'s location in its rule set` };
  const t = { device: target.id, key: b64url(targetKey) };
  if (opts.lan) t.lan = opts.lan;
  if (opts.allowCloud) t.allow_cloud = true;
  // One rule per target: a new one replaces the old.
  const others = set.rules.filter((r) => !(r.kind.motion && r.kind.motion.target && r.kind.motion.target.device === target.id));
  const id = Math.max(0, ...set.rules.map((r) => r.id)) + 1;
  const rule = { id, name: `motion: ${target.name}`, enabled: true, kind: { motion: { sensor: sensor.id, off_after_secs: opts.offAfterSecs, when: opts.when, target: t } } };
  const r = await setRules(sensor, set.version, { ...set, rules: [...others, rule] });
  if (r.refused) return { refused: `${sensor.name} refused the rule: ${r.refused}` };
  return { rule };
}

// ---- energy and firmware ----

// The device's own energy history (GetEnergy, answered sealed), or
// {refused} / {unavailable} when the device does not offer it.
export async function energy(dev, since, resolution) {
  let r;
  try {
    r = await send(dev, { op: "get_energy", since, resolution });
  } catch (e) {
    return { unavailable: e.message };
  }
  if (r.outcome.outcome === "refused") return { refused: explain(r.outcome.reason) };
  if (r.outcome.outcome !== "energy") return { unavailable: "no energy report in the answer" };
  return { report: r.outcome.report };
}

export async function firmwareCommand(dev, command) {
  const r = await send(dev, command);
  if (r.outcome.outcome === "refused") return { refused: explain(r.outcome.reason) };
  return { state: r.state };
}

// ---- history ----

// The device's stored sealed reports, decrypted and verified here, oldest first.
export async function events(dev, after = 0) {
  const out = [];
  let lastSeq = 0;
  for (let page = 0; page < 10; page++) {
    const v = await api.call("GET", `/api/v1/devices/${dev.id}/events?after=${after}`);
    const list = v.events || [];
    if (list.length === 0) break;
    for (const e of list) {
      after = Math.max(after, e.seq);
      try {
        const s = await openState(dev, fromB64url(e.envelope));
        // The device's own sequence must increase: a cloud that reorders
        // or replays history is caught here.
        out.push({ ...s, inOrder: s.seq > lastSeq });
        lastSeq = Math.max(lastSeq, s.seq);
      } catch (err) {
        out.push({ unreadable: describeOpenError(err) });
      }
    }
  }
  return out;
}
