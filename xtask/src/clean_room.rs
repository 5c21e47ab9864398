//! `cargo xtask clean-room`: the README's two commands on a machine that has only what the
//! README asks for. A minimal Debian root of this machine's release (debootstrap) gets a
//! fresh clone of HEAD, the rustup toolchains read-only, an empty cargo home (so setup
//! builds bpf-linker and fetches every crate itself) and fresh /proc, /sys, /run; the
//! commands run in it through chroot. Each step is timed; a failure names its step.
//!
//! Everything runs in a private mount namespace, so no mount is ever visible outside this
//! process tree and none outlives it. On every exit path (success, error, SIGINT/SIGTERM)
//! the processes in the root are killed, its mounts detached in reverse order and the root
//! removed; only debootstrap's package cache under `target/clean-room/debs` is kept.

use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicI32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{setup, util};

/// What a machine has once rustup is installed and works: cargo fetches over TLS
/// (ca-certificates) and every Rust build links with `cc` (gcc, libc6-dev). Nothing else
/// beyond debootstrap's minimal base; `cargo xtask setup` must bring the rest.
const PREREQUISITES: &str = "ca-certificates,gcc,libc6-dev";

/// Where the clone lives inside the root.
const CLONE: &str = "/root/flannel-rs";

/// The signal that asked us to stop, 0 while none did.
static STOP: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    STOP.store(sig, Ordering::SeqCst);
}

pub fn run(quick: bool) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("clean-room needs root (debootstrap, mount, chroot)");
    }
    install_signal_handlers();
    private_mount_namespace()?;
    let workspace = util::workspace_root();
    let base = workspace.join("target/clean-room");
    let cache = base.join("debs");
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let root = base.join("root");
    if root.exists() {
        let root = root.canonicalize()?;
        eprintln!(
            "clean-room: removing {} left by an earlier run",
            root.display()
        );
        remove_root(&root)?;
    }
    let release = release_codename()?;

    let mut steps = Steps::default();
    let result = (|| {
        let room = Room::create(&root)?;
        let root = room.root.clone();
        let root = root.as_path();
        steps.run("debootstrap", || debootstrap(&release, root, &cache))?;
        steps.run("clone HEAD, toolchains, trust store, mounts", || {
            clone_head(&workspace, root)?;
            toolchains(root)?;
            mounts(root)?;
            trust_store(root)
        })?;
        let commands: &[&[&str]] = if quick {
            &[
                &["cargo", "xtask", "build"],
                &["cargo", "test", "--lib", "--bins"],
            ]
        } else {
            &[
                &["cargo", "xtask", "demo", "--no-wait"],
                &["cargo", "xtask", "test"],
            ]
        };
        for command in commands {
            steps.run(&command.join(" "), || in_root(root, command))?;
        }
        steps.run("cleanup", move || room.remove())
    })();
    steps.print();
    result?;
    if let Some(sig) = stopped() {
        bail!("interrupted by signal {sig}");
    }
    eprintln!("clean-room: passed");
    Ok(())
}

/// Steps and how long each took.
#[derive(Default)]
struct Steps(Vec<(String, Duration, bool)>);

impl Steps {
    fn run(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        if let Some(sig) = stopped() {
            bail!("interrupted by signal {sig} before step `{name}`");
        }
        eprintln!("\n==> clean-room step `{name}`");
        let start = Instant::now();
        let result = f();
        let took = start.elapsed();
        self.0.push((name.to_owned(), took, result.is_ok()));
        eprintln!("<== `{name}`: {:.1} s", took.as_secs_f64());
        result.with_context(|| {
            format!(
                "clean-room step `{name}` failed after {:.1} s",
                took.as_secs_f64()
            )
        })
    }

    fn print(&self) {
        eprintln!("\nclean-room steps:");
        for (name, took, ok) in &self.0 {
            let verdict = if *ok { "ok" } else { "FAILED" };
            eprintln!("  {name:<46} {:>8.1} s  {verdict}", took.as_secs_f64());
        }
    }
}

/// The root directory; dropping it (on any path) tears everything in it down.
struct Room {
    root: PathBuf,
    removed: bool,
}

impl Room {
    fn create(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let root = root.canonicalize()?;
        Ok(Self {
            root,
            removed: false,
        })
    }

    fn remove(mut self) -> Result<()> {
        self.removed = true;
        remove_root(&self.root)
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        if !self.removed
            && let Err(e) = remove_root(&self.root)
        {
            eprintln!("clean-room: cleanup: {e:#}");
        }
    }
}

/// Kills every process whose root is `root`, detaches every mount under it (last mounted
/// first) and deletes it. Refuses to delete while anything is still mounted there: that
/// would recurse into /dev or the toolchains.
fn remove_root(root: &Path) -> Result<()> {
    kill_processes_in(root);
    let mounts = mounts_under(root)?;
    for mount in mounts.iter().rev() {
        let path = CString::new(mount.as_os_str().as_bytes())?;
        // SAFETY: path is a valid C string; MNT_DETACH (lazy) cannot block on busy mounts.
        // A mount already detached along with its parent fails with EINVAL; harmless.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
    let left = mounts_under(root)?;
    if !left.is_empty() {
        bail!(
            "still mounted under {}, not deleting it: {left:?}",
            root.display()
        );
    }
    std::fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
    eprintln!(
        "clean-room: removed {} ({} mounts detached)",
        root.display(),
        mounts.len()
    );
    Ok(())
}

/// Mount points at or below `root`, in mount order (/proc/self/mountinfo's order).
fn mounts_under(root: &Path) -> Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(root))
        .collect())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// SIGTERM, then SIGKILL, to every process chrooted into `root` (all of them ours: only
/// this task's chroot puts processes there).
fn kill_processes_in(root: &Path) {
    let kill_all = |signal| {
        let pids = processes_in(root);
        for &pid in &pids {
            // SAFETY: plain kill(2) on a pid we just read.
            unsafe { libc::kill(pid, signal) };
        }
        pids.is_empty()
    };
    if kill_all(libc::SIGTERM) {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !processes_in(root).is_empty() {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Parents may fork while they die: repeat until nothing is left.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !kill_all(libc::SIGKILL) {
        if Instant::now() > deadline {
            eprintln!(
                "clean-room: processes still in the root: {:?}",
                processes_in(root)
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn processes_in(root: &Path) -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/root")).is_ok_and(|r| r.starts_with(root))
        })
        .collect()
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

fn stopped() -> Option<i32> {
    match STOP.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// Our own mount namespace with private propagation: mounts made for the root are not seen
/// by anyone else, and vanish with this process tree even if it is killed.
fn private_mount_namespace() -> Result<()> {
    // SAFETY: unshare and mount with constant, valid arguments; we are single-threaded.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNS)");
        }
        let flags = libc::MS_REC | libc::MS_PRIVATE;
        if libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("making / private");
        }
    }
    Ok(())
}

/// This machine's Debian release (`VERSION_CODENAME` in /etc/os-release).
fn release_codename() -> Result<String> {
    let os = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    let field = |key: &str| {
        os.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim_matches('"').to_owned())
    };
    if field("ID").as_deref() != Some("debian") {
        bail!(
            "clean-room builds a Debian root; /etc/os-release says ID={:?}",
            field("ID")
        );
    }
    field("VERSION_CODENAME").context("/etc/os-release has no VERSION_CODENAME")
}

fn debootstrap(release: &str, root: &Path, cache: &Path) -> Result<()> {
    setup::install_packages(&[("debootstrap", "/usr/sbin/debootstrap")])?;
    let mut cmd = Command::new("debootstrap");
    cmd.arg("--variant=minbase")
        .arg(format!("--include={PREREQUISITES}"))
        .arg(format!("--cache-dir={}", cache.canonicalize()?.display()))
        .arg(release)
        .arg(root);
    run_cmd(cmd)
}

/// A fresh clone of HEAD (committed work only: that is what a user clones).
fn clone_head(workspace: &Path, root: &Path) -> Result<()> {
    let head = util::output(
        "git",
        &["-C", &workspace.to_string_lossy(), "rev-parse", "HEAD"],
    )?;
    let dirty = util::output(
        "git",
        &["-C", &workspace.to_string_lossy(), "status", "--porcelain"],
    )?;
    if !dirty.trim().is_empty() {
        eprintln!("clean-room: uncommitted changes are not in the clean room (it clones HEAD)");
    }
    let dest = inside(root, CLONE);
    let mut clone = Command::new("git");
    clone
        .args(["clone", "--quiet", "--no-checkout"])
        .arg(workspace)
        .arg(&dest);
    run_cmd(clone)?;
    let mut checkout = Command::new("git");
    checkout
        .arg("-C")
        .arg(&dest)
        .args(["checkout", "--quiet", "--detach", head.trim()]);
    run_cmd(checkout)
}

/// The rustup installation, as `rustup-init` leaves it: the toolchains (bound read-only in
/// `mounts`, they cannot be fetched here) and a cargo home whose `bin` holds only rustup and
/// its proxies. No bpf-linker, no registry: setup and cargo must bring those.
fn toolchains(root: &Path) -> Result<()> {
    let cargo_bin = setup::cargo_home()?.join("bin");
    let rustup = cargo_bin.join("rustup");
    let bin = inside(root, "/root/.cargo/bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(inside(root, "/root/.rustup"))?;
    std::fs::copy(&rustup, bin.join("rustup"))
        .with_context(|| format!("copying {}", rustup.display()))?;
    let rustup_file = std::fs::metadata(&rustup)?;
    for entry in std::fs::read_dir(&cargo_bin)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "rustup" {
            continue;
        }
        // A proxy is a link to rustup (symlink, or hard link as rustup-init makes them).
        use std::os::unix::fs::MetadataExt as _;
        let is_proxy = std::fs::metadata(entry.path())
            .is_ok_and(|m| m.ino() == rustup_file.ino() && m.dev() == rustup_file.dev());
        if is_proxy {
            std::os::unix::fs::symlink("rustup", bin.join(&name))?;
        }
    }
    Ok(())
}

/// The CAs this machine trusts beyond Debian's (an intercepting proxy's, say: its network
/// needs them and no package brings them), added the Debian way, one file each, so a
/// ca-certificates trigger during setup's apt run keeps them.
fn trust_store(root: &Path) -> Result<()> {
    const BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let ours = read(&inside(root, BUNDLE))?;
    let known: Vec<&str> = pem_certificates(&ours).collect();
    let host = read(Path::new(BUNDLE))?;
    let extra: Vec<&str> = pem_certificates(&host)
        .filter(|c| !known.contains(c))
        .collect();
    if extra.is_empty() {
        return Ok(());
    }
    eprintln!(
        "clean-room: adding this machine's {} extra CA(s) to the root",
        extra.len()
    );
    let dir = inside(root, "/usr/local/share/ca-certificates");
    for (i, cert) in extra.iter().enumerate() {
        std::fs::write(dir.join(format!("host-{i}.crt")), format!("{cert}\n"))?;
    }
    let mut update = Command::new("chroot");
    update.arg(root).arg("update-ca-certificates");
    run_cmd(update)
}

/// The PEM certificate blocks in a bundle, each from BEGIN to END line.
fn pem_certificates(bundle: &str) -> impl Iterator<Item = &str> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    bundle.match_indices(BEGIN).filter_map(|(start, _)| {
        let len = bundle[start..].find(END)? + END.len();
        Some(&bundle[start..start + len])
    })
}

fn rustup_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("RUSTUP_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME").context("neither RUSTUP_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".rustup"))
}

/// What a booted machine has mounted, fresh where it can be (so the root's bpffs is its
/// own, mounted by setup, and `ip netns` gets its own /run), bound from here where not.
fn mounts(root: &Path) -> Result<()> {
    let at = |p: &str| inside(root, p).to_string_lossy().into_owned();
    let rustup = rustup_home()?.to_string_lossy().into_owned();
    let mounts: [&[&str]; 5] = [
        &["-t", "proc", "proc", &at("/proc")],
        &["-t", "sysfs", "sysfs", &at("/sys")],
        &["--rbind", "/dev", &at("/dev")],
        &["-t", "tmpfs", "tmpfs", &at("/run")],
        &["--bind", "-o", "ro", &rustup, &at("/root/.rustup")],
    ];
    for args in mounts {
        let mut cmd = Command::new("mount");
        cmd.args(args);
        run_cmd(cmd)?;
    }
    Ok(())
}

/// `command` in the clone inside the root, with the environment of a root login.
fn in_root(root: &Path, command: &[&str]) -> Result<()> {
    let mut cmd = Command::new("chroot");
    cmd.arg(root)
        .args(["/usr/bin/env", "-C", CLONE])
        .args(command)
        .env_clear()
        .env("HOME", "/root")
        .env("USER", "root")
        .env("LANG", "C.UTF-8")
        .env(
            "PATH",
            "/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    if let Some(term) = std::env::var_os("TERM") {
        cmd.env("TERM", term);
    }
    run_cmd(cmd)
}

fn inside(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Runs `cmd` in its own process group and waits; a SIGINT/SIGTERM we receive is passed on
/// to that group (the demo and the tests tear down on it), then the group is killed if it
/// does not stop within 30 s.
fn run_cmd(mut cmd: Command) -> Result<()> {
    let shown = format!("{cmd:?}").replace('"', "");
    eprintln!("+ {shown}");
    let mut child = cmd
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawning {shown}"))?;
    let pgid = child.id() as libc::pid_t;
    let mut forwarded: Option<Instant> = None;
    loop {
        if let Some(st) = child.try_wait()? {
            if let Some(sig) = stopped() {
                bail!("`{shown}` interrupted by signal {sig} ({st})");
            }
            if !st.success() {
                bail!("`{shown}` failed ({st})");
            }
            return Ok(());
        }
        match (stopped(), forwarded) {
            (Some(sig), None) => {
                // SAFETY: kill(2) on the process group we created.
                unsafe { libc::kill(-pgid, sig) };
                forwarded = Some(Instant::now());
            }
            (Some(_), Some(at)) if at.elapsed() > Duration::from_secs(30) => {
                // SAFETY: as above.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_blocks() {
        let bundle = "x\n-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n\
                      -----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n\
                      -----BEGIN CERTIFICATE-----\ntruncated";
        let certs: Vec<_> = pem_certificates(bundle).collect();
        assert_eq!(
            certs,
            [
                "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----",
                "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----",
            ]
        );
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b\011c"), "/a b\tc");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/odd\x"), r"/odd\x");
    }
}
