//! The control endpoint of a running dispatcher's spool: the queue tools (`mxpipe queue ...`)
//! reach a spool that a process holds through a Unix socket inside the spool directory
//! (`control.sock`, mode 0600: only the spool's owner may use it).
//!
//! The protocol is one request line per connection (`list`, `show ID`, `retry ID`,
//! `retry all`, `delete ID`, `stats`) and one JSON line back, `{"ok":true,"text":"..."}`.
//! [`handle`] turns a command into a response as a plain function, so that another endpoint
//! (HTTP) can serve the same. Reading commands read the spool's segments as they are (the
//! writer only appends; a record half-written at the end reads as torn and is left alone);
//! retry and delete become orders to the writer and the loops. Nothing here touches SMTP.

use super::admin::{self, QueueCommand};
use super::store::State;
use crate::engine::orders::QueueOrder;
use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The socket's name inside the spool directory.
pub const SOCKET: &str = "control.sock";

/// The longest request line taken.
const MAX_REQUEST: u64 = 256;

/// How long one client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// False when the command failed; `text` then says why.
    pub ok: bool,
    /// What the command prints (for `list`, `show`, `stats`: the same as on an unheld spool).
    pub text: String,
}

impl Response {
    fn error(text: impl Into<String>) -> Response {
        Response {
            ok: false,
            text: text.into(),
        }
    }
}

/// The request line for `command`.
pub fn request_line(command: QueueCommand) -> String {
    match command {
        QueueCommand::List => "list".into(),
        QueueCommand::Show(id) => format!("show {id}"),
        QueueCommand::Retry(Some(id)) => format!("retry {id}"),
        QueueCommand::Retry(None) => "retry all".into(),
        QueueCommand::Delete(id) => format!("delete {id}"),
        QueueCommand::Stats => "stats".into(),
    }
}

/// Reads a request line; the error names what was wrong with it.
pub fn parse(line: &str) -> Result<QueueCommand, String> {
    let words: Vec<&str> = line.split_ascii_whitespace().collect();
    let id = |word: &str| {
        word.parse::<u64>()
            .map_err(|_| format!("request: message id {word:?} is not a number"))
    };
    match words.as_slice() {
        ["list"] => Ok(QueueCommand::List),
        ["stats"] => Ok(QueueCommand::Stats),
        ["show", n] => Ok(QueueCommand::Show(id(n)?)),
        ["retry", "all"] => Ok(QueueCommand::Retry(None)),
        ["retry", n] => Ok(QueueCommand::Retry(Some(id(n)?))),
        ["delete", n] => Ok(QueueCommand::Delete(id(n)?)),
        _ => Err(format!(
            "request: {line:?} is not one of list, show ID, retry ID, retry all, delete ID, stats"
        )),
    }
}

/// Runs `command` on the running spool at `dir`; `give` passes retry and delete on to the
/// writer and the loops.
pub fn handle(command: QueueCommand, dir: &Path, give: &dyn Fn(QueueOrder)) -> Response {
    let state = match State::load(dir) {
        Ok(state) => state,
        Err(e) => return Response::error(format!("spool {}: {e}", dir.display())),
    };
    let mut text = Vec::new();
    let done = match command {
        QueueCommand::List | QueueCommand::Show(_) | QueueCommand::Stats => {
            admin::report(command, &state, &mut text)
        }
        QueueCommand::Retry(id) => id.map_or(Ok(()), |id| admin::exists(&state, id)).map(|()| {
            give(QueueOrder::Retry(id));
            let n = id.map_or(state.messages.len(), |_| 1);
            text = format!("{n} messages due now\n").into_bytes();
        }),
        QueueCommand::Delete(id) => admin::exists(&state, id).map(|()| {
            give(QueueOrder::Delete(id));
            text = format!("message {id} deleted\n").into_bytes();
        }),
    };
    match done {
        Ok(()) => Response {
            ok: true,
            text: String::from_utf8_lossy(&text).into_owned(),
        },
        Err(e) => Response::error(e),
    }
}

/// Asks the dispatcher holding the spool at `dir`. `None`: no process answers there (no
/// socket, or a stale one left by a crash), so the caller may work on the files itself.
pub fn ask(dir: &Path, command: QueueCommand) -> Result<Option<Response>, String> {
    let path = dir.join(SOCKET);
    let stream = match UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(format!("queue: {}: {e}", path.display())),
    };
    let talk = || -> io::Result<Response> {
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
        (&stream).write_all(format!("{}\n", request_line(command)).as_bytes())?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    };
    talk()
        .map(Some)
        .map_err(|e| format!("queue: {}: {e}", path.display()))
}

/// The control socket of a running spool, served by its own thread.
pub(crate) struct Server {
    path: PathBuf,
    /// The listening socket (a second descriptor of it), shut down to end the accept.
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `dir/control.sock` (mode 0600) and serves it. The caller holds the spool's lock,
    /// so a socket file found there is a crashed process's and is replaced.
    pub fn start(dir: &Path, give: Box<dyn Fn(QueueOrder) + Send>) -> io::Result<Server> {
        let path = dir.join(SOCKET);
        // Bound under another name and renamed once its mode is 0600, so that nobody else
        // can connect in between.
        let staging = dir.join(format!("{SOCKET}.new"));
        let _ = std::fs::remove_file(&staging);
        let listener = UnixListener::bind(&staging)?;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staging, &path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let waker = listener.try_clone()?;
        let thread = {
            let (dir, stop) = (dir.to_path_buf(), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("mxpipe-control".into())
                .spawn(move || serve(listener, &dir, &stop, &*give))?
        };
        Ok(Server {
            path,
            listener: waker,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops serving and removes the socket.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        // Ends the thread's accept (Linux: it returns EINVAL on a socket shut down).
        // SAFETY: shutdown on a descriptor this struct owns.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: UnixListener, dir: &Path, stop: &AtomicBool, give: &dyn Fn(QueueOrder)) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        // One client at a time: requests are rare and short. A client's error ends only its
        // own connection.
        match stream {
            Ok(stream) => {
                let _ = answer(&stream, dir, give);
            }
            // Shut down by `stop` (or a descriptor gone bad): nothing more to serve.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(_) => {}
        }
    }
}

fn answer(stream: &UnixStream, dir: &Path, give: &dyn Fn(QueueOrder)) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(stream.take(MAX_REQUEST)).read_line(&mut line)?;
    let response = match line.strip_suffix('\n') {
        Some(request) => match parse(request) {
            Ok(command) => handle(command, dir, give),
            Err(e) => Response::error(e),
        },
        None => Response::error(format!(
            "request: not a line of at most {MAX_REQUEST} octets"
        )),
    };
    let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
    out.push(b'\n');
    (&*stream).write_all(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_reads_back_from_its_request_line() {
        for command in [
            QueueCommand::List,
            QueueCommand::Show(7),
            QueueCommand::Retry(Some(9)),
            QueueCommand::Retry(None),
            QueueCommand::Delete(3),
            QueueCommand::Stats,
        ] {
            assert_eq!(parse(&request_line(command)), Ok(command));
        }
    }

    #[test]
    fn a_bad_request_is_named() {
        assert_eq!(
            parse("show x"),
            Err("request: message id \"x\" is not a number".into())
        );
        assert!(parse("purge")
            .unwrap_err()
            .contains("\"purge\" is not one of"));
    }
}
