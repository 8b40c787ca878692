// COSE_Sign1 (RFC 9052 §4.2) with ES256 (RFC 9053 §2.1), exactly as
// hearth-proto's envelope.rs writes and checks it: tag 18, a protected
// header {1: -7 (alg), 3: content type, 4: key id}, an empty unprotected
// header, an attached payload, and the 64-byte r||s signature — the format
// WebCrypto's ECDSA produces and expects (IEEE P1363), so no conversion.

import { decode, encode, Tagged } from "./cbor.js";
import { utf8 } from "./bytes.js";

export const Kind = Object.freeze({
  Command: "application/hearth.command.v1+cbor",
  CommandResult: "application/hearth.result.v1+cbor",
  StateReport: "application/hearth.state.v1+cbor",
  PairConfirmation: "application/hearth.pair-confirmation.v1+cbor",
  Sealed: "application/hearth.sealed.v1+cbor",
});

const KINDS = new Set(Object.values(Kind));
const ES256 = -7;
const MAX_ENVELOPE = 64 * 1024;
const ECDSA = { name: "ECDSA", hash: "SHA-256" };

// RFC 9052 §4.4: Sig_structure = ["Signature1", body_protected, external_aad, payload].
function toBeSigned(protectedBytes, payload) {
  return encode(["Signature1", protectedBytes, new Uint8Array(0), payload]);
}

// Signs `payload` as a tagged COSE_Sign1. `key` is a WebCrypto ECDSA P-256 private key.
export async function sign(key, kind, kid, payload) {
  if (!KINDS.has(kind)) throw new Error("unknown envelope kind");
  const protectedBytes = encode(new Map([[1, ES256], [3, kind], [4, kid]]));
  const sig = new Uint8Array(await crypto.subtle.sign(ECDSA, key, toBeSigned(protectedBytes, payload)));
  return encode(new Tagged(18, [protectedBytes, new Map(), payload, sig]));
}

// Decodes an envelope from a peer; checks size, structure, algorithm and
// content type like envelope::open. The payload is not to be trusted until
// `verify` has checked the signature.
export function open(bytes) {
  if (bytes.length > MAX_ENVELOPE) throw new Error("envelope too large");
  const t = decode(bytes);
  if (!(t instanceof Tagged) || t.tag !== 18) throw new Error("not a tagged COSE_Sign1");
  const a = t.value;
  if (!Array.isArray(a) || a.length !== 4) throw new Error("not a COSE_Sign1");
  const [protectedBytes, unprotected, payload, signature] = a;
  if (!(protectedBytes instanceof Uint8Array) || !(unprotected instanceof Map)) throw new Error("bad COSE headers");
  if (!(payload instanceof Uint8Array)) throw new Error("missing payload");
  if (!(signature instanceof Uint8Array)) throw new Error("bad signature field");
  const h = decode(protectedBytes);
  if (!(h instanceof Map)) throw new Error("bad protected header");
  if (h.has(2)) throw new Error("critical headers are not supported");
  if (h.get(1) !== ES256) throw new Error("algorithm must be ES256");
  const kind = h.get(3);
  if (!KINDS.has(kind)) throw new Error("unknown content type");
  const kid = h.get(4);
  if (!(kid instanceof Uint8Array) || kid.length < 1 || kid.length > 32) throw new Error("key id must be 1 to 32 bytes");
  return { kind, kid, protectedBytes, payload, signature };
}

// Checks the signature (and the kind, if given) with a WebCrypto ECDSA
// public key and returns the payload.
export async function verify(unverified, key, expectedKind) {
  if (expectedKind && unverified.kind !== expectedKind) throw new Error(`envelope holds a ${unverified.kind}, expected ${expectedKind}`);
  if (unverified.signature.length !== 64) throw new Error("bad signature");
  const ok = await crypto.subtle.verify(ECDSA, key, unverified.signature, toBeSigned(unverified.protectedBytes, unverified.payload));
  if (!ok) throw new Error("bad signature");
  return unverified.payload;
}

// A device or controller public key (SEC1 point) as a WebCrypto verify key.
export function verifyKey(sec1) {
  return crypto.subtle.importKey("raw", sec1, { name: "ECDSA", namedCurve: "P-256" }, false, ["verify"]);
}

export const textBytes = utf8;
