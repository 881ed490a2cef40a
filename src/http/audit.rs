//! [`AuditLogEndpoint`]: `GET /api/v1/auditLog`, the org's key and subscription changes,
//! newest first, paged (K7).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use tower_service::Service;

use crate::keys::{KeyAdmin, KeyError};
use crate::response::{
    bad_request, error, fixed, internal_error, value as json_value, SESSION_NOT_VALID,
};
use crate::Authenticated;

/// Default and largest page size.
pub const DEFAULT_PAGE: u32 = 50;
/// Largest page size accepted.
pub const MAX_PAGE: u32 = 500;

/// The audit-log endpoint, a tower service behind
/// [`OrgKeyLayer::with_sessions`](crate::OrgKeyLayer::with_sessions): any admin session of
/// the org may read the org's audit log (direct-key requests may not: 403).
///
/// `GET` with optional query parameters `limit` (1-500, default 50) and `before` (a `seq` from
/// a previous page, exclusive) answers `200` with a JSON array, newest first:
///
/// ```json
/// [{"seq": 12, "action": "regenerate", "actor": "admin@acme.example",
///   "time": 1764150999, "generation": 7}]
/// ```
///
/// (`time` in epoch seconds). The next page is `?before=<last seq>`. Records never contain
/// key material. Without a store configured on the [`KeyAdmin`] (`KeyAdmin::open`), it
/// answers `501`. Any other method: `405`.
#[derive(Debug, Clone)]
pub struct AuditLogEndpoint {
    keys: KeyAdmin,
}

impl AuditLogEndpoint {
    /// The endpoint over `keys`' store.
    pub fn new(keys: KeyAdmin) -> Self {
        Self { keys }
    }
}

#[derive(Serialize)]
struct Entry<'a> {
    seq: u64,
    action: &'static str,
    actor: &'a str,
    time: u64,
    generation: u64,
}

/// `limit` and `before` from the query string.
fn page(query: Option<&str>) -> Result<(u32, Option<u64>), &'static str> {
    let (mut limit, mut before) = (DEFAULT_PAGE, None);
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|l| (1..=MAX_PAGE).contains(l))
                    .ok_or("limit must be a whole number from 1 to 500")?;
            }
            "before" => {
                before = Some(
                    value
                        .parse()
                        .map_err(|_| "before must be a seq from a previous page")?,
                );
            }
            _ => {}
        }
    }
    Ok((limit, before))
}

impl<B: Send + 'static> Service<Request<B>> for AuditLogEndpoint {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let keys = self.keys.clone();
        Box::pin(async move { Ok(respond(keys, request).await) })
    }
}

async fn respond<B>(keys: KeyAdmin, request: Request<B>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "use GET",
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    let Some(auth) = request.extensions().get::<Authenticated>() else {
        return fixed(StatusCode::UNAUTHORIZED, SESSION_NOT_VALID);
    };
    if auth.admin().is_none() {
        return error(
            StatusCode::FORBIDDEN,
            "NOT_AUTHORIZED",
            "the audit log is for the org's admins: log in",
        );
    }
    let (limit, before) = match page(request.uri().query()) {
        Ok(page) => page,
        Err(message) => return bad_request(message),
    };
    match keys.audit_page(&auth.org_id(), before, limit).await {
        Ok(records) => {
            let entries: Vec<Entry<'_>> = records
                .iter()
                .map(|r| Entry {
                    seq: r.seq,
                    action: r.event.action.as_str(),
                    actor: r.event.actor.as_str(),
                    time: r
                        .event
                        .at
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                    generation: r.event.generation.get(),
                })
                .collect();
            json_value(StatusCode::OK, &entries)
        }
        Err(KeyError::NoStore) => error(
            StatusCode::NOT_IMPLEMENTED,
            "NOT_IMPLEMENTED",
            "this deployment keeps no audit log",
        ),
        Err(e) => {
            tracing::error!(target: "orgkey::audit", reason = e.as_str(), "audit log read failed");
            internal_error()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_parameters_are_validated() {
        assert_eq!(page(None), Ok((50, None)));
        assert_eq!(page(Some("limit=2&before=9")), Ok((2, Some(9))));
        assert_eq!(page(Some("x=1")), Ok((50, None)));
        assert!(page(Some("limit=0")).is_err());
        assert!(page(Some("limit=501")).is_err());
        assert!(page(Some("before=abc")).is_err());
    }
}
