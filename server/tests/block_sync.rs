//! Block sync end to end: the real git CLI pushes through the real server and mount,
//! and the database (SQLite, and PostgreSQL when the test cluster is configured)
//! holds the blocks at the branch tip by the time `git push` exits.

mod common;

use anyhow::Result;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

const ORG: &str = "org-00000000-0000-4000-8000-000000000000";

macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[test]
            fn sqlite() -> anyhow::Result<()> {
                super::$name(super::Backend::Sqlite)
            }
            #[test]
            fn postgres() -> anyhow::Result<()> {
                super::$name(super::Backend::Postgres)
            }
        }
    };
}

fn block(s: &TestServer, agent: &str, label: &str) -> Result<Option<Value>> {
    let (st, body) = s.request(
        "GET",
        &format!("/v1/agents/{agent}/blocks/{label}"),
        &[],
        None,
    )?;
    match st {
        200 => Ok(Some(serde_json::from_str(&body)?)),
        404 => Ok(None),
        _ => anyhow::bail!("GET block {label}: {st} {body}"),
    }
}

fn labels(s: &TestServer, agent: &str) -> Result<Vec<String>> {
    let (st, body) = s.request("GET", &format!("/v1/agents/{agent}/blocks"), &[], None)?;
    anyhow::ensure!(st == 200, "{st} {body}");
    let v: Vec<Value> = serde_json::from_str(&body)?;
    Ok(v.iter()
        .map(|b| b["label"].as_str().unwrap_or("").to_string())
        .collect())
}

fn write(dir: &Path, rel: &str, content: &[u8]) -> Result<()> {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap())?;
    std::fs::write(p, content)?;
    Ok(())
}

fn commit_all(dir: &Path, msg: &str) -> Result<()> {
    git(dir, &["add", "-A"])?;
    git(dir, &["commit", "-q", "-m", msg])?;
    Ok(())
}

fn push(dir: &Path) -> Result<String> {
    let out = git_cmd(dir, &["push", "origin", "HEAD:main"]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn wait_until(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if f()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("timed out waiting for {what}")
}

fn push_syncs_blocks_at_once(b: Backend) -> Result<()> {
    let Some(s) = TestServer::start_on(b)? else {
        return Ok(());
    };
    let (_tmp, w) = s.agent_clone("agent-s1", 2)?;
    write(&w, "system/human.md", b"---\ndescription: The human\nread_only: true\nmetadata: {team: core}\nlimit: 500\n---\nName: Ada\n")?;
    write(&w, "persona.md", b"I am helpful.\n")?;
    write(&w, "a/b/c/deep.md", b"deep\n")?;
    write(
        &w,
        "skills/search/SKILL.md",
        b"---\ndescription: search skill\n---\nHow to search.\n",
    )?;
    write(&w, "skills/search/notes.md", b"ignored\n")?;
    write(&w, "skills/search/ref.txt", b"ignored\n")?;
    write(&w, "notes.txt", b"ignored\n")?;
    commit_all(&w, "blocks")?;
    push(&w)?;
    // No waiting: the push has returned, so the database already has the blocks.
    let h = block(&s, "agent-s1", "system/human")?.expect("system/human synced");
    assert_eq!(h["value"], "Name: Ada\n");
    assert_eq!(h["description"], "The human");
    assert_eq!(h["read_only"], true);
    assert_eq!(h["limit"], 500);
    assert_eq!(h["metadata"]["team"], "core");
    let p = block(&s, "agent-s1", "persona")?.unwrap();
    assert_eq!(
        (
            p["description"].as_str(),
            p["limit"].as_i64(),
            p["read_only"].as_bool()
        ),
        (Some("persona block"), Some(100000), Some(false))
    );
    assert_eq!(
        block(&s, "agent-s1", "a/b/c/deep")?.unwrap()["value"],
        "deep\n"
    );
    assert_eq!(
        block(&s, "agent-s1", "skills/search")?.unwrap()["value"],
        "How to search.\n"
    );
    let mut ls = labels(&s, "agent-s1")?;
    ls.sort();
    assert_eq!(
        ls,
        vec!["a/b/c/deep", "persona", "skills/search", "system/human"]
    );

    // Other branches and tags change nothing.
    git(&w, &["checkout", "-q", "-b", "side"])?;
    write(&w, "persona.md", b"side branch\n")?;
    write(&w, "side.md", b"side\n")?;
    commit_all(&w, "side")?;
    git(&w, &["tag", "t1"])?;
    git(&w, &["push", "-q", "origin", "side", "t1"])?;
    assert_eq!(
        block(&s, "agent-s1", "persona")?.unwrap()["value"],
        "I am helpful.\n"
    );
    assert!(block(&s, "agent-s1", "side")?.is_none());

    // Update one, delete one (detached), rename one.
    git(&w, &["checkout", "-q", "main"])?;
    write(&w, "persona.md", b"I am very helpful.\n")?;
    std::fs::remove_file(w.join("a/b/c/deep.md"))?;
    git(
        &w,
        &["mv", "skills/search/SKILL.md", "skills/search/OLD.md"],
    )?;
    commit_all(&w, "edit")?;
    push(&w)?;
    assert_eq!(
        block(&s, "agent-s1", "persona")?.unwrap()["value"],
        "I am very helpful.\n"
    );
    assert!(block(&s, "agent-s1", "a/b/c/deep")?.is_none());
    assert!(block(&s, "agent-s1", "skills/search")?.is_none());
    // The block row keeps its id across updates.
    assert_eq!(
        block(&s, "agent-s1", "system/human")?.unwrap()["id"],
        h["id"]
    );
    let (st, body) = s.request("GET", "/v1/agents/agent-s1/sync", &[], None)?;
    assert_eq!(st, 200);
    let sync: Value = serde_json::from_str(&body)?;
    assert_eq!(
        sync["commit"].as_str().unwrap(),
        git(&w, &["rev-parse", "HEAD"])?.trim()
    );
    assert_eq!(sync["pending"], false);
    assert!(sync["last_error"].is_null());
    Ok(())
}
both!(push_syncs_blocks_at_once);

#[test]
fn force_push_falls_back_to_a_full_comparison() -> Result<()> {
    let s = TestServer::start_with(|c| c.allow_non_fast_forward = true)?;
    let (_tmp, w) = s.agent_clone("agent-force", 2)?;
    write(&w, "x.md", b"x\n")?;
    write(&w, "y.md", b"y\n")?;
    commit_all(&w, "a")?;
    push(&w)?;
    let a = git(&w, &["rev-parse", "HEAD"])?;
    std::fs::remove_file(w.join("y.md"))?;
    write(&w, "z.md", b"z\n")?;
    write(&w, "x.md", b"x2\n")?;
    commit_all(&w, "b")?;
    push(&w)?;
    assert_eq!(labels(&s, "agent-force")?, vec!["x", "z"]);
    let report = s.srv().state().sync.last_report.lock().unwrap();
    assert!(
        !report.full && report.upserted == 2 && report.detached == 1,
        "{report:?}"
    );
    git(&w, &["reset", "-q", "--hard", a.trim()])?;
    git(&w, &["push", "-q", "-f", "origin", "main"])?;
    assert_eq!(labels(&s, "agent-force")?, vec!["x", "y"]);
    assert_eq!(block(&s, "agent-force", "x")?.unwrap()["value"], "x\n");
    let report = s.srv().state().sync.last_report.lock().unwrap();
    assert!(report.full, "{report:?}");
    Ok(())
}

fn frontmatter_edge_cases(b: Backend) -> Result<()> {
    let Some(s) = TestServer::start_on(b)? else {
        return Ok(());
    };
    let (_tmp, w) = s.agent_clone("agent-fm", 0)?;
    let cases: &[(&str, &str, &str)] = &[
        ("none", "just text\n", "just text\n"),
        (
            "unterminated",
            "---\ndescription: x\nbody\n",
            "---\ndescription: x\nbody\n",
        ),
        (
            "invalid",
            "---\ndescription: [oops\n---\nbody\n",
            "---\ndescription: [oops\n---\nbody\n",
        ),
        (
            "list",
            "---\n- a\n- b\n---\nbody\n",
            "---\n- a\n- b\n---\nbody\n",
        ),
        (
            "crlf",
            "---\r\ndescription: windows\r\n---\r\nline one\r\n",
            "line one\r\n",
        ),
        ("empty", "---\ndescription: nothing here\n---\n", ""),
        ("emptyfile", "", ""),
    ];
    for (name, content, _) in cases {
        write(&w, &format!("fm/{name}.md"), content.as_bytes())?;
    }
    commit_all(&w, "edge cases")?;
    let stderr = push(&w)?;
    // Invalid YAML is not refused, but the pusher is told.
    assert!(
        stderr.contains("fm/invalid.md") && stderr.contains("not valid YAML"),
        "{stderr}"
    );
    for (name, _, value) in cases {
        let b = block(&s, "agent-fm", &format!("fm/{name}"))?
            .unwrap_or_else(|| panic!("fm/{name} missing"));
        assert_eq!(b["value"], *value, "fm/{name}");
    }
    assert_eq!(
        block(&s, "agent-fm", "fm/crlf")?.unwrap()["description"],
        "windows"
    );
    assert_eq!(
        block(&s, "agent-fm", "fm/empty")?.unwrap()["description"],
        "nothing here"
    );
    assert_eq!(
        block(&s, "agent-fm", "fm/invalid")?.unwrap()["description"],
        "fm/invalid block"
    );
    Ok(())
}
both!(frontmatter_edge_cases);

fn refused_pushes_change_nothing(b: Backend) -> Result<()> {
    let Some(s) = TestServer::start_on(b)? else {
        return Ok(());
    };
    let (tmp, w) = s.agent_clone("agent-ref", 2)?;
    write(&w, "human.md", b"ok\n")?;
    commit_all(&w, "ok")?;
    push(&w)?;
    let tip = git(&w, &["rev-parse", "HEAD"])?;
    let bad: &[(&str, &[u8], &str)] = &[
        ("bin.md", b"\xff\xfe not utf-8", "not valid UTF-8"),
        (
            "desc.md",
            b"---\ndescription: [1, 2]\n---\nx",
            "description must be a string",
        ),
        (
            "ro.md",
            b"---\nread_only: sometimes\n---\nx",
            "read_only must be true or false",
        ),
        (
            "lim.md",
            b"---\nlimit: 0\n---\nx",
            "limit must be a positive integer",
        ),
        (
            "meta.md",
            b"---\nmetadata: 5\n---\nx",
            "metadata must be a mapping",
        ),
        (
            "long.md",
            b"---\nlimit: 5\n---\nmore than five",
            "over its limit of 5",
        ),
    ];
    for (file, content, why) in bad {
        write(&w, "human.md", b"changed\n")?;
        write(&w, file, content)?;
        commit_all(&w, file)?;
        let out = git_cmd(&w, &["push", "origin", "main"]).output()?;
        assert!(!out.status.success(), "{file} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(file) && err.contains(why), "{file}: {err}");
        git(&w, &["reset", "-q", "--hard", tip.trim()])?;
        // Nothing changed: the branch, and the blocks.
        let remote = git(
            tmp.path(),
            &["ls-remote", &s.remote("agent-ref"), "refs/heads/main"],
        )?;
        assert!(remote.starts_with(tip.trim()));
        assert_eq!(block(&s, "agent-ref", "human")?.unwrap()["value"], "ok\n");
        assert_eq!(labels(&s, "agent-ref")?, vec!["human"]);
    }
    // Bad files on another branch are not checked (they are not blocks).
    git(&w, &["checkout", "-q", "-b", "scratch"])?;
    write(&w, "bin.md", b"\xff\xfe")?;
    commit_all(&w, "scratch")?;
    git(&w, &["push", "-q", "origin", "scratch"])?;
    Ok(())
}
both!(refused_pushes_change_nothing);

fn block_api_commits_and_syncs(b: Backend) -> Result<()> {
    let Some(s) = TestServer::start_on(b)? else {
        return Ok(());
    };
    let (_tmp, w) = s.agent_clone("agent-api", 2)?;
    write(
        &w,
        "system/human.md",
        b"---\n# kept comment\ndescription: 'The human'\n---\nAda\n",
    )?;
    commit_all(&w, "human")?;
    push(&w)?;
    // PUT of the value keeps the frontmatter text.
    let (st, body) = s.request(
        "PUT",
        "/v1/agents/agent-api/blocks/system/human",
        &[],
        Some(r#"{"value":"Ada Lovelace\n"}"#.into()),
    )?;
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(v["value"], "Ada Lovelace\n");
    assert_eq!(v["description"], "The human");
    git(&w, &["pull", "-q", "--ff-only"])?;
    assert_eq!(
        std::fs::read_to_string(w.join("system/human.md"))?,
        "---\n# kept comment\ndescription: 'The human'\n---\nAda Lovelace\n"
    );
    let log = git(&w, &["log", "-1", "--format=%an <%ae> %s"])?;
    assert!(
        log.contains("user-00000000-0000-4000-8000-000000000000@repofs")
            && log.contains("Update block system/human"),
        "{log}"
    );
    // PUT of other fields, create a new label, read_only and metadata.
    let (st, body) = s.request(
        "PUT",
        "/v1/agents/agent-api/blocks/notes/today",
        &[],
        Some(
            r#"{"value":"todo","read_only":true,"metadata":{"k":"v"},"description":"today"}"#
                .into(),
        ),
    )?;
    assert_eq!(st, 201, "{body}");
    let v = block(&s, "agent-api", "notes/today")?.unwrap();
    assert_eq!(
        (
            v["read_only"].as_bool(),
            v["metadata"]["k"].as_str(),
            v["description"].as_str()
        ),
        (Some(true), Some("v"), Some("today"))
    );
    let (st, _) = s.request(
        "PUT",
        "/v1/agents/agent-api/blocks/system/human",
        &[],
        Some(r#"{"description":"Changed"}"#.into()),
    )?;
    assert_eq!(st, 200);
    assert_eq!(
        block(&s, "agent-api", "system/human")?.unwrap()["value"],
        "Ada Lovelace\n"
    );
    assert_eq!(
        block(&s, "agent-api", "system/human")?.unwrap()["description"],
        "Changed"
    );
    // Bad input.
    assert_eq!(
        s.request(
            "PUT",
            "/v1/agents/agent-api/blocks/missing",
            &[],
            Some(r#"{"description":"x"}"#.into())
        )?
        .0,
        404
    );
    assert_eq!(
        s.request(
            "PUT",
            "/v1/agents/agent-api/blocks/x",
            &[],
            Some(r#"{"valu":"typo"}"#.into())
        )?
        .0,
        400
    );
    assert_eq!(
        s.request(
            "PUT",
            "/v1/agents/agent-api/blocks/x",
            &[],
            Some(r#"{"value":"x","limit":0}"#.into())
        )?
        .0,
        400
    );
    assert_eq!(
        s.request(
            "PUT",
            "/v1/agents/agent-api/blocks/x",
            &[],
            Some(r#"{"value":"toolong","limit":3}"#.into())
        )?
        .0,
        400
    );
    assert_eq!(
        s.request(
            "PUT",
            "/v1/agents/agent-api/blocks/a/%5Cb",
            &[],
            Some(r#"{"value":"x"}"#.into())
        )?
        .0,
        400
    );
    assert_eq!(
        s.request("GET", "/v1/agents/agent-api/blocks/nope", &[], None)?
            .0,
        404
    );
    assert_eq!(
        s.request("DELETE", "/v1/agents/agent-api/blocks/nope", &[], None)?
            .0,
        404
    );
    // DELETE commits the removal and detaches.
    assert_eq!(
        s.request(
            "DELETE",
            "/v1/agents/agent-api/blocks/notes/today",
            &[],
            None
        )?
        .0,
        200
    );
    assert!(block(&s, "agent-api", "notes/today")?.is_none());
    git(&w, &["pull", "-q", "--ff-only"])?;
    assert!(!w.join("notes/today.md").exists());
    // Another org cannot see or write these blocks.
    let db = s.srv().state().db.clone();
    s.rt.block_on(async {
        db.create_org("org-x", "x").await?;
        db.create_user("user-x", "x", "org-x").await
    })?;
    assert_eq!(
        s.request(
            "GET",
            "/v1/agents/agent-api/blocks",
            &[("user_id", "user-x")],
            None
        )?
        .0,
        404
    );
    assert_eq!(
        s.request(
            "PUT",
            "/v1/agents/agent-api/blocks/system/human",
            &[("user_id", "user-x")],
            Some(r#"{"value":"pwned"}"#.into())
        )?
        .0,
        404
    );
    assert_eq!(
        block(&s, "agent-api", "system/human")?.unwrap()["value"],
        "Ada Lovelace\n"
    );
    Ok(())
}
both!(block_api_commits_and_syncs);

fn api_writes_racing_git_pushes_lose_nothing(b: Backend) -> Result<()> {
    let Some(s) = TestServer::start_on(b)? else {
        return Ok(());
    };
    let (_tmp, w) = s.agent_clone("agent-race", 2)?;
    let url = s.url.clone();
    let mut api_ok = 0;
    let mut api_conflict = 0;
    for i in 0..6 {
        git(&w, &["pull", "-q", "--ff-only"])?;
        write(
            &w,
            &format!("git{i}.md"),
            format!("from git {i}\n").as_bytes(),
        )?;
        commit_all(&w, "git")?;
        let child = git_cmd(&w, &["push", "origin", "main"]).spawn()?;
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "PUT",
                "-d",
            ])
            .arg(format!(r#"{{"value":"from api {i}\n"}}"#))
            .arg(format!("{url}/v1/agents/agent-race/blocks/api{i}"))
            .output()?;
        let code = String::from_utf8_lossy(&out.stdout).to_string();
        let pushed = child.wait_with_output()?.status.success();
        match code.as_str() {
            "201" => api_ok += 1,
            "409" => api_conflict += 1,
            other => anyhow::bail!("unexpected PUT status {other}"),
        }
        // Whatever won is in the database; whatever lost is not, and no winner was lost.
        let ls = labels(&s, "agent-race")?;
        assert_eq!(ls.contains(&format!("git{i}")), pushed, "round {i}: {ls:?}");
        assert_eq!(
            ls.contains(&format!("api{i}")),
            code == "201",
            "round {i}: {ls:?}"
        );
        if !pushed {
            git(&w, &["pull", "-q", "--rebase"])?;
            push(&w)?;
        }
    }
    eprintln!("api writes: {api_ok} ok, {api_conflict} conflicts");
    // In the end, the database matches the files at the tip.
    git(&w, &["pull", "-q", "--ff-only"])?;
    let mut files: Vec<String> = git(&w, &["ls-files", "*.md"])?
        .lines()
        .map(|l| l.trim_end_matches(".md").to_string())
        .collect();
    files.sort();
    let mut ls = labels(&s, "agent-race")?;
    ls.sort();
    assert_eq!(ls, files);
    Ok(())
}
both!(api_writes_racing_git_pushes_lose_nothing);

#[test]
fn push_straight_into_the_mount_syncs() -> Result<()> {
    let s = TestServer::start()?;
    let (_tmp, w) = s.agent_clone("agent-mnt", 2)?;
    write(&w, "direct.md", b"written through the mount\n")?;
    commit_all(&w, "direct")?;
    let repo = s.mount().join(format!("{ORG}/agent-mnt/repo.git"));
    git(&w, &["push", "-q", repo.to_str().unwrap(), "main"])?;
    // The filesystem's ref event drives the sync; no HTTP request involved.
    wait_until("the mount push to sync", || {
        Ok(block(&s, "agent-mnt", "direct")?.is_some())
    })?;
    assert_eq!(
        block(&s, "agent-mnt", "direct")?.unwrap()["value"],
        "written through the mount\n"
    );
    Ok(())
}

#[test]
fn lost_events_are_recovered_at_start() -> Result<()> {
    // Ref updates made while the server is down (its events are lost): a plain repofs
    // mount of the same store takes a push; the restarted server catches up.
    let s = TestServer::start()?;
    let (tmp, w) = s.agent_clone("agent-lost", 2)?;
    let store = s.config.store_url.clone();
    let home = s.stop()?;
    let mut cfg = repofs::mount::MountConfig::new(store, tmp.path().join("side-mnt"));
    cfg.cache_dir = tmp.path().join("side-cache");
    let m = repofs::mount::spawn_mount(&cfg)?;
    write(&w, "offline.md", b"pushed while the server was down\n")?;
    commit_all(&w, "offline")?;
    let repo = tmp
        .path()
        .join(format!("side-mnt/{ORG}/agent-lost/repo.git"));
    // No background gc in the mount: it could keep the mount busy at unmount.
    git(
        &w,
        &[
            "-c",
            "gc.auto=0",
            "-c",
            "receive.autogc=false",
            "push",
            "-q",
            repo.to_str().unwrap(),
            "main",
        ],
    )?;
    if let Err(e) = m.unmount() {
        // Busy for a moment after git's last process exits: retry, then give up.
        let mnt = tmp.path().join("side-mnt");
        let mut done = false;
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            if std::process::Command::new("umount")
                .arg(&mnt)
                .status()?
                .success()
            {
                done = true;
                break;
            }
        }
        anyhow::ensure!(done, "unmount of the side mount failed: {e}");
    }
    let s = TestServer::start_in(home, |_| {})?;
    wait_until("the startup scan to sync", || {
        Ok(block(&s, "agent-lost", "offline")?.is_some())
    })?;
    let (_, body) = s.request("GET", "/v1/agents/agent-lost/sync", &[], None)?;
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(
        v["commit"].as_str().unwrap(),
        git(&w, &["rev-parse", "HEAD"])?.trim()
    );
    Ok(())
}

#[test]
fn server_killed_during_pushes_catches_up_after_restart() -> Result<()> {
    let home = tempfile::tempdir()?;
    let h = home.path().to_str().unwrap().to_string();
    let bin = env!("CARGO_BIN_EXE_repofs-server");
    let log_dir = tempfile::tempdir()?;
    let logs = log_dir.path().to_path_buf();
    let runs = std::cell::Cell::new(0);
    let start = || -> Result<(std::process::Child, String)> {
        runs.set(runs.get() + 1);
        let log = std::fs::File::create(logs.join(format!("server-{}.log", runs.get())))?;
        let mut child = std::process::Command::new(bin)
            .args([
                "--home",
                &h,
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--sync-interval",
                "1s",
            ])
            .env("REPOFS_LOG", "info,repofs=debug")
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()?;
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line)?;
        let url = line
            .trim()
            .strip_prefix("repofs-server listening on ")
            .unwrap_or("")
            .to_string();
        anyhow::ensure!(!url.is_empty(), "server did not start: {line}");
        Ok((child, url))
    };
    let mnt = home.path().join("mnt");
    let _cleanup = MountCleanup(mnt.clone());
    let (mut child, url) = start()?;
    let st = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-d",
            r#"{"name":"k","id":"agent-kill"}"#,
        ])
        .arg(format!("{url}/v1/agents"))
        .output()?;
    assert_eq!(String::from_utf8_lossy(&st.stdout), "201");
    let tmp = tempfile::tempdir()?;
    let remote = format!("{url}/v1/git/agent-kill/state.git");
    git(tmp.path(), &["clone", "-q", &remote, "w"])?;
    let w = tmp.path().join("w");
    // Push in the background and SIGKILL the server mid-way.
    let w2 = w.clone();
    let pusher = std::thread::spawn(move || -> Result<usize> {
        let mut acked = 0;
        for i in 0..30 {
            write(&w2, &format!("k{i}.md"), format!("kill {i}\n").as_bytes())?;
            commit_all(&w2, "k")?;
            if git_cmd(&w2, &["push", "-q", "origin", "main"])
                .output()?
                .status
                .success()
            {
                acked += 1;
            } else {
                break;
            }
        }
        Ok(acked)
    });
    std::thread::sleep(Duration::from_millis(300 + rand::random::<u64>() % 700));
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status();
    // Restart on the same data. The killed daemon may have died with its own threads
    // inside its mount; the new one aborts that connection (which lets the old process
    // finish exiting and the interrupted push fail) and mounts afresh.
    let (mut child2, url) = start()?;
    let _ = child.wait();
    let acked = pusher.join().unwrap()?;
    let mut child = {
        std::mem::swap(&mut child, &mut child2);
        child
    };
    let remote = format!("{url}/v1/git/agent-kill/state.git");
    let check = tempfile::tempdir()?;
    git(check.path(), &["clone", "-q", &remote, "c"])?;
    let c = check.path().join("c");
    let mut files: Vec<String> = git(&c, &["ls-files", "*.md"])?
        .lines()
        .map(|l| l.trim_end_matches(".md").to_string())
        .collect();
    files.sort();
    assert!(
        files.len() >= acked,
        "{} files, {acked} acknowledged pushes",
        files.len()
    );
    let tip = git(&c, &["rev-parse", "HEAD"])?.trim().to_string();
    let mut synced = false;
    for _ in 0..200 {
        let out = std::process::Command::new("curl")
            .args(["-s", &format!("{url}/v1/agents/agent-kill/sync")])
            .output()?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if v["commit"].as_str() == Some(tip.as_str()) && v["pending"] == false {
            synced = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let dump = || {
        for i in 1..=runs.get() {
            let l =
                std::fs::read_to_string(logs.join(format!("server-{i}.log"))).unwrap_or_default();
            let tail: Vec<&str> = l
                .lines()
                .rev()
                .filter(|l| !l.contains("request{") && !l.contains("DEBUG") && !l.starts_with("  "))
                .take(25)
                .collect();
            eprintln!(
                "--- server run {i} (last lines) ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    };
    if !synced {
        dump();
    }
    assert!(synced, "sync did not catch up to {tip}");
    let out = std::process::Command::new("curl")
        .args(["-s", &format!("{url}/v1/agents/agent-kill/blocks")])
        .output()?;
    let v: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    let mut ls: Vec<String> = v
        .iter()
        .map(|b| b["label"].as_str().unwrap().to_string())
        .collect();
    ls.sort();
    assert_eq!(ls, files);
    eprintln!(
        "{acked} pushes acknowledged before the kill; {} blocks after restart",
        ls.len()
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait()?;
    if !status.success() {
        dump();
    }
    assert!(status.success(), "{status:?}");
    Ok(())
}

struct MountCleanup(std::path::PathBuf);
impl Drop for MountCleanup {
    fn drop(&mut self) {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        if mounts
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(&*self.0.to_string_lossy()))
        {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
}

#[test]
fn failing_syncs_retry_and_show_their_error() -> Result<()> {
    let s = TestServer::start_with(|c| c.sync_timeout = Duration::from_secs(1))?;
    let (_tmp, w) = s.agent_clone("agent-fail", 2)?;
    let db = s.srv().state().db.clone();
    // Break the database under the sync: its table is gone.
    s.rt.block_on(
        sqlx::query("ALTER TABLE blocks_agents RENAME TO blocks_agents_away").execute(db.pool()),
    )?;
    write(&w, "human.md", b"while the database is broken\n")?;
    commit_all(&w, "x")?;
    // The push still succeeds, and says the sync is late.
    let stderr = push(&w)?;
    assert!(
        stderr.contains("block sync did not finish within"),
        "{stderr}"
    );
    let (_, body) = s.request("GET", "/v1/agents/agent-fail/sync", &[], None)?;
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(v["pending"], true, "{v}");
    assert!(
        v["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("blocks_agents"),
        "{v}"
    );
    // Repair it: the retry (with backoff) catches up without another push.
    s.rt.block_on(
        sqlx::query("ALTER TABLE blocks_agents_away RENAME TO blocks_agents").execute(db.pool()),
    )?;
    wait_until("the retried sync", || {
        let (_, body) = s.request("GET", "/v1/agents/agent-fail/sync", &[], None)?;
        let v: Value = serde_json::from_str(&body)?;
        Ok(v["pending"] == false && v["last_error"].is_null())
    })?;
    assert_eq!(
        block(&s, "agent-fail", "human")?.unwrap()["value"],
        "while the database is broken\n"
    );
    Ok(())
}
