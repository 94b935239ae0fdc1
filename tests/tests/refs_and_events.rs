//! Issue 2, behaviours 4 and 5: ref compare-and-swap between two writers, and the
//! exact ref events of pushes, deletes, pack-refs and force pushes.

use repofs::{Oid, RefUpdated};
use repofs_tests::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::Receiver;

fn drain(rx: &mut Receiver<RefUpdated>) -> Vec<(String, Option<String>, Option<String>)> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        assert_eq!(ev.repo, REPO);
        assert_eq!(ev.org.as_deref(), Some("org-1"));
        assert_eq!(ev.agent.as_deref(), Some("agent-1"));
        out.push((
            ev.refname,
            ev.old.map(|o| o.to_string()),
            ev.new.map(|o| o.to_string()),
        ));
    }
    out
}

fn s(x: &str) -> Option<String> {
    Some(x.trim().to_string())
}

#[test]
fn exact_events_for_push_delete_pack_refs_and_force_push() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let m = TestMount::local(root, "a")?;
    let bare = init_bare(root, m.path())?;
    let mut rx = m.fs().subscribe();
    let url = bare.to_str().expect("utf8");

    let src = make_source(root, 2)?;
    let c1 = git(&src, &["rev-parse", "HEAD"])?;
    git(&src, &["push", "-q", url, "main", "main:topic"])?;
    let mut evs = drain(&mut rx);
    evs.sort();
    assert_eq!(
        evs,
        vec![
            ("refs/heads/main".into(), None, s(&c1)),
            ("refs/heads/topic".into(), None, s(&c1))
        ]
    );

    // fast-forward
    let c2 = commit_file(&src, "a.md", "a\n")?;
    git(&src, &["push", "-q", url, "main"])?;
    assert_eq!(
        drain(&mut rx),
        vec![("refs/heads/main".into(), s(&c1), s(&c2))]
    );

    // pack-refs moves values without changing any: no events
    git(&bare, &["pack-refs", "--all"])?;
    assert_eq!(drain(&mut rx), vec![]);
    assert!(bare.join("packed-refs").exists());
    assert!(!bare.join("refs/heads/main").exists());

    // a branch that only lives in packed-refs is deleted
    git(&src, &["push", "-q", url, ":topic"])?;
    assert_eq!(
        drain(&mut rx),
        vec![("refs/heads/topic".into(), s(&c1), None)]
    );

    // force push (non-fast-forward) of a packed ref
    git(&src, &["reset", "-q", "--hard", "HEAD~1"])?;
    let c3 = commit_file(&src, "b.md", "b\n")?;
    git(&src, &["push", "-q", "--force", url, "main"])?;
    assert_eq!(
        drain(&mut rx),
        vec![("refs/heads/main".into(), s(&c2), s(&c3))]
    );

    // a tag, then HEAD pointed at another branch
    git(&src, &["push", "-q", url, "main:other"])?;
    let _ = drain(&mut rx);
    git(&bare, &["symbolic-ref", "HEAD", "refs/heads/nonexistent"])?;
    assert_eq!(drain(&mut rx), vec![("HEAD".into(), s(&c3), None)]);
    git(&bare, &["symbolic-ref", "HEAD", "refs/heads/main"])?;
    assert_eq!(drain(&mut rx), vec![("HEAD".into(), None, s(&c3))]);
    Ok(())
}

#[test]
fn hook_command_gets_events_as_json() -> anyhow::Result<()> {
    // The binary's --on-ref-update runs `sh -c CMD` with the event on stdin; exercised
    // in crash.rs through the real binary. Here: the JSON shape it sends.
    let ev = RefUpdated {
        repo: REPO.into(),
        org: Some("org-1".into()),
        agent: Some("agent-1".into()),
        refname: "refs/heads/main".into(),
        old: None,
        new: Oid::parse("0123456789abcdef0123456789abcdef01234567"),
    };
    let v: serde_json::Value = serde_json::to_value(&ev)?;
    assert_eq!(v["new"], "0123456789abcdef0123456789abcdef01234567");
    assert_eq!(v["old"], serde_json::Value::Null);
    assert_eq!(v["org"], "org-1");
    Ok(())
}

/// Two mounts of one store that supports conditional writes: the second writer of a
/// ref loses, git reports the failure, and the winner's ref is kept.
fn two_writers(store: Arc<dyn object_store::ObjectStore>, url: &str) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let a = TestMount::new(root, "a", store.clone(), url)?;
    let bare_a = init_bare(root, a.path())?;
    let src = make_source(root, 1)?;
    git(
        &src,
        &["push", "-q", bare_a.to_str().expect("utf8"), "main"],
    )?;

    // b trusts its metadata for a long time, so it still believes the old value
    let b = TestMount::with(root, "b", store.clone(), url, |c| {
        c.metadata_ttl = Duration::from_secs(60)
    })?;
    let bare_b = b.path().join(REPO);
    // b reads the ref (so it knows the current version), then a moves it
    let base = git(&bare_b, &["rev-parse", "main"])?;
    let ca = commit_file(&src, "a.md", "from a\n")?;
    git(
        &src,
        &["push", "-q", bare_a.to_str().expect("utf8"), "main"],
    )?;

    // b still believes in the old value (its metadata is within the TTL) and writes
    // a ref update on top of it: the store refuses and git reports it.
    let other = root.join("other");
    git(
        root,
        &[
            "clone",
            "-q",
            "-b",
            "main",
            src.to_str().expect("utf8"),
            other.to_str().expect("utf8"),
        ],
    )?;
    git(&other, &["reset", "-q", "--hard", base.trim()])?;
    let cb = commit_file(&other, "b.md", "from b\n")?;
    git(
        &other,
        &[
            "push",
            "-q",
            bare_b.to_str().expect("utf8"),
            &format!("{cb}:refs/heads/side"),
        ],
    )?;
    let err = git_fails(
        &bare_b,
        &["update-ref", "refs/heads/main", &cb, base.trim()],
    )
    .unwrap_or_default();
    assert_eq!(
        b.fs().stats().snapshot().ref_conflicts,
        1,
        "git stderr: {err}"
    );
    assert!(err.contains("refs/heads/main"), "{err}");
    assert_eq!(
        git(&bare_a, &["rev-parse", "main"])?.trim(),
        ca,
        "the first writer's ref is kept"
    );
    assert_eq!(
        git(&bare_b, &["rev-parse", "main"])?.trim(),
        ca,
        "b sees the winner after the conflict"
    );
    Ok(())
}

#[test]
fn second_writer_loses_the_ref_race_in_memory_store() -> anyhow::Result<()> {
    let store: Arc<dyn object_store::ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    two_writers(store, "memory://")
}

#[test]
fn second_writer_loses_the_ref_race_on_s3() -> anyhow::Result<()> {
    let Ok(endpoint) = std::env::var("REPOFS_TEST_S3_ENDPOINT") else {
        eprintln!("REPOFS_TEST_S3_ENDPOINT not set (scripts/test starts moto); skipping");
        return Ok(());
    };
    let bucket = std::env::var("REPOFS_TEST_S3_BUCKET").unwrap_or_else(|_| "repofs-test".into());
    let prefix = format!("race-{}", std::process::id());
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_bucket_name(&bucket)
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .build()?;
    let store: Arc<dyn object_store::ObjectStore> =
        Arc::new(object_store::prefix::PrefixStore::new(
            Arc::new(s3) as Arc<dyn object_store::ObjectStore>,
            prefix.as_str(),
        ));
    two_writers(store, &format!("s3://{bucket}/{prefix}"))
}
