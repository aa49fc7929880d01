//! Health of the runs: CPU and memory of each run's whole process tree, sampled from /proc (one pass for all runs,
//! and none while nothing runs), stale detection (no output, no progress report, no CPU for
//! `health.staleAfterSecs`) and the `health.onStale` policy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::Shared;
use super::slots::StopReason;
use super::{issue_sync, retry, runs};
use crate::config::OnStale;
use crate::protocol::SlotState;

/// Automatic restarts of stale runs allowed per slot in [`RESTART_WINDOW`]: never a hot loop.
const RESTARTS_PER_WINDOW: usize = 3;
const RESTART_WINDOW: Duration = Duration::from_secs(300);

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
        let (running, went_stale) = apply(&shared, &totals);
        for slot in &running {
            issue_sync::comment(&shared, slot, went_stale.contains(slot));
        }
        for slot in went_stale {
            tokio::spawn(on_stale(shared.clone(), slot));
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
        .filter_map(|s| s.task.as_ref().filter(|t| t.state.is_running()))
        .filter_map(|t| t.record.pgid.map(|g| (g as i32, ())))
        .collect()
}

/// Applies one sample to every running task; returns the running slots and those that just went stale.
fn apply(shared: &Shared, totals: &HashMap<i32, (u64, u64)>) -> (Vec<String>, Vec<String>) {
    let ticks_per_sec = procfs::ticks_per_second() as f64;
    let page = procfs::page_size() as f64;
    let stale_after = Duration::from_secs_f64(shared.config.raw.health.stale_after_secs);
    let (now, now_instant) = (SystemTime::now(), Instant::now());
    let mut went_stale = Vec::new();
    let mut running = Vec::new();
    let mut table = shared.lock_table();
    for slot in table.slots.iter_mut() {
        let Some(task) = slot.task.as_mut().filter(|t| t.state.is_running() && t.state != SlotState::Starting) else {
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
        match task.state {
            SlotState::InProgress if silent > stale_after => {
                task.state = SlotState::Stale;
                tracing::warn!(slot = %slot.name, issue = task.issue(), "stale: no output, progress or CPU for {}s", silent.as_secs());
                went_stale.push(slot.name.clone());
            }
            SlotState::Stale if silent <= stale_after => task.state = SlotState::InProgress,
            _ => {}
        }
    }
    (running, went_stale)
}

/// Applies `health.onStale` to a run that just went stale.
async fn on_stale(shared: Arc<Shared>, slot: String) {
    let policy = shared.config.raw.health.on_stale;
    if policy == OnStale::Mark {
        return;
    }
    let recent = {
        let table = shared.lock_table();
        let Some(task) = table.get(&slot).and_then(|s| s.task.as_ref()) else { return };
        let since = SystemTime::now() - RESTART_WINDOW;
        task.record.auto_resumes.iter().filter_map(|t| crate::timefmt::parse_rfc3339(t)).filter(|t| *t > since).count()
    };
    if recent >= RESTARTS_PER_WINDOW {
        tracing::warn!(
            slot,
            "stale again, but {RESTARTS_PER_WINDOW} automatic restarts in 5 minutes already: left as it is"
        );
        return;
    }
    let why = format!("stale for {}s", shared.config.raw.health.stale_after_secs);
    if let Err(e) = runs::stop(&shared, &slot, StopReason::Stale(why)).await {
        tracing::warn!(slot, "stopping the stale run: {}", e.message);
        return;
    }
    let result = match policy {
        OnStale::Reassign => retry::retry(&shared, &slot).await,
        _ => runs::resume(&shared, &slot, true).await.map(drop),
    };
    if let Err(e) = result {
        tracing::warn!(slot, "after a stale run: {}", e.message);
    }
}
