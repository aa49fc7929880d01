//! Answers to agents' questions: a task waiting for a reply (`needs-info`) goes on when a person who works on the
//! repository (owner, member or collaborator; no bot or app) comments on its issue, in the same conversation, with
//! that comment as what it continues with. Each waiting
//! task's issue is read at most once per `github.replyPollSecs`, and only for comments since the question.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::Shared;
use super::handle::{ResumeBy, resume};
use crate::task::{Phase, WaitFor};
use crate::timefmt::parse_rfc3339;

/// The longest answer taken from a comment (GitHub's own limit is 65536 characters).
const ANSWER_MAX: usize = 65_536;

/// Runs while the daemon does (started only when GitHub is on).
pub(super) async fn run(shared: Arc<Shared>) {
    let every = Duration::from_secs_f64(shared.config.raw.github.reply_poll_secs);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (slot, issue, asked_at) in waiting_for_replies(&shared) {
            match answer(&shared, issue, &asked_at).await {
                Ok(Some(text)) => {
                    tracing::info!(slot, issue, "a reply came on the issue: resuming the conversation with it");
                    if let Err(e) = resume(&shared, &slot, ResumeBy::Reply(&text)).await {
                        tracing::warn!(slot, issue, "cannot resume with the reply: {}", e.message);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(slot, issue, "cannot read the replies on the issue: {e}"),
            }
        }
    }
}

/// Tasks that wait for a person's answer on their GitHub issue: slot, issue, when they asked.
fn waiting_for_replies(shared: &Shared) -> Vec<(String, u64, String)> {
    let table = shared.lock_table();
    table
        .slots
        .iter()
        .filter_map(|s| {
            let r = &s.task.as_ref()?.record;
            let waits = matches!(r.phase, Phase::Waiting { waiting_for: WaitFor::Reply, .. });
            (waits && r.from_issue).then(|| Some((s.name.clone(), r.issue, r.asked_at.clone()?)))?
        })
        .collect()
}

/// The first comment on `issue` since `asked_at` that autodev did not write.
async fn answer(shared: &Shared, issue: u64, asked_at: &str) -> Result<Option<String>, String> {
    let github = shared.github.as_ref().map_err(Clone::clone)?;
    let asked = parse_rfc3339(asked_at).unwrap_or(SystemTime::UNIX_EPOCH);
    let path = format!("/repos/{}/{}/issues/{issue}/comments?per_page=100&since={asked_at}", github.owner, github.repo);
    let comments = github.gh.rest_get(&path).await.map_err(|e| e.to_string())?;
    let found = comments.as_array().into_iter().flatten().find(|c| {
        // `since` is about the last edit: an older comment edited later is no answer.
        let new = c["created_at"].as_str().and_then(parse_rfc3339).is_some_and(|t| t >= asked);
        let body = c["body"].as_str().unwrap_or_default();
        // Only people who may steer the repository's work answer for it: not a passer-by on a public issue, not a
        // bot or an app.
        let trusted = matches!(c["author_association"].as_str(), Some("OWNER" | "MEMBER" | "COLLABORATOR"))
            && c["user"]["type"].as_str() != Some("Bot")
            && c["performed_via_github_app"].is_null();
        new && trusted && !body.trim().is_empty() && !crate::github::posts::is_autodevs(body)
    });
    Ok(found.and_then(|c| c["body"].as_str()).map(|b| b.chars().take(ANSWER_MAX).collect()))
}
