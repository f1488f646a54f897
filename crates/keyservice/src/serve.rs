//! `keygate keyservice`: arguments, start-up, the document builder and the retention purge.

use crate::api::{self, App, Tokens};
use crate::document;
use crate::metrics::Metrics;
use crate::store::Store;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// `keygate keyservice` (SPEC §7).
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on, HOST:PORT (port 0: any free port).
    #[arg(long, env = "KEYGATE_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: String,
    /// Database: `sqlite:PATH` (created and migrated when needed) or `postgres://USER@HOST:PORT/DB`.
    #[arg(long, env = "KEYGATE_DATABASE", default_value = "sqlite:keygate.db")]
    pub database: String,
    /// File of admin bearer tokens: one a line, blank lines and `#` comments ignored. Without
    /// it the admin API answers 403.
    #[arg(long, env = "KEYGATE_ADMIN_TOKENS")]
    pub admin_tokens: Option<PathBuf>,
    /// File of reader tokens: when given, `GET /v1/keys` and `POST /v1/usage` need one (or an
    /// admin token).
    #[arg(long, env = "KEYGATE_READER_TOKENS")]
    pub reader_tokens: Option<PathBuf>,
    /// Seconds a key stays in the document after it is revoked or expires (default 30 days).
    #[arg(long, env = "KEYGATE_RETENTION_S", default_value_t = 30 * 86_400)]
    pub retention_s: u64,
    /// Seconds between retention purges.
    #[arg(long, default_value_t = 60)]
    pub purge_interval_s: u64,
    /// Milliseconds between checks of the database's document generation (changes made by
    /// other replicas are served within this plus one build).
    #[arg(long, default_value_t = 250)]
    pub poll_ms: u64,
}

/// A started service: its address; `stop` shuts it down.
pub struct Running {
    /// The bound address (the real port when `--listen` asked for port 0).
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    server: JoinHandle<Result<(), String>>,
}

impl Running {
    /// Stops accepting, finishes in-flight requests, stops the background tasks.
    pub async fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.server.await.map_err(|e| e.to_string())?
    }
}

/// Opens and migrates the database, builds the first document, binds and serves in the
/// background. Errors: unreadable token files, a database that cannot be opened, an address
/// that cannot be bound.
pub async fn start(args: ServeArgs) -> Result<Running, String> {
    let admin = match &args.admin_tokens {
        Some(p) => Tokens::load(p, "admin")?,
        None => {
            eprintln!("keygate keyservice: warning: no --admin-tokens: the admin API is off");
            Tokens::default()
        }
    };
    let reader = args
        .reader_tokens
        .as_ref()
        .map(|p| Tokens::load(p, "reader"))
        .transpose()?;
    let store = Store::open(&args.database).await?;
    let retention = i64::try_from(args.retention_s).unwrap_or(i64::MAX);
    let app = Arc::new(App {
        store,
        cache: RwLock::new(None),
        builder: Mutex::new(None),
        build_error: Mutex::new(None),
        metrics: Metrics::default(),
        admin,
        reader,
    });
    if let Ok(n) = app.store.purge(retention).await {
        app.metrics.purged.fetch_add(n, Ordering::Relaxed);
    }
    rebuild(&app).await;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (stop, rx) = watch::channel(false);
    let tasks = vec![
        tokio::spawn(builder(
            app.clone(),
            Duration::from_millis(args.poll_ms.max(10)),
            rx.clone(),
        )),
        tokio::spawn(purger(
            app.clone(),
            retention,
            Duration::from_secs(args.purge_interval_s.max(1)),
            rx.clone(),
        )),
    ];
    let mut shutdown = rx;
    let router = api::router(app);
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
            .await
            .map_err(|e| e.to_string())
    });
    Ok(Running {
        addr,
        stop,
        tasks,
        server,
    })
}

/// Builds and serves the current document; false (and the error kept for /healthz) on failure.
async fn rebuild(app: &App) -> bool {
    // Only the builder task (and start-up before it) builds: the cache is taken and put back.
    let mut cache = app.builder.lock().unwrap_or_else(|e| e.into_inner()).take();
    let result = document::update(&app.store, &mut cache).await;
    *app.builder.lock().unwrap_or_else(|e| e.into_inner()) = cache;
    match result {
        Ok(b) => {
            app.metrics.built(b.seconds, b.full);
            app.set(b);
            true
        }
        Err(e) => {
            app.metrics.rebuild_failures.fetch_add(1, Ordering::Relaxed);
            eprintln!("keygate keyservice: error: {e}");
            app.set_error(e);
            false
        }
    }
}

/// Rebuilds whenever the database's generation differs from the served one: at once after a
/// local change, within `poll` after another replica's. A failed build is retried after 5 s.
async fn builder(app: Arc<App>, poll: Duration, mut stop: watch::Receiver<bool>) {
    let mut failed_at: Option<Instant> = None;
    loop {
        let served = app.current().map(|b| b.generation);
        if let Ok(g) = app.store.generation().await {
            let retry = failed_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
            if Some(g) != served && retry {
                let ok = rebuild(&app).await;
                failed_at = (!ok).then(Instant::now);
            }
        }
        tokio::select! {
            _ = app.store.changed.notified() => {}
            _ = tokio::time::sleep(poll) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

async fn purger(app: Arc<App>, retention: i64, every: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match app.store.purge(retention).await {
            Ok(n) => {
                app.metrics.purged.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => eprintln!("keygate keyservice: retention purge failed: {e:?}"),
        }
    }
}

/// Runs until SIGINT or SIGTERM.
pub async fn serve(args: ServeArgs) -> Result<(), String> {
    let running = start(args).await?;
    eprintln!("keygate keyservice: listening on http://{}", running.addr);
    let term = async {
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    eprintln!("keygate keyservice: stopping");
    running.stop().await
}

/// Blocking entry point for the `keygate keyservice` command: 0 after a clean stop, 1 on error.
pub fn run(args: ServeArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keygate keyservice: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate keyservice: error: {e}");
            ExitCode::FAILURE
        }
    }
}
