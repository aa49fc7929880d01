//! The web dashboard (`dashboard.listen`): the seed's instance grid and detail view, fed by the same pushes as
//! `autodevctl top` (Server-Sent Events on `/events`), with stop and resume buttons. Plain HTML, CSS and a small
//! script served from the binary: no CDN, works offline. Served by hyper on the daemon's runtime, on a loopback
//! address only.
//!
//! Every request needs the token `autodevctl dashboard url` prints (kept in the state dir, 0600, so bookmarks
//! survive restarts). The first visit brings it in the URL and gets a session of its own in an HttpOnly,
//! SameSite=Strict cookie (never the token: browsers send a host's cookies to all its ports), then is sent on to a
//! URL without it; pages go out with `Referrer-Policy: no-referrer`. Writes (stop, resume) also need the page's own
//! origin and header: another page on 127.0.0.1 counts as the same site to a browser. A rotation ends every session
//! and every open event stream.

use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};

use super::Shared;

const INDEX: &str = include_str!("index.html");
const STYLE: &str = include_str!("style.css");
const SCRIPT: &str = include_str!("app.js");
const COOKIE: &str = "autodev_session";
/// Sessions kept at most (the oldest go first).
const MAX_SESSIONS: usize = 64;
/// Connections served at once; more wait for a free place.
const MAX_CONNECTIONS: usize = 64;
/// Most frames a browser gets per second.
const FRAMES_PER_SEC: u64 = 4;
/// Frames waiting for a slow browser at most; past it the stream ends (the page reconnects).
const SSE_BUFFER: usize = 4;

type Body = BoxBody<Bytes, Infallible>;

/// The dashboard's token, kept in `<state dir>/dashboard-token`.
pub(super) struct Dashboard {
    path: PathBuf,
    token: Mutex<String>,
    /// Sessions given out since the last rotation, oldest first.
    sessions: Mutex<Vec<String>>,
    /// Bumped by a rotation: open event streams end.
    generation: std::sync::atomic::AtomicU64,
    pub listen: String,
}

impl Dashboard {
    /// Reads the token, or makes one (0600) the first time.
    pub(super) fn load(state_dir: &std::path::Path, listen: String) -> std::io::Result<Dashboard> {
        let path = state_dir.join("dashboard-token");
        let token = match std::fs::read_to_string(&path) {
            Ok(t) if t.trim().len() == 64 && t.trim().bytes().all(|b| b.is_ascii_hexdigit()) => t.trim().to_string(),
            _ => write_token(&path)?,
        };
        Ok(Dashboard {
            path,
            token: Mutex::new(token),
            sessions: Mutex::new(Vec::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
            listen,
        })
    }

    fn token(&self) -> String {
        self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The URL to open (with the token); `rotate` first makes a new token (old bookmarks stop working).
    pub(super) fn url(&self, rotate: bool) -> std::io::Result<String> {
        if rotate {
            let new = write_token(&self.path)?;
            *self.token.lock().unwrap_or_else(|e| e.into_inner()) = new;
            self.sessions.lock().unwrap_or_else(|e| e.into_inner()).clear();
            self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(format!("http://{}/?token={}", self.listen, self.token()))
    }
}

fn write_token(path: &std::path::Path) -> std::io::Result<String> {
    let token = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    // Atomic and 0600, like every file of the state dir.
    crate::ledger::write_atomic(path, token.as_bytes())?;
    Ok(token)
}

/// Serves the dashboard until the daemon ends. A port that cannot be had is said in `status` warnings; the daemon
/// goes on without a dashboard.
pub(super) async fn serve(shared: Arc<Shared>, dashboard: Arc<Dashboard>) {
    let listener = match tokio::net::TcpListener::bind(&dashboard.listen).await {
        Ok(l) => l,
        Err(e) => {
            let why = format!("dashboard: cannot listen on {}: {e}", dashboard.listen);
            tracing::error!("{why}");
            shared.warn(why);
            return;
        }
    };
    tracing::info!(listen = %dashboard.listen, "dashboard: serving (`autodevctl dashboard url` prints its URL)");
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(place) = places.clone().acquire_owned().await else { return };
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (shared, dashboard) = (shared.clone(), dashboard.clone());
        tokio::spawn(async move {
            let _place = place;
            let service = hyper::service::service_fn(move |req| {
                let (shared, dashboard) = (shared.clone(), dashboard.clone());
                async move { Ok::<_, Infallible>(respond(&shared, &dashboard, req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            // A client that sends half a request is let go: it holds no place (or descriptor) for long.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(io, service)
                .await;
        });
    }
}

fn full(status: StatusCode, kind: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, kind.parse().expect("a valid content type"));
    secure(headers);
    response
}

/// What every answer carries: no referrer (the token must not leak through links), no caching, no sniffing, and
/// only the page's own script and style.
fn secure(headers: &mut http::HeaderMap) {
    headers.insert("referrer-policy", "no-referrer".parse().expect("valid"));
    headers.insert(header::CACHE_CONTROL, "no-store".parse().expect("valid"));
    headers.insert("x-content-type-options", "nosniff".parse().expect("valid"));
    headers.insert("content-security-policy", "default-src 'self'; img-src 'self' data:".parse().expect("valid"));
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether one of the request's session cookies is a session given out (another site may have set one too).
fn has_session(req: &Request<Incoming>, dashboard: &Dashboard) -> bool {
    let sessions = dashboard.sessions.lock().unwrap_or_else(|e| e.into_inner());
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(&format!("{COOKIE}=")))
        .any(|given| sessions.iter().any(|s| same(given, s)))
}

/// A write comes from the dashboard's own page: its header (which a page elsewhere cannot send without the
/// browser asking first) and, when the browser says, its origin.
fn from_own_page(req: &Request<Incoming>, dashboard: &Dashboard) -> bool {
    let own_header = req.headers().get("x-autodev").is_some_and(|v| v == "1");
    let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok());
    own_header && origin.is_none_or(|o| o == format!("http://{}", dashboard.listen))
}

fn query_value<'a>(req: &'a Request<Incoming>, key: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

async fn respond(shared: &Arc<Shared>, dashboard: &Dashboard, req: Request<Incoming>) -> Response<Body> {
    let token = dashboard.token();
    if let Some(given) = query_value(&req, "token") {
        if !same(given, &token) {
            return full(StatusCode::UNAUTHORIZED, "text/plain", "the token is wrong: run `autodevctl dashboard url`");
        }
        // A session of its own in a cookie scripts cannot read; the token leaves the address bar.
        let session = format!("{}", uuid::Uuid::new_v4().simple());
        {
            let mut sessions = dashboard.sessions.lock().unwrap_or_else(|e| e.into_inner());
            if sessions.len() >= MAX_SESSIONS {
                sessions.remove(0);
            }
            sessions.push(session.clone());
        }
        let mut response = full(StatusCode::SEE_OTHER, "text/plain", "");
        let headers = response.headers_mut();
        headers.insert(header::LOCATION, "/".parse().expect("valid"));
        let cookie = format!("{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/");
        headers.insert(header::SET_COOKIE, cookie.parse().expect("a token is ASCII"));
        return response;
    }
    if !has_session(&req, dashboard) {
        return full(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "autodev dashboard: open the URL that `autodevctl dashboard url` prints",
        );
    }
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/") => full(StatusCode::OK, "text/html; charset=utf-8", INDEX),
        (&Method::GET, "/style.css") => full(StatusCode::OK, "text/css", STYLE),
        (&Method::GET, "/app.js") => full(StatusCode::OK, "text/javascript", SCRIPT),
        (&Method::GET, "/api/status") => json(&super::server::status_report(shared)),
        (&Method::GET, "/api/history") => {
            let issue = match query_value(&req, "issue").map(|i| i.parse::<u64>()) {
                None => None,
                Some(Ok(n)) => Some(n),
                Some(Err(_)) => return full(StatusCode::BAD_REQUEST, "text/plain", "issue must be a number"),
            };
            match super::handle::history(shared, issue, Some(50)).await {
                Ok(crate::protocol::Reply::History { runs }) => json(&runs),
                Ok(_) => full(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "unexpected reply"),
                Err(e) => full(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.message),
            }
        }
        (&Method::GET, "/events") => events(shared, dashboard),
        (&Method::POST, _) if !from_own_page(&req, dashboard) => {
            full(StatusCode::FORBIDDEN, "text/plain", "writes come from the dashboard's own page only")
        }
        (&Method::POST, p) => {
            let Some(rest) = p.strip_prefix("/api/slots/") else {
                return full(StatusCode::NOT_FOUND, "text/plain", "not found");
            };
            let Some((slot, what)) = rest.rsplit_once('/') else {
                return full(StatusCode::NOT_FOUND, "text/plain", "not found");
            };
            let done = match what {
                "stop" => super::handle::stop(shared, slot, crate::task::StopBy::User).await,
                "resume" => {
                    let how = super::handle::ResumeBy::Person { answer: None, over_budget: false };
                    super::handle::resume(shared, slot, how).await
                }
                _ => return full(StatusCode::NOT_FOUND, "text/plain", "not found"),
            };
            match done {
                Ok(_) => full(StatusCode::OK, "text/plain", "ok"),
                Err(e) => {
                    let status = match e.kind {
                        crate::protocol::ErrorKind::NotFound => StatusCode::NOT_FOUND,
                        crate::protocol::ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
                        crate::protocol::ErrorKind::Conflict => StatusCode::CONFLICT,
                        _ => StatusCode::INTERNAL_SERVER_ERROR,
                    };
                    full(status, "text/plain", e.message)
                }
            }
        }
        _ => full(StatusCode::NOT_FOUND, "text/plain", "not found"),
    }
}

fn json<T: serde::Serialize>(value: &T) -> Response<Body> {
    match crate::redact::to_json_vec(value) {
        Ok(body) => full(StatusCode::OK, "application/json", body),
        Err(e) => full(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
    }
}

/// `/events`: the status now, then again after each change (at most [`FRAMES_PER_SEC`] a second). A browser that
/// does not keep up is dropped (the page's EventSource reconnects); the daemon never waits for one.
fn events(shared: &Arc<Shared>, dashboard: &Dashboard) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(SSE_BUFFER);
    let shared = shared.clone();
    let generation = dashboard.generation.load(std::sync::atomic::Ordering::SeqCst);
    let dashboard_generation = shared.dashboard.clone();
    tokio::spawn(async move {
        let mut changes = shared.changes.subscribe();
        loop {
            // A rotation revokes every session: its open streams end too.
            let now = dashboard_generation.as_ref().map(|d| d.generation.load(std::sync::atomic::Ordering::SeqCst));
            if now != Some(generation) {
                return;
            }
            let report = super::server::status_report(&shared);
            let Ok(body) = crate::redact::to_json_vec(&report) else { return };
            let mut frame = Vec::with_capacity(body.len() + 8);
            frame.extend_from_slice(b"data: ");
            frame.extend_from_slice(&body);
            frame.extend_from_slice(b"\n\n");
            if tx.try_send(Bytes::from(frame)).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1000 / FRAMES_PER_SEC)).await;
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = tx.closed() => return,
            }
        }
    });
    let mut response = Response::new(StreamBody::new(Frames { rx }).boxed());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, "text/event-stream".parse().expect("valid"));
    secure(headers);
    response
}

/// The SSE body: the frames the feed task sends.
struct Frames {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl futures_core::Stream for Frames {
    type Item = Result<Frame<Bytes>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}
