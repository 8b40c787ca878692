// Starts a real cloud (with the loopback web listener), simulated devices
// and CLI controllers as processes on 127.0.0.1, and headless Chromium.

import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
export const root = path.resolve(here, "../..");
const binDir = process.env.HEARTH_BIN_DIR || path.join(root, "target", "debug");
export const HEARTH = path.join(binDir, "hearth");
export const DEVICE = path.join(binDir, "hearth-device");
export const PASSWORD = "correct horse battery staple";
export const ARTIFACTS = process.env.HEARTH_WEB_ARTIFACTS || path.join(root, "artifacts", "web");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

const children = [];
process.on("exit", () => {
  for (const c of children) {
    try {
      c.kill("SIGKILL");
    } catch {
      // Already gone.
    }
  }
});

// Spawns a process and resolves with it once a stdout line matches `ready`.
export function start(name, cmd, args, ready, env = {}, timeoutMs = 30000) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
    children.push(child);
    child.lines = [];
    let buf = "";
    let err = "";
    const timer = setTimeout(() => reject(new Error(`${name}: not ready within ${timeoutMs} ms\n${err}`)), timeoutMs);
    // `ready` sees stdout and stderr (log) lines alike.
    const check = (line) => {
      if (ready && ready(line, child)) {
        clearTimeout(timer);
        ready = null;
        resolve(child);
      }
    };
    let errBuf = "";
    child.stderr.on("data", (d) => {
      err += d;
      if (err.length > 20000) err = err.slice(-20000);
      errBuf += d;
      let i;
      while ((i = errBuf.indexOf("\n")) >= 0) {
        check(errBuf.slice(0, i));
        errBuf = errBuf.slice(i + 1);
      }
    });
    child.stdout.on("data", (d) => {
      buf += d;
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        child.lines.push(line);
        check(line);
      }
    });
    child.on("exit", (code) => {
      if (ready) {
        clearTimeout(timer);
        reject(new Error(`${name} exited (${code}) before it was ready\n${err}`));
      }
    });
  });
}

export function hearth(args, env = {}) {
  return execFileSync(HEARTH, args, { env: { ...process.env, ...env }, encoding: "utf8", timeout: 60000, stdio: ["ignore", "pipe", "pipe"] });
}

// A CLI run that may fail: {status, stdout, stderr}.
export function hearthTry(args, env = {}) {
  try {
    return { status: 0, stdout: hearth(args, env), stderr: "" };
  } catch (e) {
    return { status: e.status, stdout: String(e.stdout || ""), stderr: String(e.stderr || "") };
  }
}

// A cloud with a fresh PKI and database, and the given devices running.
// If any part fails to start, everything started so far is stopped, so a
// failed setup ends the test run instead of leaving it waiting on children.
// `opts.setup(dir)` may return extra `cloud serve` arguments; `opts.beforeRun(device)`
// runs after a device is provisioned and before it starts.
export async function world(kinds, opts = {}) {
  try {
    return await startWorld(kinds, opts);
  } catch (e) {
    for (const c of children) c.kill("SIGKILL");
    throw e;
  }
}

async function startWorld(kinds, opts) {
  for (const bin of [HEARTH, DEVICE]) {
    if (!existsSync(bin)) throw new Error(`${bin} is missing: cargo build -p hearth -p hearth-device`);
  }
  const dir = mkdtempSync(path.join(tmpdir(), "hearth-web-"));
  const pki = path.join(dir, "pki");
  hearth(["pki", "init", "--dir", pki]);
  const extra = opts.setup ? opts.setup(dir) : [];
  let api, devices, web;
  const cloud = await start(
    "cloud",
    HEARTH,
    ["cloud", "serve", "--pki", pki, "--data-dir", path.join(dir, "cloud"), "--api-listen", "127.0.0.1:0", "--device-listen", "127.0.0.1:0", "--web-listen", "127.0.0.1:0", ...extra],
    (line) => {
      let m = /^hearth cloud: api https:\/\/(\S+) devices (\S+)/.exec(line);
      if (m) [, api, devices] = m;
      m = /^hearth cloud: web app (http:\/\/\S+\/)/.exec(line);
      if (m) web = m[1];
      return Boolean(web);
    },
  );
  const devs = {};
  for (const [name, kind] of kinds) {
    const stateDir = path.join(dir, "devices", name);
    const out = hearth(["device", "provision", "--pki", pki, "--state-dir", stateDir, "--kind", kind, "--cloud", devices]);
    const id = /^Provisioned \S+ ([0-9a-f]{24}) /m.exec(out)[1];
    const code = /^Setup code: (\S+)/m.exec(out)[1];
    if (opts.beforeRun) opts.beforeRun({ name, stateDir, api: `https://${api}` });
    // Ready once its link is up (the log line), so pairing never races the first connection.
    const proc = await start(name, DEVICE, ["run", "--state-dir", stateDir, "--cloud", devices], (l) => l.includes("connected to the cloud"), { RUST_LOG: "info" });
    devs[name] = { id, code, qr: `HEARTH:1:${id}:${code.replace(/-/g, "")}`, proc, stateDir };
  }
  return {
    dir,
    pki,
    api: `https://${api}`,
    web,
    cloud,
    devices: devs,
    cleanup() {
      for (const c of children) c.kill("SIGKILL");
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

// A CLI controller with its own config directory, signed up on `w`.
export function cli(w, name, email) {
  const env = { HEARTH_CONFIG_DIR: path.join(w.dir, name), HEARTH_PASSWORD: PASSWORD };
  hearth(["signup", "--cloud", w.api, "--ca", path.join(w.pki, "cloud-ca.pem"), "--manufacturer-ca", path.join(w.pki, "manufacturer-ca.pem"), "--email", email], env);
  return {
    env,
    run: (args) => hearth(args, env),
    try: (args) => hearthTry(args, env),
  };
}

export async function browser() {
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-sandbox"] });
}

// A phone-sized page that fails the test on any CSP violation or page error.
export async function phone(b) {
  const context = await b.newContext({ viewport: { width: 375, height: 812 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true });
  const page = await context.newPage();
  page.problems = [];
  page.on("console", (m) => {
    if (m.type() === "error") page.problems.push(m.text());
  });
  page.on("pageerror", (e) => page.problems.push(String(e)));
  return page;
}

export async function screenshot(page, name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), fullPage: true });
}
