//! Generates the policy CRDs from their Rust types; the output is `deploy/base/crds/crds.yaml`
//! (see `ztunnel::discovery::crd::REGENERATE`).

fn main() -> std::process::ExitCode {
    match ztunnel::discovery::crd::crds_yaml() {
        Ok(yaml) => {
            print!("{yaml}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crds: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
