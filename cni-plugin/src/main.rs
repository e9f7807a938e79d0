//! `ztunnel-cni`, the chained CNI plugin (specification 0.3.0 to 1.1.0) that enrolls pods into
//! the mesh by asking the node daemon over its Unix socket. This file is the entry only: it
//! gathers the `CNI_*` environment and stdin, calls [`plugin::run`], prints the result or the
//! error object on stdout (nothing else goes there), logs on stderr, and sets the exit status.
//! With `install`, `uninstall` or `installed` as its first argument it is the node installer
//! instead ([`install::main`]). Everything else is in the library (`src/lib.rs`).

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use ztunnel_cni::{conf, daemon, install, netns, plugin};

fn main() -> ExitCode {
    // Runtimes invoke the plugin with no arguments; the DaemonSet runs the installer modes.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(mode) = args.get(1).and_then(|a| a.to_str()) {
        if matches!(
            mode,
            "install" | "uninstall" | "installed" | "help" | "--help" | "-h"
        ) {
            return install::main(args);
        }
    }

    let vars: conf::Vars = std::env::vars_os()
        .filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            k.starts_with("CNI_")
                .then(|| (k, v.to_string_lossy().into_owned()))
        })
        .collect();

    // VERSION may come with no stdin at all; don't wait on a terminal for it.
    let mut stdin = Vec::new();
    let interactive = std::io::stdin().is_terminal();
    if !(interactive && vars.get("CNI_COMMAND").map(String::as_str) == Some("VERSION")) {
        if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
            eprintln!("ztunnel-cni: reading stdin: {e}");
        }
    }

    let outcome = plugin::run(&vars, &stdin, &daemon::UnixDaemon, &netns::HostNetns);
    for line in &outcome.logs {
        eprintln!("ztunnel-cni: {line}");
    }
    let (body, code) = match &outcome.result {
        Ok(None) => return ExitCode::SUCCESS,
        Ok(Some(json)) => (json.clone(), ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("ztunnel-cni: error {}: {e}: {}", e.code(), e.details());
            (e.to_json(&outcome.cni_version), ExitCode::FAILURE)
        }
    };
    let mut out = std::io::stdout().lock();
    if let Err(e) = out
        .write_all(body.as_bytes())
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
    {
        eprintln!("ztunnel-cni: writing the result: {e}");
        return ExitCode::FAILURE;
    }
    code
}
