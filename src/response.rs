//! Every HTTP answer orgkey writes itself: the `{"code","message"}` JSON bodies of
//! PROTOCOL.md, their headers, and the size-limited reading of JSON request bodies.
//!
//! One place, so that the layer, the CSRF guard and every endpoint answer the same failure
//! with the same bytes (L3), and no message ever quotes a client's input (serde's own error
//! messages can: only a fixed class of the error is shown).

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use serde::Serialize;
use zeroize::Zeroizing;

/// A session that is missing, dead, or not this request's (the Go SDK logs in again on it).
pub(crate) const SESSION_NOT_VALID: &str =
    r#"{"code":"SESSION_NOT_VALID","message":"Session is not valid"}"#;
/// A failed login, whatever failed (A2).
pub(crate) const AUTHENTICATION_FAILED: &str =
    r#"{"code":"AUTHENTICATION_FAILED","message":"Authentication failed"}"#;
/// A body that is not `application/json`.
pub(crate) const UNSUPPORTED_MEDIA_TYPE: &str =
    r#"{"code":"UNSUPPORTED_MEDIA_TYPE","message":"send Content-Type: application/json"}"#;
/// Something on the server's side failed; nothing was changed.
pub(crate) const INTERNAL_ERROR: &str =
    r#"{"code":"INTERNAL_ERROR","message":"the request could not be completed"}"#;

/// A JSON response with `status` and `body`, `Content-Type: application/json` and
/// `Cache-Control: no-store` (every orgkey answer may concern a secret or a session).
pub(crate) fn json<B: From<Bytes>>(status: StatusCode, body: impl Into<Bytes>) -> Response<B> {
    let mut response = Response::new(B::from(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A fixed JSON body (no allocation).
pub(crate) fn fixed<B: From<Bytes>>(status: StatusCode, body: &'static str) -> Response<B> {
    json(status, Bytes::from_static(body.as_bytes()))
}

/// `value` serialized, or a 500 if it cannot be.
pub(crate) fn value<B: From<Bytes>>(status: StatusCode, value: &impl Serialize) -> Response<B> {
    match serde_json::to_vec(value) {
        Ok(body) => json(status, body),
        Err(_) => internal_error(),
    }
}

/// `{"code": code, "message": message}`, escaped as JSON.
pub(crate) fn error<B: From<Bytes>>(status: StatusCode, code: &str, message: &str) -> Response<B> {
    value(
        status,
        &serde_json::json!({ "code": code, "message": message }),
    )
}

/// 400 `INVALID_INPUT_ARGUMENT` with `message` (which must not quote the input).
pub(crate) fn bad_request<B: From<Bytes>>(message: &str) -> Response<B> {
    error(StatusCode::BAD_REQUEST, "INVALID_INPUT_ARGUMENT", message)
}

/// The orgs cannot be vouched for right now (a change feed is reconnecting or stalled, F3).
pub(crate) const UNAVAILABLE: &str = r#"{"code":"SERVICE_UNAVAILABLE","message":"authentication state is reloading; retry shortly"}"#;

/// 503 [`UNAVAILABLE`] with `Retry-After: 1`: fail closed (F1, F3).
pub(crate) fn unavailable<B: From<Bytes>>() -> Response<B> {
    let mut response = fixed(StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE);
    response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// 500 `INTERNAL_ERROR`.
pub(crate) fn internal_error<B: From<Bytes>>() -> Response<B> {
    fixed(StatusCode::INTERNAL_SERVER_ERROR, INTERNAL_ERROR)
}

/// 405 with `Allow: allow` and the fixed `body`.
pub(crate) fn method_not_allowed<B: From<Bytes>>(
    allow: &'static str,
    body: &'static str,
) -> Response<B> {
    let mut response = fixed(StatusCode::METHOD_NOT_ALLOWED, body);
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

/// Whether a `Content-Type` is `application/json` (any parameters).
pub(crate) fn is_json(content_type: Option<&HeaderValue>) -> bool {
    content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// How an endpoint reads its JSON request body, and the messages that refuse one.
pub(crate) struct JsonBody {
    /// Largest body accepted, in bytes.
    pub(crate) limit: usize,
    /// The whole 413 body.
    pub(crate) too_large: &'static str,
    /// The 400 message for JSON that is not an object.
    pub(crate) not_object: &'static str,
    /// The 400 message for a body that is not JSON; the error's class is appended.
    pub(crate) invalid: &'static str,
}

impl JsonBody {
    /// Reads the body of `request` into memory that is wiped on drop (it may hold a key or a
    /// password) and checks that it is one JSON object: the raw bytes and the object.
    ///
    /// # Errors
    ///
    /// The response refusing the body: 415 without `Content-Type: application/json`, 413
    /// over the limit, 400 if it cannot be read, is not JSON by any parser's standard (serde
    /// skips unknown fields of a struct without checking their UTF-8 or escapes, so the whole
    /// body is validated here), or is not an object (serde would map an array onto a struct's
    /// fields by position).
    pub(crate) async fn read<B, R>(
        &self,
        request: http::Request<B>,
    ) -> Result<
        (
            Zeroizing<Vec<u8>>,
            serde_json::Map<String, serde_json::Value>,
        ),
        Response<R>,
    >
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        R: From<Bytes>,
    {
        if !is_json(request.headers().get(CONTENT_TYPE)) {
            return Err(fixed(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                UNSUPPORTED_MEDIA_TYPE,
            ));
        }
        let body = match Limited::new(request.into_body(), self.limit)
            .collect()
            .await
        {
            Ok(collected) => Zeroizing::new(collected.to_bytes().to_vec()),
            Err(error) => {
                return Err(if error.is::<http_body_util::LengthLimitError>() {
                    fixed(StatusCode::PAYLOAD_TOO_LARGE, self.too_large)
                } else {
                    bad_request("could not read the request body")
                });
            }
        };
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(serde_json::Value::Object(fields)) => Ok((body, fields)),
            Ok(_) => Err(bad_request(self.not_object)),
            Err(e) => Err(self.invalid(&e)),
        }
    }

    /// The 400 for a body that does not parse (also for the endpoint's own typed parse).
    pub(crate) fn invalid<R: From<Bytes>>(&self, e: &serde_json::Error) -> Response<R> {
        bad_request(&format!("{} ({})", self.invalid, json_error_class(e)))
    }
}

/// A fixed description of a JSON error's class: serde_json's own messages can quote input.
fn json_error_class(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "could not read",
        serde_json::error::Category::Syntax => "not valid JSON",
        serde_json::error::Category::Data => "a field is missing or has the wrong type",
        serde_json::error::Category::Eof => "the JSON ends early",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[test]
    fn errors_are_json_not_cached_and_escaped() {
        let response: Response<Full<Bytes>> =
            error(StatusCode::BAD_REQUEST, "X", "a \"quoted\" word");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
        let allowed: Response<Bytes> = method_not_allowed("GET, PUT", "{}");
        assert_eq!(allowed.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(allowed.headers()[ALLOW], "GET, PUT");
    }

    #[test]
    fn json_content_types_with_parameters_count() {
        for (value, json) in [
            ("application/json", true),
            ("Application/JSON; charset=utf-8", true),
            ("text/plain", false),
            ("application/jsonx", false),
        ] {
            assert_eq!(is_json(Some(&HeaderValue::from_static(value))), json);
        }
        assert!(!is_json(None));
    }
}
