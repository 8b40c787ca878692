#!/usr/bin/env python3
"""Renders the app icon (the same house as app/icon.svg) to the PNGs the
manifest lists: Chromium wants raster icons at 192 and 512 px to offer
installing the app (ADR 0007). Standard library only; the output is
deterministic, and the PNGs are committed in app/.

    python3 crates/hearth-cloud/web/make-icons.py
"""
import os
import struct
import zlib

BG = (0xB4, 0x47, 0x1F)
FG = (0xFF, 0xFF, 0xFF)
# The house of icon.svg in its 64-unit box: roof triangle and body with a door.
ROOF = [(32, 12), (10, 30), (54, 30)]


def inside_triangle(x, y, a, b, c):
    def side(p, q):
        return (x - q[0]) * (p[1] - q[1]) - (p[0] - q[0]) * (y - q[1])
    s1, s2, s3 = side(a, b), side(b, c), side(c, a)
    neg = s1 < 0 or s2 < 0 or s3 < 0
    pos = s1 > 0 or s2 > 0 or s3 > 0
    return not (neg and pos)


def pixel(u, v):
    """Colour at (u, v) in the 64-unit box; None outside the rounded square."""
    r = 14
    cx = min(max(u, r), 64 - r)
    cy = min(max(v, r), 64 - r)
    if (u - cx) ** 2 + (v - cy) ** 2 > r * r:
        return None
    if inside_triangle(u, v, *ROOF):
        return FG
    if 16 <= u <= 48 and 30 <= v <= 50 and not (28 < u < 36 and v > 38):
        return FG
    return BG


def png(size):
    rows = []
    ss = 4  # 4×4 supersampling for smooth edges
    for y in range(size):
        row = bytearray([0])
        for x in range(size):
            acc = [0, 0, 0, 0]
            for j in range(ss):
                for i in range(ss):
                    u = (x + (i + 0.5) / ss) * 64 / size
                    v = (y + (j + 0.5) / ss) * 64 / size
                    c = pixel(u, v)
                    if c is not None:
                        acc[0] += c[0]
                        acc[1] += c[1]
                        acc[2] += c[2]
                        acc[3] += 255
            n = ss * ss
            a = acc[3] // n
            if a:
                row += bytes([acc[0] * 255 // acc[3], acc[1] * 255 // acc[3], acc[2] * 255 // acc[3], a])
            else:
                row += bytes([0, 0, 0, 0])
        rows.append(bytes(row))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows), 9)) + chunk(b"IEND", b"")


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    for size in (192, 512):
        with open(os.path.join(here, "app", f"icon-{size}.png"), "wb") as f:
            f.write(png(size))
