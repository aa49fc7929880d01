//! Claims and heartbeats in NATS JetStream key-value buckets, for fleets past about ten machines or faster hand-offs:
//!
//! - bucket `autodev-claims`: key `<issue>`, value the claim's record. `create` fails when the key exists; a takeover
//!   is `update` with the expected revision; a release is `delete` with the expected revision. The revision is the
//!   claim's version.
//! - bucket `autodev-machines`: key `<machine>`, one `put` per beat; its revision is the heartbeat's token. The
//!   bucket's `max_age` is `staleAfterSecs`, so a machine gone for good drops out by itself (per-key TTLs would need
//!   nats-server 2.11; Debian 12 ships 2.9).
//!
//! The connection is made on first use and again after it fails; every request has a deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt;

use super::{Claim, Holder, Store, StoreError, StoreFuture, View, parse_record, record};

const CLAIMS: &str = "autodev-claims";
const MACHINES: &str = "autodev-machines";
/// Every request to NATS gives up after this long.
const DEADLINE: Duration = Duration::from_secs(10);
/// Claims read at most in one view.
const MAX_CLAIMS: usize = 100_000;

pub struct NatsStore {
    url: String,
    machine: String,
    stale: Duration,
    buckets: tokio::sync::Mutex<Option<(kv::Store, kv::Store)>>,
    beat: AtomicU64,
    writes: AtomicU64,
    reads: AtomicU64,
}

fn unavailable(what: &str) -> impl Fn(String) -> StoreError + '_ {
    move |e| StoreError::Unavailable(format!("NATS {what}: {e}"))
}

/// Runs `future` with the store's deadline.
async fn timed<T, E: std::fmt::Display>(
    what: &str,
    future: impl Future<Output = Result<T, E>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(what)(e.to_string())),
        Err(_) => Err(unavailable(what)(format!("no answer within {DEADLINE:?}"))),
    }
}

impl NatsStore {
    pub fn new(url: String, machine: String, stale: Duration) -> NatsStore {
        NatsStore {
            url,
            machine,
            stale,
            buckets: tokio::sync::Mutex::new(None),
            beat: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        }
    }

    /// The two buckets, connecting (and making them) first if need be.
    async fn buckets(&self) -> Result<(kv::Store, kv::Store), StoreError> {
        let mut held = self.buckets.lock().await;
        if let Some(b) = held.as_ref() {
            return Ok(b.clone());
        }
        let options = async_nats::ConnectOptions::new().connection_timeout(DEADLINE).name("autodevd");
        let client = timed("connect", options.connect(self.url.as_str())).await?;
        let js = async_nats::jetstream::new(client);
        let claims = bucket(&js, CLAIMS, 5, Duration::ZERO).await?;
        let machines = bucket(&js, MACHINES, 1, self.stale).await?;
        // Made by the first machine with its staleAfterSecs: a shorter one would let heartbeats expire between
        // beats of machines that beat less often, and a machine that only looks gone may be taken over.
        let kept = machines.stream.cached_info().config.max_age;
        if !kept.is_zero() && kept < self.stale {
            return Err(StoreError::Refused(format!(
                "the NATS bucket {MACHINES} keeps heartbeats for {kept:?}, less than this machine's \
                 fleet.staleAfterSecs ({:?}): give every machine the same staleAfterSecs, or delete the bucket \
                 (nats kv del {MACHINES}) to have it made again",
                self.stale
            )));
        }
        *held = Some((claims.clone(), machines.clone()));
        Ok((claims, machines))
    }

    /// Forgets the connection after a failure, so the next request makes a new one.
    async fn failed<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if matches!(result, Err(StoreError::Unavailable(_))) {
            *self.buckets.lock().await = None;
        }
        result
    }

    async fn read_view(&self) -> Result<View, StoreError> {
        let (claims, machines) = self.buckets().await?;
        let mut view = View::default();
        for (name, bucket) in [("claims", &claims), ("machines", &machines)] {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let mut keys = timed(name, bucket.keys()).await?;
            let mut names = Vec::new();
            while let Some(key) = timed(name, async { Ok::<_, String>(keys.next().await) }).await? {
                names.push(key.map_err(|e| unavailable(name)(e.to_string()))?);
                if names.len() >= MAX_CLAIMS {
                    break;
                }
            }
            for key in names {
                self.reads.fetch_add(1, Ordering::Relaxed);
                let Some(entry) = timed(name, bucket.entry(key.clone())).await? else { continue };
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                if name == "machines" {
                    view.beats.insert(key, entry.revision.to_string());
                } else if let (Ok(issue), Some(holder)) =
                    (key.parse::<u64>(), std::str::from_utf8(&entry.value).ok().and_then(parse_record))
                {
                    view.claims.insert(issue, Claim { issue, holder, version: entry.revision.to_string() });
                }
            }
        }
        Ok(view)
    }

    async fn current(&self, issue: u64) -> Result<Option<String>, StoreError> {
        let (claims, _) = self.buckets().await?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        let entry = timed("claims", claims.entry(issue.to_string())).await?;
        Ok(entry.filter(|e| e.operation == kv::Operation::Put).map(|e| e.revision.to_string()))
    }

    /// After a refused compare-and-swap: who moved it, or the error itself when it did not move.
    async fn explain(&self, issue: u64, expected: &str, error: String) -> StoreError {
        match self.current(issue).await {
            Ok(Some(now)) if now == expected => StoreError::Unavailable(error),
            Ok(_) => StoreError::Conflict(format!("the claim on #{issue} moved")),
            Err(e) => e,
        }
    }
}

/// The bucket `name`, made first if need be. Made as the key-value convention says (stream `KV_<name>` on
/// `$KV.<name>.>`, one message per key and revision, new ones refused when full, rollups allowed, deletes only as
/// markers), here rather than by the client's `create_key_value`: that one first reads account fields nats-server
/// 2.9 does not send.
async fn bucket(
    js: &async_nats::jetstream::Context,
    name: &str,
    history: i64,
    max_age: Duration,
) -> Result<kv::Store, StoreError> {
    if let Ok(store) = timed("bucket", js.get_key_value(name)).await {
        return Ok(store);
    }
    use async_nats::jetstream::stream;
    let config = stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: history,
        max_age,
        // The window must not be longer than the age (nats-server refuses it).
        duplicate_window: if max_age.is_zero() {
            Duration::from_secs(120)
        } else {
            max_age.min(Duration::from_secs(120))
        },
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: 1,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    match timed("bucket", js.create_stream(config)).await {
        Ok(_) => timed("bucket", js.get_key_value(name)).await,
        // Another machine made it at the same moment.
        Err(made) => timed("bucket", js.get_key_value(name)).await.map_err(|_| made),
    }
}

fn revision(version: &str) -> Result<u64, StoreError> {
    version.parse().map_err(|_| StoreError::Conflict(format!("{version:?} is not a NATS revision")))
}

impl Store for NatsStore {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn read(&self) -> StoreFuture<'_, View> {
        Box::pin(async move {
            let result = self.read_view().await;
            self.failed(result).await
        })
    }

    fn create(&self, issue: u64, holder: &Holder) -> StoreFuture<'_, Claim> {
        let holder = holder.clone();
        Box::pin(async move {
            let result = async {
                let (claims, _) = self.buckets().await?;
                self.writes.fetch_add(1, Ordering::Relaxed);
                let value = record(issue, &holder).into_bytes().into();
                match tokio::time::timeout(DEADLINE, claims.create(issue.to_string(), value)).await {
                    Ok(Ok(rev)) => Ok(Claim { issue, holder, version: rev.to_string() }),
                    Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                        Err(StoreError::Conflict(format!("issue #{issue} is claimed already")))
                    }
                    Ok(Err(e)) => Err(unavailable("create")(e.to_string())),
                    Err(_) => Err(unavailable("create")(format!("no answer within {DEADLINE:?}"))),
                }
            }
            .await;
            self.failed(result).await
        })
    }

    fn swap(&self, issue: u64, expected: &str, holder: &Holder) -> StoreFuture<'_, Claim> {
        let (holder, expected) = (holder.clone(), expected.to_string());
        Box::pin(async move {
            let result = async {
                let (claims, _) = self.buckets().await?;
                self.writes.fetch_add(1, Ordering::Relaxed);
                let value = record(issue, &holder).into_bytes().into();
                let update = claims.update(issue.to_string(), value, revision(&expected)?);
                match tokio::time::timeout(DEADLINE, update).await {
                    Ok(Ok(rev)) => Ok(Claim { issue, holder, version: rev.to_string() }),
                    Ok(Err(e)) => Err(self.explain(issue, &expected, e.to_string()).await),
                    Err(_) => Err(unavailable("update")(format!("no answer within {DEADLINE:?}"))),
                }
            }
            .await;
            self.failed(result).await
        })
    }

    fn release(&self, issue: u64, expected: &str) -> StoreFuture<'_, ()> {
        let expected = expected.to_string();
        Box::pin(async move {
            let result = async {
                let (claims, _) = self.buckets().await?;
                self.writes.fetch_add(1, Ordering::Relaxed);
                let delete = claims.delete_expect_revision(issue.to_string(), Some(revision(&expected)?));
                match tokio::time::timeout(DEADLINE, delete).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(self.explain(issue, &expected, e.to_string()).await),
                    Err(_) => Err(unavailable("delete")(format!("no answer within {DEADLINE:?}"))),
                }
            }
            .await;
            self.failed(result).await
        })
    }

    fn check(&self, issue: u64) -> StoreFuture<'_, Option<String>> {
        Box::pin(async move {
            let result = self.current(issue).await;
            self.failed(result).await
        })
    }

    fn beat(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let result = async {
                let (_, machines) = self.buckets().await?;
                self.writes.fetch_add(1, Ordering::Relaxed);
                let n = self.beat.fetch_add(1, Ordering::Relaxed) + 1;
                timed("heartbeat", machines.put(self.machine.as_str(), n.to_string().into_bytes().into())).await?;
                Ok(())
            }
            .await;
            self.failed(result).await
        })
    }

    fn requests(&self) -> (u64, u64) {
        (self.writes.load(Ordering::Relaxed), self.reads.load(Ordering::Relaxed))
    }
}
