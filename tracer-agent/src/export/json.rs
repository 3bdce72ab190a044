//! `--output json`: one JSON object per line on stdout, as docs/contracts.md defines.

use serde_json::{Map, Value, json};

use crate::spans::{AttrValue, Span};

fn attr_json(v: &AttrValue) -> Value {
    match v {
        AttrValue::Str(s) => Value::String(s.to_string()),
        AttrValue::Int(i) => json!(i),
        AttrValue::Double(d) => json!(d),
    }
}

/// The `{"type":"span",…}` object for one span.
pub fn span_json(span: &Span) -> Value {
    let mut attributes: Map<String, Value> = span
        .attributes
        .iter()
        .map(|(k, v)| ((*k).to_string(), attr_json(v)))
        .collect();
    attributes.insert(
        "tracer.parent.source".into(),
        Value::String(span.parent_source.as_str().into()),
    );
    attributes.insert(
        "tracer.parent.confidence".into(),
        json!(span.parent_confidence),
    );
    let mut object = json!({
        "type": "span",
        "trace_id": span.trace_id.to_string(),
        "span_id": span.span_id.to_string(),
        "parent_span_id": span.parent_span_id.map(|p| p.to_string()),
        "name": span.name,
        "kind": span.kind.as_str(),
        "start_unix_nano": span.start_unix_nano,
        "end_unix_nano": span.end_unix_nano,
        "status": span.status.as_str(),
        "attributes": attributes,
        "resource": {
            "process.pid": span.resource.pid,
            "process.executable.name": span.resource.executable_name,
            "service.name": span.resource.service_name,
            "service.instance.id": span.resource.service_instance_id,
            "host.name": span.resource.host_name,
        },
    });
    if let Some(ns) = &span.resource.service_namespace {
        object["resource"]["service.namespace"] = json!(ns);
    }
    for (key, value) in span.resource.k8s_attributes() {
        object["resource"][key] = json!(value);
    }
    if let Some(message) = span.status_message {
        object["status_message"] = json!(message);
    }
    object
}

/// One line of JSON (no trailing newline).
pub fn span_line(span: &Span) -> String {
    span_json(span).to_string()
}

/// The `{"type":"leak",…}` object for one leak event.
pub fn leak_json(e: &crate::pools::LeakEvent) -> Value {
    let r = &e.row;
    let mut object = json!({
        "type": "leak",
        "state": e.state,
        "kind": e.kind,
        "pid": r.pool.pid,
        "process.executable.name": r.executable,
        "service.name": r.service,
        "service.namespace": r.service_namespace,
        "service.instance.id": r.service_instance_id,
        "db.system.name": r.pool.db_system.as_str(),
        "db.namespace": r.namespace,
        "server.address": r.pool.server.ip().to_string(),
        "server.port": r.pool.server.port(),
        "client.port": r.client_port,
        "idle_seconds": r.idle_seconds,
        "last_trace_id": r.last_trace_id,
        "last_span_id": r.last_span_id,
        "last_url_path": r.culprit.as_ref().map(|c| c.path.as_str()),
        "last_http_route": r.culprit.as_ref().map(|c| c.route.as_str()),
        "last_http_method": r.culprit.as_ref().map(|c| c.method.as_str()),
        "last_server_span_id": r.culprit.as_ref().map(|c| c.span_id.as_str()),
        "last_query": r.last_query,
        "recovered": r.recovered,
    });
    for (key, value) in r.k8s.resource().k8s_attributes() {
        object[key] = json!(value);
    }
    object
}
