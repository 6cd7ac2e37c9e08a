//! HTTP injection for applications that do not speak SMTP: `POST /v1/messages` takes a JSON
//! document (see [`document`]) and answers 202 with the message identifiers once the dispatcher
//! has custody (with a spool: fsynced; without one: queued in memory, which the answer says),
//! 400 with the field at fault for bad input, 503 when the queue or the spool is full; `GET
//! /metrics` serves the Prometheus text.
//!
//! [`router`] is an `axum::Router` another listener can merge into its own; [`start`] serves it
//! on a thread of its own with a single-threaded tokio runtime. Waiting for the spool happens
//! on tokio's blocking pool, never on the thread that serves connections. This module does not
//! deliver anything itself: every message goes through [`Dispatcher::submit`].

pub mod document;

use crate::engine::Dispatcher;
use crate::error::Error;
use crate::spool::admin::QueueCommand;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::SystemTime;

/// The largest request body taken: 32 MiB.
pub const MAX_REQUEST: usize = 32 << 20;

/// What the handlers share.
#[derive(Debug)]
pub struct HttpState {
    dispatcher: Arc<Dispatcher>,
    /// The Message-ID domain of built content whose sender is `<>`.
    id_domain: String,
}

impl HttpState {
    pub fn new(dispatcher: Arc<Dispatcher>, id_domain: &str) -> Arc<HttpState> {
        Arc::new(HttpState {
            dispatcher,
            id_domain: id_domain.to_string(),
        })
    }
}

/// The routes: `POST /v1/messages`, `GET /metrics`, and the queue tools on the spool
/// (`GET /v1/queue`, `GET /v1/queue/stats`, `GET /v1/queue/{id}`, `POST /v1/queue/retry`,
/// `POST /v1/queue/{id}/retry`, `DELETE /v1/queue/{id}`).
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/v1/messages", post(post_messages))
        .route("/metrics", get(metrics))
        .route("/v1/queue", get(queue_list))
        .route("/v1/queue/stats", get(queue_stats))
        .route("/v1/queue/retry", post(queue_retry_all))
        .route("/v1/queue/{id}", get(queue_show).delete(queue_delete))
        .route("/v1/queue/{id}/retry", post(queue_retry))
        .layer(DefaultBodyLimit::max(MAX_REQUEST))
        .with_state(state)
}

/// A running HTTP listener; dropping it stops it.
#[derive(Debug)]
pub struct HttpServer {
    local_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// The address it listens on (port 0 in `start` picks one).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops taking connections, lets requests under way finish, and waits for the thread.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shut();
    }
}

/// Listens on `addr` and serves [`router`] on a thread of its own.
pub fn start(addr: SocketAddr, state: Arc<HttpState>) -> std::io::Result<HttpServer> {
    start_router(addr, router(state))
}

/// Listens on `addr` and serves `app` (any of the project's routers) on a thread of its own.
pub fn start_router(addr: SocketAddr, app: Router) -> std::io::Result<HttpServer> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local_addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("mxpipe-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await;
            });
        })?;
    Ok(HttpServer {
        local_addr,
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// A queue command's answer: 200 with the text `mxpipe queue` prints, 400 with why it failed,
/// 404 when there is no spool.
fn queue(state: &HttpState, command: QueueCommand) -> Response {
    match state.dispatcher.queue_control(command) {
        Some(r) if r.ok => answer(StatusCode::OK, json!({ "text": r.text })),
        Some(r) => answer(StatusCode::BAD_REQUEST, json!({ "error": r.text })),
        None => answer(
            StatusCode::NOT_FOUND,
            json!({ "error": "no spool: the queue tools need one" }),
        ),
    }
}

async fn queue_list(State(state): State<Arc<HttpState>>) -> Response {
    queue(&state, QueueCommand::List)
}

async fn queue_stats(State(state): State<Arc<HttpState>>) -> Response {
    queue(&state, QueueCommand::Stats)
}

async fn queue_retry_all(State(state): State<Arc<HttpState>>) -> Response {
    queue(&state, QueueCommand::Retry(None))
}

async fn queue_show(State(state): State<Arc<HttpState>>, Path(id): Path<u64>) -> Response {
    queue(&state, QueueCommand::Show(id))
}

async fn queue_delete(State(state): State<Arc<HttpState>>, Path(id): Path<u64>) -> Response {
    queue(&state, QueueCommand::Delete(id))
}

async fn queue_retry(State(state): State<Arc<HttpState>>, Path(id): Path<u64>) -> Response {
    queue(&state, QueueCommand::Retry(Some(id)))
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.dispatcher.prometheus(),
    )
        .into_response()
}

async fn post_messages(State(state): State<Arc<HttpState>>, body: Bytes) -> Response {
    // Parsing, rendering and waiting for the fsync happen off the serving thread.
    tokio::task::spawn_blocking(move || inject(&state, &body))
        .await
        .unwrap_or_else(|_| {
            answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "internal error"}),
            )
        })
}

fn inject(state: &HttpState, body: &[u8]) -> Response {
    let messages = match document::parse(body)
        .and_then(|doc| doc.messages(&state.id_domain, SystemTime::now()))
    {
        Ok(m) => m,
        Err(r) => {
            return answer(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("{}: {}", r.field, r.error), "field": r.field}),
            )
        }
    };
    let d = &state.dispatcher;
    let mut ids = Vec::with_capacity(messages.len());
    for message in messages {
        match d.submit(message) {
            Ok(id) => ids.push(id),
            Err(e) => {
                let status = match e.error {
                    Error::QueueFull | Error::Spool(_) | Error::ShutDown => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    _ => StatusCode::BAD_REQUEST,
                };
                // What went in before stays in: the answer says which, so that a client
                // retries only the rest.
                let _ = d.sync();
                let mut response = answer(
                    status,
                    json!({"error": e.error.to_string(), "accepted_ids": ids}),
                );
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                }
                return response;
            }
        }
    }
    if d.spool_report().is_some() {
        if let Err(e) = d.sync() {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": e.to_string(), "accepted_ids": []}),
            );
        }
        return answer(
            StatusCode::ACCEPTED,
            json!({"ids": ids, "custody": "spooled"}),
        );
    }
    answer(
        StatusCode::ACCEPTED,
        json!({
            "ids": ids,
            "custody": "queued",
            "note": "no spool: the messages are queued in memory only and are lost if the process stops"
        }),
    )
}
