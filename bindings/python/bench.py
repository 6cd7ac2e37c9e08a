"""Python benchmarks (not tests): the bulk enqueue rate and end-to-end delivery to a sink.

Run (with the package installed and an SMTP sink listening, e.g. smtp-sink -u nobody
127.0.0.1:2525 1024):

    python bindings/python/bench.py enqueue --relay 127.0.0.1:2525 --recipients 1000000
    python bindings/python/bench.py e2e --relay 127.0.0.1:2525 --messages 100000 --size 2048

Prints one "result ..." line. enqueue times send_many alone (events off; the engine delivers
meanwhile) and gives the calling thread's CPU time too; e2e sends one-recipient messages like
`mxpipe bench --to RELAY` and stops the clock when every one is delivered.
"""

import argparse
import time

import mxpipe


def bench_body(size: int) -> bytes:
    """The message `mxpipe bench` sends: headers, then a line repeated up to `size` bytes."""
    body = (
        b"From: bench@mxpipe.example\r\nTo: sink@mxpipe.example\r\nSubject: mxpipe bench\r\n"
        b"Message-ID: <bench@mxpipe.example>\r\n\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\r\n"
    while len(body) < size:
        body += line
    return body


def enqueue(args: argparse.Namespace) -> None:
    recipients = [f"user{i}@sink.example" for i in range(args.recipients)]
    with mxpipe.Dispatcher(relay=args.relay, record_events=False,
                           max_messages_per_connection=2**32 - 1) as d:
        wall, cpu = time.perf_counter(), time.thread_time()
        d.send_many("bench@mxpipe.example", recipients, bench_body(args.size),
                    chunk_size=args.chunk)
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        n = d.stats().submitted_recipients
        print(f"result mode=enqueue recipients={n} chunk={args.chunk} seconds={wall:.3f} "
              f"recipients_per_s={n / wall:.0f} recipients_per_cpu_s={n / cpu:.0f}", flush=True)
    # Leaving the block closes the dispatcher, which delivers what is queued first.


def e2e(args: argparse.Namespace) -> None:
    body = bench_body(args.size)
    with mxpipe.Dispatcher(relay=args.relay, record_events=False, ehlo_name="bench.mxpipe.example",
                           max_connections_per_destination=args.connections,
                           max_messages_per_connection=2**32 - 1) as d:
        start = time.perf_counter()
        for _ in range(args.messages):
            d.send("bench@mxpipe.example", ["user0@sink.example"], body)
        assert d.wait_final(600)
        elapsed = time.perf_counter() - start
        stats = d.stats()
    print(f"result mode=e2e messages={args.messages} delivered={stats.delivered} "
          f"seconds={elapsed:.3f} msgs_per_s={args.messages / elapsed:.0f} "
          f"connections={stats.connections_opened}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("enqueue")
    p.add_argument("--relay", required=True)
    p.add_argument("--recipients", type=int, default=1_000_000)
    p.add_argument("--chunk", type=int, default=1000)
    p.add_argument("--size", type=int, default=2048)
    p.set_defaults(run=enqueue)
    p = sub.add_parser("e2e")
    p.add_argument("--relay", required=True)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--connections", type=int, default=20)
    p.set_defaults(run=e2e)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
