//! End to end: the real git CLI (protocol v0, v1 and v2) and libgit2 against a real
//! repofs-server on a real mount and database.

mod common;

use anyhow::Result;
use common::*;
use std::path::Path;

fn head(dir: &Path) -> Result<String> {
    Ok(git(dir, &["rev-parse", "HEAD"])?.trim().to_string())
}

fn ls_remote(dir: &Path, url: &str, version: u8) -> Result<String> {
    git(
        dir,
        &[
            "-c",
            &format!("protocol.version={version}"),
            "ls-remote",
            url,
        ],
    )
}

#[test]
fn clone_fetch_push_with_every_protocol_version() -> Result<()> {
    let s = TestServer::start()?;
    let tmp = tempfile::tempdir()?;
    for v in [0u8, 1, 2] {
        let agent = format!("agent-v{v}");
        s.create_agent(&agent)?;
        let url = s.remote(&agent);
        let pv = format!("protocol.version={v}");
        // First access creates the repository with an initial commit.
        let a = clone(tmp.path(), &url, &format!("a{v}"), v, &[])?;
        assert!(a.join(".letta/config.json").is_file());
        assert_eq!(
            git(&a, &["symbolic-ref", "HEAD"])?.trim(),
            "refs/heads/main"
        );
        let b = clone(tmp.path(), &url, &format!("b{v}"), v, &[])?;

        // Fast-forward push, then an incremental fetch in the other clone.
        commit_file(&a, "system/human.md", "hello\n")?;
        let tip = commit_file(&a, "notes/n1.md", "one\n")?;
        git(&a, &["-c", &pv, "push", "-q", "origin", "main"])?;
        git(&b, &["-c", &pv, "pull", "-q", "--ff-only"])?;
        assert_eq!(head(&b)?, tip);
        // No-op fetch.
        git(&b, &["-c", &pv, "fetch", "-q"])?;

        // New branch, annotated tag, ls-remote shows both (tag peeled).
        git(&a, &["checkout", "-q", "-b", "feature"])?;
        let feat = commit_file(&a, "f.md", "f\n")?;
        git(&a, &["tag", "-a", "v1", "-m", "release"])?;
        git(&a, &["-c", &pv, "push", "-q", "origin", "feature", "v1"])?;
        let refs = ls_remote(tmp.path(), &url, v)?;
        assert!(
            refs.contains(&format!("{feat}\trefs/heads/feature")),
            "{refs}"
        );
        assert!(
            refs.contains(&format!("{feat}\trefs/tags/v1^{{}}")),
            "{refs}"
        );
        assert!(refs.contains(&format!("{tip}\tHEAD")), "{refs}");
        // Fetching the tag brings the annotated tag object.
        git(&b, &["-c", &pv, "fetch", "-q", "--tags"])?;
        assert_eq!(git(&b, &["cat-file", "-t", "v1"])?.trim(), "tag");

        // Non-fast-forward is refused (even forced); the ref is unchanged.
        git(&a, &["checkout", "-q", "main"])?;
        git(&a, &["reset", "-q", "--hard", "HEAD~1"])?;
        commit_file(&a, "other.md", "diverged\n")?;
        let err = git_fails(&a, &["-c", &pv, "push", "-f", "origin", "main"])?;
        assert!(err.contains("non-fast-forward"), "{err}");
        assert!(ls_remote(tmp.path(), &url, v)?.contains(&format!("{tip}\trefs/heads/main")));

        // Deleting the default branch is refused; deleting another branch works.
        let err = git_fails(&a, &["-c", &pv, "push", "origin", ":main"])?;
        assert!(
            err.contains("refusing to delete the current branch"),
            "{err}"
        );
        git(&a, &["-c", &pv, "push", "-q", "origin", ":feature"])?;
        assert!(!ls_remote(tmp.path(), &url, v)?.contains("refs/heads/feature"));

        // Atomic multi-ref push: one bad ref fails them all.
        git(&b, &["checkout", "-q", "-b", "x1"])?;
        let x1 = commit_file(&b, "x1.md", "x1\n")?;
        git(&b, &["branch", "x2"])?;
        git(
            &b,
            &["-c", &pv, "push", "-q", "--atomic", "origin", "x1", "x2"],
        )?;
        let refs = ls_remote(tmp.path(), &url, v)?;
        assert!(
            refs.contains(&format!("{x1}\trefs/heads/x1"))
                && refs.contains(&format!("{x1}\trefs/heads/x2"))
        );
        commit_file(&b, "x3.md", "x3\n")?;
        // x2 := x1's new commit (ff) but main := unrelated commit (non-ff): all refused.
        let err = git_fails(
            &b,
            &[
                "-c",
                &pv,
                "push",
                "--atomic",
                "-f",
                "origin",
                "x1:x2",
                "HEAD~3:main",
            ],
        )?;
        assert!(
            err.contains("atomic push failure") || err.contains("non-fast-forward"),
            "{err}"
        );
        assert!(ls_remote(tmp.path(), &url, v)?.contains(&format!("{x1}\trefs/heads/x2")));

        // A push bigger than http.postBuffer takes git's chunked path (after the probe).
        git(&b, &["checkout", "-q", "main"])?;
        let big: String = (0..150_000)
            .map(|i| format!("{:x}", (i * 7919) % 65521))
            .collect();
        std::fs::write(b.join("big.txt"), &big)?;
        let random: Vec<u8> = (0..1_500_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(b.join("blob.bin"), random)?;
        git(&b, &["add", "-A"])?;
        git(&b, &["commit", "-q", "-m", "big"])?;
        git(
            &b,
            &[
                "-c",
                &pv,
                "-c",
                "http.postBuffer=65536",
                "push",
                "-q",
                "origin",
                "main",
            ],
        )?;
        let c = clone(tmp.path(), &url, &format!("c{v}"), v, &[])?;
        assert_eq!(head(&c)?, head(&b)?);
        assert_eq!(std::fs::read_to_string(c.join("big.txt"))?, big);
        git(&c, &["fsck", "--full", "--strict"])?;
    }
    // The repositories in the mount are sound.
    for v in [0u8, 1, 2] {
        let repo = s.mount().join(format!(
            "org-00000000-0000-4000-8000-000000000000/agent-v{v}/repo.git"
        ));
        git(&repo, &["fsck", "--full"])?;
    }
    Ok(())
}

#[test]
fn empty_repository_clones_and_accepts_a_first_push() -> Result<()> {
    let s = TestServer::start()?;
    s.create_agent("agent-empty")?;
    // A repository that exists but has no commits (created straight in the mount).
    let repo = s
        .mount()
        .join("org-00000000-0000-4000-8000-000000000000/agent-empty/repo.git");
    std::fs::create_dir_all(&repo)?;
    git(&repo, &["init", "-q", "--bare", "-b", "main"])?;
    let tmp = tempfile::tempdir()?;
    for v in [0u8, 2] {
        let out = git_cmd(
            tmp.path(),
            &[
                "-c",
                &format!("protocol.version={v}"),
                "clone",
                &s.remote("agent-empty"),
                &format!("e{v}"),
            ],
        )
        .output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("empty repository"));
    }
    let e = tmp.path().join("e0");
    let tip = commit_file(&e, "a.md", "a\n")?;
    git(&e, &["push", "-q", "origin", "HEAD:main"])?;
    assert!(ls_remote(tmp.path(), &s.remote("agent-empty"), 2)?.contains(&tip));
    Ok(())
}

#[test]
fn shallow_clones_and_deepening() -> Result<()> {
    let s = TestServer::start()?;
    s.create_agent("agent-sh")?;
    let url = s.remote("agent-sh");
    let tmp = tempfile::tempdir()?;
    let w = clone(tmp.path(), &url, "w", 2, &[])?;
    for i in 0..6 {
        commit_file(&w, &format!("n{i}.md"), &format!("{i}\n"))?;
    }
    git(&w, &["branch", "old", "HEAD~3"])?;
    git(&w, &["push", "-q", "origin", "main", "old"])?;
    assert_eq!(git(&w, &["rev-list", "--count", "HEAD"])?.trim(), "7");
    let count = |d: &Path| -> Result<usize> {
        Ok(git(d, &["rev-list", "--count", "HEAD"])?.trim().parse()?)
    };
    for v in [0u8, 1, 2] {
        let pv = format!("protocol.version={v}");
        let d = clone(tmp.path(), &url, &format!("d{v}"), v, &["--depth", "2"])?;
        assert_eq!(count(&d)?, 2, "v{v} depth 2");
        assert!(d.join(".git/shallow").is_file());
        git(&d, &["-c", &pv, "fetch", "-q", "--deepen=2"])?;
        assert_eq!(count(&d)?, 4, "v{v} deepen 2");
        git(&d, &["-c", &pv, "fetch", "-q", "--depth=5"])?;
        assert_eq!(count(&d)?, 5, "v{v} depth 5");
        git(&d, &["-c", &pv, "fetch", "-q", "--unshallow"])?;
        assert_eq!(count(&d)?, count(&w)?, "v{v} unshallow");
        git(&d, &["fsck", "--full"])?;
        // Incremental fetch into a shallow clone.
        let d1 = clone(tmp.path(), &url, &format!("d1{v}"), v, &["--depth", "1"])?;
        commit_file(&w, &format!("more{v}.md"), "more\n")?;
        git(&w, &["push", "-q", "origin", "main"])?;
        git(&d1, &["-c", &pv, "pull", "-q", "--ff-only"])?;
        assert_eq!(head(&d1)?, head(&w)?);
        // --shallow-exclude: everything not reachable from `old`.
        let ex = clone(
            tmp.path(),
            &url,
            &format!("ex{v}"),
            v,
            &["--shallow-exclude=old", "--single-branch"],
        )?;
        let n = count(&ex)?;
        assert_eq!(
            n,
            git(&w, &["rev-list", "--count", "old..main"])?
                .trim()
                .parse::<usize>()?,
            "v{v} shallow-exclude"
        );
        // --shallow-since far in the past: the whole history.
        let since = clone(
            tmp.path(),
            &url,
            &format!("si{v}"),
            v,
            &["--shallow-since=2000-01-01"],
        )?;
        assert_eq!(count(&since)?, count(&w)?);
    }
    Ok(())
}

#[test]
fn partial_clones_fetch_blobs_lazily() -> Result<()> {
    let s = TestServer::start()?;
    s.create_agent("agent-pc")?;
    let url = s.remote("agent-pc");
    let tmp = tempfile::tempdir()?;
    let w = clone(tmp.path(), &url, "w", 2, &[])?;
    commit_file(&w, "small.md", "s\n")?;
    commit_file(&w, "large.md", &"L".repeat(5000))?;
    git(&w, &["push", "-q", "origin", "main"])?;
    for v in [0u8, 2] {
        let pv = format!("protocol.version={v}");
        let p = tmp.path().join(format!("p{v}"));
        git(
            tmp.path(),
            &[
                "-c",
                &pv,
                "clone",
                "-q",
                "--no-checkout",
                "--filter=blob:none",
                &url,
                p.to_str().unwrap(),
            ],
        )?;
        let missing = git(&p, &["rev-list", "--objects", "--missing=print", "HEAD"])?;
        let n_missing = missing.lines().filter(|l| l.starts_with('?')).count();
        assert!(n_missing >= 3, "v{v}: blobs should be missing:\n{missing}");
        // Checkout fetches the blobs on demand.
        git(&p, &["-c", &pv, "checkout", "-q", "main"])?;
        assert_eq!(
            std::fs::read_to_string(p.join("large.md"))?,
            "L".repeat(5000)
        );
        let l = tmp.path().join(format!("l{v}"));
        git(
            tmp.path(),
            &[
                "-c",
                &pv,
                "clone",
                "-q",
                "--no-checkout",
                "--filter=blob:limit=100",
                &url,
                l.to_str().unwrap(),
            ],
        )?;
        let missing = git(&l, &["rev-list", "--objects", "--missing=print", "HEAD"])?;
        let large = git(&w, &["rev-parse", "HEAD:large.md"])?;
        let small = git(&w, &["rev-parse", "HEAD:small.md"])?;
        assert!(missing.contains(&format!("?{}", large.trim())), "{missing}");
        assert!(
            !missing.contains(&format!("?{}", small.trim())),
            "{missing}"
        );
    }
    Ok(())
}

#[test]
fn libgit2_client_clones_fetches_and_pushes() -> Result<()> {
    let s = TestServer::start()?;
    s.create_agent("agent-lg")?;
    let url = s.remote("agent-lg");
    let tmp = tempfile::tempdir()?;
    let repo = git2::Repository::clone(&url, tmp.path().join("lg"))?;
    let sig = git2::Signature::now("lib", "lib@example.com")?;
    std::fs::write(tmp.path().join("lg/system.md"), "from libgit2\n")?;
    let mut idx = repo.index()?;
    idx.add_path(Path::new("system.md"))?;
    idx.write()?;
    let tree = repo.find_tree(idx.write_tree()?)?;
    let parent = repo.head()?.peel_to_commit()?;
    let c = repo.commit(
        Some("HEAD"),
        &sig,
        &sig,
        "libgit2 commit",
        &tree,
        &[&parent],
    )?;
    let mut remote = repo.find_remote("origin")?;
    let statuses = std::cell::RefCell::new(Vec::new());
    let mut cbs = git2::RemoteCallbacks::new();
    cbs.push_update_reference(|name, status| {
        statuses
            .borrow_mut()
            .push((name.to_string(), status.map(String::from)));
        Ok(())
    });
    let mut po = git2::PushOptions::new();
    po.remote_callbacks(cbs);
    remote.push(&["refs/heads/main:refs/heads/main"], Some(&mut po))?;
    assert_eq!(
        statuses.borrow().as_slice(),
        &[("refs/heads/main".to_string(), None)]
    );
    // The git CLI sees libgit2's push; libgit2 fetches the CLI's next push.
    let cli = clone(tmp.path(), &url, "cli", 2, &[])?;
    assert_eq!(head(&cli)?, c.to_string());
    let next = commit_file(&cli, "b.md", "b\n")?;
    git(&cli, &["push", "-q"])?;
    remote.fetch(&["main"], None, None)?;
    let fetched = repo
        .find_reference("refs/remotes/origin/main")?
        .target()
        .unwrap();
    assert_eq!(fetched.to_string(), next);
    // A non-fast-forward push from libgit2 is refused with a status.
    let orphan_tree = repo.find_tree(repo.treebuilder(None)?.write()?)?;
    let orphan = repo.commit(None, &sig, &sig, "orphan", &orphan_tree, &[])?;
    repo.reference("refs/heads/orphan", orphan, true, "x")?;
    statuses.borrow_mut().clear();
    let mut cbs = git2::RemoteCallbacks::new();
    cbs.push_update_reference(|name, status| {
        statuses
            .borrow_mut()
            .push((name.to_string(), status.map(String::from)));
        Ok(())
    });
    let mut po = git2::PushOptions::new();
    po.remote_callbacks(cbs);
    remote.push(&["+refs/heads/orphan:refs/heads/main"], Some(&mut po))?;
    let st = statuses.borrow();
    assert_eq!(st.len(), 1);
    assert!(
        st[0]
            .1
            .as_deref()
            .unwrap_or("")
            .contains("non-fast-forward"),
        "{st:?}"
    );
    Ok(())
}

#[test]
fn concurrent_pushes_of_one_ref_have_exactly_one_winner() -> Result<()> {
    let s = TestServer::start()?;
    s.create_agent("agent-race")?;
    let url = s.remote("agent-race");
    let tmp = tempfile::tempdir()?;
    for round in 0..4 {
        let a = clone(tmp.path(), &url, &format!("a{round}"), 2, &[])?;
        let b = clone(tmp.path(), &url, &format!("b{round}"), 2, &[])?;
        let ta = commit_file(&a, "a.md", &format!("a{round}\n"))?;
        let tb = commit_file(&b, "b.md", &format!("b{round}\n"))?;
        let pa = git_cmd(&a, &["push", "-q", "origin", "main"]).spawn()?;
        let pb = git_cmd(&b, &["push", "-q", "origin", "main"]).spawn()?;
        let (oa, ob) = (pa.wait_with_output()?, pb.wait_with_output()?);
        let wins = [oa.status.success(), ob.status.success()];
        assert_eq!(
            wins.iter().filter(|w| **w).count(),
            1,
            "round {round}: {wins:?}"
        );
        let refs = ls_remote(tmp.path(), &url, 2)?;
        let winner = if wins[0] { &ta } else { &tb };
        assert!(
            refs.contains(&format!("{winner}\trefs/heads/main")),
            "{refs}"
        );
        // The loser can pull and push afterwards.
        let loser = if wins[0] { &b } else { &a };
        git(loser, &["pull", "-q", "--no-rebase", "--no-edit"])?;
        git(loser, &["push", "-q", "origin", "main"])?;
    }
    Ok(())
}

#[test]
fn twenty_concurrent_clones() -> Result<()> {
    let s = TestServer::start()?;
    s.create_agent("agent-many")?;
    let url = s.remote("agent-many");
    let tmp = tempfile::tempdir()?;
    let w = clone(tmp.path(), &url, "w", 2, &[])?;
    for i in 0..30 {
        commit_file(
            &w,
            &format!("memory/m{}.md", i % 10),
            &format!("entry {i}\n"),
        )?;
    }
    git(&w, &["push", "-q", "origin", "main"])?;
    let want = head(&w)?;
    let children: Vec<_> = (0..20)
        .map(|i| {
            let v = if i % 2 == 0 { "0" } else { "2" };
            git_cmd(
                tmp.path(),
                &[
                    "-c",
                    &format!("protocol.version={v}"),
                    "clone",
                    "-q",
                    &url,
                    &format!("c{i}"),
                ],
            )
            .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output()?;
        assert!(
            out.status.success(),
            "clone {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(head(&tmp.path().join(format!("c{i}")))?, want);
    }
    Ok(())
}

#[test]
fn reference_implementation_layout_is_served_as_is() -> Result<()> {
    // The seed uploaded a non-bare `.git` file by file: index, logs/, hooks/, and a
    // config saying bare = false. Put such a tree into the file:// store first.
    let home = tempfile::tempdir()?;
    let work = tempfile::tempdir()?;
    let src = work.path().join("seed");
    std::fs::create_dir_all(&src)?;
    git(&src, &["init", "-q", "-b", "main"])?;
    commit_file(
        &src,
        "system/persona.md",
        "---\ndescription: who\n---\nI am.\n",
    )?;
    let tip = commit_file(&src, "human.md", "Name: Ada\n")?;
    let dest = home
        .path()
        .join("store/org-00000000-0000-4000-8000-000000000000/agent-seed/repo.git");
    copy_tree(&src.join(".git"), &dest)?;
    assert!(std::fs::read_to_string(dest.join("config"))?.contains("bare = false"));
    assert!(dest.join("index").is_file());
    let s = TestServer::start_in(home, |_| {})?;
    s.create_agent("agent-seed")?;
    let c = clone(work.path(), &s.remote("agent-seed"), "c", 2, &[])?;
    assert_eq!(head(&c)?, tip);
    assert_eq!(std::fs::read_to_string(c.join("human.md"))?, "Name: Ada\n");
    let next = commit_file(&c, "human.md", "Name: Ada L.\n")?;
    git(&c, &["push", "-q", "origin", "main"])?;
    let c0 = clone(work.path(), &s.remote("agent-seed"), "c0", 0, &[])?;
    assert_eq!(head(&c0)?, next);
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let t = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &t)?;
        } else {
            std::fs::copy(e.path(), &t)?;
        }
    }
    Ok(())
}

#[test]
fn repository_is_created_from_the_agents_blocks() -> Result<()> {
    let s = TestServer::start()?;
    s.create_agent("agent-blocks")?;
    let db = s.srv().state().db.clone();
    s.rt.block_on(async {
        for (id, label, value, ro) in [("block-1", "persona", "I help.", false), ("block-2", "system/human", "Ada", true)] {
            sqlx::query("INSERT INTO block (id, label, value, description, read_only, organization_id) VALUES ($1, $2, $3, $4, $5, $6)")
                .bind(id).bind(label).bind(value).bind(format!("{label} block")).bind(ro)
                .bind("org-00000000-0000-4000-8000-000000000000")
                .execute(db.pool()).await?;
            sqlx::query("INSERT INTO blocks_agents (agent_id, block_id, block_label) VALUES ($1, $2, $3)")
                .bind("agent-blocks").bind(id).bind(label)
                .execute(db.pool()).await?;
        }
        anyhow::Ok(())
    })?;
    let tmp = tempfile::tempdir()?;
    let c = clone(tmp.path(), &s.remote("agent-blocks"), "c", 2, &[])?;
    let persona = std::fs::read_to_string(c.join("persona.md"))?;
    assert!(
        persona.starts_with("---\ndescription: \"persona block\"\n---\nI help."),
        "{persona}"
    );
    let human = std::fs::read_to_string(c.join("system/human.md"))?;
    assert!(
        human.contains("read_only: true") && human.ends_with("\n---\nAda"),
        "{human}"
    );
    assert!(!c.join(".letta/config.json").exists());
    Ok(())
}

#[test]
fn two_servers_sharing_a_store_never_serve_stale_refs() -> Result<()> {
    let a = TestServer::start()?;
    let store = a.config.store_url.clone();
    let db = a.config.database_url.clone();
    let b = TestServer::start_with(|c| {
        c.store_url = store;
        c.database_url = db;
        // A long TTL: only the per-request revalidation keeps B fresh.
        c.metadata_ttl = std::time::Duration::from_secs(3600);
    })?;
    a.create_agent("agent-two")?;
    let tmp = tempfile::tempdir()?;
    let wa = clone(tmp.path(), &a.remote("agent-two"), "wa", 2, &[])?;
    let wb = clone(tmp.path(), &b.remote("agent-two"), "wb", 2, &[])?;
    for i in 0..3 {
        let tip = commit_file(&wa, "x.md", &format!("{i}\n"))?;
        git(&wa, &["push", "-q", "origin", "main"])?;
        assert!(ls_remote(tmp.path(), &b.remote("agent-two"), 2)?
            .contains(&format!("{tip}\trefs/heads/main")));
        git(&wb, &["pull", "-q", "--ff-only"])?;
        assert_eq!(head(&wb)?, tip);
    }
    // A push through B is seen by A.
    let tip = commit_file(&wb, "y.md", "b\n")?;
    git(&wb, &["push", "-q", "origin", "main"])?;
    assert!(ls_remote(tmp.path(), &a.remote("agent-two"), 0)?
        .contains(&format!("{tip}\trefs/heads/main")));
    Ok(())
}

#[test]
fn full_clone_packs_are_reused_until_a_ref_moves() -> Result<()> {
    let s = TestServer::start()?;
    s.create_agent("agent-pcache")?;
    let url = s.remote("agent-pcache");
    let tmp = tempfile::tempdir()?;
    let w = clone(tmp.path(), &url, "w", 2, &[])?;
    commit_file(&w, "a.md", "a\n")?;
    git(&w, &["push", "-q", "origin", "main"])?;
    let clone_stderr = |name: &str, v: u8| -> Result<String> {
        let out = git_cmd(
            tmp.path(),
            &[
                "-c",
                &format!("protocol.version={v}"),
                "clone",
                "--progress",
                &url,
                name,
            ],
        )
        .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let first = clone_stderr("c1", 2)?;
    assert!(!first.contains("reusing a cached pack"), "{first}");
    let second = clone_stderr("c2", 2)?;
    assert!(second.contains("reusing a cached pack"), "{second}");
    let v0 = clone_stderr("c3", 0)?;
    assert!(v0.contains("reusing a cached pack"), "{v0}");
    for c in ["c1", "c2", "c3"] {
        let d = tmp.path().join(c);
        git(&d, &["fsck", "--full"])?;
        assert_eq!(head(&d)?, head(&w)?);
    }
    // A new commit: a new key, and the new clone has it.
    let tip = commit_file(&w, "b.md", "b\n")?;
    git(&w, &["push", "-q", "origin", "main"])?;
    let after = clone_stderr("c4", 2)?;
    assert!(!after.contains("reusing a cached pack"), "{after}");
    assert_eq!(head(&tmp.path().join("c4"))?, tip);
    // One cached pack per repository state cloned: the initial commit (clone `w`),
    // after the first push, after the second.
    let packs = std::fs::read_dir(s.config.cache_dir.join("packs"))?.count();
    assert_eq!(packs, 3);
    Ok(())
}

#[test]
fn clones_work_when_the_pack_cache_cannot_be_written() -> Result<()> {
    let s = TestServer::start()?;
    // Something that is not a directory where the pack cache goes.
    std::fs::write(s.config.cache_dir.join("packs"), b"not a directory")?;
    let (tmp, w) = s.agent_clone("agent-nocache", 2)?;
    let tip = commit_file(&w, "a.md", "a\n")?;
    git(&w, &["push", "-q", "origin", "main"])?;
    for v in [0u8, 2] {
        let c = clone(
            tmp.path(),
            &s.remote("agent-nocache"),
            &format!("c{v}"),
            v,
            &[],
        )?;
        assert_eq!(head(&c)?, tip);
        git(&c, &["fsck", "--full"])?;
    }
    Ok(())
}

#[test]
fn dulwich_clones_pushes_and_clones_shallow() -> Result<()> {
    // A second, independent implementation of the protocol (Python). scripts/test
    // installs it and sets REPOFS_TEST_PYTHON.
    let Ok(python) = std::env::var("REPOFS_TEST_PYTHON") else {
        anyhow::ensure!(
            std::env::var("REPOFS_TEST_REQUIRE_DULWICH").is_err(),
            "REPOFS_TEST_REQUIRE_DULWICH is set but REPOFS_TEST_PYTHON (a python with dulwich) is not"
        );
        eprintln!("skipping: REPOFS_TEST_PYTHON is not set");
        return Ok(());
    };
    let s = TestServer::start()?;
    s.create_agent("agent-dul")?;
    let tmp = tempfile::tempdir()?;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/dulwich_client.py"
    );
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(s.remote("agent-dul"))
        .arg(tmp.path())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "dulwich client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pushed = String::from_utf8(out.stdout)?.trim().to_string();
    // git sees dulwich's push, and the block was synced from it.
    let c = clone(tmp.path(), &s.remote("agent-dul"), "git", 2, &[])?;
    assert_eq!(head(&c)?, pushed);
    git(&c, &["fsck", "--full"])?;
    let (st, body) = s.request(
        "GET",
        "/v1/agents/agent-dul/blocks/system/dulwich",
        &[],
        None,
    )?;
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("hello from dulwich"), "{body}");
    Ok(())
}

/// The pack bytes of a side-band-64k upload-pack response.
fn demux_pack(resp: &[u8]) -> Vec<u8> {
    let mut pack = Vec::new();
    let mut i = 0;
    while i + 4 <= resp.len() {
        let len = usize::from_str_radix(std::str::from_utf8(&resp[i..i + 4]).unwrap(), 16).unwrap();
        if len < 4 {
            i += 4;
            continue;
        }
        let payload = &resp[i + 4..i + len];
        if payload.first() == Some(&1) {
            pack.extend_from_slice(&payload[1..]);
        }
        i += len;
    }
    pack
}

#[test]
fn include_tag_sends_annotated_tags_of_sent_commits_only() -> Result<()> {
    let s = TestServer::start()?;
    let (tmp, w) = s.agent_clone("agent-tags", 2)?;
    let old = commit_file(&w, "a.md", "a\n")?;
    git(&w, &["tag", "-a", "old-tag", "-m", "on the old commit"])?;
    let new = commit_file(&w, "b.md", "b\n")?;
    git(&w, &["tag", "-a", "new-tag", "-m", "on the new commit"])?;
    git(&w, &["push", "-q", "origin", "main", "old-tag", "new-tag"])?;
    let tag_id = |t: &str| -> Result<String> { Ok(git(&w, &["rev-parse", t])?.trim().to_string()) };
    let (old_tag, new_tag) = (tag_id("old-tag")?, tag_id("new-tag")?);
    // Want the new commit, have the old one: only new-tag rides along.
    let pkt = |l: String| format!("{:04x}{l}", l.len() + 4);
    for (caps, expect_tag) in [(" include-tag", true), ("", false)] {
        let body = format!(
            "{}0000{}{}",
            pkt(format!("want {new} side-band-64k ofs-delta{caps}\n")),
            pkt(format!("have {old}\n")),
            pkt("done\n".into())
        );
        let (st, _, resp) = s.request_full(
            "POST",
            "/v1/git/agent-tags/state.git/git-upload-pack",
            &[],
            Some(body.into_bytes()),
        )?;
        assert_eq!(st, 200);
        let pack = demux_pack(&resp);
        assert_eq!(&pack[..4], b"PACK");
        let r = tmp.path().join(format!("idx-{expect_tag}"));
        git(tmp.path(), &["init", "-q", "--bare", r.to_str().unwrap()])?;
        let mut child = git_cmd(&r, &["index-pack", "--stdin"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), &pack)?;
        let hash = String::from_utf8(child.wait_with_output()?.stdout)?;
        let hash = hash.split_whitespace().last().unwrap_or("").to_string();
        let idx = r.join(format!("objects/pack/pack-{hash}.idx"));
        let listing = git(&r, &["verify-pack", "-v", idx.to_str().unwrap()])?;
        assert_eq!(
            listing.contains(&new_tag),
            expect_tag,
            "{caps:?}:\n{listing}"
        );
        assert!(
            !listing.contains(&old_tag),
            "old-tag's commit was not sent:\n{listing}"
        );
        assert!(listing.contains(&new));
    }
    Ok(())
}
