//! Ref parsing and ref events: what a loose ref, `HEAD` or `packed-refs` says, and
//! the [`RefUpdated`] events the filesystem publishes when they change.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A git object id in lowercase hex (SHA-1 or SHA-256).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Oid(String);

impl Oid {
    /// Parse a 40- or 64-digit hex object id.
    pub fn parse(s: &str) -> Option<Oid> {
        let ok = (s.len() == 40 || s.len() == 64)
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        ok.then(|| Oid(s.to_string()))
    }

    /// The hex form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the all-zero id git uses for "no object".
    pub fn is_zero(&self) -> bool {
        self.0.bytes().all(|b| b == b'0')
    }
}

impl fmt::Display for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A ref changed in the store. Emitted once the new value is durably stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefUpdated {
    /// Key of the repository, e.g. `org/agent/repo.git`.
    pub repo: String,
    /// The organization, for `ORG/AGENT/repo.git` repositories.
    pub org: Option<String>,
    /// The agent, for `ORG/AGENT/repo.git` repositories.
    pub agent: Option<String>,
    /// Full ref name (`refs/heads/main`, `HEAD`).
    pub refname: String,
    /// Value before the change; `None` when the ref did not exist.
    pub old: Option<Oid>,
    /// Value after the change; `None` when the ref was deleted.
    pub new: Option<Oid>,
}

/// The content of a loose ref file or `HEAD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefValue {
    /// Points directly at an object.
    Direct(Oid),
    /// `ref: refs/heads/main`
    Symbolic(String),
}

/// Parse a loose ref or `HEAD` file. Unparseable content is `None` (git treats such a
/// ref as broken; so do we, without failing the write).
pub fn parse_loose(content: &[u8]) -> Option<RefValue> {
    let s = std::str::from_utf8(content).ok()?.trim_end();
    if let Some(target) = s.strip_prefix("ref:") {
        let target = target.trim();
        return (!target.is_empty()).then(|| RefValue::Symbolic(target.to_string()));
    }
    Oid::parse(s).map(RefValue::Direct)
}

/// Parse a `packed-refs` file into refname -> oid (peeled `^` lines are skipped).
pub fn parse_packed(content: &[u8]) -> BTreeMap<String, Oid> {
    let mut out = BTreeMap::new();
    let Ok(s) = std::str::from_utf8(content) else {
        return out;
    };
    for line in s.lines() {
        if line.starts_with('#') || line.starts_with('^') || line.is_empty() {
            continue;
        }
        if let Some((oid, name)) = line.split_once(' ') {
            if let Some(oid) = Oid::parse(oid) {
                out.insert(name.trim().to_string(), oid);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn loose() {
        assert_eq!(
            parse_loose(format!("{A}\n").as_bytes()),
            Some(RefValue::Direct(Oid::parse(A).unwrap()))
        );
        assert_eq!(
            parse_loose(b"ref: refs/heads/main\n"),
            Some(RefValue::Symbolic("refs/heads/main".into()))
        );
        assert_eq!(parse_loose(b"garbage"), None);
        assert_eq!(parse_loose(&[0xff, 0xfe]), None);
        assert!(Oid::parse("0000000000000000000000000000000000000000")
            .unwrap()
            .is_zero());
        assert_eq!(Oid::parse("ABCDEF0123456789abcdef0123456789abcdef01"), None);
    }

    #[test]
    fn packed() {
        let text = format!(
            "# pack-refs with: peeled fully-peeled sorted \n{A} refs/heads/main\n{A} refs/tags/v1\n^{A}\nbogus line\n"
        );
        let m = parse_packed(text.as_bytes());
        assert_eq!(m.len(), 2);
        assert_eq!(m["refs/heads/main"].as_str(), A);
    }
}
