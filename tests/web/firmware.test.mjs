// The firmware section of the web app against a real update client: the
// device's signed status, the owner's policy, a check that finds a new
// release in the cloud's TUF repository, and the approval.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import path from "node:path";
import { world, browser, phone, hearth, screenshot, DEVICE } from "./harness.mjs";
import { execFileSync } from "node:child_process";

const T = 20000;
const MODEL = "web-test-plug";
let w, b, page, repo, keys;

before(async () => {
  w = await world([["plug", "plug"]], {
    setup(dir) {
      repo = path.join(dir, "repo");
      keys = Object.fromEntries(["root", "targets", "snapshot", "timestamp"].map((k) => [k, path.join(dir, `${k}.key`)]));
      for (const k of Object.values(keys)) hearth(["fw", "keygen", "--out", k]);
      hearth(["fw", "init", "--repo", repo, "--root-key", keys.root, "--targets-key", keys.targets, "--snapshot-key", keys.snapshot, "--timestamp-key", keys.timestamp]);
      return ["--tuf-repo", repo];
    },
    beforeRun({ stateDir, api }) {
      const port = api.split(":").pop();
      execFileSync(DEVICE, ["enable-updates", "--state-dir", stateDir, "--root", path.join(repo, "metadata", "1.root.json"), "--repository", `https://localhost:${port}/tuf`, "--hardware-model", MODEL, "--check-every", "3600", "--factory-version", "1.0.0"], { stdio: "pipe" });
    },
  });
  b = await browser();
  page = await phone(b);
});

after(async () => {
  if (b) await b.close();
  if (w) w.cleanup();
});

const firmwareText = () => page.locator("[data-firmware]").innerText();

test("firmware: status, approval policy, an offered release approved from the app", async () => {
  await page.goto(w.web);
  await page.getByLabel("Email").fill("fw@example.com");
  await page.getByLabel("Password").fill("correct horse battery staple");
  await page.getByRole("button", { name: "Sign up" }).click();
  await page.getByRole("heading", { name: "Home" }).waitFor({ timeout: T });
  await page.getByRole("link", { name: "Add device" }).click();
  await page.getByLabel("Setup code or label payload").fill(w.devices.plug.code);
  await page.getByLabel("Name").fill("Lamp");
  await page.getByRole("button", { name: "Pair" }).click();
  await page.getByRole("heading", { name: "Lamp" }).waitFor({ timeout: T });
  await page.locator("[data-firmware]").waitFor({ timeout: T });
  // The running agent reports its own version (the supervisor is not used here).
  assert.match(await firmwareText(), /Version\s*\d+\.\d+\.\d+/);

  await page.getByLabel("Install updates").selectOption("approval");
  await page.locator("[data-flash]", { hasText: "Update policy: after my approval (the device confirmed)." }).waitFor({ timeout: T });

  // The vendor releases 2.0.0 (offline targets key, then the online keys).
  const image = path.join(w.dir, "fw-2.0.0.bin");
  writeFileSync(image, "HEARTH-TEST-FIRMWARE 2.0.0\n");
  hearth(["fw", "add-target", "--repo", repo, "--file", image, "--name", `${MODEL}/hearth-device-2.0.0`, "--fw-version", "2.0.0", "--hardware-model", MODEL, "--targets-key", keys.targets]);
  hearth(["fw", "publish", "--repo", repo, "--snapshot-key", keys.snapshot, "--timestamp-key", keys.timestamp]);

  await page.getByRole("button", { name: "Check for updates" }).click();
  const approve = page.getByRole("button", { name: "Approve 2.0.0" });
  try {
    await approve.waitFor({ timeout: T });
  } catch {
    assert.fail(`no approval offered; the firmware section says: ${await firmwareText()}`);
  }
  assert.match(await firmwareText(), /awaiting approval \(2\.0\.0\)/);
  await screenshot(page, "10-firmware-offered");
  await approve.click();
  await page.locator("[data-flash]", { hasText: "Approved 2.0.0" }).waitFor({ timeout: T });
  // From here the device verifies and installs on its own; its signed
  // status moves on from the offer.
  await page.waitForFunction(() => !/awaiting approval/.test(document.querySelector("[data-firmware]")?.textContent || ""), null, { timeout: T });
});
