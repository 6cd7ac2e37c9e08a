//! The inbound SMTP listener: takes mail for the bounce and unsubscribe domains (and nothing
//! else: other recipients get 550 5.7.1) and hands each message to [`super::Inbound`]; the
//! reply to the end of data is given after processing, so a message is acknowledged only when
//! its outcome and suppression are written (a write failure answers 451 and the sender
//! retries).
//!
//! A deliberately small RFC 5321 server (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT) with
//! bounded lines and message size, to be replaced by the shared sans-IO server of
//! `mxpipe serve` (DESIGN.md "Custody").

use super::report::MAX_REPORT_BYTES;
use super::unsubscribe::Shared;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The longest command line (RFC 5321 4.5.3.1.4: 512 octets; extensions add some).
const MAX_COMMAND: u64 = 2048;
/// The largest message taken; larger ones are refused with 552 (RFC 5321 4.5.3.1.10). Up to
/// it, messages larger than a report may be are taken and quarantined.
pub const MAX_MESSAGE: usize = 2 * MAX_REPORT_BYTES;
/// A client idle this long is disconnected.
const IDLE: Duration = Duration::from_secs(300);
const MAX_RECIPIENTS: usize = 100;

/// Accepts connections until the task is dropped.
pub async fn serve(listener: TcpListener, state: Shared, hostname: String) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        let hostname = hostname.clone();
        tokio::spawn(async move {
            let _ = session(stream, state, &hostname).await;
        });
    }
}

async fn read_line(
    reader: &mut BufReader<TcpStream>,
    line: &mut Vec<u8>,
    limit: u64,
) -> std::io::Result<bool> {
    line.clear();
    let n = tokio::time::timeout(IDLE, (&mut *reader).take(limit).read_until(b'\n', line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "idle"))??;
    Ok(n > 0)
}

async fn session(stream: TcpStream, state: Shared, hostname: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    reader
        .get_mut()
        .write_all(format!("220 {hostname} ESMTP mxpipe inbound\r\n").as_bytes())
        .await?;
    let mut line = Vec::new();
    let mut mail = false;
    let mut recipients: Vec<String> = Vec::new();
    loop {
        if !read_line(&mut reader, &mut line, MAX_COMMAND).await? {
            return Ok(());
        }
        if !line.ends_with(b"\n") {
            reader
                .get_mut()
                .write_all(b"500 5.5.2 line too long\r\n")
                .await?;
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let command = text.trim_end();
        let verb = command
            .split([' ', ':'])
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let reply: String = match verb.as_str() {
            "EHLO" => format!(
                "250-{hostname}\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 SIZE {MAX_MESSAGE}\r\n"
            ),
            "HELO" => format!("250 {hostname}\r\n"),
            "MAIL" => {
                mail = true;
                recipients.clear();
                "250 2.1.0 ok\r\n".into()
            }
            "RCPT" if !mail => "503 5.5.1 MAIL first\r\n".into(),
            "RCPT" => match path_of(command) {
                Some(rcpt) if recipients.len() >= MAX_RECIPIENTS => {
                    let _ = rcpt;
                    "452 4.5.3 too many recipients\r\n".into()
                }
                Some(rcpt) => {
                    let accepted = state.lock().unwrap_or_else(|e| e.into_inner()).accepts(&rcpt);
                    if accepted {
                        recipients.push(rcpt);
                        "250 2.1.5 ok\r\n".into()
                    } else {
                        "550 5.7.1 relay access denied: not a bounce or unsubscribe address\r\n"
                            .into()
                    }
                }
                None => "501 5.1.3 bad recipient address syntax\r\n".into(),
            },
            "DATA" if recipients.is_empty() => "503 5.5.1 no valid recipients\r\n".into(),
            "DATA" => {
                reader
                    .get_mut()
                    .write_all(b"354 end data with <CRLF>.<CRLF>\r\n")
                    .await?;
                let Some(message) = read_data(&mut reader, &mut line).await? else {
                    mail = false;
                    recipients.clear();
                    reader
                        .get_mut()
                        .write_all(b"552 5.3.4 message too big\r\n")
                        .await?;
                    continue;
                };
                let rcpts = std::mem::take(&mut recipients);
                mail = false;
                let state = state.clone();
                let result = tokio::task::spawn_blocking(move || {
                    let mut inbound = state.lock().unwrap_or_else(|e| e.into_inner());
                    inbound.receive(&rcpts, &message, SystemTime::now())
                })
                .await;
                match result {
                    Ok(Ok(_)) => "250 2.0.0 ok: processed\r\n".into(),
                    _ => "451 4.3.0 could not record the report, try again later\r\n".into(),
                }
            }
            "RSET" => {
                mail = false;
                recipients.clear();
                "250 2.0.0 ok\r\n".into()
            }
            "NOOP" => "250 2.0.0 ok\r\n".into(),
            "QUIT" => {
                reader.get_mut().write_all(b"221 2.0.0 bye\r\n").await?;
                return Ok(());
            }
            _ => "502 5.5.1 command not implemented\r\n".into(),
        };
        reader.get_mut().write_all(reply.as_bytes()).await?;
    }
}

/// `RCPT TO:<ann@example.org> PARAMS` → `ann@example.org`.
fn path_of(command: &str) -> Option<String> {
    let open = command.find('<')?;
    let close = command[open..].find('>')? + open;
    let path = &command[open + 1..close];
    // A source route (RFC 5321 4.1.2 "@a,@b:user@d") is dropped.
    let path = path.rsplit(':').next().unwrap_or(path);
    (path.contains('@') && !path.contains(char::is_whitespace)).then(|| path.to_string())
}

/// The message up to the lone "." line, dot-unstuffed (RFC 5321 4.5.2); `None` when larger
/// than [`MAX_MESSAGE`] (the rest is read and dropped).
async fn read_data(
    reader: &mut BufReader<TcpStream>,
    line: &mut Vec<u8>,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut message = Vec::new();
    let mut too_big = false;
    loop {
        if !read_line(reader, line, MAX_MESSAGE as u64).await? {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == b".\r\n" || line == b".\n" {
            return Ok((!too_big).then_some(message));
        }
        let content = line.strip_prefix(b".").unwrap_or(line);
        if message.len() + content.len() > MAX_MESSAGE {
            too_big = true;
            message = Vec::new();
        }
        if !too_big {
            message.extend_from_slice(content);
        }
    }
}
