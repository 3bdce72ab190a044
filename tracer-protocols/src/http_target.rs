//! Request targets as span attributes: `url.path` (never the query) and the path as
//! a bounded template (`url.template`-like, `/orders/{id}`) for metric series and
//! leak culprits.

/// Splits a request target into its path (no query, no fragment). Absolute-form
/// targets (`http://host/path`, sent to proxies) keep only their path.
pub fn url_path(target: &str) -> &str {
    let t = match target.find("://") {
        Some(i) => target[i + 3..]
            .find('/')
            .map(|j| &target[i + 3 + j..])
            .unwrap_or("/"),
        None => target,
    };
    let end = t.find(['?', '#']).unwrap_or(t.len());
    &t[..end]
}

/// What a secret-looking path segment becomes in `url.path` (as OpenTelemetry
/// writes scrubbed URL parts).
pub const REDACTED: &str = "REDACTED";

/// `path` with what may be a credential taken out, for `url.path` and leak
/// culprits: path parameters (`;jsessionid=…`) are dropped, and every segment that
/// looks like a token (a JWT; 16 or more characters of a token alphabet mixing
/// letters and digits: reset links, session ids, API keys, UUIDs) becomes
/// [`REDACTED`]. Numbers, words and file names stay.
pub fn redacted_path(path: &str) -> std::borrow::Cow<'_, str> {
    if !path
        .split('/')
        .any(|seg| seg.contains(';') || looks_like_secret(seg))
    {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        let seg = seg.split(';').next().unwrap_or_default();
        out.push_str(if looks_like_secret(seg) {
            REDACTED
        } else {
            seg
        });
    }
    std::borrow::Cow::Owned(out)
}

fn looks_like_secret(seg: &str) -> bool {
    let jwt = seg.starts_with("eyJ") && seg.bytes().filter(|&b| b == b'.').count() == 2;
    let tokenish = seg.bytes().all(|b| {
        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'=' | b'%' | b'+')
    });
    let digits = seg.bytes().filter(u8::is_ascii_digit).count();
    let letters = seg.bytes().filter(u8::is_ascii_alphabetic).count();
    jwt || (tokenish && seg.len() >= 16 && digits >= 2 && letters >= 2)
}

/// Replaces path segments that look like identifiers with `{id}` so that metric
/// cardinality and span names stay bounded: numbers, UUIDs, long hex strings, long
/// tokens that mix letters and digits (JWTs, reset tokens, base64 keys), and any
/// segment longer than [`MAX_SEGMENT`] bytes. Path parameters (`;jsessionid=…`) are
/// dropped. At most 8 segments are kept.
pub fn url_template(path: &str) -> String {
    let mut out = String::with_capacity(path.len().min(128));
    url_template_into(path, &mut out);
    out
}

/// [`url_template`] into `out` (cleared first).
pub fn url_template_into(path: &str, out: &mut String) {
    out.clear();
    for (i, seg) in path.split('/').enumerate() {
        if i == 0 {
            continue;
        }
        if i > 8 {
            out.push_str("/{…}");
            break;
        }
        out.push('/');
        // Matrix/path parameters (`/cart;jsessionid=…`) are session state.
        let seg = seg.split(';').next().unwrap_or_default();
        if looks_like_id(seg) {
            out.push_str("{id}");
        } else {
            out.push_str(seg);
        }
    }
    if out.is_empty() {
        out.push('/');
    }
}

/// Longest path segment kept as is in a template.
const MAX_SEGMENT: usize = 40;

fn looks_like_id(seg: &str) -> bool {
    if seg.is_empty() {
        return false;
    }
    if seg == REDACTED || looks_like_secret(seg) {
        return true;
    }
    if seg.len() > MAX_SEGMENT {
        return true;
    }
    let digits = seg.bytes().filter(u8::is_ascii_digit).count();
    if digits == seg.len() {
        return true;
    }
    let hexish = seg.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if hexish && seg.len() >= 8 && digits > 0 {
        return true; // UUIDs, hashes, object ids
    }
    let tokenish = seg.bytes().all(|b| {
        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'=' | b'%' | b'+')
    });
    // Long tokens that mix digits in: session ids, JWTs, base64-ish keys.
    tokenish && seg.len() >= 16 && digits >= 2
}

/// `url.path` of a request target, redacted and bounded (as leak culprits keep it).
pub fn bounded_path(target: &str) -> String {
    crate::bounded_text(redacted_path(url_path(target)).as_bytes(), 256)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_path_drops_query_and_absolute_form() {
        assert_eq!(url_path("/a/b?token=secret"), "/a/b");
        assert_eq!(url_path("http://example.com:8080/x?y"), "/x");
        assert_eq!(url_path("http://example.com"), "/");
        assert_eq!(url_path("*"), "*");
        assert_eq!(url_path("/p#frag"), "/p");
    }

    #[test]
    fn paths_become_templates() {
        assert_eq!(url_template("/orders/12345"), "/orders/{id}");
        assert_eq!(
            url_template("/users/550e8400-e29b-41d4-a716-446655440000/cart"),
            "/users/{id}/cart"
        );
        assert_eq!(url_template("/blob/deadbeef01"), "/blob/{id}");
        assert_eq!(url_template("/static/app.js"), "/static/app.js");
        assert_eq!(url_template("/session/aZ3kq9Lm2pQ8rT5v"), "/session/{id}");
        assert_eq!(url_template("/"), "/");
        assert_eq!(url_template(""), "/");
        assert_eq!(url_template("/a/b/c/d/e/f/g/h/i/j"), "/a/b/c/d/e/f/g/h/{…}");
        // Tokens in paths: a JWT, a reset token, a session path parameter, a long
        // letter-only segment.
        assert_eq!(
            url_template("/auth/eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJlMTI"),
            "/auth/{id}"
        );
        assert_eq!(url_template("/reset/Kq3ZpW9xLm2N7vB4"), "/reset/{id}");
        assert_eq!(
            url_template("/cart;jsessionid=A1B2C3D4E5/items"),
            "/cart/items"
        );
        assert_eq!(
            url_template("/p/abcdefghijklmnopqrstuvwxyzabcdefghijklmnop"),
            "/p/{id}"
        );
        assert_eq!(url_template("/api/v2/orders.json"), "/api/v2/orders.json");
    }

    /// Tokens in paths never reach `url.path` or leak culprits; ordinary paths
    /// are untouched; the template of a redacted path is the raw path's.
    #[test]
    fn tokens_in_paths_are_redacted() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJlMTI";
        for (raw, want) in [
            (format!("/auth/{jwt}"), "/auth/REDACTED".to_string()),
            (
                "/reset/Kq3ZpW9xLm2N7vB4/confirm".into(),
                "/reset/REDACTED/confirm".into(),
            ),
            (
                "/cart;jsessionid=A1B2C3D4E5F6/items".into(),
                "/cart/items".into(),
            ),
            (
                "/u/550e8400-e29b-41d4-a716-446655440000".into(),
                "/u/REDACTED".into(),
            ),
            ("/orders/12345".into(), "/orders/12345".into()),
            (
                "/static/app-v2.min.js".into(),
                "/static/app-v2.min.js".into(),
            ),
            ("/".into(), "/".into()),
        ] {
            assert_eq!(redacted_path(&raw), want, "{raw}");
            assert_eq!(
                url_template(&redacted_path(&raw)),
                url_template(&raw),
                "{raw}"
            );
            assert!(
                !bounded_path(&raw).contains("Kq3ZpW9x") && !bounded_path(&raw).contains("eyJ")
            );
        }
    }
}
