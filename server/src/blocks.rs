//! Blocks: the markdown file format (optional YAML frontmatter + body), the
//! path-to-label rules, and the block API routes. Parsing and rendering are pure.

use crate::db::Block;
use crate::http::{agent_for, caller, ApiError, AppState};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Map, Value};
use std::net::SocketAddr;
use std::sync::Arc;

/// The default `limit` of a block.
pub const DEFAULT_LIMIT: i64 = 100_000;

/// A block file, parsed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedBlock {
    /// The body (or the whole file when there is no usable frontmatter).
    pub value: String,
    /// `description`, if given as a string.
    pub description: Option<String>,
    /// `limit`, if given as a positive integer.
    pub limit: Option<i64>,
    /// `read_only`, if given as a bool.
    pub read_only: Option<bool>,
    /// `metadata`, if given as a mapping.
    pub metadata: Option<Map<String, Value>>,
    /// The frontmatter: its exact text (delimiters included) and its mapping.
    pub frontmatter: Option<(String, Map<String, Value>)>,
    /// Not refused, but worth telling the pusher (YAML that does not parse).
    pub warnings: Vec<String>,
    /// Fields of the wrong type (a push carrying these is refused).
    pub errors: Vec<String>,
}

fn is_delim(line: &str) -> bool {
    line.strip_suffix('\r').unwrap_or(line) == "---"
}

/// Parse a block file. No frontmatter, an unterminated one, YAML that does not parse,
/// or YAML that is not a mapping: the whole file is the value.
pub fn parse(content: &str) -> ParsedBlock {
    let whole = |warnings: Vec<String>| ParsedBlock {
        value: content.to_string(),
        warnings,
        ..Default::default()
    };
    let Some(first_nl) = content.find('\n') else {
        return whole(vec![]);
    };
    if !is_delim(&content[..first_nl]) {
        return whole(vec![]);
    }
    // Find the closing `---` line.
    let mut pos = first_nl + 1;
    let (yaml_end, body_start) = loop {
        if pos > content.len() {
            return whole(vec![]);
        }
        let end = content[pos..].find('\n').map(|i| pos + i);
        let line = &content[pos..end.unwrap_or(content.len())];
        if is_delim(line) {
            break (pos, end.map(|e| e + 1).unwrap_or(content.len()));
        }
        match end {
            Some(e) => pos = e + 1,
            None => return whole(vec![]),
        }
    };
    let yaml = &content[first_nl + 1..yaml_end];
    let map = match serde_saphyr::from_str::<Value>(yaml) {
        Ok(Value::Object(m)) => m,
        Ok(Value::Null) => Map::new(),
        Ok(_) => {
            return whole(vec![
                "frontmatter is not a YAML mapping; the whole file is the value".into(),
            ])
        }
        Err(e) => {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("").trim();
            return whole(vec![format!(
                "frontmatter is not valid YAML ({first}); the whole file is the value"
            )]);
        }
    };
    let mut p = ParsedBlock {
        value: content[body_start..].to_string(),
        frontmatter: Some((content[..body_start].to_string(), map.clone())),
        ..Default::default()
    };
    match map.get("description") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => p.description = Some(s.clone()),
        Some(_) => p.errors.push("description must be a string".into()),
    }
    match map.get("read_only") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(b)) => p.read_only = Some(*b),
        Some(_) => p.errors.push("read_only must be true or false".into()),
    }
    match map.get("limit") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) if n.as_i64().is_some_and(|v| v > 0) => p.limit = n.as_i64(),
        Some(_) => p.errors.push("limit must be a positive integer".into()),
    }
    match map.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => p.metadata = Some(m.clone()),
        Some(_) => p.errors.push("metadata must be a mapping".into()),
    }
    if let Some(limit) = p.limit {
        let n = p.value.chars().count() as i64;
        if n > limit {
            p.errors.push(format!(
                "value is {n} characters, over its limit of {limit}"
            ));
        }
    }
    p
}

/// The label a file in the tree becomes, if any: `*.md` only; `skills/{name}/SKILL.md`
/// is `skills/{name}` and other files under `skills/` are ignored.
pub fn label_for_path(path: &str) -> Option<String> {
    let stem = path.strip_suffix(".md")?;
    if let Some(rest) = path.strip_prefix("skills/") {
        let parts: Vec<&str> = rest.split('/').collect();
        return (parts.len() == 2 && parts[1] == "SKILL.md" && !parts[0].is_empty())
            .then(|| format!("skills/{}", parts[0]));
    }
    (!stem.is_empty() && !stem.ends_with('/')).then(|| stem.to_string())
}

/// The file a label lives in.
pub fn path_for_label(label: &str) -> String {
    match label.strip_prefix("skills/") {
        Some(name) if !name.contains('/') => format!("skills/{name}/SKILL.md"),
        _ => format!("{label}.md"),
    }
}

/// Labels the API accepts: 1..=512 bytes, `/`-separated components that are not
/// empty, `.` or `..`, no control characters or backslashes.
pub fn validate_label(label: &str) -> Result<(), ApiError> {
    let ok = !label.is_empty()
        && label.len() <= 512
        && !label.bytes().any(|b| b < 0x20 || b == 0x7f || b == b'\\')
        && label
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && (!label.starts_with("skills/") || label.matches('/').count() == 1);
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid block label {label:?}"
        )))
    }
}

fn yaml_line(key: &str, v: &Value) -> String {
    // JSON scalars and flow mappings are valid YAML.
    let key = if key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        key.to_string()
    } else {
        Value::String(key.to_string()).to_string()
    };
    format!("{key}: {v}")
}

fn render_map(map: &Map<String, Value>, body: &str) -> String {
    if map.is_empty() {
        return body.to_string();
    }
    let lines: Vec<String> = map.iter().map(|(k, v)| yaml_line(k, v)).collect();
    format!("---\n{}\n---\n{}", lines.join("\n"), body)
}

/// Render a block as a file: frontmatter for the fields that differ from the
/// defaults, then the value.
pub fn render(b: &Block) -> String {
    let mut map = Map::new();
    if let Some(d) = &b.description {
        map.insert("description".into(), Value::String(d.clone()));
    }
    if b.limit != DEFAULT_LIMIT {
        map.insert("limit".into(), Value::from(b.limit));
    }
    if b.read_only {
        map.insert("read_only".into(), Value::Bool(true));
    }
    if b.metadata.as_object().is_some_and(|m| !m.is_empty()) {
        map.insert("metadata".into(), b.metadata.clone());
    }
    render_map(&map, &b.value)
}

/// A change requested through the block API.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockUpdate {
    /// New body.
    pub value: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New read-only flag.
    pub read_only: Option<bool>,
    /// New metadata mapping.
    pub metadata: Option<Map<String, Value>>,
    /// New limit.
    pub limit: Option<i64>,
}

/// Apply an update to a file's text (or create it). The existing frontmatter text is
/// kept byte for byte when the update does not change its meaning.
pub fn apply_update(existing: Option<&str>, u: &BlockUpdate) -> String {
    let parsed = existing.map(parse);
    let body = u
        .value
        .clone()
        .or_else(|| parsed.as_ref().map(|p| p.value.clone()))
        .unwrap_or_default();
    let mut map = parsed
        .as_ref()
        .and_then(|p| p.frontmatter.as_ref().map(|(_, m)| m.clone()))
        .unwrap_or_default();
    let before = map.clone();
    if let Some(d) = &u.description {
        map.insert("description".into(), Value::String(d.clone()));
    }
    if let Some(r) = u.read_only {
        if r || map.contains_key("read_only") {
            map.insert("read_only".into(), Value::Bool(r));
        }
    }
    if let Some(l) = u.limit {
        map.insert("limit".into(), Value::from(l));
    }
    if let Some(m) = &u.metadata {
        if !m.is_empty() || map.contains_key("metadata") {
            map.insert("metadata".into(), Value::Object(m.clone()));
        }
    }
    match parsed.as_ref().and_then(|p| p.frontmatter.as_ref()) {
        Some((raw, _)) if map == before => format!("{raw}{body}"),
        _ => render_map(&map, &body),
    }
}

/// The block API routes.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/agents/{agent_id}/blocks", get(list_blocks))
        .route(
            "/v1/agents/{agent_id}/blocks/{*label}",
            get(get_block).put(put_block).delete(delete_block),
        )
        .route("/v1/agents/{agent_id}/sync", get(sync_status))
}

#[derive(serde::Serialize)]
struct BlockOut<'a> {
    id: &'a str,
    label: &'a str,
    value: &'a str,
    description: Option<&'a str>,
    limit: i64,
    read_only: bool,
    metadata: &'a Value,
}

fn block_json(b: &Block) -> Value {
    serde_json::to_value(BlockOut {
        id: &b.id,
        label: &b.label,
        value: &b.value,
        description: b.description.as_deref(),
        limit: b.limit,
        read_only: b.read_only,
        metadata: &b.metadata,
    })
    .unwrap_or(Value::Null)
}

async fn list_blocks(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(agent_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let c = caller(&state, peer, &headers).await?;
    let agent = agent_for(&state, &c, &agent_id).await?;
    let blocks = state.db.agent_blocks(&agent.id).await?;
    Ok(Json(Value::Array(blocks.iter().map(block_json).collect())).into_response())
}

async fn get_block(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((agent_id, label)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let c = caller(&state, peer, &headers).await?;
    let agent = agent_for(&state, &c, &agent_id).await?;
    validate_label(&label)?;
    match state.db.agent_block(&agent.id, &label).await? {
        Some(b) => Ok(Json(block_json(&b)).into_response()),
        None => Err(ApiError::NotFound(format!("block {label:?} not found"))),
    }
}

async fn put_block(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((agent_id, label)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let c = caller(&state, peer, &headers).await?;
    let agent = agent_for(&state, &c, &agent_id).await?;
    validate_label(&label)?;
    let update: BlockUpdate = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    if update.limit.is_some_and(|l| l <= 0) {
        return Err(ApiError::BadRequest(
            "limit must be a positive integer".into(),
        ));
    }
    let (created, commit) = state
        .sync
        .write_block(&state, &agent, &c, &label, Some(update))
        .await?;
    match state.db.agent_block(&agent.id, &label).await? {
        Some(b) => {
            let mut v = block_json(&b);
            v["commit"] = Value::String(commit);
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((status, Json(v)).into_response())
        }
        None => Err(ApiError::Internal(format!(
            "block {label:?} committed as {commit} but not synced"
        ))),
    }
}

async fn delete_block(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((agent_id, label)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let c = caller(&state, peer, &headers).await?;
    let agent = agent_for(&state, &c, &agent_id).await?;
    validate_label(&label)?;
    let (_, commit) = state
        .sync
        .write_block(&state, &agent, &c, &label, None)
        .await?;
    Ok(
        Json(serde_json::json!({ "label": label, "deleted": true, "commit": commit }))
            .into_response(),
    )
}

async fn sync_status(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(agent_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let c = caller(&state, peer, &headers).await?;
    let agent = agent_for(&state, &c, &agent_id).await?;
    let st = state.sync.status(&state, &agent).await?;
    Ok(Json(st).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontmatter_cases() {
        let p = parse(
            "---\ndescription: Who I am\nread_only: true\nmetadata: {k: v}\nlimit: 50\n---\nbody\n",
        );
        assert_eq!(p.value, "body\n");
        assert_eq!(p.description.as_deref(), Some("Who I am"));
        assert_eq!((p.read_only, p.limit), (Some(true), Some(50)));
        assert_eq!(p.metadata.unwrap()["k"], "v");
        assert!(p.errors.is_empty() && p.warnings.is_empty());
        // No frontmatter, unterminated, not a mapping, invalid YAML: whole file.
        for f in [
            "plain text\n",
            "---\ndescription: x\nno end\n",
            "---\n- a\n- b\n---\nbody",
            "---\na: [1\n---\nbody",
        ] {
            let p = parse(f);
            assert_eq!(p.value, f, "{f:?}");
            assert!(p.frontmatter.is_none());
        }
        assert_eq!(parse("---\na: [1\n---\nbody").warnings.len(), 1);
        // CRLF line endings.
        let p = parse("---\r\ndescription: crlf\r\n---\r\nbody\r\n");
        assert_eq!(p.description.as_deref(), Some("crlf"));
        assert_eq!(p.value, "body\r\n");
        // Empty body and empty frontmatter.
        assert_eq!(parse("---\ndescription: d\n---\n").value, "");
        assert_eq!(parse("---\ndescription: d\n---").value, "");
        assert_eq!(parse("---\n---\nb").value, "b");
        assert_eq!(parse("").value, "");
        // Wrong types and over-limit values are errors.
        let p = parse("---\ndescription: 5\nread_only: maybe\nlimit: -1\nmetadata: [1]\n---\nx");
        assert_eq!(p.errors.len(), 4, "{:?}", p.errors);
        assert_eq!(parse("---\nlimit: 3\n---\nfour").errors.len(), 1);
        assert!(parse("---\nlimit: 4\n---\nfour").errors.is_empty());
    }

    #[test]
    fn labels_and_paths() {
        assert_eq!(
            label_for_path("system/human.md").as_deref(),
            Some("system/human")
        );
        assert_eq!(label_for_path("persona.md").as_deref(), Some("persona"));
        assert_eq!(
            label_for_path("skills/git/SKILL.md").as_deref(),
            Some("skills/git")
        );
        assert_eq!(label_for_path("skills/git/notes.md"), None);
        assert_eq!(label_for_path("skills/x.md"), None);
        assert_eq!(label_for_path("notes.txt"), None);
        assert_eq!(label_for_path(".md"), None);
        assert_eq!(path_for_label("skills/git"), "skills/git/SKILL.md");
        assert_eq!(path_for_label("a/b/c"), "a/b/c.md");
        for ok in ["human", "system/human", "skills/x"] {
            assert!(validate_label(ok).is_ok());
        }
        for bad in [
            "",
            "../x",
            "a//b",
            "/a",
            "a/",
            "a\\b",
            "skills/a/b",
            "a/./b",
        ] {
            assert!(validate_label(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn updates_keep_frontmatter_text_when_meaning_is_unchanged() {
        let orig = "---\n# a comment\ndescription:   'Who'\n---\nold";
        let u = BlockUpdate {
            value: Some("new".into()),
            description: Some("Who".into()),
            ..Default::default()
        };
        assert_eq!(
            apply_update(Some(orig), &u),
            "---\n# a comment\ndescription:   'Who'\n---\nnew"
        );
        let u = BlockUpdate {
            description: Some("Other".into()),
            ..Default::default()
        };
        let out = apply_update(Some(orig), &u);
        assert_eq!(parse(&out).description.as_deref(), Some("Other"));
        assert_eq!(parse(&out).value, "old");
        let u = BlockUpdate {
            value: Some("v".into()),
            read_only: Some(true),
            metadata: Some(serde_json::from_str(r#"{"a":[1,"x: y"]}"#).unwrap()),
            ..Default::default()
        };
        let created = apply_update(None, &u);
        let p = parse(&created);
        assert_eq!((p.value.as_str(), p.read_only), ("v", Some(true)));
        assert_eq!(p.metadata.unwrap()["a"][1], "x: y");
        assert_eq!(
            apply_update(
                None,
                &BlockUpdate {
                    value: Some("plain".into()),
                    ..Default::default()
                }
            ),
            "plain"
        );
        // render() output parses back to the same fields.
        let b = Block {
            id: "b".into(),
            label: "l".into(),
            value: "text\n".into(),
            description: Some("d: \"q\"".into()),
            limit: 10,
            read_only: true,
            metadata: serde_json::json!({"k": 1}),
        };
        let p = parse(&render(&b));
        assert_eq!(
            (
                p.description.as_deref(),
                p.limit,
                p.read_only,
                p.value.as_str()
            ),
            (Some("d: \"q\""), Some(10), Some(true), "text\n")
        );
    }
}
