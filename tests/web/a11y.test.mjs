// Accessibility of the main screens with axe-core (WCAG 2 A/AA rules) at
// phone size: no serious or critical violations (missing labels, names,
// contrast, landmarks...). axe runs through the DevTools protocol, so the
// app's CSP (no inline script) stays on.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { world, browser, phone } from "./harness.mjs";

const T = 20000;
const axeSource = readFileSync(createRequire(import.meta.url).resolve("axe-core/axe.min.js"), "utf8");
let w, b, page;

before(async () => {
  w = await world([
    ["plug", "plug"],
    ["heater", "energy-plug"],
    ["hall", "motion-sensor"],
  ]);
  b = await browser();
  page = await phone(b);
});

after(async () => {
  if (b) await b.close();
  if (w) w.cleanup();
});

async function audit(name) {
  const result = await page.evaluate(`${axeSource}; axe.run(document, { runOnly: ["wcag2a", "wcag2aa"] }).then((r) => r.violations.map((v) => ({ id: v.id, impact: v.impact, nodes: v.nodes.map((n) => n.target.join(" ")).slice(0, 3) })))`);
  assert.ok(Array.isArray(result), "axe ran");
  const bad = result.filter((v) => v.impact === "serious" || v.impact === "critical");
  assert.deepEqual(bad, [], `${name}: ${JSON.stringify(bad, null, 1)}`);
}

test("login, home, add device, device and settings screens have no serious accessibility violations", async () => {
  await page.goto(w.web);
  await page.getByRole("heading", { name: "Sign in to Hearth" }).waitFor({ timeout: T });
  await audit("login");
  await page.getByLabel("Email").fill("a11y@example.com");
  await page.getByLabel("Password").fill("correct horse battery staple");
  await page.getByRole("button", { name: "Sign up" }).click();
  await page.locator('main[data-ready="#/home"]').waitFor({ timeout: T });
  await page.getByRole("link", { name: "Add device" }).click();
  await page.locator('main[data-ready="#/add"]').waitFor({ timeout: T });
  await audit("add device");
  for (const [dev, name] of [[w.devices.plug, "Lamp"], [w.devices.hall, "Hall"], [w.devices.heater, "Heater"]]) {
    await page.getByRole("link", { name: "Add device" }).click();
    await page.getByLabel("Setup code or label payload").fill(dev.code);
    await page.getByLabel("Name").fill(name);
    await page.getByLabel("Room").fill("Kitchen");
    await page.getByRole("button", { name: "Pair" }).click();
    await page.locator(`main[data-ready="#/device/${dev.id}"]`).waitFor({ timeout: T });
    // The sensor's page, with its timeline and the motion-rule form.
    if (dev === w.devices.hall) await audit("motion sensor page");
  }
  await audit("energy plug page");
  await page.getByRole("link", { name: "Home" }).click();
  await page.locator('main[data-ready="#/home"]').waitFor({ timeout: T });
  await audit("home");
  await page.getByRole("link", { name: "Settings" }).click();
  await page.locator('main[data-ready="#/settings"]').waitFor({ timeout: T });
  await audit("settings");
});
