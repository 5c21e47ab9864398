//! The CNI 1.1 verbs: STATUS (can this node serve ADD now?) and GC (drop what belongs to
//! attachments the runtime no longer knows).
//!
//! Both forward to the delegate, as the spec requires of a plugin that delegates, when the
//! delegate speaks 1.1.0. Debian's containernetworking-plugins 1.1.1 (and every release
//! before 1.5) stop at 1.0.0 and know neither verb, so for them flannel does what it can
//! itself: STATUS checks that the delegate and its IPAM plugin are installed, and GC deletes
//! each stale attachment flannel recorded at ADD through the delegate's DEL, which is how
//! `host-local` gives the address back.

use serde_json::{Value, json};

use super::{
    CniEnv, CniError, at_least, check_version, code,
    config::{Attachment, NetConf, delegate_type, read_subnet_env, render_delegate},
    delegate, stored_type,
};

/// STATUS and GC exist from CNI 1.1.0 on; libcni's skel refuses them in older configs too.
fn require_1_1(conf: &NetConf, verb: &str) -> Result<(), CniError> {
    let version = check_version(&conf.cni_version)?;
    if at_least(version, (1, 1, 0)) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("config version {version:?} does not allow {verb}"),
        ))
    }
}

fn not_available(msg: String) -> CniError {
    CniError::new(code::NOT_AVAILABLE, msg)
}

/// Whether the delegate at `path` speaks CNI 1.1.0 (and so STATUS and GC).
fn speaks_1_1(path: &std::path::Path) -> Result<bool, CniError> {
    Ok(delegate::supported_versions(path)?
        .iter()
        .any(|v| v == "1.1.0"))
}

/// STATUS: success when an ADD now would get as far as the delegate with a valid
/// configuration: flanneld has written a valid `subnet.env` (it does once it holds a lease,
/// and ADD needs it), and the delegate and its IPAM plugin are in `CNI_PATH`. Otherwise
/// error 50, saying which. A delegate that speaks 1.1.0 is asked too, and its answer is ours.
pub fn cmd_status(env: &CniEnv, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
    let conf = NetConf::parse(stdin)?;
    require_1_1(&conf, "STATUS")?;
    let subnet_env =
        read_subnet_env(&conf.subnet_file).map_err(|e| not_available(e.to_string()))?;
    let mut rendered = render_delegate(&conf, &subnet_env);
    let plugin = delegate_type(&rendered);
    let ipam = rendered
        .get("ipam")
        .and_then(|i| i.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("host-local")
        .to_owned();
    let path = delegate::find_plugin(&plugin, &env.path)
        .map_err(|e| not_available(format!("delegate: {e}")))?;
    delegate::find_plugin(&ipam, &env.path)
        .map_err(|e| not_available(format!("IPAM of the delegate: {e}")))?;
    if speaks_1_1(&path)? {
        rendered.insert("cniVersion".into(), json!("1.1.0"));
        let bytes = serde_json::to_vec(&rendered).expect("JSON values serialise");
        delegate::invoke(&path, "STATUS", &bytes)?;
    } else {
        eprintln!(
            "flannel: STATUS: delegate {} predates CNI 1.1 and has no STATUS; it and {ipam} are \
             installed",
            path.display()
        );
    }
    Ok(Vec::new())
}

/// GC: every attachment flannel stored at ADD that `cni.dev/valid-attachments` does not
/// name is deleted through its delegate, with the config ADD used, `CNI_NETNS` empty (the
/// spec lets GC assume the namespace is gone; `bridge` then only releases the address) and
/// its container ID and interface; then GC goes on to the delegate if it speaks 1.1.0, so it
/// can drop what flannel never recorded. Errors do not stop the sweep; they are reported
/// together at the end.
///
/// What GC cannot do with a 1.0.0 delegate: free an address whose flannel record is gone
/// (host-local's own store would have to be read, which is the delegate's business), or
/// remove `bridge`'s `ipMasq` rules (they are found through the pod's addresses; flannel
/// turns `ipMasq` off for the delegate whenever flanneld masquerades, the default).
pub fn cmd_gc(env: &CniEnv, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
    let conf = NetConf::parse(stdin)?;
    require_1_1(&conf, "GC")?;
    if env.path.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENV,
            "required env variables [CNI_PATH] missing",
        ));
    }
    let valid = valid_attachments(&conf);
    let mut errors = Vec::new();
    let stored = delegate::stored_containers(&conf.data_dir)?;
    for id in &stored {
        // Configs stored without an interface name (by upstream's plugin) are on eth0, the
        // name every Kubernetes runtime gives the pod's interface.
        let ifname = delegate::load_ifname(&conf.data_dir, id).unwrap_or_else(|| "eth0".into());
        if valid
            .iter()
            .any(|a| a.container_id == *id && a.ifname == ifname)
        {
            continue;
        }
        if let Err(e) = delete_stale(&conf, env, id, &ifname) {
            errors.push(format!("{id}/{ifname}: {e}"));
        }
    }
    if let Err(e) = forward_gc(&conf, env) {
        errors.push(format!("delegate GC: {e}"));
    }
    if errors.is_empty() {
        return Ok(Vec::new());
    }
    Err(CniError {
        code: code::INTERNAL,
        msg: format!("GC left {} stale resource(s) behind", errors.len()),
        details: errors.join("; "),
    })
}

/// `cni.dev/valid-attachments`, or the same list under its draft name.
fn valid_attachments(conf: &NetConf) -> &[Attachment] {
    conf.valid_attachments
        .as_deref()
        .or(conf.attachments.as_deref())
        .unwrap_or_default()
}

fn delete_stale(conf: &NetConf, env: &CniEnv, id: &str, ifname: &str) -> Result<(), CniError> {
    let Some(bytes) = delegate::load(&conf.data_dir, id)? else {
        return Ok(()); // a concurrent DEL took it
    };
    if let Some(plugin) = stored_type(&bytes) {
        let path = delegate::find_plugin(&plugin, &env.path)?;
        delegate::invoke_as(
            &path,
            "DEL",
            &bytes,
            &[
                ("CNI_CONTAINERID", id),
                ("CNI_IFNAME", ifname),
                ("CNI_NETNS", ""),
            ],
        )?;
    } else {
        // Nobody can use it, DEL included (it logs and succeeds on it): garbage.
        eprintln!("flannel: GC: dropping unreadable stored config of {id}");
    }
    Ok(delegate::remove(&conf.data_dir, id)?)
}

/// GC for the delegate, when it knows the verb; its config is rendered as for ADD, so it
/// needs `subnet.env`.
fn forward_gc(conf: &NetConf, env: &CniEnv) -> Result<(), CniError> {
    let subnet_env = match read_subnet_env(&conf.subnet_file) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("flannel: GC: not forwarded to the delegate: {e}");
            return Ok(());
        }
    };
    let mut rendered = render_delegate(conf, &subnet_env);
    let plugin = delegate_type(&rendered);
    let path = delegate::find_plugin(&plugin, &env.path)?;
    if !speaks_1_1(&path)? {
        eprintln!(
            "flannel: GC: delegate {} predates CNI 1.1 and has no GC; stale attachments \
             flannel recorded were deleted through its DEL",
            path.display()
        );
        return Ok(());
    }
    rendered.insert("cniVersion".into(), json!("1.1.0"));
    let valid: Vec<Value> = valid_attachments(conf)
        .iter()
        .map(|a| json!({ "containerID": a.container_id, "ifname": a.ifname }))
        .collect();
    rendered.insert("cni.dev/valid-attachments".into(), Value::Array(valid));
    let bytes = serde_json::to_vec(&rendered).expect("JSON values serialise");
    delegate::invoke(&path, "GC", &bytes)?;
    Ok(())
}
