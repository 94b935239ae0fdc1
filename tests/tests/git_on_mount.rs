//! Issue 2, behaviour 1 and 3: standard git (and libgit2) run on the mount, and what
//! a push leaves in the store is a complete repository on its own.

use repofs_tests::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("runtime")
}

/// Everything git does to a bare repository, on the mount.
fn git_lifecycle(create_object: &str) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let m = TestMount::local(root, "a")?;
    let bare = init_bare(root, m.path())?;
    git(&bare, &["config", "core.createObject", create_object])?;
    assert_eq!(
        git(&bare, &["config", "core.createObject"])?.trim(),
        create_object
    );

    // push from a local clone (small push: loose objects via unpack-objects)
    let src = make_source(root, 5)?;
    git(&src, &["push", "-q", bare.to_str().expect("utf8"), "main"])?;
    let tip = git(&src, &["rev-parse", "HEAD"])?;
    assert_eq!(git(&bare, &["rev-parse", "main"])?, tip);
    assert_eq!(
        git(&bare, &["log", "--oneline", "main"])?.lines().count(),
        5
    );
    git(&bare, &["fsck", "--full", "--strict"])?;

    // a push of > 100 objects goes through index-pack and a quarantine directory
    for i in 0..40 {
        std::fs::write(
            src.join(format!("bulk{i}.md")),
            format!("bulk {i}\n").repeat(50),
        )?;
        if i % 10 == 9 {
            git(&src, &["add", "-A"])?;
            git(&src, &["commit", "-q", "-m", "bulk"])?;
        }
    }
    git(
        &src,
        &[
            "-c",
            "receive.unpackLimit=1",
            "push",
            "-q",
            bare.to_str().expect("utf8"),
            "main",
        ],
    )?;
    git(
        &src,
        &[
            "push",
            "-q",
            bare.to_str().expect("utf8"),
            "main:feature",
            "--receive-pack=git -c receive.unpackLimit=1 receive-pack",
        ],
    )?;

    // clone out of it, both the local way (copies object files) and via upload-pack
    let c1 = root.join("clone-local");
    git(
        root,
        &[
            "clone",
            "-q",
            bare.to_str().expect("utf8"),
            c1.to_str().expect("utf8"),
        ],
    )?;
    git(&c1, &["fsck", "--full"])?;
    let c2 = root.join("clone-url");
    git(
        root,
        &[
            "clone",
            "-q",
            &format!("file://{}", bare.display()),
            c2.to_str().expect("utf8"),
        ],
    )?;
    assert_eq!(
        git(&c2, &["rev-parse", "HEAD"])?,
        git(&src, &["rev-parse", "HEAD"])?
    );

    // incremental fetch
    commit_file(&src, "notes/later.md", "later\n")?;
    git(&src, &["push", "-q", bare.to_str().expect("utf8"), "main"])?;
    git(&c2, &["fetch", "-q", "origin"])?;
    assert_eq!(
        git(&c2, &["rev-parse", "origin/main"])?,
        git(&src, &["rev-parse", "HEAD"])?
    );

    // tag, branch delete
    git(&src, &["tag", "-a", "v1", "-m", "release"])?;
    git(&src, &["push", "-q", bare.to_str().expect("utf8"), "v1"])?;
    git(
        &src,
        &["push", "-q", bare.to_str().expect("utf8"), ":feature"],
    )?;
    let refs = git(&bare, &["for-each-ref", "--format=%(refname)"])?;
    assert!(
        refs.contains("refs/tags/v1") && !refs.contains("refs/heads/feature"),
        "{refs}"
    );

    // gc and repack rewrite, rename and unlink packs
    git(&bare, &["gc", "-q", "--prune=now"])?;
    git(&bare, &["repack", "-q", "-a", "-d"])?;
    git(&bare, &["fsck", "--full"])?;
    assert_eq!(
        git(&bare, &["rev-parse", "main"])?,
        git(&src, &["rev-parse", "HEAD"])?
    );
    let loose = std::fs::read_dir(bare.join("objects"))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().len() == 2)
        .count();
    assert_eq!(loose, 0, "gc packed every loose object");

    // what the store holds, read without the mount, is a complete repository
    drop(m);
    let exported = root.join("exported.git");
    let store = object_store::local::LocalFileSystem::new_with_prefix(root.join("store"))?;
    rt().block_on(export_store(&store, REPO, &exported))?;
    git(&exported, &["fsck", "--full"])?;
    let c3 = root.join("clone-export");
    git(
        root,
        &[
            "clone",
            "-q",
            exported.to_str().expect("utf8"),
            c3.to_str().expect("utf8"),
        ],
    )?;
    assert_eq!(
        git(&c3, &["rev-parse", "HEAD"])?,
        git(&src, &["rev-parse", "HEAD"])?
    );
    Ok(())
}

#[test]
fn git_lifecycle_with_link_then_rename() -> anyhow::Result<()> {
    git_lifecycle("link")
}

#[test]
fn git_lifecycle_with_rename() -> anyhow::Result<()> {
    git_lifecycle("rename")
}

#[test]
fn fresh_mount_sees_what_the_first_wrote() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let src = make_source(root, 3)?;
    let mut a = TestMount::local(root, "a")?;
    let bare = init_bare(root, a.path())?;
    git(&src, &["push", "-q", bare.to_str().expect("utf8"), "main"])?;
    git(&bare, &["config", "user.note", "written by a"])?;
    // a second, fresh mount (empty cache) while the first is still mounted
    let b = TestMount::local(root, "b")?;
    let bare_b = b.path().join(REPO);
    assert_eq!(
        git(&bare_b, &["rev-parse", "main"])?,
        git(&src, &["rev-parse", "HEAD"])?
    );
    assert_eq!(
        git(&bare_b, &["config", "user.note"])?.trim(),
        "written by a"
    );
    git(&bare_b, &["fsck", "--full"])?;
    // b writes, a sees it after the metadata TTL
    let mut work = root.join("work");
    git(
        root,
        &[
            "clone",
            "-q",
            bare_b.to_str().expect("utf8"),
            work.to_str().expect("utf8"),
        ],
    )?;
    let tip = commit_file(&work, "from-b.md", "b\n")?;
    git(&work, &["push", "-q", "origin", "main"])?;
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert_eq!(git(&bare, &["rev-parse", "main"])?.trim(), tip);
    git(&bare, &["fsck", "--full"])?;
    a.unmount()?;
    work = root.join("work2");
    let c = TestMount::local(root, "c")?;
    git(
        root,
        &[
            "clone",
            "-q",
            c.path().join(REPO).to_str().expect("utf8"),
            work.to_str().expect("utf8"),
        ],
    )?;
    assert_eq!(git(&work, &["rev-parse", "HEAD"])?.trim(), tip);
    Ok(())
}

#[test]
fn libgit2_opens_reads_indexes_and_updates_refs_on_the_mount() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let m = TestMount::local(root, "a")?;
    let src = make_source(root, 4)?;
    let bare = init_bare(root, m.path())?;
    git(
        &src,
        &[
            "push",
            "-q",
            bare.to_str().expect("utf8"),
            "main~1:refs/heads/main",
        ],
    )?;
    git(&bare, &["repack", "-q", "-a", "-d"])?; // packs are read through mmap by libgit2

    let repo = git2::Repository::open_bare(&bare)?;
    let head = repo.refname_to_id("refs/heads/main")?;
    let mut walk = repo.revwalk()?;
    walk.push(head)?;
    assert_eq!(walk.count(), 3);

    // index a pack of the new commit with libgit2's Indexer against the repo's odb
    let newest = git(&src, &["rev-parse", "main"])?.trim().to_string();
    let pack = git_cmd(&src, &["pack-objects", "--stdout", "--thin", "--revs"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        let mut stdin = pack.stdin.as_ref().expect("stdin");
        writeln!(stdin, "{newest}\n^{}", head)?;
    }
    let out = pack.wait_with_output()?;
    assert!(out.status.success());
    let odb = repo.odb()?;
    let mut indexer = git2::Indexer::new(Some(&odb), &bare.join("objects/pack"), 0o444, true)?;
    std::io::Write::write_all(&mut indexer, &out.stdout)?;
    indexer.commit()?;
    let new_oid = git2::Oid::from_str(&newest)?;
    let repo = git2::Repository::open_bare(&bare)?; // pick up the new pack
    assert!(repo.odb()?.exists(new_oid));

    // compare-and-swap ref update with lock files
    repo.reference_matching("refs/heads/main", new_oid, true, head, "ff")?;
    let stale = repo.reference_matching("refs/heads/main", head, true, head, "stale");
    assert!(stale.is_err(), "a CAS against the old value must fail");
    assert_eq!(git(&bare, &["rev-parse", "main"])?.trim(), newest);
    git(&bare, &["fsck", "--full"])?;
    Ok(())
}
