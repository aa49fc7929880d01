//! autodev: a local supervisor for AI coding CLIs. `autodevd` runs Claude Code, Gemini and Codex in named slots,
//! one GitHub issue per slot; `autodevctl` drives it. See DESIGN.md in ../shared for the house plan.

pub mod cgroup;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod fleet;
pub mod github;
pub mod input;
pub mod ledger;
pub mod output;
pub mod paths;
pub mod protocol;
pub mod provider;
pub mod redact;
pub mod supervisor;
pub mod task;
pub mod template;
pub mod timefmt;
pub mod workspace;
