//! The `repofs` binary: the ref-update hook, SIGTERM flushing, and SIGKILL at random
//! points during pushes (no ref may point at a missing object afterwards, and every
//! push that returned success must be intact).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPO: &str = "org-9/agent-9/repo.git";

fn git(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "T")
        .env("GIT_AUTHOR_EMAIL", "t@e")
        .env("GIT_COMMITTER_NAME", "T")
        .env("GIT_COMMITTER_EMAIL", "t@e")
        .output()
        .expect("run git")
}

fn git_ok(dir: &Path, args: &[&str]) -> String {
    let out = git(dir, args);
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `git init --bare` of the test repository on the mount.
fn init_bare(root: &Path, mnt: &Path) -> PathBuf {
    let bare = mnt.join(REPO);
    std::fs::create_dir_all(bare.parent().expect("parent")).expect("mkdir");
    git_ok(
        root,
        &[
            "init",
            "-q",
            "--bare",
            "-b",
            "main",
            bare.to_str().expect("utf8"),
        ],
    );
    bare
}

fn mounted(mnt: &Path) -> bool {
    let canon = std::fs::canonicalize(mnt).unwrap_or_default();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == canon.to_str() && l.contains(" - fuse repofs:"))
}

/// A daemon process that is killed and unmounted on drop, whatever happens.
struct Daemon {
    child: Child,
    mnt: PathBuf,
}

impl Daemon {
    fn start(root: &Path, extra: &[&str]) -> Daemon {
        let mnt = root.join("mnt");
        let store = format!("file://{}", root.join("store").display());
        let child = Command::new(env!("CARGO_BIN_EXE_repofs"))
            .args(["mount", &store, mnt.to_str().expect("utf8"), "--foreground"])
            .args(["--cache-dir", root.join("cache").to_str().expect("utf8")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.join("daemon.log")).expect("log"))
            .spawn()
            .expect("start daemon");
        let mut d = Daemon { child, mnt };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !mounted(&d.mnt) {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!(
                    "daemon exited with {status}: {}",
                    std::fs::read_to_string(root.join("daemon.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "daemon did not mount");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill9();
        } else if mounted(&self.mnt) {
            let _ = Command::new("umount").arg(&self.mnt).status();
        }
    }
}

fn sigterm(pid: u32) {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok);
}

#[test]
fn hook_gets_each_event_and_sigterm_flushes_and_unmounts() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path();
    let events = root.join("events.jsonl");
    let hook = format!("cat >> {}", events.display());
    let mut d = Daemon::start(root, &["--on-ref-update", &hook]);
    let bare = init_bare(root, &d.mnt);
    let src = root.join("src");
    git_ok(
        root,
        &["init", "-q", "-b", "main", src.to_str().expect("utf8")],
    );
    std::fs::write(src.join("a.md"), "a").expect("write");
    git_ok(&src, &["add", "."]);
    git_ok(&src, &["commit", "-qm", "a"]);
    git_ok(&src, &["push", "-q", bare.to_str().expect("utf8"), "main"]);
    let tip = git_ok(&src, &["rev-parse", "HEAD"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&events).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("refs/heads/main")) {
            let v: serde_json::Value = serde_json::from_str(line).expect("json");
            assert_eq!(v["org"], "org-9");
            assert_eq!(v["agent"], "agent-9");
            assert_eq!(v["new"], tip.as_str());
            assert!(v["old"].is_null());
            break;
        }
        assert!(Instant::now() < deadline, "hook never ran: {text:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // a file written in place and closed, then SIGTERM: stored, and the mount is gone
    std::fs::write(d.mnt.join("note.txt"), "kept").expect("write");
    sigterm(d.child.id());
    let status = d.child.wait().expect("wait");
    assert!(status.success(), "{status}");
    assert!(!mounted(&d.mnt));
    assert_eq!(
        std::fs::read_to_string(root.join("store/note.txt")).expect("stored"),
        "kept"
    );
}

#[test]
fn sigkill_during_pushes_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path();
    let src = root.join("src");
    git_ok(
        root,
        &["init", "-q", "-b", "main", src.to_str().expect("utf8")],
    );
    let mut acknowledged: Vec<String> = Vec::new();
    {
        let d = Daemon::start(root, &[]);
        init_bare(root, &d.mnt);
    }
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let rounds = 8;
    for round in 0..rounds {
        let mut d = Daemon::start(root, &[]);
        let bare = d.mnt.join(REPO);
        // several commits with enough objects that some pushes use index-pack
        for i in 0..(1 + rand() % 4) {
            for j in 0..(rand() % 60) {
                std::fs::write(
                    src.join(format!("f{round}-{i}-{j}.md")),
                    format!("{round} {i} {j}\n").repeat(20),
                )
                .expect("write");
            }
            std::fs::write(src.join("log.md"), format!("{round}-{i}")).expect("write");
            git_ok(&src, &["add", "-A"]);
            git_ok(
                &src,
                &["commit", "-qm", &format!("round {round} commit {i}")],
            );
        }
        let tip = git_ok(&src, &["rev-parse", "HEAD"]);
        let url = bare.to_str().expect("utf8").to_string();
        let src2 = src.clone();
        let started = Instant::now();
        let push = std::thread::spawn(move || {
            let out = git(&src2, &["push", "-q", &url, "main"]);
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        });
        std::thread::sleep(Duration::from_millis(rand() % 400));
        d.kill9();
        let (ok, err) = push.join().expect("join");
        eprintln!(
            "round {round}: killed after {:?}, push ok={ok} {}",
            started.elapsed(),
            err.lines().last().unwrap_or("")
        );
        if ok {
            acknowledged.push(tip);
        }
    }
    // a fresh daemon, with the same cache directory as the killed ones
    let d = Daemon::start(root, &[]);
    let bare = d.mnt.join(REPO);
    let fsck = git(&bare, &["fsck", "--full", "--no-dangling"]);
    assert!(
        fsck.status.success(),
        "refs point at missing objects: {}",
        String::from_utf8_lossy(&fsck.stderr)
    );
    let main = git(&bare, &["rev-parse", "--verify", "-q", "main"]);
    for tip in &acknowledged {
        let out = git(&bare, &["merge-base", "--is-ancestor", tip, "main"]);
        assert!(
            out.status.success(),
            "acknowledged push {tip} lost (main = {})",
            String::from_utf8_lossy(&main.stdout)
        );
    }
    eprintln!(
        "{} of {rounds} pushes were acknowledged before the kill",
        acknowledged.len()
    );
}

#[test]
fn bad_store_url_is_refused_with_a_hint() {
    let tmp = tempfile::tempdir().expect("tmp");
    for foreground in [false, true] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_repofs"));
        cmd.args([
            "mount",
            "http://example/bucket",
            tmp.path().join("mnt").to_str().expect("utf8"),
        ])
        .args([
            "--cache-dir",
            tmp.path().join("cache").to_str().expect("utf8"),
        ]);
        if foreground {
            cmd.arg("--foreground");
        }
        let out = cmd.output().expect("run");
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("invalid store URL") && err.contains("s3://bucket"),
            "{err}"
        );
        assert!(!mounted(&tmp.path().join("mnt")));
    }
}
