//! `ztunnel removed --daemonset <namespace>/<name>`: whether the node daemon's DaemonSet is
//! being taken off the cluster. The CNI installer asks it when it is stopped, to choose
//! between leaving the plugin chained (a restart or an upgrade: new pods of enrolled
//! namespaces must keep failing closed until the daemon is back) and unchaining it (an
//! uninstall: new pods must start without it).
//!
//! The verdict ([`judge`], a pure function of what the API server answered) and the exit
//! status:
//! - `0`, removed: the DaemonSet is gone (`404`), being deleted (it has a
//!   `deletionTimestamp`), or the caller may no longer read it (`401`, `403`: its
//!   ServiceAccount, token or role is gone, as when the whole installation is deleted);
//! - `1`, present;
//! - `2`, cannot tell (the API server unreachable or failing, a timeout): the plugin stays,
//!   which fails closed.

use std::process::ExitCode;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::Api;

/// The command line.
#[derive(Debug, clap::Parser)]
#[command(name = "ztunnel removed")]
struct Args {
    /// The DaemonSet, as `<namespace>/<name>`.
    #[arg(long)]
    daemonset: String,
    /// The kubeconfig [env: KUBECONFIG] [default: in-cluster]
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// How long to wait for the API server.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// What the answer says of the DaemonSet.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Gone, being deleted, or no longer readable; why.
    Removed(String),
    Present,
    /// Nothing can be concluded; why.
    Unknown(String),
}

/// The verdict on the answer to a `GET` of the DaemonSet: `Ok(None)` is `404`, `Ok(Some)`
/// the object's `deletionTimestamp` if any.
pub fn judge(answer: Result<Option<Option<String>>, kube::Error>) -> Verdict {
    match answer {
        Ok(None) => Verdict::Removed("the DaemonSet is gone".into()),
        Ok(Some(Some(ts))) => {
            Verdict::Removed(format!("the DaemonSet is being deleted (since {ts})"))
        }
        Ok(Some(None)) => Verdict::Present,
        Err(kube::Error::Api(s)) if s.code == 401 || s.code == 403 => Verdict::Removed(format!(
            "the DaemonSet can no longer be read ({} {}): its credentials are gone",
            s.code, s.reason
        )),
        Err(e) => Verdict::Unknown(e.to_string()),
    }
}

/// Runs the command; the exit status says the verdict.
pub async fn run(args: Vec<String>) -> ExitCode {
    use clap::Parser;
    let a = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let Some((ns, name)) = a.daemonset.split_once('/') else {
        eprintln!("ztunnel removed: --daemonset must be <namespace>/<name>");
        return ExitCode::from(2);
    };
    let kubeconfig = a
        .kubeconfig
        .or_else(|| std::env::var_os("KUBECONFIG").map(Into::into));
    let verdict = match tokio::time::timeout(a.timeout, get(kubeconfig.as_deref(), ns, name)).await
    {
        Ok(Ok(answer)) => judge(answer),
        Ok(Err(e)) => Verdict::Unknown(e),
        Err(_) => Verdict::Unknown(format!("no answer within {:?}", a.timeout)),
    };
    match verdict {
        Verdict::Removed(why) => {
            eprintln!("ztunnel removed: {ns}/{name}: removed: {why}");
            ExitCode::SUCCESS
        }
        Verdict::Present => {
            eprintln!("ztunnel removed: {ns}/{name}: present");
            ExitCode::from(1)
        }
        Verdict::Unknown(why) => {
            eprintln!("ztunnel removed: {ns}/{name}: cannot tell: {why}");
            ExitCode::from(2)
        }
    }
}

/// The answer to a `GET` of the DaemonSet (see [`judge`]); `Err` when no client can be made.
async fn get(
    kubeconfig: Option<&std::path::Path>,
    ns: &str,
    name: &str,
) -> Result<Result<Option<Option<String>>, kube::Error>, String> {
    let client = crate::discovery::kube::client(kubeconfig)
        .await
        .map_err(|e| e.to_string())?;
    let api: Api<DaemonSet> = Api::namespaced(client, ns);
    Ok(api
        .get_opt(name)
        .await
        .map(|ds| ds.map(|ds| ds.metadata.deletion_timestamp.map(|t| t.0.to_string()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("refused", "Forbidden")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn verdicts() {
        assert!(matches!(judge(Ok(None)), Verdict::Removed(_)));
        assert!(matches!(
            judge(Ok(Some(Some("2026-12-05T00:00:00Z".into())))),
            Verdict::Removed(_)
        ));
        assert_eq!(judge(Ok(Some(None))), Verdict::Present);
        assert!(matches!(judge(Err(api_error(403))), Verdict::Removed(_)));
        assert!(matches!(judge(Err(api_error(401))), Verdict::Removed(_)));
        assert!(matches!(judge(Err(api_error(500))), Verdict::Unknown(_)));
        assert!(matches!(judge(Err(api_error(429))), Verdict::Unknown(_)));
    }
}
