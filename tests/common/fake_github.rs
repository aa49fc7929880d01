//! A stateful fake of the parts of GitHub autodev uses, on 127.0.0.1: REST (repository, issue, comments, pull
//! requests) and GraphQL by
//! operation name (ProjectFields, IssueItem, AddItem, SetFields, Finish, SetStatus). Tests change its state and
//! inject failures directly; every request is logged so tests can count them.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

pub const TOKEN: &str = "ghp_daemon_secret";

#[derive(Debug, Clone)]
pub enum Failure {
    Status(u16),
    /// Answer nothing for this long (longer than the client's timeout).
    Hang(Duration),
    RateLimited,
    Secondary,
    Unauthorized,
    InsufficientScopes,
    /// A 422 whose message echoes the request's Authorization header, as some proxies and old servers do.
    EchoAuthorization,
}

#[derive(Debug, Clone)]
pub struct Issue {
    pub title: String,
    pub body: String,
    pub open: bool,
    pub labels: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Field {
    pub id: String,
    pub name: String,
    pub data_type: String,
    pub options: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    pub issue: u64,
    /// field id → text or option name
    pub values: BTreeMap<String, String>,
    /// `ISSUE`, `DRAFT_ISSUE`, `PULL_REQUEST`.
    pub kind: String,
    /// The content's repository, for an issue.
    pub repo: String,
    /// The content's title where it is not one of the repository's issues (drafts, PRs, other repositories).
    pub title: String,
    /// field id → when its value last changed (the fake's clock).
    pub updated: BTreeMap<String, String>,
}

impl Item {
    pub fn issue(id: String, issue: u64) -> Item {
        Item {
            id,
            issue,
            values: BTreeMap::new(),
            kind: "ISSUE".into(),
            repo: "octo/widgets".into(),
            title: String::new(),
            updated: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub operation: Option<String>,
    /// The token the request carried.
    pub token: Option<String>,
}

/// The fake's clock as GitHub writes times: distinct for every change, even within one real second.
fn stamp(tick: u64) -> String {
    autodev::timefmt::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + tick))
}

pub struct State {
    pub issues: BTreeMap<u64, Issue>,
    pub fields: Vec<Field>,
    pub items: Vec<Item>,
    /// Failures for the next requests, one each.
    pub failures: VecDeque<Failure>,
    /// A failure for every request until cleared.
    pub failing: Option<Failure>,
    pub log: Vec<Logged>,
    /// Every request body and header block seen, to check no secret leaks in.
    pub seen: Vec<String>,
    /// Issue comments: id → (issue, body).
    pub comments: BTreeMap<u64, (u64, String)>,
    /// Who wrote each comment, by id; absent means the token's user (autodev).
    pub comment_authors: BTreeMap<u64, String>,
    /// When each comment was made (RFC 3339), by id.
    pub comment_times: BTreeMap<u64, String>,
    /// Pull requests by number.
    pub pulls: BTreeMap<u64, Pull>,
    /// Answer a draft pull request with 422, as repositories without drafts do.
    pub refuse_drafts: bool,
    /// What the repository says the token may do (`permissions.push`).
    pub can_push: bool,
    /// Board writes (GraphQL mutations) answer 502 while set; reads work.
    pub fail_mutations: bool,
    /// Ticks on every change of the board; the project's updatedAt is its last change.
    pub clock: u64,
    pub project_updated: u64,
    /// Tokens the fake accepts (the daemon's `TOKEN` first); one in `refused` gets 401, as a revoked token would.
    pub tokens: Vec<String>,
    pub refused: Vec<String>,
    /// Git refs by full name → object id, and the objects made through the API (commits: message, parents).
    pub refs: BTreeMap<String, String>,
    pub commits: BTreeMap<String, (String, Vec<String>)>,
    pub trees: Vec<String>,
    pub next_object: u64,
}

impl State {
    fn new_object(&mut self) -> String {
        self.next_object += 1;
        format!("{:040x}", 0xa000_0000_u64 + self.next_object)
    }

    /// The fleet's claims as the fake holds them: issue → (machine, slot, epoch) from the claim commits.
    pub fn claims(&self) -> BTreeMap<u64, (String, String, u64)> {
        self.refs
            .iter()
            .filter_map(|(name, sha)| {
                let issue = name.strip_prefix("refs/autodev/claims/")?.parse().ok()?;
                let message = &self.commits.get(sha)?.0;
                let field = |f: &str| message.lines().find_map(|l| l.strip_prefix(f)).map(|v| v.trim().to_string());
                Some((issue, (field("machine:")?, field("slot:")?, field("epoch:")?.parse().ok()?)))
            })
            .collect()
    }
}

impl State {
    /// A change of the board: returns its time.
    pub fn tick(&mut self) -> String {
        self.clock += 1;
        self.project_updated = self.clock;
        stamp(self.clock)
    }
}

#[derive(Debug, Clone)]
pub struct Pull {
    pub head: String,
    pub base: String,
    pub title: String,
    pub body: String,
    pub draft: bool,
    pub open: bool,
}

pub struct FakeGitHub {
    pub url: String,
    pub state: Arc<Mutex<State>>,
}

pub const PROJECT_ID: &str = "PVT_project5";

impl FakeGitHub {
    /// A repository octo/widgets, project #5 of the organization octo with Status (single select) and Assigned
    /// Instance (`assigned_type`: TEXT or SINGLE_SELECT with options claude-1, claude-2), and a few more fields.
    pub fn start(assigned_type: &str) -> FakeGitHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut fields = vec![
            Field { id: "F_title".into(), name: "Title".into(), data_type: "TITLE".into(), options: vec![] },
            Field {
                id: "F_status".into(),
                name: "Status".into(),
                data_type: "SINGLE_SELECT".into(),
                options: ["Todo", "Ready", "In Progress", "In Review", "Done", "Blocked"]
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (format!("opt_s{i}"), n.to_string()))
                    .collect(),
            },
            Field {
                id: "F_prio".into(),
                name: "Priority".into(),
                data_type: "SINGLE_SELECT".into(),
                options: ["P0", "P1", "P2"]
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (format!("opt_p{i}"), n.to_string()))
                    .collect(),
            },
        ];
        fields.push(Field {
            id: "F_assigned".into(),
            name: "Assigned Instance".into(),
            data_type: assigned_type.into(),
            options: if assigned_type == "SINGLE_SELECT" {
                vec![("opt_a1".into(), "claude-1".into()), ("opt_a2".into(), "claude-2".into())]
            } else {
                vec![]
            },
        });
        let state = Arc::new(Mutex::new(State {
            issues: BTreeMap::new(),
            fields,
            items: Vec::new(),
            failures: VecDeque::new(),
            failing: None,
            log: Vec::new(),
            seen: Vec::new(),
            comments: BTreeMap::new(),
            comment_authors: BTreeMap::new(),
            comment_times: BTreeMap::new(),
            pulls: BTreeMap::new(),
            refuse_drafts: false,
            can_push: true,
            fail_mutations: false,
            clock: 0,
            project_updated: 0,
            tokens: vec![TOKEN.to_string()],
            refused: Vec::new(),
            refs: BTreeMap::new(),
            commits: BTreeMap::new(),
            trees: Vec::new(),
            next_object: 0,
        }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(stream, state));
            }
        });
        FakeGitHub { url, state }
    }

    /// A config of the fake CLIs (`slots` each) with GitHub on this fake: octo/widgets, quick timeouts, no status
    /// comments, and the board of project #5 with its usual Status values and Assigned Instance. Tests add to it.
    pub fn board_config(&self, slots: u32) -> Value {
        let mut c = super::fake_config(slots);
        c["github"] =
            json!({ "owner": "octo", "repo": "widgets", "apiUrl": self.url, "timeoutSecs": 2, "retryMaxSecs": 1 });
        c["statusComments"] = json!({ "enabled": false });
        c["project"] = json!({
            "enabled": true, "projectNumber": 5, "organizationProject": true,
            "fields": {
                "status": { "fieldName": "Status", "readyValues": ["Ready"], "inProgressValue": "In Progress",
                            "reviewValue": "In Review", "doneValue": "Done", "blockedValue": "Blocked" },
                "assignedInstance": { "fieldName": "Assigned Instance" }
            }
        });
        c
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Adds an issue; `on_board` puts it on the project with Status `Ready`.
    pub fn add_issue(&self, number: u64, title: &str, on_board: bool) {
        let mut s = self.lock();
        s.issues.insert(
            number,
            Issue { title: title.into(), body: format!("Body of {title}."), open: true, labels: vec![] },
        );
        if on_board {
            let mut values = BTreeMap::new();
            values.insert("F_status".to_string(), "Ready".to_string());
            let at = s.tick();
            let mut item = Item::issue(format!("PVTI_{number}"), number);
            item.values = values;
            item.updated.insert("F_status".into(), at);
            s.items.push(item);
        }
    }

    /// Items that are not this repository's issues: a draft, a pull request, another repository's issue.
    pub fn add_other_item(&self, kind: &str, repo: &str, number: u64, title: &str) {
        let mut s = self.lock();
        let at = s.tick();
        let mut item = Item::issue(format!("PVTI_other_{}", s.items.len()), number);
        (item.kind, item.repo, item.title) = (kind.into(), repo.into(), title.into());
        item.values.insert("F_status".into(), "Ready".into());
        item.updated.insert("F_status".into(), at);
        s.items.push(item);
    }

    /// The board's value of `field` (by name) for `issue`.
    pub fn value(&self, issue: u64, field: &str) -> Option<String> {
        let s = self.lock();
        let id = s.fields.iter().find(|f| f.name == field)?.id.clone();
        s.items.iter().find(|i| i.issue == issue)?.values.get(&id).cloned()
    }

    pub fn set_value(&self, issue: u64, field: &str, value: &str) {
        let mut s = self.lock();
        let id = s.fields.iter().find(|f| f.name == field).unwrap().id.clone();
        let at = s.tick();
        let item = s.items.iter_mut().find(|i| i.issue == issue && i.kind == "ISSUE").unwrap();
        item.values.insert(id.clone(), value.into());
        item.updated.insert(id, at);
    }

    /// Operation names (GraphQL) or paths (REST) of the requests so far.
    /// The bodies of the comments on `issue`.
    pub fn comments_on(&self, issue: u64) -> Vec<(u64, String)> {
        self.lock().comments.iter().filter(|(_, (i, _))| *i == issue).map(|(id, (_, b))| (*id, b.clone())).collect()
    }

    /// A comment on `issue` by a person.
    pub fn comment_as(&self, issue: u64, login: &str, body: &str) -> u64 {
        let mut s = self.lock();
        let id = 1000 + s.comments.len() as u64;
        s.comments.insert(id, (issue, body.into()));
        s.comment_authors.insert(id, login.into());
        s.comment_times.insert(id, autodev::timefmt::rfc3339(SystemTime::now()));
        id
    }

    /// A pull request opened by someone else (a person, an agent), returning its number.
    pub fn open_pull(&self, head: &str, body: &str) -> u64 {
        let mut s = self.lock();
        let number = 500 + s.pulls.len() as u64;
        let pull = Pull {
            head: head.into(),
            base: "main".into(),
            title: "by hand".into(),
            body: body.into(),
            draft: false,
            open: true,
        };
        s.pulls.insert(number, pull);
        number
    }

    pub fn pulls(&self) -> Vec<(u64, Pull)> {
        self.lock().pulls.iter().map(|(n, p)| (*n, p.clone())).collect()
    }

    pub fn operations(&self) -> Vec<String> {
        self.lock()
            .log
            .iter()
            .map(|l| l.operation.clone().unwrap_or_else(|| format!("{} {}", l.method, l.path)))
            .collect()
    }
}

fn serve(stream: TcpStream, state: Arc<Mutex<State>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
        let mut headers = String::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            headers.push_str(&line);
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let (status, extra, reply) = handle(&state, &method, &path, &headers, &body);
        if status == 0 {
            return; // hung up after a hang
        }
        let text = reply.to_string();
        let response = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{text}",
            text.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn route_of(path: &str) -> &str {
    path.split('?').next().unwrap_or("")
}

const ZEROS: &str = "0000000000000000000000000000000000000000";

/// The git database endpoints the fleet's claims use: trees, commits, refs.
fn git_data(s: &mut State, method: &str, route: &str, body: &Value) -> Option<(u16, Value)> {
    let rest = route.strip_prefix("/repos/octo/widgets/git/")?;
    Some(match (method, rest) {
        ("POST", "trees") => {
            let sha = s.new_object();
            s.trees.push(sha.clone());
            (201, json!({ "sha": sha }))
        }
        ("POST", "commits") => {
            let tree = body["tree"].as_str().unwrap_or_default();
            let parents: Vec<String> =
                body["parents"].as_array().into_iter().flatten().filter_map(|p| p.as_str().map(String::from)).collect();
            if !s.trees.iter().any(|t| t == tree) || parents.iter().any(|p| !s.commits.contains_key(p)) {
                return Some((422, json!({ "message": "Tree SHA does not exist" })));
            }
            let sha = s.new_object();
            s.commits.insert(sha.clone(), (body["message"].as_str().unwrap_or_default().to_string(), parents));
            (201, json!({ "sha": sha }))
        }
        ("POST", "refs") => {
            let name = body["ref"].as_str().unwrap_or_default().to_string();
            let sha = body["sha"].as_str().unwrap_or_default().to_string();
            if !name.starts_with("refs/") || name.matches('/').count() < 2 || !s.commits.contains_key(&sha) {
                return Some((422, json!({ "message": "Reference update failed" })));
            }
            if s.refs.contains_key(&name) {
                return Some((422, json!({ "message": "Reference already exists" })));
            }
            s.refs.insert(name.clone(), sha.clone());
            (201, json!({ "ref": name, "object": { "sha": sha, "type": "commit" } }))
        }
        ("GET", rest) if rest.starts_with("ref/") => {
            let name = format!("refs/{}", &rest[4..]);
            match s.refs.get(&name) {
                Some(sha) => (200, json!({ "ref": name, "object": { "sha": sha, "type": "commit" } })),
                None => (404, json!({ "message": "Not Found" })),
            }
        }
        _ => return None,
    })
}

/// GraphQL `updateRefs`: all or nothing, each update's `beforeOid` checked first.
fn update_refs(s: &mut State, updates: &[Value]) -> Value {
    for u in updates {
        let name = u["name"].as_str().unwrap_or_default();
        let current = s.refs.get(name).map(String::as_str).unwrap_or(ZEROS);
        if let Some(before) = u["beforeOid"].as_str()
            && before != current
        {
            return json!({ "data": { "updateRefs": null },
                           "errors": [{ "type": "UNPROCESSABLE", "message": format!("ref {name} is at {current}, not {before}"), "path": ["updateRefs"] }] });
        }
        let after = u["afterOid"].as_str().unwrap_or_default();
        if after != ZEROS && !s.commits.contains_key(after) {
            return json!({ "data": { "updateRefs": null },
                           "errors": [{ "type": "UNPROCESSABLE", "message": format!("no object {after}") }] });
        }
    }
    for u in updates {
        let name = u["name"].as_str().unwrap_or_default().to_string();
        match u["afterOid"].as_str().unwrap_or_default() {
            ZEROS => {
                s.refs.remove(&name);
            }
            after => {
                s.refs.insert(name, after.to_string());
            }
        }
    }
    json!({ "data": { "updateRefs": { "clientMutationId": null } } })
}

/// GraphQL `FleetRefs`: refs under two prefixes (names relative to them), claims in pages of 100.
fn fleet_refs(s: &State, vars: &Value) -> Value {
    let listed = |prefix: &str| -> Vec<Value> {
        s.refs
            .iter()
            .filter_map(|(name, sha)| {
                let short = name.strip_prefix(prefix)?;
                let message = s.commits.get(sha).map(|c| c.0.clone()).unwrap_or_default();
                Some(json!({ "name": short, "target": { "oid": sha, "message": message } }))
            })
            .collect()
    };
    let page = |list: Vec<Value>, after: &Value| {
        let start: usize = after.as_str().and_then(|c| c.parse().ok()).unwrap_or(0);
        let nodes: Vec<Value> = list.iter().skip(start).take(100).cloned().collect();
        let more = start + nodes.len() < list.len();
        json!({ "pageInfo": { "hasNextPage": more, "endCursor": (start + nodes.len()).to_string() }, "nodes": nodes })
    };
    json!({ "data": { "repository": {
        "id": "R_widgets",
        "claims": page(listed(vars["claims"].as_str().unwrap_or("-")), &vars["after"]),
        "machines": page(listed(vars["machines"].as_str().unwrap_or("-")), &vars["machinesAfter"]),
    } } })
}

fn operation_of(query: &str) -> Option<String> {
    let rest = query.lines().map(str::trim).find(|l| l.starts_with("query ") || l.starts_with("mutation "))?;
    let name = rest.split_whitespace().nth(1)?;
    Some(name.split(['(', '{']).next()?.to_string())
}

fn handle(state: &Mutex<State>, method: &str, path: &str, headers: &str, body: &Value) -> (u16, String, Value) {
    let operation = body["query"].as_str().and_then(operation_of);
    let token = headers.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        let value = value.trim();
        name.eq_ignore_ascii_case("authorization").then_some(())?;
        value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .or_else(|| value.strip_prefix("token "))
            .map(str::to_string)
    });
    let failure = {
        let mut s = state.lock().unwrap();
        s.log.push(Logged {
            method: method.into(),
            path: path.into(),
            operation: operation.clone(),
            token: token.clone(),
        });
        s.seen.push(format!("{headers}\n{body}"));
        s.failures.pop_front().or_else(|| s.failing.clone())
    };
    let reset = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 1;
    match failure {
        Some(Failure::Status(code)) => return (code, String::new(), json!({ "message": "upstream trouble" })),
        Some(Failure::Hang(d)) => {
            std::thread::sleep(d);
            return (0, String::new(), Value::Null);
        }
        Some(Failure::RateLimited) => {
            return (
                200,
                format!("x-ratelimit-remaining: 0\r\nx-ratelimit-reset: {reset}\r\n"),
                json!({ "data": null, "errors": [{ "type": "RATE_LIMITED", "message": "API rate limit exceeded" }] }),
            );
        }
        Some(Failure::Secondary) => {
            return (
                403,
                "retry-after: 1\r\n".into(),
                json!({ "message": "You have exceeded a secondary rate limit. Please wait a few minutes." }),
            );
        }
        Some(Failure::Unauthorized) => return (401, String::new(), json!({ "message": "Bad credentials" })),
        Some(Failure::EchoAuthorization) => {
            let auth = headers.lines().find(|l| l.to_ascii_lowercase().starts_with("authorization:")).unwrap_or("");
            return (422, String::new(), json!({ "message": format!("Validation failed for request with {auth}") }));
        }
        Some(Failure::InsufficientScopes) => {
            return (
                200,
                String::new(),
                json!({ "data": null, "errors": [{ "type": "INSUFFICIENT_SCOPES", "message": "Your token has not been granted the required scopes to execute this query. The 'project' scope is required." }] }),
            );
        }
        None => {}
    }
    let mut s = state.lock().unwrap();
    if !token.as_ref().is_some_and(|t| s.tokens.contains(t) && !s.refused.contains(t)) {
        return (401, String::new(), json!({ "message": "Bad credentials" }));
    }
    let scopes = "x-oauth-scopes: repo, project\r\n".to_string();
    if let Some(reply) = git_data(&mut s, method, route_of(path), body) {
        let (status, value) = reply;
        return (status, scopes, value);
    }
    let route = path.split('?').next().unwrap_or("");
    let query = path.split_once('?').map_or("", |(_, q)| q);
    let issue_of = |p: &str| {
        p.strip_prefix("/repos/octo/widgets/issues/")
            .and_then(|r| r.strip_suffix("/comments"))
            .and_then(|n| n.parse::<u64>().ok())
    };
    if let Some(issue) = issue_of(route) {
        if !s.issues.contains_key(&issue) {
            return (404, scopes, json!({ "message": "Not Found" }));
        }
        if method == "GET" {
            let page: usize =
                query.split('&').find_map(|kv| kv.strip_prefix("page=")).and_then(|p| p.parse().ok()).unwrap_or(1);
            let list: Vec<Value> = s
                .comments
                .iter()
                .filter(|(_, (i, _))| *i == issue)
                .skip((page - 1) * 100)
                .take(100)
                .map(|(id, (_, b))| {
                    let login = s.comment_authors.get(id).map_or("autodev-user", String::as_str);
                    let at = s.comment_times.get(id).map_or("2026-01-01T00:00:00Z", String::as_str);
                    // Logins starting with "stranger" are passers-by; "bot" ones are bots.
                    let association = if login.starts_with("stranger") { "NONE" } else { "COLLABORATOR" };
                    let kind = if login.starts_with("bot") { "Bot" } else { "User" };
                    json!({ "id": id, "body": b, "user": { "login": login, "type": kind }, "created_at": at,
                            "author_association": association })
                })
                .collect();
            return (200, scopes, json!(list));
        }
        let id = 1000 + s.comments.len() as u64;
        let text = body["body"].as_str().unwrap_or("").to_string();
        s.comments.insert(id, (issue, text.clone()));
        s.comment_times.insert(id, autodev::timefmt::rfc3339(SystemTime::now()));
        return (201, scopes, json!({ "id": id, "body": text }));
    }
    if let Some(id) = route.strip_prefix("/repos/octo/widgets/issues/comments/").and_then(|n| n.parse::<u64>().ok()) {
        return match s.comments.get_mut(&id) {
            Some(c) if method == "PATCH" => {
                c.1 = body["body"].as_str().unwrap_or("").to_string();
                (200, scopes, json!({ "id": id, "body": c.1 }))
            }
            _ => (404, scopes, json!({ "message": "Not Found" })),
        };
    }
    let pull_json = |n: u64, p: &Pull| {
        json!({ "number": n, "html_url": format!("https://github.com/octo/widgets/pull/{n}"),
                "state": if p.open { "open" } else { "closed" }, "title": p.title, "body": p.body, "draft": p.draft,
                "head": { "ref": p.head }, "base": { "ref": p.base } })
    };
    if route == "/repos/octo/widgets/pulls" {
        if method == "GET" {
            let head = query.split('&').find_map(|kv| kv.strip_prefix("head=")).unwrap_or("").replace("%2F", "/");
            let open = query.contains("state=open");
            let list: Vec<Value> = s
                .pulls
                .iter()
                .filter(|(_, p)| (!open || p.open) && (head.is_empty() || head == format!("octo:{}", p.head)))
                .map(|(n, p)| pull_json(*n, p))
                .collect();
            return (200, scopes, json!(list));
        }
        let draft = body["draft"].as_bool().unwrap_or(false);
        if draft && s.refuse_drafts {
            return (422, scopes, json!({ "message": "Draft pull requests are not supported in this repository." }));
        }
        let head = body["head"].as_str().unwrap_or("").to_string();
        if s.pulls.values().any(|p| p.open && p.head == head) {
            return (422, scopes, json!({ "message": format!("A pull request already exists for octo:{head}.") }));
        }
        let number = 500 + s.pulls.len() as u64;
        let pull = Pull {
            head,
            base: body["base"].as_str().unwrap_or("").into(),
            title: body["title"].as_str().unwrap_or("").into(),
            body: body["body"].as_str().unwrap_or("").into(),
            draft,
            open: true,
        };
        let reply = pull_json(number, &pull);
        s.pulls.insert(number, pull);
        return (201, scopes, reply);
    }
    if let Some(n) = route.strip_prefix("/repos/octo/widgets/pulls/").and_then(|n| n.parse::<u64>().ok()) {
        let Some(pull) = s.pulls.get_mut(&n) else { return (404, scopes, json!({ "message": "Not Found" })) };
        if method == "PATCH"
            && let Some(text) = body["body"].as_str()
        {
            pull.body = text.into();
        }
        let reply = pull_json(n, pull);
        return (200, scopes, reply);
    }
    if method == "GET" {
        return match path {
            "/repos/octo/widgets" => (
                200,
                scopes,
                json!({ "full_name": "octo/widgets", "default_branch": "main",
                        "permissions": { "pull": true, "push": s.can_push } }),
            ),
            _ => (404, scopes, json!({ "message": "Not Found" })),
        };
    }
    let vars = &body["variables"];
    if s.fail_mutations
        && body["query"].as_str().is_some_and(|q| q.trim_start().starts_with("mutation") || q.contains("\nmutation "))
    {
        return (502, String::new(), json!({ "message": "upstream trouble" }));
    }
    match operation.as_deref() {
        Some("FleetRefs") => return (200, String::new(), fleet_refs(&s, vars)),
        Some("UpdateRefs") => {
            let updates = vars["updates"].as_array().cloned().unwrap_or_default();
            return (200, String::new(), update_refs(&mut s, &updates));
        }
        _ => {}
    }
    let data = match operation.as_deref() {
        Some("ProjectFields") => {
            if vars["owner"] != "octo" || vars["number"] != 5 {
                json!({ "organization": { "projectV2": null } })
            } else {
                // One field per page, to make the client page.
                let start: usize = vars["after"].as_str().and_then(|c| c.parse().ok()).unwrap_or(0);
                let node = |f: &Field| {
                    let mut n = json!({ "id": f.id, "name": f.name, "dataType": f.data_type });
                    if f.data_type == "SINGLE_SELECT" {
                        n["options"] = json!(
                            f.options.iter().map(|(id, name)| json!({"id": id, "name": name})).collect::<Vec<_>>()
                        );
                    }
                    n
                };
                let nodes: Vec<Value> = s.fields.iter().skip(start).take(1).map(node).collect();
                let more = start + 1 < s.fields.len();
                json!({ "organization": { "projectV2": {
                    "id": PROJECT_ID, "title": "Widgets board", "number": 5,
                    "fields": { "nodes": nodes, "pageInfo": { "hasNextPage": more, "endCursor": (start + 1).to_string() } }
                } } })
            }
        }
        Some("IssueItem") => {
            let number = vars["number"].as_u64().unwrap_or(0);
            match s.issues.get(&number) {
                None => {
                    return (
                        200,
                        String::new(),
                        json!({ "data": { "repository": { "issue": null } }, "errors": [{ "type": "NOT_FOUND", "message": format!("Could not resolve to an issue with the number of {number}.") }] }),
                    );
                }
                Some(issue) => {
                    let value_of = |item: &Item, name: &str| {
                        let field = s.fields.iter().find(|f| f.name == name)?;
                        let v = item.values.get(&field.id)?;
                        Some(if field.data_type == "SINGLE_SELECT" {
                            let opt = field.options.iter().find(|(_, n)| n == v).map(|(id, _)| id.clone());
                            json!({ "name": v, "optionId": opt })
                        } else {
                            json!({ "text": v })
                        })
                    };
                    let items: Vec<Value> = s
                        .items
                        .iter()
                        .filter(|i| i.issue == number)
                        .map(|i| {
                            json!({
                                "id": i.id, "project": { "id": PROJECT_ID },
                                "status": value_of(i, vars["statusField"].as_str().unwrap_or("")),
                                "assigned": value_of(i, vars["assignedField"].as_str().unwrap_or("")),
                            })
                        })
                        .collect();
                    json!({ "repository": { "issue": {
                        "id": format!("I_{number}"), "number": number, "title": issue.title, "body": issue.body,
                        "url": format!("https://github.com/octo/widgets/issues/{number}"),
                        "state": if issue.open { "OPEN" } else { "CLOSED" },
                        "labels": { "nodes": issue.labels.iter().map(|l| json!({"name": l})).collect::<Vec<_>>() },
                        "projectItems": { "nodes": items },
                    } } })
                }
            }
        }
        Some("BoardItems") | Some("BoardChanged") if vars["project"] != PROJECT_ID => {
            json!({ "node": null })
        }
        Some("BoardChanged") => {
            json!({ "node": { "updatedAt": stamp(s.project_updated), "items": { "totalCount": s.items.len() } } })
        }
        Some("BoardItems") => {
            let start: usize = vars["after"].as_str().and_then(|c| c.parse().ok()).unwrap_or(0);
            let field_id =
                |name: &Value| s.fields.iter().find(|f| Some(f.name.as_str()) == name.as_str()).map(|f| f.id.clone());
            let (status_id, assigned_id, priority_id) =
                (field_id(&vars["statusField"]), field_id(&vars["assignedField"]), field_id(&vars["priorityField"]));
            let nodes: Vec<Value> = s
                .items
                .iter()
                .skip(start)
                .take(100)
                .map(|i| {
                    let value = |id: &Option<String>, with_time: bool| {
                        let id = id.as_ref()?;
                        let v = i.values.get(id)?;
                        Some(if with_time {
                            json!({ "name": v, "updatedAt": i.updated.get(id) })
                        } else {
                            json!({ "name": v, "text": v })
                        })
                    };
                    let content = match i.kind.as_str() {
                        "ISSUE" => {
                            let issue = s.issues.get(&i.issue).filter(|_| i.repo == "octo/widgets");
                            json!({ "number": i.issue, "title": issue.map_or(i.title.clone(), |x| x.title.clone()),
                                    "state": if issue.is_none_or(|x| x.open) { "OPEN" } else { "CLOSED" },
                                    "repository": { "nameWithOwner": i.repo },
                                    "labels": { "nodes": issue.map(|x| x.labels.iter().map(|l| json!({"name": l})).collect::<Vec<_>>()).unwrap_or_default() } })
                        }
                        "PULL_REQUEST" => json!({ "number": i.issue, "title": i.title }),
                        _ => json!({ "title": i.title }),
                    };
                    json!({ "id": i.id, "isArchived": false, "type": i.kind, "content": content,
                            "status": value(&status_id, true), "assigned": value(&assigned_id, false),
                            "priority": value(&priority_id, false) })
                })
                .collect();
            let more = start + 100 < s.items.len();
            json!({ "node": { "updatedAt": stamp(s.project_updated), "items": { "totalCount": s.items.len(),
                    "pageInfo": { "hasNextPage": more, "endCursor": (start + 100).to_string() }, "nodes": nodes } } })
        }
        Some("AddItem") => {
            let number: u64 = vars["content"].as_str().unwrap_or("").trim_start_matches("I_").parse().unwrap_or(0);
            if !s.items.iter().any(|i| i.issue == number) {
                s.items.push(Item::issue(format!("PVTI_{number}"), number));
            }
            json!({ "addProjectV2ItemById": { "item": { "id": format!("PVTI_{number}") } } })
        }
        Some(op @ ("SetFields" | "Finish" | "SetStatus")) => {
            let item_id = vars["item"].as_str().unwrap_or("").to_string();
            let mut set = vec![(vars["statusField"].clone(), Some(vars["status"].clone()))];
            match op {
                "SetFields" => set.push((vars["assignedField"].clone(), Some(vars["assigned"].clone()))),
                "Finish" => set.push((vars["assignedField"].clone(), None)),
                _ => {}
            }
            for (field_id, value) in set {
                let field = s.fields.iter().find(|f| f.id == field_id.as_str().unwrap_or("")).cloned();
                let Some(field) = field else {
                    return (
                        200,
                        String::new(),
                        json!({ "data": null, "errors": [{ "type": "NOT_FOUND", "message": "no such field" }] }),
                    );
                };
                let resolved = match &value {
                    None => None,
                    Some(v) if v["text"].is_string() => Some(v["text"].as_str().unwrap().to_string()),
                    Some(v) => match field
                        .options
                        .iter()
                        .find(|(id, _)| Some(id.as_str()) == v["singleSelectOptionId"].as_str())
                    {
                        Some((_, name)) => Some(name.clone()),
                        None => {
                            return (
                                200,
                                String::new(),
                                json!({ "data": null, "errors": [{ "type": "UNPROCESSABLE", "message": "bad option" }] }),
                            );
                        }
                    },
                };
                let Some(item) = s.items.iter_mut().find(|i| i.id == item_id) else {
                    return (
                        200,
                        String::new(),
                        json!({ "data": null, "errors": [{ "type": "NOT_FOUND", "message": "no such item" }] }),
                    );
                };
                match resolved {
                    Some(v) => item.values.insert(field.id.clone(), v),
                    None => item.values.remove(&field.id),
                };
                let at = s.tick();
                let item = s.items.iter_mut().find(|i| i.id == item_id).unwrap();
                item.updated.insert(field.id.clone(), at);
            }
            json!({ "status": { "projectV2Item": { "id": item_id } } })
        }
        _ => return (200, String::new(), json!({ "errors": [{ "type": "UNKNOWN", "message": "unknown operation" }] })),
    };
    (200, String::new(), json!({ "data": data }))
}
