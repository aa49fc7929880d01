//! The Projects v2 board: the project and its fields (found by name, paged, cached), one issue with its item
//! (found through the issue, never by paging the project), and the field values autodev writes.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::client::{GhError, GitHub};
use crate::config::ProjectConfig;

pub const PROJECT_FIELDS: &str = include_str!("graphql/ProjectFields.graphql");
pub const ISSUE_ITEM: &str = include_str!("graphql/IssueItem.graphql");
pub const ADD_ITEM: &str = include_str!("graphql/AddItem.graphql");
pub const SET_FIELDS: &str = include_str!("graphql/SetFields.graphql");
pub const FINISH: &str = include_str!("graphql/Finish.graphql");
pub const SET_STATUS: &str = include_str!("graphql/SetStatus.graphql");
pub const BOARD_ITEMS: &str = include_str!("graphql/BoardItems.graphql");
pub const BOARD_CHANGED: &str = include_str!("graphql/BoardChanged.graphql");

/// The most items the autopilot reads of one board (100 pages): a bound on requests and memory per poll.
pub const MAX_BOARD_ITEMS: usize = 10_000;

/// A project field as the board has it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Field {
    pub id: String,
    pub name: String,
    /// `TEXT`, `SINGLE_SELECT`, …
    pub data_type: String,
    pub options: Vec<FieldOption>,
}

impl From<Field> for crate::protocol::BoardField {
    fn from(f: Field) -> Self {
        crate::protocol::BoardField {
            name: f.name,
            data_type: f.data_type,
            options: f.options.into_iter().map(|o| o.name).collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FieldOption {
    pub id: String,
    pub name: String,
}

/// The project, cached: ids only change if someone edits the board (then a NOT_FOUND refreshes them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Board {
    pub project_id: String,
    pub title: String,
    pub number: u64,
    pub fields: Vec<Field>,
}

impl Board {
    /// Loads the project by owner and number, paging its fields 100 at a time.
    pub async fn load(gh: &GitHub, owner: &str, config: &ProjectConfig) -> Result<Board, GhError> {
        let number = config.project_number.unwrap_or_default();
        let org = config.organization_project.unwrap_or(true);
        let mut fields = Vec::new();
        let mut after: Option<String> = None;
        let (project_id, title) = loop {
            let vars = json!({ "owner": owner, "number": number, "org": org, "after": after });
            let reply = gh.graphql(PROJECT_FIELDS, vars).await?;
            let project = &reply.data[if org { "organization" } else { "user" }]["projectV2"];
            if project.is_null() {
                let whose = if org { "organization" } else { "user" };
                return Err(GhError::NotFound(format!(
                    "project #{number} of {whose} {owner} (check project.projectNumber and project.organizationProject)"
                )));
            }
            let id = project["id"].as_str().unwrap_or_default().to_string();
            let title = project["title"].as_str().unwrap_or_default().to_string();
            for node in project["fields"]["nodes"].as_array().into_iter().flatten() {
                let Some(id) = node["id"].as_str() else { continue };
                fields.push(Field {
                    id: id.to_string(),
                    name: node["name"].as_str().unwrap_or_default().to_string(),
                    data_type: node["dataType"].as_str().unwrap_or_default().to_string(),
                    options: node["options"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|o| {
                            Some(FieldOption {
                                id: o["id"].as_str()?.to_string(),
                                name: o["name"].as_str()?.to_string(),
                            })
                        })
                        .collect(),
                });
            }
            let page = &project["fields"]["pageInfo"];
            match (page["hasNextPage"].as_bool(), page["endCursor"].as_str()) {
                (Some(true), Some(cursor)) => after = Some(cursor.to_string()),
                _ => break (id, title),
            }
        };
        Ok(Board { project_id, title, number, fields })
    }

    /// A field by its configured name (case-sensitive, as GitHub shows it).
    pub fn field(&self, name: &str) -> Result<&Field, String> {
        self.fields.iter().find(|f| f.name == name).ok_or_else(|| {
            let names: Vec<_> = self.fields.iter().map(|f| format!("{:?}", f.name)).collect();
            format!("project {:?} has no field {name:?} (its fields: {})", self.title, names.join(", "))
        })
    }

    /// The value that puts `name` into `field`: text, or the option of that name.
    pub fn value(&self, field: &Field, name: &str) -> Result<Value, String> {
        match field.data_type.as_str() {
            "TEXT" => Ok(json!({ "text": name })),
            "SINGLE_SELECT" => field
                .options
                .iter()
                .find(|o| o.name == name)
                .map(|o| json!({ "singleSelectOptionId": o.id }))
                .ok_or_else(|| {
                    let names: Vec<_> = field.options.iter().map(|o| format!("{:?}", o.name)).collect();
                    format!(
                        "field {:?} has no option {name:?} (its options: {}); add it on the board",
                        field.name,
                        names.join(", ")
                    )
                }),
            other => Err(format!("field {:?} is {other}; autodev writes TEXT or SINGLE_SELECT fields", field.name)),
        }
    }
}

/// An issue as intake and the reconciler need it.
#[derive(Debug, Clone, PartialEq)]
pub struct IssueView {
    pub node_id: String,
    pub number: u64,
    pub title: String,
    pub body: String,
    pub url: String,
    pub open: bool,
    pub labels: Vec<String>,
    /// The issue's item on our project, if it is on it.
    pub item: Option<Item>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: String,
    pub status: Option<String>,
    /// The Assigned Instance value (empty counts as none).
    pub assigned: Option<String>,
}

/// Reads one issue and its item on the project `project_id` (if given).
pub async fn issue_view(
    gh: &GitHub,
    owner: &str,
    repo: &str,
    number: u64,
    project: &ProjectConfig,
    project_id: Option<&str>,
) -> Result<IssueView, GhError> {
    let vars = json!({
        "owner": owner, "repo": repo, "number": number,
        "statusField": project.fields.status.field_name,
        "assignedField": project.fields.assigned_instance.field_name,
    });
    let reply = gh.graphql(ISSUE_ITEM, vars).await?;
    let issue = &reply.data["repository"]["issue"];
    if issue.is_null() {
        let why = reply.errors.first().map(|e| e.message.clone()).unwrap_or_default();
        return Err(GhError::NotFound(format!("issue #{number} in {owner}/{repo} {why}").trim().to_string()));
    }
    let name_or_text = |v: &Value| {
        v["text"].as_str().or_else(|| v["name"].as_str()).map(str::to_string).filter(|s| !s.trim().is_empty())
    };
    let item = project_id.and_then(|pid| {
        issue["projectItems"]["nodes"].as_array().into_iter().flatten().find(|n| n["project"]["id"] == pid).map(|n| {
            Item {
                id: n["id"].as_str().unwrap_or_default().to_string(),
                status: name_or_text(&n["status"]),
                assigned: name_or_text(&n["assigned"]),
            }
        })
    });
    Ok(IssueView {
        node_id: issue["id"].as_str().unwrap_or_default().to_string(),
        number,
        title: issue["title"].as_str().unwrap_or_default().to_string(),
        body: issue["body"].as_str().unwrap_or_default().to_string(),
        url: issue["url"].as_str().unwrap_or_default().to_string(),
        open: issue["state"].as_str() == Some("OPEN"),
        labels: issue["labels"]["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["name"].as_str().map(str::to_string))
            .collect(),
        item,
    })
}

/// One item of the board, as the autopilot decides by it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BoardItem {
    /// Its place in the project's own order (0 first), which breaks ties of priority.
    pub position: usize,
    /// `ISSUE`, `DRAFT_ISSUE`, `PULL_REQUEST`, `REDACTED`.
    pub kind: String,
    pub archived: bool,
    /// For an issue: its number, repository (`owner/name`), title, whether it is open, its labels.
    pub issue: Option<u64>,
    pub repository: Option<String>,
    pub title: String,
    pub open: bool,
    pub labels: Vec<String>,
    pub status: Option<String>,
    /// When Status last changed (GitHub's clock): tells a person's move from autodev's own write.
    pub status_updated_at: Option<String>,
    pub assigned: Option<String>,
    pub priority: Option<String>,
}

/// The board as one read found it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BoardRead {
    pub updated_at: String,
    pub total: u64,
    pub items: Vec<BoardItem>,
    /// Requests the read took.
    pub requests: u64,
}

/// Reads every item of the project (100 a page, at most [`MAX_BOARD_ITEMS`]) with the fields the autopilot needs.
pub async fn read_items(gh: &GitHub, project_id: &str, config: &ProjectConfig) -> Result<BoardRead, GhError> {
    let fields = &config.fields;
    let mut read = BoardRead::default();
    let mut after: Option<String> = None;
    loop {
        let vars = json!({ "project": project_id, "after": after, "statusField": fields.status.field_name,
                           "assignedField": fields.assigned_instance.field_name,
                           "priorityField": fields.priority_name() });
        read.requests += 1;
        let reply = gh.graphql(BOARD_ITEMS, vars).await?;
        let project = &reply.data["node"];
        if project.is_null() {
            return Err(GhError::NotFound(format!("project {project_id}")));
        }
        read.updated_at = project["updatedAt"].as_str().unwrap_or_default().to_string();
        read.total = project["items"]["totalCount"].as_u64().unwrap_or_default();
        let before = read.items.len();
        for node in project["items"]["nodes"].as_array().into_iter().flatten() {
            let content = &node["content"];
            let text = |v: &Value, key: &str| v[key].as_str().map(str::to_string);
            read.items.push(BoardItem {
                position: read.items.len(),
                kind: node["type"].as_str().unwrap_or("REDACTED").to_string(),
                archived: node["isArchived"].as_bool().unwrap_or(false),
                issue: content["number"].as_u64(),
                repository: content["repository"]["nameWithOwner"].as_str().map(str::to_string),
                title: content["title"].as_str().unwrap_or_default().to_string(),
                open: content["state"] == "OPEN",
                labels: content["labels"]["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|l| l["name"].as_str().map(str::to_string))
                    .collect(),
                status: text(&node["status"], "name"),
                status_updated_at: text(&node["status"], "updatedAt"),
                assigned: text(&node["assigned"], "text").or_else(|| text(&node["assigned"], "name")),
                priority: text(&node["priority"], "name"),
            });
        }
        let page = &project["items"]["pageInfo"];
        // A reply that says "more" but brings nothing new (an empty page, the same cursor) ends the read.
        let stuck = read.items.len() == before || page["endCursor"].as_str() == after.as_deref();
        match (page["hasNextPage"].as_bool(), page["endCursor"].as_str()) {
            (Some(true), _) if stuck => {
                tracing::warn!("GitHub said the board goes on but sent no further items: read as it is");
                return Ok(read);
            }
            (Some(true), Some(cursor)) if read.items.len() < MAX_BOARD_ITEMS => after = Some(cursor.to_string()),
            (Some(true), _) => {
                tracing::warn!("the board has over {MAX_BOARD_ITEMS} items: the autopilot reads the first ones only");
                return Ok(read);
            }
            _ => return Ok(read),
        }
    }
}

/// The board's `updatedAt` and size, in one request.
pub async fn changed(gh: &GitHub, project_id: &str) -> Result<(String, u64), GhError> {
    let reply = gh.graphql(BOARD_CHANGED, json!({ "project": project_id })).await?;
    let project = &reply.data["node"];
    if project.is_null() {
        return Err(GhError::NotFound(format!("project {project_id}")));
    }
    Ok((
        project["updatedAt"].as_str().unwrap_or_default().to_string(),
        project["items"]["totalCount"].as_u64().unwrap_or_default(),
    ))
}

/// Finds `owner/repo` in a git remote URL (`git@github.com:o/r.git`, `https://github.com/o/r`).
pub fn parse_remote(url: &str) -> Option<(String, String)> {
    let url = url.trim().trim_end_matches('/').trim_end_matches(".git");
    let path =
        if let Some((_, rest)) = url.split_once("://") { rest.split_once('/')?.1 } else { url.split_once(':')?.1 };
    let mut parts = path.rsplitn(2, '/');
    let repo = parts.next()?.to_string();
    let owner = parts.next()?.rsplit('/').next()?.to_string();
    (!owner.is_empty() && !repo.is_empty()).then_some((owner, repo))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remotes_parse() {
        let want = Some(("octo".to_string(), "widgets".to_string()));
        assert_eq!(parse_remote("git@github.com:octo/widgets.git"), want);
        assert_eq!(parse_remote("https://github.com/octo/widgets"), want);
        assert_eq!(parse_remote("ssh://git@github.example.com/octo/widgets.git/"), want);
        assert_eq!(parse_remote("/local/path"), None);
    }

    #[test]
    fn values_by_field_type() {
        let board = Board {
            project_id: "P".into(),
            title: "Board".into(),
            number: 5,
            fields: vec![
                Field { id: "F1".into(), name: "Assigned Instance".into(), data_type: "TEXT".into(), options: vec![] },
                Field {
                    id: "F2".into(),
                    name: "Status".into(),
                    data_type: "SINGLE_SELECT".into(),
                    options: vec![FieldOption { id: "o1".into(), name: "Done".into() }],
                },
            ],
        };
        let text = board.field("Assigned Instance").unwrap();
        assert_eq!(board.value(text, "claude-1").unwrap(), json!({"text": "claude-1"}));
        let status = board.field("Status").unwrap();
        assert_eq!(board.value(status, "Done").unwrap(), json!({"singleSelectOptionId": "o1"}));
        let e = board.value(status, "Shipped").unwrap_err();
        assert!(e.contains("no option \"Shipped\"") && e.contains("\"Done\""), "{e}");
        assert!(board.field("status").unwrap_err().contains("has no field \"status\""), "case-sensitive");
    }
}
