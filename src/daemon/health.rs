//! Health of the runs: CPU and memory of each run, from its cgroup where it has one (exact, and it counts
//! processes that left the process group), else of its process group from /proc (one pass for all such runs, and
//! none while nothing runs), stale detection (no output, no progress report, no CPU for
//! `health.staleAfterSecs`) and the `health.onStale` policy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::Shared;
use super::issue_sync;
use super::life::drive;
use super::slots::Health;
use crate::cgroup::RunCgroup;
use crate::protocol::SlotState;
use crate::task::Event;

/// When a new run's first samples are taken (memory at once, CPU over the second after).
const FIRST_SAMPLE: Duration = Duration::from_millis(200);
const SECOND_SAMPLE: Duration = Duration::from_secs(1);

/// Samples on `health.sampleSecs` for as long as the daemon runs.
pub(super) async fn run(shared: Arc<Shared>) {
    let every = Duration::from_secs_f64(shared.config.raw.health.sample_secs);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Comment ids learned meanwhile go into the task records (also for tasks whose run just ended).
        issue_sync::remember_comments(&shared);
        let sources = running_sources(&shared);
        if sources.is_empty() {
            continue;
        }
        // /proc and cgroup reads are blocking work: off the runtime thread, so followers and replies never wait.
        let Ok(totals) = tokio::task::spawn_blocking(move || scan(&sources)).await else { continue };
        let (running, changes) = apply(&shared, &totals);
        shared.changed();
        for slot in &running {
            issue_sync::comment(&shared, slot, false);
        }
        // The machine decides what silence means (`health.onStale`, within the restart allowance).
        for (slot, event) in changes {
            if let Err(e) = drive(&shared, &slot, event) {
                tracing::warn!(slot, "{e}");
            }
        }
    }
}

/// Where a run's CPU and memory are read.
enum Source {
    Cgroup(RunCgroup),
    Group(i32),
}

/// One run's usage: CPU seconds used so far and memory now, in bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    cpu_secs: f64,
    memory_bytes: u64,
}

/// Usage per run id, for the runs asked for.
fn scan(sources: &[(String, Source)]) -> HashMap<String, Usage> {
    let mut usage = HashMap::new();
    let groups: HashMap<i32, &str> = sources
        .iter()
        .filter_map(|(run, source)| match source {
            Source::Group(pgid) => Some((*pgid, run.as_str())),
            Source::Cgroup(_) => None,
        })
        .collect();
    let ticks_per_sec = procfs::ticks_per_second() as f64;
    let page = procfs::page_size();
    for (run, source) in sources {
        if let Source::Cgroup(cgroup) = source {
            let Some(cpu_usec) = cgroup.cpu_usec() else { continue };
            // Without the memory controller: the resident memory of the cgroup's processes.
            let memory_bytes = cgroup.memory_bytes().unwrap_or_else(|| {
                cgroup
                    .pids()
                    .into_iter()
                    .filter_map(|pid| procfs::process::Process::new(pid).ok()?.stat().ok())
                    .map(|stat| stat.rss * page)
                    .sum()
            });
            usage.insert(run.clone(), Usage { cpu_secs: cpu_usec as f64 / 1e6, memory_bytes });
        }
    }
    if groups.is_empty() {
        return usage;
    }
    let Ok(processes) = procfs::process::all_processes() else { return usage };
    for process in processes.flatten() {
        let Ok(stat) = process.stat() else { continue };
        if let Some(run) = groups.get(&stat.pgrp) {
            let entry: &mut Usage = usage.entry(run.to_string()).or_default();
            entry.cpu_secs += (stat.utime + stat.stime) as f64 / ticks_per_sec;
            entry.memory_bytes += stat.rss * page;
        }
    }
    usage
}

/// Puts one sample into a run's health: memory now, CPU as the share of a core since the previous sample.
fn note_usage(health: &mut Health, usage: &Usage, now: SystemTime, now_instant: Instant) {
    if let (Some(before), Some(at)) = (health.cpu_secs, health.sampled_at) {
        let secs = now_instant.duration_since(at).as_secs_f64().max(0.001);
        let used = (usage.cpu_secs - before).max(0.0);
        health.cpu_percent = Some((used / secs * 100.0 * 10.0).round() / 10.0);
        // More than 1% of a core (and more than a clock tick) is work; an idle event loop's timers are not.
        if used > (0.01 * secs).max(0.01) {
            health.last_cpu_at = Some(now);
        }
    }
    health.cpu_secs = Some(usage.cpu_secs);
    health.sampled_at = Some(now_instant);
    health.memory_mb = Some((usage.memory_bytes as f64 / 1_048_576.0 * 10.0).round() / 10.0);
}

/// The first samples of a new run, so `status` shows its memory at once and its CPU after a second, instead of
/// after up to one `health.sampleSecs`.
pub(super) fn sample_new_run(shared: &Arc<Shared>, run_id: &str) {
    let (shared, run_id) = (shared.clone(), run_id.to_string());
    tokio::spawn(async move {
        for wait in [FIRST_SAMPLE, SECOND_SAMPLE] {
            tokio::time::sleep(wait).await;
            let source = {
                let table = shared.lock_table();
                let Some(task) = table.slots.iter().filter_map(|s| s.task.as_ref()).find(|t| t.record.run_id == run_id)
                else {
                    return;
                };
                if !task.is_running() {
                    return;
                }
                match shared.run_cgroup(&task.record) {
                    Some(cgroup) => Source::Cgroup(cgroup),
                    None => match task.record.pgid {
                        Some(pgid) => Source::Group(pgid as i32),
                        None => return,
                    },
                }
            };
            let sources = vec![(run_id.clone(), source)];
            let Ok(usage) = tokio::task::spawn_blocking(move || scan(&sources)).await else { return };
            let Some(usage) = usage.get(&run_id) else { continue };
            if let Some(task) = shared.lock_table().task_of_run(&run_id) {
                note_usage(&mut task.health, usage, SystemTime::now(), Instant::now());
            }
        }
    });
}

/// Where to read each running task's usage.
fn running_sources(shared: &Shared) -> Vec<(String, Source)> {
    shared
        .lock_table()
        .slots
        .iter()
        .filter_map(|s| s.task.as_ref().filter(|t| t.is_running()))
        .filter_map(|t| {
            let source = match shared.run_cgroup(&t.record) {
                Some(cgroup) => Source::Cgroup(cgroup),
                None => Source::Group(t.record.pgid? as i32),
            };
            Some((t.record.run_id.clone(), source))
        })
        .collect()
}

/// Applies one sample to every running task; returns the running slots and the events the sample means (a run
/// went silent, or came back).
fn apply(shared: &Shared, totals: &HashMap<String, Usage>) -> (Vec<String>, Vec<(String, Event)>) {
    let stale_after = Duration::from_secs_f64(shared.config.raw.health.stale_after_secs);
    let (now, now_instant) = (SystemTime::now(), Instant::now());
    let mut changes = Vec::new();
    let mut running = Vec::new();
    let mut table = shared.lock_table();
    for slot in table.slots.iter_mut() {
        let Some(task) = slot.task.as_mut().filter(|t| t.is_running() && t.state() != SlotState::Starting) else {
            continue;
        };
        running.push(slot.name.clone());
        let Some(usage) = totals.get(&task.record.run_id) else { continue };
        note_usage(&mut task.health, usage, now, now_instant);
        let silent = now.duration_since(task.heartbeat()).unwrap_or_default();
        if task.health.rate_limited_until.is_some_and(|u| u > now) {
            // Waiting for a usage limit to reset is not being stale.
            continue;
        }
        match task.state() {
            SlotState::InProgress if silent > stale_after => {
                tracing::warn!(slot = %slot.name, issue = task.issue(), "stale: no output, progress or CPU for {}s", silent.as_secs());
                changes.push((slot.name.clone(), Event::Silent));
            }
            SlotState::Stale if silent <= stale_after => changes.push((slot.name.clone(), Event::Alive)),
            _ => {}
        }
    }
    (running, changes)
}
