#!/usr/bin/env python3
"""Attack tests for hearth-tuf-conformance against python-tuf repositories.

python-tuf (the TUF reference implementation) builds each repository on
disk; Python's http.server serves it on 127.0.0.1; the Rust conformance
binary (CLI of the tuf-conformance suite) is run against it, and each test
checks the exit code, the metadata it kept, the files it wrote and the
requests it made.

Usage: run_attacks.py [PATH_TO_hearth-tuf-conformance [PATH_TO_hearth]]
Prints one line per test and closes with "N passed, M failed".
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import traceback
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

TOP = ["root", "timestamp", "snapshot", "targets"]
BIN = os.path.abspath(
    sys.argv[1] if len(sys.argv) > 1 else os.environ.get("HEARTH_TUF_CONFORMANCE", "target/debug/hearth-tuf-conformance")
)
# Optional second argument: the `hearth` binary, for the `hearth fw` interop test.
HEARTH = os.path.abspath(sys.argv[2]) if len(sys.argv) > 2 else os.environ.get("HEARTH_BIN", "")
WORK = Path(tempfile.mkdtemp(prefix="hearth-tuf-"))
SERVE = WORK / "www"
SERVE.mkdir()
REQUESTS: list[str] = []
# Paths answered by a function instead of a file (endless bodies).
SPECIAL: dict[str, callable] = {}


def future(days: int = 30) -> datetime:
    return (datetime.now(timezone.utc) + timedelta(days=days)).replace(microsecond=0)


def past() -> datetime:
    return (datetime.now(timezone.utc) - timedelta(days=1)).replace(microsecond=0)


class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **kw):
        super().__init__(*a, directory=str(SERVE), **kw)

    def translate_path(self, path):
        # Serve the raw (still percent-encoded) request path, so a file
        # named "%2Fdelegatedrole.json" answers exactly the request the
        # client made for role "/delegatedrole", and nothing escapes SERVE.
        parts = [p for p in path.split("?", 1)[0].split("/") if p]
        if any(p in (".", "..") for p in parts):
            return str(SERVE / "nonexistent")
        return str(SERVE.joinpath(*parts))

    def do_GET(self):  # noqa: N802 (http.server's naming)
        REQUESTS.append(self.path)
        if self.path in SPECIAL:
            SPECIAL[self.path](self)
            return
        super().do_GET()

    def log_message(self, *args):
        pass


def endless(handler):
    """Claims no length and sends data until the client hangs up."""
    handler.send_response(200)
    handler.end_headers()
    chunk = b"A" * 65536
    try:
        for _ in range(2000):  # 128 MiB at most, so the test always ends.
            handler.wfile.write(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass


def _ecdsa_p384():
    from cryptography.hazmat.primitives.asymmetric import ec

    return CryptoSigner(ec.generate_private_key(ec.SECP384R1()))


KEYGENS = {
    "ed25519": CryptoSigner.generate_ed25519,
    "ecdsa": CryptoSigner.generate_ecdsa,
    "ecdsa-p384": _ecdsa_p384,
    "rsa": CryptoSigner.generate_rsa,
    "rsa-pss-sha512": lambda: CryptoSigner.generate_rsa(scheme="rsassa-pss-sha512"),
    "rsa-pkcs1v15-sha256": lambda: CryptoSigner.generate_rsa(scheme="rsa-pkcs1v15-sha256"),
}


class Repo:
    """A repository built with python-tuf's Metadata API."""

    def __init__(self, name: str, consistent: bool = False, keytype: str = "ed25519"):
        self.name = name
        self.meta_dir = SERVE / name / "metadata"
        self.targets_dir = SERVE / name / "targets"
        self.meta_dir.mkdir(parents=True)
        self.targets_dir.mkdir(parents=True)
        gen = KEYGENS[keytype]
        self.signers = {role: [gen()] for role in TOP}
        self.root = Metadata(Root(expires=future(365)))
        self.root.signed.consistent_snapshot = consistent
        for role in TOP:
            for s in self.signers[role]:
                self.root.signed.add_key(s.public_key, role)
        self.timestamp = Metadata(Timestamp(expires=future()))
        self.snapshot = Metadata(Snapshot(expires=future()))
        self.targets = Metadata(Targets(expires=future()))
        self.delegated: dict[str, Metadata] = {}
        self.deleg_signers: dict[str, list] = {}
        self.publish_root()
        self.initial_root = (self.meta_dir / "1.root.json").read_bytes()
        self.publish(bump=False)

    @property
    def url(self) -> str:
        return f"{BASE_URL}/{self.name}/metadata"

    @property
    def target_url(self) -> str:
        return f"{BASE_URL}/{self.name}/targets"

    def write(self, md: Metadata, role: str, signers, versioned: bool) -> bytes:
        md.signatures.clear()
        for s in signers:
            md.sign(s, append=True)
        data = md.to_bytes(JSONSerializer(compact=False))
        name = quote(role, "")
        if role != "timestamp":
            (self.meta_dir / f"{md.signed.version}.{name}.json").write_bytes(data)
        if not versioned:
            (self.meta_dir / f"{name}.json").write_bytes(data)
        return data

    def publish_root(self, extra_signers=()):
        self.write(self.root, "root", list(self.signers["root"]) + list(extra_signers), versioned=False)

    def publish(self, bump: bool = True, roles=("targets",)):
        """Re-signs the given targets roles, then snapshot and timestamp."""
        for role in roles:
            md = self.targets if role == "targets" else self.delegated[role]
            if bump:
                md.signed.version += 1
            signers = self.signers["targets"] if role == "targets" else self.deleg_signers[role]
            self.write(md, role, signers, versioned=False)
            self.snapshot.signed.meta[f"{role}.json"] = MetaFile(version=md.signed.version)
        self.publish_snapshot(bump)

    def publish_snapshot(self, bump: bool = True):
        if bump:
            self.snapshot.signed.version += 1
        self.write(self.snapshot, "snapshot", self.signers["snapshot"], versioned=False)
        self.timestamp.signed.snapshot_meta = MetaFile(version=self.snapshot.signed.version)
        self.publish_timestamp(bump)

    def publish_timestamp(self, bump: bool = True):
        if bump:
            self.timestamp.signed.version += 1
        return self.write(self.timestamp, "timestamp", self.signers["timestamp"], versioned=False)

    def add_target(self, path: str, data: bytes, role: str = "targets", algs=("sha256",), serve: bytes | None = None):
        md = self.targets if role == "targets" else self.delegated[role]
        tf = TargetFile.from_data(path, data, list(algs))
        md.signed.targets[path] = tf
        body = data if serve is None else serve
        dest = self.targets_dir / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.root.signed.consistent_snapshot:
            for h in tf.hashes.values():
                (dest.parent / f"{h}.{dest.name}").write_bytes(body)
        else:
            dest.write_bytes(body)

    def delegate(self, parent: str, name: str, paths, terminating=False):
        # A role delegated from two parents keeps one key and one metadata.
        signer = self.deleg_signers[name][0] if name in self.delegated else CryptoSigner.generate_ed25519()
        pmd = self.targets if parent == "targets" else self.delegated[parent]
        if pmd.signed.delegations is None:
            pmd.signed.delegations = Delegations(keys={}, roles={})
        pmd.signed.delegations.roles[name] = DelegatedRole(name, [], 1, terminating, paths=paths)
        pmd.signed.add_key(signer.public_key, name)
        self.delegated.setdefault(name, Metadata(Targets(expires=future())))
        self.deleg_signers[name] = [signer]

    def rotate(self, role: str, keytype: str = "ed25519"):
        """New keys for a top-level role in a new root version signed by
        the old and (for root) the new keys."""
        gen = {"ed25519": CryptoSigner.generate_ed25519, "ecdsa": CryptoSigner.generate_ecdsa}[keytype]
        old = self.signers[role]
        new = [gen()]
        for s in old:
            self.root.signed.revoke_key(s.public_key.keyid, role)
        for s in new:
            self.root.signed.add_key(s.public_key, role)
        self.root.signed.version += 1
        self.signers[role] = new
        self.publish_root(extra_signers=old if role == "root" else ())


class Client:
    def __init__(self, repo: Repo):
        self.repo = repo
        base = Path(tempfile.mkdtemp(dir=WORK))
        self.mdir = base / "metadata"
        self.tdir = base / "targets"
        self.mdir.mkdir()
        self.tdir.mkdir()
        root = base / "initial_root.json"
        root.write_bytes(repo.initial_root)
        assert self.run("init", "--metadata-dir", str(self.mdir), str(root)) == 0, "init failed"

    def run(self, *args) -> int:
        # Options before the subcommand, in the order given.
        opts = [a for a in args if a not in ("init", "refresh", "download")]
        cmd = [a for a in args if a in ("init", "refresh", "download")]
        if cmd[0] == "init":
            argv = [BIN, "--metadata-dir", args[2], "init", args[3]]
        else:
            argv = [BIN, *opts, *cmd]
        p = subprocess.run(argv, capture_output=True, timeout=60)
        self.last_stderr = p.stderr.decode(errors="replace")
        if os.environ.get("VERBOSE"):
            print(f"  rc={p.returncode} {' '.join(argv[1:])}\n  {self.last_stderr.strip()}")
        return p.returncode

    def refresh(self) -> int:
        return self.run("--metadata-url", self.repo.url, "--metadata-dir", str(self.mdir), "refresh")

    def download(self, *names: str) -> int:
        args = ["--metadata-dir", str(self.mdir), "--target-dir", str(self.tdir), "--target-base-url", self.repo.target_url, "--metadata-url", self.repo.url]
        for n in names:
            args += ["--target-name", n]
        return self.run(*args, "download")

    def version(self, role: str) -> int | None:
        p = self.mdir / f"{role}.json"
        return Metadata.from_bytes(p.read_bytes()).signed.version if p.exists() else None

    def local(self, role: str) -> bytes | None:
        p = self.mdir / f"{role}.json"
        return p.read_bytes() if p.exists() else None

    def target(self, path: str) -> bytes | None:
        p = self.tdir / path.replace("/", "%2F")
        return p.read_bytes() if p.exists() else None


def served(repo: Repo, role: str) -> bytes:
    return (repo.meta_dir / f"{role}.json").read_bytes()


# ---------------------------------------------------------------- tests


def test_basic_refresh_and_download():
    r = Repo("basic")
    r.add_target("fw.bin", b"firmware v2")
    r.publish()
    c = Client(r)
    assert c.refresh() == 0, c.last_stderr
    for role in ["root", "timestamp", "snapshot", "targets"]:
        assert c.local(role) == served(r, role), f"{role}.json not stored byte for byte"
    assert c.download("fw.bin") == 0, c.last_stderr
    assert c.target("fw.bin") == b"firmware v2"


def test_target_signed_with_wrong_key():
    r = Repo("wrongkey")
    c = Client(r)
    assert c.refresh() == 0, c.last_stderr
    r.add_target("fw.bin", b"evil")
    r.signers["targets"] = [CryptoSigner.generate_ed25519()]
    r.publish()
    assert c.refresh() == 1
    assert c.version("targets") == 1, "untrusted targets stored"
    assert c.download("fw.bin") == 1 and c.target("fw.bin") is None


def test_replayed_timestamp():
    r = Repo("replay-ts")
    old = served(r, "timestamp")
    r.publish_timestamp()
    c = Client(r)
    assert c.refresh() == 0
    (r.meta_dir / "timestamp.json").write_bytes(old)
    assert c.refresh() == 1
    assert c.version("timestamp") == 2


def test_rolled_back_snapshot_version_in_timestamp():
    r = Repo("rollback-snap-in-ts")
    r.publish_snapshot()
    c = Client(r)
    assert c.refresh() == 0
    r.timestamp.signed.snapshot_meta = MetaFile(version=1)
    r.publish_timestamp()
    assert c.refresh() == 1
    assert c.version("timestamp") == 2


def test_rolled_back_targets_version():
    r = Repo("rollback-targets")
    r.publish()
    c = Client(r)
    assert c.refresh() == 0 and c.version("targets") == 2
    # Snapshot v3 lists targets v1 again (a replay of old targets).
    r.snapshot.signed.meta["targets.json"] = MetaFile(version=1)
    (r.meta_dir / "targets.json").write_bytes((r.meta_dir / "1.targets.json").read_bytes())
    r.publish_snapshot()
    assert c.refresh() == 1
    assert c.version("snapshot") == 2 and c.version("targets") == 2


def test_expired_timestamp():
    r = Repo("expired-ts")
    c = Client(r)
    r.timestamp.signed.expires = past()
    r.publish_timestamp()
    assert c.refresh() == 1
    assert c.local("timestamp") is None


def test_freeze_expired_snapshot():
    r = Repo("freeze-snap")
    r.snapshot.signed.expires = past()
    r.publish_snapshot()
    c = Client(r)
    assert c.refresh() == 1
    assert c.local("snapshot") is None


def test_expired_root():
    r = Repo("expired-root")
    r.root.signed.expires = past()
    r.root.signed.version += 1
    r.publish_root()
    c = Client(r)
    assert c.refresh() == 1
    assert c.local("timestamp") is None


def test_mix_and_match_snapshot():
    r = Repo("mixmatch")
    old_snapshot = served(r, "snapshot")
    r.publish()
    # New timestamp (snapshot v2), old snapshot v1 served in its place.
    (r.meta_dir / "snapshot.json").write_bytes(old_snapshot)
    c = Client(r)
    assert c.refresh() == 1
    assert c.local("snapshot") is None


def test_oversized_target_aborted():
    r = Repo("oversized")
    r.add_target("fw.bin", b"x" * 100, serve=b"x" * 100 + b"y" * 5000)
    r.publish()
    c = Client(r)
    assert c.download("fw.bin") == 1
    assert c.target("fw.bin") is None


def test_endless_target_aborted():
    r = Repo("endless")
    r.add_target("fw.bin", b"z" * 1000)
    r.publish()
    SPECIAL[f"/{r.name}/targets/fw.bin"] = endless
    c = Client(r)
    assert c.download("fw.bin") == 1
    assert c.target("fw.bin") is None


def test_endless_timestamp_aborted():
    r = Repo("endless-ts")
    SPECIAL[f"/{r.name}/metadata/timestamp.json"] = endless
    c = Client(r)
    assert c.refresh() == 1


def test_target_hash_mismatch():
    r = Repo("badhash")
    r.add_target("fw.bin", b"good image", serve=b"evil image")
    r.publish()
    c = Client(r)
    assert c.download("fw.bin") == 1 and c.target("fw.bin") is None


def test_root_rotated_twice():
    r = Repo("root-twice")
    c = Client(r)
    assert c.refresh() == 0
    r.rotate("root")
    r.rotate("root", keytype="ecdsa")
    r.publish()
    assert c.refresh() == 0, c.last_stderr
    assert c.version("root") == 3 and c.local("root") == served(r, "root")
    assert [p for p in REQUESTS if p.startswith("/root-twice/metadata/") and p.endswith(".root.json")][-3:] == [
        "/root-twice/metadata/2.root.json", "/root-twice/metadata/3.root.json", "/root-twice/metadata/4.root.json"]


def test_root_rotation_without_old_signatures():
    r = Repo("root-noold")
    c = Client(r)
    new = CryptoSigner.generate_ed25519()
    for s in r.signers["root"]:
        r.root.signed.revoke_key(s.public_key.keyid, "root")
    r.root.signed.add_key(new.public_key, "root")
    r.root.signed.version += 1
    r.signers["root"] = [new]
    r.publish_root()  # signed by the new key only
    assert c.refresh() == 1
    assert c.version("root") == 1


def test_root_version_skip():
    r = Repo("root-skip")
    c = Client(r)
    r.root.signed.version = 3
    data = r.write(r.root, "root", r.signers["root"], versioned=True)
    (r.meta_dir / "2.root.json").write_bytes(data)  # v3 served as 2.root.json
    assert c.refresh() == 1
    assert c.version("root") == 1


def test_fast_forward_recovery_after_timestamp_key_rotation():
    r = Repo("ffwd")
    r.timestamp.signed.version = 1000
    r.publish_timestamp(bump=False)
    c = Client(r)
    assert c.refresh() == 0 and c.version("timestamp") == 1000
    r.rotate("timestamp")
    r.timestamp.signed.version = 1
    r.publish_timestamp(bump=False)
    assert c.refresh() == 0, c.last_stderr
    assert c.version("timestamp") == 1


def test_delegation_path_patterns_and_terminating():
    r = Repo("deleg")
    r.delegate("targets", "firmware", ["fw/*.bin"], terminating=True)
    r.delegate("targets", "everything", ["*", "fw/*"])
    r.add_target("fw/a.bin", b"from firmware role", role="firmware")
    r.add_target("fw/b.bin", b"only in everything", role="everything")
    r.add_target("notes.txt", b"notes", role="everything")
    r.add_target("fw/sub/c.bin", b"deep", role="firmware")
    r.publish(roles=("firmware", "everything", "targets"))
    c = Client(r)
    assert c.refresh() == 0
    assert not (c.mdir / "firmware.json").exists(), "delegated role fetched before it was needed"
    assert c.download("fw/a.bin") == 0 and c.target("fw/a.bin") == b"from firmware role"
    assert c.download("notes.txt") == 0 and c.target("notes.txt") == b"notes"
    # firmware is terminating for fw/*.bin: "everything" must not be consulted.
    assert c.download("fw/b.bin") == 1 and c.target("fw/b.bin") is None
    # "*" does not cross "/": fw/sub/c.bin is not delegated to firmware.
    assert c.download("fw/sub/c.bin") == 1


def test_delegated_role_wrong_key():
    r = Repo("deleg-wrongkey")
    r.delegate("targets", "firmware", ["*"])
    r.add_target("fw.bin", b"evil", role="firmware")
    r.deleg_signers["firmware"] = [CryptoSigner.generate_ed25519()]
    r.publish(roles=("firmware", "targets"))
    c = Client(r)
    assert c.download("fw.bin") == 1 and c.target("fw.bin") is None


def test_consistent_snapshot_targets_in_subdirectories():
    r = Repo("consistent", consistent=True)
    r.add_target("dir/file.txt", b"hello consistent")
    r.publish()
    c = Client(r)
    assert c.download("dir/file.txt") == 0, c.last_stderr
    assert c.target("dir/file.txt") == b"hello consistent"
    h = hashlib.sha256(b"hello consistent").hexdigest()
    assert f"/consistent/targets/dir/{h}.file.txt" in REQUESTS
    assert "/consistent/metadata/2.snapshot.json" in REQUESTS and "/consistent/metadata/2.targets.json" in REQUESTS


def test_sha512_only_target():
    r = Repo("sha512", consistent=True)
    r.add_target("fw.bin", b"sha512 only", algs=("sha512",))
    r.publish()
    c = Client(r)
    assert c.download("fw.bin") == 0, c.last_stderr
    assert c.target("fw.bin") == b"sha512 only"


def test_changed_timestamp_unchanged_version():
    r = Repo("ts-same-version")
    c = Client(r)
    assert c.refresh() == 0
    before = c.local("timestamp")
    r.timestamp.signed.expires = future(60)
    r.publish_timestamp(bump=False)
    assert served(r, "timestamp") != before
    assert c.refresh() == 0, c.last_stderr
    assert c.local("timestamp") == before, "new timestamp with the same version accepted"


def test_cached_target_not_downloaded_again_and_same_name_when_changed():
    r = Repo("cache")
    r.add_target("fw.bin", b"one")
    r.publish()
    c = Client(r)
    assert c.download("fw.bin") == 0
    n = REQUESTS.count("/cache/targets/fw.bin")
    assert c.download("fw.bin") == 0 and REQUESTS.count("/cache/targets/fw.bin") == n
    r.add_target("fw.bin", b"two")
    r.publish()
    assert c.download("fw.bin") == 0 and c.target("fw.bin") == b"two"


def test_multiple_targets_stop_at_first_failure():
    r = Repo("multi")
    r.add_target("a", b"a")
    r.add_target("c", b"c")
    r.publish()
    c = Client(r)
    assert c.download("a", "missing", "c") == 1
    assert c.target("a") == b"a" and c.target("c") is None


def test_threshold_two_of_three_targets():
    r = Repo("threshold")
    extra = [CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()]
    for s in extra:
        r.root.signed.add_key(s.public_key, "targets")
    r.root.signed.roles["targets"].threshold = 2
    r.root.signed.version += 1
    r.publish_root()
    r.signers["targets"] = r.signers["targets"][:1]
    r.add_target("fw.bin", b"x")
    r.publish()
    c = Client(r)
    assert c.refresh() == 1, "1 of 2 signatures accepted"
    r.signers["targets"] = [r.signers["targets"][0], extra[0]]
    r.publish()
    assert c.refresh() == 0, c.last_stderr


def test_ecdsa_and_rsa_key_types():
    for kt in ("ecdsa", "ecdsa-p384", "rsa", "rsa-pss-sha512", "rsa-pkcs1v15-sha256"):
        r = Repo(f"keys-{kt}", keytype=kt)
        r.add_target("fw.bin", kt.encode())
        r.publish()
        c = Client(r)
        assert c.download("fw.bin") == 0, f"{kt}: {c.last_stderr}"


def test_targets_fast_forward_recovery_after_snapshot_key_rotation():
    r = Repo("ffwd-targets")
    r.targets.signed.version = 99999
    r.publish(bump=False)
    r.publish_snapshot()
    c = Client(r)
    assert c.refresh() == 0 and c.version("targets") == 99999
    r.rotate("snapshot")
    r.targets.signed.version = 1
    r.publish(bump=False)
    r.publish_snapshot()
    assert c.refresh() == 0, c.last_stderr
    assert c.version("targets") == 1


def test_snapshot_listing_lower_targets_without_key_rotation_is_refused():
    r = Repo("no-ffwd")
    r.targets.signed.version = 50
    r.publish(bump=False)
    r.publish_snapshot()
    c = Client(r)
    assert c.refresh() == 0
    r.targets.signed.version = 1
    r.publish(bump=False)
    r.publish_snapshot()
    assert c.refresh() == 1 and c.version("targets") == 50


def test_unusual_role_names_are_quoted():
    for i, name in enumerate(["?", "#", "/delegatedrole", "../delegatedrole"]):
        r = Repo(f"quoting{i}")
        r.delegate("targets", name, ["*"])
        r.add_target("x.bin", b"x", role=name)
        r.publish(roles=(name, "targets"))
        c = Client(r)
        assert c.download("x.bin") == 0, c.last_stderr
        assert f"/quoting{i}/metadata/{quote(name, '')}.json" in REQUESTS
        assert (c.mdir / f"{quote(name, '')}.json").exists()
        assert not any(p.name == "delegatedrole.json" for p in c.mdir.parent.rglob("*.json")), "role name escaped the metadata dir"


def test_metadata_bytes_stored_as_received():
    r = Repo("bytes")
    data = served(r, "timestamp") + b"   \n"
    (r.meta_dir / "timestamp.json").write_bytes(data)
    c = Client(r)
    assert c.refresh() == 0
    assert c.local("timestamp") == data


def test_same_key_under_many_ids_counts_once():
    r = Repo("dupkeys")
    c = Client(r)
    assert c.refresh() == 0
    signer = CryptoSigner.generate_ed25519()
    pub = signer.public_key.to_dict()
    from tuf.api.metadata import Key
    for i in range(3):
        k = Key.from_dict(f"{i:064x}", dict(pub, keyval=dict(pub["keyval"])))
        r.root.signed.add_key(k, "snapshot")
    r.root.signed.roles["snapshot"].threshold = 3
    r.root.signed.version += 1
    r.publish_root()
    # Sign snapshot with the one key under each of its three ids.
    r.snapshot.signed.version += 1
    r.snapshot.signatures.clear()
    from securesystemslib.signer import Signature
    sig = signer.sign(r.snapshot.signed_bytes)
    for i in range(3):
        r.snapshot.signatures[f"{i:064x}"] = Signature(f"{i:064x}", sig.signature)
    data = r.snapshot.to_bytes(JSONSerializer(compact=False))
    (r.meta_dir / "snapshot.json").write_bytes(data)
    r.timestamp.signed.snapshot_meta = MetaFile(version=r.snapshot.signed.version)
    r.publish_timestamp()
    assert c.refresh() == 1
    assert c.version("snapshot") == 1


def test_missing_snapshot_keeps_new_timestamp():
    r = Repo("snap404")
    c = Client(r)
    assert c.refresh() == 0
    r.timestamp.signed.snapshot_meta = MetaFile(version=2)
    r.publish_timestamp()
    (r.meta_dir / "snapshot.json").unlink()
    assert c.refresh() == 1
    assert c.version("timestamp") == 2 and c.version("snapshot") == 1


def test_invalid_initial_root_makes_no_requests():
    r = Repo("badinit")
    import json
    root = json.loads(r.initial_root)
    del root["signed"]["version"]
    r.initial_root = json.dumps(root).encode()
    c = Client(r)
    n = sum(1 for p in REQUESTS if p.startswith("/badinit/"))
    assert c.refresh() == 1
    assert sum(1 for p in REQUESTS if p.startswith("/badinit/")) == n


def test_snapshot_served_as_timestamp_is_refused():
    r = Repo("wrongtype")
    ts_signer = r.signers["timestamp"][0]
    r.root.signed.add_key(ts_signer.public_key, "snapshot")
    r.root.signed.version += 1
    r.publish_root()
    r.signers["snapshot"].append(ts_signer)
    r.snapshot.signed.meta = {"snapshot.json": MetaFile(version=1)}
    r.snapshot.signed.version += 1
    data = r.write(r.snapshot, "snapshot", r.signers["snapshot"], versioned=True)
    (r.meta_dir / "timestamp.json").write_bytes(data)
    c = Client(r)
    assert c.refresh() == 1
    assert c.version("root") == 2 and c.local("timestamp") is None


GRAPHS = {
    # (delegator, role, terminating, paths) in order; expected visit order.
    "dfs": ([("targets", "A", False, ["*"]), ("targets", "B", False, ["*"]), ("A", "C", False, ["*"]), ("A", "D", False, ["*"])], ["A", "C", "D", "B"]),
    "terminating-child": ([("targets", "A", False, ["*"]), ("targets", "B", False, ["*"]), ("A", "C", True, ["*"]), ("A", "D", False, ["*"])], ["A", "C"]),
    "paths-prune-branch": ([("targets", "A", False, ["*.py"]), ("targets", "B", False, ["*"]), ("A", "C", False, ["*"])], ["B"]),
    "cycle": ([("targets", "A", False, ["*"]), ("targets", "B", False, ["*"]), ("B", "C", False, ["*"]), ("C", "D", False, ["*"]), ("D", "B", False, ["*"])], ["A", "B", "C", "D"]),
    "shared-child": ([("targets", "A", False, ["*"]), ("targets", "B", False, ["*"]), ("B", "C", False, ["*"]), ("A", "C", False, ["*"])], ["A", "C", "B"]),
}


def test_delegation_graph_preorder_dfs():
    for gname, (edges, order) in GRAPHS.items():
        r = Repo(f"graph-{gname}")
        for parent, role, term, paths in edges:
            r.delegate(parent, role, paths, terminating=term)
        r.publish(roles=tuple(sorted(r.delegated)) + ("targets",))
        c = Client(r)
        assert c.refresh() == 0, c.last_stderr
        start = len(REQUESTS)
        assert c.download("missingpath") == 1
        fetched = [p.rsplit("/", 1)[1][: -len(".json")] for p in REQUESTS[start:] if p.startswith(f"/graph-{gname}/metadata/")]
        fetched = [f for f in fetched if f not in ("timestamp", "2.root")]
        assert fetched == order, f"{gname}: visited {fetched}, expected {order}"


def test_hearth_fw_repository_is_read_by_python_tuf_and_our_client():
    """Repository made by `hearth fw` (our tools), read by python-tuf's
    ngclient (the reference client) and by hearth-tuf-conformance, through a
    root rotation signed by old and new root keys."""
    if not HEARTH:
        raise AssertionError("path of the hearth binary not given (second argument or $HEARTH_BIN)")
    from tuf.ngclient import Updater

    work = Path(tempfile.mkdtemp(dir=WORK))
    repo_dir = SERVE / "fwrepo"

    def fw(*args):
        p = subprocess.run([HEARTH, "fw", *map(str, args)], capture_output=True, timeout=60, cwd=work)
        assert p.returncode == 0, p.stderr.decode()
        return p.stdout.decode()

    for k in ["r1", "r2", "r3", "t1", "t2", "s", "ts", "nr1", "nr2"]:
        fw("keygen", "--out", work / f"{k}.pem", *(["--ecdsa"] if k in ("r2", "nr2") else []))
    fw("init", "--repo", repo_dir, "--root-key", work / "r1.pem", "--root-key", work / "r2.pem", "--root-key", work / "r3.pem",
       "--root-threshold", 2, "--targets-key", work / "t1.pem", "--targets-key", work / "t2.pem", "--targets-threshold", 2,
       "--snapshot-key", work / "s.pem", "--timestamp-key", work / "ts.pem")
    initial_root = (repo_dir / "metadata" / "1.root.json").read_bytes()
    (work / "fw.bin").write_bytes(b"hearth firmware 2.0.0")
    fw("add-target", "--repo", repo_dir, "--file", work / "fw.bin", "--name", "plug-a1/hearth-2.0.0.bin", "--fw-version", "2.0.0",
       "--hardware-model", "plug-a1", "--targets-key", work / "t1.pem")
    fw("sign", "--repo", repo_dir, "--role", "targets", "--key", work / "t2.pem")
    fw("rotate", "--repo", repo_dir, "--role", "root", "--new-key", work / "nr1.pem", "--new-key", work / "nr2.pem", "--threshold", 2,
       "--root-key", work / "r1.pem", "--root-key", work / "r3.pem", "--root-key", work / "nr1.pem", "--root-key", work / "nr2.pem")
    fw("publish", "--repo", repo_dir, "--snapshot-key", work / "s.pem", "--timestamp-key", work / "ts.pem")

    mdir = work / "py-metadata"
    mdir.mkdir()
    (mdir / "root.json").write_bytes(initial_root)
    up = Updater(str(mdir), f"{BASE_URL}/fwrepo/metadata/", str(work), f"{BASE_URL}/fwrepo/targets/")
    up.refresh()
    assert up._trusted_set.root.version == 2
    info = up.get_targetinfo("plug-a1/hearth-2.0.0.bin")
    assert info is not None and info.unrecognized_fields["custom"]["hearth"]["hardware_model"] == "plug-a1"
    path = up.download_target(info)
    assert Path(path).read_bytes() == b"hearth firmware 2.0.0"

    class FwRepo:
        url = f"{BASE_URL}/fwrepo/metadata"
        target_url = f"{BASE_URL}/fwrepo/targets"

    FwRepo.initial_root = initial_root
    c = Client(FwRepo)
    assert c.download("plug-a1/hearth-2.0.0.bin") == 0, c.last_stderr
    assert c.target("plug-a1/hearth-2.0.0.bin") == b"hearth firmware 2.0.0"
    assert c.version("root") == 2


def test_succinct_hash_bin_delegation():
    from tuf.api.metadata import SuccinctRoles

    r = Repo("succinct")
    signer = CryptoSigner.generate_ed25519()
    succinct = SuccinctRoles([], 1, 3, "bin")
    r.targets.signed.delegations = Delegations(keys={}, succinct_roles=succinct)
    r.targets.signed.add_key(signer.public_key)
    for name in succinct.get_roles():
        r.delegated[name] = Metadata(Targets(expires=future()))
        r.deleg_signers[name] = [signer]
    bin_name = succinct.get_role_for_target("fw/image.bin")
    r.add_target("fw/image.bin", b"binned", role=bin_name)
    # The same path listed in another bin must be ignored (bins are terminating).
    other = next(n for n in succinct.get_roles() if n != bin_name)
    r.add_target("fw/other.bin", b"wrong bin", role=other)
    r.publish(roles=tuple(succinct.get_roles()) + ("targets",))
    c = Client(r)
    assert c.download("fw/image.bin") == 0, c.last_stderr
    assert c.target("fw/image.bin") == b"binned"
    assert f"/succinct/metadata/{bin_name}.json" in REQUESTS
    wrong = succinct.get_role_for_target("fw/other.bin")
    assert (wrong == other) == (c.download("fw/other.bin") == 0)


def main() -> int:
    global BASE_URL
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    BASE_URL = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tests = [(n, f) for n, f in sorted(globals().items()) if n.startswith("test_") and callable(f)]
    passed = failed = 0
    for name, f in tests:
        try:
            f()
            passed += 1
            print(f"PASS {name}")
        except Exception:  # noqa: BLE001 (a test failure of any kind is reported)
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
    server.shutdown()
    shutil.rmtree(WORK, ignore_errors=True)
    print(f"tuf: {passed} passed, {failed} failed")
    return 1 if failed else 0


BASE_URL = ""
if __name__ == "__main__":
    sys.exit(main())
