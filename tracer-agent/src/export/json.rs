//! `--output json`: one JSON object per line on stdout, in the DESIGN.md contract.

use serde_json::{Map, Value, json};

use crate::spans::{AttrValue, Span};

fn attr_json(v: &AttrValue) -> Value {
    match v {
        AttrValue::Str(s) => Value::String(s.clone()),
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
    json!({
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
            "host.name": span.resource.host_name,
        },
    })
}

/// One line of JSON (no trailing newline).
pub fn span_line(span: &Span) -> String {
    span_json(span).to_string()
}
