"""Independent checks of messages mxpipe renders, for tests/campaign.rs.

    python mail_check.py parse FILE.eml...           # JSON: headers, structure, decoded parts
    python mail_check.py keygen DIR                  # DKIM test keys and their DNS records
    python mail_check.py dkim-verify NAME RECORD FILE.eml...   # "pass"/"fail" per file
    python mail_check.py dsn FILE.eml                # JSON: an RFC 3464 report's parts and fields

Parsing is Python's `email` package (policy.default), DKIM verification is dkimpy with the
public key handed over through its dnsfunc hook, keys come from `cryptography`: none of it shares
code with mxpipe.
"""

import base64
import email
import email.policy
import json
import os
import sys


def parse(paths):
    out = []
    for path in paths:
        with open(path, "rb") as f:
            raw = f.read()
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        parts = []
        for part in msg.walk():
            parts.append(part.get_content_type())
        body = {}
        for kind in ("plain", "html"):
            p = msg.get_body(preferencelist=(kind,))
            body[kind] = p.get_content() if p is not None else None
        attachments = []
        for a in msg.iter_attachments():
            attachments.append(
                {
                    "filename": a.get_filename(),
                    "content_type": a.get_content_type(),
                    "data": base64.b64encode(a.get_payload(decode=True)).decode(),
                }
            )
        defects = [str(d) for part in msg.walk() for d in part.defects]
        for name, value in msg.items():
            defects += [str(d) for d in getattr(value, "defects", ())]
        out.append(
            {
                "subject": str(msg["subject"]),
                "from": str(msg["from"]),
                "to": str(msg["to"]),
                "from_display": msg["from"].addresses[0].display_name,
                "from_address": msg["from"].addresses[0].addr_spec,
                "to_display": msg["to"].addresses[0].display_name,
                "to_address": msg["to"].addresses[0].addr_spec,
                "date": str(msg["date"]),
                "message_id": str(msg["message-id"]),
                "list_unsubscribe": str(msg["list-unsubscribe"]),
                "list_unsubscribe_post": str(msg["list-unsubscribe-post"]),
                "mime_version": str(msg["mime-version"]),
                "structure": parts,
                "text": body["plain"],
                "html": body["html"],
                "attachments": attachments,
                "defects": defects,
                "max_line": max(len(l) for l in raw.split(b"\r\n")),
                "bare_lf": raw.replace(b"\r\n", b"").count(b"\n"),
            }
        )
    json.dump(out, sys.stdout)


def dsn(path):
    """Reads a delivery status notification as a mail client would: the report's structure,
    its per-message and per-recipient fields, and the returned message or headers."""
    with open(path, "rb") as f:
        raw = f.read()
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    parts = msg.get_payload() if msg.is_multipart() else []
    status = next((p for p in parts if p.get_content_type() == "message/delivery-status"), None)
    blocks = status.get_payload() if status is not None else []
    returned = parts[2] if len(parts) > 2 else None
    if returned is None:
        returned_text = None
    elif returned.get_content_type() == "message/rfc822":
        returned_text = returned.get_payload()[0].as_bytes(policy=email.policy.SMTP).decode("ascii", "replace")
    else:
        returned_text = returned.get_payload(decode=True).decode("ascii", "replace")
    defects = [str(d) for part in msg.walk() for d in part.defects]
    json.dump(
        {
            "content_type": msg.get_content_type(),
            "report_type": msg.get_param("report-type"),
            "to": str(msg["to"]),
            "auto_submitted": str(msg["auto-submitted"]),
            "parts": [p.get_content_type() for p in parts],
            "per_message": {k: str(v) for k, v in blocks[0].items()} if blocks else {},
            "per_recipient": [{k: str(v) for k, v in b.items()} for b in blocks[1:]],
            "returned_type": returned.get_content_type() if returned is not None else None,
            "returned": returned_text,
            "defects": defects,
        },
        sys.stdout,
    )


def keygen(directory):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    def write(name, data):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)

    nopass = serialization.NoEncryption()
    pem = serialization.Encoding.PEM
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write("rsa-pkcs8.pem", rsa_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopass))
    write(
        "rsa-pkcs1.pem",
        rsa_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, nopass),
    )
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    write("rsa-1024.pem", small.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopass))
    ed_key = ed25519.Ed25519PrivateKey.generate()
    write("ed25519.pem", ed_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopass))
    rsa_public = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ed_public = ed_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    records = {
        "rsa": "v=DKIM1; k=rsa; p=" + base64.b64encode(rsa_public).decode(),
        "ed25519": "v=DKIM1; k=ed25519; p=" + base64.b64encode(ed_public).decode(),
    }
    write("records.json", json.dumps(records).encode())


def dkim_verify(name, record, paths):
    import dkim

    if "k=ed25519" in record:
        try:
            import nacl.signing  # noqa: F401  (dkimpy verifies Ed25519 with PyNaCl)
        except ImportError:
            sys.exit("pynacl is not installed: dkimpy needs it for Ed25519 (tests/run.sh installs it)")

    def dnsfunc(query, timeout=5):
        wanted = name.encode() + b"."
        q = query if isinstance(query, bytes) else query.encode()
        if q.rstrip(b".") + b"." == wanted:
            return record.encode()
        return None

    for path in paths:
        with open(path, "rb") as f:
            raw = f.read()
        ok = dkim.verify(raw, dnsfunc=dnsfunc)
        print("pass" if ok else "fail")


def main():
    command = sys.argv[1]
    if command == "parse":
        parse(sys.argv[2:])
    elif command == "dsn":
        dsn(sys.argv[2])
    elif command == "keygen":
        keygen(sys.argv[2])
    elif command == "dkim-verify":
        dkim_verify(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit("unknown command " + command)


if __name__ == "__main__":
    main()
