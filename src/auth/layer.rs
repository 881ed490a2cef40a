//! [`OrgKeyLayer`]: configuration, and the check itself.

use std::sync::Arc;

use http::header::{Entry, COOKIE};
use http::header::{HeaderName, HeaderValue};
use http::Request;
use tower_layer::Layer;

use super::extension::{AuthMethod, Authenticated};
use super::query::query_has_key;
use super::rejection::RejectionReason;
use super::resolver::{HeaderOrgResolver, OrgResolver, RequestView};
use super::service::OrgKeyAuth;
use super::DEFAULT_KEY_HEADER;
use crate::org::InlineOrgId;
use crate::session::{strip_session_cookie, SessionCheck, SessionIdentity, Sessions};
use crate::table::OrgTable;

/// Something that must live as long as the services built from a layer (the composition
/// root's change feed).
pub(crate) type KeepAlive = Arc<dyn std::any::Any + Send + Sync>;

/// Layer that authenticates requests against an [`OrgTable`] (L1-L4).
///
/// Defaults: the org from header `X-Org-Id`, the key from header `X-API-Key`, realm `orgkey`.
/// See the [module docs](crate::auth) for the acceptance rules and an example.
#[derive(Clone, Debug)]
pub struct OrgKeyLayer {
    config: Arc<Config>,
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    table: OrgTable,
    sessions: Option<Sessions>,
    keyless_sessions: bool,
    resolver: Arc<dyn OrgResolver>,
    key_header: HeaderName,
    pub(crate) challenge: HeaderValue,
    /// What must live as long as the services built from this layer (the composition
    /// root's change feed).
    keep_alive: Option<KeepAlive>,
}

impl OrgKeyLayer {
    /// A layer checking keys against `table`, with the default headers.
    pub fn new(table: OrgTable) -> Self {
        Self {
            config: Arc::new(Config {
                table,
                sessions: None,
                keyless_sessions: false,
                resolver: Arc::new(HeaderOrgResolver::default()),
                key_header: HeaderName::from_static(DEFAULT_KEY_HEADER),
                challenge: challenge_for("orgkey", DEFAULT_KEY_HEADER),
                keep_alive: None,
            }),
        }
    }

    fn config_mut(&mut self) -> &mut Config {
        // Builders run before the layer is shared, so this does not clone in practice; if it
        // is shared, the change applies to this copy only.
        Arc::make_mut(&mut self.config)
    }

    /// Reads the key from `header` instead of `X-API-Key`.
    pub fn key_header(mut self, header: HeaderName) -> Self {
        let config = self.config_mut();
        config.challenge = challenge_for(realm_of(&config.challenge), header.as_str());
        config.key_header = header;
        self
    }

    /// Reads the org id from `header` instead of `X-Org-Id`.
    pub fn org_header(self, header: HeaderName) -> Self {
        self.org_resolver(HeaderOrgResolver::new(header))
    }

    /// Finds the org with `resolver` (for example [`HostOrgResolver`](super::HostOrgResolver)
    /// or a closure in [`FnOrgResolver`](super::FnOrgResolver)).
    pub fn org_resolver(mut self, resolver: impl OrgResolver) -> Self {
        self.config_mut().resolver = Arc::new(resolver);
        self
    }

    /// Also accepts admin sessions: a request without the key header but with a
    /// `JSESSIONID` cookie is authenticated by `sessions` (L1, S2). The org is the session's;
    /// if the request also names an org, it must be the same.
    pub fn with_sessions(mut self, sessions: Sessions) -> Self {
        self.config_mut().sessions = Some(sessions);
        self
    }

    /// Also accepts sessions of an org that has no key: the session of an admin who deleted
    /// the key through [`KeyManagementEndpoint`](crate::KeyManagementEndpoint) and had it
    /// carried over (W2), so that the admin can add a new key.
    ///
    /// Use it only on the layer in front of the key-management endpoints and the audit log.
    /// Without it (the default) such a session is refused (`401 SESSION_NOT_VALID`, reason
    /// `session_key_changed`): K5, no request for an org without a key succeeds.
    pub fn allow_keyless_sessions(mut self) -> Self {
        self.config_mut().keyless_sessions = true;
        self
    }

    /// Keeps `handle` alive as long as any service built from this layer.
    pub(crate) fn keep_alive(mut self, handle: KeepAlive) -> Self {
        self.config_mut().keep_alive = Some(handle);
        self
    }

    /// Sets the realm named in the `WWW-Authenticate` challenge.
    ///
    /// # Panics
    ///
    /// If `realm` contains characters other than visible ASCII without `"` and `\`.
    pub fn realm(mut self, realm: &str) -> Self {
        assert!(
            realm
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\'),
            "realm must be visible ASCII without quotes or backslashes"
        );
        let config = self.config_mut();
        config.challenge = challenge_for(realm, config.key_header.as_str());
        self
    }

    /// The table this layer checks against.
    pub fn table(&self) -> &OrgTable {
        &self.config.table
    }
}

fn challenge_for(realm: &str, key_header: &str) -> HeaderValue {
    // Both parts were validated (realm by `realm`, header by `HeaderName`), so this is a
    // valid header value.
    HeaderValue::from_str(&format!(r#"ApiKey realm="{realm}", header="{key_header}""#))
        .unwrap_or_else(|_| HeaderValue::from_static("ApiKey"))
}

fn realm_of(challenge: &HeaderValue) -> &str {
    challenge
        .to_str()
        .ok()
        .and_then(|s| s.split('"').nth(1))
        .unwrap_or("orgkey")
}

impl<S> Layer<S> for OrgKeyLayer {
    type Service = OrgKeyAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OrgKeyAuth::new(inner, Arc::clone(&self.config))
    }
}

impl Config {
    /// The whole check of L1-L4 on a request's head: resolver, key header, one table lookup.
    ///
    /// On success the key header is removed (L2). Nothing is logged here; the caller logs the
    /// decision once.
    pub(crate) fn authenticate<B>(
        &self,
        request: &mut Request<B>,
    ) -> Result<Authenticated, (RejectionReason, Option<InlineOrgId>)> {
        // F1: while a change feed is reconnecting, nothing is accepted (fail closed).
        if !self.table.is_trusted() {
            return Err((RejectionReason::Unavailable, None));
        }
        // One `Cookie` lookup serves the session decision and L2's removal below; the key
        // header is looked up here only when there is a cookie (measured: the gateway's
        // direct-key requests, docs/hot-path-profile.md).
        let has_cookie = self.sessions.is_some() && request.headers().contains_key(COOKIE);
        if let Some(sessions) = &self.sessions {
            if has_cookie && !request.headers().contains_key(&self.key_header) {
                // One check per request, shared with the CSRF guard and the endpoints.
                match sessions.check_request(request) {
                    SessionCheck::Absent => {}
                    SessionCheck::Several => return Err((RejectionReason::SessionAmbiguous, None)),
                    SessionCheck::Dead(reason) => return Err((reason.into(), None)),
                    SessionCheck::Live(live) => {
                        return self.authenticate_session(request, &live.identity)
                    }
                }
            }
        }
        let view = RequestView::new(
            request.method(),
            request.uri(),
            request.headers(),
            request.extensions(),
        );
        let Some(claimed) = self.resolver.resolve(&view) else {
            // Neither a key nor a session: a ZIA client's session is what is missing.
            let reason =
                if self.sessions.is_some() && !request.headers().contains_key(&self.key_header) {
                    RejectionReason::SessionMissing
                } else {
                    RejectionReason::MissingOrg
                };
            return Err((reason, None));
        };
        // A copy on the stack: ends the borrow of the headers, and is what the inner service
        // will see. `None` for ids too long to exist: refused below, before any lookup.
        let org = InlineOrgId::copy(&claimed);
        drop(claimed);
        let headers = request.headers_mut();
        // `HeaderMap::entry` makes room for an insert first: on a full map (hyper reserves
        // exactly the headers it parsed, so 6, 12 or 24 headers fill it) that reallocates the
        // whole map. Then read with `get_all` and remove with a second lookup instead.
        let (org, generation) = if headers.len() >= headers.capacity() {
            let key = match one_value(headers.get_all(&self.key_header).iter()) {
                Ok(key) => key,
                Err(None) => return Err((self.missing_key(request.uri()), org)),
                Err(Some(ambiguous)) => return Err((ambiguous, org)),
            };
            let checked = self.check_key(org, key.as_bytes())?;
            headers.remove(&self.key_header);
            checked
        } else {
            // One lookup of the key header serves the check and the removal (L2).
            let Entry::Occupied(entry) = headers.entry(&self.key_header) else {
                return Err((self.missing_key(request.uri()), org));
            };
            let key = match one_value(entry.iter()) {
                Ok(key) => key,
                Err(None) => return Err((self.missing_key(request.uri()), org)),
                Err(Some(ambiguous)) => return Err((ambiguous, org)),
            };
            let checked = self.check_key(org, key.as_bytes())?;
            entry.remove();
            checked
        };
        // L2: the inner service never sees orgkey's credentials, whichever one
        // authenticated: a session cookie sent beside the key goes too.
        if has_cookie {
            strip_session_cookie(request.headers_mut());
        }
        Ok(Authenticated::new(org, generation, AuthMethod::ApiKey))
    }

    /// No key header: `KeyInQuery` if the query seems to carry one (never accepted, L1).
    /// (A key header present twice is ambiguous: `MalformedKey`, from [`one_value`].)
    fn missing_key(&self, uri: &http::Uri) -> RejectionReason {
        if query_has_key(uri.query(), &self.key_header) {
            RejectionReason::KeyInQuery
        } else {
            RejectionReason::MissingKey
        }
    }

    /// The org's key against `presented` (one snapshot, constant time, L4).
    fn check_key(
        &self,
        org: Option<InlineOrgId>,
        presented: &[u8],
    ) -> Result<(InlineOrgId, crate::org::Generation), (RejectionReason, Option<InlineOrgId>)> {
        let Some(org) = org else {
            // Same order of checks as `OrgTable::verify`: the key's format first.
            let reason = match self.table.format().validate(presented) {
                Ok(()) => RejectionReason::UnknownOrg,
                Err(_) => RejectionReason::MalformedKey,
            };
            return Err((reason, None));
        };
        match self.table.check(org.as_str(), presented, |_, g| g) {
            Ok(generation) => Ok((org, generation)),
            Err(e) => Err((e.into(), Some(org))),
        }
    }

    /// Session mode: the cookie's session decides the org and the admin. On success the
    /// session cookie is removed from the request, as the key header is (L2).
    fn authenticate_session<B>(
        &self,
        request: &mut Request<B>,
        identity: &SessionIdentity,
    ) -> Result<Authenticated, (RejectionReason, Option<InlineOrgId>)> {
        let org = InlineOrgId::copy(identity.org.as_str());
        if !identity.has_key && !self.keyless_sessions {
            // K5: the key this session could stand for was deleted. `SESSION_NOT_VALID`
            // tells a ZIA client to log in again (which fails until a key is added).
            return Err((RejectionReason::SessionKeyChanged, org));
        }
        let view = RequestView::new(
            request.method(),
            request.uri(),
            request.headers(),
            request.extensions(),
        );
        if let Some(claimed) = self.resolver.resolve(&view) {
            if claimed != identity.org.as_str() {
                return Err((RejectionReason::SessionAmbiguous, org));
            }
        }
        let org = org.ok_or((RejectionReason::SessionNotFound, None))?;
        strip_session_cookie(request.headers_mut());
        Ok(Authenticated::new(
            org,
            identity.generation,
            AuthMethod::Session {
                admin: identity.admin.clone(),
                scopes: identity.scopes,
            },
        )
        .with_session(identity.digest))
    }

    pub(crate) fn key_header(&self) -> &HeaderName {
        &self.key_header
    }
}

/// The only value of a header: `Err(None)` when there is none, `Err(Some(MalformedKey))`
/// when there are several (ambiguous).
fn one_value<'a>(
    mut values: http::header::ValueIter<'a, HeaderValue>,
) -> Result<&'a HeaderValue, Option<RejectionReason>> {
    match (values.next(), values.next()) {
        (Some(value), None) => Ok(value),
        (None, _) => Err(None),
        (Some(_), Some(_)) => Err(Some(RejectionReason::MalformedKey)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_names_realm_and_header() {
        let layer = OrgKeyLayer::new(OrgTable::default())
            .realm("gw")
            .key_header(HeaderName::from_static("x-key"));
        assert_eq!(
            layer.config.challenge,
            HeaderValue::from_static(r#"ApiKey realm="gw", header="x-key""#)
        );
    }

    #[test]
    fn an_untrusted_table_fails_closed_with_503() {
        use tower_service::Service;
        let table = OrgTable::default();
        let mut svc = tower_layer::Layer::layer(&OrgKeyLayer::new(table.clone()), Never);
        table.set_trusted(false);
        let request = http::Request::get("/")
            .header("x-org-id", "acme")
            .header("x-api-key", "AbCdEf123456")
            .body(())
            .unwrap();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut future = std::pin::pin!(svc.call(request));
        let std::task::Poll::Ready(Ok(response)) =
            std::future::Future::poll(future.as_mut(), &mut cx)
        else {
            panic!("a rejection is ready at once");
        };
        assert_eq!(response.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
        table.set_trusted(true);
    }

    /// An inner service that must not be called.
    struct Never;

    impl tower_service::Service<http::Request<()>> for Never {
        type Response = http::Response<http_body_util::Empty<bytes::Bytes>>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            panic!("the inner service is not called while the table is untrusted")
        }
    }

    #[test]
    #[should_panic(expected = "realm must be visible ASCII")]
    fn realm_with_quote_panics() {
        let _ = OrgKeyLayer::new(OrgTable::default()).realm("a\"b");
    }
}
