//! `subnet.env`: the file the CNI plugin (and `mk-docker-opts.sh`) read to learn this host's
//! subnet and MTU. Wire format: the CNI plugin is a strict line parser, so the variable
//! names, order and `KEY=VALUE\n` shape are exactly upstream's `WriteSubnetFile`.

use std::{
    fs,
    io::Write,
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use ipnetwork::{Ipv4Network, Ipv6Network};

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

/// What goes into `subnet.env`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK` (IPv4 enabled).
    pub network: Option<Ipv4Network>,
    /// Own IPv4 subnet; written as base+1 (`10.244.1.1/24`).
    pub subnet: Option<Ipv4Network>,
    /// `FLANNEL_IPV6_NETWORK` (IPv6 enabled).
    pub ipv6_network: Option<Ipv6Network>,
    /// Own IPv6 subnet; written as base+1.
    pub ipv6_subnet: Option<Ipv6Network>,
    /// `FLANNEL_MTU`.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ` (`--ip-masq`).
    pub ip_masq: bool,
}

impl SubnetEnv {
    /// The file's exact contents.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(n) = self.network {
            out += &format!("FLANNEL_NETWORK={n}\n");
        }
        if let Some(s) = self.subnet {
            let first = Ipv4Addr::from(u32::from(s.network()).wrapping_add(1));
            out += &format!("FLANNEL_SUBNET={first}/{}\n", s.prefix());
        }
        if let Some(n) = self.ipv6_network {
            out += &format!("FLANNEL_IPV6_NETWORK={n}\n");
        }
        if let Some(s) = self.ipv6_subnet {
            let first = Ipv6Addr::from(u128::from(s.network()).wrapping_add(1));
            out += &format!("FLANNEL_IPV6_SUBNET={first}/{}\n", s.prefix());
        }
        out += &format!("FLANNEL_MTU={}\n", self.mtu);
        out += &format!("FLANNEL_IPMASQ={}\n", self.ip_masq);
        out
    }
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
    let mut prev = PreviousSubnets::default();
    for line in text.lines() {
        let line = line.trim();
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
        if value.contains(',') {
            continue;
        }
        match key.trim() {
            "FLANNEL_SUBNET" => prev.subnet = parse_v4(value),
            "FLANNEL_IPV6_SUBNET" => prev.ipv6_subnet = parse_v6(value),
            "FLANNEL_NETWORK" => prev.network = parse_v4(value),
            "FLANNEL_IPV6_NETWORK" => prev.ipv6_network = parse_v6(value),
            _ => {}
        }
    }
    prev
}

fn parse_v4(s: &str) -> Option<Ipv4Network> {
    let n: Ipv4Network = s.parse().ok()?;
    Ipv4Network::new(n.network(), n.prefix()).ok()
}

fn parse_v6(s: &str) -> Option<Ipv6Network> {
    let n: Ipv6Network = s.parse().ok()?;
    Ipv6Network::new(n.network(), n.prefix()).ok()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn upstream_format_v4_and_dual_stack() {
        let env = SubnetEnv {
            network: Some("10.244.0.0/16".parse().unwrap()),
            subnet: Some("10.244.1.0/24".parse().unwrap()),
            ipv6_network: None,
            ipv6_subnet: None,
            mtu: 1450,
            ip_masq: true,
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        let dual = SubnetEnv {
            ipv6_network: Some("2001:cafe:42::/56".parse().unwrap()),
            ipv6_subnet: Some("2001:cafe:42::/64".parse().unwrap()),
            ip_masq: false,
            ..env
        };
        assert_eq!(
            dual.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n\
             FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn atomic_write_mode_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        let env = SubnetEnv {
            network: Some("10.5.0.0/16".parse().unwrap()),
            subnet: Some("10.5.72.0/24".parse().unwrap()),
            ipv6_network: Some("fd00::/48".parse().unwrap()),
            ipv6_subnet: Some("fd00:0:0:3::/64".parse().unwrap()),
            mtu: 1400,
            ip_masq: false,
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
