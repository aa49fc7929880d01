//! Several machines, one board: a claim per issue that only one machine can hold, one heartbeat per machine, and
//! the lease rules that say when a holder must stop and when another may take over. The stores keep claims and
//! heartbeats with compare-and-swap (`github`: git refs; `nats`: JetStream key-value); the daemon's `fleet` uses
//! them. The board only shows what the claims decide.

pub mod github;
pub mod keeper;
pub mod lease;
pub mod nats;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

/// Who holds a claim, as the claim's record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub machine: String,
    pub slot: String,
    /// Bumped at every takeover: the number of holders the issue has had since its claim was made.
    pub epoch: u64,
}

/// A claim as the store has it: its holder and the version a compare-and-swap names (a commit id, a revision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub issue: u64,
    pub holder: Holder,
    pub version: String,
}

/// What the store knows at one read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub claims: BTreeMap<u64, Claim>,
    /// Machine → its heartbeat's current token (changes at every beat; its value means nothing else).
    pub beats: BTreeMap<String, String>,
}

/// Why a store operation did not happen.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// Someone else got there first: the claim exists, or is no longer the version named.
    #[error("someone else holds it: {0}")]
    Conflict(String),
    /// The store could not be asked (down, timed out, rate limited): try again later.
    #[error("the fleet's store is unavailable: {0}")]
    Unavailable(String),
    /// The store refuses this machine (no access, a wrong setup): asking again will not help.
    #[error("the fleet's store refused it: {0}")]
    Refused(String),
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Where claims and heartbeats live. Every write that could take something from another machine is a
/// compare-and-swap; nothing here is last-writer-wins.
pub trait Store: Send + Sync {
    /// `github` or `nats`, for people.
    fn name(&self) -> &'static str;
    /// Every claim and every machine's heartbeat token.
    fn read(&self) -> StoreFuture<'_, View>;
    /// Takes an unclaimed issue: `Conflict` when a claim exists.
    fn create(&self, issue: u64, holder: &Holder) -> StoreFuture<'_, Claim>;
    /// Replaces the claim at `expected` (a takeover, or a new slot of the same holder): `Conflict` when it moved.
    fn swap(&self, issue: u64, expected: &str, holder: &Holder) -> StoreFuture<'_, Claim>;
    /// Removes the claim if it is still at `expected`: `Conflict` when it moved (never removes another's).
    fn release(&self, issue: u64, expected: &str) -> StoreFuture<'_, ()>;
    /// The claim's current version, `None` when there is none: one cheap read before a write for the issue.
    fn check(&self, issue: u64) -> StoreFuture<'_, Option<String>>;
    /// Renews this machine's heartbeat (one request for all its claims).
    fn beat(&self) -> StoreFuture<'_, ()>;
    /// Requests sent so far: (writes, reads), for the cost figures.
    fn requests(&self) -> (u64, u64);
}

/// The largest claim record read back (a record from the store is outside input).
const MAX_RECORD: usize = 4096;

/// A claim's record as people and the other machines read it (the claim commit's message, the key's value):
/// `autodev claim #12` then `machine:`, `slot:` and `epoch:` lines.
pub fn record(issue: u64, holder: &Holder) -> String {
    format!(
        "autodev claim #{issue}\n\nmachine: {}\nslot: {}\nepoch: {}\nat: {}\n",
        holder.machine,
        holder.slot,
        holder.epoch,
        crate::timefmt::rfc3339(std::time::SystemTime::now())
    )
}

/// Reads a claim's record; `None` when it is not one (a ref someone else put there, a torn value).
pub fn parse_record(text: &str) -> Option<Holder> {
    let mut end = text.len().min(MAX_RECORD);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let text = &text[..end];
    let field =
        |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(|v| v.trim().to_string()));
    let machine = field("machine").filter(|m| crate::config::valid_machine_name(m))?;
    let slot = field("slot").filter(|s| !s.is_empty() && s.len() <= 64)?;
    let epoch = field("epoch")?.parse().ok()?;
    Some(Holder { machine, slot, epoch })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_and_junk_is_no_claim() {
        let holder = Holder { machine: "build-2".into(), slot: "claude-1".into(), epoch: 3 };
        assert_eq!(parse_record(&record(12, &holder)), Some(holder));
        for junk in ["", "machine: a\nslot: b", "machine: ../x\nslot: s\nepoch: 1", "machine: a\nslot: s\nepoch: x"] {
            assert_eq!(parse_record(junk), None, "{junk:?}");
        }
        let long = format!("{}\nmachine: a\nslot: s\nepoch: 1\n", "x".repeat(10_000));
        assert_eq!(parse_record(&long), None, "only the first 4 KiB are read");
    }
}
