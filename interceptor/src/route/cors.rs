//! CORS on the outbound HTTP path, as Envoy's CORS filter runs the policy istiod puts on a
//! route from a VirtualService's `corsPolicy` (E: source/extensions/filters/http/cors/
//! cors_filter.cc): a preflight is answered here (its origin allowed, or not and not
//! forwarded), and an allowed origin's answers say so. Pure: the data path applies what this
//! says.

use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, ACCESS_CONTROL_ALLOW_CREDENTIALS,
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
};
use hyper::http::request::Parts;
use hyper::Method;

use crate::mesh::http_route::Cors;

/// What the policy does with a request.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// No origin, or one not allowed: nothing changes.
    Pass,
    /// An allowed origin's request: its answer gets the allow headers (`allow`).
    Allowed(HeaderValue),
    /// A preflight answered here: 200 with these headers, nothing goes upstream.
    Answer(HeaderMap),
}

pub fn step(c: &Cors, req: &Parts) -> Step {
    let Some(origin) = req.headers.get(ORIGIN).filter(|o| !o.is_empty()) else {
        return Step::Pass;
    };
    // A matcher that matches "*" allows every origin.
    let allowed = origin.to_str().is_ok_and(|o| {
        c.allow_origins
            .iter()
            .any(|m| m.matches("*") || m.matches(o))
    });
    let requested = req
        .headers
        .get(ACCESS_CONTROL_REQUEST_METHOD)
        .filter(|m| !m.is_empty());
    let preflight = req.method == Method::OPTIONS && requested.is_some();
    if !preflight || (!allowed && c.forward_unmatched_preflights) {
        return match allowed {
            true => Step::Allowed(origin.clone()),
            false => Step::Pass,
        };
    }
    let mut h = HeaderMap::new();
    if allowed {
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    }
    if c.allow_credentials {
        h.insert(
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    // "*" echoes what the preflight asks for.
    let mut put = |name: HeaderName, value: &str, asked: Option<&HeaderValue>| {
        let v = match value {
            "" => return,
            "*" => asked.cloned(),
            v => HeaderValue::from_str(v).ok(),
        };
        if let Some(v) = v {
            h.insert(name, v);
        }
    };
    put(ACCESS_CONTROL_ALLOW_METHODS, &c.allow_methods, requested);
    put(
        ACCESS_CONTROL_ALLOW_HEADERS,
        &c.allow_headers,
        req.headers.get(ACCESS_CONTROL_REQUEST_HEADERS),
    );
    put(ACCESS_CONTROL_MAX_AGE, &c.max_age, None);
    Step::Answer(h)
}

/// An allowed origin's answer: the origin, credentials and exposed headers the policy says.
pub fn allow(c: &Cors, origin: HeaderValue, headers: &mut HeaderMap) {
    headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    if c.allow_credentials {
        headers.insert(
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    if let Ok(v) = HeaderValue::from_str(&c.expose_headers) {
        if !c.expose_headers.is_empty() {
            headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::inbound::StringMatch;

    fn policy() -> Cors {
        Cors {
            allow_origins: vec![
                StringMatch::Exact("https://shop.example".into()),
                StringMatch::regex(r"https://.*\.partner\.example").unwrap(),
            ],
            allow_methods: "GET,POST".into(),
            allow_headers: "*".into(),
            expose_headers: "x-served-by".into(),
            max_age: "86400".into(),
            allow_credentials: true,
            forward_unmatched_preflights: true,
        }
    }

    fn req(method: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = hyper::Request::builder().method(method).uri("/cors");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn preflights_are_answered_and_allowed_origins_told_as_envoy_does() {
        let c = policy();
        let pre = req(
            "OPTIONS",
            &[
                ("origin", "https://a.partner.example"),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "x-custom"),
            ],
        );
        let Step::Answer(h) = step(&c, &pre) else {
            panic!("a preflight is answered")
        };
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "https://a.partner.example");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_METHODS], "GET,POST");
        assert_eq!(
            h[ACCESS_CONTROL_ALLOW_HEADERS], "x-custom",
            "* echoes the request"
        );
        assert_eq!(h[ACCESS_CONTROL_MAX_AGE], "86400");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        // Another origin's preflight goes upstream, or (IGNORE) is answered bare.
        let other = req(
            "OPTIONS",
            &[
                ("origin", "https://evil.example"),
                ("access-control-request-method", "POST"),
            ],
        );
        assert_eq!(step(&c, &other), Step::Pass);
        let ignore = Cors {
            forward_unmatched_preflights: false,
            ..policy()
        };
        let Step::Answer(h) = step(&ignore, &other) else {
            panic!("answered")
        };
        assert!(h.get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
        // OPTIONS without a requested method is no preflight.
        let plain = req("OPTIONS", &[("origin", "https://shop.example")]);
        assert!(matches!(step(&c, &plain), Step::Allowed(_)));
        assert_eq!(step(&c, &req("GET", &[])), Step::Pass);
        let Step::Allowed(o) = step(&c, &req("GET", &[("origin", "https://shop.example")])) else {
            panic!("allowed")
        };
        let mut answer = HeaderMap::new();
        allow(&c, o, &mut answer);
        assert_eq!(answer[ACCESS_CONTROL_ALLOW_ORIGIN], "https://shop.example");
        assert_eq!(answer[ACCESS_CONTROL_EXPOSE_HEADERS], "x-served-by");
    }
}
