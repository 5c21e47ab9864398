//! A real etcd server for tests: Debian's `etcd` on free 127.0.0.1 ports with a temporary
//! data directory, killed (and its directory removed) when the guard drops. It can be
//! stopped and started again on the same ports and data, to test reconnects.

use std::{
    fs::File,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// A running (or stopped) etcd: a single-member cluster, or one member of an
/// [`EtcdCluster`].
pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    starts: u32,
    tls: Option<TlsFiles>,
    /// Member name and `--initial-cluster`, when part of a multi-member cluster.
    member: Option<(String, String)>,
}

/// A multi-member etcd cluster on 127.0.0.1, each member an [`EtcdServer`].
pub struct EtcdCluster {
    /// The members, in `--initial-cluster` order.
    pub members: Vec<EtcdServer>,
}

impl EtcdCluster {
    /// Starts `n` members on free ports and waits until every one answers `/health`
    /// (which needs a quorum, so all are launched before any is waited for).
    pub fn start(n: usize) -> anyhow::Result<Self> {
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let initial = initial.join(",");
        let mut members = Vec::new();
        for (i, (client_port, peer_port)) in ports.into_iter().enumerate() {
            let mut m = EtcdServer {
                child: None,
                dir: tempfile::Builder::new().prefix("flannel-etcd-").tempdir()?,
                client_port,
                peer_port,
                starts: 0,
                tls: None,
                member: Some((format!("m{i}"), initial.clone())),
            };
            m.launch()?;
            members.push(m);
        }
        for m in &mut members {
            m.wait_healthy()?;
        }
        Ok(Self { members })
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::endpoint).collect()
    }
}

/// A throw-away CA with a server certificate for 127.0.0.1 and a client certificate, made
/// with the `openssl` CLI, for TLS tests.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// Server certificate (SAN IP:127.0.0.1).
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Client certificate (CN=root).
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Generates everything under `dir`.
    pub fn generate(dir: &std::path::Path) -> anyhow::Result<Self> {
        let p = |n: &str| dir.join(n);
        let openssl = |args: &[&str]| -> anyhow::Result<()> {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()?;
            if !out.status.success() {
                bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=flannel-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])?;
        for (name, cn, ext) in [
            (
                "server",
                "127.0.0.1",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
            ),
            (
                "client",
                "root",
                "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
            ),
        ] {
            std::fs::write(p(&format!("{name}.ext")), ext)?;
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ])?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
            ])?;
        }
        Ok(Self {
            ca: p("ca.crt"),
            server_cert: p("server.crt"),
            server_key: p("server.key"),
            client_cert: p("client.crt"),
            client_key: p("client.key"),
        })
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdServer {
    /// Starts etcd and waits until it answers `/health`.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(None)
    }

    /// Starts etcd serving clients over TLS only, requiring client certificates signed by
    /// the CA of `tls`.
    pub fn start_tls(tls: TlsFiles) -> anyhow::Result<Self> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<TlsFiles>) -> anyhow::Result<Self> {
        let mut last = None;
        // Free ports can be taken between probing and binding; try a few pairs.
        for _ in 0..5 {
            let mut server = Self {
                child: None,
                dir: tempfile::Builder::new().prefix("flannel-etcd-").tempdir()?,
                client_port: free_port()?,
                peer_port: free_port()?,
                starts: 0,
                tls: tls.clone(),
                member: None,
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// The client URL, e.g. `http://127.0.0.1:40123` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// etcd's own log of the latest start (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("etcd-{}.log", self.starts))
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        self.launch()?;
        self.wait_healthy()
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = File::create(self.log_path())?;
        let mut cmd = Command::new("etcd");
        if let Some(tls) = &self.tls {
            cmd.arg(format!("--cert-file={}", tls.server_cert.display()))
                .arg(format!("--key-file={}", tls.server_key.display()))
                .arg(format!("--trusted-ca-file={}", tls.ca.display()))
                .arg("--client-cert-auth");
        }
        let (name, initial) = self
            .member
            .clone()
            .unwrap_or_else(|| ("flannel-test".to_owned(), format!("flannel-test={peer}")));
        let child = cmd
            .arg(format!("--name={name}"))
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={initial}"))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning etcd (is etcd-server installed?)")?;
        self.child = Some(child);
        Ok(())
    }

    fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!("etcd exited with {status}:\n{}", self.log());
            }
            if self.healthy() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop();
        bail!("etcd did not become healthy in 20s:\n{}", self.log())
    }

    fn healthy(&self) -> bool {
        if self.tls.is_some() {
            // No TLS client here: trust etcd's own announcement.
            return self.log().contains("serving client traffic securely");
        }
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// Kills etcd (SIGKILL: an abrupt outage) and waits for it; data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                // The old listener's port may linger for a moment.
                Err(e) if Instant::now() < deadline => {
                    eprintln!("etcd restart retry: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the process has been started and not stopped (no `&mut` needed).
    pub fn is_running_now(&self) -> bool {
        self.child.is_some()
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}
