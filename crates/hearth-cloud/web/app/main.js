// The app's screens and the live link. Routing is by the URL hash, so the
// cloud serves one page and the browser's back button works.

import * as api from "./api.js";
import * as ctl from "./controller.js";
import { h, s, mount, flash, clearFlash, busy, field } from "./ui.js";
import { fromB64url } from "./bytes.js";

// id → device (as listed, with its verified state); refreshed on every
// screen change and kept current by the live link.
const devices = new Map();
let screenUpdate = null;

// ---- live link: pushed state, no polling ----

let ws = null;
let backoff = 500;
function connectLink() {
  if (!api.loggedIn() || ws) return;
  const sock = new WebSocket(api.linkUrl());
  ws = sock;
  sock.addEventListener("open", () => {
    backoff = 500;
    document.body.dataset.link = "up";
  });
  sock.addEventListener("message", (ev) => onPush(ev.data));
  sock.addEventListener("close", () => {
    ws = null;
    document.body.dataset.link = "down";
    if (api.loggedIn()) {
      // Reconnect with a capped backoff; first check the session with one
      // call, so an ended session (logged out elsewhere, password changed)
      // goes to the login screen instead of retrying forever.
      setTimeout(async () => {
        try {
          await api.call("GET", "/api/v1/devices");
        } catch {
          // A 401 logs out (api.js); anything else: the cloud is restarting, retry.
        }
        connectLink();
      }, backoff);
      backoff = Math.min(backoff * 2, 10000);
    }
  });
}

function closeLink() {
  if (ws) ws.close();
  ws = null;
}

async function onPush(text) {
  let push;
  try {
    push = JSON.parse(text);
  } catch {
    return;
  }
  const dev = devices.get(push.device);
  if (!dev) {
    // A device this screen does not know yet (just shared with us): reload the list.
    if (push.type === "state" || push.type === "presence") {
      await refresh();
      if (screenUpdate) screenUpdate({ id: push.device });
    }
    return;
  }
  if (push.type === "presence") {
    dev.online = push.online;
    presence.set(push.device, { online: push.online, at: performance.now() });
  } else if (push.type === "state") {
    if (!dev.verifyKey) return;
    let st;
    try {
      st = await ctl.openState(dev, fromB64url(push.envelope));
    } catch (e) {
      // A report that fails verification is flagged, never shown as state.
      flash(`${dev.name}: a state report failed verification (${ctl.describeOpenError(e)}); ignored.`, "error");
      return;
    }
    // An older report delivered late (or replayed by the cloud) must not
    // overwrite newer state.
    if (dev.seq !== undefined && st.seq <= dev.seq) return;
    dev.seq = st.seq;
    dev.at = st.at;
    dev.state = st.state;
    dev.problem = null;
    dev.live = dev.live || [];
    dev.live.push(st);
  } else if (push.type === "undeliverable") {
    flash(`${dev.name}: ${push.message}`, "error");
    return;
  } else return;
  if (screenUpdate) screenUpdate(dev);
}

// The last presence push per device, so a listing fetched before it
// cannot bring back a stale online/offline.
const presence = new Map();

async function refresh() {
  const started = performance.now();
  const list = await ctl.list();
  for (const d of list) {
    const p = presence.get(d.id);
    if (p && p.at > started) d.online = p.online;
  }
  const old = devices;
  const next = new Map();
  for (const d of list) {
    const o = old.get(d.id);
    if (!o) {
      next.set(d.id, d);
      continue;
    }
    // Keep a newer live state than the listed one.
    if (o.seq !== undefined && (d.seq === undefined || o.seq > d.seq)) Object.assign(d, { seq: o.seq, state: o.state, at: o.at, problem: null });
    if (o.live) d.live = o.live;
    // Updated in place, not replaced: a screen holding this device object
    // (a listing that finished after it opened) keeps seeing its pushes.
    for (const k of Object.keys(o)) if (!(k in d)) delete o[k];
    Object.assign(o, d);
    next.set(d.id, o);
  }
  devices.clear();
  for (const [id, d] of next) devices.set(id, d);
  return list;
}

// ---- describing state ----

function describe(dev) {
  if (dev.problem) return { text: dev.problem, cls: "bad" };
  const st = dev.state;
  if (!st) return { text: "unknown", cls: "" };
  const parts = [];
  if (st.relay !== undefined) parts.push(st.relay ? "On" : "Off");
  if (st.brightness !== undefined) parts.push(`${st.brightness} %`);
  if (st.motion !== undefined) parts.push(st.motion ? "Motion" : "No motion");
  if (st.power_mw !== undefined) parts.push(`${(st.power_mw / 1000).toFixed(1)} W`);
  return { text: parts.join(" · ") || "–", cls: st.relay === true ? "on" : st.relay === false ? "off" : "" };
}

const hasRelay = (dev) => ["plug", "energy_plug", "dimmer"].includes(dev.kind);

const KIND_NAMES = { plug: "Plug", energy_plug: "Energy plug", motion_sensor: "Motion sensor", dimmer: "Dimmer" };

function refusalMessage(dev, reason) {
  const text = ctl.explain(reason);
  return `${dev.name} refused: ${text}`;
}

async function switchDevice(dev, on) {
  const r = await ctl.send(dev, { op: "set_relay", on });
  if (r.outcome.outcome === "refused") {
    flash(refusalMessage(dev, r.outcome.reason), "error");
  } else {
    clearFlash();
  }
  // The answer is signed by the device: its state is the truth.
  dev.state = r.state;
  dev.problem = null;
  if (screenUpdate) screenUpdate(dev);
}

function switchButton(dev) {
  const on = !!(dev.state && dev.state.relay);
  const b = h("button", { class: "switch", type: "button", "aria-pressed": on ? "true" : "false", "aria-label": `${dev.name} power`, "data-switch": dev.id }, on ? "On" : "Off");
  b.addEventListener("click", () => busy(b, () => switchDevice(dev, !(dev.state && dev.state.relay))));
  b.disabled = !dev.online || !dev.verifyKey;
  return b;
}

// A brightness slider for dimmers: the device fades to the level and
// switches on if it was off (through its safety interlock).
function brightnessSlider(dev) {
  const level = (dev.state && dev.state.brightness) || 100;
  const input = h("input", { type: "range", min: 1, max: 100, step: 1, value: level, "aria-label": `${dev.name} brightness`, "data-brightness": dev.id });
  input.addEventListener("change", () =>
    busy(input, async () => {
      const r = await ctl.send(dev, { op: "set_brightness", percent: Number(input.value) });
      if (r.outcome.outcome === "refused") flash(refusalMessage(dev, r.outcome.reason), "error");
      dev.state = r.state;
      dev.problem = null;
      if (screenUpdate) screenUpdate(dev);
    }),
  );
  input.disabled = !dev.online || !dev.verifyKey;
  return input;
}

// ---- screens ----

function loginScreen() {
  const email = h("input", { type: "email", autocomplete: "username", required: true, name: "email" });
  const password = h("input", { type: "password", autocomplete: "current-password", required: true, minlength: 1, name: "password" });
  const form = h(
    "form",
    { "aria-labelledby": "login-title" },
    h("h1", { id: "login-title" }, "Sign in to Hearth"),
    h("p", { class: "muted" }, "Your devices' keys and reports stay in this browser; the cloud only relays encrypted, signed messages."),
    field("Email", email),
    field("Password", password),
    h("div", { class: "row" }, h("button", { type: "submit", value: "login" }, "Log in"), h("button", { type: "submit", value: "signup", class: "secondary" }, "Sign up")),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const signup = ev.submitter && ev.submitter.value === "signup";
    busy(ev.submitter || form, async () => {
      await ctl.login(email.value.trim(), password.value, signup);
      flash(signup ? "Account created; you are logged in." : "Logged in.");
      location.hash = "#/home";
    });
  });
  mount(form);
  email.focus();
}

function tile(dev) {
  const d = describe(dev);
  const t = h(
    "article",
    { class: "tile", "data-device": dev.id, "aria-labelledby": `t-${dev.id}` },
    h("h3", { id: `t-${dev.id}` }, h("a", { href: `#/device/${dev.id}` }, dev.name)),
    h("div", { class: "muted" }, KIND_NAMES[dev.kind] || dev.kind, dev.shared ? " · shared with you" : ""),
    h("div", { class: `state ${d.cls}`, "data-state": dev.id, "aria-live": "polite" }, d.text),
    h("span", { class: `badge ${dev.online ? "online" : "offline"}`, "data-online": dev.id }, dev.online ? "online" : "offline"),
    hasRelay(dev) ? switchButton(dev) : null,
    dev.kind === "dimmer" ? brightnessSlider(dev) : null,
  );
  return t;
}

async function homeScreen() {
  mount(h("h1", {}, "Home"), h("p", { class: "muted" }, "Loading devices…"));
  const list = await refresh();
  const render = () => {
    const all = [...devices.values()];
    if (all.length === 0) {
      mount(h("h1", {}, "Home"), h("p", {}, "No devices yet. ", h("a", { href: "#/add" }, "Add one with its setup code.")));
      return;
    }
    const rooms = new Map();
    for (const d of all) {
      const r = d.room || "No room";
      if (!rooms.has(r)) rooms.set(r, []);
      rooms.get(r).push(d);
    }
    const sections = [...rooms.entries()]
      .sort(([a], [b]) => (a === "No room") - (b === "No room") || a.localeCompare(b))
      .map(([room, ds]) => h("section", { class: "room", "aria-label": room }, h("h2", {}, room), h("div", { class: "tiles" }, ds.map(tile))));
    mount(h("h1", {}, "Home"), h("div", { class: "rooms" }, sections));
  };
  render();
  screenUpdate = () => render();
  return list;
}

function addScreen() {
  const code = h("textarea", { name: "code", required: true, autocomplete: "off", spellcheck: "false", placeholder: "HEARTH:1:… or XXXX-XXXX-…" });
  const name = h("input", { name: "name", required: true, maxlength: 64, placeholder: "Kitchen kettle" });
  const room = h("input", { name: "room", maxlength: 40, placeholder: "Kitchen" });
  const form = h(
    "form",
    { "aria-labelledby": "add-title" },
    h("h1", { id: "add-title" }, "Add a device"),
    h("p", { class: "muted" }, "Type the setup code from the device's label, or paste its QR payload. The device must be new or reset."),
    field("Setup code or label payload", code),
    field("Name", name),
    field("Room", room),
    h("div", { class: "row" }, h("button", { type: "submit" }, "Pair")),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(form.querySelector("button"), async () => {
      const id = await ctl.pair(code.value, name.value.trim(), room.value.trim());
      flash(`Paired ${name.value.trim()}; this browser is its owner.`);
      location.hash = `#/device/${id}`;
    });
  });
  mount(form);
  code.focus();
}

// Energy today: the integral of the signed power reports since local
// midnight (each reading holds until the next report), in kWh.
function energyToday(reports, now) {
  const midnight = new Date(now * 1000);
  midnight.setHours(0, 0, 0, 0);
  const start = midnight.getTime() / 1000;
  const pts = reports.filter((r) => r.state && r.state.power_mw !== undefined).map((r) => [r.at, r.state.power_mw]);
  let joules = 0;
  for (let i = 0; i < pts.length; i++) {
    const from = Math.max(pts[i][0], start);
    const to = i + 1 < pts.length ? pts[i + 1][0] : now;
    if (to > from) joules += (pts[i][1] / 1000) * (to - from);
  }
  return joules / 3.6e6;
}

// Power over the last 24 h as a step line (each reading holds until the
// next), zoomed to the span the history covers if that is shorter.
function powerChart(reports, now) {
  const dayAgo = now - 24 * 3600;
  const pts = reports.filter((r) => r.state && r.state.power_mw !== undefined && r.at >= dayAgo).map((r) => [r.at, r.state.power_mw / 1000]);
  if (pts.length === 0) return h("p", { class: "muted" }, "No power reports in the last 24 h.");
  const from = Math.min(pts[0][0], now - 60);
  pts.push([now, pts[pts.length - 1][1]]);
  const max = Math.max(1, ...pts.map((p) => p[1]));
  const W = 300;
  const H = 140;
  const x = (t) => 4 + ((t - from) / (now - from)) * (W - 8);
  const y = (w) => H - 14 - (w / max) * (H - 34);
  let d = `M${x(pts[0][0]).toFixed(1)},${y(pts[0][1]).toFixed(1)}`;
  for (let i = 1; i < pts.length; i++) d += ` H${x(pts[i][0]).toFixed(1)} V${y(pts[i][1]).toFixed(1)}`;
  const since = new Date(from * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return s(
    "svg",
    { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `Power since ${since}, up to ${max.toFixed(0)} W`, "data-chart": "power" },
    s("line", { class: "axis", x1: 0, y1: H - 14, x2: W, y2: H - 14 }),
    s("text", { x: 4, y: 12 }, `${max.toFixed(0)} W`),
    s("text", { x: 4, y: H - 2 }, since),
    s("text", { x: W - 24, y: H - 2 }, "now"),
    s("path", { class: "line", d }),
  );
}

// kWh per local day for the last 30 days, as bars, from the device's own meter.
function dayChart(rep) {
  const vals = rep.energy_mwh.map((x) => x / 1e6);
  if (vals.length === 0) return null;
  const W = 300;
  const H = 120;
  const max = Math.max(0.001, ...vals);
  const bw = W / Math.max(vals.length, 1);
  return s(
    "svg",
    { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `Energy per day for the last ${vals.length} days, up to ${max.toFixed(2)} kWh`, "data-chart": "days" },
    s("text", { x: 4, y: 12 }, `${max.toFixed(2)} kWh/day`),
    vals.map((v, i) => s("rect", { class: "bar", x: (i * bw + 1).toFixed(1), y: (H - 4 - (v / max) * (H - 24)).toFixed(1), width: Math.max(bw - 2, 1).toFixed(1), height: ((v / max) * (H - 24)).toFixed(1) })),
  );
}

const DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

function describeRule(r) {
  const k = Object.keys(r.kind)[0];
  const v = r.kind[k];
  const at = (t) => (t.clock ? t.clock : t.sunrise !== undefined ? `sunrise ${t.sunrise >= 0 ? "+" : ""}${t.sunrise} min` : `sunset ${t.sunset >= 0 ? "+" : ""}${t.sunset} min`);
  if (k === "schedule") {
    const action = typeof v.action === "string" ? v.action : `on until ${at(v.action.on_until)}`;
    return `${action} at ${at(v.at)} on ${v.days.join(", ")}`;
  }
  if (k === "countdown") return `off ${Math.round(v.off_after_secs / 60)} min after switching on`;
  if (k === "away") return `away mode ${at(v.start)}–${at(v.end)}`;
  if (k === "motion") {
    const off = v.off_after_secs % 60 ? `${v.off_after_secs} s` : `${v.off_after_secs / 60} min`;
    const when = v.when === "after_sunset" ? ", after sunset only" : v.when && v.when.between ? `, ${v.when.between.start}–${v.when.between.end} only` : "";
    if (v.target) {
      const t = devices.get(v.target.device);
      const path = v.target.lan ? `LAN ${v.target.lan}${v.target.allow_cloud ? ", else the cloud link" : " only"}` : v.target.allow_cloud ? "the cloud link" : "LAN only, no address yet";
      return `motion switches ${t ? t.name : v.target.device} on, off after ${off} without motion${when} (${path})`;
    }
    return `on at motion from ${v.sensor}, off after ${off}${when}`;
  }
  return k;
}

async function deviceScreen(id) {
  if (!devices.has(id)) await refresh();
  const dev = devices.get(id);
  if (!dev) {
    mount(h("h1", {}, "Device not found"), h("p", {}, h("a", { href: "#/home" }, "Back to Home")));
    return;
  }
  let history = [];
  let deviceEnergy = null;
  const head = h("div", {});
  const renderHead = () => {
    const d = describe(dev);
    head.replaceChildren(
      h("h1", {}, dev.name),
      h("p", { class: "muted" }, KIND_NAMES[dev.kind] || dev.kind, dev.shared ? " · shared with you" : " · you own it", dev.keyHow === "certified" ? " · key from its certificate" : ""),
      h("div", { class: "tile" }, h("div", { class: `state ${d.cls}`, "data-state": dev.id, "aria-live": "polite" }, d.text), h("span", { class: `badge ${dev.online ? "online" : "offline"}`, "data-online": dev.id }, dev.online ? "online" : "offline"), hasRelay(dev) ? switchButton(dev) : null, dev.kind === "dimmer" ? brightnessSlider(dev) : null),
    );
  };
  renderHead();

  const sections = [head];
  const roomInput = h("input", { value: dev.room || "", maxlength: 40, name: "room" });
  const roomForm = h("form", { "aria-label": "Room" }, field("Room", roomInput), h("div", { class: "row" }, h("button", { type: "submit", class: "secondary" }, "Save room")));
  roomForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(roomForm.querySelector("button"), async () => {
      await ctl.setRoom(dev.id, roomInput.value.trim());
      dev.room = roomInput.value.trim();
      flash("Room saved (in this browser).");
    });
  });
  sections.push(roomForm);

  // Motion timeline and energy need the decrypted history.
  const timeline = h("section", { "aria-labelledby": "tl-title" });
  const energy = h("section", { "aria-labelledby": "en-title" });
  const renderHistory = () => {
    const all = [...history, ...(dev.live || []).filter((l) => !history.some((x) => x.seq === l.seq))];
    if (dev.kind === "motion_sensor") {
      // Motion comes either as a report with motion=true, or (ADR 0011) as
      // the times listed in a fixed-cadence report, which a sensor sends on
      // schedule whether or not anything happened.
      const motions = [];
      for (const e of all) {
        const batch = e.cause && e.cause.by === "cadence" && Array.isArray(e.cause.motion_at) ? e.cause.motion_at : null;
        if (batch) batch.forEach((at, i) => motions.push({ at, seq: `${e.seq}.${i}` }));
        else if (e.state && e.state.motion === true) motions.push({ at: e.at, seq: `${e.seq}` });
      }
      motions.sort((a, b) => b.at - a.at);
      timeline.replaceChildren(
        h("h2", { id: "tl-title" }, "Motion timeline"),
        motions.length === 0
          ? h("p", { class: "muted" }, "No motion recorded.")
          : h("ul", { class: "list", "data-timeline": dev.id }, motions.map((e) => h("li", { "data-seq": e.seq }, h("span", {}, "Motion"), h("time", { datetime: new Date(e.at * 1000).toISOString() }, new Date(e.at * 1000).toLocaleString())))),
      );
    }
    if (dev.kind === "energy_plug") {
      const now = Math.floor(Date.now() / 1000);
      const st = dev.state || {};
      const rep = deviceEnergy && deviceEnergy.today;
      const todayKwh = rep ? rep.today_mwh / 1e6 : energyToday(all, now);
      const cost = rep && rep.price_per_kwh_milli !== undefined ? `${((todayKwh * rep.price_per_kwh_milli) / 1000).toFixed(2)} ${rep.currency || ""}` : null;
      energy.replaceChildren(
        h("h2", { id: "en-title" }, "Energy"),
        h(
          "div",
          { class: "kpi" },
          h("div", {}, "Power now", h("strong", { "data-power": dev.id }, st.power_mw !== undefined ? `${(st.power_mw / 1000).toFixed(1)} W` : "–")),
          h("div", {}, "Today", h("strong", { "data-kwh": dev.id }, `${todayKwh.toFixed(3)} kWh`)),
          cost ? h("div", {}, "Cost today", h("strong", { "data-cost": dev.id }, cost)) : null,
          rep ? h("div", {}, "Total", h("strong", {}, `${(rep.total_mwh / 1e6).toFixed(2)} kWh`)) : null,
        ),
        h("p", { class: "muted" }, rep ? "From the device's own energy meter (signed and encrypted to you)." : "Computed here from the device's signed power reports (this device does not report an energy history)."),
        powerChart(all, now),
        deviceEnergy && deviceEnergy.days ? dayChart(deviceEnergy.days) : null,
      );
    }
  };
  if (dev.kind === "motion_sensor") sections.push(timeline);
  if (dev.kind === "energy_plug") sections.push(energy);

  if (hasRelay(dev)) sections.push(rulesSection(dev));
  if (dev.kind === "motion_sensor" && !dev.shared) sections.push(motionRulesSection(dev));
  sections.push(sharingSection(dev));
  const fw = h("section", { "aria-labelledby": "fw-title" });
  const renderFirmware = () => {
    const f = dev.state && dev.state.firmware;
    if (!f) {
      fw.replaceChildren(h("h2", { id: "fw-title" }, "Firmware"), h("p", { class: "muted" }, "This device does not report its firmware status."));
      return;
    }
    const approve = f.phase === "awaiting_approval" && f.offered ? h("button", { type: "button" }, `Approve ${f.offered}`) : null;
    if (approve) approve.addEventListener("click", () => busy(approve, () => firmwareAction({ op: "approve_update", version: f.offered }, `Approved ${f.offered}; the device verifies and installs it.`)));
    const check = h("button", { type: "button", class: "secondary" }, "Check for updates");
    check.addEventListener("click", () => busy(check, () => firmwareAction({ op: "check_update" }, "The device is checking for updates.")));
    const mode = f.policy && f.policy.mode === "approval" ? "approval" : "automatic";
    const policy = h(
      "select",
      { name: "update-policy" },
      h("option", { value: "automatic", selected: mode === "automatic" }, "automatic"),
      h("option", { value: "approval", selected: mode === "approval" }, "after my approval"),
    );
    policy.addEventListener("change", () =>
      busy(policy, () =>
        firmwareAction({ op: "set_update_policy", policy: { mode: policy.value } }, `Update policy: ${policy.value === "approval" ? "after my approval" : "automatic"} (the device confirmed).`),
      ),
    );
    const progress = f.progress ? `${Math.floor((100 * f.progress.done) / Math.max(f.progress.total, 1))} %` : null;
    fw.replaceChildren(
      h("h2", { id: "fw-title" }, "Firmware"),
      h(
        "ul",
        { class: "list", "data-firmware": dev.id },
        h("li", {}, "Version", h("strong", {}, f.version)),
        h("li", {}, ...field("Install updates", policy)),
        h("li", {}, "Status", h("span", {}, f.phase.replace(/_/g, " "), f.offered ? ` (${f.offered})` : "", progress ? ` ${progress}` : "")),
        f.last_result ? h("li", {}, "Last install", h("span", {}, f.last_result)) : null,
        f.last_check ? h("li", {}, "Last check", h("span", {}, f.last_check)) : null,
      ),
      h("div", { class: "row" }, approve, check),
    );
  };
  const firmwareAction = async (command, message) => {
    const seqBefore = dev.seq;
    const r = await ctl.firmwareCommand(dev, command);
    if (r.refused) flash(`${dev.name} refused: ${r.refused}`, "error");
    else {
      // The update client reports after it acts, so a state report pushed
      // while this command was on its way is at least as new as the
      // result's copy: the result must not put the older status back (it
      // hid an offered release now and then).
      if (dev.seq === seqBefore) dev.state = r.state;
      flash(message);
      renderFirmware();
    }
  };
  renderFirmware();
  sections.push(fw);

  mount(...sections);
  screenUpdate = (d) => {
    if (d.id !== dev.id) return;
    renderHead();
    renderHistory();
    renderFirmware();
  };
  if (dev.kind === "motion_sensor" || dev.kind === "energy_plug") {
    if (dev.verifyKey) {
      try {
        history = (await ctl.events(dev)).filter((e) => !e.unreadable);
      } catch (e) {
        flash(`Could not load the history: ${e.message}`, "error");
      }
      if (dev.kind === "energy_plug" && dev.online) {
        const now = Math.floor(Date.now() / 1000);
        const today = await ctl.energy(dev, now - 24 * 3600, "minute");
        const days = await ctl.energy(dev, now - 30 * 86400, "day");
        if (today.report) deviceEnergy = { today: today.report, days: days.report || null };
      }
    }
    renderHistory();
  }
}

function rulesSection(dev) {
  const sec = h("section", { "aria-labelledby": "rules-title" });
  const list = h("div", {});
  let current = null;
  const load = async () => {
    const r = await ctl.getRules(dev);
    if (r.refused) {
      list.replaceChildren(h("p", { class: "msg error" }, `Refused: ${r.refused}`));
      return;
    }
    current = r.rules;
    list.replaceChildren(
      h("p", { class: "muted" }, `Rule set version ${current.version} (time zone ${current.timezone}), read from the device.`),
      current.rules.length === 0
        ? h("p", { class: "muted" }, "No schedules or timers.")
        : h(
            "ul",
            { class: "list", "data-rules": dev.id },
            current.rules.map((rule) => {
              const del = h("button", { type: "button", class: "secondary", "aria-label": `Delete ${rule.name}` }, "Delete");
              del.addEventListener("click", () => busy(del, () => save({ ...current, rules: current.rules.filter((x) => x.id !== rule.id) }, `Deleted ${rule.name}.`)));
              return h("li", { "data-rule": rule.id }, h("span", {}, h("strong", {}, rule.name), " — ", describeRule(rule), rule.enabled === false ? " (disabled)" : ""), del);
            }),
          ),
    );
  };
  const save = async (next, message) => {
    const r = await ctl.setRules(dev, current.version, next);
    if (r.refused) {
      flash(`${dev.name} refused: ${r.refused}`, "error");
    } else {
      flash(message);
    }
    await load();
  };
  const nextId = () => Math.max(0, ...current.rules.map((r) => r.id)) + 1;

  const time = h("input", { type: "time", required: true, value: "07:00", name: "time" });
  const action = h("select", { name: "action" }, h("option", { value: "on" }, "Switch on"), h("option", { value: "off" }, "Switch off"));
  const sname = h("input", { name: "schedule-name", maxlength: 60, required: true, value: "morning" });
  const days = h("fieldset", {}, h("legend", {}, "Days"), DAYS.map((d) => h("label", {}, h("input", { type: "checkbox", value: d, checked: true }), d)));
  const schedForm = h("form", { "aria-label": "New schedule" }, h("h3", {}, "New schedule"), field("Name", sname), field("Time", time), field("Action", action), days, h("div", { class: "row" }, h("button", { type: "submit" }, "Add schedule")));
  schedForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(schedForm.querySelector("button[type=submit]"), async () => {
      if (!current) await load();
      const chosen = [...days.querySelectorAll("input:checked")].map((i) => i.value);
      if (chosen.length === 0) throw new Error("Pick at least one day.");
      const rule = { id: nextId(), name: sname.value.trim(), enabled: true, kind: { schedule: { days: chosen, at: { clock: time.value }, action: action.value } } };
      await save({ ...current, rules: [...current.rules, rule] }, `Added schedule ${rule.name}.`);
    });
  });

  const mins = h("input", { type: "number", min: 1, max: 1440, required: true, value: 30, name: "minutes" });
  const timerForm = h("form", { "aria-label": "Timer" }, h("h3", {}, "Auto-off timer"), field("Switch off this many minutes after it goes on", mins), h("div", { class: "row" }, h("button", { type: "submit" }, "Set timer")));
  timerForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(timerForm.querySelector("button"), async () => {
      if (!current) await load();
      const secs = Number(mins.value) * 60;
      const rule = { id: nextId(), name: `off after ${mins.value} min`, enabled: true, kind: { countdown: { off_after_secs: secs } } };
      await save({ ...current, rules: [...current.rules.filter((r) => !r.kind.countdown), rule] }, `Timer set: off ${mins.value} min after switching on.`);
    });
  });

  // Away mode: random on-periods in a nightly window, planned on the device
  // from a seed drawn here (a 52-bit integer, exact in JSON).
  const awayStart = h("input", { type: "time", required: true, value: "19:00", name: "away-start" });
  const awayEnd = h("input", { type: "time", required: true, value: "23:30", name: "away-end" });
  const awayMin = h("input", { type: "number", min: 30, max: 720, required: true, value: 30, name: "away-min" });
  const awayMax = h("input", { type: "number", min: 30, max: 720, required: true, value: 90, name: "away-max" });
  const awayForm = h(
    "form",
    { "aria-label": "Away mode" },
    h("h3", {}, "Away mode"),
    h("p", { class: "muted" }, "Switches on and off at random in the window every day, so the home looks lived in."),
    field("Window starts", awayStart),
    field("Window ends", awayEnd),
    field("Shortest on-period (minutes)", awayMin),
    field("Longest on-period (minutes)", awayMax),
    h("div", { class: "row" }, h("button", { type: "submit" }, "Add away mode")),
  );
  awayForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(awayForm.querySelector("button"), async () => {
      if (!current) await load();
      const r = new Uint32Array(2);
      crypto.getRandomValues(r);
      const seed = (r[0] & 0xfffff) * 2 ** 32 + r[1];
      const rule = {
        id: nextId(),
        name: "away",
        enabled: true,
        kind: { away: { days: DAYS, start: { clock: awayStart.value }, end: { clock: awayEnd.value }, min_on_mins: Number(awayMin.value), max_on_mins: Number(awayMax.value), seed } },
      };
      await save({ ...current, rules: [...current.rules.filter((x) => !x.kind.away), rule] }, `Away mode set: ${awayStart.value}–${awayEnd.value}.`);
    });
  });

  const loadBtn = h("button", { type: "button", class: "secondary" }, "Load schedules");
  loadBtn.addEventListener("click", () => busy(loadBtn, load));
  sec.append(h("h2", { id: "rules-title" }, "Schedules and timers"), h("p", { class: "muted" }, "Rules run on the device itself, even when the cloud is unreachable."), loadBtn, list, schedForm, timerForm, awayForm);
  return sec;
}

// Motion rules stored on this sensor, each switching another device
// (ctl.motionRule: a switch-only grant on the target, then the rule).
function motionRulesSection(dev) {
  const sec = h("section", { "aria-labelledby": "motion-rules-title" });
  const list = h("div", {});
  let current = null;
  const load = async () => {
    const r = await ctl.getRules(dev);
    if (r.refused) {
      list.replaceChildren(h("p", { class: "msg error" }, `Refused: ${r.refused}`));
      return;
    }
    current = r.rules;
    const motion = current.rules.filter((x) => x.kind.motion);
    list.replaceChildren(
      h("p", { class: "muted" }, `Rule set version ${current.version}, read from the sensor.`),
      motion.length === 0
        ? h("p", { class: "muted" }, "No motion rules.")
        : h(
            "ul",
            { class: "list", "data-motion-rules": dev.id },
            motion.map((rule) => {
              const del = h("button", { type: "button", class: "secondary", "aria-label": `Delete ${rule.name}` }, "Delete");
              del.addEventListener("click", () =>
                busy(del, async () => {
                  const r = await ctl.setRules(dev, current.version, { ...current, rules: current.rules.filter((x) => x.id !== rule.id) });
                  if (r.refused) flash(`${dev.name} refused: ${r.refused}`, "error");
                  else flash(`Deleted ${rule.name}. The target still lists the sensor as allowed to switch it; revoke that under the target's sharing.`);
                  await load();
                }),
              );
              return h("li", { "data-rule": rule.id }, h("span", {}, h("strong", {}, rule.name), " — ", describeRule(rule)), del);
            }),
          ),
    );
  };
  // Only devices this browser paired: their keys go into the grant and the rule.
  const targets = [...devices.values()].filter((d) => hasRelay(d) && !d.shared && d.keyHow === "paired");
  const target = h("select", { name: "motion-target", required: true }, targets.map((d) => h("option", { value: d.id }, d.name)));
  const offAfter = h("input", { type: "number", min: 10, max: 86400, required: true, value: 300, name: "motion-off-after" });
  const when = h("select", { name: "motion-when" }, h("option", { value: "always" }, "Always"), h("option", { value: "between" }, "Only between two times"), h("option", { value: "after_sunset" }, "Only after sunset"));
  const from = h("input", { type: "time", value: "18:00", name: "motion-from" });
  const until = h("input", { type: "time", value: "23:00", name: "motion-until" });
  const lan = h("input", { name: "motion-lan", maxlength: 100, placeholder: "192.168.1.20:7443", autocomplete: "off" });
  const cloud = h("input", { type: "checkbox", name: "motion-cloud" });
  // The window's times only count with "Only between two times".
  const syncWindow = () => {
    from.disabled = until.disabled = when.value !== "between";
  };
  when.addEventListener("change", syncWindow);
  syncWindow();
  const form = h(
    "form",
    { "aria-label": "New motion rule" },
    h("h3", {}, "New motion rule"),
    targets.length === 0 ? h("p", { class: "muted" }, "Pair a plug or a light from this browser first.") : null,
    field("Device to switch on", target),
    field("Switch off after this many seconds without motion", offAfter),
    field("When", when),
    field("Armed from", from),
    field("Armed until", until),
    field("The device's LAN address (HOST:PORT, optional)", lan),
    h("label", {}, cloud, "Allow the cloud path when the LAN does not reach it (the cloud then sees when motion happens)"),
    h("div", { class: "row" }, h("button", { type: "submit" }, "Add motion rule")),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(form.querySelector("button[type=submit]"), async () => {
      const t = devices.get(target.value);
      if (!t) throw new Error("Pick the device to switch.");
      const w = when.value === "between" ? { between: { start: from.value, end: until.value } } : when.value;
      const r = await ctl.motionRule(dev, t, { offAfterSecs: Number(offAfter.value), when: w, lan: lan.value.trim(), allowCloud: cloud.checked });
      if (r.refused) flash(r.refused, "error");
      else flash(`Added ${r.rule.name}: ${dev.name} may switch ${t.name} on and off, nothing else.`);
      await load();
    });
  });
  const loadBtn = h("button", { type: "button", class: "secondary" }, "Load motion rules");
  loadBtn.addEventListener("click", () => busy(loadBtn, load));
  sec.append(
    h("h2", { id: "motion-rules-title" }, "Motion rules"),
    h("p", { class: "muted" }, "The sensor switches the device itself, with its own key, over the LAN (and through the cloud only if you allow it). It runs without this app or the cloud."),
    loadBtn,
    list,
    form,
  );
  return sec;
}

function sharingSection(dev) {
  const sec = h("section", { "aria-labelledby": "share-title" });
  const code = h("textarea", { name: "share-code", required: true, spellcheck: "false", placeholder: "hearth-controller:1:…" });
  const role = h("select", { name: "role" }, h("option", { value: "member" }, "Member (may switch, may not share)"), h("option", { value: "admin" }, "Admin (may share as member)"));
  const readOnly = h("input", { type: "checkbox", name: "read-only" });
  const maxOn = h("input", { type: "number", min: 1, max: 1440, name: "max-on", placeholder: "no limit" });
  const days = h("input", { type: "number", min: 1, max: 3650, name: "days", placeholder: "no end" });
  const limits = h(
    "fieldset",
    {},
    h("legend", {}, "Limits (checked by the device)"),
    h("label", {}, readOnly, "Read only (may see, may not switch)"),
    ...field("Switch off after this many minutes when they switch it on", maxOn),
    ...field("Access ends after this many days", days),
  );
  const form = h("form", { "aria-label": "Share" }, field("The other person's share code", code), field("Role", role), limits, h("div", { class: "row" }, h("button", { type: "submit" }, "Share")));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(form.querySelector("button[type=submit]"), async () => {
      const scope = {
        read_only: readOnly.checked,
        max_on_secs: maxOn.value ? Number(maxOn.value) * 60 : undefined,
        until: days.value ? Math.floor(Date.now() / 1000) + Number(days.value) * 86400 : undefined,
      };
      const r = await ctl.share(dev, code.value, role.value, scope);
      if (r.refused) flash(`${dev.name} refused: ${r.refused}`, "error");
      else {
        flash(r.warning || `Shared ${dev.name} as ${role.value} (the device confirmed, signed).`, r.warning ? "error" : "ok");
        code.value = "";
        await showAccess();
      }
    });
  });
  const accessList = h("div", { "data-access": dev.id });
  const showAccess = async () => {
    const r = await ctl.access(dev);
    if (r.refused) {
      accessList.replaceChildren(h("p", { class: "msg error" }, `Refused: ${r.refused}`));
      return;
    }
    const me = (await ctl.getIdentity()).controller;
    accessList.replaceChildren(
      h("p", { class: "muted" }, `As the device reports it (signed at ${new Date(r.at * 1000).toLocaleString()}):`),
      h(
        "ul",
        { class: "list" },
        r.entries.map((e) => {
          const isMe = e.controller === me;
          const revoke = isMe ? null : h("button", { type: "button", class: "secondary", "aria-label": `Revoke ${e.controller.slice(0, 8)}` }, "Revoke");
          if (revoke) {
            revoke.addEventListener("click", () =>
              busy(revoke, async () => {
                const x = await ctl.revoke(dev, e.controller);
                if (x.refused) flash(`${dev.name} refused: ${x.refused}`, "error");
                else flash(x.warning || "Revoked (the device confirmed, signed).", x.warning ? "error" : "ok");
                await showAccess();
              }),
            );
          }
          const sc = e.scope || {};
          const lim = [sc.read_only ? "read-only" : null, sc.max_on_secs ? `on for at most ${Math.round(sc.max_on_secs / 60)} min` : null, sc.until ? `until ${new Date(sc.until * 1000).toLocaleString()}` : null].filter(Boolean);
          return h("li", { "data-controller": e.controller }, h("span", {}, h("span", { class: "mono" }, e.controller.slice(0, 12)), ` ${e.role}`, lim.length ? ` (${lim.join(", ")})` : "", isMe ? " (this browser)" : "", e.enc ? "" : " (no encryption key yet)"), revoke);
        }),
      ),
    );
  };
  const accessBtn = h("button", { type: "button", class: "secondary" }, "Who has access");
  accessBtn.addEventListener("click", () => busy(accessBtn, showAccess));
  sec.append(h("h2", { id: "share-title" }, "Sharing"), form, accessBtn, accessList);
  return sec;
}

async function settingsScreen() {
  const id = await ctl.getIdentity();
  const session = await api.loadSession();
  const codeBox = h("textarea", { readonly: true, "data-share-code": "", spellcheck: "false" }, await ctl.shareCode());
  const out = h("button", { type: "button" }, "Log out");
  out.addEventListener("click", () =>
    busy(out, async () => {
      await ctl.logout();
      closeLink();
      devices.clear();
      flash("Logged out.");
      location.hash = "#/login";
    }),
  );
  mount(
    h("h1", {}, "Settings"),
    h("div", { class: "card" }, h("p", {}, "Account: ", h("strong", {}, (session && session.email) || "?")), h("p", {}, "This browser's controller id: ", h("span", { class: "mono", "data-controller-id": "" }, id.controller)), h("p", {}, "Encryption key fingerprint: ", h("span", { class: "mono" }, await ctl.encFingerprint()))),
    h("section", { "aria-labelledby": "sc-title" }, h("h2", { id: "sc-title" }, "Your share code"), h("p", { class: "muted" }, "Give this to a device's owner so they can share it with you. Compare the fingerprint with them."), ...field("Share code", codeBox)),
    h("p", { class: "muted" }, "Keys are kept in this browser and cannot be exported; clearing the site's data removes this controller from your devices' point of view."),
    await controllersSection(id.controller),
    passwordForm(),
    out,
  );
}

// This account's controllers (phones, browsers, CLIs): rename, remove.
async function controllersSection(me) {
  const sec = h("section", { "aria-labelledby": "ctl-title" });
  const render = async () => {
    const list = await ctl.controllers();
    sec.replaceChildren(
      h("h2", { id: "ctl-title" }, "Your controllers"),
      h("p", { class: "muted" }, "Removing one here only stops this account listing it; to take away its access to a device, revoke it on that device (Sharing → Who has access)."),
      h(
        "ul",
        { class: "list", "data-controllers": "" },
        list.map((c) => {
          const name = h("input", { value: c.name, maxlength: 64, "aria-label": `Name of controller ${c.id.slice(0, 8)}` });
          const save = h("button", { type: "button", class: "secondary" }, "Rename");
          save.addEventListener("click", () =>
            busy(save, async () => {
              await ctl.renameController(c, name.value.trim());
              flash(`Renamed to ${name.value.trim()}.`);
              await render();
            }),
          );
          const remove = c.id === me ? null : h("button", { type: "button", class: "secondary", "aria-label": `Remove ${c.name}` }, "Remove");
          if (remove) {
            remove.addEventListener("click", () =>
              busy(remove, async () => {
                await ctl.removeController(c);
                flash(`Removed ${c.name} from this account.`);
                await render();
              }),
            );
          }
          return h("li", { "data-controller": c.id }, h("span", {}, h("span", { class: "mono" }, c.id.slice(0, 12)), c.id === me ? " (this browser)" : ""), name, h("div", { class: "row" }, save, remove));
        }),
      ),
    );
  };
  await render();
  return sec;
}

function passwordForm() {
  const oldPw = h("input", { type: "password", autocomplete: "current-password", required: true, name: "old-password" });
  const newPw = h("input", { type: "password", autocomplete: "new-password", required: true, minlength: 8, name: "new-password" });
  const form = h("form", { "aria-labelledby": "pw-title" }, h("h2", { id: "pw-title" }, "Change password"), field("Current password", oldPw), field("New password (8 characters or more)", newPw), h("div", { class: "row" }, h("button", { type: "submit", class: "secondary" }, "Change password")));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(form.querySelector("button"), async () => {
      await ctl.changePassword(oldPw.value, newPw.value);
      closeLink();
      devices.clear();
      flash("Password changed; every session of this account has ended. Log in with the new password.");
      location.hash = "#/login";
    });
  });
  return form;
}

// ---- routing ----

async function route() {
  screenUpdate = null;
  const hash = location.hash || "#/home";
  // Set once the screen has loaded, for tests and assistive tools.
  document.getElementById("main").removeAttribute("data-ready");
  const nav = document.getElementById("nav");
  if (!api.loggedIn()) {
    nav.hidden = true;
    if (hash !== "#/login") {
      location.hash = "#/login";
      return;
    }
    loginScreen();
    return;
  }
  nav.hidden = false;
  connectLink();
  try {
    if (hash === "#/login" || hash === "#/home" || hash === "#/") await homeScreen();
    else if (hash === "#/add") addScreen();
    else if (hash === "#/settings") await settingsScreen();
    else if (hash.startsWith("#/device/")) await deviceScreen(hash.slice("#/device/".length));
    else await homeScreen();
  } catch (e) {
    flash(e.message || String(e), "error");
  }
  if ((location.hash || "#/home") === hash) document.getElementById("main").dataset.ready = hash;
  document.getElementById("main").focus({ preventScroll: true });
}

window.addEventListener("hashchange", () => {
  route();
});
window.addEventListener("hearth:logged-out", () => {
  closeLink();
  flash("Your session ended; log in again.", "error");
  location.hash = "#/login";
});

(async () => {
  if (!window.isSecureContext || !crypto.subtle) {
    mount(h("p", { class: "msg error" }, "This page must be opened over HTTPS or at http://127.0.0.1 (WebCrypto needs a secure context)."));
    return;
  }
  await api.loadSession();
  await route();
  // The service worker keeps the app shell for opening offline and makes
  // the app installable; it never stores API answers (sw.js, ADR 0007).
  // The app works without it (a browser or a setting may refuse it).
  if ("serviceWorker" in navigator) {
    navigator.serviceWorker.register("/sw.js", { scope: "/" }).catch((e) => console.warn(`service worker not registered: ${e}`));
  }
})();
