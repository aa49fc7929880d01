//! What the agents spend, against `budget`: a task over `budget.perTaskUsd` has its run stopped where the CLI
//! reports usage while it runs, and its next run refused (until a person says `resume --over-budget`); a local
//! day over `budget.perDayUsd` (or an LLM's `llms.<name>.budget.perDayUsd`) stops the autopilot taking new work
//! until the next day.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use super::Shared;
use super::slots::Task;
use crate::ledger::{self, RunFiles};
use crate::timefmt::{local_day, parse_rfc3339};

/// What finished runs cost on one local day (running tasks are added when asked).
#[derive(Debug, Default)]
pub(super) struct DaySpend {
    day: String,
    total: f64,
    by_llm: BTreeMap<String, f64>,
}

pub(super) struct Spend {
    day: Mutex<DaySpend>,
}

impl Spend {
    /// Today's spend from the history's tail.
    pub(super) fn load(history: &std::path::Path) -> Spend {
        let today = local_day(SystemTime::now());
        let mut spend = DaySpend { day: today.clone(), ..DaySpend::default() };
        for run in last_record_per_run(ledger::read_history_tail(history, 8 << 20).unwrap_or_default()) {
            let day = parse_rfc3339(&run.ended_at).map(local_day);
            if day.as_deref() == Some(today.as_str())
                && let Some(cost) = run.cost_usd
            {
                spend.total += cost;
                *spend.by_llm.entry(run.provider.clone()).or_default() += cost;
            }
        }
        Spend { day: Mutex::new(spend) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DaySpend> {
        let mut day = self.day.lock().unwrap_or_else(|e| e.into_inner());
        let today = local_day(SystemTime::now());
        if day.day != today {
            *day = DaySpend { day: today, ..DaySpend::default() };
        }
        day
    }

    /// A run's end was recorded: its cost counts for today.
    pub(super) fn add(&self, llm: &str, cost: f64) {
        let mut day = self.lock();
        day.total += cost;
        *day.by_llm.entry(llm.to_string()).or_default() += cost;
    }

    /// Today's local day, what finished runs cost today in all, and per LLM.
    pub(super) fn today(&self) -> (String, f64, BTreeMap<String, f64>) {
        let day = self.lock();
        (day.day.clone(), day.total, day.by_llm.clone())
    }
}

/// The history's runs, each once: a run recorded twice (ended, then released or given up) counts by its last record.
pub fn last_record_per_run(runs: Vec<ledger::ExitRecord>) -> Vec<ledger::ExitRecord> {
    let mut last: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, run) in runs.iter().enumerate() {
        last.insert(run.run_id.clone(), i);
    }
    runs.into_iter().enumerate().filter(|(i, r)| last.get(&r.run_id) == Some(i)).map(|(_, r)| r).collect()
}

/// What the task's finished runs cost (their exit records), without its current run.
pub(super) fn finished_runs_cost(shared: &Shared, task: &Task) -> f64 {
    let current = &task.record.run_id;
    task.record
        .runs
        .iter()
        .filter(|r| *r != current)
        .filter_map(|r| ledger::read_exit_record(&RunFiles::at(shared.paths.run_dir(r)).exit_record()))
        .filter_map(|e| e.cost_usd)
        .sum()
}

/// Why the task may not run again, when it spent its budget: its runs so far, the current one included.
pub(super) fn task_over(shared: &Shared, task: &Task) -> Option<String> {
    let limit = shared.config.raw.budget.per_task_usd.filter(|_| !task.record.over_budget)?;
    let spent = finished_runs_cost(shared, task) + task.cost_usd.unwrap_or(0.0);
    (spent >= limit)
        .then(|| format!("issue #{} has spent ${spent:.2} of its ${limit:.2} budget (budget.perTaskUsd)", task.issue()))
}

/// Why nothing new may start today for `llm` (or for any LLM): the day's budget is spent. Running tasks count
/// with what they cost so far.
pub(super) fn day_over(shared: &Shared, llm: &str) -> Option<String> {
    let (day, mut total, mut by_llm) = shared.spend.today();
    {
        let table = shared.lock_table();
        for slot in table.slots.iter().filter(|s| s.is_held()) {
            let Some(task) = &slot.task else { continue };
            if task.is_running() {
                let cost = task.cost_usd.unwrap_or(0.0);
                total += cost;
                *by_llm.entry(table.providers[slot.provider].name.clone()).or_default() += cost;
            }
        }
    }
    if let Some(limit) = shared.config.raw.budget.per_day_usd
        && total >= limit
    {
        return Some(format!("today's budget is spent (${total:.2} of ${limit:.2} on {day}, budget.perDayUsd)"));
    }
    let limit = shared.lock_table().providers.iter().find(|p| p.name == llm).and_then(|p| p.day_budget)?;
    let spent = by_llm.get(llm).copied().unwrap_or(0.0);
    (spent >= limit).then(|| {
        format!("{llm}'s budget for today is spent (${spent:.2} of ${limit:.2} on {day}, llms.{llm}.budget.perDayUsd)")
    })
}
