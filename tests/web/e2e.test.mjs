// The phone web app end to end, in headless Chromium at 375×812, against a
// real cloud and simulated devices on 127.0.0.1: sign up, pair, switch,
// another controller (the CLI) sees it, pushed motion events, energy,
// schedules visible from the CLI, and a member who may switch but not share.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import { world, browser, phone, cli, screenshot, hearth } from "./harness.mjs";

let w, b, owner, laptop;
const T = 20000;

before(async () => {
  w = await world([
    ["plug", "plug"],
    ["heater", "energy-plug"],
    ["hall", "motion-sensor"],
    ["desk", "dimmer"],
  ]);
  b = await browser();
  owner = await phone(b);
  laptop = cli(w, "laptop", "laptop@example.com");
});

after(async () => {
  if (b) await b.close();
  if (w) w.cleanup();
});

const tileState = (page, id) => page.locator(`[data-state="${id}"]`).first();

async function signup(page, email) {
  await page.goto(w.web);
  await page.getByLabel("Email").fill(email);
  await page.getByLabel("Password").fill("correct horse battery staple");
  await page.getByRole("button", { name: "Sign up" }).click();
  await page.getByRole("heading", { name: "Home" }).waitFor({ timeout: T });
}

async function pair(page, code, name, room) {
  await page.getByRole("link", { name: "Add device" }).click();
  await page.getByLabel("Setup code or label payload").fill(code);
  await page.getByLabel("Name").fill(name);
  await page.getByLabel("Room").fill(room);
  await page.getByRole("button", { name: "Pair" }).click();
  try {
    await page.getByRole("heading", { name }).waitFor({ timeout: T });
  } catch (e) {
    throw new Error(`pairing ${name} did not finish; the app says: ${await page.locator("#flash").innerText()}`);
  }
}

// Waits for the message line to say something matching `re`; on timeout
// the assertion shows what it said instead.
async function expectFlash(page, re) {
  try {
    await page.locator("[data-flash]", { hasText: re }).waitFor({ timeout: T });
  } catch {
    assert.match(await page.locator("#flash").innerText(), re);
  }
}

test("sign up and pair a plug, an energy plug (QR payload) and a motion sensor", async () => {
  await owner.goto(w.web);
  await owner.getByRole("heading", { name: "Sign in to Hearth" }).waitFor();
  await screenshot(owner, "01-login");
  await signup(owner, "owner@example.com");
  await pair(owner, w.devices.plug.code, "Lamp", "Living room");
  await pair(owner, w.devices.heater.qr, "Heater", "Office");
  await pair(owner, w.devices.hall.code, "Hall sensor", "Hall");
  await pair(owner, w.devices.desk.code, "Desk light", "Office");
  await owner.getByRole("link", { name: "Home" }).click();
  for (const name of ["Lamp", "Heater", "Hall sensor", "Desk light"]) await owner.getByRole("link", { name }).waitFor({ timeout: T });
  for (const room of ["Living room", "Office", "Hall"]) await owner.getByRole("heading", { name: room, exact: true }).waitFor();
  assert.equal(await owner.locator("article.tile").count(), 4);
  assert.equal(await tileState(owner, w.devices.plug.id).innerText(), "Off");
  await screenshot(owner, "02-home");
  await owner.setViewportSize({ width: 1280, height: 800 });
  await screenshot(owner, "02-home-desktop");
  await owner.setViewportSize({ width: 375, height: 812 });
});

test("the CLI, shared in from the web app, sees the state the web app switched", async () => {
  const code = /share code: (\S+)/.exec(laptop.run(["key"]))[1];
  await owner.getByRole("link", { name: "Lamp" }).click();
  await owner.getByLabel("The other person's share code").fill(code);
  await owner.getByLabel("Role").selectOption("member");
  await owner.getByRole("button", { name: "Share", exact: true }).click();
  await expectFlash(owner, /Shared Lamp as member \(the device confirmed, signed\)/);
  const laptopId = /controller: ([0-9a-f]{32})/.exec(laptop.run(["key"]))[1];
  await owner.locator(`[data-access] li[data-controller="${laptopId}"]`).waitFor({ timeout: T });
  assert.match(await owner.locator(`[data-access] li[data-controller="${laptopId}"]`).innerText(), /member/);

  await owner.getByRole("link", { name: "Home" }).click();
  const sw = owner.getByRole("button", { name: "Lamp power" });
  assert.equal(await sw.getAttribute("aria-pressed"), "false");
  await sw.click();
  await owner.waitForFunction((id) => document.querySelector(`[data-state="${id}"]`)?.textContent === "On", w.devices.plug.id, { timeout: T });
  assert.equal(await owner.getByRole("button", { name: "Lamp power" }).getAttribute("aria-pressed"), "true");
  // The CLI decrypts and verifies the device's own report (which reaches
  // the cloud just after the answer the web app shows, so allow a moment).
  let status = "";
  for (const deadline = Date.now() + T; Date.now() < deadline; await new Promise((r) => setTimeout(r, 200))) {
    status = laptop.run(["status", w.devices.plug.id]);
    if (/: ON \(online\)/.test(status)) break;
  }
  assert.match(status, /: ON \(online\)/, status);
});

test("state changed elsewhere is pushed to the web app over the live link", async () => {
  const out = laptop.run(["off", w.devices.plug.id]);
  assert.match(out, /is off \(signed by the device/);
  await owner.waitForFunction((id) => document.querySelector(`[data-state="${id}"]`)?.textContent === "Off", w.devices.plug.id, { timeout: T });
});

test("the switch works from the keyboard alone", async () => {
  await owner.locator("body").click({ position: { x: 5, y: 400 } });
  let reached = false;
  for (let i = 0; i < 40 && !reached; i++) {
    await owner.keyboard.press("Tab");
    reached = await owner.evaluate(() => document.activeElement?.getAttribute("aria-label") === "Lamp power");
  }
  assert.ok(reached, "Tab never reached the Lamp's switch");
  await owner.keyboard.press("Space");
  await owner.waitForFunction((id) => document.querySelector(`[data-state="${id}"]`)?.textContent === "On", w.devices.plug.id, { timeout: T });
  await owner.getByRole("button", { name: "Lamp power" }).focus();
  await owner.keyboard.press("Enter");
  await owner.waitForFunction((id) => document.querySelector(`[data-state="${id}"]`)?.textContent === "Off", w.devices.plug.id, { timeout: T });
});

test("a motion event appears in the sensor's timeline as it happens", async () => {
  await owner.getByRole("link", { name: "Hall sensor" }).click();
  await owner.getByRole("heading", { name: "Motion timeline" }).waitFor({ timeout: T });
  const before = await owner.locator("[data-timeline] li").count();
  w.devices.hall.proc.kill("SIGUSR2");
  // A sensor may report on a fixed cadence (30 s by default, ADR 0011), so allow for one period.
  await owner.waitForFunction((n) => document.querySelectorAll("[data-timeline] li").length > n, before, { timeout: 45000 });
  assert.match(await owner.locator("[data-timeline] li").first().innerText(), /Motion/);
  await screenshot(owner, "03-motion");
});

test("the energy plug shows power now, today's energy and a chart", async () => {
  await owner.getByRole("link", { name: "Home" }).click();
  await owner.getByRole("link", { name: "Heater" }).click();
  await owner.getByRole("heading", { name: "Energy" }).waitFor({ timeout: T });
  const power = (re) =>
    owner.waitForFunction(([id, src]) => new RegExp(src).test(document.querySelector(`[data-power="${id}"]`)?.textContent || ""), [w.devices.heater.id, re.source], { timeout: T });
  // On, off and on again: three signed power readings in the history.
  for (const want of [/^[1-9][0-9.]* W$/, /^0\.0 W$/, /^[1-9][0-9.]* W$/]) {
    await owner.getByRole("button", { name: "Heater power" }).click();
    await power(want);
  }
  // Reload: the chart and today's energy come from the decrypted history
  // (and the device's own meter, where it reports one).
  await owner.reload();
  await owner.locator('svg[data-chart="power"]').waitFor({ timeout: T });
  const d = await owner.locator('svg[data-chart="power"] path.line').getAttribute("d");
  assert.ok((d.match(/V/g) || []).length >= 3, `a step line through the readings: ${d}`);
  assert.match(await owner.locator(`[data-kwh="${w.devices.heater.id}"]`).innerText(), /^\d+\.\d{3} kWh$/);
  assert.match(await owner.locator(`[data-power="${w.devices.heater.id}"]`).innerText(), /^[1-9][0-9.]* W$/);
  if (await owner.getByText("From the device's own energy meter").count()) {
    await owner.locator('svg[data-chart="days"] rect.bar').first().waitFor({ state: "attached", timeout: T });
  }
  await screenshot(owner, "04-energy");
});

test("a switch the safety interlock refuses says so", async () => {
  // Six switches a minute by default (hearth-rules safety.rs); the heater was switched three times above.
  const sw = owner.getByRole("button", { name: "Heater power" });
  let refused = false;
  for (let i = 0; i < 10 && !refused; i++) {
    await sw.click();
    await owner.waitForFunction(() => !document.querySelector("[aria-busy]"), null, { timeout: T });
    refused = (await owner.locator("#flash").innerText()).includes("refused");
  }
  await expectFlash(owner, /Heater refused: safety interlock: too many switches, try again in \d+ s/);
  await screenshot(owner, "04b-interlock");
});

test("a read-only grant from the share form: the CLI sees the heater but cannot switch it", async () => {
  const code = /share code: (\S+)/.exec(laptop.run(["key"]))[1];
  await owner.getByLabel("The other person's share code").fill(code);
  await owner.getByLabel("Read only (may see, may not switch)").check();
  await owner.getByLabel("Access ends after this many days").fill("7");
  await owner.getByRole("button", { name: "Share", exact: true }).click();
  await expectFlash(owner, /Shared Heater as member \(the device confirmed, signed\)/);
  const laptopId = /controller: ([0-9a-f]{32})/.exec(laptop.run(["key"]))[1];
  const row = owner.locator(`[data-access] li[data-controller="${laptopId}"]`);
  await row.waitFor({ timeout: T });
  assert.match(await row.innerText(), /member \(read-only, until /);
  // It may read from the device (the access list, signed and sealed to it)...
  const access = laptop.run(["access", w.devices.heater.id]);
  assert.match(access, new RegExp(`${laptopId}\\s+member .*read-only.*\\(this controller\\)`), access);
  // ...but not switch it.
  const on = laptop.try(["on", w.devices.heater.id]);
  assert.equal(on.status, 3, on.stdout + on.stderr);
  assert.match(on.stderr, /refused: this controller's role does not allow that/);
});

test("a schedule created in the web app is on the device, as the CLI reads it", async () => {
  await owner.getByRole("link", { name: "Home" }).click();
  await owner.getByRole("link", { name: "Lamp" }).click();
  await owner.getByRole("button", { name: "Load schedules" }).click();
  await owner.getByText(/Rule set version \d+/).waitFor({ timeout: T });
  await owner.getByLabel("Name", { exact: true }).fill("wake up");
  await owner.getByLabel("Time", { exact: true }).fill("06:30");
  await owner.getByLabel("Action", { exact: true }).selectOption("on");
  await owner.getByRole("button", { name: "Add schedule" }).click();
  await expectFlash(owner, /Added schedule wake up/);
  await owner.locator("[data-rules] li", { hasText: "wake up" }).waitFor({ timeout: T });
  await screenshot(owner, "05-schedules");
  const rules = JSON.parse(laptop.run(["rules", w.devices.plug.id]));
  const rule = rules.rules.find((r) => r.name === "wake up");
  assert.ok(rule, JSON.stringify(rules));
  assert.deepEqual(rule.kind.schedule.at, { clock: "06:30" });
  assert.equal(rule.kind.schedule.action, "on");
  assert.equal(rule.kind.schedule.days.length, 7);

  await owner.getByLabel("Switch off this many minutes after it goes on").fill("45");
  await owner.getByRole("button", { name: "Set timer" }).click();
  await expectFlash(owner, /Timer set: off 45 min after switching on/);
  const after = JSON.parse(laptop.run(["rules", w.devices.plug.id]));
  assert.deepEqual(after.rules.filter((r) => r.kind.countdown).map((r) => r.kind.countdown.off_after_secs), [2700]);
  assert.ok(after.rules.some((r) => r.name === "wake up"), "the schedule is still there");

  await owner.getByLabel("Window starts").fill("20:00");
  await owner.getByLabel("Window ends").fill("00:30");
  await owner.getByLabel("Longest on-period (minutes)").fill("60");
  await owner.getByRole("button", { name: "Add away mode" }).click();
  await expectFlash(owner, /Away mode set: 20:00–00:30/);
  await owner.locator("[data-rules] li", { hasText: "away mode 20:00–00:30" }).waitFor({ timeout: T });
  const away = JSON.parse(laptop.run(["rules", w.devices.plug.id])).rules.find((r) => r.kind.away);
  assert.ok(away, "the away rule is on the device");
  assert.deepEqual([away.kind.away.start, away.kind.away.end, away.kind.away.min_on_mins, away.kind.away.max_on_mins], [{ clock: "20:00" }, { clock: "00:30" }, 30, 60]);
  assert.ok(Number.isSafeInteger(away.kind.away.seed) && away.kind.away.seed > 0);
});

test("a dimmer's brightness is set with the slider and confirmed by the device", async () => {
  await owner.getByRole("link", { name: "Home" }).click();
  await owner.locator('main[data-ready="#/home"]').waitFor({ timeout: T });
  await owner.getByLabel("Desk light brightness").fill("40");
  await owner.waitForFunction((id) => /^On · 40 %$/.test(document.querySelector(`[data-state="${id}"]`)?.textContent || ""), w.devices.desk.id, { timeout: T });
  assert.equal(await owner.getByLabel("Desk light brightness").inputValue(), "40");
  await screenshot(owner, "05b-dimmer");
});

test("a motion rule made in the web app: the CLI reads it from the sensor, and a walk-past switches the light on", async () => {
  // The desk light is on at 40 % from the test above: off first.
  await owner.getByRole("button", { name: "Desk light power" }).click();
  await owner.waitForFunction((id) => /^Off/.test(document.querySelector(`[data-state="${id}"]`)?.textContent || ""), w.devices.desk.id, { timeout: T });
  await owner.getByRole("link", { name: "Hall sensor" }).click();
  await owner.locator(`main[data-ready="#/device/${w.devices.hall.id}"]`).waitFor({ timeout: T });
  await owner.getByLabel("Device to switch on").selectOption({ label: "Desk light" });
  await owner.getByLabel("Switch off after this many seconds without motion").fill("60");
  // No LAN address in this test: the sensor may only use its cloud link, which the owner allows here.
  await owner.getByLabel(/Allow the cloud path/).check();
  await owner.getByRole("button", { name: "Add motion rule" }).click();
  await expectFlash(owner, /Added motion: Desk light: Hall sensor may switch Desk light on and off, nothing else/);
  await owner.locator("[data-motion-rules] li", { hasText: "motion switches Desk light on, off after 1 min without motion (the cloud link)" }).waitFor({ timeout: T });
  await screenshot(owner, "05c-motion-rule");

  // The CLI, given read access to the sensor from the web app, reads the rule back from the device.
  const code = /share code: (\S+)/.exec(laptop.run(["key"]))[1];
  await owner.getByLabel("The other person's share code").fill(code);
  await owner.getByLabel("Role").selectOption("member");
  await owner.getByRole("button", { name: "Share", exact: true }).click();
  await expectFlash(owner, /Shared Hall sensor as member/);
  const rules = JSON.parse(laptop.run(["rules", w.devices.hall.id]));
  const motion = rules.rules.filter((r) => r.kind.motion);
  assert.equal(motion.length, 1, JSON.stringify(rules));
  assert.equal(motion[0].name, "motion: Desk light");
  assert.equal(motion[0].enabled, true);
  const m = motion[0].kind.motion;
  assert.deepEqual([m.sensor, m.off_after_secs, m.when, m.target.device, m.target.allow_cloud, m.target.lan], [w.devices.hall.id, 60, "always", w.devices.desk.id, true, undefined]);
  assert.match(m.target.key, /^[A-Za-z0-9_-]{87}$/, "the desk light's SEC1 key, base64url");

  // A walk-past: the sensor signs the switch with its own key and the
  // light's access list (the switch-only grant) lets it; the web app sees it pushed.
  await owner.getByRole("link", { name: "Home" }).click();
  await owner.locator('main[data-ready="#/home"]').waitFor({ timeout: T });
  w.devices.hall.proc.kill("SIGUSR2");
  await owner.waitForFunction((id) => /^On/.test(document.querySelector(`[data-state="${id}"]`)?.textContent || ""), w.devices.desk.id, { timeout: T });
});

test("a member invited from the web app can switch but not share", async () => {
  const member = await phone(b);
  await signup(member, "member@example.com");
  await member.getByRole("link", { name: "Settings" }).click();
  const code = (await member.locator("[data-share-code]").inputValue()).trim();
  assert.match(code, /^hearth-controller:1:/);

  await owner.getByRole("link", { name: "Lamp", exact: true }).click();
  await owner.locator(`main[data-ready="#/device/${w.devices.plug.id}"]`).waitFor({ timeout: T });
  await owner.getByLabel("The other person's share code").fill(code);
  await owner.getByLabel("Role").selectOption("member");
  await owner.getByRole("button", { name: "Share", exact: true }).click();
  await expectFlash(owner, /Shared Lamp as member/);

  await member.getByRole("link", { name: "Home" }).click();
  await member.getByRole("link", { name: "Lamp" }).waitFor({ timeout: T });
  assert.match(await member.locator("article.tile").innerText(), /shared with you/);
  await member.getByRole("button", { name: "Lamp power" }).click();
  await member.waitForFunction((id) => document.querySelector(`[data-state="${id}"]`)?.textContent === "On", w.devices.plug.id, { timeout: T });
  // The owner's screen follows, pushed.
  await owner.waitForFunction((id) => document.querySelector(`[data-state="${id}"]`)?.textContent === "On", w.devices.plug.id, { timeout: T });
  await screenshot(member, "06-member-home");

  await member.getByRole("link", { name: "Lamp" }).click();
  const laptopCode = /share code: (\S+)/.exec(laptop.run(["key"]))[1];
  await member.getByLabel("The other person's share code").fill(laptopCode);
  await member.getByRole("button", { name: "Share", exact: true }).click();
  await expectFlash(member, /Lamp refused: not allowed/);
  await screenshot(member, "07-member-refused");

  // The owner revokes the member: from then on the device refuses it (and
  // the cloud no longer routes for its account).
  const memberId = (await member.evaluate(async () => (await (await import("/app/controller.js")).getIdentity()).controller));
  await owner.getByRole("button", { name: "Who has access" }).click();
  const row = owner.locator(`[data-access] li[data-controller="${memberId}"]`);
  await row.waitFor({ timeout: T });
  await row.getByRole("button", { name: /Revoke/ }).click();
  await expectFlash(owner, /Revoked \(the device confirmed, signed\)/);
  await row.waitFor({ state: "detached", timeout: T });
  await member.getByRole("link", { name: "Home" }).click();
  await member.locator('main[data-ready="#/home"]').waitFor({ timeout: T });
  const stillListed = await member.getByRole("button", { name: "Lamp power" }).count();
  if (stillListed) {
    await member.getByRole("button", { name: "Lamp power" }).click();
    await expectFlash(member, /not paired|not on this account/i);
  } else {
    await member.getByText("No devices yet").waitFor({ timeout: T });
  }
  assert.deepEqual(member.problems.filter(csp), []);
});

test("an offline device is shown offline and cannot be switched", async () => {
  await owner.getByRole("link", { name: "Home" }).click();
  await owner.locator('main[data-ready="#/home"]').waitFor({ timeout: T });
  w.devices.plug.proc.kill("SIGTERM");
  await owner.waitForFunction((id) => document.querySelector(`[data-online="${id}"]`)?.textContent === "offline", w.devices.plug.id, { timeout: T });
  assert.equal(await owner.getByRole("button", { name: "Lamp power" }).isDisabled(), true);
  await screenshot(owner, "08-offline");
});

test("the account's controllers: rename this browser, remove another", async () => {
  // The owner also logs in from a CLI: a second controller on the account.
  const env = { HEARTH_CONFIG_DIR: path.join(w.dir, "owner-cli"), HEARTH_PASSWORD: "correct horse battery staple" };
  hearth(["login", "--cloud", w.api, "--ca", path.join(w.pki, "cloud-ca.pem"), "--email", "owner@example.com"], env);
  const cliId = /controller: ([0-9a-f]{32})/.exec(hearth(["key"], env))[1];
  const me = await owner.evaluate(async () => (await (await import("/app/controller.js")).getIdentity()).controller);
  await owner.getByRole("link", { name: "Settings" }).click();
  await owner.locator('main[data-ready="#/settings"]').waitFor({ timeout: T });
  const rows = owner.locator("[data-controllers] li");
  assert.equal(await rows.count(), 2);
  const mine = owner.locator(`[data-controllers] li[data-controller="${me}"]`);
  assert.match(await mine.innerText(), /this browser/);
  await mine.getByRole("textbox").fill("Owner's phone");
  await mine.getByRole("button", { name: "Rename" }).click();
  await expectFlash(owner, /Renamed to Owner's phone/);
  assert.equal(await owner.locator(`[data-controllers] li[data-controller="${me}"]`).getByRole("textbox").inputValue(), "Owner's phone");
  await owner.locator(`[data-controllers] li[data-controller="${cliId}"]`).getByRole("button", { name: /Remove/ }).click();
  await expectFlash(owner, /Removed .* from this account/);
  await owner.locator(`[data-controllers] li[data-controller="${cliId}"]`).waitFor({ state: "detached", timeout: T });
  assert.equal(await owner.locator("[data-controllers] li").count(), 1);
});

test("change the password, log in with the new one, log out", async () => {
  await screenshot(owner, "09-settings");
  await owner.getByLabel("Current password").fill("correct horse battery staple");
  await owner.getByLabel("New password (8 characters or more)").fill("a new horse battery staple");
  await owner.getByRole("button", { name: "Change password" }).click();
  await owner.getByRole("heading", { name: "Sign in to Hearth" }).waitFor({ timeout: T });
  await expectFlash(owner, /Password changed/);
  await owner.getByLabel("Email").fill("owner@example.com");
  await owner.getByLabel("Password").fill("correct horse battery staple");
  await owner.getByRole("button", { name: "Log in" }).click();
  await expectFlash(owner, /wrong email or password/);
  await owner.getByLabel("Password").fill("a new horse battery staple");
  await owner.getByRole("button", { name: "Log in" }).click();
  await owner.getByRole("heading", { name: "Home" }).waitFor({ timeout: T });
  await owner.getByRole("link", { name: "Settings" }).click();
  await owner.getByRole("button", { name: "Log out" }).click();
  await owner.getByRole("heading", { name: "Sign in to Hearth" }).waitFor({ timeout: T });
});

const csp = (m) => /Content Security Policy|Refused to|Uncaught|TypeError|ReferenceError/.test(m);

test("no CSP violations or script errors on the owner's pages", () => {
  assert.deepEqual(owner.problems.filter(csp), []);
});
