//! Claims and heartbeats as git refs on GitHub, outside `refs/heads/` so they trigger no push workflow and show as
//! no branch:
//!
//! - `refs/autodev/claims/<issue>` points at a claim commit whose message names machine, slot and epoch. It is made
//!   with REST `POST /git/refs`, which fails with 422 when the ref exists; it is taken over and released with
//!   GraphQL `updateRefs`, whose `beforeOid` makes every change a compare-and-swap (release: `afterOid` all zeros).
//!   The unconditional REST delete is never used: it could remove another machine's claim.
//! - `refs/autodev/machines/<machine>/<n>` is the heartbeat: each beat is one `updateRefs` that creates `<n+1>`
//!   (it must not exist) and deletes `<n>` (it must still point where it did). No object is made per beat, so a
//!   beat is one request whatever the number of claims.
//! - One GraphQL read (`FleetRefs`) returns every claim with its message and every heartbeat.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

use super::{Claim, Holder, Store, StoreError, StoreFuture, View, parse_record, record};
use crate::github::client::{GhError, GitHub};

pub const CLAIMS: &str = "refs/autodev/claims/";
pub const MACHINES: &str = "refs/autodev/machines/";
const FLEET_REFS: &str = include_str!("../github/graphql/FleetRefs.graphql");
const UPDATE_REFS: &str = include_str!("../github/graphql/UpdateRefs.graphql");
const ZEROS: &str = "0000000000000000000000000000000000000000";
/// Pages of 100 claims (and of 100 heartbeats) read at most: a fleet past 10,000 open claims wants the NATS store.
const MAX_PAGES: usize = 100;

pub struct GithubStore {
    gh: std::sync::Arc<GitHub>,
    owner: String,
    repo: String,
    machine: String,
    state: Mutex<Setup>,
    writes: AtomicU64,
    reads: AtomicU64,
}

/// What is learnt once and kept: the repository's node id, the tree every claim commit uses, this machine's
/// heartbeat commit and its current beat.
#[derive(Default)]
struct Setup {
    repository_id: Option<String>,
    tree: Option<String>,
    beat_commit: Option<String>,
    /// This machine's heartbeat ref now: its counter and what it points at.
    beat: Option<(u64, String)>,
    /// The heartbeat's place is unknown (a beat's answer was lost): read before the next beat.
    beat_unknown: bool,
}

fn gh_error(e: GhError) -> StoreError {
    match e {
        GhError::Unauthorized | GhError::Scopes(_) | GhError::NotFound(_) => StoreError::Refused(e.to_string()),
        _ => StoreError::Unavailable(e.to_string()),
    }
}

impl GithubStore {
    pub fn new(gh: std::sync::Arc<GitHub>, owner: String, repo: String, machine: String) -> GithubStore {
        GithubStore {
            gh,
            owner,
            repo,
            machine,
            state: Mutex::new(Setup::default()),
            writes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        }
    }

    fn setup(&self) -> std::sync::MutexGuard<'_, Setup> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, rest: &str) -> String {
        format!("/repos/{}/{}/{rest}", self.owner, self.repo)
    }

    async fn write(&self, method: &str, path: &str, body: &Value) -> Result<Value, GhError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.gh.pace_write().await;
        self.gh.rest_send(method, path, body).await
    }

    /// The tree of every claim commit: one small file, made once (the same content gives the same tree).
    async fn tree(&self) -> Result<String, StoreError> {
        let known = self.setup().tree.clone();
        if let Some(tree) = known {
            return Ok(tree);
        }
        let body = json!({ "tree": [{ "path": "autodev-claim", "mode": "100644", "type": "blob",
                                      "content": "A claim of autodev's fleet: see the commit message.\n" }] });
        let reply = self.write("POST", &self.path("git/trees"), &body).await.map_err(gh_error)?;
        let sha = sha_of(&reply["sha"])?;
        self.setup().tree = Some(sha.clone());
        Ok(sha)
    }

    async fn commit(&self, message: &str, parents: &[&str]) -> Result<String, StoreError> {
        let tree = self.tree().await?;
        let body = json!({ "message": message, "tree": tree, "parents": parents });
        let reply = self.write("POST", &self.path("git/commits"), &body).await.map_err(gh_error)?;
        sha_of(&reply["sha"])
    }

    async fn repository_id(&self) -> Result<String, StoreError> {
        let known = self.setup().repository_id.clone();
        if let Some(id) = known {
            return Ok(id);
        }
        self.read_view().await?;
        self.setup().repository_id.clone().ok_or_else(|| StoreError::Refused("no repository id".into()))
    }

    /// One all-or-nothing `updateRefs`. Any refusal is reported as `Conflict` only when the refs say so: the caller
    /// checks.
    async fn update_refs(&self, updates: Value) -> Result<(), StoreError> {
        let repository = self.repository_id().await?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.gh.pace_write().await;
        let reply =
            self.gh.graphql(UPDATE_REFS, json!({ "repository": repository, "updates": updates })).await.map_err(
                |e| match e {
                    // An updateRefs that GitHub refuses comes back as an error without data.
                    GhError::Other(m) | GhError::Invalid(m) => StoreError::Conflict(m),
                    e => gh_error(e),
                },
            )?;
        match reply.errors.first() {
            Some(e) => Err(StoreError::Conflict(format!("{} {}", e.kind, e.message).trim().to_string())),
            None => Ok(()),
        }
    }

    async fn read_view(&self) -> Result<View, StoreError> {
        let mut view = View::default();
        let (mut after, mut machines_after): (Option<String>, Option<String>) = (None, None);
        let mut mine: Option<(u64, String)> = None;
        let mut complete = false;
        for _ in 0..MAX_PAGES {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let vars = json!({ "owner": self.owner, "name": self.repo, "claims": CLAIMS, "machines": MACHINES,
                               "after": after, "machinesAfter": machines_after });
            let reply = self.gh.graphql(FLEET_REFS, vars).await.map_err(gh_error)?;
            let repo = &reply.data["repository"];
            if repo.is_null() {
                return Err(StoreError::Refused(format!("repository {}/{} not found", self.owner, self.repo)));
            }
            if let Some(id) = repo["id"].as_str() {
                self.setup().repository_id = Some(id.to_string());
            }
            for node in repo["claims"]["nodes"].as_array().into_iter().flatten() {
                let (Some(name), Some(oid)) = (node["name"].as_str(), node["target"]["oid"].as_str()) else { continue };
                // `name` is relative to the prefix; anything but an issue number is not ours to read.
                let Ok(issue) = name.trim_start_matches(CLAIMS).parse::<u64>() else { continue };
                let Some(holder) = node["target"]["message"].as_str().and_then(parse_record) else { continue };
                view.claims.insert(issue, Claim { issue, holder, version: oid.to_string() });
            }
            for node in repo["machines"]["nodes"].as_array().into_iter().flatten() {
                let (Some(name), Some(oid)) = (node["name"].as_str(), node["target"]["oid"].as_str()) else {
                    continue;
                };
                let Some((machine, n)) = name.trim_start_matches(MACHINES).rsplit_once('/') else { continue };
                let Ok(n) = n.parse::<u64>() else { continue };
                // Two refs of one machine (a beat half-seen): the higher counter is its heartbeat.
                let token = format!("{n}");
                let entry = view.beats.entry(machine.to_string()).or_insert_with(|| token.clone());
                if entry.parse::<u64>().is_ok_and(|old| old < n) {
                    *entry = token;
                }
                if machine == self.machine && mine.as_ref().is_none_or(|(m, _)| *m < n) {
                    mine = Some((n, oid.to_string()));
                }
            }
            let next = |list: &str| {
                let page = &repo[list]["pageInfo"];
                page["endCursor"].as_str().filter(|_| page["hasNextPage"].as_bool() == Some(true)).map(str::to_string)
            };
            let (claims_next, machines_next) = (next("claims"), next("machines"));
            if claims_next.is_none() && machines_next.is_none() {
                complete = true;
                break;
            }
            // A list read to its end stays at its end (its next pages are empty).
            after = claims_next.or_else(|| repo["claims"]["pageInfo"]["endCursor"].as_str().map(str::to_string));
            machines_after =
                machines_next.or_else(|| repo["machines"]["pageInfo"]["endCursor"].as_str().map(str::to_string));
        }
        if !complete {
            // Missing heartbeats would make live machines look stale: a partial read is no read.
            return Err(StoreError::Unavailable(format!("more than {MAX_PAGES} pages of fleet refs")));
        }
        // Only forward: a read that ran beside a beat may have seen the counter before it.
        let mut setup = self.setup();
        let known = setup.beat.as_ref().map(|(n, _)| *n);
        if setup.beat_unknown || mine.as_ref().map(|(n, _)| Some(*n) > known).unwrap_or(known.is_none()) {
            setup.beat = mine;
        }
        setup.beat_unknown = false;
        drop(setup);
        Ok(view)
    }

    /// After a refused swap or release: `Conflict` with who holds it now, unless the claim is still at
    /// `expected` (then the refusal was something else).
    async fn explain(&self, issue: u64, expected: &str, refused: StoreError) -> StoreError {
        match self.check_ref(issue).await {
            Ok(Some(now)) if now == expected => match refused {
                StoreError::Conflict(m) => StoreError::Refused(m),
                other => other,
            },
            Ok(Some(_)) => StoreError::Conflict(format!("the claim on #{issue} moved")),
            Ok(None) => StoreError::Conflict(format!("the claim on #{issue} is gone")),
            Err(e) => e,
        }
    }

    async fn check_ref(&self, issue: u64) -> Result<Option<String>, StoreError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        match self.gh.rest_get(&self.path(&format!("git/ref/autodev/claims/{issue}"))).await {
            Ok(v) => Ok(Some(sha_of(&v["object"]["sha"])?)),
            Err(GhError::NotFound(_)) => Ok(None),
            Err(e) => Err(gh_error(e)),
        }
    }
}

fn sha_of(v: &Value) -> Result<String, StoreError> {
    v.as_str()
        .filter(|s| s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_string)
        .ok_or_else(|| StoreError::Unavailable("GitHub answered without an object id".into()))
}

impl Store for GithubStore {
    fn name(&self) -> &'static str {
        "github"
    }

    fn read(&self) -> StoreFuture<'_, View> {
        Box::pin(self.read_view())
    }

    fn create(&self, issue: u64, holder: &Holder) -> StoreFuture<'_, Claim> {
        let holder = holder.clone();
        Box::pin(async move {
            let commit = self.commit(&record(issue, &holder), &[]).await?;
            let body = json!({ "ref": format!("{CLAIMS}{issue}"), "sha": commit });
            match self.write("POST", &self.path("git/refs"), &body).await {
                Ok(_) => Ok(Claim { issue, holder, version: commit }),
                // 422 is "Reference already exists", or a ref GitHub will not make: the ref tells which.
                Err(GhError::Invalid(why)) => match self.check_ref(issue).await? {
                    Some(_) => Err(StoreError::Conflict(format!("issue #{issue} is claimed already"))),
                    None => Err(StoreError::Refused(format!("GitHub would not make the claim ref: {why}"))),
                },
                Err(e) => Err(gh_error(e)),
            }
        })
    }

    fn swap(&self, issue: u64, expected: &str, holder: &Holder) -> StoreFuture<'_, Claim> {
        let (holder, expected) = (holder.clone(), expected.to_string());
        Box::pin(async move {
            // The old claim is the new one's parent: the ref's history is the issue's holders.
            let commit = self.commit(&record(issue, &holder), &[&expected]).await?;
            let update = json!([{ "name": format!("{CLAIMS}{issue}"), "beforeOid": expected, "afterOid": commit,
                                  "force": true }]);
            match self.update_refs(update).await {
                Ok(()) => Ok(Claim { issue, holder, version: commit }),
                Err(e) => Err(self.explain(issue, &expected, e).await),
            }
        })
    }

    fn release(&self, issue: u64, expected: &str) -> StoreFuture<'_, ()> {
        let expected = expected.to_string();
        Box::pin(async move {
            let update = json!([{ "name": format!("{CLAIMS}{issue}"), "beforeOid": expected, "afterOid": ZEROS }]);
            match self.update_refs(update).await {
                Ok(()) => Ok(()),
                Err(e) => Err(self.explain(issue, &expected, e).await),
            }
        })
    }

    fn check(&self, issue: u64) -> StoreFuture<'_, Option<String>> {
        Box::pin(self.check_ref(issue))
    }

    fn beat(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let unknown = {
                let setup = self.setup();
                setup.beat_unknown || setup.repository_id.is_none()
            };
            if unknown {
                self.read_view().await?;
            }
            let known = self.setup().beat_commit.clone();
            let commit = match known {
                Some(c) => c,
                None => {
                    let c = self.commit(&format!("autodev fleet heartbeat of {}\n", self.machine), &[]).await?;
                    self.setup().beat_commit = Some(c.clone());
                    c
                }
            };
            let current = self.setup().beat.clone();
            let next = current.as_ref().map_or(1, |(n, _)| n + 1);
            let prefix = format!("{MACHINES}{}/", self.machine);
            let mut updates =
                vec![json!({ "name": format!("{prefix}{next}"), "beforeOid": ZEROS, "afterOid": commit })];
            if let Some((n, oid)) = &current {
                updates.push(json!({ "name": format!("{prefix}{n}"), "beforeOid": oid, "afterOid": ZEROS }));
            }
            match self.update_refs(Value::Array(updates)).await {
                Ok(()) => {
                    self.setup().beat = Some((next, commit));
                    Ok(())
                }
                Err(e) => {
                    // Perhaps it happened and only the answer was lost: find out before the next beat.
                    self.setup().beat_unknown = true;
                    Err(match e {
                        StoreError::Conflict(m) => StoreError::Unavailable(format!("the heartbeat was refused: {m}")),
                        other => other,
                    })
                }
            }
        })
    }

    fn requests(&self) -> (u64, u64) {
        (self.writes.load(Ordering::Relaxed), self.reads.load(Ordering::Relaxed))
    }
}
