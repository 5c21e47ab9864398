//! A small in-process Kubernetes API server for Node objects, speaking the real HTTP
//! protocol to the real `kube` client: list with `resourceVersion`, streaming watch (with
//! BOOKMARKs, resume from a resourceVersion, and `410 Gone`/`Expired` once history is
//! compacted), get, and strategic-merge / merge PATCH of `nodes/<name>` and
//! `nodes/<name>/status`.
//!
//! Only what flannel's kube subnet manager touches is implemented; anything else answers
//! 404 so a test notices a request it did not expect.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use k8s_openapi::api::core::v1::Node;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// One PATCH the server received.
#[derive(Clone, Debug)]
pub struct RecordedPatch {
    /// `nodes/<name>` or `nodes/<name>/status`.
    pub path: String,
    /// The request's Content-Type.
    pub content_type: String,
    /// The patch document.
    pub body: Value,
}

#[derive(Clone, Debug)]
enum Broadcast {
    Event { rv: u64, line: Bytes },
    Expire,
    Close,
}

struct Inner {
    rv: u64,
    nodes: BTreeMap<String, Value>,
    history: Vec<(u64, Bytes)>,
    /// Watches resuming from a resourceVersion below this get 410 Gone (history before
    /// it is gone; resuming exactly here misses nothing).
    compacted_below: u64,
    patches: Vec<RecordedPatch>,
    /// While set, changes are stored but not sent to open watches (missed by them).
    muted: bool,
    lists: usize,
    watches: usize,
    bookmarks: usize,
}

struct Shared {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Broadcast>,
    bookmark_every: Duration,
}

/// Handle to a running fake API server; it stops when dropped.
pub struct KubeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    /// Ends the serving task gracefully ([`Self::stop`]).
    shutdown: tokio_util::sync::CancellationToken,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object }))
        .expect("JSON values serialise");
    line.push(b'\n');
    Bytes::from(line)
}

fn status(code: u16, reason: &str, message: String) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn status_response(code: StatusCode, reason: &str, message: String) -> Response {
    let body = status(code.as_u16(), reason, message);
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn not_found(name: &str) -> Response {
    status_response(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("nodes \"{name}\" not found"),
    )
}

/// Strategic merge as the API server does it for the fields flannel uses: objects merge
/// key by key, `null` deletes, `status.conditions` merges by `type`, other lists replace.
/// With `strategic = false` it is a plain JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value, path: &str, strategic: bool) {
    let (Value::Object(t), Value::Object(p)) = (&mut *target, patch) else {
        *target = patch.clone();
        return;
    };
    for (k, v) in p {
        if k.starts_with('$') {
            continue;
        }
        let child = format!("{path}/{k}");
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Array(items) if strategic && child == "/status/conditions" => {
                let existing = t.entry(k.clone()).or_insert_with(|| json!([]));
                if !existing.is_array() {
                    *existing = json!([]);
                }
                let list = existing.as_array_mut().expect("made an array above");
                for item in items {
                    let ty = item.get("type");
                    match list.iter_mut().find(|c| c.get("type") == ty) {
                        Some(c) => merge(c, item, &child, strategic),
                        None => list.push(item.clone()),
                    }
                }
            }
            Value::Object(_) => {
                let slot = t.entry(k.clone()).or_insert_with(|| json!({}));
                merge(slot, v, &child, strategic);
            }
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

impl Shared {
    /// Bumps the resourceVersion, stamps `object`, records and broadcasts the event.
    fn publish(&self, inner: &mut Inner, kind: &str, object: &mut Value) {
        inner.rv += 1;
        object["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        let line = event_line(kind, object);
        inner.history.push((inner.rv, line.clone()));
        if inner.muted {
            return;
        }
        // No receivers is fine: nobody is watching yet.
        let _ = self.tx.send(Broadcast::Event { rv: inner.rv, line });
    }
}

#[derive(serde::Deserialize, Default)]
struct ListQuery {
    #[serde(default)]
    watch: Option<String>,
    #[serde(rename = "resourceVersion", default)]
    resource_version: Option<String>,
    #[serde(rename = "timeoutSeconds", default)]
    timeout_seconds: Option<u64>,
    #[serde(rename = "allowWatchBookmarks", default)]
    allow_watch_bookmarks: Option<String>,
}

async fn list_or_watch(State(s): State<Arc<Shared>>, Query(q): Query<ListQuery>) -> Response {
    let is_watch = matches!(q.watch.as_deref(), Some("true" | "1"));
    if !is_watch {
        let mut inner = s.inner.lock().expect("fake API state lock");
        inner.lists += 1;
        let body = json!({
            "kind": "NodeList", "apiVersion": "v1",
            "metadata": { "resourceVersion": inner.rv.to_string() },
            "items": inner.nodes.values().cloned().collect::<Vec<_>>(),
        });
        return (
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
    }
    watch(s, q)
}

struct WatchState {
    shared: Arc<Shared>,
    rx: broadcast::Receiver<Broadcast>,
    pending: VecDeque<Bytes>,
    last_rv: u64,
    bookmarks: Option<tokio::time::Interval>,
    deadline: tokio::time::Instant,
    done: bool,
}

fn watch(s: Arc<Shared>, q: ListQuery) -> Response {
    let from: u64 = q
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut pending = VecDeque::new();
    let (rx, last_rv) = {
        let mut inner = s.inner.lock().expect("fake API state lock");
        inner.watches += 1;
        let rx = s.tx.subscribe();
        if from != 0 && from < inner.compacted_below {
            let gone = status(
                410,
                "Expired",
                format!(
                    "too old resource version: {from} ({})",
                    inner.compacted_below
                ),
            );
            pending.push_back(event_line("ERROR", &gone));
        } else if from == 0 {
            for node in inner.nodes.values() {
                pending.push_back(event_line("ADDED", node));
            }
        } else {
            pending.extend(
                inner
                    .history
                    .iter()
                    .filter(|(rv, _)| *rv > from)
                    .map(|(_, line)| line.clone()),
            );
        }
        (rx, inner.rv.max(from))
    };
    let expired = from != 0
        && pending
            .front()
            .is_some_and(|l| l.starts_with(b"{\"type\":\"ERROR\""));
    let bookmarks = matches!(q.allow_watch_bookmarks.as_deref(), Some("true" | "1")).then(|| {
        let mut i = tokio::time::interval(s.bookmark_every);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let state = WatchState {
        deadline: tokio::time::Instant::now()
            + Duration::from_secs(q.timeout_seconds.unwrap_or(290)),
        shared: s,
        rx,
        pending,
        last_rv,
        bookmarks,
        done: expired,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(line) = st.pending.pop_front() {
                return Some((Ok::<_, std::convert::Infallible>(line), st));
            }
            if st.done {
                return None;
            }
            let tick = async {
                match st.bookmarks.as_mut() {
                    Some(i) => {
                        i.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                msg = st.rx.recv() => match msg {
                    Ok(Broadcast::Event { rv, line }) if rv > st.last_rv => {
                        st.last_rv = rv;
                        st.pending.push_back(line);
                    }
                    Ok(Broadcast::Event { .. }) => {}
                    // A clean end, as at `timeoutSeconds`: the client resumes from its
                    // last resourceVersion without relisting.
                    Ok(Broadcast::Close) => st.done = true,
                    Ok(Broadcast::Expire) => {
                        let gone = status(410, "Expired", "watch expired by the test".into());
                        st.pending.push_back(event_line("ERROR", &gone));
                        st.done = true;
                    }
                    // Lagged or closed: end the watch; the client resumes from its last
                    // resourceVersion and gets the rest from history.
                    Err(_) => return None,
                },
                () = tick => {
                    let mut inner = st.shared.inner.lock().expect("fake API state lock");
                    if inner.rv <= st.last_rv {
                        inner.bookmarks += 1;
                        let bm = json!({"kind": "Node", "apiVersion": "v1",
                                        "metadata": {"resourceVersion": st.last_rv.to_string()}});
                        st.pending.push_back(event_line("BOOKMARK", &bm));
                    }
                }
                () = tokio::time::sleep_until(st.deadline) => return None,
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .expect("static response parts are valid")
}

async fn get_node(State(s): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    let inner = s.inner.lock().expect("fake API state lock");
    match inner.nodes.get(&name) {
        Some(n) => ([(header::CONTENT_TYPE, "application/json")], n.to_string()).into_response(),
        None => not_found(&name),
    }
}

async fn patch(
    s: Arc<Shared>,
    name: String,
    subresource_status: bool,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let strategic = match content_type.as_str() {
        "application/strategic-merge-patch+json" => true,
        "application/merge-patch+json" => false,
        other => {
            return status_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/strategic-merge-patch+json, application/merge-patch+json (got {other:?})"
                ),
            );
        }
    };
    let Ok(doc) = serde_json::from_slice::<Value>(&body) else {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "patch is not JSON".into(),
        );
    };
    let mut inner = s.inner.lock().expect("fake API state lock");
    let path = if subresource_status {
        format!("nodes/{name}/status")
    } else {
        format!("nodes/{name}")
    };
    inner.patches.push(RecordedPatch {
        path,
        content_type,
        body: doc.clone(),
    });
    let Some(mut node) = inner.nodes.get(&name).cloned() else {
        return not_found(&name);
    };
    // Like the real server: the status subresource ignores spec, the main resource status.
    let ignored = if subresource_status { "spec" } else { "status" };
    for key in ["metadata", "spec", "status"] {
        if key == ignored {
            continue;
        }
        if let Some(part) = doc.get(key) {
            let slot = node
                .as_object_mut()
                .expect("nodes are objects")
                .entry(key)
                .or_insert_with(|| json!({}));
            merge(slot, part, &format!("/{key}"), strategic);
        }
    }
    s.publish(&mut inner, "MODIFIED", &mut node);
    inner.nodes.insert(name, node.clone());
    (
        [(header::CONTENT_TYPE, "application/json")],
        node.to_string(),
    )
        .into_response()
}

async fn patch_node(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    patch(s, name, false, headers, body).await
}

async fn patch_status(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    patch(s, name, true, headers, body).await
}

/// Serve the API on `listener` until `shutdown` (graceful: the listener closes at once,
/// connections when their requests end) or until aborted.
fn spawn_server(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let app = Router::new()
        .route("/api/v1/nodes", get(list_or_watch))
        .route("/api/v1/nodes/{name}", get(get_node).patch(patch_node))
        .route(
            "/api/v1/nodes/{name}/status",
            get(get_node).patch(patch_status),
        )
        .with_state(shared);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    })
}

impl KubeApi {
    /// Starts a server on 127.0.0.1 (random port) with BOOKMARKs every 500 ms.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        Self::serve(listener)
    }

    /// Serves on an already bound socket, e.g. one bound inside a test network namespace
    /// so agents in other namespaces can reach it. Needs a running tokio runtime.
    pub fn start_on(listener: std::net::TcpListener) -> Self {
        listener
            .set_nonblocking(true)
            .expect("make the listener non-blocking");
        Self::serve(tokio::net::TcpListener::from_std(listener).expect("register listener"))
    }

    fn serve(listener: tokio::net::TcpListener) -> Self {
        let (tx, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                rv: 1,
                nodes: BTreeMap::new(),
                history: Vec::new(),
                compacted_below: 0,
                patches: Vec::new(),
                muted: false,
                lists: 0,
                watches: 0,
                bookmarks: 0,
            }),
            tx,
            bookmark_every: Duration::from_millis(500),
        });
        let addr = listener.local_addr().expect("bound socket has an address");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = spawn_server(listener, Arc::clone(&shared), shutdown.clone());
        Self {
            addr,
            shared,
            task,
            shutdown,
        }
    }

    /// The address it serves on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop serving, as an API server going down: the listening socket is closed (new
    /// connections are refused), open watches end, idle connections close. The objects
    /// and their history stay, and the test may change them meanwhile ([`Self::annotate`]
    /// and friends work on the stored state). Needs the server's runtime entered.
    pub fn stop(&mut self) {
        self.shutdown.cancel();
        let _ = self.shared.tx.send(Broadcast::Close);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !self.task.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            // Watches accepted just before the shutdown: end them too.
            let _ = self.shared.tx.send(Broadcast::Close);
        }
        self.task.abort();
    }

    /// Serve again on `listener` (bound to the same address by the caller) with the
    /// state kept since [`Self::stop`]. Needs a running tokio runtime.
    pub fn resume_on(&mut self, listener: std::net::TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("make the listener non-blocking");
        let listener = tokio::net::TcpListener::from_std(listener).expect("register listener");
        self.addr = listener.local_addr().expect("bound socket has an address");
        self.shutdown = tokio_util::sync::CancellationToken::new();
        self.task = spawn_server(listener, Arc::clone(&self.shared), self.shutdown.clone());
    }

    /// Replace a node's `status.addresses` (as the kubelet reports them), e.g.
    /// `[("InternalIP", "198.18.0.2")]`.
    pub fn set_addresses(&self, name: &str, addresses: &[(&str, &str)]) {
        let mut inner = self.lock();
        let Some(mut node) = inner.nodes.get(name).cloned() else {
            panic!("set_addresses: no node {name}");
        };
        let list: Vec<Value> = addresses
            .iter()
            .map(|(t, a)| json!({ "type": t, "address": a }))
            .collect();
        node["status"]["addresses"] = json!(list);
        self.shared.publish(&mut inner, "MODIFIED", &mut node);
        inner.nodes.insert(name.to_owned(), node);
    }

    /// `http://<address>:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A real `kube` client pointed at this server (no auth, plain HTTP).
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("our URL parses"));
        kube::Client::try_from(config).expect("kube client from a plain-HTTP config")
    }

    /// Writes a kubeconfig file for this server (for `--kubeconfig-file`).
    pub fn write_kubeconfig(&self, path: &std::path::Path) -> std::io::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, text)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().expect("fake API state lock")
    }

    /// Creates or replaces a node (ADDED / MODIFIED).
    pub fn put_node(&self, node: &Node) {
        let mut value = serde_json::to_value(node).expect("nodes serialise");
        value["kind"] = json!("Node");
        value["apiVersion"] = json!("v1");
        let name = node.metadata.name.clone().expect("test nodes have names");
        let mut inner = self.lock();
        let kind = if inner.nodes.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.shared.publish(&mut inner, kind, &mut value);
        inner.nodes.insert(name, value);
    }

    /// A minimal node with pod CIDRs (first one also in `spec.podCIDR`).
    pub fn add_node(&self, name: &str, pod_cidrs: &[&str]) {
        let node: Node = serde_json::from_value(json!({
            "metadata": { "name": name, "uid": format!("uid-{name}") },
            "spec": {
                "podCIDR": pod_cidrs.first(),
                "podCIDRs": pod_cidrs,
            },
            "status": { "conditions": [
                { "type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated",
                  "message": "waiting for the network plugin" },
                { "type": "Ready", "status": "False", "reason": "KubeletNotReady" },
            ]},
        }))
        .expect("test node JSON matches the Node schema");
        self.put_node(&node);
    }

    /// A node as a running vxlan flannel would publish it under the default prefix:
    /// `pod_cidr`, `kube-subnet-manager: "true"`, `backend-type: vxlan`, `backend-data`
    /// and `public-ip` as given (so tests can give bad ones).
    pub fn add_flannel_node(&self, name: &str, pod_cidr: &str, public_ip: &str, data: &str) {
        const P: &str = "flannel.alpha.coreos.com/";
        self.add_node(name, &[pod_cidr]);
        self.annotate(
            name,
            &[
                (&format!("{P}kube-subnet-manager"), Some("true")),
                (&format!("{P}backend-type"), Some("vxlan")),
                (&format!("{P}backend-data"), Some(data)),
                (&format!("{P}public-ip"), Some(public_ip)),
            ],
        );
    }

    /// Sets (or with `None` removes) annotations server-side, as another client would.
    pub fn annotate(&self, name: &str, annotations: &[(&str, Option<&str>)]) {
        let mut inner = self.lock();
        let Some(mut node) = inner.nodes.get(name).cloned() else {
            panic!("annotate: no node {name}");
        };
        let patch: serde_json::Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.map_or(Value::Null, |v| json!(v))))
            .collect();
        merge(
            &mut node,
            &json!({ "metadata": { "annotations": patch } }),
            "",
            true,
        );
        self.shared.publish(&mut inner, "MODIFIED", &mut node);
        inner.nodes.insert(name.to_owned(), node);
    }

    /// Deletes a node (DELETED with its last state).
    pub fn delete_node(&self, name: &str) {
        let mut inner = self.lock();
        let Some(mut node) = inner.nodes.remove(name) else {
            panic!("delete_node: no node {name}");
        };
        self.shared.publish(&mut inner, "DELETED", &mut node);
    }

    /// Compacts history and ends every open watch with `410 Gone` (`Expired`), as an API
    /// server does when etcd compacted past a watcher's resourceVersion. The changes `then`
    /// makes are missed by the open watches and compacted: only a relist shows them.
    pub fn expire_watches(&self, then: impl FnOnce(&Self)) {
        {
            let mut inner = self.lock();
            inner.compacted_below = inner.rv;
            inner.history.clear();
            inner.muted = true;
        }
        then(self);
        {
            let mut inner = self.lock();
            inner.muted = false;
            // Changes made by `then` are compacted too: only a relist shows them.
            inner.compacted_below = inner.rv;
            inner.history.clear();
        }
        let _ = self.shared.tx.send(Broadcast::Expire);
    }

    /// Ends every open watch cleanly (no error), like a server-side watch timeout.
    pub fn close_watches(&self) {
        let _ = self.shared.tx.send(Broadcast::Close);
    }

    /// How many BOOKMARK events were sent.
    pub fn bookmarks_sent(&self) -> usize {
        self.lock().bookmarks
    }

    /// The stored node.
    pub fn node(&self, name: &str) -> Option<Node> {
        let inner = self.lock();
        inner
            .nodes
            .get(name)
            .map(|v| serde_json::from_value(v.clone()).expect("stored nodes deserialise"))
    }

    /// Every PATCH received so far.
    pub fn patches(&self) -> Vec<RecordedPatch> {
        self.lock().patches.clone()
    }

    /// How many list requests were served.
    pub fn list_count(&self) -> usize {
        self.lock().lists
    }

    /// How many watch requests were served.
    pub fn watch_count(&self) -> usize {
        self.lock().watches
    }

    /// Annotation map of a node (empty if none).
    pub fn annotations(&self, name: &str) -> HashMap<String, String> {
        self.node(name)
            .and_then(|n| n.metadata.annotations)
            .map(|a| a.into_iter().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategic_merge_conditions_by_type_and_null_deletes() {
        let mut node = json!({"metadata": {"annotations": {"a": "1", "b": "2"}},
            "status": {"conditions": [
                {"type": "NetworkUnavailable", "status": "True"},
                {"type": "Ready", "status": "True"}]}});
        let patch = json!({"metadata": {"annotations": {"a": null, "c": "3"}},
            "status": {"conditions": [{"type": "NetworkUnavailable", "status": "False"}]}});
        merge(&mut node, &patch, "", true);
        assert_eq!(node["metadata"]["annotations"], json!({"b": "2", "c": "3"}));
        assert_eq!(
            node["status"]["conditions"],
            json!([{"type": "NetworkUnavailable", "status": "False"},
                   {"type": "Ready", "status": "True"}])
        );
        merge(&mut node, &patch, "", false);
        assert_eq!(
            node["status"]["conditions"],
            json!([{"type": "NetworkUnavailable", "status": "False"}])
        );
    }
}
