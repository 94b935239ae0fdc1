//! The filesystem core without FUSE, over in-memory stores: write-back ordering, ref
//! compare-and-swap between two instances, and events.

use object_store::memory::InMemory;
use object_store::throttle::{ThrottleConfig, ThrottledStore};
use object_store::{ObjectStore, ObjectStoreExt};
use repofs::fs::{Fs, ROOT_INO};
use repofs::mount::{build_fs, MountConfig};
use std::sync::Arc;
use std::time::Duration;

const PACK: &str = "0123456789abcdef0123456789abcdef01234567";
const C1: &str = "1111111111111111111111111111111111111111";
const C2: &str = "2222222222222222222222222222222222222222";

fn fs_over(store: Arc<dyn ObjectStore>, dir: &std::path::Path, tag: &str) -> Fs {
    let mut cfg = MountConfig::new("memory://", dir.join(format!("mnt-{tag}")));
    cfg.cache_dir = dir.join(format!("cache-{tag}"));
    cfg.metadata_ttl = Duration::from_secs(60);
    build_fs(&cfg, store, tokio::runtime::Handle::current()).expect("fs")
}

async fn mkdirs(fs: &Fs, path: &str) -> u64 {
    let mut ino = ROOT_INO;
    for p in path.split('/') {
        ino = match fs.lookup(ino, p).await {
            Ok(a) => a.ino,
            Err(_) => fs.mkdir(ino, p, 0o755).await.expect("mkdir").ino,
        };
    }
    ino
}

async fn write_file(fs: &Fs, dir: u64, name: &str, data: &[u8]) {
    let (_, opened) = fs
        .create(dir, name, 0o644, libc::O_WRONLY | libc::O_EXCL)
        .await
        .expect("create");
    fs.write(opened.fh, 0, data).await.expect("write");
    fs.flush(opened.fh).await.expect("flush");
    fs.release(opened.fh);
}

#[tokio::test(flavor = "multi_thread")]
async fn ref_is_published_only_after_earlier_objects_are_stored() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let slow = ThrottledStore::new(
        mem.clone(),
        ThrottleConfig {
            wait_put_per_call: Duration::from_millis(300),
            ..Default::default()
        },
    );
    let fs = fs_over(Arc::new(slow), tmp.path(), "a");
    let mut events = fs.subscribe();
    let pack_dir = mkdirs(&fs, "o/a/repo.git/objects/pack").await;
    let heads = mkdirs(&fs, "o/a/repo.git/refs/heads").await;
    write_file(&fs, pack_dir, "tmp_pack_x", b"PACK data").await;
    fs.rename(
        pack_dir,
        "tmp_pack_x",
        pack_dir,
        &format!("pack-{PACK}.pack"),
        false,
    )
    .await
    .expect("rename pack");
    // the pack upload is still running in the background
    let pack_key =
        object_store::path::Path::from(format!("o/a/repo.git/objects/pack/pack-{PACK}.pack"));
    assert!(mem.head(&pack_key).await.is_err(), "upload is asynchronous");
    write_file(&fs, heads, "main.lock", format!("{C1}\n").as_bytes()).await;
    fs.rename(heads, "main.lock", heads, "main", false)
        .await
        .expect("publish ref");
    // when the ref's rename returns, both the ref and the pack are stored
    assert!(
        mem.head(&pack_key).await.is_ok(),
        "the object was stored before the ref"
    );
    let r = mem
        .get(&object_store::path::Path::from(
            "o/a/repo.git/refs/heads/main",
        ))
        .await
        .expect("ref stored")
        .bytes()
        .await
        .expect("bytes");
    assert_eq!(&r[..], format!("{C1}\n").as_bytes());
    let ev = events.try_recv().expect("event");
    assert_eq!(
        (ev.org.as_deref(), ev.agent.as_deref()),
        (Some("o"), Some("a"))
    );
    assert_eq!(ev.refname, "refs/heads/main");
    assert_eq!(
        (ev.old, ev.new.map(|o| o.to_string())),
        (None, Some(C1.to_string()))
    );
    // temporary files never reached the store
    let keys: Vec<String> = {
        use futures::StreamExt;
        mem.list(None)
            .map(|m| m.expect("meta").location.to_string())
            .collect()
            .await
    };
    assert!(
        keys.iter()
            .all(|k| !k.contains("tmp_") && !k.ends_with(".lock")),
        "{keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn second_instance_loses_a_stale_ref_update() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let a = fs_over(mem.clone(), tmp.path(), "a");
    let b = fs_over(mem.clone(), tmp.path(), "b");
    let heads_a = mkdirs(&a, "o/a/repo.git/refs/heads").await;
    write_file(&a, heads_a, "main.lock", format!("{C1}\n").as_bytes()).await;
    a.rename(heads_a, "main.lock", heads_a, "main", false)
        .await
        .expect("a creates");

    // b lists (sees C1), then a moves the ref, then b writes on top of its stale view
    let heads_b = mkdirs(&b, "o/a/repo.git/refs/heads").await;
    assert!(b.lookup(heads_b, "main").await.is_ok());
    write_file(&a, heads_a, "main.lock", format!("{C2}\n").as_bytes()).await;
    a.rename(heads_a, "main.lock", heads_a, "main", false)
        .await
        .expect("a updates");
    write_file(
        &b,
        heads_b,
        "main.lock",
        b"3333333333333333333333333333333333333333\n",
    )
    .await;
    let err = b
        .rename(heads_b, "main.lock", heads_b, "main", false)
        .await
        .expect_err("b must lose");
    assert_eq!(err.errno(), libc::EBUSY);
    let stored = mem
        .get(&object_store::path::Path::from(
            "o/a/repo.git/refs/heads/main",
        ))
        .await
        .expect("get")
        .bytes()
        .await
        .expect("bytes");
    assert_eq!(
        &stored[..],
        format!("{C2}\n").as_bytes(),
        "a's value is kept"
    );
    assert_eq!(b.stats().snapshot().ref_conflicts, 1);
    // b's lock file is still there for git to clean up
    assert!(b.lookup(heads_b, "main.lock").await.is_ok());
}
