// Opening what a device reports (ADR 0006), as hearth-proto's e2e.rs does:
// verify the device's outer signature, find this controller's wrapped
// content key, open it with HPKE, decrypt the body with AES-128-GCM under
// "hearth/v1/sealed-body" || CBOR(header), unpad, then verify the inner
// signed report or result and check that it agrees with the header.

import * as cose from "./cose.js";
import { decode, encode, struct } from "./cbor.js";
import * as hpke from "./hpke.js";
import { concat, fromHex, utf8 } from "./bytes.js";

const HPKE_INFO = utf8("hearth/v1/content-key");
const BODY_AAD = utf8("hearth/v1/sealed-body");
const MAX_RECIPIENTS = 64;
const PROTOCOL_VERSION = 1;

// Why an envelope could not be opened; `kind` is forged, not_a_recipient or undecryptable.
export class OpenError extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}
const forged = (m) => new OpenError("forged", `not authentic: ${m}`);

const STATE_FIELDS = ["v", "device", "kind", "seq", "at", "state", "cause"];
const RESULT_FIELDS = ["v", "device", "controller", "counter", "outcome", "state", "at", "access"];

export const isSealed = (bytes) => {
  try {
    return cose.open(bytes).kind === cose.Kind.Sealed;
  } catch {
    return false;
  }
};

function checkDevice(p, device, what) {
  if (p.v !== PROTOCOL_VERSION) throw forged(`${what}: protocol version ${p.v} is not supported`);
  if (p.device !== device) throw forged(`${what} signed for device ${p.device}, expected ${device}`);
}

// A plain signed state report or result (message::verify_state / verify_result).
export async function verifyInner(bytes, device, deviceKey, kind) {
  let payload;
  try {
    payload = await cose.verify(cose.open(bytes), deviceKey, kind);
  } catch (e) {
    throw forged(e.message);
  }
  const what = kind === cose.Kind.StateReport ? "state report" : "result";
  const p = struct(decode(payload), what, kind === cose.Kind.StateReport ? STATE_FIELDS : RESULT_FIELDS);
  checkDevice(p, device, what);
  return p;
}

// The routing header, re-encoded in the Rust struct's field order.
function headerBytes(h) {
  const m = new Map([["v", h.v], ["device", h.device], ["content", h.content], ["seq", h.seq]]);
  if (h.to !== undefined) m.set("to", new Map([["controller", h.to.controller], ["counter", h.to.counter]]));
  m.set("at", h.at);
  return encode(m);
}

// Verifies and decrypts a sealed envelope for controller `me` (hex id).
// `enc` is {privateKey (ECDH), publicRaw (SEC1)}. Returns {header, inner}.
export async function openSealed(bytes, device, deviceKey, me, enc) {
  let raw;
  try {
    raw = await cose.verify(cose.open(bytes), deviceKey, cose.Kind.Sealed);
  } catch (e) {
    throw forged(e.message);
  }
  const p = struct(decode(raw), "sealed envelope", ["header", "recipients", "nonce", "body"]);
  const h = p.header;
  checkDevice(h, device, "sealed envelope");
  if (!Array.isArray(p.recipients) || p.recipients.length > MAX_RECIPIENTS || !(p.nonce instanceof Uint8Array) || p.nonce.length !== 12) {
    throw forged("bad recipient count or nonce");
  }
  if ((h.content === "result") !== (h.to !== undefined)) throw forged("only results are addressed");
  const w = p.recipients.find((r) => r.controller === me);
  if (!w) throw new OpenError("not_a_recipient", "not encrypted for this controller");
  try {
    const keyAad = concat(fromHex(device), fromHex(me), p.nonce);
    const cek = await hpke.open(w.enc, enc.privateKey, enc.publicRaw, HPKE_INFO, keyAad, w.key);
    const k = await crypto.subtle.importKey("raw", cek, "AES-GCM", false, ["decrypt"]);
    const padded = new Uint8Array(
      await crypto.subtle.decrypt({ name: "AES-GCM", iv: p.nonce, additionalData: concat(BODY_AAD, headerBytes(h)) }, k, p.body),
    );
    const len = (padded[0] << 8) | padded[1];
    if (padded.length < 2 + len) throw new Error("bad padding");
    return { header: h, inner: padded.slice(2, 2 + len) };
  } catch {
    throw new OpenError("undecryptable", "could not be decrypted");
  }
}

// A state report, sealed or plain, verified (e2e::open_state).
export async function openState(bytes, device, deviceKey, me, enc) {
  if (!isSealed(bytes)) return verifyInner(bytes, device, deviceKey, cose.Kind.StateReport);
  const { header, inner } = await openSealed(bytes, device, deviceKey, me, enc);
  const s = await verifyInner(inner, device, deviceKey, cose.Kind.StateReport);
  if (header.content !== "state" || header.seq !== s.seq) throw forged("header disagrees with the report");
  return s;
}

// A command result, sealed or plain (refusals to a controller the device
// cannot encrypt for), verified (e2e::open_result).
export async function openResult(bytes, device, deviceKey, me, enc) {
  if (!isSealed(bytes)) return verifyInner(bytes, device, deviceKey, cose.Kind.CommandResult);
  const { header, inner } = await openSealed(bytes, device, deviceKey, me, enc);
  const r = await verifyInner(inner, device, deviceKey, cose.Kind.CommandResult);
  const to = header.to;
  if (!(header.content === "result" && to && to.controller === r.controller && to.counter === r.counter)) {
    throw forged("header disagrees with the result");
  }
  return r;
}
