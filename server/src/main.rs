//! `repofs-server`: serve agents' repositories over git smart HTTP.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use repofs::mount::parse_size;
use repofs_server::db::Db;
use repofs_server::server::{self, ServerConfig};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "repofs-server",
    version,
    about = "git smart HTTP over a repofs mount"
)]
struct Cli {
    /// Data directory of the embedded default (store, database, mount, cache).
    #[arg(long, env = "REPOFS_HOME", default_value = "./data", global = true)]
    home: PathBuf,
    /// Database URL: sqlite://PATH or postgres://USER:PASS@HOST:PORT/DB
    /// [default: sqlite://HOME/repofs.db]
    #[arg(long, env = "REPOFS_DATABASE_URL", global = true)]
    database: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "REPOFS_LOG_FORMAT", default_value = "text", global = true)]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount the store and serve git smart HTTP and the agent API.
    Serve(Serve),
    /// Manage API tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token for a user and print it (only its hash is stored).
    Create {
        /// The user the token authenticates as.
        #[arg(long)]
        user: String,
    },
}

#[derive(clap::Args)]
struct Serve {
    /// Address to listen on.
    #[arg(long, env = "REPOFS_LISTEN", default_value = "127.0.0.1:8283")]
    listen: SocketAddr,
    /// Object store URL (file://, s3://, gs://, memory://) [default: file://HOME/store]
    #[arg(long, env = "REPOFS_STORE")]
    store: Option<String>,
    /// Where to mount the store [default: HOME/mnt]
    #[arg(long, env = "REPOFS_MOUNT")]
    mount: Option<PathBuf>,
    /// Disk cache directory [default: HOME/cache]
    #[arg(long, env = "REPOFS_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Disk cache bound (e.g. 512M, 2G).
    #[arg(long, env = "REPOFS_CACHE_SIZE", default_value = "2G", value_parser = parse_size)]
    cache_size: u64,
    /// Trusted proxy address allowed to send user_id / X-Organization-Id (repeatable;
    /// loopback is always trusted).
    #[arg(
        long = "trusted-proxy",
        env = "REPOFS_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    trusted_proxies: Vec<IpAddr>,
    /// Accept branch updates that are not fast-forwards.
    #[arg(long, env = "REPOFS_ALLOW_NON_FAST_FORWARD")]
    allow_non_fast_forward: bool,
    /// Largest accepted push body (e.g. 512M).
    #[arg(long, env = "REPOFS_MAX_PUSH_BYTES", default_value = "512M", value_parser = parse_size)]
    max_push_bytes: u64,
    /// Concurrent pack builds [default: number of cores, at least 2].
    #[arg(long, env = "REPOFS_MAX_PACK_BUILDS")]
    max_pack_builds: Option<usize>,
    /// How long a push of the default branch waits for its block sync.
    #[arg(long, env = "REPOFS_SYNC_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    sync_timeout: Duration,
    /// Bound of the full-clone pack cache in CACHE_DIR/packs (0 turns it off).
    #[arg(long, env = "REPOFS_PACK_CACHE_SIZE", default_value = "1G", value_parser = parse_size)]
    pack_cache_size: u64,
    /// How often every agent is checked for an unsynced branch tip.
    #[arg(long, env = "REPOFS_SYNC_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    sync_interval: Duration,
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REPOFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("repofs-http")
        .build()?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    let home = if cli.home.is_absolute() {
        cli.home.clone()
    } else {
        std::env::current_dir()?.join(&cli.home)
    };
    let mut cfg = ServerConfig::embedded(&home);
    if let Some(d) = cli.database {
        cfg.database_url = d;
    }
    match cli.cmd {
        Cmd::Token {
            cmd: TokenCmd::Create { user },
        } => {
            if cfg.database_url.starts_with("sqlite:") {
                std::fs::create_dir_all(&home)?;
            }
            let db = Db::connect(&cfg.database_url).await?;
            let token = db.create_token(&user).await?;
            writeln!(std::io::stdout(), "{token}")?;
            db.close().await;
            Ok(())
        }
        Cmd::Serve(s) => {
            cfg.listen = s.listen;
            if let Some(st) = s.store {
                cfg.store_url = st;
            } else {
                std::fs::create_dir_all(home.join("store"))
                    .with_context(|| format!("creating {}", home.join("store").display()))?;
            }
            if let Some(m) = s.mount {
                cfg.mount_dir = m;
            }
            if let Some(c) = s.cache_dir {
                cfg.cache_dir = c;
            }
            cfg.cache_size = s.cache_size;
            cfg.trusted_proxies = s.trusted_proxies;
            cfg.allow_non_fast_forward = s.allow_non_fast_forward;
            cfg.max_push_bytes = s.max_push_bytes;
            if let Some(n) = s.max_pack_builds {
                cfg.max_pack_builds = n;
            }
            cfg.sync_timeout = s.sync_timeout;
            cfg.sync_interval = s.sync_interval;
            cfg.pack_cache_bytes = s.pack_cache_size;
            if cfg.database_url.starts_with("sqlite:") {
                std::fs::create_dir_all(&home)?;
            }
            // Handlers first, so a signal that arrives during startup is not fatal.
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            let srv = repofs_server::start(cfg.clone()).await?;
            // A closed stdout (a supervisor that stopped reading) must not kill the server.
            let _ = writeln!(
                std::io::stdout(),
                "repofs-server listening on http://{}\n  store:    {}\n  mounted:  {}\n  database: {}\n  clone:    git clone http://{}/v1/git/AGENT_ID/state.git",
                srv.addr(),
                cfg.store_url,
                cfg.mount_dir.display(),
                server::redact(&cfg.database_url),
                srv.addr()
            );
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("shutting down: draining requests, flushing, unmounting");
            srv.shutdown().await?;
            tracing::info!("stopped");
            Ok(())
        }
    }
}
