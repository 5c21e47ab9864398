//! `subnet.env` on disk: written atomically by the agent, and its previous contents read
//! back at start. The format itself is [`crate::wire::subnet_env`].

use std::{
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use ipnetwork::{Ipv4Network, Ipv6Network};

use crate::wire::subnet_env::Dialect;
pub use crate::wire::subnet_env::SubnetEnv;

/// Why `subnet.env` could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Any I/O step failed.
    #[error("writing {path}: {step}: {source}")]
    Io {
        /// The file (or directory) involved.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Writes `subnet.env` atomically: a temp file in the same directory, fsync, mode 0644
/// regardless of umask, rename over the target, fsync the directory. A reader (the CNI
/// plugin, run concurrently by the kubelet) sees the old file or the new one, never half.
pub fn write(path: &Path, env: &SubnetEnv) -> Result<(), Error> {
    let io = |step: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io {
            path: p,
            step,
            source,
        }
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(io("creating parent directory", dir))?;
    let name = path
        .file_name()
        .map_or_else(|| "subnet.env".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp).map_err(io("creating temp file", &tmp))?;
        f.write_all(env.render().as_bytes())
            .map_err(io("writing temp file", &tmp))?;
        f.set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(io("setting mode 0644", &tmp))?;
        f.sync_all().map_err(io("syncing temp file", &tmp))?;
        fs::rename(&tmp, path).map_err(io("renaming temp file into place", path))?;
        if let Ok(d) = fs::File::open(dir) {
            // Durability of the rename; not fatal where directories cannot be synced.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The previous run's subnets, for lease reuse after a restart (upstream reads these with
/// godotenv before building the etcd manager).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PreviousSubnets {
    /// `FLANNEL_SUBNET`, masked to the network address.
    pub subnet: Option<Ipv4Network>,
    /// `FLANNEL_IPV6_SUBNET`, masked.
    pub ipv6_subnet: Option<Ipv6Network>,
    /// `FLANNEL_NETWORK`.
    pub network: Option<Ipv4Network>,
    /// `FLANNEL_IPV6_NETWORK`.
    pub ipv6_network: Option<Ipv6Network>,
}

/// Reads the variables of a previous `subnet.env`. A missing or unreadable file, a missing
/// variable, a comma-separated list or an unparsable value all mean "none" (upstream).
pub fn read_previous(path: &Path) -> PreviousSubnets {
    let Ok(text) = fs::read_to_string(path) else {
        return PreviousSubnets::default();
    };
    let env = SubnetEnv::parse(&text, Dialect::Dotenv).unwrap_or_default();
    PreviousSubnets {
        subnet: env.subnet,
        ipv6_subnet: env.ipv6_subnet,
        network: env.network(),
        ipv6_network: env.ipv6_network(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn atomic_write_mode_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        let env = SubnetEnv {
            networks: vec!["10.5.0.0/16".parse().unwrap()],
            subnet: Some("10.5.72.0/24".parse().unwrap()),
            ipv6_networks: vec!["fd00::/48".parse().unwrap()],
            ipv6_subnet: Some("fd00:0:0:3::/64".parse().unwrap()),
            mtu: Some(1400),
            ip_masq: Some(false),
        };
        // A restrictive umask must not leak into the file mode.
        let old = unsafe { libc::umask(0o077) };
        let res = write(&path, &env);
        unsafe { libc::umask(old) };
        res.unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o644);
        write(&path, &env).unwrap();
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temp file left behind");
        let prev = read_previous(&path);
        assert_eq!(prev.subnet, Some("10.5.72.0/24".parse().unwrap()));
        assert_eq!(prev.ipv6_subnet, Some("fd00:0:0:3::/64".parse().unwrap()));
        assert_eq!(prev.network, Some("10.5.0.0/16".parse().unwrap()));
    }

    #[test]
    fn previous_none_cases() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            read_previous(&dir.path().join("missing")),
            PreviousSubnets::default()
        );
        let p = dir.path().join("s.env");
        fs::write(
            &p,
            "FLANNEL_SUBNET=10.1.1.1/24,10.2.1.1/24\nFLANNEL_IPV6_SUBNET=bogus\n",
        )
        .unwrap();
        assert_eq!(read_previous(&p), PreviousSubnets::default());
        fs::write(&p, "export FLANNEL_SUBNET=\"10.1.1.1/24\"\n").unwrap();
        assert_eq!(
            read_previous(&p).subnet,
            Some("10.1.1.0/24".parse().unwrap())
        );
    }
}
