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
pub(crate) fn url_template_into(path: &str, out: &mut String) {
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

/// `url.path` of a request target, bounded (as leak culprits keep it).
pub fn bounded_path(target: &str) -> String {
    crate::protocols::bounded_text(url_path(target).as_bytes(), 256)
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
}
