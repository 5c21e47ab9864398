//! `flanneld mk-docker-opts [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m]
//! [-k COMBINED-KEY]`: upstream's `mk-docker-opts.sh` for hosts that run Docker on the
//! flannel network ("integrating with Docker" in upstream's README): Docker daemon options
//! from `subnet.env`, written as an environment file for the Docker unit.
//!
//! Same flags, defaults and output as the script: `DOCKER_OPT_BIP="--bip=10.244.7.1/24"`,
//! `DOCKER_OPT_IPMASQ="--ip-masq=false"` (when flannel masquerades, so Docker must not),
//! `DOCKER_OPT_MTU="--mtu=1450"`, and the combined `DOCKER_OPTS=" --bip=… --ip-masq=false
//! --mtu=… "` (prefixed with that variable's current value from the environment, as the
//! script's `eval` does). With neither `-i` nor `-c`, both. `-m` (no `--ip-masq`, for old
//! Docker) is listed in the script's usage but missing from its getopts; here it works.
//! Upstream's README uses `-k DOCKER_NETWORK_OPTIONS` for the systemd drop-in.

use std::{ffi::OsString, path::PathBuf};

use clap::Parser;

use crate::wire::subnet_env::{Dialect, SubnetEnv};

/// Generate Docker daemon options based on flannel env file.
#[derive(Debug, Parser)]
#[command(name = "flanneld mk-docker-opts", disable_version_flag = true)]
pub struct Args {
    /// Path to flannel env file.
    #[arg(short = 'f', default_value = "/run/flannel/subnet.env")]
    pub flannel_env: PathBuf,
    /// Path to Docker env file to write to.
    #[arg(short = 'd', default_value = "/run/docker_opts.env")]
    pub docker_env: PathBuf,
    /// Output each Docker option as individual var. e.g. DOCKER_OPT_MTU=1500
    #[arg(short = 'i')]
    pub individual: bool,
    /// Output combined Docker options into DOCKER_OPTS var
    #[arg(short = 'c')]
    pub combined: bool,
    /// Set the combined options key to this value.
    #[arg(short = 'k', default_value = "DOCKER_OPTS")]
    pub key: String,
    /// Do not output --ip-masq (useful for older Docker version)
    #[arg(short = 'm')]
    pub no_ip_masq: bool,
}

/// The Docker env file's contents. `current` is the combined key's value in the
/// environment (the script starts from it).
pub fn render(args: &Args, env: &SubnetEnv, current: &str) -> String {
    let (individual, combined) = match (args.individual, args.combined) {
        (false, false) => (true, true),
        other => other,
    };
    // Sorted by name, as the script's `compgen -v DOCKER_OPT_` lists them.
    let mut opts: Vec<(&str, String)> = Vec::new();
    if let Some(subnet) = env.subnet {
        let gateway = std::net::Ipv4Addr::from(u32::from(subnet.network()) + 1);
        opts.push((
            "DOCKER_OPT_BIP",
            format!("--bip={gateway}/{}", subnet.prefix()),
        ));
    }
    if env.ip_masq == Some(true) && !args.no_ip_masq {
        opts.push(("DOCKER_OPT_IPMASQ", "--ip-masq=false".to_owned()));
    }
    if let Some(mtu) = env.mtu {
        opts.push(("DOCKER_OPT_MTU", format!("--mtu={mtu}")));
    }
    let mut out = String::new();
    let mut all = format!("{current} ");
    for (name, value) in &opts {
        if individual {
            out += &format!("{name}=\"{value}\"\n");
        }
        all += &format!("{value} ");
    }
    if combined {
        out += &format!("{}=\"{all}\"\n", args.key);
    }
    out
}

/// Runs the subcommand with `args` (program name first).
pub fn run(args: Vec<OsString>) -> Result<(), String> {
    let args = Args::try_parse_from(args).map_err(|e| e.to_string())?;
    // A missing file gives empty options, as the script's `[ -f ] && source`.
    let text = match std::fs::read_to_string(&args.flannel_env) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("reading {}: {e}", args.flannel_env.display())),
    };
    let env = SubnetEnv::parse(&text, Dialect::Dotenv).map_err(|e| e.to_string())?;
    let current = std::env::var(&args.key).unwrap_or_default();
    std::fs::write(&args.docker_env, render(&args, &env, &current))
        .map_err(|e| format!("writing {}: {e}", args.docker_env.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("mk-docker-opts").chain(flags.iter().copied()))
            .unwrap()
    }

    const ENV: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn like_the_script() {
        let env = SubnetEnv::parse(ENV, Dialect::Dotenv).unwrap();
        assert_eq!(
            render(&args(&[]), &env, ""),
            "DOCKER_OPT_BIP=\"--bip=10.244.7.1/24\"\n\
             DOCKER_OPT_IPMASQ=\"--ip-masq=false\"\n\
             DOCKER_OPT_MTU=\"--mtu=1450\"\n\
             DOCKER_OPTS=\" --bip=10.244.7.1/24 --ip-masq=false --mtu=1450 \"\n"
        );
        assert_eq!(
            render(
                &args(&["-c", "-m", "-k", "DOCKER_NETWORK_OPTIONS"]),
                &env,
                "--debug"
            ),
            "DOCKER_NETWORK_OPTIONS=\"--debug --bip=10.244.7.1/24 --mtu=1450 \"\n"
        );
        assert_eq!(
            render(&args(&["-i"]), &env, ""),
            "DOCKER_OPT_BIP=\"--bip=10.244.7.1/24\"\n\
             DOCKER_OPT_IPMASQ=\"--ip-masq=false\"\n\
             DOCKER_OPT_MTU=\"--mtu=1450\"\n"
        );
        // No masquerade by flannel: Docker keeps its own.
        let no_masq = SubnetEnv::parse(&ENV.replace("true", "false"), Dialect::Dotenv).unwrap();
        assert!(!render(&args(&[]), &no_masq, "").contains("ip-masq"));
        // No file: empty options.
        assert_eq!(
            render(&args(&[]), &SubnetEnv::default(), ""),
            "DOCKER_OPTS=\" \"\n"
        );
    }
}
