"""Put work into Redis for ``mxpipe node`` processes, and read their outcomes.

Pure Python over the ``redis`` package (``pip install redis``); it does not load the mxpipe
library, so a producer needs neither Rust nor the native engine::

    import redis
    from mxpipe import redis_work

    r = redis.Redis(port=6379)
    redis_work.store_body(r, "march", open("march.eml", "rb").read())
    redis_work.enqueue(r, "news@example.org",
                       ["a@example.net", {"to": "b@example.net", "fields": {"name": "Bo"}}],
                       body_ref="march")
    for outcome in redis_work.outcomes(r):
        print(outcome["recipient"], outcome["status"], outcome["code"], outcome["text"])

The entry format (README, "Scale-out through Redis") is that of ``mxpipe enqueue``: fields
``from``, ``to`` (a JSON array of addresses or ``{"to", "fields"}`` objects), ``body`` or
``body_ref`` and an optional ``tag``, in the stream ``{NAMESPACE}:work``. With a Redis Cluster
client every key shares the hash tag ``{NAMESPACE}``, so one slot holds them all.
"""

import json
from typing import Any, Dict, Iterable, Iterator, List, Optional, Union

Recipient = Union[str, Dict[str, Any]]

__all__ = ["store_body", "enqueue", "enqueue_many", "outcomes", "work_key"]

_GROUP = "nodes"


def _key(namespace: str, name: str) -> str:
    return "{%s}:%s" % (namespace, name)


def work_key(namespace: str = "mxpipe") -> str:
    """The stream nodes read their work from."""
    return _key(namespace, "work")


def store_body(r: Any, name: str, content: bytes, namespace: str = "mxpipe") -> None:
    """Stores a message once under ``{NAMESPACE}:body:NAME`` for entries with ``body_ref``."""
    if not name:
        raise ValueError("name: empty")
    r.set(_key(namespace, "body:" + name), content)


def _check_recipient(index: int, rcpt: Recipient) -> Recipient:
    if isinstance(rcpt, str):
        address = rcpt
    elif isinstance(rcpt, dict) and isinstance(rcpt.get("to"), str):
        address = rcpt["to"]
        fields = rcpt.get("fields", {})
        if not isinstance(fields, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in fields.items()
        ):
            raise ValueError("recipients[%d].fields: must map names to strings" % index)
    else:
        raise ValueError('recipients[%d]: an address or {"to": ..., "fields": {...}}' % index)
    if not address or any(c in address for c in "\r\n\0 "):
        raise ValueError("recipients[%d]: not an address: %r" % (index, address))
    return rcpt


def _fields(
    sender: str,
    recipients: List[Recipient],
    body: Optional[bytes],
    body_ref: Optional[str],
    tag: int,
) -> Dict[str, Union[str, bytes]]:
    if any(c in sender for c in "\r\n\0 "):
        raise ValueError("sender: not an address: %r" % sender)
    if not recipients:
        raise ValueError("recipients: empty")
    checked = [_check_recipient(i, r) for i, r in enumerate(recipients)]
    if (body is None) == (body_ref is None):
        raise ValueError("body: give body or body_ref, not both or neither")
    fields: Dict[str, Union[str, bytes]] = {"from": sender, "to": json.dumps(checked)}
    if body is not None:
        fields["body"] = body
    else:
        fields["body_ref"] = str(body_ref)
    if not 0 <= tag < 2**64:
        raise ValueError("tag: a number from 0 to 2**64-1")
    if tag:
        fields["tag"] = str(tag)
    return fields


def _ensure_group(r: Any, namespace: str) -> None:
    try:
        r.xgroup_create(work_key(namespace), _GROUP, id="0", mkstream=True)
    except Exception as e:  # BUSYGROUP: it exists already
        if "BUSYGROUP" not in str(e):
            raise


def enqueue(
    r: Any,
    sender: str,
    recipients: Iterable[Recipient],
    body: Optional[bytes] = None,
    body_ref: Optional[str] = None,
    tag: int = 0,
    namespace: str = "mxpipe",
) -> str:
    """Adds one entry (one message to its recipients); returns its stream ID."""
    fields = _fields(sender, list(recipients), body, body_ref, tag)
    _ensure_group(r, namespace)
    entry_id = r.xadd(work_key(namespace), fields)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def enqueue_many(
    r: Any,
    sender: str,
    recipients: Iterable[Recipient],
    body_ref: str,
    per_entry: int = 100,
    tag: int = 0,
    namespace: str = "mxpipe",
) -> List[str]:
    """Adds entries of ``per_entry`` recipients each for a body stored once, pipelined."""
    if per_entry < 1:
        raise ValueError("per_entry: at least 1")
    everyone = list(recipients)
    chunks = [everyone[i : i + per_entry] for i in range(0, len(everyone), per_entry)]
    entries = [_fields(sender, c, None, body_ref, tag) for c in chunks]
    _ensure_group(r, namespace)
    ids: List[str] = []
    for start in range(0, len(entries), 1000):
        pipe = r.pipeline(transaction=False)
        for fields in entries[start : start + 1000]:
            pipe.xadd(work_key(namespace), fields)
        ids.extend(i.decode() if isinstance(i, bytes) else str(i) for i in pipe.execute())
    return ids


def outcomes(r: Any, namespace: str = "mxpipe", start: str = "-") -> Iterator[Dict[str, Any]]:
    """Every outcome the nodes wrote (final ones and deferrals), oldest first; each carries
    ``stream_id``, the ID of the outcomes entry it came in (resume after it with ``start``)."""
    key = _key(namespace, "outcomes")
    cursor = start
    while True:
        batch = r.xrange(key, min=cursor, count=1000)
        if not batch:
            return
        for stream_id, fields in batch:
            sid = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
            raw = fields.get(b"outcomes", fields.get("outcomes"))
            for item in json.loads(raw):
                item["stream_id"] = sid
                yield item
        last = batch[-1][0]
        last = last.decode() if isinstance(last, bytes) else last
        cursor = "(" + last
