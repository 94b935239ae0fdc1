//! Path classification: which files of a git directory are temporary, immutable,
//! refs, or other mutable files. The write-back rules of the filesystem follow from it.

/// How the filesystem treats a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileClass {
    /// Lock files, temporary objects and packs, quarantine directories: local only.
    Temporary,
    /// Loose objects and finished packs: uploaded once, cached forever.
    Immutable,
    /// `HEAD`, `packed-refs`, `refs/**`: published with compare-and-swap after every
    /// immutable file finalized before them is stored; produce ref events.
    Ref,
    /// Other files inside a repository (`config`, `description`, `info/*`, ...):
    /// uploaded when finalized, revalidated by ETag.
    Mutable,
    /// Files outside any `*.git` directory: uploaded on close or fsync.
    Plain,
}

impl FileClass {
    /// Whether the file's content is ever sent to the store.
    pub fn is_stored(self) -> bool {
        !matches!(self, FileClass::Temporary)
    }
}

/// Where a key sits relative to the repository that contains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoPath<'a> {
    /// Key of the repository directory, e.g. `org/agent/repo.git`.
    pub repo: &'a str,
    /// Path inside the repository, e.g. `refs/heads/main` (empty for the repo itself).
    pub rel: &'a str,
}

/// Find the repository a key belongs to: the first path component that ends in `.git`.
pub fn repo_of(key: &str) -> Option<RepoPath<'_>> {
    let mut offset = 0;
    for comp in key.split('/') {
        let end = offset + comp.len();
        if comp.len() > 4 && comp.ends_with(".git") {
            let rel = key.get(end + 1..).unwrap_or("");
            return Some(RepoPath {
                repo: &key[..end],
                rel,
            });
        }
        offset = end + 1;
    }
    None
}

fn is_hex(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn is_temp_name(name: &str) -> bool {
    name.ends_with(".lock") || name.starts_with("tmp_") || name.ends_with(".tmp")
}

/// Classify a path relative to its repository.
pub fn classify_rel(rel: &str) -> FileClass {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if is_temp_name(name) {
        return FileClass::Temporary;
    }
    let parts: Vec<&str> = rel.split('/').collect();
    match parts.as_slice() {
        ["objects", dir, ..] if dir.starts_with("incoming-") || dir.starts_with("tmp_") => {
            FileClass::Temporary
        }
        ["objects", "pack", file] => {
            let Some(rest) = file.strip_prefix("pack-") else {
                // libgit2's indexer writes `pack_git2_*` before renaming it into place.
                return FileClass::Temporary;
            };
            match rest.split_once('.') {
                Some((hash, ext))
                    if (hash.len() == 40 || hash.len() == 64)
                        && is_hex(hash)
                        && matches!(ext, "pack" | "idx" | "rev" | "bitmap" | "mtimes") =>
                {
                    FileClass::Immutable
                }
                Some((hash, "keep" | "promisor")) if is_hex(hash) => FileClass::Mutable,
                _ => FileClass::Temporary,
            }
        }
        ["objects", dir, file]
            if dir.len() == 2
                && is_hex(dir)
                && (file.len() == 38 || file.len() == 62)
                && is_hex(file) =>
        {
            FileClass::Immutable
        }
        ["HEAD"] | ["packed-refs"] => FileClass::Ref,
        ["refs", _, ..] => FileClass::Ref,
        _ => FileClass::Mutable,
    }
}

/// Classify a full key.
pub fn classify(key: &str) -> FileClass {
    match repo_of(key) {
        Some(rp) if !rp.rel.is_empty() => classify_rel(rp.rel),
        _ => {
            let name = key.rsplit('/').next().unwrap_or(key);
            if is_temp_name(name) {
                FileClass::Temporary
            } else {
                FileClass::Plain
            }
        }
    }
}

/// The `(org, agent)` of an `ORG/AGENT/repo.git` repository key.
pub fn org_agent(repo: &str) -> Option<(&str, &str)> {
    let mut it = repo.split('/');
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(org), Some(agent), Some("repo.git"), None) => Some((org, agent)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FileClass::*;

    #[test]
    fn repo_detection() {
        assert_eq!(
            repo_of("o/a/repo.git/refs/heads/main"),
            Some(RepoPath {
                repo: "o/a/repo.git",
                rel: "refs/heads/main"
            })
        );
        assert_eq!(
            repo_of("x.git"),
            Some(RepoPath {
                repo: "x.git",
                rel: ""
            })
        );
        assert_eq!(repo_of("a/b/c"), None);
        assert_eq!(
            repo_of(".git/HEAD"),
            None,
            "a bare '.git' name is not a repo here"
        );
        assert_eq!(org_agent("o/a/repo.git"), Some(("o", "a")));
        assert_eq!(org_agent("o/repo.git"), None);
    }

    #[test]
    fn classes() {
        let h38 = "0123456789abcdef0123456789abcdef012345";
        let h40 = "0123456789abcdef0123456789abcdef01234567";
        let cases = [
            (format!("r.git/objects/ab/{h38}"), Immutable),
            ("r.git/objects/ab/tmp_obj_XyZ".to_string(), Temporary),
            (format!("r.git/objects/pack/pack-{h40}.pack"), Immutable),
            (format!("r.git/objects/pack/pack-{h40}.idx"), Immutable),
            (format!("r.git/objects/pack/pack-{h40}.rev"), Immutable),
            (format!("r.git/objects/pack/pack-{h40}.keep"), Mutable),
            (format!("r.git/objects/pack/pack-{h40}.idx.lock"), Temporary),
            ("r.git/objects/pack/tmp_pack_abc".into(), Temporary),
            ("r.git/objects/pack/pack_git2_abc".into(), Temporary),
            (
                format!("r.git/objects/incoming-abc/pack/pack-{h40}.pack"),
                Temporary,
            ),
            (format!("r.git/objects/incoming-abc/ab/{h38}"), Temporary),
            ("r.git/HEAD".into(), Ref),
            ("r.git/packed-refs".into(), Ref),
            ("r.git/refs/heads/main".into(), Ref),
            ("r.git/refs/heads/main.lock".into(), Temporary),
            ("r.git/refs/tags/v1".into(), Ref),
            ("r.git/config".into(), Mutable),
            ("r.git/config.lock".into(), Temporary),
            ("r.git/info/refs".into(), Mutable),
            ("r.git/objects/info/packs".into(), Mutable),
            ("r.git/shallow".into(), Mutable),
            ("notes/readme.md".into(), Plain),
            ("notes/x.tmp".into(), Temporary),
        ];
        for (key, class) in cases {
            assert_eq!(classify(&key), class, "{key}");
        }
    }
}
