//! Issue 2, behaviours 2, 6 and 7: laziness and the cache, faults and bad input,
//! read-only mounts and what operators see.

use repofs_tests::*;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("runtime")
}

fn setup_repo(
    root: &std::path::Path,
    m: &TestMount,
    commits: usize,
) -> anyhow::Result<std::path::PathBuf> {
    let bare = init_bare(root, m.path())?;
    let src = make_source(root, commits)?;
    git(&src, &["push", "-q", bare.to_str().expect("utf8"), "main"])?;
    Ok(src)
}

#[test]
fn failed_object_upload_never_publishes_the_ref() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let mem: Arc<dyn object_store::ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let (faulty, faults) = FaultyStore::new(mem.clone());
    let m = TestMount::new(root, "a", faulty, "memory://")?;
    let src = setup_repo(root, &m, 1)?;
    let bare = m.path().join(REPO);
    let before = rt()
        .block_on(read_object(&*mem, &format!("{REPO}/refs/heads/main")))
        .expect("ref stored");

    *faults.fail_put_containing.lock().expect("lock") = Some("/objects/".into());
    let c2 = commit_file(&src, "x.md", "x\n")?;
    let err = git_fails(&src, &["push", "-q", bare.to_str().expect("utf8"), "main"])?;
    assert!(
        err.contains("main"),
        "git names the ref it could not update: {err}"
    );
    assert!(faults.injected.load(Ordering::SeqCst) > 0);
    let after = rt()
        .block_on(read_object(&*mem, &format!("{REPO}/refs/heads/main")))
        .expect("ref stored");
    assert_eq!(
        before, after,
        "the stored ref still points at the old, complete commit"
    );

    // once the store recovers, the same push goes through and the store is complete
    *faults.fail_put_containing.lock().expect("lock") = None;
    git(&src, &["push", "-q", bare.to_str().expect("utf8"), "main"])?;
    let stored = rt()
        .block_on(read_object(&*mem, &format!("{REPO}/refs/heads/main")))
        .expect("ref");
    assert_eq!(String::from_utf8_lossy(&stored).trim(), c2);
    let exported = root.join("exported.git");
    rt().block_on(export_store(&*mem, REPO, &exported))?;
    git(&exported, &["fsck", "--full"])?;
    Ok(())
}

#[test]
fn a_hanging_store_gives_an_error_not_a_hang() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let mem: Arc<dyn object_store::ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let (faulty, faults) = FaultyStore::new(mem);
    let m = TestMount::with(root, "a", faulty, "memory://", |c| {
        c.retry.timeout = Duration::from_millis(200);
        c.retry.retries = 1;
    })?;
    faults.hang.store(true, Ordering::SeqCst);
    let start = Instant::now();
    let err = std::fs::read_dir(m.path().join("some-dir")).expect_err("listing must fail");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "{err}");
    assert!(m.fs().stats().snapshot().store_retries >= 1);
    faults.hang.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(50));
    std::fs::create_dir(m.path().join("ok"))?;
    Ok(())
}

#[test]
fn bad_names_and_bad_keys() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let mem: Arc<dyn object_store::ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let long = "x".repeat(300);
    rt().block_on(async {
        use object_store::ObjectStoreExt;
        mem.put(
            &object_store::path::Path::from(format!("d/{long}")),
            "bad".into(),
        )
        .await?;
        mem.put(&object_store::path::Path::from("d/good.md"), "good".into())
            .await?;
        anyhow::Ok(())
    })?;
    let m = TestMount::new(root, "a", mem, "memory://")?;
    let names: Vec<String> = std::fs::read_dir(m.path().join("d"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        names,
        vec!["good.md"],
        "a key that is not a valid path is skipped"
    );
    let err = std::fs::write(m.path().join("d").join("y".repeat(256)), "x").expect_err("too long");
    assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG));
    let err = std::fs::metadata(m.path().join("d").join("y".repeat(256))).expect_err("too long");
    assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG));
    let err = std::fs::read(m.path().join("d/missing")).expect_err("missing");
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    let err =
        std::os::unix::fs::symlink("good.md", m.path().join("d/link")).expect_err("no symlinks");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    let err = std::fs::write(m.path().join(".repofs/stats"), "x").expect_err("stats is read-only");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)),
        "{err}"
    );
    Ok(())
}

#[test]
fn read_only_mount_refuses_every_write() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let mut w = TestMount::local(root, "w")?;
    setup_repo(root, &w, 2)?;
    w.unmount()?;
    let dir = root.join("store");
    let store = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&dir)?);
    let m = TestMount::with(
        root,
        "ro",
        store,
        &format!("file://{}", dir.display()),
        |c| c.read_only = true,
    )?;
    let bare = m.path().join(REPO);
    assert_eq!(
        git(&bare, &["log", "--oneline", "main"])?.lines().count(),
        2
    );
    for res in [
        std::fs::write(bare.join("new-file"), "x"),
        std::fs::create_dir(bare.join("newdir")),
        std::fs::remove_file(bare.join("HEAD")),
        std::fs::rename(bare.join("HEAD"), bare.join("HEAD2")),
        std::fs::OpenOptions::new()
            .append(true)
            .open(bare.join("config"))
            .map(|_| ()),
    ] {
        assert_eq!(
            res.expect_err("must be refused").raw_os_error(),
            Some(libc::EROFS)
        );
    }
    let err = git_fails(&bare, &["update-ref", "refs/heads/x", "main"])?;
    assert!(err.contains("Read-only file system"), "{err}");
    Ok(())
}

#[test]
fn lazy_fetch_cache_hits_and_restart() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let mut w = TestMount::local(root, "w")?;
    setup_repo(root, &w, 3)?;
    git(&w.path().join(REPO), &["repack", "-q", "-a", "-d"])?;
    w.unmount()?;

    let mut m = TestMount::local(root, "r")?;
    let bare = m.path().join(REPO);
    let names = std::fs::read_dir(&bare)?.count();
    assert!(names > 3);
    let s = m.fs().stats().snapshot();
    assert_eq!(s.store_get, 0, "listing fetches no content: {s:?}");
    assert!(
        s.store_list >= 1 && s.store_list <= 5,
        "one recursive listing per repo: {s:?}"
    );

    git(&bare, &["log", "--oneline", "main"])?;
    git(&bare, &["fsck", "--full"])?;
    let first = m.fs().stats().snapshot();
    assert!(first.store_get > 0);
    std::thread::sleep(Duration::from_millis(600)); // past the metadata TTL
    git(&bare, &["log", "--oneline", "main"])?;
    git(&bare, &["fsck", "--full"])?;
    let second = m.fs().stats().snapshot();
    assert_eq!(
        second.store_get, first.store_get,
        "nothing is fetched twice while cached ({first:?} -> {second:?})"
    );
    assert!(
        second.store_list > first.store_list,
        "mutable files were revalidated after the TTL"
    );
    assert!(second.cache_hits > first.cache_hits);
    m.unmount()?;

    // the cache survives a restart: a second mount with the same cache dir reads packs locally
    let m = TestMount::local(root, "r")?;
    git(&m.path().join(REPO), &["log", "--oneline", "main"])?;
    let s = m.fs().stats().snapshot();
    assert!(s.cache_hits > 0, "{s:?}");
    let packs_fetched = s.bytes_down;
    assert!(
        packs_fetched < 1024,
        "only small mutable files are fetched again: {s:?}"
    );
    Ok(())
}

#[test]
fn cache_stays_within_its_bound() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let mem: Arc<dyn object_store::ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    rt().block_on(async {
        use object_store::ObjectStoreExt;
        for i in 0..10 {
            mem.put(
                &object_store::path::Path::from(format!("blobs/b{i}")),
                vec![i as u8; 8192].into(),
            )
            .await?;
        }
        anyhow::Ok(())
    })?;
    let m = TestMount::with(root, "a", mem, "memory://", |c| c.cache_size = 20_000)?;
    for i in 0..10 {
        let data = std::fs::read(m.path().join(format!("blobs/b{i}")))?;
        assert_eq!(data, vec![i as u8; 8192]);
    }
    let s = m.fs().stats().snapshot();
    assert!(s.cache_bytes <= 20_000, "{s:?}");
    assert!(s.cache_evictions >= 7, "{s:?}");
    // the bound holds on disk as well
    let on_disk: u64 = std::fs::read_dir(m.config.cache_dir.join("v1/data"))?
        .map(|e| {
            e.map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                .unwrap_or(0)
        })
        .sum();
    assert!(on_disk <= 20_000, "{on_disk}");
    Ok(())
}

#[test]
fn operators_can_look() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let m = TestMount::local(root, "a")?;
    setup_repo(root, &m, 3)?;
    let bare = m.path().join(REPO);
    let run = |cmd: &str, args: &[&str]| -> anyhow::Result<String> {
        let out = std::process::Command::new(cmd)
            .args(args)
            .current_dir(&bare)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let ls = run("ls", &["-la"])?;
    assert!(
        ls.contains("HEAD") && ls.contains("refs") && ls.contains("objects"),
        "{ls}"
    );
    assert_eq!(run("cat", &["HEAD"])?, "ref: refs/heads/main\n");
    let found = run("find", &[".", "-type", "f", "-path", "./objects/*"])?;
    assert!(found.lines().count() >= 9, "{found}");
    let du = run("du", &["-sb", "."])?;
    let total: u64 = du.split_whitespace().next().unwrap_or("0").parse()?;
    assert!(total > 100, "{du}");
    let meta = std::fs::metadata(bare.join("refs/heads/main"))?;
    assert_eq!(meta.len(), 41);
    assert_eq!(meta.mode() & 0o777, 0o644);
    assert!(meta.mtime() > 1_700_000_000);
    let stat = run("stat", &["-c", "%s %F", "HEAD"])?;
    assert_eq!(stat.trim(), "21 regular file");
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.path().join(".repofs/stats"))?)?;
    assert!(stats["store_put"].as_u64().unwrap_or(0) > 0, "{stats}");
    assert!(
        stats["store_list"].is_u64()
            && stats["cache_hits"].is_u64()
            && stats["bytes_up"].as_u64().unwrap_or(0) > 0
    );
    Ok(())
}

#[test]
fn fsync_makes_a_file_durable_before_close() -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let m = TestMount::local(root, "a")?;
    let repo = m.path().join("o/a/repo.git");
    std::fs::create_dir_all(&repo)?;
    let mut f = std::fs::File::create(repo.join("description"))?;
    f.write_all(b"synced")?;
    assert!(
        !root.join("store/o/a/repo.git/description").exists(),
        "nothing is uploaded before close or fsync"
    );
    f.sync_all()?;
    assert_eq!(
        std::fs::read(root.join("store/o/a/repo.git/description"))?,
        b"synced"
    );
    // a temporary file is never uploaded, fsync or not
    let mut t = std::fs::File::create(repo.join("config.lock"))?;
    t.write_all(b"x")?;
    t.sync_all()?;
    drop(t);
    assert!(!root.join("store/o/a/repo.git/config.lock").exists());
    drop(f);
    Ok(())
}
