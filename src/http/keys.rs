//! [`KeyManagementEndpoint`]: Zscaler's `apiKeys` resource over HTTP (PROTOCOL.md, "Key
//! management endpoints"; K2-K9).
//!
//! The endpoint is a tower service that sits *behind* [`OrgKeyLayer`](crate::OrgKeyLayer)
//! configured [`with_sessions`](crate::OrgKeyLayer::with_sessions): the layer authenticates
//! the request, and the endpoint authorizes it with [`KeyAdmin::for_session`] (an admin
//! session holding the `key-admin` scope) and turns the [`SessionKeyAdmin`] operations into
//! JSON responses.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ALLOW, CACHE_CONTROL, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tower_service::Service;
use zeroize::Zeroizing;

use crate::key::{ApiKey, KeyFormat};
use crate::keys::{KeyAdmin, KeyError, KeyInfo, SessionKeyAdmin};
use crate::response::{self, JsonBody, SESSION_NOT_VALID};
use crate::session::{KeyChange, Sessions};
use crate::Authenticated;

/// Largest `PUT /apiKeys/1` body accepted, in bytes.
pub const MAX_KEY_BODY: usize = 4096;

/// The full path under which PROTOCOL.md places the resource; stripped when present.
const FULL_PREFIX: &str = "/api/v1/apiKeys";
/// The resource path below the `/api/v1` base URL; stripped when present.
const BASE_PREFIX: &str = "/apiKeys";

const NOT_FOUND: &str = r#"{"code":"RESOURCE_NOT_FOUND","message":"no such API key"}"#;
/// How `PUT /apiKeys/1` reads its body.
const KEY_BODY: JsonBody = JsonBody {
    limit: MAX_KEY_BODY,
    too_large: r#"{"code":"PAYLOAD_TOO_LARGE","message":"request body larger than 4096 bytes"}"#,
    not_object: "the body must be a JSON object with a keyValue string",
    invalid: "the body must be a JSON object with a keyValue string",
};

/// The key-management endpoints, a tower service: Zscaler's `apiKeys` resource, plus add,
/// edit and delete (PROTOCOL.md).
///
/// # Mounting
///
/// Put it behind [`OrgKeyLayer::with_sessions`](crate::OrgKeyLayer::with_sessions), which
/// sets the [`Authenticated`] extension it reads. The endpoint matches the *tail* of the
/// request path, so it works both where the router strips the mount point and where it does
/// not:
///
/// - under axum's `Router::nest_service("/api/v1/apiKeys", ..)`, which strips the prefix,
///   it sees `/`, `/1` and `/1/regenerate`;
/// - seeing the full path (for example as the whole service, or through
///   `Router::route_service`), it strips a leading `/api/v1/apiKeys`, or `/apiKeys` (for a
///   service mounted below a router nested at `/api/v1`), and matches the rest.
///
/// ```
/// use axum::Router;
/// use bytes::Bytes;
/// use http::{Request, StatusCode};
/// use http_body_util::Full;
/// use orgkey::{Actor, Admins, KeyAdmin, KeyManagementEndpoint, OrgId, OrgKeyLayer, OrgTable, Sessions};
/// use tower::{ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let keys = KeyAdmin::new(OrgTable::default());
/// let acme = OrgId::new("acme").unwrap();
/// keys.create_org(&acme).await.unwrap();
/// let info = keys.subscribe(&acme, &Actor::new("provisioning").unwrap()).await.unwrap();
/// let key = info.key().unwrap().expose_secret().to_owned();
/// let sessions = Sessions::new(keys.table().clone(), Admins::new(keys.table().clone()));
///
/// let endpoint = ServiceBuilder::new()
///     .layer(OrgKeyLayer::new(keys.table().clone()).with_sessions(sessions))
///     .service(KeyManagementEndpoint::new(keys));
///
/// // Mounted with axum: the endpoint sees "/", "/1", "/1/regenerate".
/// let app = Router::new().nest_service("/api/v1/apiKeys", endpoint.clone());
/// // A direct-key request is authenticated, but only admin sessions with the `key-admin`
/// // scope manage keys: 403 (so the path did reach the endpoint).
/// let direct = |uri: &str| {
///     Request::get(uri).header("x-org-id", "acme").header("x-api-key", &key)
///         .body(axum::body::Body::empty()).unwrap()
/// };
/// let response = app.clone().oneshot(direct("/api/v1/apiKeys")).await.unwrap();
/// assert_eq!(response.status(), StatusCode::FORBIDDEN);
/// // One key per org, and its id is always 1.
/// let response = app.oneshot(direct("/api/v1/apiKeys/2")).await.unwrap();
/// assert_eq!(response.status(), StatusCode::NOT_FOUND);
///
/// // Seeing the full path works the same.
/// let request = Request::get("/api/v1/apiKeys/1").header("x-org-id", "acme")
///     .header("x-api-key", &key).body(Full::<Bytes>::default()).unwrap();
/// let response = endpoint.oneshot(request).await.unwrap();
/// assert_eq!(response.status(), StatusCode::FORBIDDEN);
/// # }
/// ```
///
/// # Requests and responses
///
/// An org has at most one key (K2), so the resource id is always `1`; any other id is `404`.
/// The resource:
///
/// ```json
/// {"id": 1, "keyValue": "AbCdEf123456", "permissions": [], "enabled": true,
///  "lastModifiedTime": 1764150999, "lastModifiedBy": {"id": 1234567, "name": "alice@acme.example"}}
/// ```
///
/// `lastModifiedTime` is in seconds since the Unix epoch. `lastModifiedBy.name` is the admin
/// (or system actor) that made the last change (K7); `lastModifiedBy.id` is derived from that
/// name, since orgkey has no numeric admin ids: the first four bytes of the SHA-256 digest of
/// the name, big-endian, with the top bit cleared (so it fits a signed 32-bit integer). It is
/// stable for a name and says nothing else. Should a key have no recorded modifier,
/// `lastModifiedTime` is `0` and `lastModifiedBy` is `null`.
///
/// | request | success | refusals |
/// | --- | --- | --- |
/// | `GET /apiKeys` | 200 `[resource]`, or `[]` when the org has no key | |
/// | `GET /apiKeys/1` | 200 resource | 404 no key |
/// | `POST /apiKeys` (add a random key, K3; body ignored) | 200 resource | 409 `DUPLICATE_ITEM` while a key exists (K2) |
/// | `PUT /apiKeys/1` `{"keyValue": "..."}` (edit, K4) | 200 resource | 415 not JSON, 413 over 4 KiB, 400 `INVALID_INPUT_ARGUMENT` (malformed, no `keyValue`, or not a valid key per K1: the message never contains the value), 404 no key |
/// | `POST /apiKeys/1/regenerate` (K3; body ignored) | 200 resource | 404 no key |
/// | `DELETE /apiKeys/1` (K5; body ignored) | 204, empty | 404 no key |
///
/// For every request: `401 SESSION_NOT_VALID` without an [`Authenticated`] extension (the
/// endpoint is not behind the layer: a misconfiguration, refused rather than served);
/// `403 NOT_AUTHORIZED` for direct-key requests and sessions without `key-admin`;
/// `403 NOT_SUBSCRIBED` for an org without an API subscription (K8); `409 EDIT_CONFLICT`
/// when a concurrent change won (P1; look and retry); `500 INTERNAL_ERROR` if the OS random
/// number generator fails or the store cannot commit the change. A known path with another
/// method is `405` with `Allow`; any other path is `404 RESOURCE_NOT_FOUND`. The checks run in
/// that order: extension (401), path (404), method (405), authorization (403), then the body
/// (415, 413, 400) and the operation, so a caller without `key-admin` never has its body read
/// and learns nothing of the org's key. Error bodies are `{"code","message"}`. Every response
/// has `Cache-Control: no-store`, and every response with a body `Content-Type:
/// application/json`. A refused change changes nothing.
///
/// # Sessions end with the change (K6), but the acting one can be carried over (W2)
///
/// Every change (add, edit, regenerate, delete) moves the org to a new generation, which ends
/// every session of the org, *including the one that made the change*. A change made through
/// a session applies only to the state that session was checked against: if another change
/// came first, the session is already dead and the request gets `409 EDIT_CONFLICT`
/// (nothing changes).
///
/// By default the request that made the change still gets its response, the next request
/// with that cookie gets `401 SESSION_NOT_VALID`, and the admin logs in again with the new
/// key; after a delete no login for the org succeeds until a key is added out of band (for
/// example by [`KeyAdmin::add`] or a new subscription): K5 applies to admins too.
///
/// Built [`with_sessions`](KeyManagementEndpoint::with_sessions) (as the gateway and its
/// admin page are), the response to a successful change also carries `Set-Cookie` for a
/// successor session of the acting admin, created under the new generation
/// (W2): the admin who regenerated, edited or deleted the key stays
/// signed in, and after a delete can still list and add a key. Clients that keep cookies
/// (the Zscaler SDKs use a cookie jar or re-login on `401`) work either way. The successor
/// keeps the original login time, so the absolute lifetime is not extended. A session of an
/// org without a key is refused everywhere except behind a layer built with
/// [`OrgKeyLayer::allow_keyless_sessions`](crate::OrgKeyLayer::allow_keyless_sessions),
/// which belongs only in front of this endpoint and the audit log.
///
/// # Secrets
///
/// The key appears in these responses' bodies only: never in logs, errors or audit events.
/// A rejected `keyValue` is never echoed. Request bodies are wiped after parsing
/// (best-effort); response bodies belong to the server once returned.
#[derive(Clone)]
pub struct KeyManagementEndpoint {
    keys: KeyAdmin,
    sessions: Option<Sessions>,
}

impl fmt::Debug for KeyManagementEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyManagementEndpoint")
            .field("keys", &self.keys)
            .field("carries_sessions_over", &self.sessions.is_some())
            .finish()
    }
}

impl KeyManagementEndpoint {
    /// The endpoint managing keys through `keys`, which must change the table the layer in
    /// front of it checks against.
    pub fn new(keys: KeyAdmin) -> Self {
        Self {
            keys,
            sessions: None,
        }
    }

    /// Carries the acting admin's session over each change it makes (W2): the response to
    /// a successful add, edit, regenerate or delete also sets a new `JSESSIONID` cookie, for
    /// a session of the same admin under the new generation
    /// (created only right after this session's own change, with the original login time).
    /// `sessions` must be the ones the layer in front checks.
    /// Every other session of the org still ends (K6).
    pub fn with_sessions(mut self, sessions: Sessions) -> Self {
        self.sessions = Some(sessions);
        self
    }
}

/// Where a path leads, below the mount point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `/apiKeys`
    Collection,
    /// `/apiKeys/1`
    Item,
    /// `/apiKeys/1/regenerate`
    Regenerate,
}

/// What the request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    List,
    Add,
    View,
    Edit,
    Regenerate,
    Delete,
}

/// Matches the path's tail (see [`KeyManagementEndpoint`], "Mounting").
fn route(path: &str) -> Option<Route> {
    let tail = [FULL_PREFIX, BASE_PREFIX]
        .into_iter()
        .find_map(|prefix| {
            path.strip_prefix(prefix)
                .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        })
        .unwrap_or(path);
    match tail {
        "" | "/" => Some(Route::Collection),
        "/1" => Some(Route::Item),
        "/1/regenerate" => Some(Route::Regenerate),
        _ => None,
    }
}

/// The operation for `method` on `route`, or the `Allow` header value.
fn operation(route: Route, method: &Method) -> Result<Operation, &'static str> {
    match (route, method) {
        (Route::Collection, &Method::GET) => Ok(Operation::List),
        (Route::Collection, &Method::POST) => Ok(Operation::Add),
        (Route::Collection, _) => Err("GET, POST"),
        (Route::Item, &Method::GET) => Ok(Operation::View),
        (Route::Item, &Method::PUT) => Ok(Operation::Edit),
        (Route::Item, &Method::DELETE) => Ok(Operation::Delete),
        (Route::Item, _) => Err("GET, PUT, DELETE"),
        (Route::Regenerate, &Method::POST) => Ok(Operation::Regenerate),
        (Route::Regenerate, _) => Err("POST"),
    }
}

/// The resource of PROTOCOL.md.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KeyResource<'a> {
    id: u32,
    key_value: &'a str,
    permissions: [&'static str; 0],
    enabled: bool,
    last_modified_time: u64,
    last_modified_by: Option<Modifier<'a>>,
    /// Strict fleet mode only, when replicas did not confirm the change in time (F1): says
    /// the change is committed and names them. Clients that do not know it ignore it.
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet_warning: Option<String>,
}

#[derive(Serialize)]
struct Modifier<'a> {
    id: u32,
    name: &'a str,
}

/// The numeric id shown for an admin or actor name: the first four bytes of SHA-256 of the
/// name, big-endian, top bit cleared.
fn modifier_id(name: &str) -> u32 {
    let digest = Sha256::digest(name.as_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) & 0x7fff_ffff
}

fn epoch_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// The resource for `info`'s key, or `None` when the org has no key.
fn resource(info: &KeyInfo) -> Option<KeyResource<'_>> {
    let key = info.key()?;
    let by = info.last_modified_by();
    Some(KeyResource {
        id: 1,
        key_value: key.expose_secret(),
        permissions: [],
        enabled: info.enabled(),
        last_modified_time: match (by, info.last_modified_on()) {
            (Some(_), Some(at)) => epoch_seconds(at),
            _ => 0,
        },
        last_modified_by: by.map(|actor| Modifier {
            id: modifier_id(actor.as_str()),
            name: actor.as_str(),
        }),
        fleet_warning: info.unconfirmed().map(ToString::to_string),
    })
}

fn not_found() -> Response<Full<Bytes>> {
    response::fixed(StatusCode::NOT_FOUND, NOT_FOUND)
}

/// 200 with the resource, or 404 when the org has no key.
fn one(info: &KeyInfo) -> Response<Full<Bytes>> {
    match resource(info) {
        Some(resource) => response::value(StatusCode::OK, &resource),
        None => not_found(),
    }
}

/// The response for a refused admin call. Nothing was changed.
fn refused(error_: &KeyError) -> Response<Full<Bytes>> {
    let message = error_.to_string();
    match error_ {
        KeyError::Forbidden => response::error(StatusCode::FORBIDDEN, "NOT_AUTHORIZED", &message),
        KeyError::NoSubscription => {
            response::error(StatusCode::FORBIDDEN, "NOT_SUBSCRIBED", &message)
        }
        KeyError::KeyExists => response::error(StatusCode::CONFLICT, "DUPLICATE_ITEM", &message),
        KeyError::Conflict => response::error(StatusCode::CONFLICT, "EDIT_CONFLICT", &message),
        // The key's message names the rule broken and a length or position, never the value.
        KeyError::InvalidKey(format) => response::bad_request(&format.to_string()),
        // No key, or (were orgs ever removed) no org: there is no such resource.
        KeyError::NoKey | KeyError::UnknownOrg => not_found(),
        KeyError::Randomness(_)
        | KeyError::OrgExists
        | KeyError::AlreadySubscribed
        | KeyError::Store(_)
        | KeyError::NoStore => {
            tracing::error!(
                target: "orgkey::http::keys",
                reason = error_.as_str(),
                "key management request failed"
            );
            response::internal_error()
        }
    }
}

impl<B> Service<Request<B>> for KeyManagementEndpoint
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let ready = |response| -> Self::Future { Box::pin(std::future::ready(Ok(response))) };
        let Some(auth) = request.extensions().get::<Authenticated>() else {
            tracing::error!(
                target: "orgkey::http::keys",
                "request without Authenticated: KeyManagementEndpoint must be behind OrgKeyLayer"
            );
            let mut response = response::fixed(StatusCode::UNAUTHORIZED, SESSION_NOT_VALID);
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("ApiKey"));
            return ready(response);
        };
        let Some(route) = route(request.uri().path()) else {
            return ready(not_found());
        };
        let operation = match operation(route, request.method()) {
            Ok(operation) => operation,
            Err(allow) => {
                let mut response = response::error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "METHOD_NOT_ALLOWED",
                    &format!("use {allow}"),
                );
                response
                    .headers_mut()
                    .insert(ALLOW, HeaderValue::from_static(allow));
                return ready(response);
            }
        };
        let admin = match self.keys.for_session(auth) {
            Ok(admin) => admin,
            Err(e) => return ready(refused(&e)),
        };
        match operation {
            Operation::List => ready(match admin.view() {
                Ok(info) => response::value(StatusCode::OK, &Vec::from_iter(resource(&info))),
                Err(e) => refused(&e),
            }),
            Operation::View => ready(match admin.view() {
                Ok(info) => one(&info),
                Err(e) => refused(&e),
            }),
            Operation::Add => {
                let carry = self.carry(auth);
                Box::pin(async move { Ok(carry.finish(admin.add().await, one).await) })
            }
            Operation::Regenerate => {
                let carry = self.carry(auth);
                Box::pin(async move { Ok(carry.finish(admin.regenerate().await, one).await) })
            }
            Operation::Delete => {
                let carry = self.carry(auth);
                Box::pin(async move { Ok(carry.finish(admin.delete().await, deleted).await) })
            }
            Operation::Edit => {
                let format = self.keys.table().format();
                let carry = self.carry(auth);
                Box::pin(async move {
                    Ok(match edit(admin, format, request).await {
                        Ok(result) => carry.finish(result, one).await,
                        Err(response) => response,
                    })
                })
            }
        }
    }
}

impl KeyManagementEndpoint {
    fn carry(&self, auth: &Authenticated) -> CarryOver {
        CarryOver {
            sessions: self.sessions.clone(),
            auth: auth.clone(),
        }
    }
}

/// What a change's response needs to carry the acting session over (W2).
struct CarryOver {
    sessions: Option<Sessions>,
    auth: Authenticated,
}

impl CarryOver {
    /// The response for a change's `result`: `respond` on success (plus the successor
    /// session's cookie, when configured), the refusal otherwise.
    async fn finish(
        self,
        result: Result<KeyInfo, KeyError>,
        respond: fn(&KeyInfo) -> Response<Full<Bytes>>,
    ) -> Response<Full<Bytes>> {
        let info = match result {
            Ok(info) => info,
            Err(e) => return refused(&e),
        };
        let mut response = respond(&info);
        if let Some(unconfirmed) = info.unconfirmed() {
            // Also for a delete's empty answer: the header says it plainly.
            let names: String = unconfirmed
                .replicas
                .join(", ")
                .chars()
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .collect();
            let text = format!("committed; not confirmed by replica(s): {names}");
            if let Ok(value) = HeaderValue::from_str(&text) {
                response
                    .headers_mut()
                    .insert(HeaderName::from_static("x-orgkey-unconfirmed"), value);
            }
        }
        if let (Some(sessions), Some(session)) = (self.sessions, self.auth.session_digest()) {
            let change = KeyChange {
                session,
                checked_at: self.auth.generation(),
                changed_to: info.generation(),
                by: info.last_modified_by(),
            };
            sessions.carry_over_onto(&change, &mut response).await;
        }
        response
    }
}

/// `204`, empty: the answer to a delete.
fn deleted(_: &KeyInfo) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `PUT /apiKeys/1`: read and check the body, then [`SessionKeyAdmin::edit`]; `Err` is the
/// response refusing the body.
async fn edit<B>(
    admin: SessionKeyAdmin,
    format: KeyFormat,
    request: Request<B>,
) -> Result<Result<KeyInfo, KeyError>, Response<Full<Bytes>>>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Move the value out of the parsed object without copying it.
    let (_raw, mut fields) = KEY_BODY.read(request).await?;
    let value = match fields.remove("keyValue") {
        Some(serde_json::Value::String(value)) => Zeroizing::new(value),
        _ => return Err(response::bad_request(KEY_BODY.not_object)),
    };
    let key = match ApiKey::parse_with(&value, format) {
        Ok(key) => key,
        Err(format) => return Err(response::bad_request(&format.to_string())),
    };
    Ok(admin.edit(key).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_relative_to_the_mount_point_or_below_the_full_prefix() {
        for (path, expected) in [
            ("/", Some(Route::Collection)),
            ("/1", Some(Route::Item)),
            ("/1/regenerate", Some(Route::Regenerate)),
            ("/api/v1/apiKeys", Some(Route::Collection)),
            ("/api/v1/apiKeys/", Some(Route::Collection)),
            ("/api/v1/apiKeys/1", Some(Route::Item)),
            ("/api/v1/apiKeys/1/regenerate", Some(Route::Regenerate)),
            ("/apiKeys", Some(Route::Collection)),
            ("/apiKeys/1/regenerate", Some(Route::Regenerate)),
            ("/2", None),
            ("/01", None),
            ("/1/", None),
            ("/1/regenerate/", None),
            ("/1/other", None),
            ("/api/v1/apiKeys/2", None),
            ("/api/v1/apiKeysX", None),
            ("/api/v1/apiKeysX/1", None),
            ("/api/v1/other", None),
            ("/api/v1/apiKeys/api/v1/apiKeys/1", None),
        ] {
            assert_eq!(route(path), expected, "{path}");
        }
    }

    #[test]
    fn modifier_ids_are_stable_31_bit_and_differ_by_name() {
        let alice = modifier_id("alice@acme.example");
        assert_eq!(alice, modifier_id("alice@acme.example"));
        assert_ne!(alice, modifier_id("bob@acme.example"));
        assert!(alice <= 0x7fff_ffff);
        // SHA-256("") starts e3 b0 c4 42.
        assert_eq!(modifier_id(""), 0x63b0_c442);
    }

    #[test]
    fn wrong_methods_name_the_allowed_ones() {
        assert_eq!(operation(Route::Collection, &Method::PUT), Err("GET, POST"));
        assert_eq!(
            operation(Route::Item, &Method::POST),
            Err("GET, PUT, DELETE")
        );
        assert_eq!(operation(Route::Regenerate, &Method::GET), Err("POST"));
        assert_eq!(operation(Route::Item, &Method::PUT), Ok(Operation::Edit));
    }
}
