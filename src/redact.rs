//! The one redactor: removes secrets from every text autodev shows, writes, logs or sends: the values of the
//! secrets it knows (the GitHub token, API keys, secret-looking variables of the LLMs and of its own environment,
//! webhook URLs) and the shapes of well-known tokens. Installed once by the daemon (and again on reload); every exit
//! point calls [`clean`] or [`clean_json`].
//!
//! The exceptions are a run's raw `stdout`, `stderr` and `prompt` files (private, 0600) and `logs --raw`.

use std::borrow::Cow;
use std::sync::{Arc, RwLock};

use regex::Regex;
use serde_json::Value;

/// What a secret is replaced with.
pub const MASK: &str = "[redacted]";
/// Values shorter than this are not treated as secrets (they would mask ordinary words).
pub const MIN_SECRET_LEN: usize = 8;

/// Token shapes removed wherever they appear. `sk-` keys and the words before a token start at a word boundary, so
/// an id like `task-…` is not taken for a key; the other prefixes are distinctive enough to match anywhere (after
/// `%20` in a URL, say). Key words are spelled in the cases people write them (`api_key`, `apiKey`, `Api-Key`,
/// `API_KEY`) rather than with `(?i)`: case-insensitive alternatives defeat the regex engine's literal prefilter
/// and made a `status` reply's scan 16 times slower.
const BUILTIN_PATTERNS: &[&str] = &[
    r"gh[pousr]_[A-Za-z0-9]{20,}",
    r"github_pat_[A-Za-z0-9_]{20,}",
    r"sk-ant-[A-Za-z0-9_\-]{8,}",
    r"\bsk-[A-Za-z0-9_\-]{20,}",
    r"AKIA[0-9A-Z]{16}",
    r"AIza[0-9A-Za-z_\-]{30,}",
    r"xox[abprs]-[A-Za-z0-9\-]{10,}",
    r"\b(?:bearer|Bearer|BEARER)\s+[A-Za-z0-9._~+/\-]{10,}=*",
    r"\b(?:token|Token|TOKEN|basic|Basic|BASIC)\s+[A-Za-z0-9._~+/\-]{20,}=*",
    r#"(?:api[_-]?key|apiKey|Api[_-]?Key|API[_-]?KEY|access[_-]?token|accessToken|Access[_-]?Token|ACCESS[_-]?TOKEN|auth[_-]?token|authToken|Auth[_-]?Token|AUTH[_-]?TOKEN|secret|Secret|SECRET|password|Password|PASSWORD|passwd|Passwd|PASSWD)[A-Za-z0-9_\-]*"?\s*[:=]\s*"?[^\s",]+"#,
];

/// JSON keys that hold paths, ids and times, never free text: [`clean_json`] leaves them alone, so redaction can
/// never break a record autodev reads back.
const STRUCTURAL_KEYS: &[&str] = &[
    "version",
    "slot",
    "provider",
    "task_id",
    "run_id",
    "runs",
    "boot_id",
    "session_id",
    "cwd",
    "prompt_file",
    "stdout",
    "stderr",
    "worktree",
    "branch",
    "cgroup",
    "started_at",
    "run_started_at",
    "ended_at",
    "since",
    "state",
    "end_cause",
    "waiting_for",
    "waiting_until",
    "restarts",
    "program",
    "state_dir",
    "config_path",
    "path",
];

/// Removes known secret values and token shapes from text.
pub struct Redactor {
    /// One pass over the text: the literal secrets (longest first) and every pattern, as one alternation.
    all: Regex,
    /// The secret values themselves (never shown; for checks such as "does this file hold one").
    literals: Vec<String>,
}

impl Redactor {
    /// `extra`: patterns from the config (checked when it was read); `secrets`: literal values.
    pub fn new(extra: &[String], secrets: impl IntoIterator<Item = String>) -> Redactor {
        let mut literals: Vec<String> = secrets.into_iter().filter(|s| s.chars().count() >= MIN_SECRET_LEN).collect();
        literals.sort_by_key(|s| std::cmp::Reverse(s.len()));
        literals.dedup();
        let mut parts: Vec<String> = literals.iter().map(|s| regex::escape(s)).collect();
        let literals_kept = literals.clone();
        parts.extend(BUILTIN_PATTERNS.iter().map(|p| p.to_string()));
        for p in extra {
            match Regex::new(p) {
                Ok(_) => parts.push(p.clone()),
                Err(e) => tracing::error!("redaction pattern {p:?} is ignored: {e}"),
            }
        }
        let alternation = parts.iter().map(|p| format!("(?:{p})")).collect::<Vec<_>>().join("|");
        let all = Regex::new(&alternation)
            .or_else(|_| Regex::new(&BUILTIN_PATTERNS.iter().map(|p| format!("(?:{p})")).collect::<Vec<_>>().join("|")))
            .expect("the built-in patterns compile (tested)");
        Redactor { all, literals: literals_kept }
    }

    /// The secret values this redactor knows.
    pub fn secrets(&self) -> &[String] {
        &self.literals
    }

    /// `text` without secrets; borrowed (no copy) when there was nothing to remove.
    pub fn clean<'a>(&self, text: &'a str) -> Cow<'a, str> {
        self.all.replace_all(text, MASK)
    }

    pub fn finds_any(&self, text: &str) -> bool {
        self.all.is_match(text)
    }

    /// Cleans every free-text string in a JSON value, in place (structural keys are left alone).
    pub fn clean_value(&self, value: &mut Value) {
        match value {
            Value::String(s) => {
                if let Cow::Owned(cleaned) = self.clean(s) {
                    *s = cleaned;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.clean_value(v)),
            Value::Object(map) => {
                for (key, v) in map.iter_mut() {
                    if !STRUCTURAL_KEYS.contains(&key.as_str()) {
                        self.clean_value(v);
                    }
                }
            }
            _ => {}
        }
    }
}

static CURRENT: RwLock<Option<Arc<Redactor>>> = RwLock::new(None);

/// Makes `redactor` the one every exit point uses (at start, and again when the config is reloaded).
pub fn install(redactor: Redactor) {
    *CURRENT.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(redactor));
}

/// The redactor in force: the installed one, else one that knows the token shapes only.
pub fn current() -> Arc<Redactor> {
    if let Some(r) = CURRENT.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return r.clone();
    }
    let fallback = Arc::new(Redactor::new(&[], Vec::new()));
    CURRENT.write().unwrap_or_else(|e| e.into_inner()).get_or_insert(fallback).clone()
}

/// `text` without secrets.
pub fn clean(text: &str) -> String {
    current().clean(text).into_owned()
}

/// Serializes `value` as JSON with its free-text strings cleaned. The common case, nothing to remove, costs one
/// scan of the encoded text.
pub fn to_json_vec<T: serde::Serialize + ?Sized>(value: &T) -> serde_json::Result<Vec<u8>> {
    encode(value, false)
}

/// [`to_json_vec`], pretty-printed.
pub fn to_json_vec_pretty<T: serde::Serialize + ?Sized>(value: &T) -> serde_json::Result<Vec<u8>> {
    encode(value, true)
}

fn encode<T: serde::Serialize + ?Sized>(value: &T, pretty: bool) -> serde_json::Result<Vec<u8>> {
    fn write<S: serde::Serialize + ?Sized>(v: &S, pretty: bool) -> serde_json::Result<Vec<u8>> {
        if pretty { serde_json::to_vec_pretty(v) } else { serde_json::to_vec(v) }
    }
    let bytes = write(value, pretty)?;
    let redactor = current();
    // Checked on the strings as they are, not as JSON escapes them (a `\n` before a token hides its start).
    if !redactor.finds_any(&unescaped(&bytes)) {
        return Ok(bytes);
    }
    let mut tree = serde_json::to_value(value)?;
    redactor.clean_value(&mut tree);
    write(&tree, pretty)
}

/// JSON text with the escapes inside its strings undone (`\n`, `\"`, `\\`, …; `\uXXXX` stays), for the check
/// only: what the patterns see is what the strings hold.
fn unescaped(json: &[u8]) -> Cow<'_, str> {
    if memchr::memchr(b'\\', json).is_none() {
        return String::from_utf8_lossy(json);
    }
    // Runs between escapes are copied whole: a status reply is mostly such runs (a char-by-char copy cost 7 times
    // the scan itself).
    let mut out = Vec::with_capacity(json.len());
    let mut rest = json;
    while let Some(at) = memchr::memchr(b'\\', rest) {
        out.extend_from_slice(&rest[..at]);
        match rest.get(at + 1) {
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'r') => out.push(b'\r'),
            Some(&other @ (b'"' | b'\\' | b'/')) => out.push(other),
            Some(&other) => out.extend_from_slice(&[b'\\', other]),
            None => out.push(b'\\'),
        }
        rest = rest.get(at + 2..).unwrap_or_default();
    }
    out.extend_from_slice(rest);
    Cow::Owned(String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// The secret values autodev knows: the GitHub token, every `apiKey`, the LLMs' key variables passed through from
/// the daemon's environment, `llms.<name>.env` values and daemon variables whose names look secret (`*KEY*`,
/// `*TOKEN*`, `*SECRET*`, `*PASSWORD*`), and webhook URLs in `notifications`.
pub fn known_secrets(config: &crate::config::Config, github_token: Option<&str>) -> Vec<String> {
    let secret_name = |k: &str| ["KEY", "TOKEN", "SECRET", "PASSWORD"].iter().any(|w| k.to_uppercase().contains(w));
    let mut out: Vec<String> = github_token.map(str::to_string).into_iter().collect();
    for entry in config.providers() {
        out.extend(entry.llm.api_key.clone());
        out.extend(entry.llm.env.iter().filter(|(k, _)| secret_name(k)).map(|(_, v)| v.clone()));
        let provider = crate::provider::Provider::from_entry(&entry);
        // Key variables only: a base URL or a model name is not a secret (and would block commits that mention it).
        out.extend(provider.passthrough_env.iter().filter(|k| secret_name(k)).filter_map(|k| std::env::var(k).ok()));
    }
    out.extend(std::env::vars().filter(|(k, _)| secret_name(k)).map(|(_, v)| v));
    collect_urls(&config.raw.notifications, &mut out);
    out.retain(|s| s.chars().count() >= MIN_SECRET_LEN);
    out
}

/// Every `url`/`webhookUrl` string under `notifications`.
fn collect_urls(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match v {
                    Value::String(s) if key.eq_ignore_ascii_case("url") || key.eq_ignore_ascii_case("webhookUrl") => {
                        out.push(s.clone())
                    }
                    other => collect_urls(other, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_urls(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_shapes_known_values_and_configured_patterns_go() {
        let r = Redactor::new(&["internal-[0-9]+".to_string()], vec!["my-very-secret-value".into()]);
        let text = "ghp_abcdefghijklmnopqrstuvwxyz12 sk-ant-api03-xyzxyzxyz API_KEY=abc123 internal-42 \
                    my-very-secret-value DB_PASSWORD=hunter2 AWS_SECRET_ACCESS_KEY=wJalrXUt {\"password\": \"pw9\"} \
                    Authorization: token ghs_0123456789abcdefghijABCDEFGHIJ ok";
        let clean = r.clean(text);
        for gone in ["ghp_", "sk-ant", "abc123", "internal-42", "my-very-secret", "hunter2", "wJalrXUt", "pw9", "ghs_"]
        {
            assert!(!clean.contains(gone), "{gone} left in {clean}");
        }
        assert!(clean.ends_with(" ok"));
    }

    #[test]
    fn a_secret_after_an_escape_in_json_is_found() {
        let r = Redactor::new(&[], vec!["quote\"d-secret-value".into()]);
        install(r);
        let value = serde_json::json!({
            "reason": "line one\nghp_abcdefghijklmnopqrstuvwxyz12",
            "other": "tab\tBearer abcdefghijklmnop",
            "third": "has quote\"d-secret-value inside",
            "header": "X-Api-Key: abcdef123456",
        });
        let text = String::from_utf8(to_json_vec(&value).unwrap()).unwrap();
        for gone in ["ghp_", "abcdefghijklmnop", "quote", "abcdef123456"] {
            assert!(!text.contains(gone), "{gone} left in {text}");
        }
    }

    #[test]
    fn ids_and_short_values_are_not_secrets() {
        let r = Redactor::new(&[], vec!["short".into(), "".into()]);
        // A ULID after "task-" is not an `sk-` key; a value under 8 characters is not a secret.
        for text in ["task-01JABCDEFGHJKMNPQRSTVWXYZ0", "a short word", "desk-0123456789012345678901"] {
            assert_eq!(r.clean(text), text);
        }
        assert!(matches!(r.clean("nothing here"), Cow::Borrowed(_)));
    }

    #[test]
    fn every_builtin_pattern_compiles() {
        for p in BUILTIN_PATTERNS {
            Regex::new(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        }
    }

    #[test]
    fn json_keeps_its_shape_and_its_paths() {
        let r = Redactor::new(&[], vec!["s3cr3t-value-123".into()]);
        let mut v = serde_json::json!({
            "reason": "failed: API_KEY=s3cr3t-value-123",
            "cwd": "/home/me/api_key=not-a-secret",
            "args": ["--prompt=use s3cr3t-value-123"],
            "secret": "kept as a key, cleaned as a value: s3cr3t-value-123",
        });
        r.clean_value(&mut v);
        let text = v.to_string();
        assert!(!text.contains("s3cr3t"), "{text}");
        assert_eq!(v["cwd"], "/home/me/api_key=not-a-secret");
        assert!(v.get("secret").is_some());
    }

    #[test]
    fn a_bad_configured_pattern_keeps_the_rest() {
        let r = Redactor::new(&["(".to_string()], vec!["literal-secret-1".into()]);
        assert_eq!(r.clean("x literal-secret-1 ghp_abcdefghijklmnopqrstuvwxyz12"), "x [redacted] [redacted]");
    }
}
