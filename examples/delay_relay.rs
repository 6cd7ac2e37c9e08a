//! A TCP relay that adds a fixed round-trip time, for benchmarks on loopback (this kernel has no
//! netem): `delay_relay LISTEN_PORT UPSTREAM_HOST:PORT RTT_MS`.
//!
//! It listens on 127.0.0.1:LISTEN_PORT and opens one upstream connection per client connection.
//! Each direction has a reader thread, which stamps every chunk with the instant it arrived, and
//! a writer thread, which sleeps until that instant plus RTT_MS / 2 and writes it: order and bytes
//! are kept exactly, and a stream of chunks is delayed, not slowed. TCP_NODELAY on both sides; an
//! end of stream is passed on as a half close after the same delay. It prints `ready` once it
//! listens and runs until killed.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream, rtt] = args.as_slice() else {
        return Err("usage: delay_relay LISTEN_PORT UPSTREAM_HOST:PORT RTT_MS".into());
    };
    let port: u16 = listen
        .parse()
        .map_err(|e| format!("LISTEN_PORT {listen:?}: {e}"))?;
    let rtt_ms: f64 = rtt.parse().map_err(|e| format!("RTT_MS {rtt:?}: {e}"))?;
    let delay =
        Duration::try_from_secs_f64(rtt_ms / 2000.0).map_err(|e| format!("RTT_MS {rtt:?}: {e}"))?;
    let listener = TcpListener::bind(("127.0.0.1", port))
        .map_err(|e| format!("listen on 127.0.0.1:{port}: {e}"))?;
    println!("ready");
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let upstream = upstream.clone();
        thread::spawn(move || match TcpStream::connect(&upstream) {
            Ok(server) => relay(client, server, delay),
            Err(e) => eprintln!("delay_relay: connect to {upstream}: {e}"),
        });
    }
    Ok(())
}

/// Both directions of one client connection, until each has ended.
fn relay(client: TcpStream, server: TcpStream, delay: Duration) {
    let streams = (|| {
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        Ok::<_, std::io::Error>((client.try_clone()?, server.try_clone()?))
    })();
    let Ok((client_out, server_out)) = streams else {
        return;
    };
    let upward = thread::spawn(move || pump(client, server_out, delay));
    pump(server, client_out, delay);
    let _ = upward.join();
}

/// Copies `from` to `to`, each chunk written `delay` after it was read.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (chunks, queued) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = thread::spawn(move || {
        for (arrived, data) in queued {
            let due = arrived + delay;
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if data.is_empty() {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            if to.write_all(&data).is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // A read error ends the stream like an end of file.
        let n = from.read(&mut buf).unwrap_or(0);
        if chunks.send((Instant::now(), buf[..n].to_vec())).is_err() || n == 0 {
            break;
        }
    }
    let _ = writer.join();
}
