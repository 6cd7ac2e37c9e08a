#!/usr/bin/env python3
"""SMTP capture server for mxpipe's integration tests, built on aiosmtpd.

Run: tests/.venv/bin/python tests/servers/capture_server.py --out DIR [--port 0] ...

It listens on --host/--port (port 0 picks a free one), prints exactly one line
`READY <port>` on stdout once it accepts connections, and exits cleanly on
SIGTERM or SIGINT (and, with --stop-on-stdin-eof, when its stdin closes, so a
test process that dies without cleaning up leaves no server behind).

Every accepted message becomes two files in --out, numbered from 1 in the order
the server accepted them:

  <seq:06>.eml   the message bytes exactly as received after dot-unstuffing
                 (RFC 5321 section 4.5.2), CRLF line ends kept
  <seq:06>.json  {"mail_from", "rcpt_tos", "mail_options", "rcpt_options",
                  "size", "tls", "auth_login", "helo"}

The .eml is complete before the .json appears (written to a temporary name and
renamed), so a reader that waits for the .json never sees a partial message.

Fault flags script what a real receiver may answer: --reject-rcpt and
--tempfail-rcpt refuse recipients whose address contains a substring,
--tempfail-first answers 451 to the first N DATA transactions, and
--close-in-data drops the connection once the message content has arrived
instead of replying to it.

Note what aiosmtpd itself refuses: MAIL parameters other than SIZE, BODY and
SMTPUTF8 (e.g. RET=, ENVID=) and every RCPT parameter (e.g. NOTIFY=) get
"555 ... parameters not recognized or not implemented"; data lines longer than
1001 bytes get "500 Line too long" after the final dot; and MAIL/RCPT
parameters are recorded upper-cased.
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys
import threading

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

DEFAULT_SIZE_LIMIT = 64 * 1024 * 1024


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--out", required=True, help="directory for .eml/.json files")
    p.add_argument("--reject-rcpt", action="append", default=[], metavar="SUBSTR",
                   help="550 5.1.1 for recipients containing SUBSTR (repeatable)")
    p.add_argument("--tempfail-rcpt", action="append", default=[], metavar="SUBSTR",
                   help="450 4.2.1 for recipients containing SUBSTR (repeatable)")
    p.add_argument("--tempfail-first", type=int, default=0, metavar="N",
                   help="answer 451 4.3.0 to the first N DATA transactions")
    p.add_argument("--close-in-data", action="store_true",
                   help="drop the connection when message content arrives, without a reply")
    p.add_argument("--auth-user")
    p.add_argument("--auth-pass")
    p.add_argument("--auth-exclude", action="append", default=[],
                   help="do not offer this SASL mechanism (e.g. PLAIN, to test LOGIN)")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--require-starttls", action="store_true",
                   help="answer 530 to commands other than EHLO/NOOP/QUIT/STARTTLS before STARTTLS")
    p.add_argument("--implicit-tls", action="store_true",
                   help="TLS from the first byte (RFC 8314), no STARTTLS")
    p.add_argument("--size-limit", type=int, default=DEFAULT_SIZE_LIMIT, metavar="N",
                   help="data_size_limit in bytes, advertised as SIZE (0 = none)")
    p.add_argument("--hostname", default="capture.test",
                   help="name in the greeting; given so no DNS look-up happens")
    p.add_argument("--stop-on-stdin-eof", action="store_true",
                   help="also exit when stdin closes (the parent test process died)")
    args = p.parse_args(argv)
    if (args.auth_user is None) != (args.auth_pass is None):
        p.error("--auth-user and --auth-pass go together")
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    if (args.require_starttls or args.implicit_tls) and args.tls_cert is None:
        p.error("--require-starttls and --implicit-tls need --tls-cert/--tls-key")
    if args.require_starttls and args.implicit_tls:
        p.error("--require-starttls and --implicit-tls exclude each other")
    return args


class CaptureHandler:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.seq = 0
        self.data_transactions = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if any(s in address for s in self.args.reject_rcpt):
            return "550 5.1.1 User unknown"
        if any(s in address for s in self.args.tempfail_rcpt):
            return "450 4.2.1 Mailbox temporarily unavailable"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.data_transactions += 1
        if self.args.close_in_data:
            # Drop the connection with no reply; the handler coroutine is
            # cancelled by connection_lost, so wait here until that happens.
            server.transport.abort()
            await asyncio.get_running_loop().create_future()
        if self.data_transactions <= self.args.tempfail_first:
            return "451 4.3.0 Temporary failure, try again later"
        self.seq += 1
        self.write_message(self.seq, server, session, envelope)
        return f"250 2.0.0 OK queued as {self.seq:06}"

    def write_message(self, seq, server, session, envelope):
        data = envelope.original_content
        base = os.path.join(self.out, f"{seq:06}")
        with open(base + ".eml", "wb") as f:
            f.write(data)
        auth_login = None
        if session.authenticated and isinstance(session.auth_data, LoginPassword):
            auth_login = session.auth_data.login.decode("utf-8", "surrogateescape")
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "mail_options": list(envelope.mail_options),
            "rcpt_options": list(envelope.rcpt_options),
            "size": len(data),
            "tls": server.transport.get_extra_info("ssl_object") is not None,
            "auth_login": auth_login,
            "helo": session.host_name,
        }
        tmp = base + ".json.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False)
        os.replace(tmp, base + ".json")


def make_authenticator(user, password):
    want = LoginPassword(user.encode(), password.encode())

    def authenticator(server, session, envelope, mechanism, auth_data):
        # handled=False: let aiosmtpd send 535 on failure (True means we replied ourselves).
        return AuthResult(success=auth_data == want, handled=False, auth_data=auth_data)

    return authenticator


async def serve(args):
    os.makedirs(args.out, exist_ok=True)
    handler = CaptureHandler(args)

    tls_context = None
    if args.tls_cert:
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(args.tls_cert, args.tls_key)

    smtp_kwargs = dict(
        data_size_limit=args.size_limit or None,
        enable_SMTPUTF8=True,
        decode_data=False,
        hostname=args.hostname,
        ident="mxpipe-capture",
    )
    if tls_context and not args.implicit_tls:
        smtp_kwargs.update(tls_context=tls_context, require_starttls=args.require_starttls)
    if args.auth_user is not None:
        # aiosmtpd counts only STARTTLS as TLS for auth_require_tls, so with
        # implicit TLS (already encrypted) or no TLS at all the check is off.
        smtp_kwargs.update(
            authenticator=make_authenticator(args.auth_user, args.auth_pass),
            auth_required=True,
            auth_exclude_mechanism=[m.upper() for m in args.auth_exclude],
            auth_require_tls=bool(tls_context) and not args.implicit_tls,
        )
    else:
        # No credentials configured: AUTH is then only advertised after
        # STARTTLS, and always fails there.
        smtp_kwargs.update(auth_require_tls=True)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, loop=loop, **smtp_kwargs),
        host=args.host,
        port=args.port,
        ssl=tls_context if args.implicit_tls else None,
        reuse_address=True,
    )
    port = server.sockets[0].getsockname()[1]

    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))

    if args.stop_on_stdin_eof:
        # Reading a pipe in the event loop would need its own transport; a
        # daemon thread blocked in read() is enough and ends with the process.
        def watch_stdin():
            while sys.stdin.buffer.read(4096):
                pass
            loop.call_soon_threadsafe(lambda: stop.done() or stop.set_result(None))

        threading.Thread(target=watch_stdin, daemon=True).start()

    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()

    await stop
    server.close()
    # Newer Pythons wait here for open connections too; do not hang on one.
    try:
        await asyncio.wait_for(server.wait_closed(), timeout=2)
    except asyncio.TimeoutError:
        pass


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr,
                        format="capture_server: %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
