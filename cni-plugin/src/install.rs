//! The node installer: `ztunnel-cni install` / `ztunnel-cni uninstall`, what the DaemonSet runs
//! instead of the plugin. Install copies this binary into the CNI bin directory and chains the
//! plugin into the node's primary network configuration (the first file by name that a runtime
//! loads, [`find_primary`]), converting a single-plugin file into a `.conflist`, at a
//! `cniVersion` the plugin supports only ([`version_supported`]); uninstall takes the entry and
//! the binary out again. Both are idempotent.
//!
//! The configuration is handled as a `serde_json::Value` built with `preserve_order`, so every
//! key and plugin that is not ours is written back as it was, in document order (re-serialized,
//! pretty-printed). The transformation is pure ([`insert`], [`remove`], [`render`]); the
//! I/O around it ([`install`], [`uninstall`], [`watch`]) writes every file atomically (a temp
//! file in the same directory, then a rename).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value as Json};

use crate::conf;

/// The plugin's `type`, which is also the binary's name in the CNI bin directory.
pub const PLUGIN_TYPE: &str = "ztunnel-cni";
/// The watch loop's period.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The command line of the installer modes.
#[derive(Debug, clap::Parser)]
#[command(
    name = "ztunnel-cni",
    about = "Chained CNI plugin for ztunnel; `install`/`uninstall` set it up on a node"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Mode,
}

/// `install` or `uninstall`.
#[derive(Debug, clap::Subcommand)]
pub enum Mode {
    /// Copy the plugin binary and chain the plugin into the primary CNI configuration.
    Install(InstallArgs),
    /// Remove the plugin from the CNI configuration and its binary from the bin directory.
    Uninstall(Options),
    /// Exit 0 when the node is set up (the plugin binary in the bin directory, the primary
    /// configuration chaining it), else say what is missing and exit 1: a readiness probe.
    Installed(Options),
}

/// The options of `install`.
#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub options: Options,
    /// Keep running and re-insert the plugin whenever the primary configuration loses it.
    #[arg(long, conflicts_with = "once")]
    pub watch: bool,
    /// Install and exit (the default).
    #[arg(long)]
    pub once: bool,
    /// With `--watch`: when stopped (SIGTERM), run this command (split on whitespace, no
    /// shell) and uninstall if it exits 0, e.g. `ztunnel removed --daemonset
    /// ztunnel-system/ztunnel`, which says whether the DaemonSet is being removed. Otherwise,
    /// or without this option, the plugin stays chained (a restart or an upgrade).
    #[arg(long, requires = "watch")]
    pub uninstall_if: Option<String>,
}

/// The options both modes accept.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// The directory holding the CNI network configurations.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The directory holding the CNI plugin binaries.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The plugin binary to install [default: this executable].
    #[arg(long)]
    pub plugin_binary: Option<PathBuf>,
    /// The daemon's Unix socket, written into the plugin's configuration.
    #[arg(long, default_value = ztunnel_proto::enroll::DEFAULT_SOCKET)]
    pub socket: String,
    /// The daemon's snapshot of enrolled namespaces, written into the plugin's configuration.
    #[arg(long, default_value = conf::DEFAULT_ENROLLED_NAMESPACES_FILE)]
    pub enrolled_namespaces_file: String,
    /// The deadline of one daemon call, written into the plugin's configuration.
    #[arg(long, default_value = "5s")]
    pub timeout: String,
    /// Namespaces whose pods the plugin lets through without asking the daemon, written into
    /// the plugin's configuration (`excludeNamespaces`); comma-separated, empty for none.
    #[arg(long, default_value = "kube-system,ztunnel-system")]
    pub exclude_namespaces: String,
}

impl Options {
    /// The values of the plugin's configuration entry, with `timeout` validated.
    pub fn settings(&self) -> Result<Settings, InstallError> {
        conf::parse_timeout(&self.timeout)
            .map_err(|e| InstallError::Option(format!("--timeout: {}", e.details())))?;
        let exclude_namespaces: Vec<String> = self
            .exclude_namespaces
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        Ok(Settings {
            socket: self.socket.clone(),
            timeout: self.timeout.clone(),
            enrolled_namespaces_file: self.enrolled_namespaces_file.clone(),
            exclude_namespaces,
        })
    }
}

/// The installer's failures.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("invalid option {0}")]
    Option(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: malformed JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {reason}")]
    Shape { path: PathBuf, reason: String },
    #[error("no CNI network configuration (*.conflist, *.conf, *.json) in {0}")]
    NoPrimary(PathBuf),
    #[error("not installed: {0}")]
    NotInstalled(String),
    #[error("setting up signal handling: {0}")]
    Signal(#[from] nix::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What goes into the plugin's configuration entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub socket: String,
    pub timeout: String,
    pub enrolled_namespaces_file: String,
    pub exclude_namespaces: Vec<String>,
}

impl Settings {
    fn fields(&self) -> [(&'static str, Json); 4] {
        let text = |s: &String| Json::String(s.clone());
        [
            ("socket", text(&self.socket)),
            ("timeout", text(&self.timeout)),
            (
                "enrolledNamespacesFile",
                text(&self.enrolled_namespaces_file),
            ),
            (
                "excludeNamespaces",
                Json::Array(self.exclude_namespaces.iter().map(text).collect()),
            ),
        ]
    }

    /// The plugin's entry in a conflist's `plugins`.
    pub fn entry(&self) -> Json {
        let mut fields = Map::new();
        fields.insert("type".into(), Json::String(PLUGIN_TYPE.into()));
        for (k, v) in self.fields() {
            fields.insert(k.into(), v);
        }
        Json::Object(fields)
    }
}

fn is_ours(plugin: &Json) -> bool {
    plugin.get("type").and_then(Json::as_str) == Some(PLUGIN_TYPE)
}

/// Parses a configuration file's text.
pub fn parse(text: &str) -> Result<Json, serde_json::Error> {
    serde_json::from_str(text)
}

/// The file's text: pretty-printed with a trailing newline.
pub fn render(json: &Json) -> String {
    let mut s = serde_json::to_string_pretty(json).expect("a Json value always serializes");
    s.push('\n');
    s
}

/// Whether the configuration is a conflist whose `plugins` hold our entry.
pub fn contains_ours(conf: &Json) -> bool {
    matches!(conf.get("plugins"), Some(Json::Array(p)) if p.iter().any(is_ours))
}

/// Whether the configuration is a conflist whose `plugins` hold our entry once, with the
/// fields of `settings` (an entry an older installer wrote may name another socket or
/// snapshot file).
pub fn chains_as(conf: &Json, settings: &Settings) -> bool {
    let Some(Json::Array(plugins)) = conf.get("plugins") else {
        return false;
    };
    let mut ours = plugins.iter().filter(|p| is_ours(p));
    match (ours.next(), ours.next()) {
        (Some(entry), None) => settings
            .fields()
            .into_iter()
            .all(|(k, v)| entry.get(k) == Some(&v)),
        _ => false,
    }
}

/// What [`insert`] did with a configuration.
#[derive(Clone, Debug, PartialEq)]
pub enum Inserted {
    /// A conflist (or a `.conf` already in conflist form), updated in place.
    Conflist(Json),
    /// A single-plugin configuration, turned into a conflist (to be written as `.conflist`).
    Converted(Json),
}

impl Inserted {
    pub fn json(&self) -> &Json {
        match self {
            Inserted::Conflist(j) | Inserted::Converted(j) => j,
        }
    }
}

/// Chains our entry into a configuration. A conflist (an object with a `plugins` array) gets
/// the entry appended, or an existing entry of ours updated in place (further duplicates of
/// ours are dropped); a single-plugin configuration (an object with `type`) becomes a conflist
/// with the original plugin first. The error is the reason the shape is not usable.
pub fn insert(conf: Json, settings: &Settings) -> Result<Inserted, String> {
    let Json::Object(mut fields) = conf else {
        return Err("the configuration is not a JSON object".to_string());
    };
    if let Some(plugins) = fields.get_mut("plugins") {
        let Json::Array(list) = plugins else {
            return Err("`plugins` is not an array".to_string());
        };
        match list.iter().position(is_ours) {
            Some(i) => {
                let mut n = 0;
                list.retain(|p| {
                    let keep = !is_ours(p) || n == i;
                    n += 1;
                    keep
                });
                if let Json::Object(ours) = &mut list[i] {
                    for (k, v) in settings.fields() {
                        ours.insert(k.into(), v);
                    }
                }
            }
            None => list.push(settings.entry()),
        }
        let conf = Json::Object(fields);
        version_supported(&conf)?;
        return Ok(Inserted::Conflist(conf));
    }
    match fields.get("type") {
        Some(Json::String(_)) => {}
        Some(_) => return Err("`type` is not a string".to_string()),
        None => return Err("neither a conflist (`plugins`) nor a plugin (`type`)".to_string()),
    }
    // As a runtime converts it (libcni's `ConfListFromConf`): its name and version, empty
    // when it has none.
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        let v = fields.shift_remove(key);
        list.insert(key.into(), v.unwrap_or(Json::String(String::new())));
    }
    list.insert(
        "plugins".into(),
        Json::Array(vec![Json::Object(fields), settings.entry()]),
    );
    let conf = Json::Object(list);
    version_supported(&conf)?;
    Ok(Inserted::Converted(conf))
}

/// Takes our entries out of a conflist's `plugins`; `None` when there were none.
pub fn remove(conf: &Json) -> Option<Json> {
    if !contains_ours(conf) {
        return None;
    }
    let mut out = conf.clone();
    if let Some(Json::Array(list)) = out.get_mut("plugins") {
        list.retain(|p| !is_ours(p));
    }
    Some(out)
}

/// Whether a runtime reads the file as a network configuration: the extensions libcni lists
/// (hidden files included; our temp files end in `.tmp`).
fn is_config_name(name: &str) -> bool {
    [".conflist", ".conf", ".json"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// The configuration files of `dir`, sorted by name, as a runtime lists them.
pub fn config_files(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_config_name(name) && entry.path().is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Why a runtime would not load `conf` as a network (libcni's checks, which CRI-O applies
/// before it skips to the next file), if it would not. A `.conflist` needs a `name`, and its
/// `plugins`, when present, each with a `type` (without them, its plugins are files in a
/// directory beside it: [`fragments`]); another file is one plugin, with a `type`.
pub fn unloadable(path: &Path, conf: &Json) -> Option<String> {
    let Json::Object(fields) = conf else {
        return Some("not a JSON object".into());
    };
    if path.extension().and_then(|e| e.to_str()) != Some("conflist") {
        return match fields.get("type") {
            Some(Json::String(t)) if !t.is_empty() => None,
            _ => Some("a single plugin without a `type`".into()),
        };
    }
    if !matches!(fields.get("name"), Some(Json::String(_))) {
        return Some("a conflist without a `name`".into());
    }
    match fields.get("plugins") {
        Some(Json::Array(list)) if list.is_empty() => Some("no plugins in `plugins`".into()),
        Some(Json::Array(list)) => list
            .iter()
            .any(|p| !matches!(p.get("type"), Some(Json::String(_))))
            .then(|| "a plugin in `plugins` without a `type`".into()),
        None if fields.get("loadOnlyInlinedPlugins") != Some(&Json::Bool(true)) => None,
        _ => Some("no `plugins` list".into()),
    }
}

/// The directory of plugin files a runtime appends to conflist `conf` of `dir` (libcni: the
/// `*.conf` files of `<dir>/<name>/`, unless `loadOnlyInlinedPlugins`), if it holds any: they
/// would run after ours, so the plugin is not chained there.
pub fn fragments(dir: &Path, conf: &Json) -> Option<PathBuf> {
    if conf.get("loadOnlyInlinedPlugins") == Some(&Json::Bool(true)) {
        return None;
    }
    let name = conf
        .get("name")
        .and_then(Json::as_str)
        .filter(|n| !n.is_empty())?;
    let sub = dir.join(name);
    let any = fs::read_dir(&sub)
        .ok()?
        .flatten()
        .any(|e| e.path().extension().and_then(|x| x.to_str()) == Some("conf"));
    any.then_some(sub)
}

/// The configuration a runtime uses for pods: the first configuration file, by name, that
/// it can load; and the earlier files it skips, with why.
pub struct Primary {
    pub path: PathBuf,
    /// Its text, with U+FFFD for bytes that are not UTF-8.
    pub text: String,
    /// Whether it is UTF-8 text (else it is not rewritten).
    pub utf8: bool,
    pub conf: Json,
    pub skipped: Vec<String>,
}

/// The primary configuration of `dir` ([`Primary`]), if any; when every file is unloadable,
/// the first one's error.
pub fn find_primary(dir: &Path) -> Result<Option<Primary>, InstallError> {
    let mut skipped = Vec::new();
    let mut first_error = None;
    for path in config_files(dir)? {
        // As Go reads it: bytes that are not UTF-8 stand for U+FFFD (such a file is not
        // rewritten, see [`install_config`]).
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        let (text, utf8) = match String::from_utf8(bytes) {
            Ok(text) => (text, true),
            Err(e) => (String::from_utf8_lossy(e.as_bytes()).into_owned(), false),
        };
        let error = match parse(&text) {
            Ok(conf) => match unloadable(&path, &conf) {
                None => {
                    return Ok(Some(Primary {
                        path,
                        text,
                        utf8,
                        conf,
                        skipped,
                    }))
                }
                Some(reason) => InstallError::Shape {
                    path: path.clone(),
                    reason,
                },
            },
            Err(source) => InstallError::Json {
                path: path.clone(),
                source,
            },
        };
        skipped.push(error.to_string());
        first_error.get_or_insert(error);
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

/// The `cniVersion` the runtime gives every plugin of `conf` (a conflist), as libcni (1.2 and
/// later) picks it: with `cniVersions` (spec 1.1), the highest of those and `cniVersion` that
/// are not newer than the newest spec ([`conf::LATEST_VERSION`], libcni's own), else
/// `cniVersion`; `""` when there is none.
fn effective_version(conf: &Json) -> String {
    let key = |v: &str| {
        v.split('.')
            .map(|n| n.parse::<u32>().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    let stated = conf.get("cniVersion").and_then(Json::as_str);
    let Some(listed) = conf.get("cniVersions").and_then(Json::as_array) else {
        return stated.unwrap_or("").to_owned();
    };
    let newest = key(conf::LATEST_VERSION);
    listed
        .iter()
        .filter_map(Json::as_str)
        .chain(stated)
        .filter(|v| key(v) <= newest)
        .max_by_key(|v| key(v))
        .or(stated)
        .unwrap_or("")
        .to_owned()
}

/// Whether the plugin can run in `conf` (a conflist): the version the runtime gives it is one
/// it supports; else why not.
pub fn version_supported(conf: &Json) -> Result<(), String> {
    let v = effective_version(conf);
    if conf::SUPPORTED_VERSIONS.contains(&v.as_str()) {
        return Ok(());
    }
    Err(format!(
        "the runtime would run the chain at cniVersion {v:?}, which {PLUGIN_TYPE} does not \
         support ({}); set the configuration's cniVersion to one of those",
        conf::SUPPORTED_VERSIONS.join(", ")
    ))
}

/// Writes `data` to `path` with `mode` via a temp file in the same directory and a rename.
/// The temp file is created anew, readable by its owner alone until it has `mode`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

fn read_conf(path: &Path) -> Result<Json, InstallError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    parse(&text).map_err(|source| InstallError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn file_mode(path: &Path) -> u32 {
    fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644)
}

/// Chains the plugin into the primary configuration of `dir`; returns the file written and
/// whether anything changed.
/// A conflist that is a symbolic link is written through it (the link is kept); a
/// single-plugin file is replaced by a `.conflist` of the same stem, unless one exists.
pub fn install_config(dir: &Path, settings: &Settings) -> Result<(PathBuf, bool), InstallError> {
    let Primary {
        path: primary,
        text: original,
        utf8,
        conf,
        skipped,
    } = find_primary(dir)?.ok_or_else(|| InstallError::NoPrimary(dir.to_path_buf()))?;
    for s in skipped {
        log(&format!("skipping {s} (a runtime skips it too)"));
    }
    let shape = |reason| InstallError::Shape {
        path: primary.clone(),
        reason,
    };
    if !utf8 {
        return Err(shape(
            "it is not UTF-8 text: not rewritten (the runtime reads it all the same)".into(),
        ));
    }
    if let Some(sub) = fragments(dir, &conf) {
        return Err(shape(format!(
            "its plugins in {} would run after {PLUGIN_TYPE}",
            sub.display()
        )));
    }
    let inserted = insert(conf, settings).map_err(shape)?;
    let text = render(inserted.json());
    let mode = file_mode(&primary);
    match inserted {
        Inserted::Conflist(_) => {
            let changed = text != original;
            if changed {
                let real = fs::canonicalize(&primary).map_err(io_err(&primary))?;
                write_atomic(&real, text.as_bytes(), mode)?;
            }
            Ok((primary, changed))
        }
        Inserted::Converted(_) => {
            let target = primary.with_extension("conflist");
            if fs::symlink_metadata(&target).is_ok() {
                return Err(shape(format!(
                    "converting it into a conflist would replace {}",
                    target.display()
                )));
            }
            write_atomic(&target, text.as_bytes(), mode)?;
            fs::remove_file(&primary).map_err(io_err(&primary))?;
            Ok((target, true))
        }
    }
}

/// Copies the plugin binary to `<bin_dir>/ztunnel-cni`, mode 0755; nothing if it is that file.
pub fn install_binary(binary: &Path, bin_dir: &Path) -> Result<PathBuf, InstallError> {
    let target = bin_dir.join(PLUGIN_TYPE);
    if let (Ok(a), Ok(b)) = (binary.canonicalize(), target.canonicalize()) {
        if a == b {
            return Ok(target);
        }
    }
    let data = fs::read(binary).map_err(io_err(binary))?;
    write_atomic(&target, &data, 0o755)?;
    Ok(target)
}

/// Copies `--plugin-binary` (default: this executable) into the CNI bin directory.
fn install_plugin_binary(options: &Options) -> Result<(), InstallError> {
    let binary = match &options.plugin_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().map_err(io_err(Path::new("current executable")))?,
    };
    let target = install_binary(&binary, &options.cni_bin_dir)?;
    log(&format!(
        "installed {} as {}",
        binary.display(),
        target.display()
    ));
    Ok(())
}

/// `install` without `--watch`: the binary, then the configuration.
pub fn install(options: &Options) -> Result<(), InstallError> {
    let settings = options.settings()?;
    install_plugin_binary(options)?;
    let (file, changed) = install_config(&options.cni_conf_dir, &settings)?;
    if changed {
        log(&format!("chained {PLUGIN_TYPE} into {}", file.display()));
    } else {
        log(&format!("{} already chains {PLUGIN_TYPE}", file.display()));
    }
    Ok(())
}

/// `uninstall`: our entry out of every configuration file holding it, then the binary.
/// Files that do not parse are reported and left alone.
pub fn uninstall(options: &Options) -> Result<(), InstallError> {
    let dir = &options.cni_conf_dir;
    let files = match config_files(dir) {
        Ok(f) => f,
        Err(InstallError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    for file in files {
        let conf = match read_conf(&file) {
            Ok(c) => c,
            Err(e) => {
                log(&format!("skipping {e}"));
                continue;
            }
        };
        if let Some(out) = remove(&conf) {
            write_atomic(&file, render(&out).as_bytes(), file_mode(&file))?;
            log(&format!("removed {PLUGIN_TYPE} from {}", file.display()));
        }
    }
    let target = options.cni_bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&target) {
        Ok(()) => log(&format!("removed {}", target.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&target)(e)),
    }
    Ok(())
}

/// `installed`: the plugin binary is in the bin directory and the primary configuration
/// chains the plugin; else what is missing.
pub fn installed(options: &Options) -> Result<(), InstallError> {
    let bin = options.cni_bin_dir.join(PLUGIN_TYPE);
    if !bin.is_file() {
        return Err(InstallError::NotInstalled(format!(
            "{} is missing",
            bin.display()
        )));
    }
    let dir = &options.cni_conf_dir;
    let primary = find_primary(dir)?.ok_or_else(|| InstallError::NoPrimary(dir.to_path_buf()))?;
    if !contains_ours(&primary.conf) {
        return Err(InstallError::NotInstalled(format!(
            "{} does not chain {PLUGIN_TYPE}",
            primary.path.display()
        )));
    }
    if let Err(reason) = version_supported(&primary.conf) {
        return Err(InstallError::NotInstalled(format!(
            "{}: {reason}",
            primary.path.display()
        )));
    }
    if let Some(sub) = fragments(dir, &primary.conf) {
        return Err(InstallError::NotInstalled(format!(
            "{}: its plugins in {} run after {PLUGIN_TYPE}",
            primary.path.display(),
            sub.display()
        )));
    }
    Ok(())
}

/// A flag raised by SIGTERM or SIGINT. The signals are blocked in the calling thread (call it
/// before starting other threads, which inherit the mask) and taken by a thread in `sigwait`.
pub fn stop_on_signal() -> Result<Arc<AtomicBool>, InstallError> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()?;
    let flag = Arc::new(AtomicBool::new(false));
    let raised = Arc::clone(&flag);
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            log(&format!("{sig}: stopping"));
        }
        raised.store(true, Ordering::SeqCst);
    });
    Ok(flag)
}

/// `install --watch`: installs (waiting for a primary configuration if there is none yet),
/// then every [`POLL_INTERVAL`] re-inserts the entry if the primary configuration lost it
/// (or updates it when it holds other settings: an upgrade that moved the socket), and
/// copies the plugin binary again if it is gone from the CNI bin directory (a CNI upgrade
/// that empties it), until `stop` is raised. A malformed file is reported and retried on the
/// next change.
pub fn watch(options: &Options, stop: &AtomicBool) -> Result<(), InstallError> {
    let settings = options.settings()?;
    install_plugin_binary(options)?;
    let dir = &options.cni_conf_dir;
    log(&format!("watching {}", dir.display()));
    // The primary file and its text when last looked at; an unchanged file is not re-read.
    let mut seen: Option<(PathBuf, String)> = None;
    let mut reported: Option<String> = None;
    while !stop.load(Ordering::SeqCst) {
        if !options.cni_bin_dir.join(PLUGIN_TYPE).exists() {
            log(&format!(
                "{PLUGIN_TYPE} is gone from {}; copying it again",
                options.cni_bin_dir.display()
            ));
            if let Err(e) = install_plugin_binary(options) {
                log(&format!("{e}; retrying"));
            }
        }
        match check_once(dir, &settings, &mut seen) {
            Ok(Some(msg)) => {
                log(&msg);
                reported = None;
            }
            Ok(None) => {}
            Err(e) => {
                let msg = e.to_string();
                if reported.as_deref() != Some(msg.as_str()) {
                    log(&format!("{msg}; retrying"));
                    reported = Some(msg);
                }
            }
        }
        sleep_unless(stop, POLL_INTERVAL);
    }
    Ok(())
}

/// When `install --watch` has been stopped: runs `command` (see
/// [`InstallArgs::uninstall_if`]) and uninstalls when it exits 0; any other outcome, a
/// command that cannot run included, leaves the plugin chained, which fails closed.
pub fn on_stop(options: &Options, command: &str) -> Result<(), InstallError> {
    let mut words = command.split_whitespace();
    let Some(program) = words.next() else {
        log("--uninstall-if is empty; leaving the plugin chained");
        return Ok(());
    };
    match std::process::Command::new(program).args(words).status() {
        Ok(s) if s.success() => {
            log(&format!(
                "`{command}` says the installation is being removed; uninstalling"
            ));
            uninstall(options)
        }
        Ok(s) => {
            log(&format!("`{command}` {s}; leaving the plugin chained"));
            Ok(())
        }
        Err(e) => {
            log(&format!(
                "cannot run `{command}`: {e}; leaving the plugin chained"
            ));
            Ok(())
        }
    }
}

/// One pass of the watch loop: a message when the entry was (re-)inserted.
fn check_once(
    dir: &Path,
    settings: &Settings,
    seen: &mut Option<(PathBuf, String)>,
) -> Result<Option<String>, InstallError> {
    let primary = find_primary(dir)?.ok_or_else(|| InstallError::NoPrimary(dir.to_path_buf()))?;
    if matches!(seen, Some((p, t)) if *p == primary.path && *t == primary.text) {
        return Ok(None);
    }
    if chains_as(&primary.conf, settings) {
        *seen = Some((primary.path, primary.text));
        return Ok(None);
    }
    // Not remembered as seen until written: a failed write is tried again at the next pass.
    let (file, _) = install_config(dir, settings)?;
    let now = fs::read_to_string(&file).map_err(io_err(&file))?;
    *seen = Some((file.clone(), now));
    Ok(Some(format!(
        "chained {PLUGIN_TYPE} into {}",
        file.display()
    )))
}

fn sleep_unless(stop: &AtomicBool, total: Duration) {
    let step = Duration::from_millis(50);
    let mut left = total;
    while !left.is_zero() && !stop.load(Ordering::SeqCst) {
        let d = left.min(step);
        std::thread::sleep(d);
        left -= d;
    }
}

fn log(msg: &str) {
    eprintln!("ztunnel-cni: {msg}");
}

/// Runs the installer mode named by the command line; the process's exit status.
pub fn main(args: Vec<std::ffi::OsString>) -> std::process::ExitCode {
    use clap::Parser;
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let result = match &cli.command {
        Mode::Install(a) if a.watch => stop_on_signal()
            .and_then(|stop| watch(&a.options, &stop))
            .and_then(|()| match &a.uninstall_if {
                Some(command) => on_stop(&a.options, command),
                None => Ok(()),
            }),
        Mode::Install(a) => install(&a.options),
        Mode::Uninstall(o) => uninstall(o),
        Mode::Installed(o) => installed(o),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            log(&format!("error: {e}"));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
#[path = "install_tests.rs"]
mod tests;
