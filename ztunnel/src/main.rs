//! The `ztunnel` binary: `ztunnel run` (the node daemon), `ztunnel ca` (the certificate
//! authority), and the small commands `ctl`, `crds` and `removed`. Parses the configuration,
//! sets up logging, and hands over to the library.

use std::process::ExitCode;

use anyhow::Context;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer};
use ztunnel::config::{CaConfig, ConfigError, LogFormat, RunConfig};

const USAGE: &str = "usage: ztunnel <command> [options]

commands:
  run    the node daemon
  ca     the certificate authority that node daemons ask for workload certificates
  ctl    inspect a running daemon: workloads, services, policies, certs, connections, explain
  crds   print the policy CustomResourceDefinitions (YAML) for `kubectl apply -f -`
  removed  whether the daemon's DaemonSet is being removed (exit 0), present (1) or unknown (2),
         for the CNI installer when it stops

`ztunnel <command> --help` lists a command's options and their environment variables.";

type SetLevel = ztunnel::admin::SetLogLevel;

/// `pow` from the pure-Rust `libm` crate, for the one caller the binary has in the C math
/// library (tokio's scheduler keeps a moving average of poll times with `f64::powf`). With the
/// symbol defined here the linker leaves `libm.so.6` out of the process, which would otherwise
/// map about half a MiB of it for this one function.
#[no_mangle]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

/// Installs the global subscriber; returns the handle behind the admin `/logging` endpoint.
/// Access-log lines (target `access`) are always one JSON object per line; the rest follows
/// `format`.
fn init_logging(filter: &str, format: LogFormat) -> anyhow::Result<SetLevel> {
    use tracing_subscriber::filter::filter_fn;
    let filter = EnvFilter::try_new(filter).context("invalid log filter")?;
    let (filter, handle) = reload::Layer::new(filter);
    let not_access = filter_fn(|m| m.target() != "access");
    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_filter(not_access)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .with_filter(not_access)
            .boxed(),
    };
    let access = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_writer(std::io::stderr)
        .with_filter(filter_fn(|m| m.target() == "access"));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(access)
        .init();
    Ok(Box::new(move |level: &str| {
        let f =
            EnvFilter::try_new(level).map_err(|e| format!("invalid log level {level:?}: {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())
    }))
}

/// Prints a configuration error (or clap's help) and exits: 2 for errors, 0 for `--help`.
fn config_error(e: ConfigError) -> ! {
    match e {
        ConfigError::Cli(c) => c.exit(),
        other => {
            eprintln!("ztunnel: invalid configuration: {other}");
            std::process::exit(2)
        }
    }
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

async fn run(cfg: RunConfig, not_restarted: Option<std::io::Error>) -> anyhow::Result<()> {
    let set_level = init_logging(&cfg.log_filter, cfg.log_format)?;
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(config = %cfg, glibc_tunables = env("GLIBC_TUNABLES"), workers, "starting ztunnel");
    warn_not_restarted(not_restarted);
    warn_unknown_variables(RunConfig::unknown_variables(env_names()));
    raise_fd_limit();
    ztunnel::metrics::count_panics();
    let mut daemon = ztunnel::app::start(&cfg, set_level).await?;
    tracing::info!("ready to serve");
    ztunnel::residency::release_startup_pages_logged();
    let ended = tokio::select! {
        signal = wait_for_signal() => {
            signal?;
            None
        }
        ended = daemon.until_a_task_ends() => Some(ended),
    };
    if let Some(what) = &ended {
        tracing::error!(task = %what, "a task the daemon cannot run without has ended; draining and exiting, to be restarted");
    }
    daemon.drain().await;
    match ended {
        Some(what) => Err(anyhow::anyhow!("{what}")),
        None => Ok(()),
    }
}

/// The names of the process's environment variables.
fn env_names() -> impl Iterator<Item = String> {
    std::env::vars_os().filter_map(|(name, _)| name.into_string().ok())
}

/// A `ZTUNNEL_…` variable that no setting reads is most likely a misspelt one: said, not
/// silently ignored.
fn warn_unknown_variables(names: Vec<String>) {
    for name in names {
        tracing::warn!(variable = %name, "no setting reads this environment variable; ignored (misspelt?)");
    }
}

/// The program could not start again with the allocator's tunable: it runs on with glibc's
/// per-thread caches, which keep more memory after a load.
fn warn_not_restarted(e: Option<std::io::Error>) {
    if let Some(e) = e {
        tracing::warn!(error = %e, tunable = ztunnel::alloc::TUNABLE, "cannot start again with the allocator's tunable; running without it");
    }
}

/// Every proxied connection holds two descriptors: lift the soft limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

async fn ca(args: Vec<String>, not_restarted: Option<std::io::Error>) -> anyhow::Result<()> {
    let cfg = CaConfig::from_sources(args, &env).unwrap_or_else(|e| config_error(e));
    let _set_level = init_logging(&cfg.log_filter, cfg.log_format)?;
    tracing::info!(config = %cfg, glibc_tunables = env("GLIBC_TUNABLES"), "starting ztunnel ca");
    warn_not_restarted(not_restarted);
    warn_unknown_variables(CaConfig::unknown_variables(env_names()));
    ztunnel::ca::run(&cfg, wait_for_signal_quiet()).await?;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
    }
    Ok(())
}

async fn wait_for_signal_quiet() {
    let _ = wait_for_signal().await;
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    let cmd = if args.len() > 1 {
        args.remove(1)
    } else {
        String::new()
    };
    // The long-running commands start again with the allocator's tunable (see `alloc`).
    let not_restarted = matches!(cmd.as_str(), "run" | "ca")
        .then(ztunnel::alloc::restart_with_tunables)
        .flatten();
    args[0] = format!("ztunnel {cmd}");
    ztunnel::alloc::tune();
    // The daemon's configuration is read first: it sizes the runtime.
    let run_cfg = (cmd == "run")
        .then(|| RunConfig::from_sources(args.clone(), &env).unwrap_or_else(|e| config_error(e)));
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(cfg) = &run_cfg {
        builder.worker_threads(cfg.worker_threads);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ztunnel: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cmd.as_str() {
        "run" => rt.block_on(run(run_cfg.expect("parsed for `run`"), not_restarted)),
        "ca" => rt.block_on(ca(args, not_restarted)),
        "ctl" => {
            return match rt.block_on(ztunnel::ctl::run(args)) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(ztunnel::ctl::CtlError::Cli(e)) => {
                    let _ = e.print();
                    ExitCode::from(if e.use_stderr() { 2 } else { 0 })
                }
                Err(e) => {
                    eprintln!("ztunnel ctl: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        "removed" => return rt.block_on(ztunnel::removed::run(args)),
        "crds" => {
            print!("{}", ztunnel::discovery::crd::CRDS_YAML);
            return ExitCode::SUCCESS;
        }
        "" | "help" | "-h" | "--help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        "--version" | "version" => {
            println!("ztunnel {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("ztunnel: unknown command {other:?}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztunnel: {e:#}");
            tracing::error!(error = format!("{e:#}"), "exiting");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pow_computes_powers() {
        assert_eq!(super::pow(2.0, 10.0), 1024.0);
        assert_eq!(super::pow(9.0, 0.5), 3.0);
        // What tokio computes: (1 - alpha)^n for its moving average of poll times.
        let (x, n) = (0.9_f64, 61.0);
        assert!((super::pow(x, n) - (0..61).fold(1.0, |a, _| a * x)).abs() < 1e-15);
    }
}
