// HPKE (RFC 9180) base mode, single-shot Open (§6.1), for the one suite
// Hearth uses: DHKEM(P-256, HKDF-SHA256) (KEM 0x0010, §4.1, §7.1),
// HKDF-SHA256 (KDF 0x0001) and AES-128-GCM (AEAD 0x0001). Built from
// WebCrypto primitives only: ECDH P-256 for DH, HMAC-SHA256 for
// LabeledExtract/LabeledExpand (§4), AES-GCM for the AEAD.
// Checked against the RFC's Appendix A.3.1 vector by the browser tests.

import { concat, utf8 } from "./bytes.js";

const KEM_SUITE = concat(utf8("KEM"), Uint8Array.of(0x00, 0x10));
const HPKE_SUITE = concat(utf8("HPKE"), Uint8Array.of(0x00, 0x10, 0x00, 0x01, 0x00, 0x01));
const VERSION = utf8("HPKE-v1");
const N_SECRET = 32;
const N_K = 16;
const N_N = 12;
const N_H = 32;

async function hmac(key, data) {
  // An empty HMAC key equals a block of zeros (RFC 2104 §2); WebCrypto
  // refuses empty keys, so HKDF's empty salt is passed as HashLen zeros.
  const raw = key.length === 0 ? new Uint8Array(N_H) : key;
  const k = await crypto.subtle.importKey("raw", raw, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  return new Uint8Array(await crypto.subtle.sign("HMAC", k, data));
}

// RFC 5869 §2.2 and §2.3.
const extract = (salt, ikm) => hmac(salt, ikm);
async function expand(prk, info, len) {
  let t = new Uint8Array(0);
  const out = [];
  for (let i = 1; out.length * N_H < len; i++) {
    t = await hmac(prk, concat(t, info, Uint8Array.of(i)));
    out.push(t);
  }
  return concat(...out).slice(0, len);
}

// RFC 9180 §4: LabeledExtract and LabeledExpand.
const labeledExtract = (suite, salt, label, ikm) => extract(salt, concat(VERSION, suite, utf8(label), ikm));
const labeledExpand = (suite, prk, label, info, len) =>
  expand(prk, concat(Uint8Array.of(len >> 8, len & 0xff), VERSION, suite, utf8(label), info), len);

// RFC 9180 §4.1 Decap: dh = DH(skR, pkE); kem_context = enc || pkRm;
// shared_secret = ExtractAndExpand(dh, kem_context).
async function decap(enc, skR, pkRm) {
  const pkE = await crypto.subtle.importKey("raw", enc, { name: "ECDH", namedCurve: "P-256" }, false, []);
  const dh = new Uint8Array(await crypto.subtle.deriveBits({ name: "ECDH", public: pkE }, skR, 256));
  const eaePrk = await labeledExtract(KEM_SUITE, new Uint8Array(0), "eae_prk", dh);
  return labeledExpand(KEM_SUITE, eaePrk, "shared_secret", concat(enc, pkRm), N_SECRET);
}

// RFC 9180 §5.1 KeySchedule for mode_base (psk and psk_id empty).
async function keySchedule(sharedSecret, info) {
  const empty = new Uint8Array(0);
  const pskIdHash = await labeledExtract(HPKE_SUITE, empty, "psk_id_hash", empty);
  const infoHash = await labeledExtract(HPKE_SUITE, empty, "info_hash", info);
  const context = concat(Uint8Array.of(0x00), pskIdHash, infoHash);
  const secret = await labeledExtract(HPKE_SUITE, sharedSecret, "secret", empty);
  const key = await labeledExpand(HPKE_SUITE, secret, "key", context, N_K);
  const baseNonce = await labeledExpand(HPKE_SUITE, secret, "base_nonce", context, N_N);
  return { key, baseNonce };
}

// RFC 9180 §6.1 single-shot Open (sequence number 0, so the nonce is the
// base nonce). `skR` is a WebCrypto ECDH P-256 private key (it may be
// non-extractable), `pkRm` its public key as a SEC1 uncompressed point.
// Throws if anything does not decrypt.
export async function open(enc, skR, pkRm, info, aad, ciphertext) {
  if (enc.length !== 65) throw new Error("HPKE: bad encapsulated key");
  const sharedSecret = await decap(enc, skR, pkRm);
  const { key, baseNonce } = await keySchedule(sharedSecret, info);
  const k = await crypto.subtle.importKey("raw", key, "AES-GCM", false, ["decrypt"]);
  return new Uint8Array(await crypto.subtle.decrypt({ name: "AES-GCM", iv: baseNonce, additionalData: aad }, k, ciphertext));
}
