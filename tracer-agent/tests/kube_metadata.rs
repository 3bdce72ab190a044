//! Root integration test: Kubernetes metadata. Two real Python servers run in
//! cgroups named the way the kubelet names a container's (systemd driver,
//! containerd), and an API server on loopback answers the agent's pod list and
//! watch with the responses in `tests/data/kube/` (a `v1.PodList` and a watch
//! stream, in the API server's own format). The spans of each server must carry
//! its pod's attributes and its workload's service name; a process outside any
//! pod (curl) only the node's name.

mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use serde_json::Value;
use support::*;

const TOKEN: &str = "test-service-account-token";

fn data(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/kube")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A loopback API server: `GET /api/v1/pods?…` answers the recorded list, and
/// `…&watch=true…` streams the recorded events, then holds the watch open.
/// Requests without the bearer token get 401. Every request line is kept.
struct ApiServer {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl ApiServer {
    fn start(list: String, watch: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the API server");
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let (list, watch, seen) = (list.clone(), watch.clone(), seen.clone());
                thread::spawn(move || serve(stream, &list, &watch, &seen));
            }
        });
        Self { port, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve(stream: TcpStream, list: &str, watch: &str, seen: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut authorized = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if h.to_ascii_lowercase().starts_with("authorization:") {
                authorized = h.trim_end().ends_with(&format!("Bearer {TOKEN}"));
            }
        }
        seen.lock()
            .unwrap()
            .push(request_line.trim_end().to_string());
        if !authorized {
            let body = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#;
            let _ = write!(
                out,
                "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            continue;
        }
        if request_line.contains("watch=true") {
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            );
            for line in watch.lines() {
                let chunk = format!("{line}\n");
                let _ = write!(out, "{:x}\r\n{chunk}\r\n", chunk.len());
            }
            let _ = out.flush();
            // The watch stays open, as the API server's does, until the agent goes.
            let mut sink = [0u8; 64];
            let _ = reader.read(&mut sink);
            return;
        }
        let _ = write!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{list}",
            list.len()
        );
    }
}

/// The unified (v2) cgroup hierarchy's mount point.
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("a cgroup2 hierarchy is mounted (the kubelet's layout is made in it)")
}

/// A container's cgroup, made the way the kubelet's systemd driver names it, and
/// removed again when dropped (after its processes are gone).
struct ContainerCgroup {
    dirs: Vec<PathBuf>,
}

impl ContainerCgroup {
    fn new(pod_uid: &str, container_id: &str) -> Self {
        let root = cgroup2_root();
        let slice = root.join("kubepods.slice");
        let qos = slice.join("kubepods-besteffort.slice");
        let pod = qos.join(format!(
            "kubepods-besteffort-pod{}.slice",
            pod_uid.replace('-', "_")
        ));
        let container = pod.join(format!("cri-containerd-{container_id}.scope"));
        std::fs::create_dir_all(&container)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", container.display()));
        Self {
            dirs: vec![container, pod, qos, slice],
        }
    }

    fn add(&self, pid: u32) {
        let procs = self.dirs[0].join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", procs.display()));
    }
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        // The processes are killed first (declared later, dropped earlier); a
        // cgroup with processes cannot be removed, so give them a moment.
        for dir in &self.dirs {
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// (pod UID, container ID) of the named container in a pod object.
fn ids(pod: &Value, container: &str) -> (String, String) {
    let uid = pod["metadata"]["uid"].as_str().expect("uid").to_string();
    let status = pod["status"]["containerStatuses"]
        .as_array()
        .expect("container statuses")
        .iter()
        .find(|s| s["name"] == container)
        .expect("the container's status");
    let id = status["containerID"].as_str().expect("container ID");
    let id = id.split_once("://").expect("runtime scheme").1.to_string();
    (uid, id)
}

fn res<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["resource"][key]
}

fn server_span_of<'a>(spans: &[&'a Value], pid: u32) -> &'a Value {
    spans
        .iter()
        .copied()
        .find(|s| s["kind"] == "server" && res(s, "process.pid") == pid)
        .unwrap_or_else(|| panic!("no server span of pid {pid}: {spans:?}"))
}

#[test]
fn spans_of_processes_in_pods_carry_their_pod_and_workload() {
    if !require_root("kube_metadata") {
        return;
    }
    let list = data("pods-node-a.json");
    let watch = data("watch-node-a.jsonl");
    let listed: Value = serde_json::from_str(&list).unwrap();
    let checkout = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["metadata"]["name"] == "checkout-6f9c7d8b4d-q7xkz")
        .expect("the checkout pod in the recorded list")
        .clone();
    let added: Value = serde_json::from_str(watch.lines().next().unwrap()).unwrap();
    let ledger = added["object"].clone();
    let (checkout_uid, checkout_id) = ids(&checkout, "app");
    let (ledger_uid, ledger_id) = ids(&ledger, "ledger");

    let api = ApiServer::start(list, watch);
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), format!("{TOKEN}\n")).unwrap();

    let checkout_cg = ContainerCgroup::new(&checkout_uid, &checkout_id);
    let ledger_cg = ContainerCgroup::new(&ledger_uid, &ledger_id);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "hello\n").unwrap();
    let (p1, p2) = (free_port(), free_port());
    let checkout_srv = python_server(p1, dir.path(), "1.1");
    let ledger_srv = python_server(p2, dir.path(), "1.1");
    checkout_cg.add(checkout_srv.pid());
    ledger_cg.add(ledger_srv.pid());

    let api_url = format!("http://127.0.0.1:{}", api.port);
    let agent = Agent::start(&[
        "--output",
        "json",
        "--port",
        &p1.to_string(),
        "--port",
        &p2.to_string(),
        "--kubernetes",
        "on",
        "--kube-api",
        &api_url,
        "--kube-token-file",
        token.path().to_str().unwrap(),
        "--node-name",
        "node-a",
    ]);
    // The list (and the watch that brings the ledger pod) before the traffic.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !api.requests().iter().any(|r| r.contains("watch=true")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never watched pods; requests: {:?}\nstderr:\n{}",
            api.requests(),
            agent.stderr.text()
        );
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(300));
    curl(&[&format!("http://127.0.0.1:{p1}/")]);
    curl(&[&format!("http://127.0.0.1:{p2}/")]);
    agent.wait_json(20, "two server spans", |o| {
        spans(o).iter().filter(|s| s["kind"] == "server").count() >= 2
    });
    let metrics = agent.get("/metrics");
    let objects = agent.stop_json();
    let all = spans(&objects);

    let s = server_span_of(&all, checkout_srv.pid());
    assert_eq!(
        res(s, "service.name"),
        "checkout",
        "named after the Deployment"
    );
    assert_eq!(res(s, "service.namespace"), "shop");
    assert_eq!(
        res(s, "service.instance.id"),
        "shop.checkout-6f9c7d8b4d-q7xkz.app"
    );
    assert_eq!(res(s, "k8s.namespace.name"), "shop");
    assert_eq!(res(s, "k8s.pod.name"), "checkout-6f9c7d8b4d-q7xkz");
    assert_eq!(res(s, "k8s.pod.uid"), checkout_uid.as_str());
    assert_eq!(res(s, "k8s.container.name"), "app");
    assert_eq!(res(s, "container.id"), checkout_id.as_str());
    assert_eq!(res(s, "k8s.node.name"), "node-a");
    assert_eq!(res(s, "k8s.deployment.name"), "checkout");
    assert_eq!(res(s, "k8s.replicaset.name"), "checkout-6f9c7d8b4d");
    assert_eq!(
        res(s, "service.version"),
        "2.3.1",
        "from the pod's annotation"
    );
    assert!(res(s, "k8s.statefulset.name").is_null());

    let s = server_span_of(&all, ledger_srv.pid());
    assert_eq!(
        res(s, "service.name"),
        "ledger",
        "named after the StatefulSet"
    );
    assert_eq!(res(s, "k8s.statefulset.name"), "ledger");
    assert_eq!(res(s, "k8s.pod.name"), "ledger-0");
    assert_eq!(res(s, "k8s.namespace.name"), "finance");
    assert_eq!(res(s, "k8s.container.name"), "ledger");
    assert!(res(s, "k8s.deployment.name").is_null());

    // curl runs in no pod: the node only, and its own name.
    let clients: Vec<_> = all.iter().filter(|s| s["kind"] == "client").collect();
    assert!(!clients.is_empty(), "curl's client spans: {objects:?}");
    for c in clients {
        assert_eq!(res(c, "k8s.node.name"), "node-a");
        assert!(res(c, "k8s.pod.name").is_null());
        assert_eq!(res(c, "service.name"), "curl");
    }

    let requests = api.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "only this node's pods are asked for: {requests:?}"
    );
    assert!(
        metrics.contains("tracer_kubernetes_pods 3"),
        "two listed pods and one watched: {metrics}"
    );
    drop((checkout_srv, ledger_srv));
}

#[test]
fn a_wrong_token_is_reported_and_tracing_goes_on() {
    if !require_root("kube_metadata_wrong_token") {
        return;
    }
    let api = ApiServer::start(data("pods-node-a.json"), String::new());
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "not-the-token").unwrap();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "hello\n").unwrap();
    let _srv = python_server(port, dir.path(), "1.1");
    let agent = Agent::start(&[
        "--output",
        "json",
        "--port",
        &port.to_string(),
        "--kube-api",
        &format!("http://127.0.0.1:{}", api.port),
        "--kube-token-file",
        token.path().to_str().unwrap(),
        "--node-name",
        "node-a",
    ]);
    curl(&[&format!("http://127.0.0.1:{port}/")]);
    agent.wait_json(20, "a server span", |o| {
        spans(o).iter().any(|s| s["kind"] == "server")
    });
    let metrics = agent.get("/metrics");
    let (_, stderr) = agent.stop();
    let log = stderr.text();
    assert!(
        log.contains("cannot list pods") && log.contains("401"),
        "the refusal is logged with the status: {log}"
    );
    assert!(!log.contains("not-the-token"), "the token is never logged");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tracer_kubernetes_api_errors_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
}
