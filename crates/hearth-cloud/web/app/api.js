// The cloud's JSON API with a bearer token. No cookies are used, so a
// third-party page cannot make the browser send an authenticated request
// (no CSRF surface); the token lives in this origin's IndexedDB.

import * as store from "./store.js";

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

let token = null;

export async function loadSession() {
  const s = await store.get("session");
  token = (s && s.token) || null;
  return s || null;
}

export async function setSession(s) {
  token = s ? s.token : null;
  if (s) await store.put("session", s);
  else await store.del("session");
}

export const loggedIn = () => token !== null;
export const currentToken = () => token;

const TIMEOUT_MS = 30000;

export async function call(method, path, body) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal: ctl.signal, credentials: "omit" });
  } catch (e) {
    throw new ApiError(0, ctl.signal.aborted ? "the cloud did not answer in time" : "cannot reach the cloud", null);
  } finally {
    clearTimeout(timer);
  }
  const text = await resp.text();
  let value = null;
  try {
    value = text ? JSON.parse(text) : null;
  } catch {
    value = null;
  }
  if (!resp.ok) {
    if (resp.status === 401 && token) {
      await setSession(null);
      window.dispatchEvent(new Event("hearth:logged-out"));
    }
    throw new ApiError(resp.status, (value && value.error) || `the cloud answered ${resp.status}`, value);
  }
  return value;
}

// The live link URL: browsers cannot set headers on a WebSocket, so the
// token goes in the query (the cloud accepts `?token=` on this route only).
export function linkUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}/api/v1/link?token=${encodeURIComponent(token)}`;
}
