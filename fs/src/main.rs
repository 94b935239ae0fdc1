//! The `repofs` command: mount a store as a directory tree.

use anyhow::Context;
use clap::{Parser, Subcommand};
use repofs::mount::{default_cache_dir, is_stale_mount, spawn_mount, MountConfig};
use repofs::parse_size;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "repofs",
    version,
    about = "Keep git repositories in object storage and mount them"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Mount STORE_URL at MOUNTPOINT.
    Mount(MountArgs),
}

#[derive(Parser, Debug, Clone)]
struct MountArgs {
    /// file:///abs/path, memory://, s3://bucket[/prefix] or gs://bucket[/prefix].
    /// S3 settings come from AWS_* variables (AWS_ENDPOINT, AWS_ALLOW_HTTP, AWS_REGION,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); GCS from GOOGLE_* variables.
    store_url: String,
    /// Directory to mount on (created if missing).
    mountpoint: PathBuf,
    /// Disk cache and write staging directory [default: ~/.cache/repofs/<hash of STORE_URL>].
    #[arg(long, env = "REPOFS_CACHE_DIR", help_heading = "Cache")]
    cache_dir: Option<PathBuf>,
    /// Bound of the disk cache, in bytes with an optional K/M/G/T suffix.
    #[arg(long, env = "REPOFS_CACHE_SIZE", default_value = "2G", value_parser = parse_size, help_heading = "Cache")]
    cache_size: u64,
    /// How long listings and attributes are trusted before asking the store again
    /// (e.g. 1s, 500ms, 1m).
    #[arg(long, env = "REPOFS_METADATA_TTL", default_value = "1s", value_parser = humantime::parse_duration, help_heading = "Cache")]
    metadata_ttl: Duration,
    /// Refuse every write with EROFS.
    #[arg(long, env = "REPOFS_READ_ONLY", help_heading = "Mount")]
    read_only: bool,
    /// Let users other than the mounting one access the mount.
    #[arg(long, env = "REPOFS_ALLOW_OTHER", help_heading = "Mount")]
    allow_other: bool,
    /// Stay in the foreground (otherwise the daemon detaches once mounted).
    #[arg(long, short = 'f', env = "REPOFS_FOREGROUND", help_heading = "Mount")]
    foreground: bool,
    /// FUSE worker threads.
    #[arg(
        long,
        env = "REPOFS_THREADS",
        default_value_t = 8,
        help_heading = "Mount"
    )]
    threads: usize,
    /// Timeout of one store request (retried with backoff on transient errors).
    #[arg(long, env = "REPOFS_STORE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration, help_heading = "Store")]
    store_timeout: Duration,
    /// Retries of a store request after a transient error.
    #[arg(
        long,
        env = "REPOFS_STORE_RETRIES",
        default_value_t = 4,
        help_heading = "Store"
    )]
    store_retries: u32,
    /// Command run (with `sh -c`) for every ref update; the event is JSON on stdin:
    /// {"repo","org","agent","refname","old","new"}.
    #[arg(long, env = "REPOFS_ON_REF_UPDATE", help_heading = "Events")]
    on_ref_update: Option<String>,
    /// Log file of a detached daemon [default: CACHE_DIR/repofs.log].
    #[arg(long, env = "REPOFS_LOG_FILE", help_heading = "Logging")]
    log_file: Option<PathBuf>,
    /// Log format: text or json. Verbosity comes from RUST_LOG (default info).
    #[arg(
        long,
        env = "REPOFS_LOG_FORMAT",
        default_value = "text",
        help_heading = "Logging"
    )]
    log_format: String,
}

fn init_logging(format: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Cmd::Mount(args) = cli.command;
    let res = if args.foreground {
        run_foreground(args)
    } else {
        detach(args)
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("repofs: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn is_mounted(path: &std::path::Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(path) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|l| {
        let mut f = l.split(' ');
        f.nth(4) == Some(canon.to_str().unwrap_or_default()) && l.contains(" - fuse repofs:")
    })
}

/// Start the daemon in the background and return once it has mounted (or failed).
fn detach(args: MountArgs) -> anyhow::Result<()> {
    // Refuse a bad URL here, where the user sees the message, not in the daemon's log.
    repofs::store::StoreKind::parse(&args.store_url)?;
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| default_cache_dir(&args.store_url));
    std::fs::create_dir_all(&cache_dir)
        .with_context(|| format!("creating {}", cache_dir.display()))?;
    let log = args
        .log_file
        .clone()
        .unwrap_or_else(|| cache_dir.join("repofs.log"));
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening log file {}", log.display()))?;
    let exe = std::env::current_exe().context("locating the repofs binary")?;
    let mut child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .arg("--foreground")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("starting the daemon")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "the daemon exited with {status} before mounting; see {}",
                log.display()
            );
        }
        if is_mounted(&args.mountpoint) && !is_stale_mount(&args.mountpoint) {
            println!(
                "repofs: mounted {} at {} (pid {}, log {})",
                args.store_url,
                args.mountpoint.display(),
                child.id(),
                log.display()
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("the daemon did not mount within 60s; see {}", log.display())
}

fn run_foreground(args: MountArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format);
    let mut config = MountConfig::new(args.store_url.clone(), args.mountpoint.clone());
    if let Some(dir) = &args.cache_dir {
        config.cache_dir = dir.clone();
    }
    config.cache_size = args.cache_size;
    config.metadata_ttl = args.metadata_ttl;
    config.read_only = args.read_only;
    config.allow_other = args.allow_other;
    config.threads = args.threads;
    config.retry.timeout = args.store_timeout;
    config.retry.retries = args.store_retries;
    let handle = spawn_mount(&config).context("mount failed")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if let Some(cmd) = args.on_ref_update.clone() {
        let mut rx = handle.subscribe();
        std::thread::Builder::new()
            .name("repofs-hook".into())
            .spawn(move || {
                let hook_rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                hook_rt.block_on(async move {
                    loop {
                        match rx.recv().await {
                            Ok(ev) => run_hook(&cmd, &ev),
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                                tracing::error!(
                                    missed = n,
                                    "ref-update hook fell behind; events were dropped"
                                );
                            }
                            Err(_) => break,
                        }
                    }
                });
            })?;
    }
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: flushing and unmounting"); break; }
                _ = term.recv() => { tracing::info!("SIGTERM: flushing and unmounting"); break; }
                _ = tick.tick() => {
                    if handle.is_finished() {
                        tracing::info!("the filesystem was unmounted externally");
                        break;
                    }
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    handle.unmount().context("unmount")?;
    Ok(())
}

fn run_hook(cmd: &str, ev: &repofs::RefUpdated) {
    let json = serde_json::to_vec(ev).unwrap_or_default();
    let child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .spawn();
    match child {
        Ok(mut c) => {
            if let Some(mut stdin) = c.stdin.take() {
                let _ = stdin.write_all(&json);
                let _ = stdin.write_all(b"\n");
            }
            match c.wait() {
                Ok(s) if s.success() => {}
                Ok(s) => {
                    tracing::warn!(hook = cmd, status = %s, refname = %ev.refname, "ref-update hook failed")
                }
                Err(e) => tracing::warn!(hook = cmd, error = %e, "ref-update hook failed"),
            }
        }
        Err(e) => tracing::warn!(hook = cmd, error = %e, "cannot run ref-update hook"),
    }
}
