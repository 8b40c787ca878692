#!/usr/bin/env python3
"""A real interception proxy between the CLI and the cloud (issue 7, "TLS
posture": "use mitmproxy in at least one test as a real interception proxy").

Starts `hearth cloud serve` on 127.0.0.1 with a fresh PKI, and mitmproxy's
`mitmdump` in reverse-proxy mode in front of it with its own CA (what an
attacker who redirects the cloud's name to their machine would run). Then:

1. Positive control: a client that trusts mitmproxy's CA gets through the
   proxy to the real cloud (so the proxy really intercepts and forwards).
2. `hearth signup` aimed at the proxy, trusting only the cloud CA, must
   fail the TLS handshake: no account may appear on the cloud, and
   mitmdump must report that the client refused its certificate.
3. The same `hearth signup` aimed at the cloud directly succeeds (the CLI
   and its CA file are fine; only the interception was refused).

Usage: run_mitm.py HEARTH_BINARY MITMDUMP_BINARY
"""

import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, deadline_s=60):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{what} did not listen on {port} in time")


def get(url, cafile):
    ctx = ssl.create_default_context(cafile=cafile)
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def main() -> int:
    hearth, mitmdump = sys.argv[1], sys.argv[2]
    failures = []
    with tempfile.TemporaryDirectory(prefix="hearth-mitm-") as tmp:
        pki = os.path.join(tmp, "pki")
        subprocess.run([hearth, "pki", "init", "--dir", pki], check=True, stdout=subprocess.DEVNULL)
        cloud_ca = os.path.join(pki, "cloud-ca.pem")
        api, dev, proxy = free_port(), free_port(), free_port()
        procs = []
        try:
            cloud_log = open(os.path.join(tmp, "cloud.log"), "wb")
            cloud = subprocess.Popen(
                [hearth, "cloud", "serve", "--pki", pki, "--data-dir", os.path.join(tmp, "data"),
                 "--api-listen", f"127.0.0.1:{api}", "--device-listen", f"127.0.0.1:{dev}"],
                stdout=cloud_log, stderr=subprocess.STDOUT)
            procs.append(cloud)
            confdir = os.path.join(tmp, "mitm")
            mitm_log_path = os.path.join(tmp, "mitm.log")
            mitm_log = open(mitm_log_path, "wb")
            # --ssl-insecure: the attacker's proxy does not care whom it talks
            # to upstream; what matters is what the client accepts.
            mitm = subprocess.Popen(
                [mitmdump, "--mode", f"reverse:https://localhost:{api}", "--listen-host", "127.0.0.1",
                 "--listen-port", str(proxy), "--set", f"confdir={confdir}", "--ssl-insecure", "--flow-detail", "1"],
                stdout=mitm_log, stderr=subprocess.STDOUT)
            procs.append(mitm)
            wait_port(api, cloud, "the cloud")
            wait_port(proxy, mitm, "mitmdump")
            mitm_ca = os.path.join(confdir, "mitmproxy-ca-cert.pem")

            # 1. The proxy works for a client that trusts it.
            status, body = get(f"https://localhost:{proxy}/api/v1/health", mitm_ca)
            if status != 200 or json.loads(body) != {"status": "ok"}:
                failures.append(f"positive control: through the proxy with its CA trusted: {status} {body!r}")
            else:
                print("   positive control: a client trusting mitmproxy's CA is intercepted and forwarded (200)")

            # 2. The CLI refuses the proxy.
            env = {**os.environ, "HEARTH_PASSWORD": "mitm test password"}
            cfg = os.path.join(tmp, "cli")
            r = subprocess.run(
                [hearth, "--config-dir", cfg, "signup", "--email", "mitm@example.com",
                 "--cloud", f"https://localhost:{proxy}", "--ca", cloud_ca],
                env=env, capture_output=True, text=True, timeout=60)
            out = r.stdout + r.stderr
            if r.returncode == 0:
                failures.append(f"the CLI signed up through the interception proxy:\n{out}")
            elif "TLS" not in out:
                failures.append(f"the CLI failed, but not at TLS:\n{out}")
            else:
                print(f"   hearth signup through mitmproxy refused: {out.strip().splitlines()[-1]}")

            # 3. Directly, the same command works; and step 2 created nothing.
            cfg2 = os.path.join(tmp, "cli2")
            r = subprocess.run(
                [hearth, "--config-dir", cfg2, "signup", "--email", "mitm@example.com",
                 "--cloud", f"https://localhost:{api}", "--ca", cloud_ca],
                env=env, capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                failures.append(f"direct signup failed (so step 2 proves nothing, or it got through): {r.stdout}{r.stderr}")
            else:
                print("   the same signup straight to the cloud succeeds (the account did not exist yet)")
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        with open(mitm_log_path, encoding="utf-8", errors="replace") as f:
            mitm_text = f.read()
        refused = [l for l in mitm_text.splitlines() if "does not trust the proxy's certificate" in l
                   or "TLS handshake failed" in l]
        if not refused:
            failures.append("mitmdump did not log a refused client handshake:\n" + mitm_text[-3000:])
        else:
            print(f"   mitmdump saw: {refused[0].strip()}")
        if "/api/v1/signup" in mitm_text:
            failures.append("a signup request passed through the proxy")
    if failures:
        print("mitmproxy interception test FAILED:\n" + "\n".join(failures))
        return 1
    print("mitmproxy interception: 1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
