// The browser's crypto against the Rust side: a command signed in the
// browser verifies in Rust (hearth-proto, via `hearth web-vectors`), a
// report signed and sealed in Rust opens and verifies in the browser, and
// the browser's HPKE matches RFC 9180's published vector.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync, readdirSync } from "node:fs";
import path from "node:path";
import { world, browser, phone, HEARTH } from "./harness.mjs";

let w, b, page;

before(async () => {
  w = await world([["plug", "plug"]]);
  b = await browser();
  page = await phone(b);
  await page.goto(w.web);
  await page.waitForSelector("form[aria-labelledby=login-title]");
});

after(async () => {
  if (b) await b.close();
  if (w) w.cleanup();
});

test("HPKE open matches RFC 9180 A.3.1 (DHKEM(P-256), HKDF-SHA256, AES-128-GCM, base mode)", async () => {
  const v = {
    info: "4f6465206f6e2061204772656369616e2055726e",
    pkEm: "04a92719c6195d5085104f469a8b9814d5838ff72b60501e2c4466e5e67b325ac98536d7b61a1af4b78e5b7f951c0900be863c403ce65c9bfcb9382657222d18c4",
    skRm: "f3ce7fdae57e1a310d87f1ebbde6f328be0a99cdbcadf4d6589cf29de4b8ffd2",
    pkRm: "04fe8c19ce0905191ebc298a9245792531f26f0cece2460639e8bc39cb7f706a826a779b4cf969b8a0e539c7f62fb3d30ad6aa8f80e30f1d128aafd68a2ce72ea0",
    aad: "436f756e742d30",
    ct: "5ad590bb8baa577f8619db35a36311226a896e7342a6d836d8b7bcd2f20b6c7f9076ac232e3ab2523f39513434",
    pt: "4265617574792069732074727574682c20747275746820626561757479",
  };
  const got = await page.evaluate(async (v) => {
    const hpke = await import("/app/hpke.js");
    const { fromHex, toHex, b64url } = await import("/app/bytes.js");
    const pk = fromHex(v.pkRm);
    const jwk = { kty: "EC", crv: "P-256", d: b64url(fromHex(v.skRm)), x: b64url(pk.slice(1, 33)), y: b64url(pk.slice(33)) };
    const sk = await crypto.subtle.importKey("jwk", jwk, { name: "ECDH", namedCurve: "P-256" }, false, ["deriveBits"]);
    const pt = await hpke.open(fromHex(v.pkEm), sk, pk, fromHex(v.info), fromHex(v.aad), fromHex(v.ct));
    const bad = fromHex(v.ct);
    bad[0] ^= 1;
    let refused = false;
    try {
      await hpke.open(fromHex(v.pkEm), sk, pk, fromHex(v.info), fromHex(v.aad), bad);
    } catch {
      refused = true;
    }
    return { pt: toHex(pt), refused };
  }, v);
  assert.equal(got.pt, v.pt);
  assert.equal(got.refused, true, "a flipped ciphertext bit must not open");
});

test("a command signed in the browser verifies in Rust, and a tampered one does not", async () => {
  const made = await page.evaluate(async () => {
    const ctl = await import("/app/controller.js");
    const cose = await import("/app/cose.js");
    const { encode } = await import("/app/cbor.js");
    const { b64url, fromHex } = await import("/app/bytes.js");
    const id = await ctl.getIdentity();
    const payload = {
      v: 1,
      device: "00112233445566778899aabb",
      controller: id.controller,
      counter: 1700000000123,
      issued_at: 1800000000,
      command: { op: "add_controller", key: b64url(id.pub), enc: id.encPub, role: "member" },
    };
    const env = await cose.sign(id.signing, cose.Kind.Command, fromHex(id.controller), encode(payload));
    const bad = env.slice();
    bad[bad.length - 70] ^= 1;
    return { key: b64url(id.pub), env: b64url(env), bad: b64url(bad), controller: id.controller, enc: b64url(id.encPub) };
  });
  const out = JSON.parse(execFileSync(HEARTH, ["web-vectors", "check-command", "--key", made.key, "--envelope", made.env], { encoding: "utf8" }));
  assert.equal(out.v, 1);
  assert.equal(out.device, "00112233445566778899aabb");
  assert.equal(out.controller, made.controller);
  assert.equal(out.counter, 1700000000123);
  assert.equal(out.issued_at, 1800000000);
  assert.deepEqual(out.command, { op: "add_controller", key: made.key, enc: made.enc, role: "member" });
  assert.throws(() => execFileSync(HEARTH, ["web-vectors", "check-command", "--key", made.key, "--envelope", made.bad], { stdio: "pipe" }));
});

test("reports signed and sealed in Rust open and verify in the browser; forged and foreign ones are refused", async () => {
  const me = await page.evaluate(async () => {
    const ctl = await import("/app/controller.js");
    const { b64url } = await import("/app/bytes.js");
    const id = await ctl.getIdentity();
    return { controller: id.controller, enc: b64url(id.encPub) };
  });
  const v = JSON.parse(execFileSync(HEARTH, ["web-vectors", "seal", "--controller", me.controller, "--enc-key", me.enc], { encoding: "utf8" }));
  const got = await page.evaluate(async (v) => {
    const e2e = await import("/app/e2e.js");
    const cose = await import("/app/cose.js");
    const ctl = await import("/app/controller.js");
    const { fromB64url } = await import("/app/bytes.js");
    const id = await ctl.getIdentity();
    const key = await cose.verifyKey(fromB64url(v.device_key));
    const enc = { privateKey: id.enc, publicRaw: id.encPub };
    const open = async (f) => {
      try {
        return { ok: await f() };
      } catch (e) {
        return { err: e.kind || e.message };
      }
    };
    return {
      plain: await open(() => e2e.openState(fromB64url(v.state_plain), v.device, key, id.controller, enc)),
      sealed: await open(() => e2e.openState(fromB64url(v.state_sealed), v.device, key, id.controller, enc)),
      result: await open(() => e2e.openResult(fromB64url(v.result_sealed), v.device, key, id.controller, enc)),
      forged: await open(() => e2e.openState(fromB64url(v.state_forged), v.device, key, id.controller, enc)),
      notMine: await open(() => e2e.openState(fromB64url(v.state_not_mine), v.device, key, id.controller, enc)),
      wrongDevice: await open(() => e2e.openState(fromB64url(v.state_sealed), "ffffffffffffffffffffffff", key, id.controller, enc)),
    };
  }, v);
  assert.deepEqual(got.plain.ok, v.expect_state);
  assert.deepEqual(got.sealed.ok, v.expect_state);
  assert.deepEqual(got.result.ok, v.expect_result);
  assert.equal(got.forged.err, "forged");
  assert.equal(got.notMine.err, "not_a_recipient");
  assert.equal(got.wrongDevice.err, "forged");
});

test("a device certificate checks against the manufacturer CA in the browser", async () => {
  const dir = w.devices.plug.stateDir;
  const certFile = readdirSync(dir).find((f) => /cert.*\.pem$|device\.pem$/.test(f));
  assert.ok(certFile, `no certificate file in ${dir}: ${readdirSync(dir)}`);
  const pem = readFileSync(path.join(dir, certFile), "utf8");
  const got = await page.evaluate(async (pem) => {
    const x509 = await import("/app/x509.js");
    const { b64url } = await import("/app/bytes.js");
    const ca = await (await fetch("/app/manufacturer-ca.pem")).text();
    const der = x509.pemToDer(pem);
    const ok = await x509.verifyDeviceCert(ca, b64url(der));
    const bad = der.slice();
    bad[bad.length - 80] ^= 1;
    let refused = null;
    try {
      await x509.verifyDeviceCert(ca, b64url(bad));
    } catch (e) {
      refused = e.message;
    }
    let expired = null;
    try {
      await x509.verifyDeviceCert(ca, b64url(der), Date.UTC(2200, 0, 1));
    } catch (e) {
      expired = e.message;
    }
    return { device: ok.device, keyLen: ok.key.length, refused, expired };
  }, pem);
  assert.equal(got.device, w.devices.plug.id);
  assert.equal(got.keyLen, 65);
  assert.ok(got.refused, "a certificate with a flipped bit must be refused");
  assert.match(got.expired, /expired/);
});

test("no page errors or CSP violations", () => {
  assert.deepEqual(page.problems, []);
});
