//! Spans: one per request a process answers (SERVER) or sends (CLIENT), with
//! OpenTelemetry semantic-convention attributes.

/// Request targets as span attributes (pure, in tracer-protocols: fuzzed there).
pub use tracer_protocols::http_target as route;
pub mod status;

use std::{fmt, net::SocketAddr, sync::Arc};

use crate::{
    process::ProcessResource,
    protocols::{
        db::{DbCall, DbSystem},
        http1::{Http1Message, StartLine},
        sql,
    },
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
}

impl SpanKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SpanKind::Server => "server",
            SpanKind::Client => "client",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanStatus {
    Unset,
    Ok,
    Error,
}

impl SpanStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SpanStatus::Unset => "unset",
            SpanStatus::Ok => "ok",
            SpanStatus::Error => "error",
        }
    }
}

/// How a span's parent was found (`tracer.parent.source`), strongest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParentSource {
    /// A W3C `traceparent` header on the wire.
    Header,
    /// The two ends of one TCP connection on this host, same exchange.
    Socket,
    /// Sent by the thread that was handling the parent request.
    Thread,
    /// Inferred from timing on a thread shared by many requests (event loops).
    Timing,
    /// No parent known (a root, or not linked rather than linked wrongly).
    None,
}

impl ParentSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ParentSource::Header => "header",
            ParentSource::Socket => "socket",
            ParentSource::Thread => "thread",
            ParentSource::Timing => "timing",
            ParentSource::None => "none",
        }
    }
}

/// What parent inference needs to know about a span beyond its attributes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Link {
    /// The connection as (client end, server end): both ends compute the same key.
    pub conn: Option<(SocketAddr, SocketAddr)>,
    /// Index of this exchange on its connection (0 = the first request), when the
    /// connection was followed from its start.
    pub exchange: Option<u64>,
    /// Client spans: the server request being handled by the thread that sent this
    /// request when it sent it (directly, or through an earlier call's answer).
    pub woken_by: Option<SpanId>,
    /// Client spans: that thread had exactly that one server request open (a
    /// thread-per-request server) rather than several (an event loop).
    pub dedicated_thread: bool,
    /// The request carried a valid W3C `traceparent`.
    pub header: bool,
}

/// A string a span holds: a constant, one shared with other spans (a connection's
/// addresses), or its own. Cloning never copies the text of the first two, so
/// building a span allocates only for what is new in it.
#[derive(Clone)]
pub enum Text {
    Static(&'static str),
    Shared(Arc<str>),
    Owned(String),
}

impl Text {
    pub fn as_str(&self) -> &str {
        match self {
            Text::Static(s) => s,
            Text::Shared(s) => s,
            Text::Owned(s) => s,
        }
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&'static str> for Text {
    fn from(s: &'static str) -> Self {
        Text::Static(s)
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Text::Owned(s)
    }
}

impl From<Arc<str>> for Text {
    fn from(s: Arc<str>) -> Self {
        Text::Shared(s)
    }
}

impl serde::Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A connection's two IP addresses as text, made once per connection and shared by
/// all its spans.
#[derive(Clone, Debug)]
pub struct AddrText {
    pub local: Arc<str>,
    pub remote: Arc<str>,
}

impl AddrText {
    pub fn of(local: SocketAddr, remote: SocketAddr) -> Self {
        Self {
            local: local.ip().to_string().into(),
            remote: remote.ip().to_string().into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(Text),
    Int(i64),
    Double(f64),
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Str(s) => f.write_str(s.as_str()),
            AttrValue::Int(i) => write!(f, "{i}"),
            AttrValue::Double(d) => write!(f, "{d}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TraceId(pub [u8; 16]);
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    pub fn random() -> Self {
        loop {
            let id = fastrand::u128(..).to_be_bytes();
            if id != [0; 16] {
                return Self(id);
            }
        }
    }
}

impl SpanId {
    pub fn random() -> Self {
        loop {
            let id = fastrand::u64(..).to_be_bytes();
            if id != [0; 8] {
                return Self(id);
            }
        }
    }
}

fn hex(bytes: &[u8], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        hex(&self.0, f)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        hex(&self.0, f)
    }
}

/// A finished span, ready for parent inference and export.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    pub parent_source: ParentSource,
    /// `tracer.parent.confidence`, in [0, 1].
    pub parent_confidence: f64,
    pub name: Text,
    pub kind: SpanKind,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub status: SpanStatus,
    /// The status description of an error span: fixed text chosen by the error's
    /// code ([`status`]), never the peer's own message.
    pub status_message: Option<&'static str>,
    /// Attributes in a stable order; keys are semantic-convention names.
    pub attributes: Vec<(&'static str, AttrValue)>,
    pub resource: Arc<ProcessResource>,
    /// Thread that read the request (server) or wrote it (client).
    pub tid: u32,
    /// Inputs of parent inference.
    pub link: Link,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    pub fn duration_ns(&self) -> u64 {
        self.end_unix_nano.saturating_sub(self.start_unix_nano)
    }
}

/// Everything known about one HTTP request/response exchange.
pub struct HttpExchange<'a> {
    pub kind: SpanKind,
    pub request: &'a Http1Message,
    pub response: &'a Http1Message,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// `local` and `remote`'s addresses as text.
    pub ips: &'a AddrText,
    /// No response came: the connection closed first; the span's `error.type`.
    pub abandoned: Option<&'static str>,
    pub resource: Arc<ProcessResource>,
    pub tid: u32,
    /// Assigned when the request was first seen, so children can name it early.
    pub span_id: SpanId,
    pub link: Link,
    /// Read from the TLS library (the connection is encrypted): `https`.
    pub tls: bool,
}

/// Host part of a `Host` header (without port; IPv6 brackets removed).
fn host_only(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
}

/// Builds the span for one exchange. Ids are fresh; [`crate::stitch`] links them.
pub fn http_span(x: &HttpExchange<'_>) -> Span {
    let (method, target) = match &x.request.start {
        StartLine::Request { method, target } => (method.as_str(), target.as_str()),
        StartLine::Response { .. } => ("_OTHER", "/"),
    };
    let status = match x.response.start {
        StartLine::Response { status } => status,
        StartLine::Request { .. } => 0,
    };
    let path = route::url_path(target);
    let (server, server_ip, client_ip) = match x.kind {
        SpanKind::Server => (x.local, &x.ips.local, &x.ips.remote),
        SpanKind::Client => (x.remote, &x.ips.remote, &x.ips.local),
    };
    let server_address: Text = match x.request.headers.host.as_deref().map(host_only) {
        Some(h) if !h.is_empty() => Text::Owned(h.to_string()),
        _ => Text::Shared(server_ip.clone()),
    };
    let known = known_method(method);
    let template = route::url_template(path);
    // Semantic conventions: "{method} {url.template}" (the server's own route is not
    // on the wire; the template is the path with its identifiers taken out).
    // A method outside the registry (`_OTHER`) is named `HTTP`.
    let verb = if known == "_OTHER" {
        "HTTP"
    } else {
        known.as_str()
    };
    let name = Text::Owned(format!("{verb} {template}"));
    // Tokens in the path (JWTs, reset tokens, session ids) never leave: url.path
    // and url.full are built from the redacted path.
    let path = route::redacted_path(path);
    let mut attributes: Vec<(&'static str, AttrValue)> = Vec::with_capacity(13);
    attributes.extend([
        ("http.request.method", AttrValue::Str(known.clone())),
        ("url.path", AttrValue::Str(Text::Owned(path.to_string()))),
        ("url.template", AttrValue::Str(Text::Owned(template))),
        ("server.address", AttrValue::Str(server_address.clone())),
        ("server.port", AttrValue::Int(i64::from(server.port()))),
        ("network.protocol.name", AttrValue::Str("http".into())),
        (
            "network.protocol.version",
            AttrValue::Str(match x.request.version_minor {
                0 => "1.0".into(),
                1 => "1.1".into(),
                n => Text::Owned(format!("1.{n}")),
            }),
        ),
        (
            "network.peer.address",
            AttrValue::Str(Text::Shared(x.ips.remote.clone())),
        ),
        (
            "network.peer.port",
            AttrValue::Int(i64::from(x.remote.port())),
        ),
    ]);
    if x.abandoned.is_none() {
        attributes.push((
            "http.response.status_code",
            AttrValue::Int(i64::from(status)),
        ));
    }
    if known != method {
        attributes.push((
            "http.request.method_original",
            AttrValue::Str(Text::Owned(method.to_string())),
        ));
    }
    match x.kind {
        SpanKind::Server => {
            attributes.push((
                "client.address",
                AttrValue::Str(Text::Shared(client_ip.clone())),
            ));
            let client = x.remote;
            attributes.push(("client.port", AttrValue::Int(i64::from(client.port()))));
            let scheme = if x.tls { "https" } else { "http" };
            attributes.push(("url.scheme", AttrValue::Str(scheme.into())));
        }
        SpanKind::Client => {
            let host = server_address.as_str();
            let scheme = if x.tls { "https" } else { "http" };
            let full = if host.contains(':') {
                format!("{scheme}://[{host}]:{}{path}", server.port())
            } else {
                format!("{scheme}://{host}:{}{path}", server.port())
            };
            attributes.push(("url.full", AttrValue::Str(Text::Owned(full))));
        }
    }
    if let Some(ua) = &x.request.headers.user_agent {
        attributes.push((
            "user_agent.original",
            AttrValue::Str(Text::Owned(ua.clone())),
        ));
    }
    if x.tls {
        // Encrypted: the plaintext was read from the TLS library.
        attributes.push(("tls.protocol.name", AttrValue::Str("tls".into())));
    }
    let error = x.abandoned.is_some()
        || match x.kind {
            SpanKind::Server => status >= 500,
            SpanKind::Client => status >= 400,
        };
    let status_message = match x.abandoned {
        Some(kind) => {
            attributes.push(("error.type", AttrValue::Str(Text::Static(kind))));
            Some(status::abandoned(kind))
        }
        None if error => {
            attributes.push((
                "error.type",
                AttrValue::Str(Text::Owned(status.to_string())),
            ));
            status::http(status)
        }
        None => None,
    };
    Span {
        trace_id: TraceId::random(),
        span_id: x.span_id,
        parent_span_id: None,
        parent_source: ParentSource::None,
        parent_confidence: 0.0,
        name,
        kind: x.kind,
        start_unix_nano: x.request.start_ns,
        end_unix_nano: x.response.end_ns.max(x.request.start_ns),
        status: if error {
            SpanStatus::Error
        } else {
            SpanStatus::Unset
        },
        status_message,
        attributes,
        resource: x.resource.clone(),
        tid: x.tid,
        link: x.link.clone(),
    }
}

/// Everything known about one database call.
pub struct DbExchange<'a> {
    pub call: &'a DbCall,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// `local` and `remote`'s addresses as text.
    pub ips: &'a AddrText,
    pub resource: Arc<ProcessResource>,
    pub tid: u32,
    /// Keep SQL literals in `db.query.text` (off by default).
    pub keep_literals: bool,
    pub link: Link,
    /// Read from the TLS library (the session is encrypted).
    pub tls: bool,
}

/// Builds the CLIENT span of one database call (OpenTelemetry database conventions).
pub fn db_span(x: &DbExchange<'_>) -> Span {
    let call = x.call;
    let is_sql = call.system != DbSystem::Redis;
    let operation = call.operation.clone().or_else(|| {
        call.query_text
            .as_deref()
            .filter(|_| is_sql)
            .and_then(sql::operation)
    });
    let collection = call
        .query_text
        .as_deref()
        .filter(|_| is_sql)
        .and_then(sql::collection);
    let mut attributes: Vec<(&'static str, AttrValue)> = vec![(
        "db.system.name",
        AttrValue::Str(Text::Static(call.system.as_str())),
    )];
    if let Some(ns) = &call.namespace {
        attributes.push(("db.namespace", AttrValue::Str(Text::Owned(ns.clone()))));
    }
    if let Some(op) = &operation {
        attributes.push(("db.operation.name", AttrValue::Str(Text::Owned(op.clone()))));
    }
    if let Some(c) = &collection {
        attributes.push(("db.collection.name", AttrValue::Str(Text::Owned(c.clone()))));
    }
    if let Some(text) = &call.query_text {
        let text = if is_sql && !x.keep_literals {
            sql::obfuscate_for(text, call.system)
        } else {
            text.clone()
        };
        attributes.push(("db.query.text", AttrValue::Str(Text::Owned(text))));
    }
    if let Some(code) = &call.error_code {
        attributes.push((
            "db.response.status_code",
            AttrValue::Str(Text::Owned(code.clone())),
        ));
        attributes.push(("error.type", AttrValue::Str(Text::Owned(code.clone()))));
    }
    if let Some(rows) = call.rows {
        attributes.push((
            "db.response.returned_rows",
            AttrValue::Int(rows.min(i64::MAX as u64) as i64),
        ));
    }
    attributes.extend([
        (
            "server.address",
            AttrValue::Str(Text::Shared(x.ips.remote.clone())),
        ),
        ("server.port", AttrValue::Int(i64::from(x.remote.port()))),
        (
            "network.peer.address",
            AttrValue::Str(Text::Shared(x.ips.remote.clone())),
        ),
        (
            "network.peer.port",
            AttrValue::Int(i64::from(x.remote.port())),
        ),
    ]);
    if x.tls {
        // Encrypted: the plaintext was read from the TLS library.
        attributes.push(("tls.protocol.name", AttrValue::Str("tls".into())));
    }
    // "{db.operation.name} {db.collection.name}", else the operation, else the system.
    let name = match (&operation, &collection) {
        (Some(op), Some(c)) => Text::Owned(format!("{op} {c}")),
        (Some(op), None) => Text::Owned(op.clone()),
        _ => Text::Static(call.system.as_str()),
    };
    Span {
        trace_id: TraceId::random(),
        span_id: SpanId::random(),
        parent_span_id: None,
        parent_source: ParentSource::None,
        parent_confidence: 0.0,
        name,
        kind: SpanKind::Client,
        start_unix_nano: call.start_ns,
        end_unix_nano: call.end_ns.max(call.start_ns),
        status: if call.error_code.is_some() {
            SpanStatus::Error
        } else {
            SpanStatus::Unset
        },
        status_message: call
            .error_code
            .as_deref()
            .and_then(|code| match call.system {
                DbSystem::Postgresql => status::postgres(code),
                DbSystem::Mysql => status::mysql(code),
                DbSystem::Redis => status::redis(code),
            }),
        attributes,
        resource: x.resource.clone(),
        tid: x.tid,
        link: x.link.clone(),
    }
}

/// Methods the HTTP semantic conventions know; anything else is `_OTHER`.
fn known_method(m: &str) -> Text {
    Text::Static(match m {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "PATCH" => "PATCH",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "_OTHER",
    })
}

/// A span for tests of the stages after span building: SERVER, `GET`, fixed ids,
/// one microsecond long, no attributes, from process `pid` (service `svc<pid>`).
#[cfg(test)]
pub fn sample_span(pid: u32) -> Span {
    Span {
        trace_id: TraceId([1; 16]),
        span_id: SpanId([2; 8]),
        parent_span_id: None,
        parent_source: ParentSource::None,
        parent_confidence: 0.0,
        name: "GET".into(),
        kind: SpanKind::Server,
        start_unix_nano: 1_000_000_000,
        end_unix_nano: 1_000_001_000,
        status: SpanStatus::Unset,
        status_message: None,
        attributes: Vec::new(),
        resource: Arc::new(ProcessResource {
            pid,
            executable_name: "app".into(),
            service_name: format!("svc{pid}"),
            service_namespace: None,
            service_instance_id: String::new(),
            host_name: "h".into(),
            k8s: None,
            k8s_node: None,
        }),
        tid: 1,
        link: Link::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::http1::KeptHeaders;

    fn msg(start: StartLine, host: Option<&str>, start_ns: u64, end_ns: u64) -> Http1Message {
        Http1Message {
            start,
            version_minor: 1,
            headers: KeptHeaders {
                host: host.map(str::to_string),
                ..KeptHeaders::default()
            },
            start_ns,
            end_ns,
            body_len: 0,
            head_truncated: false,
            body_sync_lost: false,
        }
    }

    fn resource() -> Arc<ProcessResource> {
        Arc::new(ProcessResource {
            pid: 7,
            executable_name: "python3".into(),
            service_name: "python3".into(),
            service_namespace: None,
            service_instance_id: String::new(),
            host_name: "h".into(),
            k8s: None,
            k8s_node: None,
        })
    }

    #[test]
    fn db_span_obfuscates_literals_and_names_the_operation() {
        let call = DbCall {
            system: DbSystem::Postgresql,
            operation: None,
            query_text: Some("SELECT * FROM users WHERE email = 'a@b.c' AND id = 42".into()),
            namespace: Some("shop".into()),
            start_ns: 5,
            end_ns: 9,
            error_code: Some("42P01".into()),
            rows: None,
        };
        let span = db_span(&DbExchange {
            call: &call,
            local: "127.0.0.1:40000".parse().unwrap(),
            remote: "127.0.0.1:5432".parse().unwrap(),
            ips: &AddrText::of(
                "127.0.0.1:40000".parse().unwrap(),
                "127.0.0.1:5432".parse().unwrap(),
            ),
            resource: resource(),
            tid: 3,
            keep_literals: false,
            link: Link::default(),
            tls: false,
        });
        assert_eq!(span.kind, SpanKind::Client);
        assert_eq!(span.name, "SELECT users");
        assert_eq!(span.status, SpanStatus::Error);
        let text = span.attr("db.query.text").unwrap().to_string();
        assert!(!text.contains("a@b.c") && !text.contains("42"), "{text}");
        assert_eq!(
            span.attr("db.namespace"),
            Some(&AttrValue::Str("shop".into()))
        );
        assert_eq!(
            span.attr("db.response.status_code"),
            Some(&AttrValue::Str("42P01".into()))
        );
        assert_eq!(span.attr("server.port"), Some(&AttrValue::Int(5432)));
    }

    #[test]
    fn server_span_has_semantic_convention_attributes() {
        let req = msg(
            StartLine::Request {
                method: "GET".into(),
                target: "/x/42?q=1".into(),
            },
            Some("localhost:8000"),
            10,
            12,
        );
        let resp = msg(StartLine::Response { status: 404 }, None, 20, 30);
        let span = http_span(&HttpExchange {
            kind: SpanKind::Server,
            request: &req,
            response: &resp,
            local: "127.0.0.1:8000".parse().unwrap(),
            remote: "127.0.0.1:5000".parse().unwrap(),
            ips: &AddrText::of(
                "127.0.0.1:8000".parse().unwrap(),
                "127.0.0.1:5000".parse().unwrap(),
            ),
            abandoned: None,
            resource: resource(),
            tid: 9,
            span_id: SpanId::random(),
            link: Link::default(),
            tls: false,
        });
        assert_eq!(span.name, "GET /x/{id}", "named after the template, no id");
        assert_eq!(
            span.attr("url.template"),
            Some(&AttrValue::Str("/x/{id}".into()))
        );
        assert_eq!(span.start_unix_nano, 10);
        assert_eq!(span.end_unix_nano, 30);
        assert_eq!(span.attr("url.path"), Some(&AttrValue::Str("/x/42".into())));
        assert_eq!(
            span.attr("server.address"),
            Some(&AttrValue::Str("localhost".into()))
        );
        assert_eq!(span.attr("server.port"), Some(&AttrValue::Int(8000)));
        assert_eq!(
            span.attr("client.address"),
            Some(&AttrValue::Str("127.0.0.1".into()))
        );
        assert_eq!(
            span.attr("http.response.status_code"),
            Some(&AttrValue::Int(404))
        );
        // 404 is not a server error.
        assert_eq!(span.status, SpanStatus::Unset);
    }

    #[test]
    fn client_span_errors_on_4xx_and_names_unknown_methods_other() {
        let req = msg(
            StartLine::Request {
                method: "PURGE".into(),
                target: "/".into(),
            },
            None,
            1,
            2,
        );
        let resp = msg(StartLine::Response { status: 404 }, None, 3, 4);
        let span = http_span(&HttpExchange {
            kind: SpanKind::Client,
            request: &req,
            response: &resp,
            local: "[::1]:5000".parse().unwrap(),
            remote: "[::1]:80".parse().unwrap(),
            ips: &AddrText::of("[::1]:5000".parse().unwrap(), "[::1]:80".parse().unwrap()),
            abandoned: None,
            resource: resource(),
            tid: 9,
            span_id: SpanId::random(),
            link: Link::default(),
            tls: false,
        });
        assert_eq!(span.name, "HTTP /");
        assert_eq!(span.status, SpanStatus::Error);
        assert_eq!(
            span.attr("http.request.method_original"),
            Some(&AttrValue::Str("PURGE".into()))
        );
        assert_eq!(
            span.attr("url.full"),
            Some(&AttrValue::Str("http://[::1]:80/".into()))
        );
    }

    /// A token in the path (here a JWT) is redacted in url.full as in url.path
    /// (the secrets test found it in url.full of CLIENT spans); over TLS the
    /// scheme is https.
    #[test]
    fn tokens_in_the_path_are_redacted_in_url_full_too() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJlMTI";
        let req = msg(
            StartLine::Request {
                method: "GET".into(),
                target: format!("/auth/{jwt}?next=/home"),
            },
            Some("api.example.com"),
            1,
            2,
        );
        let resp = msg(StartLine::Response { status: 200 }, None, 3, 4);
        let span = http_span(&HttpExchange {
            kind: SpanKind::Client,
            request: &req,
            response: &resp,
            local: "10.0.0.1:5000".parse().unwrap(),
            remote: "10.0.0.2:443".parse().unwrap(),
            ips: &AddrText::of(
                "10.0.0.1:5000".parse().unwrap(),
                "10.0.0.2:443".parse().unwrap(),
            ),
            abandoned: None,
            resource: resource(),
            tid: 9,
            span_id: SpanId::random(),
            link: Link::default(),
            tls: true,
        });
        assert_eq!(
            span.attr("url.full"),
            Some(&AttrValue::Str(
                "https://api.example.com:443/auth/REDACTED".into()
            ))
        );
        assert_eq!(
            span.attr("url.path"),
            Some(&AttrValue::Str("/auth/REDACTED".into()))
        );
        assert_eq!(
            span.attr("tls.protocol.name"),
            Some(&AttrValue::Str("tls".into()))
        );
        let all = format!("{:?}", span.attributes);
        assert!(!all.contains("eyJ"), "{all}");
    }
}
