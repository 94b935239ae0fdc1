//! Blocks: the markdown file format (frontmatter + body) and the block API routes.

use crate::db::Block;
use crate::http::AppState;
use axum::Router;
use std::sync::Arc;

/// The default `limit` of a block.
pub const DEFAULT_LIMIT: i64 = 100_000;

/// Render a block as a markdown file: YAML frontmatter (JSON-quoted scalars, which are
/// valid YAML) for the fields that differ from the defaults, then the value.
pub fn render(b: &Block) -> String {
    let mut fm = Vec::new();
    if let Some(d) = &b.description {
        fm.push(format!(
            "description: {}",
            serde_json::to_string(d).unwrap_or_default()
        ));
    }
    if b.limit != DEFAULT_LIMIT {
        fm.push(format!("limit: {}", b.limit));
    }
    if b.read_only {
        fm.push("read_only: true".to_string());
    }
    if b.metadata.as_object().is_some_and(|m| !m.is_empty()) {
        fm.push(format!("metadata: {}", b.metadata));
    }
    if fm.is_empty() {
        return b.value.clone();
    }
    format!("---\n{}\n---\n{}", fm.join("\n"), b.value)
}

/// The block API routes.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
}
