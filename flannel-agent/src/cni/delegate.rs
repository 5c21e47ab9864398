//! Running the delegate plugin and remembering what it was given.
//!
//! The rendered delegate config is stored per container before ADD, so DEL can hand the
//! delegate exactly what ADD did even if `subnet.env` has changed or vanished since.

use std::{
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// Why the delegate could not be run or said no.
#[derive(Debug, thiserror::Error)]
pub enum DelegateError {
    /// No executable of that name in `CNI_PATH`.
    #[error("failed to find plugin {plugin:?} in path {cni_path:?}")]
    NotFound {
        /// Plugin type.
        plugin: String,
        /// `CNI_PATH`.
        cni_path: String,
    },
    /// Spawning or talking to the delegate failed.
    #[error("running plugin {}: {source}", path.display())]
    Exec {
        /// The executable.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The delegate exited non-zero; `stdout` normally holds its CNI error JSON.
    #[error("plugin {} failed ({status}): {}", path.display(), String::from_utf8_lossy(stdout).trim())]
    Failed {
        /// The executable.
        path: PathBuf,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed.
        stdout: Vec<u8>,
    },
    /// The scratch store could not be read or written.
    #[error("{op} {}: {source}", path.display())]
    Store {
        /// What was attempted.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Finds plugin `plugin` in the colon-separated `cni_path`, like libcni's `FindInPath`.
pub fn find_plugin(plugin: &str, cni_path: &str) -> Result<PathBuf, DelegateError> {
    let not_found = || DelegateError::NotFound {
        plugin: plugin.to_owned(),
        cni_path: cni_path.to_owned(),
    };
    if plugin.is_empty() || plugin.contains('/') {
        return Err(not_found());
    }
    cni_path
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(not_found)
}

/// Runs the delegate with `command` (our environment otherwise, as libcni's `invoke` does)
/// and `config` on stdin; returns its stdout.
pub fn invoke(path: &Path, command: &str, config: &[u8]) -> Result<Vec<u8>, DelegateError> {
    invoke_as(path, command, config, &[])
}

/// [`invoke`] with some `CNI_*` variables replaced: GC deletes attachments the runtime did
/// not name in this invocation's environment.
#[allow(
    clippy::disallowed_methods,
    reason = "CNI delegates by exec, per the CNI spec"
)]
pub fn invoke_as(
    path: &Path,
    command: &str,
    config: &[u8],
    env: &[(&str, &str)],
) -> Result<Vec<u8>, DelegateError> {
    let exec = |source| DelegateError::Exec {
        path: path.to_owned(),
        source,
    };
    let mut child = Command::new(path)
        .env("CNI_COMMAND", command)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(exec)?;
    let mut stdin = child.stdin.take().expect("stdin was piped");
    // A delegate that exits without reading gives EPIPE here; its exit status tells more.
    // One that succeeds without reading is fine: CNI's skel answers VERSION without
    // touching stdin, so whether our write lands before it exits is a race.
    let written = stdin.write_all(config);
    drop(stdin);
    let out = child.wait_with_output().map_err(exec)?;
    if !out.status.success() {
        return Err(DelegateError::Failed {
            path: path.to_owned(),
            status: out.status,
            stdout: out.stdout,
        });
    }
    match written {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(exec(e)),
        _ => {}
    }
    Ok(out.stdout)
}

/// The CNI versions the delegate at `path` speaks (its `VERSION` answer).
pub fn supported_versions(path: &Path) -> Result<Vec<String>, DelegateError> {
    let out = invoke(path, "VERSION", br#"{"cniVersion":"1.0.0"}"#)?;
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
    Ok(v.get("supportedVersions")
        .and_then(serde_json::Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(serde_json::Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default())
}

/// Where the rendered config of `container_id` lives (upstream's layout, so a node can
/// swap plugins with pods running).
pub fn scratch_path(data_dir: &Path, container_id: &str) -> PathBuf {
    data_dir.join(container_id)
}

/// Where the interface name of `container_id`'s attachment lives: GC must name it to the
/// delegate (host-local releases by container ID *and* interface). A dot directory, because
/// a container ID never starts with a dot, so it cannot collide with a stored config.
fn ifname_path(data_dir: &Path, container_id: &str) -> PathBuf {
    data_dir.join(".ifname").join(container_id)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), DelegateError> {
    let store = |source| DelegateError::Store {
        op: "writing",
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(store)?;
    f.write_all(bytes).map_err(store)?;
    f.sync_all().map_err(store)
}

fn create_dir(dir: &Path) -> Result<(), DelegateError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| DelegateError::Store {
            op: "creating",
            path: dir.to_owned(),
            source,
        })
}

/// Stores the rendered config and the attachment's interface name (dirs 0700, files 0600,
/// fsynced) before ADD.
pub fn save(
    data_dir: &Path,
    container_id: &str,
    ifname: &str,
    config: &[u8],
) -> Result<(), DelegateError> {
    create_dir(data_dir)?;
    write_synced(&scratch_path(data_dir, container_id), config)?;
    let ifname_file = ifname_path(data_dir, container_id);
    if let Some(dir) = ifname_file.parent() {
        create_dir(dir)?;
    }
    write_synced(&ifname_file, ifname.as_bytes())
}

/// The interface name stored for `container_id`; `None` for a config stored without one
/// (by upstream's plugin, or by this one before it recorded them).
pub fn load_ifname(data_dir: &Path, container_id: &str) -> Option<String> {
    std::fs::read_to_string(ifname_path(data_dir, container_id))
        .ok()
        .filter(|s| !s.is_empty())
}

/// The container IDs with a stored config, in name order.
pub fn stored_containers(data_dir: &Path) -> Result<Vec<String>, DelegateError> {
    let entries = match std::fs::read_dir(data_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(DelegateError::Store {
                op: "listing",
                path: data_dir.to_owned(),
                source,
            });
        }
    };
    let mut ids: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    ids.sort();
    Ok(ids)
}

/// The stored config of `container_id`; `None` if there is none (DEL is idempotent).
pub fn load(data_dir: &Path, container_id: &str) -> Result<Option<Vec<u8>>, DelegateError> {
    let path = scratch_path(data_dir, container_id);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DelegateError::Store {
            op: "reading",
            path,
            source,
        }),
    }
}

/// Forgets `container_id` after a successful DEL.
pub fn remove(data_dir: &Path, container_id: &str) -> Result<(), DelegateError> {
    for path in [
        ifname_path(data_dir, container_id),
        scratch_path(data_dir, container_id),
    ] {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(DelegateError::Store {
                    op: "removing",
                    path,
                    source: e,
                });
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A delegate that exits 0 without reading its stdin (skel's VERSION does) is a
    /// success, however the race with our write goes: a config larger than a pipe buffer
    /// makes the write fail with EPIPE every time. One that fails without reading is still
    /// its failure, not an I/O error.
    #[test]
    fn a_delegate_that_answers_without_reading_stdin_is_heard() {
        let big = vec![b' '; 1 << 20];
        let out = invoke(Path::new("/bin/true"), "VERSION", &big).expect("/bin/true succeeded");
        assert!(out.is_empty());
        match invoke(Path::new("/bin/false"), "ADD", &big) {
            Err(DelegateError::Failed { status, .. }) => assert_eq!(status.code(), Some(1)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn scratch_roundtrip_and_modes() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("flannel");
        assert_eq!(load(&dir, "abc").unwrap(), None);
        assert_eq!(stored_containers(&dir).unwrap(), Vec::<String>::new());
        save(&dir, "abc", "eth0", b"{}").unwrap();
        save(&dir, "a.b", "net1", b"{}").unwrap();
        assert_eq!(load(&dir, "abc").unwrap().as_deref(), Some(&b"{}"[..]));
        assert_eq!(load_ifname(&dir, "abc").as_deref(), Some("eth0"));
        assert_eq!(load_ifname(&dir, "a.b").as_deref(), Some("net1"));
        // The interface names' directory is not a container.
        assert_eq!(stored_containers(&dir).unwrap(), ["a.b", "abc"]);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("abc")), 0o600);
        assert_eq!(mode(&dir.join(".ifname")), 0o700);
        assert_eq!(mode(&dir.join(".ifname/abc")), 0o600);
        remove(&dir, "abc").unwrap();
        remove(&dir, "abc").unwrap();
        assert_eq!(load(&dir, "abc").unwrap(), None);
        assert_eq!(load_ifname(&dir, "abc"), None);
        assert_eq!(stored_containers(&dir).unwrap(), ["a.b"]);
    }

    #[test]
    fn find_plugin_searches_path_in_order() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::write(b.path().join("bridge"), b"").unwrap();
        let path = format!("{}:{}", a.path().display(), b.path().display());
        assert_eq!(
            find_plugin("bridge", &path).unwrap(),
            b.path().join("bridge")
        );
        assert!(matches!(
            find_plugin("macvlan", &path),
            Err(DelegateError::NotFound { .. })
        ));
        assert!(find_plugin("../bridge", &path).is_err());
    }
}
