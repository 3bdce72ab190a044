//! Which container a process runs in, from its `/proc/PID/cgroup`.
//!
//! The kubelet puts every container in a cgroup whose path names the pod's UID and
//! the container's runtime ID. How depends on the cgroup driver and the runtime:
//!
//! - systemd driver: `/kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope`
//!   (`crio-<id>.scope`, `docker-<id>.scope` for the other runtimes);
//! - cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>`.
//!
//! The agent may sit in a cgroup namespace of its own (a container), where the paths
//! of other processes read as `/../../kubepods.slice/…`: only the last components
//! matter, so that is fine.

/// Where a process runs, as far as its cgroup says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerRef {
    /// The container runtime's ID (64 hex digits for containerd, CRI-O and Docker).
    pub container_id: Option<String>,
    /// The pod's UID, with dashes (`0b7a…-…`).
    pub pod_uid: Option<String>,
}

impl ContainerRef {
    pub fn is_empty(&self) -> bool {
        self.container_id.is_none() && self.pod_uid.is_none()
    }
}

/// The container and pod named in the text of `/proc/PID/cgroup`. The unified
/// (v2) line wins over v1 lines when both name one.
pub fn container_of(cgroup: &str) -> ContainerRef {
    let mut found = ContainerRef::default();
    // v2 line first ("0::/path"), then the v1 ones in order.
    let mut lines: Vec<&str> = cgroup.lines().collect();
    lines.sort_by_key(|l| !l.starts_with("0::"));
    for line in lines {
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let here = from_path(path);
        if here.container_id.is_some() {
            return here;
        }
        if found.pod_uid.is_none() {
            found.pod_uid = here.pod_uid;
        }
    }
    found
}

/// The container and pod named by one cgroup path.
fn from_path(path: &str) -> ContainerRef {
    let mut r = ContainerRef::default();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        if let Some(uid) = pod_uid(part) {
            r.pod_uid = Some(uid);
            // The container's cgroup sits right under its pod's.
            r.container_id = parts.get(i + 1).and_then(|c| container_id(c));
        }
    }
    if r.pod_uid.is_none() {
        // Containers outside Kubernetes (docker run, podman): the last component.
        r.container_id = parts.last().and_then(|c| container_id(c));
    }
    r
}

/// `kubepods-burstable-pod<uid>.slice` or `pod<uid>`: the pod's UID with dashes.
fn pod_uid(part: &str) -> Option<String> {
    let part = part.strip_suffix(".slice").unwrap_or(part);
    let at = part.rfind("pod")?;
    let uid = &part[at + 3..];
    // Only in a kubepods path component, or as the whole component.
    if at != 0 && !part.starts_with("kubepods") {
        return None;
    }
    let uid = uid.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

/// A UID as Kubernetes writes them: 8-4-4-4-12 hex digits.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`,
/// `libpod-<id>.scope` or a bare `<id>`: the runtime's container ID. The
/// `crio-conmon-<id>` cgroup is CRI-O's monitor process, no container.
fn container_id(part: &str) -> Option<String> {
    let part = part.strip_suffix(".scope").unwrap_or(part);
    if part.starts_with("crio-conmon-") {
        return None;
    }
    let id = [
        "cri-containerd-",
        "crio-",
        "docker-",
        "libpod-",
        "containerd-",
    ]
    .iter()
    .find_map(|prefix| part.strip_prefix(prefix))
    .unwrap_or(part);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5f0c1a3b9e2d4c6f8a7b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f";
    const UID: &str = "3b6a4d0e-1f2c-4e5a-9b8c-7d6e5f4a3b2c";

    #[test]
    fn systemd_driver_paths_of_every_runtime_name_pod_and_container() {
        for runtime in ["cri-containerd", "crio", "docker"] {
            let text = format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/{runtime}-{ID}.scope\n",
                UID.replace('-', "_")
            );
            let r = container_of(&text);
            assert_eq!(r.container_id.as_deref(), Some(ID), "{runtime}");
            assert_eq!(r.pod_uid.as_deref(), Some(UID), "{runtime}");
        }
        // Guaranteed QoS pods sit right under kubepods.slice.
        let text = format!(
            "0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        );
        assert_eq!(container_of(&text).pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn cgroupfs_driver_and_v1_hierarchies_are_read_too() {
        let text = format!("0::/kubepods/besteffort/pod{UID}/{ID}\n");
        let r = container_of(&text);
        assert_eq!(r.container_id.as_deref(), Some(ID));
        assert_eq!(r.pod_uid.as_deref(), Some(UID));
        // cgroup v1 only (older nodes): any hierarchy names it.
        let text = format!(
            "12:pids:/kubepods/burstable/pod{UID}/{ID}\n11:memory:/kubepods/burstable/pod{UID}/{ID}\n0::/\n"
        );
        assert_eq!(container_of(&text).container_id.as_deref(), Some(ID));
    }

    #[test]
    fn a_cgroup_namespace_of_the_reader_leaves_relative_paths_that_still_name_it() {
        let text = format!(
            "0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(container_of(&text).container_id.as_deref(), Some(ID));
    }

    #[test]
    fn host_processes_and_odd_paths_name_nothing() {
        for text in [
            "0::/system.slice/nginx.service\n",
            "0::/user.slice/user-1000.slice/session-3.scope\n",
            "0::/\n",
            "",
            "garbage",
            "0::/kubepods.slice/kubepods-podnot-a-uid.slice/cri-containerd-abc.scope",
            // A pod-like name outside kubepods is no pod.
            "0::/system.slice/mypod3b6a4d0e_1f2c_4e5a_9b8c_7d6e5f4a3b2c.slice",
        ] {
            assert!(container_of(text).is_empty(), "{text:?}");
        }
        // CRI-O's conmon sits beside the container: the pod, but no container.
        let text = format!(
            "0::/kubepods.slice/kubepods-pod{}.slice/crio-conmon-{ID}.scope",
            UID.replace('-', "_")
        );
        let r = container_of(&text);
        assert_eq!(r.container_id, None);
        assert_eq!(r.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn plain_docker_containers_name_their_container_only() {
        let r = container_of(&format!("0::/system.slice/docker-{ID}.scope\n"));
        assert_eq!(r.container_id.as_deref(), Some(ID));
        assert_eq!(r.pod_uid, None);
    }
}
