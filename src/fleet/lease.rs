//! The lease: when a holder that cannot renew must stop its runs, and when another machine may take its claims.
//! Every time here is measured on one machine's own monotonic clock; no two machines' clocks are ever compared.
//!
//! A holder starts stopping its runs once its last renewal was *sent* `stale - margin - grace` ago (`grace`: how
//! long a stop may take). An observer takes over once reads it *sent* `stale + margin` apart show the holder's
//! heartbeat unchanged. The renewal was sent before the store changed and the read that saw the change was sent
//! after it, so the holder's runs are gone at least `2 × margin` before anyone may take over; and an observer whose
//! reads fail sees no time pass (it judges by its last successful read), so it never takes over on old news.

use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lease {
    pub heartbeat: Duration,
    pub stale: Duration,
    /// The longest a stop of a run takes (`supervisor.stopGraceSecs`).
    pub grace: Duration,
}

impl Lease {
    /// One heartbeat: a holder may miss one beat without consequence.
    pub fn margin(&self) -> Duration {
        self.heartbeat
    }

    /// How long after its last renewal was sent the holder starts stopping its runs.
    pub fn stop_after(&self) -> Duration {
        self.stale.saturating_sub(self.margin()).saturating_sub(self.grace)
    }

    /// The holder's own deadline: its last renewal was sent this long ago, so its runs must stop now.
    pub fn holder_must_stop(&self, since_renewal_sent: Duration) -> bool {
        since_renewal_sent >= self.stop_after()
    }

    /// How long an observer must have seen a heartbeat unchanged before the holder's claims may be taken over.
    pub fn takeover_after(&self) -> Duration {
        self.stale + self.margin()
    }
}

/// What this machine has seen of the others' heartbeats: each token and the send time of the first read that
/// showed it, by our clock; and the send time of the last successful read.
#[derive(Debug, Default)]
pub struct Watch {
    seen: HashMap<String, (Option<String>, Instant)>,
    last_read: Option<Instant>,
}

impl Watch {
    /// Notes a successful read of the store sent at `now`: a machine's token that changed (or appeared) restarts
    /// its clock. `machines` is every machine the read mentions (heartbeats and claim holders).
    pub fn observe<'a>(
        &mut self,
        beats: &'a std::collections::BTreeMap<String, String>,
        machines: impl IntoIterator<Item = &'a String>,
        now: Instant,
    ) {
        self.last_read = Some(self.last_read.map_or(now, |r| r.max(now)));
        let mut names: Vec<&String> = beats.keys().collect();
        names.extend(machines);
        for name in names {
            let token = beats.get(name).cloned();
            match self.seen.get_mut(name) {
                // A heartbeat that vanished (expired from a NATS bucket, deleted) is no beat: its clock runs on.
                Some(_) if token.is_none() => {}
                Some((seen, since)) if *seen != token => (*seen, *since) = (token, now),
                Some(_) => {}
                None => {
                    self.seen.insert(name.clone(), (token, now));
                }
            }
        }
    }

    /// How long `machine`'s heartbeat has been seen unchanged, as of the last successful read (zero for a machine
    /// never seen): time in which this machine could not read does not count.
    pub fn unchanged_for(&self, machine: &str) -> Duration {
        match (self.seen.get(machine), self.last_read) {
            (Some((_, since)), Some(read)) => read.saturating_duration_since(*since),
            _ => Duration::ZERO,
        }
    }

    /// Machines seen, with their token and how long it has been unchanged.
    pub fn machines(&self) -> Vec<(String, Option<String>, Duration)> {
        let mut out: Vec<_> =
            self.seen.iter().map(|(m, (token, _))| (m.clone(), token.clone(), self.unchanged_for(m))).collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn lease() -> Lease {
        Lease { heartbeat: Duration::from_secs(60), stale: Duration::from_secs(300), grace: Duration::from_secs(10) }
    }

    #[test]
    fn the_holder_stops_before_anyone_may_take_over() {
        let l = lease();
        // (seconds since the holder's last renewal was sent, must it stop?)
        for (secs, stop) in [(0, false), (60, false), (229, false), (230, true), (1000, true)] {
            assert_eq!(l.holder_must_stop(Duration::from_secs(secs)), stop, "{secs} s");
        }
        assert_eq!(l.takeover_after(), Duration::from_secs(360));
        // Stopped (grace included) at least two heartbeats before a takeover may happen.
        assert!(l.takeover_after() - (l.stop_after() + l.grace) >= 2 * l.margin());
    }

    #[test]
    fn an_observer_times_changes_by_its_own_clock() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let beats = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(m, t)| (m.to_string(), t.to_string())).collect()
        };
        let mut w = Watch::default();
        let holder = "b".to_string();
        // A machine first seen now has been unchanged for no time at all, whatever its token says.
        w.observe(&beats(&[("a", "1"), ("b", "7")]), [&holder], at(0));
        assert_eq!(w.unchanged_for("b"), Duration::ZERO);
        w.observe(&beats(&[("a", "1"), ("b", "7")]), [&holder], at(100));
        assert_eq!(w.unchanged_for("b"), Duration::from_secs(100));
        // A change restarts the clock; the same token does not.
        w.observe(&beats(&[("a", "1"), ("b", "8")]), [&holder], at(150));
        w.observe(&beats(&[("a", "1"), ("b", "8")]), [&holder], at(200));
        assert_eq!(w.unchanged_for("b"), Duration::from_secs(50));
        assert_eq!(w.unchanged_for("a"), Duration::from_secs(200));
        // A heartbeat that vanished while its machine still holds claims is no beat: its clock runs on.
        w.observe(&beats(&[("a", "1")]), [&holder], at(600));
        assert_eq!(w.unchanged_for("b"), Duration::from_secs(450));
        assert_eq!(w.unchanged_for("never-seen"), Duration::ZERO);
        // Reads that fail are no reads: without a new one, no time passes for anyone.
        assert_eq!(w.unchanged_for("a"), Duration::from_secs(600));
    }
}
