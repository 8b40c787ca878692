// The app's service worker (ADR 0007): it keeps the app shell, the files
// of this directory that are the same for everyone, so the installed app
// opens without the network. It caches nothing else: never a response of
// /api/ (device lists, sealed reports, command answers), never the
// session token (kept in IndexedDB by the page, not in any request this
// worker stores) and never anything decrypted (that only exists in the
// page's memory). The WebSocket link does not pass through a service worker.
//
// Network first: every shell file is fetched from the cloud while it is
// reachable and the cached copy only replaces it when the fetch fails, so
// an update of the app (a new binary) is used at the next load. The cache
// name is versioned; a worker of another version deletes the old cache.

const CACHE = "hearth-shell-v1";

// Exactly the shell: web.rs checks that this list names every file it
// serves under /app/ (except the manufacturer CA, which the app fetches
// when it needs it and which is not needed to open the app) and nothing else.
const SHELL = [
  "/",
  "/manifest.webmanifest",
  "/app/app.css",
  "/app/icon.svg",
  "/app/icon-192.png",
  "/app/icon-512.png",
  "/app/main.js",
  "/app/ui.js",
  "/app/api.js",
  "/app/store.js",
  "/app/bytes.js",
  "/app/cbor.js",
  "/app/cose.js",
  "/app/hpke.js",
  "/app/e2e.js",
  "/app/pairing.js",
  "/app/x509.js",
  "/app/controller.js",
];

// "/" and "/index.html" are the same page; both are kept under "/".
function shellKey(url) {
  if (url.origin !== self.location.origin) return null;
  const path = url.pathname === "/index.html" ? "/" : url.pathname;
  return SHELL.includes(path) ? path : null;
}

// Only a complete, same-origin, unredirected 200 is kept.
function storable(res) {
  return res && res.ok && res.status === 200 && res.type === "basic" && !res.redirected;
}

self.addEventListener("install", (event) => {
  event.waitUntil(
    (async () => {
      const cache = await caches.open(CACHE);
      for (const path of SHELL) {
        const res = await fetch(path, { cache: "no-cache", credentials: "omit" });
        if (!storable(res)) throw new Error(`shell file ${path}: ${res.status}`);
        await cache.put(path, res);
      }
      await self.skipWaiting();
    })(),
  );
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    (async () => {
      for (const name of await caches.keys()) if (name !== CACHE) await caches.delete(name);
      await self.clients.claim();
    })(),
  );
});

self.addEventListener("fetch", (event) => {
  const req = event.request;
  if (req.method !== "GET") return;
  const url = new URL(req.url);
  const key = shellKey(url);
  // Anything that is not a shell file (the API above all) goes to the
  // network untouched: this worker neither answers nor stores it.
  if (key === null) return;
  event.respondWith(
    (async () => {
      try {
        const res = await fetch(req);
        if (storable(res)) {
          const copy = res.clone();
          event.waitUntil(caches.open(CACHE).then((c) => c.put(key, copy)));
        }
        return res;
      } catch (e) {
        const cached = await caches.match(key, { cacheName: CACHE });
        if (cached) return cached;
        throw e;
      }
    })(),
  );
});
