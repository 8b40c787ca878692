// The installable app (ADR 0007): the service worker registers, controls
// the page after a reload, keeps only the app shell (never an /api/
// answer), and Chromium finds the manifest installable.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";
import { world, browser, phone, PASSWORD } from "./harness.mjs";

let w, b, page;
const T = 20000;

before(async () => {
  w = await world([]);
  b = await browser();
  page = await phone(b);
});

after(async () => {
  if (b) await b.close();
  if (w) w.cleanup();
});

const cached = (p) =>
  p.evaluate(async () => {
    const out = [];
    for (const name of await caches.keys()) {
      for (const req of await (await caches.open(name)).keys()) out.push({ name, url: new URL(req.url).pathname });
    }
    return out;
  });

test("the service worker registers and controls the page after a reload", async () => {
  await page.goto(w.web);
  await page.getByRole("heading", { name: "Sign in to Hearth" }).waitFor({ timeout: T });
  const scope = await page.evaluate(async () => (await navigator.serviceWorker.ready).scope);
  assert.equal(scope, w.web);
  await page.reload();
  await page.waitForFunction(() => navigator.serviceWorker.controller !== null, null, { timeout: T });
  assert.equal(await page.evaluate(() => new URL(navigator.serviceWorker.controller.scriptURL).pathname), "/sw.js");
  // The page, served through the worker, still carries its CSP (the
  // worker hands over the cloud's own response, headers and all).
  await page.getByRole("heading", { name: "Sign in to Hearth" }).waitFor({ timeout: T });
});

test("after signing up and using the API, only the app shell is cached", async () => {
  await page.getByLabel("Email").fill("pwa@example.com");
  await page.getByLabel("Password").fill(PASSWORD);
  await page.getByRole("button", { name: "Sign up" }).click();
  await page.getByRole("heading", { name: "Home" }).waitFor({ timeout: T });
  await page.getByRole("link", { name: "Settings" }).click();
  await page.locator('main[data-ready="#/settings"]').waitFor({ timeout: T });
  // The page did talk to the API through the controlled page...
  const api = await page.evaluate(() => performance.getEntriesByType("resource").filter((e) => new URL(e.name).pathname.startsWith("/api/")).length);
  assert.ok(api > 0, "the page made no API request");
  await page.reload();
  await page.locator('main[data-ready="#/settings"]').waitFor({ timeout: T });
  // ...and none of it is in any cache; every cached entry is a shell file.
  const entries = await cached(page);
  assert.ok(entries.length >= 10, JSON.stringify(entries));
  for (const e of entries) {
    assert.equal(e.name, "hearth-shell-v1");
    assert.ok(!e.url.startsWith("/api/"), `an API response is cached: ${e.url}`);
    assert.ok(e.url === "/" || e.url === "/manifest.webmanifest" || /^\/app\/[a-z0-9-]+\.(js|css|svg|png)$/.test(e.url), `not a shell file: ${e.url}`);
  }
  for (const want of ["/", "/app/main.js", "/app/controller.js", "/app/icon-192.png"]) {
    assert.ok(entries.some((e) => e.url === want), `${want} is not cached`);
  }
});

test("network first: a stale copy in the cache is not used while the cloud answers, and is replaced", async () => {
  // Stand in for the previous version of the app: the cache's page and
  // one module are replaced by older content.
  await page.evaluate(async () => {
    const c = await caches.open("hearth-shell-v1");
    const headers = { "content-type": "text/html; charset=utf-8" };
    await c.put("/", new Response("<!doctype html><title>stale</title><p>old app</p>", { headers }));
    await c.put("/app/ui.js", new Response("throw new Error('old module');", { headers: { "content-type": "text/javascript" } }));
  });
  await page.reload();
  await page.locator('main[data-ready="#/settings"]').waitFor({ timeout: T });
  assert.equal(await page.title(), "Hearth");
  // The worker stored the copies it just fetched in place of the old ones.
  await page.waitForFunction(
    async () => {
      const c = await caches.open("hearth-shell-v1");
      const page = await (await c.match("/")).text();
      const ui = await (await c.match("/app/ui.js")).text();
      return page.includes("<title>Hearth</title>") && !ui.includes("old module");
    },
    null,
    { timeout: T, polling: 100 },
  );
});

test("offline, the installed app still opens (the shell comes from the cache)", async () => {
  await page.context().setOffline(true);
  try {
    await page.reload();
    await page.locator("header.bar").waitFor({ timeout: T });
    assert.equal(await page.title(), "Hearth");
  } finally {
    await page.context().setOffline(false);
  }
});

test("Chromium finds the app installable from its manifest", async () => {
  // A normal (persistent) profile: in Playwright's default off-the-record
  // contexts Chromium stops at "in-incognito" before it checks the manifest.
  const profile = mkdtempSync(path.join(w.dir, "profile-"));
  const ctx = await chromium.launchPersistentContext(profile, { executablePath: process.env.CHROMIUM || "/usr/bin/chromium", headless: true, args: ["--no-sandbox"] });
  try {
    const p = ctx.pages()[0] || (await ctx.newPage());
    await p.goto(w.web);
    await p.getByRole("heading", { name: "Sign in to Hearth" }).waitFor({ timeout: T });
    await p.evaluate(() => navigator.serviceWorker.ready);
    const cdp = await ctx.newCDPSession(p);
    const manifest = await cdp.send("Page.getAppManifest");
    assert.deepEqual(manifest.errors, [], JSON.stringify(manifest.errors));
    const { installabilityErrors } = await cdp.send("Page.getInstallabilityErrors");
    assert.deepEqual(installabilityErrors, []);
  } finally {
    await ctx.close();
  }
});

test("no CSP violations or script errors", () => {
  assert.deepEqual(page.problems.filter((m) => /Content Security Policy|Refused to|Uncaught|TypeError|ReferenceError/.test(m)), []);
});
