//! The server's TLS layer: the rustls server configuration built from a PEM certificate and
//! key, and the per-connection state that moves octets between the socket, rustls and the
//! session's buffers.
//!
//! It keeps the server's batching over TLS: the socket is read into a large ciphertext buffer with
//! one call, rustls decrypts all of it (it takes at most 4 KB per `read_tls`, so it is fed from
//! memory rather than from the socket) before the session sees any, and the replies to a batch
//! are encrypted together and leave in one vectored write. It makes no protocol decisions and
//! must not block.

use std::io::{self, Read as _, Write as _};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};

use super::listener::{Received, Sent};
use super::Counters;

/// Ciphertext read from the socket at once: as much as the session's plaintext buffer holds, so
/// that one read can carry a whole pipelined batch.
const CIPHERTEXT_CAPACITY: usize = 64 * 1024;

/// Builds the server configuration once, at start, so that a certificate or key that cannot be
/// used is reported to whoever starts the server rather than to each client. `what` names the
/// server in errors ("sink", "serve listener 127.0.0.1:2525").
pub(crate) fn server_config(
    what: &str,
    cert_chain_pem: &[u8],
    key_pem: &[u8],
) -> io::Result<Arc<ServerConfig>> {
    let invalid = |problem: String| io::Error::new(io::ErrorKind::InvalidInput, problem);
    let chain = CertificateDer::pem_slice_iter(cert_chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| invalid(format!("{what} TLS certificate chain: {error}")))?;
    if chain.is_empty() {
        return Err(invalid(format!(
            "{what} TLS certificate chain: no CERTIFICATE in the PEM"
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|error| invalid(format!("{what} TLS private key: {error}")))?;
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|error| invalid(format!("{what} TLS: {error}")))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|error| invalid(format!("{what} TLS certificate and key: {error}")))?;
    Ok(Arc::new(config))
}

/// One connection's TLS state, from the STARTTLS reply on (implicit TLS: from accept).
pub(super) struct TlsLayer {
    connection: ServerConnection,
    /// `ciphertext[taken..filled]` was read from the socket and not yet given to rustls.
    ciphertext: Box<[u8]>,
    taken: usize,
    filled: usize,
    /// The handshake has completed (and was counted).
    established: bool,
}

impl TlsLayer {
    pub(super) fn new(config: &Arc<ServerConfig>) -> Result<TlsLayer, rustls::Error> {
        let mut connection = ServerConnection::new(Arc::clone(config))?;
        // The session stops producing replies above its high-water mark until the socket has
        // taken everything, which bounds what rustls holds; its own limit would only make
        // `send` split batches.
        connection.set_buffer_limit(None);
        Ok(TlsLayer {
            connection,
            ciphertext: vec![0; CIPHERTEXT_CAPACITY].into_boxed_slice(),
            taken: 0,
            filled: 0,
            established: false,
        })
    }

    /// Until the handshake is done, replies given to rustls wait inside it.
    pub(super) fn is_handshaking(&self) -> bool {
        self.connection.is_handshaking()
    }

    /// Encrypts `output` (and empties it), then writes every pending record.
    pub(super) fn send(&mut self, output: &mut Vec<u8>, stream: &mut TcpStream) -> Sent {
        if !output.is_empty() {
            // Without a buffer limit rustls takes everything.
            if self.connection.writer().write_all(output).is_err() {
                return Sent::Failed;
            }
            output.clear();
        }
        while self.connection.wants_write() {
            match self.connection.write_tls(stream) {
                Ok(0) => return Sent::Failed,
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Sent::Blocked,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Sent::Failed,
            }
        }
        Sent::All
    }

    /// Puts decrypted octets into `room`: all that the ciphertext already read yields (as much
    /// as fits), else what one more socket read yields. Reads the socket only when `may_read`
    /// (see the short-read note in the server), and updates it. Returns early, possibly with
    /// no octets, when the handshake has something to send.
    pub(super) fn receive(
        &mut self,
        stream: &mut TcpStream,
        room: &mut [u8],
        may_read: &mut bool,
        counters: &Counters,
    ) -> Received {
        let mut got = 0;
        loop {
            if got == room.len() {
                return Received::Input(got);
            }
            match self.connection.reader().read(&mut room[got..]) {
                // close_notify: the client will send nothing more.
                Ok(0) if got == 0 => return Received::End,
                Ok(0) => return Received::Input(got),
                Ok(n) => {
                    got += n;
                    continue;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Received::End,
            }
            if self.connection.wants_write() {
                return Received::Input(got);
            }
            if self.taken < self.filled {
                let mut rest = &self.ciphertext[self.taken..self.filled];
                match self.connection.read_tls(&mut rest) {
                    Ok(n) if n > 0 => self.taken += n,
                    // Zero from a non-empty slice: rustls takes nothing more (close_notify).
                    _ => return Received::End,
                }
                if self.connection.process_new_packets().is_err() {
                    // Send the alert that says why, if the socket takes it.
                    let _ = self.connection.write_tls(stream);
                    return Received::End;
                }
                if !self.established && !self.connection.is_handshaking() {
                    self.established = true;
                    counters.tls_handshakes.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            // Let the session answer what this read brought before reading again, so that
            // one batch gets one write.
            if got > 0 {
                return Received::Input(got);
            }
            if !*may_read {
                return Received::Wait;
            }
            match stream.read(&mut self.ciphertext) {
                Ok(0) => return Received::End,
                Ok(n) => {
                    *may_read = n == self.ciphertext.len();
                    self.taken = 0;
                    self.filled = n;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Received::Wait,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Received::End,
            }
        }
    }

    /// Sends close_notify (RFC 8446 6.1) if the socket takes it, before the sink's FIN.
    pub(super) fn close(&mut self, stream: &mut TcpStream) {
        self.connection.send_close_notify();
        let _ = self.connection.write_tls(stream);
    }
}
