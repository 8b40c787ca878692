// CBOR (RFC 8949), the subset Hearth's payloads use: unsigned and negative
// integers, byte and text strings, arrays, maps, tags, booleans, null and
// floats, definite lengths only (what ciborium writes). Encoding uses the
// shortest form for every head (RFC 8949 §4.2.1 preferred serialization);
// map keys keep their insertion order, which is the Rust struct's field
// order, so re-encoding a header gives the bytes the device encoded.

export class Tagged {
  constructor(tag, value) {
    this.tag = tag;
    this.value = value;
  }
}

const MAX_DEPTH = 32;

function head(major, n, out) {
  if (typeof n === "bigint") {
    if (n < 0n || n > 0xffffffffffffffffn) throw new Error("CBOR: integer out of range");
    if (n <= 0xffffffffn) return head(major, Number(n), out);
    out.push((major << 5) | 27);
    for (let i = 7; i >= 0; i--) out.push(Number((n >> BigInt(8 * i)) & 0xffn));
    return;
  }
  if (!Number.isSafeInteger(n) || n < 0) throw new Error("CBOR: integer out of range");
  if (n < 24) out.push((major << 5) | n);
  else if (n < 0x100) out.push((major << 5) | 24, n);
  else if (n < 0x10000) out.push((major << 5) | 25, n >> 8, n & 0xff);
  else if (n < 0x100000000) out.push((major << 5) | 26, (n >>> 24) & 0xff, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff);
  else head(major, BigInt(n), out);
}

function enc(v, out, depth) {
  if (depth > MAX_DEPTH) throw new Error("CBOR: nested too deeply");
  if (v === null || v === undefined) out.push(0xf6);
  else if (v === false) out.push(0xf4);
  else if (v === true) out.push(0xf5);
  else if (typeof v === "number" || typeof v === "bigint") {
    if (typeof v === "number" && !Number.isInteger(v)) throw new Error("CBOR: floats are not encoded");
    if (v < 0) head(1, typeof v === "bigint" ? -1n - v : -1 - v, out);
    else head(0, v, out);
  } else if (typeof v === "string") {
    const b = new TextEncoder().encode(v);
    head(3, b.length, out);
    for (const x of b) out.push(x);
  } else if (v instanceof Uint8Array) {
    head(2, v.length, out);
    for (const x of v) out.push(x);
  } else if (Array.isArray(v)) {
    head(4, v.length, out);
    for (const x of v) enc(x, out, depth + 1);
  } else if (v instanceof Tagged) {
    head(6, v.tag, out);
    enc(v.value, out, depth + 1);
  } else if (v instanceof Map) {
    head(5, v.size, out);
    for (const [k, x] of v) {
      enc(k, out, depth + 1);
      enc(x, out, depth + 1);
    }
  } else if (typeof v === "object") {
    // Absent optional fields are left out, as serde's skip_serializing_if does.
    const entries = Object.entries(v).filter(([, x]) => x !== undefined);
    head(5, entries.length, out);
    for (const [k, x] of entries) {
      enc(k, out, depth + 1);
      enc(x, out, depth + 1);
    }
  } else throw new Error(`CBOR: cannot encode ${typeof v}`);
}

export function encode(value) {
  const out = [];
  enc(value, out, 0);
  return Uint8Array.from(out);
}

class Reader {
  constructor(bytes) {
    this.b = bytes;
    this.i = 0;
  }
  take(n) {
    if (n > this.b.length - this.i) throw new Error("CBOR: truncated");
    const s = this.b.subarray(this.i, this.i + n);
    this.i += n;
    return s;
  }
  u8() {
    return this.take(1)[0];
  }
  arg(info) {
    if (info < 24) return info;
    if (info === 24) return this.u8();
    if (info === 25) {
      const s = this.take(2);
      return (s[0] << 8) | s[1];
    }
    if (info === 26) {
      const s = this.take(4);
      return s[0] * 0x1000000 + ((s[1] << 16) | (s[2] << 8) | s[3]);
    }
    if (info === 27) {
      const s = this.take(8);
      let n = 0n;
      for (const x of s) n = (n << 8n) | BigInt(x);
      return n <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(n) : n;
    }
    throw new Error("CBOR: indefinite lengths and reserved values are not accepted");
  }
  len(info) {
    const n = this.arg(info);
    if (typeof n !== "number" || n > this.b.length - this.i) throw new Error("CBOR: length beyond the input");
    return n;
  }
  item(depth) {
    if (depth > MAX_DEPTH) throw new Error("CBOR: nested too deeply");
    const ib = this.u8();
    const major = ib >> 5;
    const info = ib & 31;
    switch (major) {
      case 0:
        return this.arg(info);
      case 1: {
        const n = this.arg(info);
        return typeof n === "bigint" ? -1n - n : -1 - n;
      }
      case 2:
        return this.take(this.len(info)).slice();
      case 3:
        return new TextDecoder("utf-8", { fatal: true }).decode(this.take(this.len(info)));
      case 4: {
        const n = this.len(info);
        const a = [];
        for (let k = 0; k < n; k++) a.push(this.item(depth + 1));
        return a;
      }
      case 5: {
        const n = this.len(info);
        const m = new Map();
        for (let k = 0; k < n; k++) {
          const key = this.item(depth + 1);
          if (m.has(key)) throw new Error("CBOR: duplicate map key");
          m.set(key, this.item(depth + 1));
        }
        return m;
      }
      case 6:
        return new Tagged(this.arg(info), this.item(depth + 1));
      default:
        if (info === 20) return false;
        if (info === 21) return true;
        if (info === 22) return null;
        if (info === 25) return halfFloat(this.take(2));
        if (info === 26) return new DataView(this.take(4).slice().buffer).getFloat32(0);
        if (info === 27) return new DataView(this.take(8).slice().buffer).getFloat64(0);
        throw new Error("CBOR: unsupported simple value");
    }
  }
}

function halfFloat(b) {
  const h = (b[0] << 8) | b[1];
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  const v = e === 0 ? m * 2 ** -24 : e === 31 ? (m ? NaN : Infinity) : (m + 1024) * 2 ** (e - 25);
  return h & 0x8000 ? -v : v;
}

// Decodes exactly one item; trailing bytes are an error. Maps decode to Map.
export function decode(bytes) {
  const r = new Reader(bytes);
  const v = r.item(0);
  if (r.i !== bytes.length) throw new Error("CBOR: trailing bytes");
  return v;
}

// A decoded map with text keys as a plain object (for payload structs).
// Unknown fields are refused, as the Rust side does (deny_unknown_fields).
export function struct(value, what, fields) {
  if (!(value instanceof Map)) throw new Error(`${what}: not a map`);
  const out = {};
  for (const [k, v] of value) {
    if (typeof k !== "string" || (fields && !fields.includes(k))) throw new Error(`${what}: unknown field ${String(k)}`);
    out[k] = plain(v);
  }
  return out;
}

// Maps with only text keys become plain objects, recursively.
export function plain(v) {
  if (Array.isArray(v)) return v.map(plain);
  if (v instanceof Map && [...v.keys()].every((x) => typeof x === "string")) {
    const o = {};
    for (const [k, x] of v) o[k] = plain(x);
    return o;
  }
  return v;
}
