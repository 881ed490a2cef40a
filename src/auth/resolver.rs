//! Where the layer finds the org of a request (L1).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::header::{HeaderName, HOST};
use http::{Extensions, HeaderMap, Method, Uri};

/// The parts of a request a resolver may look at.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub(crate) method: &'a Method,
    pub(crate) uri: &'a Uri,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) extensions: &'a Extensions,
}

impl<'a> RequestView<'a> {
    /// A view of a request's parts (for testing custom resolvers).
    pub fn new(
        method: &'a Method,
        uri: &'a Uri,
        headers: &'a HeaderMap,
        extensions: &'a Extensions,
    ) -> Self {
        Self {
            method,
            uri,
            headers,
            extensions,
        }
    }

    /// The request method.
    pub fn method(&self) -> &'a Method {
        self.method
    }

    /// The request URI.
    pub fn uri(&self) -> &'a Uri {
        self.uri
    }

    /// The request headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }

    /// The request extensions (for example connection info put there by the server).
    pub fn extensions(&self) -> &'a Extensions {
        self.extensions
    }
}

/// Finds the org a request is for. The result is only a claim: the key is checked against
/// that org's key, so a resolver decides which key applies, never whether a request passes.
pub trait OrgResolver: Send + Sync + 'static {
    /// The org id claimed by the request, or `None` if it names none.
    fn resolve<'a>(&self, request: &RequestView<'a>) -> Option<Cow<'a, str>>;
}

impl fmt::Debug for dyn OrgResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OrgResolver")
    }
}

/// Reads the org id from a header (default `X-Org-Id`). A request with the header twice names
/// no org.
#[derive(Debug, Clone)]
pub struct HeaderOrgResolver {
    header: HeaderName,
}

impl HeaderOrgResolver {
    /// Reads the org id from `header`.
    pub fn new(header: HeaderName) -> Self {
        Self { header }
    }
}

impl Default for HeaderOrgResolver {
    fn default() -> Self {
        Self::new(HeaderName::from_static(crate::auth::DEFAULT_ORG_HEADER))
    }
}

impl OrgResolver for HeaderOrgResolver {
    fn resolve<'a>(&self, request: &RequestView<'a>) -> Option<Cow<'a, str>> {
        single_header(request.headers, &self.header)
            .and_then(|v| v.to_str().ok())
            .map(Cow::Borrowed)
    }
}

/// Takes the org id from the first label of the host name under a fixed domain:
/// with domain `api.example.com`, host `acme.api.example.com:8443` is org `acme`.
///
/// The host comes from the URI's authority (HTTP/2, absolute-form) or the `Host` header.
/// Hosts outside the domain, and hosts with more than one label before it, name no org.
#[derive(Debug, Clone)]
pub struct HostOrgResolver {
    suffix: Arc<str>,
}

impl HostOrgResolver {
    /// Resolves orgs from subdomains of `domain` (without a leading dot).
    pub fn subdomain_of(domain: &str) -> Self {
        let domain = domain.trim_start_matches('.').to_ascii_lowercase();
        Self {
            suffix: Arc::from(format!(".{domain}")),
        }
    }
}

impl OrgResolver for HostOrgResolver {
    fn resolve<'a>(&self, request: &RequestView<'a>) -> Option<Cow<'a, str>> {
        let host = match request.uri.host() {
            Some(host) => host,
            None => single_header(request.headers, &HOST)?.to_str().ok()?,
        };
        let host = strip_port(host);
        let suffix: &str = &self.suffix;
        if host.len() <= suffix.len() {
            return None;
        }
        let (label, tail) = host.split_at(host.len() - suffix.len());
        if !tail.eq_ignore_ascii_case(suffix) || label.contains('.') {
            return None;
        }
        Some(Cow::Borrowed(label))
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host; // IPv6 literals never match a domain suffix
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// A resolver from a closure returning an owned id: `FnOrgResolver::new(|req| ...)`.
pub struct FnOrgResolver<F>(F);

impl<F> FnOrgResolver<F>
where
    F: Fn(&RequestView<'_>) -> Option<String> + Send + Sync + 'static,
{
    /// Wraps `f`.
    pub fn new(f: F) -> Self {
        Self(f)
    }
}

impl<F> fmt::Debug for FnOrgResolver<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnOrgResolver").finish_non_exhaustive()
    }
}

impl<F> OrgResolver for FnOrgResolver<F>
where
    F: Fn(&RequestView<'_>) -> Option<String> + Send + Sync + 'static,
{
    fn resolve<'a>(&self, request: &RequestView<'a>) -> Option<Cow<'a, str>> {
        (self.0)(request).map(Cow::Owned)
    }
}

/// The value of `name` if it occurs exactly once.
pub(crate) fn single_header<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Option<&'a http::HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    match values.next() {
        Some(_) => None,
        None => Some(first),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(resolver: &dyn OrgResolver, uri: &str, headers: &[(&str, &str)]) -> Option<String> {
        let uri: Uri = uri.parse().unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let ext = Extensions::new();
        let view = RequestView::new(&Method::GET, &uri, &map, &ext);
        resolver.resolve(&view).map(Cow::into_owned)
    }

    #[test]
    fn header_resolver_reads_default_header_once() {
        let r = HeaderOrgResolver::default();
        assert_eq!(
            resolve(&r, "/", &[("x-org-id", "acme")]).as_deref(),
            Some("acme")
        );
        assert_eq!(resolve(&r, "/", &[]), None);
        assert_eq!(
            resolve(&r, "/", &[("x-org-id", "acme"), ("x-org-id", "evil")]),
            None,
            "a duplicated org header is ambiguous and names no org"
        );
    }

    #[test]
    fn host_resolver_takes_one_label_under_the_domain() {
        let r = HostOrgResolver::subdomain_of("api.example.com");
        assert_eq!(
            resolve(&r, "/", &[("host", "acme.api.example.com:8443")]).as_deref(),
            Some("acme")
        );
        assert_eq!(
            resolve(&r, "/", &[("host", "ACME.API.Example.com")]).as_deref(),
            Some("ACME")
        );
        assert_eq!(
            resolve(&r, "http://beta.api.example.com/x", &[]).as_deref(),
            Some("beta")
        );
        assert_eq!(resolve(&r, "/", &[("host", "api.example.com")]), None);
        assert_eq!(resolve(&r, "/", &[("host", "a.b.api.example.com")]), None);
        assert_eq!(resolve(&r, "/", &[("host", "acme.evil.com")]), None);
        assert_eq!(resolve(&r, "/", &[("host", "acmeapi.example.com")]), None);
        assert_eq!(resolve(&r, "/", &[]), None);
    }

    #[test]
    fn closure_resolver_is_called() {
        let r = FnOrgResolver::new(|req: &RequestView<'_>| {
            req.uri()
                .path()
                .strip_prefix("/orgs/")
                .and_then(|rest| rest.split('/').next())
                .map(str::to_owned)
        });
        assert_eq!(resolve(&r, "/orgs/acme/x", &[]).as_deref(), Some("acme"));
        assert_eq!(resolve(&r, "/other", &[]), None);
    }
}
