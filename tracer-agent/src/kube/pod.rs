//! Pods as the API server describes them, reduced to what resources need, and the
//! resource attributes of a container in one.

use std::{collections::BTreeMap, sync::Arc};

use serde::Deserialize;

/// Longest value kept of any string from the API server.
const MAX_VALUE: usize = 253;
/// `resource.opentelemetry.io/…` annotations kept per pod at most.
const MAX_ANNOTATED: usize = 16;
/// The prefix of annotations that are resource attributes (OpenTelemetry's
/// Kubernetes conventions): `resource.opentelemetry.io/service.name` → `service.name`.
const RESOURCE_ANNOTATION: &str = "resource.opentelemetry.io/";

/// The parts of a `v1.Pod` the agent reads; the rest of the object is skipped.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodObject {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub resource_version: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub owner_references: Vec<OwnerReference>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub controller: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: String,
    #[serde(default)]
    pub containers: Vec<ContainerSpec>,
}

#[derive(Debug, Deserialize)]
pub struct ContainerSpec {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default)]
    pub container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    pub init_container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    pub ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    #[serde(default)]
    pub name: String,
    /// `containerd://<id>`, `cri-o://<id>`, `docker://<id>`; absent until started.
    #[serde(default, rename = "containerID")]
    pub container_id: Option<String>,
}

/// The workload that owns a pod, as far as the pod itself says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Workload {
    /// A ReplicaSet, and the Deployment that made it when its name says so.
    ReplicaSet {
        name: String,
        deployment: Option<String>,
    },
    StatefulSet(String),
    DaemonSet(String),
    Job(String),
}

/// One pod, as kept in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub workload: Option<Workload>,
    /// (container name, runtime container ID without its scheme), every kind of
    /// container; the ID is empty until the container has started.
    pub containers: Vec<(String, String)>,
    /// `resource.opentelemetry.io/*` annotations, prefix taken off.
    pub annotated: Vec<(String, String)>,
    /// The well-known labels `app.kubernetes.io/instance` and `…/name`.
    pub app_instance: Option<String>,
    pub app_name: Option<String>,
    pub resource_version: String,
}

fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_VALUE);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl Pod {
    /// The pod of an API object; `None` for an object without a UID or name.
    pub fn from_object(o: PodObject) -> Option<Pod> {
        let m = o.metadata;
        if m.uid.is_empty() || m.name.is_empty() {
            return None;
        }
        let workload = m
            .owner_references
            .iter()
            .find(|r| r.controller)
            .or(m.owner_references.first())
            .and_then(|r| workload(r, m.labels.get("pod-template-hash")));
        let mut containers: Vec<(String, String)> = Vec::new();
        let statuses = o
            .status
            .container_statuses
            .iter()
            .chain(&o.status.init_container_statuses)
            .chain(&o.status.ephemeral_container_statuses);
        for s in statuses {
            let id = s
                .container_id
                .as_deref()
                .and_then(|id| id.split_once("://").map(|(_, id)| id))
                .unwrap_or("");
            containers.push((bounded(&s.name), bounded(id)));
        }
        // Containers that have no status yet are still known by name.
        for c in &o.spec.containers {
            if !containers.iter().any(|(name, _)| *name == c.name) {
                containers.push((bounded(&c.name), String::new()));
            }
        }
        let annotated = m
            .annotations
            .iter()
            .filter_map(|(k, v)| {
                let key = k.strip_prefix(RESOURCE_ANNOTATION)?;
                (!key.is_empty() && !v.trim().is_empty()).then(|| (bounded(key), bounded(v.trim())))
            })
            .take(MAX_ANNOTATED)
            .collect();
        let label = |k: &str| {
            m.labels
                .get(k)
                .filter(|v| !v.is_empty())
                .map(|v| bounded(v))
        };
        Some(Pod {
            uid: bounded(&m.uid),
            name: bounded(&m.name),
            namespace: bounded(&m.namespace),
            node: bounded(&o.spec.node_name),
            workload,
            containers,
            annotated,
            app_instance: label("app.kubernetes.io/instance"),
            app_name: label("app.kubernetes.io/name"),
            resource_version: bounded(&m.resource_version),
        })
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.annotated
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The resource attributes of a process in container `container` of this pod
    /// (its name when known) on `node`.
    pub fn resource(
        &self,
        container: Option<&str>,
        container_id: Option<&str>,
        well_known_labels: bool,
    ) -> K8sResource {
        let mut attrs: Vec<(String, String)> = vec![
            ("k8s.namespace.name".into(), self.namespace.clone()),
            ("k8s.pod.name".into(), self.name.clone()),
            ("k8s.pod.uid".into(), self.uid.clone()),
        ];
        if !self.node.is_empty() {
            attrs.push(("k8s.node.name".into(), self.node.clone()));
        }
        if let Some(c) = container {
            attrs.push(("k8s.container.name".into(), c.to_string()));
        }
        if let Some(id) = container_id {
            attrs.push(("container.id".into(), id.to_string()));
        }
        let mut workload_name = None;
        match &self.workload {
            Some(Workload::ReplicaSet { name, deployment }) => {
                if let Some(d) = deployment {
                    attrs.push(("k8s.deployment.name".into(), d.clone()));
                    workload_name = Some(d.clone());
                }
                attrs.push(("k8s.replicaset.name".into(), name.clone()));
                workload_name.get_or_insert_with(|| name.clone());
            }
            Some(Workload::StatefulSet(n)) => {
                attrs.push(("k8s.statefulset.name".into(), n.clone()));
                workload_name = Some(n.clone());
            }
            Some(Workload::DaemonSet(n)) => {
                attrs.push(("k8s.daemonset.name".into(), n.clone()));
                workload_name = Some(n.clone());
            }
            Some(Workload::Job(n)) => {
                attrs.push(("k8s.job.name".into(), n.clone()));
                workload_name = Some(n.clone());
            }
            None => {}
        }
        // Other annotated attributes, except the service ones chosen below.
        for (k, v) in &self.annotated {
            if !k.starts_with("service.") && !attrs.iter().any(|(key, _)| key == k) {
                attrs.push((k.clone(), v.clone()));
            }
        }
        if let Some(v) = self.annotation("service.version") {
            attrs.push(("service.version".into(), v.to_string()));
        }
        let labels = well_known_labels
            .then(|| self.app_instance.clone().or_else(|| self.app_name.clone()))
            .flatten();
        // OpenTelemetry's order for service.name on Kubernetes.
        let service_name_annotated = self.annotation("service.name").is_some();
        let service_name = self
            .annotation("service.name")
            .map(str::to_string)
            .or(labels)
            .or(workload_name)
            .unwrap_or_else(|| self.name.clone());
        let service_namespace = self
            .annotation("service.namespace")
            .map(str::to_string)
            .unwrap_or_else(|| self.namespace.clone());
        let service_instance_id = self
            .annotation("service.instance.id")
            .map(str::to_string)
            .unwrap_or_else(|| {
                format!(
                    "{}.{}.{}",
                    self.namespace,
                    self.name,
                    container.unwrap_or_default()
                )
            });
        K8sResource {
            attributes: attrs,
            service_name,
            service_name_annotated,
            service_namespace,
            service_instance_id,
        }
    }
}

/// The owner of a pod. A ReplicaSet made by a Deployment is named
/// `<deployment>-<pod-template-hash>`, and its pods carry that hash as a label: the
/// Deployment's name is what is left when both agree, and unknown otherwise.
fn workload(r: &OwnerReference, template_hash: Option<&String>) -> Option<Workload> {
    let name = bounded(&r.name);
    if name.is_empty() {
        return None;
    }
    Some(match r.kind.as_str() {
        "ReplicaSet" => {
            let deployment = template_hash
                .filter(|h| !h.is_empty())
                .and_then(|h| name.strip_suffix(h.as_str()))
                .and_then(|d| d.strip_suffix('-'))
                .filter(|d| !d.is_empty())
                .map(str::to_string);
            Workload::ReplicaSet { name, deployment }
        }
        "StatefulSet" => Workload::StatefulSet(name),
        "DaemonSet" => Workload::DaemonSet(name),
        "Job" => Workload::Job(name),
        _ => return None,
    })
}

/// What Kubernetes says of one container: its attributes, and the service
/// attributes for a process that sets none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct K8sResource {
    /// `k8s.*`, `container.id`, `service.version` and annotated attributes.
    pub attributes: Vec<(String, String)>,
    pub service_name: String,
    /// The name came from the pod's `resource.opentelemetry.io/service.name`: the
    /// pod's owner asked for it, as if the process had set it.
    pub service_name_annotated: bool,
    pub service_namespace: String,
    pub service_instance_id: String,
}

/// Shared between processes of one container.
pub type SharedK8sResource = Arc<K8sResource>;

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: &str) -> Pod {
        Pod::from_object(serde_json::from_str(json).unwrap()).unwrap()
    }

    fn attr<'a>(r: &'a K8sResource, key: &str) -> Option<&'a str> {
        r.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    const DEPLOYMENT_POD: &str = r#"{
        "metadata": {"name": "checkout-7c9d8f6b5-x2k4p", "namespace": "shop",
            "uid": "3b6a4d0e-1f2c-4e5a-9b8c-7d6e5f4a3b2c", "resourceVersion": "4711",
            "labels": {"app": "checkout", "pod-template-hash": "7c9d8f6b5"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": "checkout-7c9d8f6b5", "uid": "x", "controller": true}]},
        "spec": {"nodeName": "node-a", "containers": [{"name": "app"}, {"name": "sidecar"}]},
        "status": {"containerStatuses": [
            {"name": "app", "containerID": "containerd://aaaa"},
            {"name": "sidecar"}]}
    }"#;

    #[test]
    fn a_deployments_pod_is_named_after_the_deployment() {
        let p = pod(DEPLOYMENT_POD);
        assert_eq!(
            p.workload,
            Some(Workload::ReplicaSet {
                name: "checkout-7c9d8f6b5".into(),
                deployment: Some("checkout".into())
            })
        );
        assert_eq!(
            p.containers,
            vec![
                ("app".into(), "aaaa".into()),
                ("sidecar".into(), String::new())
            ]
        );
        let r = p.resource(Some("app"), Some("aaaa"), false);
        assert_eq!(r.service_name, "checkout");
        assert_eq!(r.service_namespace, "shop");
        assert_eq!(r.service_instance_id, "shop.checkout-7c9d8f6b5-x2k4p.app");
        assert_eq!(attr(&r, "k8s.deployment.name"), Some("checkout"));
        assert_eq!(attr(&r, "k8s.replicaset.name"), Some("checkout-7c9d8f6b5"));
        assert_eq!(attr(&r, "k8s.pod.name"), Some("checkout-7c9d8f6b5-x2k4p"));
        assert_eq!(attr(&r, "k8s.namespace.name"), Some("shop"));
        assert_eq!(attr(&r, "k8s.node.name"), Some("node-a"));
        assert_eq!(attr(&r, "k8s.container.name"), Some("app"));
        assert_eq!(attr(&r, "container.id"), Some("aaaa"));
    }

    #[test]
    fn a_replicaset_whose_name_does_not_carry_the_hash_names_no_deployment() {
        // A bare ReplicaSet (no Deployment), or a hash label that does not match.
        let json = DEPLOYMENT_POD.replace(
            r#""pod-template-hash": "7c9d8f6b5""#,
            r#""pod-template-hash": "ffff""#,
        );
        let r = pod(&json).resource(Some("app"), None, false);
        assert_eq!(attr(&r, "k8s.deployment.name"), None);
        assert_eq!(r.service_name, "checkout-7c9d8f6b5");
    }

    #[test]
    fn annotations_come_first_and_well_known_labels_only_when_asked() {
        let json = DEPLOYMENT_POD.replace(
            r#""labels": {"#,
            r#""annotations": {"resource.opentelemetry.io/service.version": "1.4.2",
                "resource.opentelemetry.io/deployment.environment.name": "prod",
                "kubectl.kubernetes.io/last-applied-configuration": "{\"big\": 1}"},
               "labels": {"app.kubernetes.io/name": "shop-checkout", "#,
        );
        let p = pod(&json);
        let r = p.resource(Some("app"), None, false);
        assert_eq!(r.service_name, "checkout");
        assert_eq!(attr(&r, "service.version"), Some("1.4.2"));
        assert_eq!(attr(&r, "deployment.environment.name"), Some("prod"));
        assert!(attr(&r, "kubectl.kubernetes.io/last-applied-configuration").is_none());
        assert_eq!(
            p.resource(Some("app"), None, true).service_name,
            "shop-checkout"
        );
        let json = json.replace(
            r#""annotations": {"#,
            r#""annotations": {"resource.opentelemetry.io/service.name": "payments", "resource.opentelemetry.io/service.namespace": "team-a", "#,
        );
        let r = pod(&json).resource(Some("app"), None, true);
        assert_eq!(r.service_name, "payments");
        assert_eq!(r.service_namespace, "team-a");
    }

    #[test]
    fn other_owners_and_bare_pods() {
        for (kind, key) in [
            ("StatefulSet", "k8s.statefulset.name"),
            ("DaemonSet", "k8s.daemonset.name"),
            ("Job", "k8s.job.name"),
        ] {
            let json = format!(
                r#"{{"metadata": {{"name": "w-0", "namespace": "n", "uid": "u",
                   "ownerReferences": [{{"kind": "{kind}", "name": "w", "controller": true}}]}}}}"#
            );
            let r = pod(&json).resource(None, None, false);
            assert_eq!(attr(&r, key), Some("w"), "{kind}");
            assert_eq!(r.service_name, "w", "{kind}");
        }
        let r = pod(r#"{"metadata": {"name": "lonely", "namespace": "n", "uid": "u"}}"#)
            .resource(None, None, false);
        assert_eq!(r.service_name, "lonely");
        assert_eq!(r.service_instance_id, "n.lonely.");
        // An owner kind the agent does not know is no workload.
        let p = pod(r#"{"metadata": {"name": "p", "namespace": "n", "uid": "u",
                "ownerReferences": [{"kind": "Node", "name": "node-a", "controller": true}]}}"#);
        assert_eq!(p.workload, None);
    }

    #[test]
    fn objects_without_identity_are_refused_and_long_values_cut() {
        assert!(
            Pod::from_object(serde_json::from_str(r#"{"metadata": {"name": "x"}}"#).unwrap())
                .is_none()
        );
        let long = "é".repeat(400);
        let p = pod(&format!(
            r#"{{"metadata": {{"name": "{long}", "namespace": "n", "uid": "u"}}}}"#
        ));
        assert!(p.name.len() <= MAX_VALUE);
        assert!(p.name.chars().all(|c| c == 'é'));
    }
}
