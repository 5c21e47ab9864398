//! The real `flanneld` binary's start-up behaviour against a real etcd, up to (and never
//! past) fetching the network config, so it runs in the root namespace without touching
//! any interface: command-line errors, `--version`, health endpoints while waiting for the
//! config, a clean exit on SIGTERM, and a bad config failing with the field named.
//!
//! Build the binary first: `cargo build -p flannel-agent --bin flanneld`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use flannel_e2e::etcd::EtcdServer;

const PREFIX: &str = "/flannel-startup/network";

fn flanneld() -> PathBuf {
    flannel_e2e::cluster::flanneld_bin()
}

/// A flanneld process, killed on drop.
struct Agent {
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

impl Agent {
    fn spawn(args: &[String]) -> Result<Self> {
        Self::spawn_env(args, &[])
    }

    fn spawn_env(args: &[String], env: &[(&str, String)]) -> Result<Self> {
        let log = tempfile::NamedTempFile::new()?;
        let child = Command::new(flanneld())
            .args(args)
            // No FLANNELD_* from the test environment.
            .env_clear()
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?)
            .spawn()?;
        Ok(Self {
            child: Some(child),
            log,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn wait(&mut self, within: Duration) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("already reaped")?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!(
                    "flanneld still running after {within:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own unreaped child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(args: &[&str]) -> Result<Output> {
    Ok(Command::new(flanneld()).args(args).env_clear().output()?)
}

fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn etcd_put(etcd: &EtcdServer, key: &str, value: &str) -> Result<()> {
    let (endpoint, key, value) = (etcd.endpoint(), key.to_owned(), value.to_owned());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let mut c = etcd_client::Client::connect([endpoint], None).await?;
            c.put(key, value, None).await?;
            anyhow::Ok(())
        })
}

#[test]
fn bad_command_lines_exit_2_naming_the_flag() -> Result<()> {
    for (args, needle) in [
        (&["--no-such-flag"][..], "--no-such-flag"),
        (
            &["-subnet-lease-renew-margin=0"],
            "subnet-lease-renew-margin",
        ),
        (&["--ip-masq=perhaps"], "perhaps"),
        (&["--dataplane=xdp"], "xdp"),
        (&["--public-ip=not-an-ip"], "not-an-ip"),
    ] {
        let out = run(args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    Ok(())
}

#[test]
fn version_goes_to_stderr_and_help_lists_upstream_flags() -> Result<()> {
    let out = run(&["-version"])?;
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    // The version alone on the first line, as upstream; commit and eBPF features follow.
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().next(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    let help = run(&["--help"])?;
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--etcd-endpoints",
        "--etcd-prefix",
        "--iface-regex",
        "--subnet-lease-renew-margin",
        "--kube-subnet-mgr",
        "--iptables-forward-rules",
        "--set-node-network-unavailable",
        "--dataplane",
        "FLANNELD_ETCD_ENDPOINTS",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }
    Ok(())
}

#[test]
fn waits_for_config_not_ready_then_exits_cleanly_on_sigterm() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let port = free_port()?;
    let dir = tempfile::tempdir()?;
    let subnet_file = dir.path().join("subnet.env");
    // Upstream's FLANNELD_* variables stand in for flags not given; empty ones are ignored.
    let mut agent = Agent::spawn_env(
        &[
            format!("--etcd-endpoints={}", etcd.endpoint()),
            "-healthz-ip=127.0.0.1".into(),
            format!("--subnet-file={}", subnet_file.display()),
        ],
        &[
            ("FLANNELD_ETCD_PREFIX", PREFIX.to_owned()),
            ("FLANNELD_HEALTHZ_PORT", port.to_string()),
            ("FLANNELD_HEALTHZ_IP", "0.0.0.0".to_owned()),
            ("FLANNELD_IFACE", String::new()),
        ],
    )?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // The health server comes up before the config is fetched (upstream).
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        match http_get(addr, "/healthz") {
            Ok(r) => break r,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => bail!("healthz never answered: {e}; log:\n{}", agent.log()),
        }
    };
    assert!(
        health.starts_with("HTTP/1.1 200") && health.ends_with("flanneld is running"),
        "{health}"
    );
    let ready = http_get(addr, "/readyz")?;
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.ends_with("flanneld is not ready yet"),
        "{ready}"
    );

    // No config in etcd: it keeps retrying (upstream blocks) and says why.
    std::thread::sleep(Duration::from_secs(2));
    assert!(agent.child.is_some() && agent.wait(Duration::from_millis(10)).is_err());
    let log = agent.log();
    assert!(log.contains("not found") && log.contains(PREFIX), "{log}");

    agent.signal(libc::SIGTERM);
    let status = agent.wait(Duration::from_secs(10))?;
    assert_eq!(status.code(), Some(0), "log:\n{}", agent.log());
    assert!(agent.log().contains("Exiting cleanly"), "{}", agent.log());
    assert!(!subnet_file.exists(), "no subnet.env without a lease");
    Ok(())
}

#[test]
fn invalid_config_exits_1_naming_field_and_value() -> Result<()> {
    let etcd = EtcdServer::start()?;
    for (config, needles) in [
        (
            r#"{"Network":"10.244.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}"#,
            &["SubnetLen", "31"][..],
        ),
        (r#"{"Network":"10.244.0.0/16"}"#, &["Backend", "udp"]),
        (
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"ipsec"}}"#,
            &["Backend.Type", "ipsec"],
        ),
        (
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":"one"}}"#,
            &["Backend.VNI", "one"],
        ),
        (
            r#"{"Network":"banana","Backend":{"Type":"vxlan"}}"#,
            &["Network", "banana"],
        ),
    ] {
        etcd_put(&etcd, &format!("{PREFIX}/config"), config)?;
        let dir = tempfile::tempdir()?;
        let mut agent = Agent::spawn(&[
            format!("--etcd-endpoints={}", etcd.endpoint()),
            format!("--etcd-prefix={PREFIX}"),
            format!("--subnet-file={}", dir.path().join("subnet.env").display()),
        ])?;
        let status = agent.wait(Duration::from_secs(15))?;
        let log = agent.log();
        assert_eq!(status.code(), Some(1), "{config}: {log}");
        for n in needles {
            assert!(log.contains(n), "{config}: log does not name {n:?}:\n{log}");
        }
    }
    Ok(())
}
