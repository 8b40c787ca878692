// Just enough X.509 (RFC 5280) to check a device certificate against the
// manufacturer CA, for a device this browser did not pair itself (it was
// shared with this account): the certificate must be signed by the CA's
// P-256 key with ecdsa-with-SHA256, name the CA as issuer, be within its
// validity, and carry a P-256 key; the device id is its subject CN. This is
// what hearth_pki::verify_device_cert establishes for the CLI.

import { equal, fromB64url } from "./bytes.js";

const OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1";
const OID_P256 = "1.2.840.10045.3.1.7";
const OID_ECDSA_SHA256 = "1.2.840.10045.4.3.2";
const OID_CN = "2.5.4.3";

// One DER TLV at `at`: {tag, start (of contents), end, raw (whole TLV)}.
function tlv(b, at) {
  if (at + 2 > b.length) throw new Error("DER: truncated");
  const tag = b[at];
  let len = b[at + 1];
  let start = at + 2;
  if (len & 0x80) {
    const n = len & 0x7f;
    if (n < 1 || n > 3) throw new Error("DER: bad length");
    len = 0;
    for (let i = 0; i < n; i++) len = (len << 8) | b[start + i];
    start += n;
  }
  const end = start + len;
  if (end > b.length) throw new Error("DER: truncated");
  return { tag, start, end, raw: b.subarray(at, end), body: b.subarray(start, end) };
}

function children(b, node) {
  const out = [];
  for (let at = node.start; at < node.end; ) {
    const c = tlv(b, at);
    out.push(c);
    at = c.end;
  }
  return out;
}

function oid(body) {
  const parts = [Math.floor(body[0] / 40), body[0] % 40];
  let v = 0;
  for (const x of body.subarray(1)) {
    v = v * 128 + (x & 0x7f);
    if (!(x & 0x80)) {
      parts.push(v);
      v = 0;
    }
  }
  return parts.join(".");
}

function time(node) {
  const s = new TextDecoder().decode(node.body);
  const m = node.tag === 0x17 ? /^(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z$/.exec(s) : /^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z$/.exec(s);
  if (!m) throw new Error("X.509: bad time");
  let year = Number(m[1]);
  if (node.tag === 0x17) year += year < 50 ? 2000 : 1900;
  return Date.UTC(year, Number(m[2]) - 1, Number(m[3]), Number(m[4]), Number(m[5]), Number(m[6]));
}

function parse(der) {
  const cert = tlv(der, 0);
  const [tbs, sigAlg, sigValue] = children(der, cert);
  let f = children(der, tbs);
  if (f[0].tag === 0xa0) f = f.slice(1);
  const [, , issuer, validity, subject, spki] = f;
  const [notBefore, notAfter] = children(der, validity);
  const [alg, key] = children(der, spki);
  const [algOid, curve] = children(der, alg);
  let cn = null;
  for (const rdn of children(der, subject)) {
    for (const atv of children(der, rdn)) {
      const [t, v] = children(der, atv);
      if (oid(t.body) === OID_CN) cn = new TextDecoder().decode(v.body);
    }
  }
  return {
    tbs: tbs.raw,
    sigAlg: oid(children(der, sigAlg)[0].body),
    signature: sigValue.body.subarray(1),
    issuer: issuer.raw,
    subject: subject.raw,
    notBefore: time(notBefore),
    notAfter: time(notAfter),
    keyAlg: oid(algOid.body),
    curve: curve ? oid(curve.body) : null,
    key: key.body.subarray(1),
    cn,
  };
}

// DER ECDSA-Sig-Value {r INTEGER, s INTEGER} to the 64-byte r||s WebCrypto wants.
function rawSignature(der) {
  const seq = tlv(der, 0);
  const [r, s] = children(der, seq);
  const fix = (x) => {
    let v = x.body;
    while (v.length > 32 && v[0] === 0) v = v.subarray(1);
    if (v.length > 32) throw new Error("bad ECDSA signature");
    const out = new Uint8Array(32);
    out.set(v, 32 - v.length);
    return out;
  };
  const out = new Uint8Array(64);
  out.set(fix(r), 0);
  out.set(fix(s), 32);
  return out;
}

export function pemToDer(pem) {
  const m = /-----BEGIN CERTIFICATE-----([\s\S]+?)-----END CERTIFICATE-----/.exec(pem);
  if (!m) throw new Error("not a PEM certificate");
  const bin = atob(m[1].replace(/\s+/g, ""));
  return Uint8Array.from(bin, (c) => c.charCodeAt(0));
}

// Checks `certB64` (base64url DER, as the cloud lists it) against the CA
// PEM at time `now` (ms). Returns {device, key (SEC1)} or throws.
export async function verifyDeviceCert(caPem, certB64, now = Date.now()) {
  const ca = parse(pemToDer(caPem));
  const c = parse(fromB64url(certB64));
  if (c.sigAlg !== OID_ECDSA_SHA256) throw new Error("device certificate: not signed with ecdsa-with-SHA256");
  if (!equal(c.issuer, ca.subject)) throw new Error("device certificate: not issued by the manufacturer CA");
  if (now < c.notBefore || now > c.notAfter) throw new Error("device certificate: expired or not yet valid");
  if (ca.keyAlg !== OID_EC_PUBLIC_KEY || ca.curve !== OID_P256) throw new Error("manufacturer CA: not a P-256 key");
  if (c.keyAlg !== OID_EC_PUBLIC_KEY || c.curve !== OID_P256 || c.key.length !== 65) throw new Error("device certificate: not a P-256 key");
  const caKey = await crypto.subtle.importKey("raw", ca.key, { name: "ECDSA", namedCurve: "P-256" }, false, ["verify"]);
  const ok = await crypto.subtle.verify({ name: "ECDSA", hash: "SHA-256" }, caKey, rawSignature(c.signature), c.tbs);
  if (!ok) throw new Error("device certificate: the manufacturer CA's signature does not verify");
  if (!c.cn || !/^[0-9a-f]{24}$/.test(c.cn)) throw new Error("device certificate: no device id");
  return { device: c.cn, key: c.key.slice() };
}
