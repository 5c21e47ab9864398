//! `deploy/kube-flannel-rs.yml` checked against the code it deploys: every document parses
//! as its Kubernetes type (and round-trips, so a misspelt field cannot hide), the flags
//! parse with flanneld's real CLI, the probes hit paths the real health server answers,
//! and the mounts cover the paths flanneld and the CNI plugin use by default.

use std::path::Path;

use flannel_agent::{
    cli::Cli,
    cni::config::{DEFAULT_SUBNET_FILE, NetConf, parse_subnet_env, render_delegate},
    netconf::{BackendConfig, NetworkConfig},
    server::{Readiness, router},
};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, ServiceAccount, Volume},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

#[derive(Default)]
struct Manifest {
    namespace: Option<Namespace>,
    service_account: Option<ServiceAccount>,
    role: Option<ClusterRole>,
    binding: Option<ClusterRoleBinding>,
    config: Option<ConfigMap>,
    daemonset: Option<DaemonSet>,
}

/// Parses `doc` as `T` and checks serialising it gives the document back: fields the type
/// does not know (typos) would be dropped and show up here.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> T {
    let t: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", doc["kind"]));
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(
        &back, doc,
        "{} does not round-trip (unknown or misspelt field?)",
        doc["kind"]
    );
    t
}

fn load() -> Manifest {
    let text = std::fs::read_to_string(root().join("deploy/kube-flannel-rs.yml")).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("valid multi-document YAML");
    let mut m = Manifest::default();
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        match doc["kind"].as_str().unwrap() {
            "Namespace" => m.namespace = Some(typed(&doc)),
            "ServiceAccount" => m.service_account = Some(typed(&doc)),
            "ClusterRole" => m.role = Some(typed(&doc)),
            "ClusterRoleBinding" => m.binding = Some(typed(&doc)),
            "ConfigMap" => m.config = Some(typed(&doc)),
            "DaemonSet" => m.daemonset = Some(typed(&doc)),
            other => panic!("unexpected kind {other}"),
        }
    }
    m
}

fn container<'a>(cs: &'a [Container], name: &str) -> &'a Container {
    cs.iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The host path behind the volume `c` mounts at `mount_path`.
fn host_path_of(c: &Container, volumes: &[Volume], mount_path: &str) -> Option<String> {
    let mount = c
        .volume_mounts
        .as_ref()?
        .iter()
        .find(|m| m.mount_path.trim_end_matches('/') == mount_path)?;
    let vol = volumes.iter().find(|v| v.name == mount.name)?;
    vol.host_path.as_ref().map(|h| h.path.clone())
}

#[test]
fn rbac_is_least_privilege_and_bound() {
    let m = load();
    let ns = m.namespace.unwrap();
    assert_eq!(ns.metadata.name.as_deref(), Some("kube-flannel"));
    let sa = m.service_account.unwrap();
    assert_eq!(sa.metadata.name.as_deref(), Some("flannel"));
    let rules: Vec<(Vec<String>, Vec<String>)> = m
        .role
        .unwrap()
        .rules
        .unwrap()
        .into_iter()
        .map(|r| (r.resources.unwrap(), r.verbs))
        .collect();
    let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        rules,
        vec![
            (s(&["nodes"]), s(&["get", "list", "watch"])),
            (s(&["nodes/status"]), s(&["patch"])),
        ]
    );
    let b = m.binding.unwrap();
    assert_eq!(b.role_ref.name, "flannel");
    let subj = &b.subjects.unwrap()[0];
    assert_eq!(
        (subj.name.as_str(), subj.namespace.as_deref()),
        ("flannel", Some("kube-flannel"))
    );
}

#[test]
fn configmap_parses_with_our_parsers() {
    let data = load().config.unwrap().data.unwrap();
    let net = NetworkConfig::parse(&data["net-conf.json"]).unwrap();
    assert_eq!(net.network.unwrap().to_string(), "10.244.0.0/16");
    assert!(matches!(net.backend, BackendConfig::Vxlan(_)));
    assert!(
        net.enable_nftables,
        "the manifest uses our default, nftables"
    );

    // The conflist's flannel entry, as libcni hands it to the plugin, renders the same
    // bridge config upstream's plugin would.
    let list: Value = serde_json::from_str(&data["cni-conf.json"]).unwrap();
    assert_eq!(list["name"], "cbr0");
    let mut entry = list["plugins"][0].clone();
    assert_eq!(entry["type"], "flannel");
    assert_eq!(list["plugins"][1]["type"], "portmap");
    entry["name"] = list["name"].clone();
    entry["cniVersion"] = list["cniVersion"].clone();
    let conf = NetConf::parse(entry.to_string().as_bytes()).unwrap();
    let env = parse_subnet_env(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        Path::new("subnet.env"),
    )
    .unwrap();
    assert_eq!(
        Value::Object(render_delegate(&conf, &env)),
        json!({
            "cniVersion": "0.3.1", "name": "cbr0", "type": "bridge",
            "hairpinMode": true, "isDefaultGateway": true, "isGateway": true,
            "ipMasq": false, "mtu": 1450,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]],
                     "routes": [{"dst": "10.244.0.0/16"}]}
        })
    );
}

fn flanneld_cli(c: &Container) -> Cli {
    let mut argv = c.command.clone().unwrap();
    argv.extend(c.args.clone().unwrap_or_default());
    Cli::try_from_args(&argv).unwrap_or_else(|e| panic!("flanneld rejects {argv:?}: {e}"))
}

#[test]
fn daemonset_flags_mounts_and_env_match_the_code() {
    let ds = load().daemonset.unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("flannel"));
    let volumes = pod.volumes.clone().unwrap();
    let main = container(&pod.containers, "kube-flannel");

    assert_eq!(
        main.command.as_deref(),
        Some(&["/opt/bin/flanneld".to_owned()][..])
    );
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    assert!(dockerfile.contains("/opt/bin/flanneld") && dockerfile.contains("/opt/bin/flannel\n"));

    let cli = flanneld_cli(main);
    assert!(cli.ip_masq);
    assert!(cli.kube_subnet_mgr);
    assert_eq!(cli.healthz_port, 8081);
    let port = main
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some("healthz"));
    assert_eq!(port.unwrap().container_port, i32::from(cli.healthz_port));

    // Mounts cover the defaults flanneld (and the CNI plugin) use.
    let subnet_dir = cli
        .subnet_file
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(cli.subnet_file, Path::new(DEFAULT_SUBNET_FILE));
    assert_eq!(subnet_dir, "/run/flannel");
    assert_eq!(
        host_path_of(main, &volumes, &subnet_dir).as_deref(),
        Some("/run/flannel")
    );
    assert!(
        cli.bpf_pin_path.starts_with("/sys/fs/bpf"),
        "{:?}",
        cli.bpf_pin_path
    );
    assert_eq!(
        host_path_of(main, &volumes, "/sys/fs/bpf").as_deref(),
        Some("/sys/fs/bpf")
    );
    assert_eq!(
        host_path_of(main, &volumes, "/run/xtables.lock").as_deref(),
        Some("/run/xtables.lock")
    );
    let cfg_dir = cli.net_config_path.parent().unwrap().to_str().unwrap();
    let cfg_mount = main
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path.trim_end_matches('/') == cfg_dir)
        .expect("net-conf.json directory is mounted");
    let cfg_vol = volumes.iter().find(|v| v.name == cfg_mount.name).unwrap();
    assert_eq!(
        cfg_vol.config_map.as_ref().unwrap().name,
        "kube-flannel-cfg"
    );
    assert_eq!(cli.net_config_path.file_name().unwrap(), "net-conf.json");

    // The bpffs is the host's: mounted by a privileged init container with Bidirectional
    // propagation, seen by the agent.
    let init = pod.init_containers.clone().unwrap();
    let mount_bpf = container(&init, "mount-bpffs");
    let m = &mount_bpf.volume_mounts.as_ref().unwrap()[0];
    assert_eq!(
        (m.mount_path.as_str(), m.mount_propagation.as_deref()),
        ("/sys/fs/bpf", Some("Bidirectional"))
    );
    let caps = main
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap()
        .add
        .clone()
        .unwrap();
    for cap in ["NET_ADMIN", "NET_RAW", "BPF", "PERFMON"] {
        assert!(caps.iter().any(|c| c == cap), "missing capability {cap}");
    }

    // CNI installation targets the host paths the runtime reads.
    let plugin = container(&init, "install-cni-plugin");
    assert_eq!(
        host_path_of(plugin, &volumes, "/opt/cni/bin").as_deref(),
        Some("/opt/cni/bin")
    );
    assert!(
        plugin
            .command
            .as_ref()
            .unwrap()
            .join(" ")
            .contains("/opt/cni/bin/flannel")
    );
    let conf = container(&init, "install-cni");
    assert_eq!(
        host_path_of(conf, &volumes, "/etc/cni/net.d").as_deref(),
        Some("/etc/cni/net.d")
    );
    assert!(
        conf.command
            .as_ref()
            .unwrap()
            .join(" ")
            .contains("/etc/cni/net.d/10-flannel.conflist")
    );

    // Node discovery through the downward API.
    let env = main.env.as_ref().unwrap();
    let field = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(field("NODE_NAME").as_deref(), Some("spec.nodeName"));
    assert_eq!(field("POD_NAME").as_deref(), Some("metadata.name"));
    assert_eq!(
        field("POD_NAMESPACE").as_deref(),
        Some("metadata.namespace")
    );
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf.split(' ').nth(1).unwrap().parse().unwrap();
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (code, body)
}

#[tokio::test]
async fn probes_hit_the_real_health_server() {
    let ds = load().daemonset.unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let main = container(&pod.containers, "kube-flannel");
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = p.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.port, IntOrString::String("healthz".into()));
        get.path.clone().unwrap()
    };
    let live = probe_path(&main.liveness_probe);
    let ready = probe_path(&main.readiness_probe);

    let readiness = Readiness::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(readiness.clone());
    let server = tokio::spawn(async move { axum_serve(listener, app).await });
    assert_eq!(http_get(addr, &live).await.0, 200);
    assert_eq!(http_get(addr, &ready).await.0, 503);
    readiness.mark_ready();
    assert_eq!(
        http_get(addr, &ready).await,
        (200, "flanneld is ready".into())
    );

    // Prometheus' pod annotations point at the health port, where /metrics answers.
    let meta = ds_template_annotations();
    assert_eq!(meta["prometheus.io/scrape"], "true");
    let port = main
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some("healthz"))
        .unwrap()
        .container_port;
    assert_eq!(meta["prometheus.io/port"], port.to_string());
    let (code, body) = http_get(addr, &meta["prometheus.io/path"]).await;
    assert_eq!(code, 200);
    assert!(body.contains("# TYPE flannel_peers_known gauge"), "{body}");
    server.abort();
}

fn ds_template_annotations() -> std::collections::BTreeMap<String, String> {
    let ds = load().daemonset.unwrap();
    ds.spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap()
}

/// The uninstall DaemonSet runs `flanneld cleanup` with the agent's defaults, on the host
/// paths the agent uses, and removes what the install containers put in place.
#[test]
fn cleanup_daemonset_undoes_the_install() {
    let text = std::fs::read_to_string(root().join("deploy/kube-flannel-rs-cleanup.yml")).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("valid multi-document YAML");
    let ds_doc = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let _: Namespace = typed(docs.iter().find(|d| d["kind"] == "Namespace").unwrap());
    let ds: DaemonSet = typed(ds_doc);
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    let volumes = pod.volumes.clone().unwrap();
    let inits = pod.init_containers.clone().unwrap();
    let cleanup = container(&inits, "cleanup");
    let cmd = cleanup.command.clone().unwrap();
    assert_eq!(cmd[..2], ["/opt/bin/flanneld", "cleanup"]);
    // The agent's own configuration from these arguments: the defaults it cleans.
    let cli = Cli::try_from_args_env(
        std::iter::once("flanneld".to_owned()).chain(cmd[2..].iter().cloned()),
        |_| None,
    )
    .unwrap();
    let subnet_dir = cli.subnet_file.parent().unwrap().to_str().unwrap();
    assert_eq!(
        host_path_of(cleanup, &volumes, subnet_dir).as_deref(),
        Some(subnet_dir)
    );
    assert_eq!(
        host_path_of(cleanup, &volumes, "/sys/fs/bpf").as_deref(),
        Some("/sys/fs/bpf")
    );
    assert!(cli.bpf_pin_path.starts_with("/sys/fs/bpf"));
    // What install-cni and install-cni-plugin wrote goes too.
    let agent = load()
        .daemonset
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    let agent_inits = agent.init_containers.unwrap();
    let remove = container(&inits, "remove-cni")
        .command
        .clone()
        .unwrap()
        .join(" ");
    for (name, file) in [
        ("install-cni", "/etc/cni/net.d/10-flannel.conflist"),
        ("install-cni-plugin", "/opt/cni/bin/flannel"),
    ] {
        let install = container(&agent_inits, name)
            .command
            .clone()
            .unwrap()
            .join(" ");
        assert!(install.ends_with(file), "{install}");
        assert!(remove.contains(file), "{remove}");
    }
}

async fn axum_serve(listener: tokio::net::TcpListener, app: axum::Router) {
    axum::serve(listener, app).await.unwrap();
}
