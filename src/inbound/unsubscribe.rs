//! RFC 8058 one-click unsubscribe: the token a campaign puts in its List-Unsubscribe URL, its
//! constant-time check, and the HTTP endpoint that answers the POST.
//!
//! A campaign with `list_unsubscribe.secret_env` appends `u=<address>&t=<token>` to its URL,
//! where the token is HMAC-SHA256 over the lower-cased address keyed with the campaign's secret
//! (base64url, unpadded): nobody without the secret can unsubscribe someone else. The request
//! logic is [`super::Inbound::one_click`], a plain function; [`router`] only moves it onto HTTP.

use super::Inbound;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use ring::hmac;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The token for `address` under `secret`.
pub fn token(secret: &[u8], address: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, address.to_lowercase().as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
}

/// Whether `token` is the one for `address`; the comparison takes the same time wherever the
/// bytes differ (`ring::hmac::verify`).
pub fn verify(secret: &[u8], address: &str, token: &str) -> bool {
    let Ok(tag) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token.trim()) else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, address.to_lowercase().as_bytes(), &tag).is_ok()
}

/// `url` with `u=` and `t=` appended: the List-Unsubscribe URL a campaign writes.
pub fn signed_url(url: &str, secret: &[u8], address: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    let mut out = String::with_capacity(url.len() + address.len() + 60);
    out.push_str(url);
    out.push(separator);
    out.push_str("u=");
    for b in address.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out.push_str("&t=");
    out.push_str(&token(secret, address));
    out
}

/// What a one-click request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OneClick {
    /// Unsubscribed now (or already was: the request is idempotent).
    Unsubscribed,
    /// The token does not match the address: refused and counted.
    Forged,
    /// No such campaign, or it takes no one-click requests.
    UnknownCampaign,
    /// The body is not `List-Unsubscribe=One-Click`, or `u`/`t` are missing (RFC 8058 3.2).
    BadRequest,
    /// The suppression or outcomes file could not be written: try again later.
    Unavailable,
}

impl OneClick {
    pub fn status(self) -> StatusCode {
        match self {
            OneClick::Unsubscribed => StatusCode::OK,
            OneClick::Forged => StatusCode::FORBIDDEN,
            OneClick::UnknownCampaign => StatusCode::NOT_FOUND,
            OneClick::BadRequest => StatusCode::BAD_REQUEST,
            OneClick::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            OneClick::Unsubscribed => "unsubscribed\n",
            OneClick::Forged => "the unsubscribe link is not valid\n",
            OneClick::UnknownCampaign => "no such list\n",
            OneClick::BadRequest => "expected a POST with List-Unsubscribe=One-Click\n",
            OneClick::Unavailable => "try again later\n",
        }
    }
}

/// Whether a POST body asks for one-click unsubscription (RFC 8058 3.2: the key/value pair
/// `List-Unsubscribe=One-Click`, form-urlencoded or multipart/form-data).
pub fn is_one_click_body(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body);
    if text
        .split('&')
        .any(|pair| pair.trim() == "List-Unsubscribe=One-Click")
    {
        return true;
    }
    // multipart/form-data: a part named List-Unsubscribe whose value is One-Click.
    text.contains("name=\"List-Unsubscribe\"")
        && text
            .split("name=\"List-Unsubscribe\"")
            .nth(1)
            .and_then(|rest| {
                rest.split("\r\n\r\n")
                    .nth(1)
                    .or_else(|| rest.split("\n\n").nth(1))
            })
            .is_some_and(|value| value.trim_start().starts_with("One-Click"))
}

/// The shared processor the endpoints use.
pub type Shared = Arc<Mutex<Inbound>>;

/// `POST /unsubscribe/{campaign}?u=ADDRESS&t=TOKEN` (RFC 8058) and `GET /metrics`
/// (Prometheus text).
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/unsubscribe/{campaign}", post(one_click))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn one_click(
    State(state): State<Shared>,
    Path(campaign): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> (StatusCode, &'static str) {
    let outcome = {
        let mut inbound = state.lock().unwrap_or_else(|e| e.into_inner());
        inbound.one_click(
            &campaign,
            query.get("u").map(String::as_str),
            query.get("t").map(String::as_str),
            &body,
            std::time::SystemTime::now(),
        )
    };
    (outcome.status(), outcome.text())
}

async fn metrics(State(state): State<Shared>) -> String {
    let inbound = state.lock().unwrap_or_else(|e| e.into_inner());
    inbound.metrics().prometheus()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_for_their_address_and_secret() {
        let t = token(b"s3cret", "Ann@Example.net");
        assert!(verify(b"s3cret", "ann@example.net", &t));
        assert!(!verify(b"other", "ann@example.net", &t));
        assert!(!verify(b"s3cret", "bob@example.net", &t));
        assert!(!verify(b"s3cret", "ann@example.net", "not base64 !"));
        assert!(!verify(b"s3cret", "ann@example.net", ""));
        let url = signed_url(
            "https://news.example.org/unsubscribe/digest",
            b"k",
            "o'b+x@e.org",
        );
        assert!(
            url.starts_with("https://news.example.org/unsubscribe/digest?u=o%27b%2Bx%40e.org&t=")
        );
        assert!(signed_url("https://e.org/u?list=1", b"k", "a@e.org")
            .contains("?list=1&u=a%40e.org&t="));
    }

    #[test]
    fn recognises_the_one_click_body() {
        assert!(is_one_click_body(b"List-Unsubscribe=One-Click"));
        assert!(is_one_click_body(b"a=b&List-Unsubscribe=One-Click"));
        assert!(is_one_click_body(
            b"--x\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--x--\r\n"
        ));
        assert!(!is_one_click_body(b""));
        assert!(!is_one_click_body(b"List-Unsubscribe=Maybe"));
    }
}
