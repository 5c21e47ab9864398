//! Building the API client and finding our node's name, the way upstream's flags and
//! environment do.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

use super::Error;

/// How the API client is reached: upstream's `--kube-api-url` / `--kubeconfig-file`.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// `--kube-api-url`: overrides the server URL (of the kubeconfig, if any).
    pub api_url: Option<String>,
    /// `--kubeconfig-file`.
    pub kubeconfig: Option<PathBuf>,
}

/// Builds a client the way client-go's `BuildConfigFromFlags` does: kubeconfig file and/or
/// URL when given, the in-cluster service account otherwise.
pub async fn client_from_options(opts: &ClientOptions) -> Result<Client, Error> {
    let api_url = opts.api_url.as_deref().filter(|s| !s.is_empty());
    let kubeconfig = opts
        .kubeconfig
        .as_deref()
        .filter(|p| !p.as_os_str().is_empty());
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: path.to_owned(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.to_owned(),
                    source,
                })?
        }
        None => match api_url {
            Some(_) => Config::new("http://localhost".parse().expect("static URL parses")),
            None => Config::incluster().map_err(Error::InCluster)?,
        },
    };
    if let Some(url) = api_url {
        config.cluster_url = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| Error::ApiUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
    }
    Client::try_from(config).map_err(Error::Client)
}

/// This node's name: `NODE_NAME`, else the `spec.nodeName` of pod `POD_NAMESPACE/POD_NAME`
/// (upstream's order; the second needs RBAC `pods: get`).
pub async fn node_name_from_env(client: &Client) -> Result<String, Error> {
    if let Some(name) = std::env::var("NODE_NAME").ok().filter(|s| !s.is_empty()) {
        return Ok(name);
    }
    let pod = std::env::var("POD_NAME").ok().filter(|s| !s.is_empty());
    let namespace = std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|s| !s.is_empty());
    let (Some(pod), Some(namespace)) = (pod, namespace) else {
        return Err(Error::NodeNameUnknown);
    };
    let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let p = match api.get(&pod).await {
        Ok(p) => p,
        Err(source) => {
            return Err(Error::PodLookup {
                namespace,
                pod,
                source,
            });
        }
    };
    p.spec
        .and_then(|s| s.node_name)
        .filter(|n| !n.is_empty())
        .ok_or(Error::PodNotScheduled { namespace, pod })
}
