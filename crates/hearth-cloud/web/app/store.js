// The browser controller's local state in IndexedDB: its key pairs (as
// non-extractable WebCrypto keys, which IndexedDB stores without ever
// exposing the private part to script), the devices it knows with the keys
// to check their signatures, the command counter, and the session token.

const DB = "hearth";
const STORE = "kv";

let dbPromise = null;
function db() {
  if (!dbPromise) {
    dbPromise = new Promise((resolve, reject) => {
      const req = indexedDB.open(DB, 1);
      req.onupgradeneeded = () => req.result.createObjectStore(STORE);
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
  }
  return dbPromise;
}

async function write(fn) {
  const d = await db();
  await new Promise((resolve, reject) => {
    const t = d.transaction(STORE, "readwrite");
    fn(t.objectStore(STORE));
    t.oncomplete = () => resolve();
    t.onerror = () => reject(t.error);
    t.onabort = () => reject(t.error);
  });
}

const request = (r) =>
  new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });

export async function get(key) {
  const d = await db();
  return request(d.transaction(STORE, "readonly").objectStore(STORE).get(key));
}

export const put = (key, value) => write((s) => s.put(value, key));
export const del = (key) => write((s) => s.delete(key));

// The next command counter, strictly increasing (replay protection on the
// device) and persisted before use. Starting from the clock in
// milliseconds keeps it increasing even if this browser's storage was
// cleared and the same key restored (it cannot be: keys are not exported).
export async function nextCounter() {
  const d = await db();
  return new Promise((resolve, reject) => {
    const t = d.transaction(STORE, "readwrite");
    const s = t.objectStore(STORE);
    let next;
    const r = s.get("counter");
    r.onsuccess = () => {
      next = Math.max((r.result || 0) + 1, Date.now());
      s.put(next, "counter");
    };
    t.oncomplete = () => resolve(next);
    t.onerror = () => reject(t.error);
  });
}
