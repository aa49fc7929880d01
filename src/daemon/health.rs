//! Health of the runs: CPU and memory of each run's whole process tree, sampled from /proc (one pass for all runs,
//! and none while nothing runs), stale detection (no output, no progress report, no CPU for
//! `health.staleAfterSecs`) and the `health.onStale` policy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::Shared;
use super::issue_sync;
use super::life::drive;
use crate::protocol::SlotState;
use crate::task::Event;

/// Samples on `health.sampleSecs` for as long as the daemon runs.
pub(super) async fn run(shared: Arc<Shared>) {
    let every = Duration::from_secs_f64(shared.config.raw.health.sample_secs);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Comment ids learned meanwhile go into the task records (also for tasks whose run just ended).
        issue_sync::remember_comments(&shared);
        let groups = running_groups(&shared);
        if groups.is_empty() {
            continue;
        }
        // The /proc walk is blocking work: off the runtime thread, so followers and replies never wait for it.
        let Ok(totals) = tokio::task::spawn_blocking(move || scan(&groups)).await else { continue };
        let (running, changes) = apply(&shared, &totals);
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

/// CPU ticks and resident pages per process group, for the groups asked for.
fn scan(groups: &HashMap<i32, ()>) -> HashMap<i32, (u64, u64)> {
    let mut totals: HashMap<i32, (u64, u64)> = HashMap::new();
    let Ok(processes) = procfs::process::all_processes() else { return totals };
    for process in processes.flatten() {
        let Ok(stat) = process.stat() else { continue };
        if groups.contains_key(&stat.pgrp) {
            let entry = totals.entry(stat.pgrp).or_default();
            entry.0 += stat.utime + stat.stime;
            entry.1 += stat.rss;
        }
    }
    totals
}

/// The process groups of the running tasks.
fn running_groups(shared: &Shared) -> HashMap<i32, ()> {
    shared
        .lock_table()
        .slots
        .iter()
        .filter_map(|s| s.task.as_ref().filter(|t| t.is_running()))
        .filter_map(|t| t.record.pgid.map(|g| (g as i32, ())))
        .collect()
}

/// Applies one sample to every running task; returns the running slots and the events the sample means (a run
/// went silent, or came back).
fn apply(shared: &Shared, totals: &HashMap<i32, (u64, u64)>) -> (Vec<String>, Vec<(String, Event)>) {
    let ticks_per_sec = procfs::ticks_per_second() as f64;
    let page = procfs::page_size() as f64;
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
        let Some(&(ticks, pages)) = task.record.pgid.and_then(|g| totals.get(&(g as i32))) else { continue };
        let health = &mut task.health;
        if let (Some(before), Some(at)) = (health.cpu_ticks, health.sampled_at) {
            let secs = now_instant.duration_since(at).as_secs_f64().max(0.001);
            let used = ticks.saturating_sub(before);
            health.cpu_percent = Some((used as f64 / ticks_per_sec / secs * 100.0 * 10.0).round() / 10.0);
            // More than 1% of a core is work; an idle event loop's timers are not.
            if used as f64 > (0.01 * ticks_per_sec * secs).max(1.0) {
                health.last_cpu_at = Some(now);
            }
        }
        health.cpu_ticks = Some(ticks);
        health.sampled_at = Some(now_instant);
        health.memory_mb = Some((pages as f64 * page / 1_048_576.0 * 10.0).round() / 10.0);
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
