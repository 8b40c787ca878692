// The plain-HTTP listener is for a browser on the same machine only:
// `--web-listen` refuses any address that is not loopback (ADR 0007).

import { test } from "node:test";
import assert from "node:assert/strict";
import { hearthTry } from "./harness.mjs";

test("--web-listen refuses a non-loopback address", () => {
  for (const addr of ["0.0.0.0:8080", "192.0.2.1:8080", "[::]:8080"]) {
    const r = hearthTry(["cloud", "serve", "--pki", "/nonexistent", "--data-dir", "/nonexistent", "--web-listen", addr]);
    assert.notEqual(r.status, 0, addr);
    assert.match(r.stderr, /not a loopback address/, r.stderr);
  }
  const r = hearthTry(["demo", "--web-listen", "0.0.0.0:8080"]);
  assert.notEqual(r.status, 0);
  assert.match(r.stderr, /not a loopback address/, r.stderr);
});
