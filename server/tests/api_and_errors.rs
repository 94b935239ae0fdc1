//! Callers, org isolation, the agent API, and every bad-input path of the git routes:
//! each gets a clear status and changes nothing.

mod common;

use anyhow::Result;
use common::*;
use std::io::{Read, Write};
use std::path::Path;

const ORG: &str = "org-00000000-0000-4000-8000-000000000000";

/// Send bytes exactly as given (no URL normalisation) and return the status code.
fn raw_status(s: &TestServer, request_line_path: &str) -> Result<u16> {
    let mut c = std::net::TcpStream::connect(s.srv().addr())?;
    write!(
        c,
        "GET {request_line_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    Ok(out.split(' ').nth(1).unwrap_or("0").parse()?)
}

fn pkt(lines: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        if *l == "0000" || *l == "0001" {
            out.extend_from_slice(l.as_bytes());
        } else {
            out.extend_from_slice(format!("{:04x}{l}", l.len() + 4).as_bytes());
        }
    }
    out
}

fn main_tip(s: &TestServer, agent: &str) -> Result<String> {
    let tmp = tempfile::tempdir()?;
    let out = git(
        tmp.path(),
        &["ls-remote", &s.remote(agent), "refs/heads/main"],
    )?;
    Ok(out.split('\t').next().unwrap_or("").to_string())
}

#[test]
fn agent_ids_that_could_escape_are_rejected() -> Result<()> {
    let s = TestServer::start()?;
    s.create_agent("agent-ok")?;
    let long = "a".repeat(256);
    for bad in [
        "..",
        ".",
        "a%2Fb",
        "%2e%2e",
        "a%00b",
        "a%5Cb",
        long.as_str(),
        "a%20b",
    ] {
        let st = raw_status(
            &s,
            &format!("/v1/git/{bad}/state.git/info/refs?service=git-upload-pack"),
        )?;
        assert_eq!(st, 400, "{bad}");
        let st = raw_status(&s, &format!("/v1/agents/{bad}"))?;
        assert_eq!(st, 400, "agents/{bad}");
    }
    // Empty id and paths with extra segments.
    assert_eq!(
        raw_status(&s, "/v1/git//state.git/info/refs?service=git-upload-pack")?,
        400
    );
    assert_eq!(
        raw_status(
            &s,
            "/v1/git/../../etc/state.git/info/refs?service=git-upload-pack"
        )?,
        400
    );
    // Nothing was created outside the org's directory.
    let entries: Vec<_> = std::fs::read_dir(s.mount())?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        entries
            .iter()
            .all(|e| e.to_string_lossy().starts_with("org-") || e == ".repofs"),
        "{entries:?}"
    );
    // Unknown agent: 404; valid one: 200 with git's headers.
    assert_eq!(
        raw_status(
            &s,
            "/v1/git/agent-nope/state.git/info/refs?service=git-upload-pack"
        )?,
        404
    );
    let (st, h, body) = s.request_full(
        "GET",
        "/v1/git/agent-ok/state.git/info/refs?service=git-upload-pack",
        &[],
        None,
    )?;
    assert_eq!(st, 200);
    assert_eq!(
        h["content-type"],
        "application/x-git-upload-pack-advertisement"
    );
    assert_eq!(h["cache-control"], "no-cache, max-age=0, must-revalidate");
    assert_eq!(h["pragma"], "no-cache");
    assert!(body.starts_with(b"001e# service=git-upload-pack\n0000"));
    // Unknown or missing service: 403.
    assert_eq!(
        raw_status(&s, "/v1/git/agent-ok/state.git/info/refs?service=git-annex")?,
        403
    );
    assert_eq!(raw_status(&s, "/v1/git/agent-ok/state.git/info/refs")?, 403);
    Ok(())
}

#[test]
fn tokens_orgs_and_trusted_headers() -> Result<()> {
    let s = TestServer::start()?;
    let db = s.srv().state().db.clone();
    let (t_default, t_other) = s.rt.block_on(async {
        db.create_org("org-other", "other").await?;
        db.create_user("user-other", "Other", "org-other").await?;
        anyhow::Ok((
            db.create_token(repofs_server::db::DEFAULT_USER).await?,
            db.create_token("user-other").await?,
        ))
    })?;
    s.create_agent("agent-mine")?;
    // Create an agent in the other org with its token.
    let bearer_other = format!("Bearer {t_other}");
    let (st, body) = s.request(
        "POST",
        "/v1/agents",
        &[("authorization", &bearer_other)],
        Some(r#"{"name":"theirs","id":"agent-theirs"}"#.into()),
    )?;
    assert_eq!(st, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(v["organization_id"], "org-other");
    // Another org's agent is invisible (404), through the API and git.
    assert_eq!(
        s.request("GET", "/v1/agents/agent-theirs", &[], None)?.0,
        404
    );
    assert_eq!(
        s.request(
            "GET",
            "/v1/agents/agent-theirs",
            &[("authorization", &bearer_other)],
            None
        )?
        .0,
        200
    );
    let tmp = tempfile::tempdir()?;
    let err = git_fails(tmp.path(), &["clone", &s.remote("agent-theirs"), "x"])?;
    assert!(err.contains("not found"), "{err}");
    // Basic auth with the token as password, as git sends it. From loopback, a request
    // without credentials is the default user rather than a 401 challenge, so git is
    // told to send the credentials up front (git >= 2.46).
    let url = s
        .remote("agent-theirs")
        .replace("http://", &format!("http://any:{t_other}@"));
    git(
        tmp.path(),
        &[
            "-c",
            "http.proactiveAuth=basic",
            "clone",
            "-q",
            &url,
            "theirs",
        ],
    )?;
    let url = s
        .remote("agent-mine")
        .replace("http://", &format!("http://any:{t_default}@"));
    git(
        tmp.path(),
        &[
            "-c",
            "http.proactiveAuth=basic",
            "clone",
            "-q",
            &url,
            "mine",
        ],
    )?;
    // The other org's token cannot reach this org's agent.
    let url = s
        .remote("agent-mine")
        .replace("http://", &format!("http://any:{t_other}@"));
    assert!(git_fails(
        tmp.path(),
        &["-c", "http.proactiveAuth=basic", "clone", &url, "nope"]
    )?
    .contains("not found"));
    // A bad token: 401 with WWW-Authenticate, so git asks for credentials.
    let (st, h, _) = s.request_full(
        "GET",
        "/v1/agents/agent-mine",
        &[("authorization", "Bearer rfs_bad")],
        None,
    )?;
    assert_eq!(st, 401);
    assert!(h["www-authenticate"].to_str()?.starts_with("Basic"));
    let url = s
        .remote("agent-mine")
        .replace("http://", "http://any:rfs_bad@");
    let err = git_fails(
        tmp.path(),
        &["-c", "http.proactiveAuth=basic", "clone", &url, "bad"],
    )?;
    assert!(
        err.contains("Authentication failed") || err.contains("401"),
        "{err}"
    );
    // Trusted headers from loopback: user_id selects the user (and its org).
    assert_eq!(
        s.request(
            "GET",
            "/v1/agents/agent-theirs",
            &[("user_id", "user-other")],
            None
        )?
        .0,
        200
    );
    assert_eq!(
        s.request(
            "GET",
            "/v1/agents/agent-theirs",
            &[("x-organization-id", "org-other")],
            None
        )?
        .0,
        200
    );
    assert_eq!(
        s.request(
            "GET",
            "/v1/agents/agent-mine",
            &[("user_id", "user-other")],
            None
        )?
        .0,
        404
    );
    // Mismatched org for a user: 403; unknown user: 401.
    assert_eq!(
        s.request(
            "GET",
            "/v1/agents/agent-mine",
            &[("user_id", "user-other"), ("x-organization-id", ORG)],
            None
        )?
        .0,
        403
    );
    assert_eq!(
        s.request(
            "GET",
            "/v1/agents/agent-mine",
            &[("user_id", "user-nobody")],
            None
        )?
        .0,
        401
    );
    Ok(())
}

#[test]
fn agent_api_validates_input() -> Result<()> {
    let s = TestServer::start()?;
    let (st, body) = s.request("POST", "/v1/agents", &[], Some(r#"{"name":"n"}"#.into()))?;
    assert_eq!(st, 201);
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let id = v["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("agent-"), "{id}");
    assert_eq!(
        s.request("GET", &format!("/v1/agents/{id}"), &[], None)?.0,
        200
    );
    assert_eq!(
        s.request(
            "POST",
            "/v1/agents",
            &[],
            Some(format!(r#"{{"name":"n","id":"{id}"}}"#))
        )?
        .0,
        409
    );
    assert_eq!(
        s.request("POST", "/v1/agents", &[], Some("{not json".into()))?
            .0,
        400
    );
    assert_eq!(
        s.request("POST", "/v1/agents", &[], Some(r#"{"name":""}"#.into()))?
            .0,
        400
    );
    assert_eq!(
        s.request(
            "POST",
            "/v1/agents",
            &[],
            Some(r#"{"name":"x","id":"../x"}"#.into())
        )?
        .0,
        400
    );
    assert_eq!(
        s.request("GET", "/v1/agents/agent-missing", &[], None)?.0,
        404
    );
    Ok(())
}

#[test]
fn malformed_git_requests_get_400_and_change_nothing() -> Result<()> {
    let s = TestServer::start()?;
    s.create_agent("agent-bad")?;
    let before = main_tip(&s, "agent-bad")?;
    let up = "/v1/git/agent-bad/state.git/git-upload-pack";
    let rp = "/v1/git/agent-bad/state.git/git-receive-pack";
    let post = |path: &str, body: Vec<u8>, extra: &[(&str, &str)]| -> Result<(u16, Vec<u8>)> {
        let (st, _, b) = s.request_full("POST", path, extra, Some(body))?;
        Ok((st, b))
    };
    // upload-pack: bad length, truncated packet, want of a non-hex id, v2 garbage.
    assert_eq!(post(up, b"zzzzwant".to_vec(), &[])?.0, 400);
    assert_eq!(post(up, b"0032want 1234".to_vec(), &[])?.0, 400);
    assert_eq!(post(up, pkt(&["want nothex\n", "0000"]), &[])?.0, 400);
    assert_eq!(
        post(
            up,
            pkt(&["command=frobnicate\n", "0000"]),
            &[("git-protocol", "version=2")]
        )?
        .0,
        400
    );
    assert_eq!(
        post(
            up,
            pkt(&["command=fetch\n", "0001", "bogus-arg\n", "0000"]),
            &[("git-protocol", "version=2")]
        )?
        .0,
        400
    );
    assert_eq!(
        post(
            up,
            b"\x1f\x8b not gzip".to_vec(),
            &[("content-encoding", "gzip")]
        )?
        .0,
        400
    );
    // A want of an object that is not here: an ERR line, as git does.
    let (st, body) = post(
        up,
        pkt(&[
            &format!("want {} side-band-64k\n", "1".repeat(40)),
            "0000",
            "done\n",
        ]),
        &[],
    )?;
    assert_eq!(st, 200);
    assert!(String::from_utf8_lossy(&body).contains("ERR upload-pack: not our ref"));
    // receive-pack: garbage, bad ref names, a non-pack after the commands.
    let zero = "0".repeat(40);
    let one = "1".repeat(40);
    assert_eq!(post(rp, b"garbage!".to_vec(), &[])?.0, 400);
    assert_eq!(
        post(
            rp,
            pkt(&[
                &format!("{zero} {one} refs/heads/../../x\0report-status\n"),
                "0000"
            ]),
            &[]
        )?
        .0,
        400
    );
    assert_eq!(
        post(
            rp,
            pkt(&[&format!("{zero} {one} HEAD\0report-status\n"), "0000"]),
            &[]
        )?
        .0,
        400
    );
    let mut body = pkt(&[
        &format!("{before} {one} refs/heads/main\0report-status\n"),
        "0000",
    ]);
    body.extend_from_slice(b"NOTAPACK");
    assert_eq!(post(rp, body, &[])?.0, 400);
    // A pack header followed by garbage: git's answer is an unpack error per ref.
    let mut body = pkt(&[
        &format!("{before} {one} refs/heads/main\0report-status\n"),
        "0000",
    ]);
    body.extend_from_slice(b"PACK\0\0\0\x02\0\0\0\x01garbagegarbagegarbage");
    let (st, out) = post(rp, body, &[])?;
    assert_eq!(st, 200);
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.contains("unpack ") && !out.contains("unpack ok") && out.contains("ng refs/heads/main"),
        "{out}"
    );
    // A ref update to an object that does not exist (empty pack).
    let empty_pack = {
        let mut p = b"PACK\0\0\0\x02\0\0\0\0".to_vec();
        use sha1_smol_like::digest;
        p.extend_from_slice(&digest(&p));
        p
    };
    let mut body = pkt(&[
        &format!("{before} {one} refs/heads/main\0report-status\n"),
        "0000",
    ]);
    body.extend_from_slice(&empty_pack);
    let (st, out) = post(rp, body, &[])?;
    assert_eq!(st, 200);
    assert!(
        String::from_utf8_lossy(&out).contains("ng refs/heads/main missing object"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(main_tip(&s, "agent-bad")?, before);
    // A pack holding a commit whose parent and tree are missing: refused before the ref
    // moves.
    let tmp = tempfile::tempdir()?;
    git(tmp.path(), &["init", "-q", "-b", "main"])?;
    commit_file(tmp.path(), "a.md", "a\n")?;
    let orphan = commit_file(tmp.path(), "b.md", "b\n")?;
    let mut child = git_cmd(tmp.path(), &["pack-objects", "--stdout"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{orphan}\n").as_bytes())?;
    let pack = child.wait_with_output()?.stdout;
    assert_eq!(&pack[..4], b"PACK");
    let mut body = pkt(&[
        &format!("{before} {orphan} refs/heads/main\0report-status\n"),
        "0000",
    ]);
    body.extend_from_slice(&pack);
    let (st, out) = post(rp, body, &[])?;
    assert_eq!(st, 200);
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("ng refs/heads/main missing"), "{out}");
    assert_eq!(main_tip(&s, "agent-bad")?, before);
    // Nothing was written: the repository is sound and main did not move.
    let repo = s.mount().join(format!("{ORG}/agent-bad/repo.git"));
    git(&repo, &["fsck", "--full"])?;
    Ok(())
}

/// SHA-1 for the pack trailer, via git itself (no extra crate).
mod sha1_smol_like {
    pub(crate) fn digest(data: &[u8]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d");
        std::fs::write(&f, data).unwrap();
        let out = std::process::Command::new("sha1sum")
            .arg(&f)
            .output()
            .unwrap();
        let hex = String::from_utf8_lossy(&out.stdout);
        hex::decode(&hex[..40]).unwrap()
    }
}

#[test]
fn gzip_request_bodies_are_accepted() -> Result<()> {
    let s = TestServer::start()?;
    s.create_agent("agent-gz")?;
    let tip = main_tip(&s, "agent-gz")?;
    let body = pkt(&[
        &format!("want {tip} side-band-64k ofs-delta\n"),
        "0000",
        "done\n",
    ]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&body)?;
    let gz = gz.finish()?;
    let (st, h, out) = s.request_full(
        "POST",
        "/v1/git/agent-gz/state.git/git-upload-pack",
        &[
            ("content-encoding", "gzip"),
            ("content-type", "application/x-git-upload-pack-request"),
        ],
        Some(gz),
    )?;
    assert_eq!(st, 200);
    assert_eq!(h["content-type"], "application/x-git-upload-pack-result");
    assert!(
        out.starts_with(b"0008NAK\n"),
        "{:?}",
        String::from_utf8_lossy(&out[..20.min(out.len())])
    );
    assert!(out.windows(4).any(|w| w == b"PACK"));
    // The counters show the pack that was built and the store requests made.
    let (st, body) = s.request("GET", "/v1/stats", &[], None)?;
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&body)?;
    assert!(v["server"]["packs_built"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["fs"]["store_list"].as_u64().unwrap() >= 1, "{v}");
    Ok(())
}

#[test]
fn pushes_over_the_size_limit_get_413() -> Result<()> {
    let s = TestServer::start_with(|c| c.max_push_bytes = 64 * 1024)?;
    s.create_agent("agent-big")?;
    let before = main_tip(&s, "agent-big")?;
    let tmp = tempfile::tempdir()?;
    let w = clone(tmp.path(), &s.remote("agent-big"), "w", 2, &[])?;
    let data: Vec<u8> = (0..400_000).map(|_| rand::random::<u8>()).collect();
    std::fs::write(w.join("big.bin"), data)?;
    git(&w, &["add", "-A"])?;
    git(&w, &["commit", "-q", "-m", "big"])?;
    // Both the plain and the chunked path.
    for post_buffer in ["1048576", "16384"] {
        let err = git_fails(
            &w,
            &[
                "-c",
                &format!("http.postBuffer={post_buffer}"),
                "push",
                "origin",
                "main",
            ],
        )?;
        // The server answers 413 without reading the rest of the body; git shows the
        // 413, or the broken pipe it got while still sending.
        assert!(err.contains("413") || err.contains("RPC failed"), "{err}");
    }
    assert_eq!(main_tip(&s, "agent-big")?, before);
    // The status itself, for a body that fits in the socket buffers: declared length,
    // and a body without a length (streamed, counted while reading).
    let zero = "0".repeat(40);
    let mut body = format!(
        "{:04x}{zero} {before} refs/heads/x\0report-status\n0000",
        4 + 40 + 1 + 40 + 1 + 12 + 15
    )
    .into_bytes();
    // A real pack of one random 100 KiB blob: the indexer keeps reading until the limit.
    let t = tempfile::tempdir()?;
    git(t.path(), &["init", "-q"])?;
    let data: Vec<u8> = (0..100 * 1024).map(|_| rand::random::<u8>()).collect();
    std::fs::write(t.path().join("blob"), &data)?;
    let blob = git(t.path(), &["hash-object", "-w", "blob"])?;
    let mut child = git_cmd(t.path(), &["pack-objects", "--stdout"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(blob.as_bytes())?;
    body.extend_from_slice(&child.wait_with_output()?.stdout);
    assert!(body.len() > 64 * 1024);
    let (st, _, _) = s.request_full(
        "POST",
        "/v1/git/agent-big/state.git/git-receive-pack",
        &[],
        Some(body.clone()),
    )?;
    assert_eq!(st, 413);
    let chunked = s.rt.block_on(async {
        let stream = futures::stream::iter(
            body.chunks(8192)
                .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
                .collect::<Vec<_>>(),
        );
        reqwest::Client::new()
            .post(format!(
                "{}/v1/git/agent-big/state.git/git-receive-pack",
                s.url
            ))
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .map(|r| r.status().as_u16())
    })?;
    assert_eq!(chunked, 413);
    // A small push still works.
    git(&w, &["reset", "-q", "--hard", "HEAD~1"])?;
    commit_file(&w, "small.md", "s\n")?;
    git(&w, &["push", "-q", "origin", "main"])?;
    Ok(())
}

fn server_bin() -> &'static str {
    env!("CARGO_BIN_EXE_repofs-server")
}

#[test]
fn cli_serves_creates_tokens_and_stops_cleanly_on_sigterm() -> Result<()> {
    let home = tempfile::tempdir()?;
    let h = home.path().to_str().unwrap();
    // token create for an unknown user fails with a message.
    let out = std::process::Command::new(server_bin())
        .args(["--home", h, "token", "create", "--user", "user-nobody"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("user-nobody"));
    let out = std::process::Command::new(server_bin())
        .args([
            "--home",
            h,
            "token",
            "create",
            "--user",
            repofs_server::db::DEFAULT_USER,
        ])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    assert!(token.starts_with("rfs_"));

    let mut child = std::process::Command::new(server_bin())
        .args(["--home", h, "serve", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mnt = home.path().join("mnt");
    let guard = scopeguard(child.id(), mnt.clone());
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line)?;
    let url = line
        .trim()
        .strip_prefix("repofs-server listening on ")
        .expect(&line)
        .to_string();
    let client = |args: &[&str]| -> Result<(u16, String)> {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/stdout", "-w", "\n%{http_code}"])
            .args(args)
            .output()?;
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = s.rsplit_once('\n').unwrap_or(("", "0"));
        Ok((code.parse()?, body.to_string()))
    };
    let (st, _) = client(&[
        "-X",
        "POST",
        &format!("{url}/v1/agents"),
        "-H",
        &format!("Authorization: Bearer {token}"),
        "-d",
        r#"{"name":"c","id":"agent-cli"}"#,
    ])?;
    assert_eq!(st, 201);
    let tmp = tempfile::tempdir()?;
    git(
        tmp.path(),
        &[
            "clone",
            "-q",
            &format!("{url}/v1/git/agent-cli/state.git"),
            "c",
        ],
    )?;
    assert!(is_mounted(&mnt));
    // SIGTERM: drain, flush, unmount, exit 0.
    unsafe_kill(child.id(), libc::SIGTERM);
    let status = child.wait()?;
    drop(guard);
    assert!(status.success(), "{status:?}");
    assert!(!is_mounted(&mnt));
    // The data survives a restart.
    let store = home
        .path()
        .join(format!("store/{ORG}/agent-cli/repo.git/HEAD"));
    assert!(store.is_file());
    Ok(())
}

fn is_mounted(p: &Path) -> bool {
    let m = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let p = p.to_string_lossy();
    m.lines().any(|l| l.split(' ').nth(1) == Some(&*p))
}

fn unsafe_kill(pid: u32, sig: i32) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Kills the child and clears its mount if the test fails midway.
struct Guard(u32, std::path::PathBuf);
fn scopeguard(pid: u32, mnt: std::path::PathBuf) -> Guard {
    Guard(pid, mnt)
}
impl Drop for Guard {
    fn drop(&mut self) {
        if is_mounted(&self.1) {
            unsafe_kill(self.0, libc::SIGKILL);
            std::thread::sleep(std::time::Duration::from_millis(200));
            let _ = std::process::Command::new("umount").arg(&self.1).status();
        }
    }
}

#[test]
fn oversized_request_bodies_are_refused() -> Result<()> {
    let s = TestServer::start()?;
    s.create_agent("agent-huge")?;
    let before = main_tip(&s, "agent-huge")?;
    let zero = "0".repeat(40);
    // A receive-pack command list that never ends (no flush), over 16 MiB: 400, and
    // quickly (it is framed once, not re-parsed on every read).
    let line = format!("{zero} {before} refs/heads/branch-name-padding-to-make-lines-long\n");
    let one = format!("{:04x}{line}", line.len() + 4);
    let mut body = Vec::with_capacity(17 << 20);
    while body.len() < (17 << 20) {
        body.extend_from_slice(one.as_bytes());
    }
    let t = std::time::Instant::now();
    let (st, _, out) = s.request_full(
        "POST",
        "/v1/git/agent-huge/state.git/git-receive-pack",
        &[],
        Some(body),
    )?;
    assert_eq!(st, 400, "{}", String::from_utf8_lossy(&out));
    assert!(String::from_utf8_lossy(&out).contains("longer than 16 MiB"));
    assert!(
        t.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        t.elapsed()
    );
    // upload-pack bodies are bounded at 64 MiB, before and after gzip.
    let (st, _, _) = s.request_full(
        "POST",
        "/v1/git/agent-huge/state.git/git-upload-pack",
        &[],
        Some(vec![b'0'; (64 << 20) + 1]),
    )?;
    assert_eq!(st, 413);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![b'0'; 1 << 20];
    for _ in 0..65 {
        gz.write_all(&zeros)?;
    }
    let bomb = gz.finish()?;
    assert!(bomb.len() < 1 << 20);
    let (st, _, _) = s.request_full(
        "POST",
        "/v1/git/agent-huge/state.git/git-upload-pack",
        &[("content-encoding", "gzip")],
        Some(bomb),
    )?;
    assert_eq!(st, 413);
    assert_eq!(main_tip(&s, "agent-huge")?, before);
    Ok(())
}
