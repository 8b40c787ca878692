// Pairing through an untrusted cloud (ADR 0003), as hearth-proto's
// pairing.rs: a MAC key from the label's 128-bit setup secret with
// HKDF-SHA256 (RFC 5869, salt "hearth/v1/pairing", info "mac key"), the
// request and response authenticated with HMAC-SHA256 (RFC 2104), and the
// device's signed confirmation checked with the key the MAC vouched for.

import * as cose from "./cose.js";
import { decode, struct } from "./cbor.js";
import { concat, equal, fromB64url, fromHex, sha256, toHex, utf8 } from "./bytes.js";

const ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const LABEL_PREFIX = "HEARTH:1:";

// RFC 4648 base32 of 16 bytes: 26 characters, the last two bits zero.
function unbase32(text) {
  if (text.length !== 26) return null;
  const out = [];
  let buf = 0;
  let bits = 0;
  for (const c of text) {
    const v = ALPHABET.indexOf(c);
    if (v < 0) return null;
    buf = ((buf << 5) | v) & 0xffff;
    bits += 5;
    if (bits >= 8) {
      bits -= 8;
      out.push((buf >> bits) & 0xff);
    }
  }
  if ((buf & ((1 << bits) - 1)) !== 0) return null;
  return Uint8Array.from(out);
}

function secretFromCode(text) {
  const cleaned = text.replace(/[- ]/g, "").toUpperCase();
  const s = unbase32(cleaned);
  if (!s) throw new Error("That is not a setup code: expected 26 letters A–Z and digits 2–7 (dashes optional).");
  return s;
}

// Reads a QR payload (HEARTH:1:<device id>:<code>) or a typed code.
export function parseLabel(text) {
  text = text.trim();
  if (text.startsWith(LABEL_PREFIX)) {
    const rest = text.slice(LABEL_PREFIX.length);
    const i = rest.indexOf(":");
    if (i < 0) throw new Error("The label payload has no code.");
    const device = rest.slice(0, i);
    if (device && !/^[0-9a-f]{24}$/.test(device)) throw new Error("The label payload names no valid device id.");
    return { device: device || null, secret: secretFromCode(rest.slice(i + 1)) };
  }
  return { device: null, secret: secretFromCode(text) };
}

// The one-way value a device in setup mode announces (SetupSecret::lookup).
export async function lookup(secret) {
  return toHex((await sha256(concat(utf8("hearth/v1/setup-lookup"), secret))).slice(0, 8));
}

async function macKey(secret) {
  const ikm = await crypto.subtle.importKey("raw", secret, "HKDF", false, ["deriveBits"]);
  const okm = await crypto.subtle.deriveBits(
    { name: "HKDF", hash: "SHA-256", salt: utf8("hearth/v1/pairing"), info: utf8("mac key") },
    ikm,
    256,
  );
  return crypto.subtle.importKey("raw", okm, { name: "HMAC", hash: "SHA-256" }, false, ["sign", "verify"]);
}

// Step 1: the request {controller_key, nonce, mac} for the cloud to relay.
export async function start(secret, controllerSec1) {
  const nonce = crypto.getRandomValues(new Uint8Array(16));
  const key = await macKey(secret);
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", key, concat(utf8("hearth/v1/pair-request"), controllerSec1, nonce)));
  return { key, nonce, controllerSec1, mac };
}

// Step 2 (controller side of PendingPairing::finish): the response MAC
// proves the device key belongs to the device on the label; then the
// signed confirmation must name this controller as owner.
export async function finish(pending, resp, expectedDevice, myControllerId) {
  if (expectedDevice && resp.device !== expectedDevice) throw new Error(`answered by ${resp.device}, expected ${expectedDevice}`);
  if (!/^[0-9a-f]{24}$/.test(resp.device)) throw new Error("the answer names no valid device");
  const deviceKey = fromB64url(resp.device_key);
  const nonce = fromB64url(resp.nonce);
  if (nonce.length !== 16) throw new Error("bad nonce length");
  const data = concat(utf8("hearth/v1/pair-response"), fromHex(resp.device), deviceKey, pending.controllerSec1, pending.nonce, nonce);
  const ok = await crypto.subtle.verify("HMAC", pending.key, fromB64url(resp.mac), data);
  if (!ok) throw new Error("the device's answer does not carry the setup secret's MAC (wrong device, or tampered with)");
  const vk = await cose.verifyKey(deviceKey);
  const c = struct(decode(await cose.verify(cose.open(fromB64url(resp.confirmation)), vk, cose.Kind.PairConfirmation)), "confirmation", [
    "v",
    "device",
    "controller",
    "role",
    "at",
  ]);
  if (c.v !== 1 || c.device !== resp.device) throw new Error("the confirmation has the wrong version or device");
  if (c.controller !== myControllerId || c.role !== "owner") throw new Error("the confirmation does not name this controller as owner");
  return { device: resp.device, deviceKey };
}

export { equal };
