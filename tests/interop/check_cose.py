#!/usr/bin/env python3
"""Checks Hearth's COSE_Sign1 (ES256) envelopes against pycose, an
independent implementation (ADR 0001: "pycose can check us").

For every vector hearth-proto committed in crates/hearth-proto/tests/data/:
  * pycose decodes the tagged COSE_Sign1 and verifies it with the SEC1 key;
  * the protected header says ES256, the right kid and content type;
  * cbor2 reads the payload as the map the vector documents;
  * python-ecdsa's RFC 6979 signature over the Sig_structure equals ours,
    byte for byte (so our signatures are the deterministic ones);
  * a flipped signature bit does not verify (the check is not vacuous).

It also checks the vector pycose made (python_command.cose.json), which the
Rust test `vectors::python_made_command_is_accepted` feeds to the device's
decision function. `--write` regenerates that file.

Ends with a line "N passed, M failed"; the exit status is 1 on any failure.
"""

import argparse
import hashlib
import json
import pathlib
import sys
import traceback

import cbor2
import ecdsa
from ecdsa.util import sigencode_string
from pycose.algorithms import Es256
from pycose.headers import KID, Algorithm, ContentType
from pycose.keys import EC2Key
from pycose.keys.curves import P256
from pycose.messages import Sign1Message

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT / "crates" / "hearth-proto" / "tests" / "data"
PYTHON_VECTOR = DATA / "python_command.cose.json"
COSE_SIGN1_TAG = 0xD2  # CBOR tag 18, one-byte head (RFC 9052 §4.2).
COMMAND_CT = "application/hearth.command.v1+cbor"


def public_key(sec1_hex):
    """An EC2 verification key from a SEC1 uncompressed point."""
    sec1 = bytes.fromhex(sec1_hex)
    assert len(sec1) == 65 and sec1[0] == 0x04, "expected an uncompressed SEC1 point"
    return EC2Key(crv=P256, x=sec1[1:33], y=sec1[33:])


def sig_structure(protected, payload):
    """RFC 9052 §4.4 Sig_structure for COSE_Sign1 with no external AAD."""
    return cbor2.dumps(["Signature1", protected, b"", payload])


def check_vector(path):
    """Verifies one vector file; raises AssertionError on any mismatch."""
    v = json.loads(path.read_text())
    raw = bytes.fromhex(v["cose_sign1_hex"])
    assert raw[0] == COSE_SIGN1_TAG, "not a tagged COSE_Sign1"

    msg = Sign1Message.decode(raw)
    assert msg.phdr.get(Algorithm) is Es256 or msg.phdr.get(Algorithm) == Es256, f"alg is {msg.phdr.get(Algorithm)}"
    assert msg.phdr.get(KID) == bytes.fromhex(v["kid_hex"]), "kid differs"
    assert msg.phdr.get(ContentType) == v["content_type"], f"content type is {msg.phdr.get(ContentType)!r}"
    assert not msg.uhdr, f"unexpected unprotected headers {msg.uhdr}"
    assert msg.payload == bytes.fromhex(v["payload_cbor_hex"]), "payload differs"
    assert cbor2.loads(msg.payload) == v["payload"], "CBOR payload is not the documented map"

    msg.key = public_key(v["public_key_sec1_hex"])
    assert msg.verify_signature(), "pycose rejects the signature"

    # The private key is a test scalar; recompute the signature independently.
    sk = ecdsa.SigningKey.from_string(bytes.fromhex(v["private_key_hex"]), curve=ecdsa.NIST256p)
    assert sk.get_verifying_key().to_string("uncompressed").hex() == v["public_key_sec1_hex"], "key pair mismatch"
    outer = cbor2.loads(raw).value
    protected, signature = outer[0], outer[3]
    tbs = sig_structure(protected, msg.payload)
    if path != PYTHON_VECTOR:
        ours = sk.sign_deterministic(tbs, hashfunc=hashlib.sha256, sigencode=sigencode_string)
        assert ours == signature, "signature is not the RFC 6979 one"

    bad = bytearray(raw)
    bad[-1] ^= 1
    tampered = Sign1Message.decode(bytes(bad))
    tampered.key = public_key(v["public_key_sec1_hex"])
    assert not tampered.verify_signature(), "a flipped signature bit still verifies"


def make_python_vector():
    """A command signed by pycose with key [3;32], for the Rust side."""
    d = bytes([3] * 32)
    sk = ecdsa.SigningKey.from_string(d, curve=ecdsa.NIST256p)
    sec1 = sk.get_verifying_key().to_string("uncompressed")
    # A controller id is the first 16 bytes of SHA-256 over the SEC1 key.
    kid = hashlib.sha256(sec1).digest()[:16]
    payload = {
        "v": 1,
        "device": "11" * 12,
        "controller": kid.hex(),
        "counter": 1,
        "issued_at": 1_700_000_000,
        "command": {"op": "toggle"},
    }
    cbor_payload = cbor2.dumps(payload)
    msg = Sign1Message(
        phdr={Algorithm: Es256, KID: kid, ContentType: COMMAND_CT},
        payload=cbor_payload,
    )
    msg.key = EC2Key(crv=P256, d=d, x=sec1[1:33], y=sec1[33:])
    raw = msg.encode(tag=True)
    return {
        "description": "Made by pycose (tests/interop/check_cose.py --write): controller key [3;32] toggles device 111111111111111111111111.",
        "private_key_hex": d.hex(),
        "public_key_sec1_hex": sec1.hex(),
        "kid_hex": kid.hex(),
        "content_type": COMMAND_CT,
        "payload_cbor_hex": cbor_payload.hex(),
        "payload": payload,
        "cose_sign1_hex": raw.hex(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"regenerate {PYTHON_VECTOR.name}")
    args = parser.parse_args()
    if args.write:
        PYTHON_VECTOR.write_text(json.dumps(make_python_vector(), indent=2) + "\n")
        print(f"wrote {PYTHON_VECTOR.relative_to(ROOT)}")

    checks = [(p.name, (lambda p=p: check_vector(p))) for p in sorted(DATA.glob("*.cose.json"))]
    # A freshly made vector must verify too, so the Python side is not just
    # replaying a file that happens to be right.
    fresh = DATA / ".fresh-python-vector.json"

    def fresh_round_trip():
        fresh.write_text(json.dumps(make_python_vector()))
        try:
            check_vector(fresh)
        finally:
            fresh.unlink()

    checks.append(("fresh pycose-made command", fresh_round_trip))
    if not any(name == "python_command.cose.json" for name, _ in checks):
        checks.append(("python_command.cose.json exists", lambda: (_ for _ in ()).throw(AssertionError("missing; run with --write"))))

    passed = failed = 0
    for name, check in checks:
        try:
            check()
        except Exception:  # noqa: BLE001 - every failure is reported, then counted
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
        else:
            passed += 1
            print(f"ok   {name}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
