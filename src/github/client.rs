//! The GitHub client: token discovery, REST and GraphQL over octocrab with the envelope parsed here, so error
//! types (RATE_LIMITED, NOT_FOUND, INSUFFICIENT_SCOPES), partial data and rate-limit headers are never lost.
//! Nothing here retries: the reconciler decides, and a POST that could double something is never resent blindly.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use octocrab::Octocrab;
use serde_json::Value;

use crate::config::GithubConfig;

/// A token. Its `Debug` and `Display` never show it, so it cannot reach a log line or an error by accident.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    pub fn new(token: String) -> Token {
        Token(token)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(…)")
    }
}

/// Where the token came from (shown by `project status` and `doctor`; the token itself never is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Env(&'static str),
    Credentials,
    TokenFile(String),
    Config,
    GhCli,
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Env(v) => write!(f, "${v}"),
            TokenSource::Credentials => write!(f, "$CREDENTIALS_DIRECTORY/github-token"),
            TokenSource::TokenFile(p) => write!(f, "github.tokenFile ({p})"),
            TokenSource::Config => write!(f, "github.token in the config"),
            TokenSource::GhCli => write!(f, "`gh auth token`"),
        }
    }
}

/// Finds the token: `GITHUB_TOKEN`, `GH_TOKEN`, `$CREDENTIALS_DIRECTORY/github-token` (systemd), `github.tokenFile`,
/// `github.token`, then `gh auth token` if the gh CLI is installed.
pub fn find_token(config: &GithubConfig, config_dir: Option<&Path>) -> Option<(Token, TokenSource)> {
    let clean = |s: String| Some(s.trim().to_string()).filter(|t| !t.is_empty()).map(Token);
    for var in ["GITHUB_TOKEN", "GH_TOKEN"] {
        if let Some(t) = std::env::var(var).ok().and_then(clean) {
            return Some((t, TokenSource::Env(var)));
        }
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY")
        && let Some(t) = std::fs::read_to_string(Path::new(&dir).join("github-token")).ok().and_then(clean)
    {
        return Some((t, TokenSource::Credentials));
    }
    if let Some(file) = &config.token_file {
        let path = match config_dir {
            Some(dir) if file.is_relative() => dir.join(file),
            _ => file.clone(),
        };
        if let Some(t) = std::fs::read_to_string(&path).ok().and_then(clean) {
            return Some((t, TokenSource::TokenFile(path.display().to_string())));
        }
    }
    if let Some(t) = config.token.clone().and_then(clean) {
        return Some((t, TokenSource::Config));
    }
    let mut gh = std::process::Command::new("gh");
    gh.args(["auth", "token"]);
    let out = crate::supervisor::run_command(&mut gh, Duration::from_secs(10)).ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        .and_then(clean)
        .map(|t| (t, TokenSource::GhCli))
}

/// Why a GitHub request did not succeed, and when it is worth trying again.
#[derive(Debug, Clone, PartialEq)]
pub enum GhError {
    /// The token is missing, wrong or expired (401).
    Unauthorized,
    /// The token lacks a scope (INSUFFICIENT_SCOPES, or 403 without a rate limit).
    Scopes(String),
    /// Not found (NOT_FOUND, 404): a repository, issue, project or item.
    NotFound(String),
    /// The primary rate limit is used up until `reset`.
    RateLimited { reset: Option<SystemTime> },
    /// A secondary rate limit: wait `retry_after`.
    Secondary { retry_after: Option<Duration> },
    /// GitHub found the request itself wrong (422): sending it again would not help.
    Invalid(String),
    /// GitHub answered 5xx, or the connection failed or timed out.
    Unavailable(String),
    /// Any other error GitHub returned.
    Other(String),
    /// Not sent: the fleet's claim on the issue is not this machine's (any more), so nothing is written for it.
    NotOurs(String),
}

impl fmt::Display for GhError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GhError::Unauthorized => write!(f, "GitHub refused the token (401): check it is valid and not expired"),
            GhError::Scopes(m) => write!(f, "the token lacks a scope: {m} (classic tokens need `repo` and `project`)"),
            GhError::NotFound(m) => write!(f, "not found on GitHub: {m}"),
            GhError::RateLimited { reset } => match reset {
                Some(t) => write!(f, "GitHub rate limit reached until {}", crate::timefmt::rfc3339(*t)),
                None => write!(f, "GitHub rate limit reached"),
            },
            GhError::Secondary { .. } => write!(f, "GitHub secondary rate limit: slowing down"),
            GhError::Invalid(m) => write!(f, "GitHub refused the request (422): {m}"),
            GhError::Unavailable(m) => write!(f, "GitHub is unavailable: {m}"),
            GhError::Other(m) => write!(f, "GitHub error: {m}"),
            GhError::NotOurs(m) => write!(f, "not written: {m}"),
        }
    }
}

impl GhError {
    /// How long to wait before the next attempt, when GitHub said so.
    pub fn wait_hint(&self) -> Option<Duration> {
        match self {
            GhError::RateLimited { reset: Some(t) } => Some(t.duration_since(SystemTime::now()).unwrap_or_default()),
            GhError::Secondary { retry_after } => Some(retry_after.unwrap_or(Duration::from_secs(60))),
            _ => None,
        }
    }
}

/// A GraphQL answer: `data` (possibly partial) and the errors that came with it.
#[derive(Debug)]
pub struct GqlReply {
    pub data: Value,
    pub errors: Vec<GqlError>,
}

#[derive(Debug, Clone)]
pub struct GqlError {
    pub kind: String,
    pub message: String,
    pub path: Vec<String>,
}

/// Asked before every write for an issue. With the fleet on: does this machine still hold the issue's claim?
/// `Err(NotOurs)` drops the write for good; other errors are tried again like a failed write.
pub trait WriteGuard: Send + Sync {
    fn check(&self, issue: u64) -> std::pin::Pin<Box<dyn Future<Output = Result<(), GhError>> + Send + '_>>;
}

pub struct GitHub {
    rest: Octocrab,
    gql: Octocrab,
    /// Scopes of the token, from the last REST answer (`x-oauth-scopes`).
    pub scopes: std::sync::Mutex<Option<String>>,
    /// When the next write may go: GitHub asks for a second between mutations, counted for the token, whichever
    /// worker (board, pull requests, notes) sends it.
    next_write: std::sync::Mutex<std::time::Instant>,
    write_spacing: Duration,
    /// The fleet's claim check, once the fleet is set up.
    guard: std::sync::OnceLock<std::sync::Arc<dyn WriteGuard>>,
}

impl GitHub {
    pub fn new(config: &GithubConfig, token: &Token) -> Result<GitHub, String> {
        let timeout = Some(Duration::from_secs_f64(config.timeout_secs));
        let build = |base: &str| {
            Octocrab::builder()
                .base_uri(base)
                .map_err(|e| format!("github.apiUrl {base:?} is not a URL: {e}"))?
                .personal_token(token.expose().to_string())
                .set_connect_timeout(timeout)
                .set_read_timeout(timeout)
                .build()
                .map_err(|e| format!("cannot build the GitHub client: {e}"))
        };
        let api = config.api_url.trim_end_matches('/');
        // GitHub Enterprise serves REST under /api/v3 and GraphQL at /api/graphql.
        let gql_base = api.strip_suffix("/v3").unwrap_or(api);
        Ok(GitHub {
            rest: build(api)?,
            gql: build(gql_base)?,
            scopes: std::sync::Mutex::new(None),
            next_write: std::sync::Mutex::new(std::time::Instant::now()),
            guard: std::sync::OnceLock::new(),
            write_spacing: Duration::from_secs_f64(config.write_spacing_secs),
        })
    }

    /// Makes every write for an issue ask `guard` first.
    pub fn set_guard(&self, guard: std::sync::Arc<dyn WriteGuard>) {
        let _ = self.guard.set(guard);
    }

    /// Waits for the token's next write slot, then asks the write guard: what every write for an issue does first,
    /// so the claim is checked right before the request.
    pub async fn before_write(&self, issue: u64) -> Result<(), GhError> {
        self.pace_write().await;
        self.guard(issue).await
    }

    /// Whether a write for `issue` may go (always, without a fleet).
    pub async fn guard(&self, issue: u64) -> Result<(), GhError> {
        match self.guard.get() {
            Some(guard) => guard.check(issue).await,
            None => Ok(()),
        }
    }

    /// Waits for this token's next write slot (`github.writeSpacingSecs` after the last one: GitHub's secondary
    /// limits).
    pub async fn pace_write(&self) {
        let at = {
            let mut next = self.next_write.lock().unwrap_or_else(|e| e.into_inner());
            let at = (*next).max(std::time::Instant::now());
            *next = at + self.write_spacing;
            at
        };
        tokio::time::sleep_until(at.into()).await;
    }

    /// GET a REST path; returns the JSON body.
    pub async fn rest_get(&self, path: &str) -> Result<Value, GhError> {
        let response = self.rest._get(path).await.map_err(transport_error)?;
        let (parts, body) = response.into_parts();
        if let Some(scopes) = parts.headers.get("x-oauth-scopes").and_then(|v| v.to_str().ok()) {
            *self.scopes.lock().unwrap_or_else(|e| e.into_inner()) = Some(scopes.to_string());
        }
        let text =
            self.rest.body_to_string(http::Response::from_parts(parts.clone(), body)).await.map_err(transport_error)?;
        status_error(parts.status.as_u16(), &parts.headers, &text)?;
        serde_json::from_str(&text).map_err(|e| GhError::Other(format!("GitHub sent JSON that does not parse: {e}")))
    }

    /// POST or PATCH a REST path with a JSON body; returns the JSON answer. Never retried here: a POST whose answer
    /// was lost may have happened (callers look before they post again).
    pub async fn rest_send(&self, method: &str, path: &str, body: &Value) -> Result<Value, GhError> {
        let response = match method {
            "PATCH" => self.rest._patch(path, Some(body)).await,
            _ => self.rest._post(path, Some(body)).await,
        }
        .map_err(transport_error)?;
        let (parts, body) = response.into_parts();
        let text =
            self.rest.body_to_string(http::Response::from_parts(parts.clone(), body)).await.map_err(transport_error)?;
        status_error(parts.status.as_u16(), &parts.headers, &text)?;
        serde_json::from_str(&text).map_err(|e| GhError::Other(format!("GitHub sent JSON that does not parse: {e}")))
    }

    /// Runs a GraphQL document. `Err` when nothing usable came back; otherwise the data and any errors, which the
    /// caller inspects (a batched mutation can partly succeed).
    pub async fn graphql(&self, document: &str, variables: Value) -> Result<GqlReply, GhError> {
        let body = serde_json::json!({ "query": document, "variables": variables });
        let response = self.gql._post("/graphql", Some(&body)).await.map_err(transport_error)?;
        let (parts, body) = response.into_parts();
        let text =
            self.gql.body_to_string(http::Response::from_parts(parts.clone(), body)).await.map_err(transport_error)?;
        status_error(parts.status.as_u16(), &parts.headers, &text)?;
        let envelope: Value = serde_json::from_str(&text)
            .map_err(|e| GhError::Other(format!("GitHub sent a GraphQL reply that does not parse: {e}")))?;
        let errors: Vec<GqlError> = envelope["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| GqlError {
                kind: e["type"].as_str().unwrap_or_default().to_string(),
                message: e["message"].as_str().unwrap_or_default().to_string(),
                path: e["path"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| p.to_string().trim_matches('"').to_string())
                    .collect(),
            })
            .collect();
        // Errors that make the whole reply worthless become Err; the rest travel with the data.
        for e in &errors {
            match e.kind.as_str() {
                "RATE_LIMITED" | "RATE_LIMIT" => return Err(GhError::RateLimited { reset: reset_of(&parts.headers) }),
                "INSUFFICIENT_SCOPES" => return Err(GhError::Scopes(e.message.clone())),
                _ => {}
            }
        }
        let data = envelope.get("data").cloned().unwrap_or(Value::Null);
        if data.is_null() && !errors.is_empty() {
            let first = &errors[0];
            return Err(match first.kind.as_str() {
                "NOT_FOUND" => GhError::NotFound(first.message.clone()),
                _ => GhError::Other(format!("{} {}", first.kind, first.message).trim().to_string()),
            });
        }
        Ok(GqlReply { data, errors })
    }
}

fn transport_error(e: octocrab::Error) -> GhError {
    // The error's Display never includes request headers, so the token cannot leak through it.
    GhError::Unavailable(first_line(&e.to_string()))
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().chars().take(300).collect()
}

fn reset_of(headers: &http::HeaderMap) -> Option<SystemTime> {
    let secs = headers.get("x-ratelimit-reset")?.to_str().ok()?.parse::<u64>().ok()?;
    // A header from a proxy can say anything: an absurd value is no reset time.
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

fn status_error(status: u16, headers: &http::HeaderMap, body: &str) -> Result<(), GhError> {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| first_line(body));
    let retry_after = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(86_400)));
    let remaining_zero = headers.get("x-ratelimit-remaining").and_then(|v| v.to_str().ok()) == Some("0");
    match status {
        200..=299 => Ok(()),
        401 => Err(GhError::Unauthorized),
        403 | 429 if retry_after.is_some() || message.to_lowercase().contains("secondary rate limit") => {
            Err(GhError::Secondary { retry_after })
        }
        403 | 429 if remaining_zero => Err(GhError::RateLimited { reset: reset_of(headers) }),
        403 => Err(GhError::Scopes(message)),
        404 => Err(GhError::NotFound(message)),
        429 => Err(GhError::Secondary { retry_after }),
        500..=599 => Err(GhError::Unavailable(format!("HTTP {status}: {message}"))),
        422 => Err(GhError::Invalid(message)),
        _ => Err(GhError::Other(format!("HTTP {status}: {message}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_never_prints() {
        let t = Token("ghp_secret".into());
        assert_eq!(format!("{t:?}"), "Token(…)");
    }

    #[test]
    fn statuses_map_to_kinds() {
        let mut h = http::HeaderMap::new();
        assert_eq!(status_error(401, &h, "{}"), Err(GhError::Unauthorized));
        assert!(matches!(status_error(502, &h, "bad gateway"), Err(GhError::Unavailable(_))));
        assert!(matches!(status_error(404, &h, r#"{"message":"Not Found"}"#), Err(GhError::NotFound(_))));
        assert!(matches!(
            status_error(403, &h, r#"{"message":"You have exceeded a secondary rate limit"}"#),
            Err(GhError::Secondary { retry_after: None })
        ));
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(status_error(403, &h, "{}"), Err(GhError::Secondary { retry_after: Some(Duration::from_secs(7)) }));
    }
}
