//! Kubernetes metadata: which pod, container and workload each process belongs to.
//!
//! A process's container comes from its cgroup ([`cgroup`]); the pods on this node
//! come from the API server, listed once and then watched ([`client`]), and are
//! kept in a bounded cache. Outside Kubernetes none of this runs.

pub mod cgroup;
pub mod client;
pub mod pod;

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

pub use cgroup::{ContainerRef, container_of};
pub use pod::{K8sResource, Pod, SharedK8sResource};

/// Pods kept at most. A node runs 110 by default and rarely more than a few
/// hundred; pods beyond this are not cached, and counted.
pub const MAX_PODS: usize = 4096;

/// The pods of this node, by UID, with an index from container ID.
#[derive(Debug, Default)]
pub struct PodCache {
    pods: HashMap<String, Arc<Pod>>,
    /// container ID → (pod UID, container name).
    containers: HashMap<String, (String, String)>,
    /// Pods refused because the cache was full, since the start.
    pub over_limit: u64,
}

impl PodCache {
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Adds or replaces a pod; false when the cache is full and it is new.
    pub fn upsert(&mut self, pod: Pod) -> bool {
        if !self.pods.contains_key(&pod.uid) && self.pods.len() >= MAX_PODS {
            self.over_limit += 1;
            return false;
        }
        self.remove(&pod.uid.clone());
        for (name, id) in &pod.containers {
            if !id.is_empty() {
                self.containers
                    .insert(id.clone(), (pod.uid.clone(), name.clone()));
            }
        }
        self.pods.insert(pod.uid.clone(), Arc::new(pod));
        true
    }

    pub fn remove(&mut self, uid: &str) {
        if let Some(old) = self.pods.remove(uid) {
            for (_, id) in &old.containers {
                if self.containers.get(id).is_some_and(|(u, _)| u == uid) {
                    self.containers.remove(id);
                }
            }
        }
    }

    /// Replaces everything with a fresh list.
    pub fn replace_all(&mut self, pods: Vec<Pod>) {
        let over_limit = self.over_limit;
        *self = PodCache {
            over_limit,
            ..Default::default()
        };
        for p in pods {
            self.upsert(p);
        }
    }

    /// The pod and container a cgroup names: by container ID, else by pod UID
    /// (the container's name then only when the pod has one container).
    pub fn find(&self, at: &ContainerRef) -> Option<(Arc<Pod>, Option<String>)> {
        if let Some((uid, name)) = at
            .container_id
            .as_ref()
            .and_then(|id| self.containers.get(id))
            && let Some(pod) = self.pods.get(uid)
        {
            return Some((pod.clone(), Some(name.clone())));
        }
        let pod = self.pods.get(at.pod_uid.as_ref()?)?;
        let name = match pod.containers.as_slice() {
            [(name, _)] => Some(name.clone()),
            _ => None,
        };
        Some((pod.clone(), name))
    }
}

/// What the metadata cache counts, on `/metrics` (`tracer_kubernetes_*`).
#[derive(Clone, Debug, Default)]
pub struct KubeCounters {
    /// Pods of this node in the cache.
    pub pods: prometheus_client::metrics::gauge::Gauge,
    /// Pods not cached: over the cache's limit, or objects that did not decode.
    pub pods_dropped: prometheus_client::metrics::counter::Counter,
    /// Failed list or watch requests to the API server.
    pub api_errors: prometheus_client::metrics::counter::Counter,
    /// Whether this node's pods have been listed once.
    pub listed: Arc<std::sync::atomic::AtomicBool>,
}

/// How the agent talks to the API server.
#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// `https://host:port` in a cluster; `http://127.0.0.1:8001` behind `kubectl proxy`.
    pub api: String,
    /// The service account token, re-read for every request (tokens rotate).
    pub token_file: Option<std::path::PathBuf>,
    /// The cluster's CA, for an https API server.
    pub ca_file: Option<std::path::PathBuf>,
    /// This node's name: only its pods are listed.
    pub node_name: String,
    /// Name services after the well-known labels `app.kubernetes.io/instance` and
    /// `app.kubernetes.io/name` (OpenTelemetry asks for this to be opt-in).
    pub well_known_labels: bool,
}

/// The agent's view of this node's pods, shared by the watcher (writer) and the
/// pipeline (reader).
#[derive(Clone, Debug)]
pub struct Kube {
    cache: Arc<RwLock<PodCache>>,
    /// Bumped on every change: processes resolved without their pod try again.
    generation: Arc<AtomicU64>,
    pub node_name: Arc<str>,
    pub well_known_labels: bool,
}

/// What Kubernetes says of one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Not in a container the node's pods name (a host process, or no container).
    Host,
    /// In a container of a pod the cache does not hold (yet).
    Unknown(ContainerRef),
    Pod(SharedK8sResource),
}

impl Kube {
    pub fn new(node_name: &str, well_known_labels: bool) -> Self {
        Self {
            cache: Default::default(),
            generation: Default::default(),
            node_name: node_name.into(),
            well_known_labels,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Changes the cache and bumps the generation.
    pub fn update<R>(&self, f: impl FnOnce(&mut PodCache) -> R) -> R {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        let r = f(&mut cache);
        self.generation.fetch_add(1, Ordering::AcqRel);
        r
    }

    pub fn pods(&self) -> usize {
        self.cache.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Where the process whose `/proc/PID/cgroup` reads `cgroup` runs.
    pub fn place(&self, cgroup: &str) -> Placement {
        let at = container_of(cgroup);
        if at.is_empty() {
            return Placement::Host;
        }
        let found = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .find(&at);
        match found {
            Some((pod, container)) => {
                let id = at.container_id.as_deref();
                Placement::Pod(Arc::new(pod.resource(
                    container.as_deref(),
                    id,
                    self.well_known_labels,
                )))
            }
            None => Placement::Unknown(at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, containers: &[(&str, &str)]) -> Pod {
        Pod {
            uid: uid.into(),
            name: format!("pod-{uid}"),
            namespace: "ns".into(),
            node: "node-a".into(),
            workload: None,
            containers: containers
                .iter()
                .map(|(n, i)| (n.to_string(), i.to_string()))
                .collect(),
            annotated: vec![],
            app_instance: None,
            app_name: None,
            resource_version: "1".into(),
        }
    }

    #[test]
    fn containers_are_found_by_id_then_pods_by_uid() {
        let mut c = PodCache::default();
        c.upsert(pod("u1", &[("app", "id1"), ("side", "id2")]));
        c.upsert(pod("u2", &[("only", "")]));
        let at = |id: Option<&str>, uid: Option<&str>| ContainerRef {
            container_id: id.map(Into::into),
            pod_uid: uid.map(Into::into),
        };
        let (p, name) = c.find(&at(Some("id2"), None)).unwrap();
        assert_eq!((p.uid.as_str(), name.as_deref()), ("u1", Some("side")));
        // A container not started when the pod was listed: the pod, and its one
        // container's name.
        let (p, name) = c.find(&at(Some("id9"), Some("u2"))).unwrap();
        assert_eq!((p.uid.as_str(), name.as_deref()), ("u2", Some("only")));
        // Two containers and an unknown ID: the pod, no container name (unknown
        // beats a guess).
        let (_, name) = c.find(&at(Some("id9"), Some("u1"))).unwrap();
        assert_eq!(name, None);
        assert!(c.find(&at(Some("id9"), Some("u3"))).is_none());
    }

    #[test]
    fn updates_replace_and_deletes_forget_the_container_index() {
        let mut c = PodCache::default();
        c.upsert(pod("u1", &[("app", "id1")]));
        c.upsert(pod("u1", &[("app", "id3")]));
        let at = ContainerRef {
            container_id: Some("id1".into()),
            pod_uid: None,
        };
        assert!(c.find(&at).is_none(), "the old container ID is gone");
        c.remove("u1");
        assert!(c.is_empty());
        assert!(c.containers.is_empty());
    }

    #[test]
    fn the_cache_is_bounded_and_counts_what_it_refuses() {
        let mut c = PodCache::default();
        for i in 0..MAX_PODS + 5 {
            c.upsert(pod(&format!("u{i}"), &[]));
        }
        assert_eq!(c.len(), MAX_PODS);
        assert_eq!(c.over_limit, 5);
        // Updates of cached pods still go in.
        assert!(c.upsert(pod("u0", &[("app", "x")])));
    }

    #[test]
    fn placement_tells_host_unknown_and_pod_apart() {
        let k = Kube::new("node-a", false);
        assert_eq!(k.place("0::/system.slice/sshd.service\n"), Placement::Host);
        let id = "a".repeat(64);
        let cg = format!(
            "0::/kubepods.slice/kubepods-pod3b6a4d0e_1f2c_4e5a_9b8c_7d6e5f4a3b2c.slice/cri-containerd-{id}.scope\n"
        );
        assert!(matches!(k.place(&cg), Placement::Unknown(_)));
        let before = k.generation();
        k.update(|c| c.upsert(pod("3b6a4d0e-1f2c-4e5a-9b8c-7d6e5f4a3b2c", &[("app", &id)])));
        assert!(k.generation() > before);
        let Placement::Pod(r) = k.place(&cg) else {
            panic!("the pod is known now")
        };
        assert!(
            r.attributes
                .contains(&("k8s.container.name".to_string(), "app".to_string()))
        );
    }
}
