//! TLS for the gateway (G3): rustls on the ring provider, a certificate and key read from PEM
//! files and reloaded from the same files on `SIGHUP`, HTTP/2 or HTTP/1.1 by ALPN; and what
//! the gateway demands of plain HTTP ([`SecureTransport`]).
//!
//! - [`Tls::load`] reads the certificate chain (the server's own certificate first, then its
//!   intermediates) and the private key (PKCS#8, PKCS#1 or SEC1, unencrypted) and checks that
//!   they belong together. Errors name the file and what is wrong with it, never its content
//!   (a key file's content is the secret).
//! - [`Tls::reload`] (and `SIGHUP`, through [`Tls::reload_on_hangup`]) reads both files again.
//!   New handshakes get the new certificate; connections already open keep theirs and are not
//!   dropped. A reload that fails keeps the old certificate and says why.
//! - ALPN offers `h2` then `http/1.1`; a client that offers neither gets HTTP/1.1.
//! - Protocols: TLS 1.3 and 1.2 (rustls's safe defaults: no TLS 1.1, no RSA key exchange, no
//!   CBC), no 0-RTT, no client certificates.
//!
//! The handshake counts against the header-read timeout: a client that does not finish it
//! in time loses its connection and its slot (`serve`).

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{HeaderValue, SET_COOKIE};
use http::{Method, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tower_service::Service;

use super::forwarded::ClientInfo;
use super::{site_response, GatewayBody, SiteBody};

/// The ALPN protocols offered, in order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Which of the two files a [`TlsError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFile {
    /// `--tls-cert`: the certificate chain.
    Certificate,
    /// `--tls-key`: the private key.
    PrivateKey,
}

impl fmt::Display for TlsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Certificate => "certificate",
            Self::PrivateKey => "private key",
        })
    }
}

/// Why the certificate or key could not be used. Messages name the file, never its content.
#[derive(Debug)]
#[non_exhaustive]
pub enum TlsError {
    /// The file cannot be read (missing, no permission, a directory).
    Read {
        /// Which file.
        role: TlsFile,
        /// Its path.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The file is not well-formed PEM (details withheld: they could quote the file).
    NotPem {
        /// Which file.
        role: TlsFile,
        /// Its path.
        path: PathBuf,
    },
    /// The certificate file holds no `CERTIFICATE` section.
    NoCertificate {
        /// Its path.
        path: PathBuf,
    },
    /// The key file holds no unencrypted private key.
    NoPrivateKey {
        /// Its path.
        path: PathBuf,
    },
    /// The private key is not one rustls (ring) can sign with.
    UnsupportedKey {
        /// Its path.
        path: PathBuf,
    },
    /// The first certificate of the chain cannot be parsed.
    BadCertificate {
        /// Its path.
        path: PathBuf,
    },
    /// The private key does not belong to the first certificate of the chain.
    KeyMismatch {
        /// The certificate file.
        certificate: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The ring provider refused rustls's default protocol versions (it does not).
    Setup,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { role, path, .. } => {
                write!(f, "cannot read the TLS {role} file {}", path.display())
            }
            Self::NotPem { role, path } => {
                write!(f, "the TLS {role} file {} is not valid PEM", path.display())
            }
            Self::NoCertificate { path } => write!(
                f,
                "no certificate (-----BEGIN CERTIFICATE-----) in the TLS certificate file {}",
                path.display()
            ),
            Self::NoPrivateKey { path } => write!(
                f,
                "no unencrypted private key (PKCS#8, PKCS#1 or SEC1 PEM) in the TLS key file {}",
                path.display()
            ),
            Self::UnsupportedKey { path } => write!(
                f,
                "the private key in {} is not an RSA, ECDSA (P-256, P-384) or Ed25519 key usable \
                 for TLS",
                path.display()
            ),
            Self::BadCertificate { path } => write!(
                f,
                "the first certificate in {} cannot be parsed",
                path.display()
            ),
            Self::KeyMismatch { certificate, key } => write!(
                f,
                "the private key in {} does not belong to the first certificate in {} (the \
                 server's own certificate must come first)",
                key.display(),
                certificate.display()
            ),
            Self::Setup => f.write_str("the TLS provider (ring) cannot be set up"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The gateway's TLS: the certificate and key files, the certificate in use, and the rustls
/// configuration that serves it. Cheap to clone; clones share the certificate, so a reload
/// through one is seen by all.
#[derive(Clone)]
pub struct Tls {
    certificate_path: Arc<Path>,
    key_path: Arc<Path>,
    current: Arc<Current>,
    config: Arc<ServerConfig>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("certificate_path", &self.certificate_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

/// The certificate in use, swapped whole by a reload; rustls asks it on every handshake.
struct Current {
    key: ArcSwap<CertifiedKey>,
}

impl fmt::Debug for Current {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // CertifiedKey's own Debug shows no key material, but there is nothing to see here.
        f.debug_struct("Current").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.load_full())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Reads the certificate chain at `certificate` and the private key at `key` (PEM).
    ///
    /// # Errors
    ///
    /// A [`TlsError`] naming the file that cannot be read, holds no certificate or key, or
    /// whose key does not belong to the certificate.
    pub fn load(
        certificate: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Result<Self, TlsError> {
        let certificate_path: Arc<Path> = certificate.into().into();
        let key_path: Arc<Path> = key.into().into();
        let provider = provider();
        let certified = load_certified_key(&certificate_path, &key_path, &provider)?;
        let current = Arc::new(Current {
            key: ArcSwap::from_pointee(certified),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|_| TlsError::Setup)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&current) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Self {
            certificate_path,
            key_path,
            current,
            config: Arc::new(config),
        })
    }

    /// Reads both files again and serves the new certificate to new connections; open
    /// connections are not touched. On an error the certificate in use stays.
    ///
    /// # Errors
    ///
    /// As [`Tls::load`].
    pub fn reload(&self) -> Result<(), TlsError> {
        let certified = load_certified_key(&self.certificate_path, &self.key_path, &provider())?;
        self.current.key.store(Arc::new(certified));
        Ok(())
    }

    /// The SHA-256 fingerprint of the certificate in use (the server's own, first in the
    /// chain), as uppercase hex pairs joined by `:`, as `openssl x509 -fingerprint -sha256`
    /// prints it: to check which certificate a gateway serves.
    pub fn fingerprint(&self) -> String {
        let key = self.current.key.load();
        let digest = key
            .cert
            .first()
            .map(|cert| Sha256::digest(cert.as_ref()))
            .unwrap_or_default();
        let hex: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
        hex.join(":")
    }

    /// The certificate file's path.
    pub fn certificate_path(&self) -> &Path {
        &self.certificate_path
    }

    /// The key file's path.
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    /// An acceptor for one connection, on the shared configuration.
    pub(super) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config))
    }

    /// Reloads the certificate and key on every `SIGHUP` (Unix), logging the outcome: the new
    /// fingerprint, or why the old certificate stays. The signal handler is installed before
    /// this returns (from then on `SIGHUP` no longer ends the process); the reloads run on a
    /// task of the current tokio runtime.
    ///
    /// # Errors
    ///
    /// The signal handler cannot be installed.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    #[cfg(unix)]
    pub fn reload_on_hangup(&self) -> io::Result<tokio::task::JoinHandle<()>> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = signal(SignalKind::hangup())?;
        let tls = self.clone();
        Ok(tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                // Reading two small files: quick, but file I/O all the same.
                let reloading = tls.clone();
                match tokio::task::spawn_blocking(move || reloading.reload()).await {
                    Ok(Ok(())) => tracing::info!(
                        certificate = %tls.certificate_path.display(),
                        fingerprint = %tls.fingerprint(),
                        "SIGHUP: TLS certificate and key reloaded; new connections get them"
                    ),
                    Ok(Err(error)) => tracing::warn!(
                        error = %error,
                        cause = std::error::Error::source(&error).map(tracing::field::display),
                        fingerprint = %tls.fingerprint(),
                        "SIGHUP: TLS reload failed; still serving the previous certificate"
                    ),
                    Err(error) => tracing::warn!(%error, "SIGHUP: TLS reload did not finish"),
                }
            }
        }))
    }
}

/// Reads and checks the chain and key.
fn load_certified_key(
    certificate: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let pem_error = |role: TlsFile, path: &Path, error: pem::Error| match error {
        pem::Error::Io(source) => TlsError::Read {
            role,
            path: path.to_owned(),
            source,
        },
        pem::Error::NoItemsFound => match role {
            TlsFile::Certificate => TlsError::NoCertificate {
                path: path.to_owned(),
            },
            TlsFile::PrivateKey => TlsError::NoPrivateKey {
                path: path.to_owned(),
            },
        },
        // The others could quote a line of the file: say only that it is not PEM.
        _ => TlsError::NotPem {
            role,
            path: path.to_owned(),
        },
    };
    let chain = CertificateDer::pem_file_iter(certificate)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(TlsFile::Certificate, certificate, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: certificate.to_owned(),
        });
    }
    let private_key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(TlsFile::PrivateKey, key, e))?;
    CertifiedKey::from_der(chain, private_key, provider).map_err(|error| match error {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
            certificate: certificate.to_owned(),
            key: key.to_owned(),
        },
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            TlsError::BadCertificate {
                path: certificate.to_owned(),
            }
        }
        _ => TlsError::UnsupportedKey {
            path: key.to_owned(),
        },
    })
}

/// Whether the login may be used over plain HTTP (G3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlainHttpLogin {
    /// Refused with 403 `TLS_REQUIRED` (the default on a non-loopback listen address).
    Refused,
    /// Accepted: a loopback listen address, or `--insecure-http`.
    Allowed,
}

/// The 403 a plain-HTTP login gets.
const TLS_REQUIRED: &str = r#"{"code":"TLS_REQUIRED","message":"log in over https: the login shows characters of the API key on the wire, so this gateway refuses it over plain HTTP (serve it with --tls-cert and --tls-key, behind a --trusted-proxy that sends X-Forwarded-Proto: https, on a loopback address, or start it with --insecure-http)"}"#;

/// What the gateway demands of a request's transport, around its [`Site`](super::Site):
///
/// - the ZIA login (`POST <api>/authenticatedSession`, and the Go SDK's
///   `POST /authenticatedSession`) over plain HTTP gets 403
///   `{"code":"TLS_REQUIRED",...}` unless [`PlainHttpLogin::Allowed`]: the obfuscated key
///   in its body shows key characters to anyone on the path (PROTOCOL.md). Plain means
///   neither the gateway's own TLS nor a trusted proxy's `X-Forwarded-Proto: https`
///   ([`ClientInfo::is_https`]); a request without a [`ClientInfo`] counts as plain. The
///   session probe and the logout are not refused: they carry no key;
/// - over https, a session cookie the site sets (`JSESSIONID`) gets `Secure` if it lacks it
///   (a TLS-ending proxy in front of a gateway whose base URL says `http://`).
#[derive(Clone, Debug)]
pub struct SecureTransport<S> {
    inner: S,
    login_paths: Arc<[String]>,
    plain_login: PlainHttpLogin,
}

impl<S> SecureTransport<S> {
    /// `inner`, whose API lives under `api_path` (the base URL's path, such as `/api/v1`).
    pub fn new(inner: S, api_path: &str, plain_login: PlainHttpLogin) -> Self {
        let api_path = api_path.trim_end_matches('/');
        Self {
            inner,
            login_paths: vec![
                format!("{api_path}/authenticatedSession"),
                "/authenticatedSession".to_owned(),
            ]
            .into(),
            plain_login,
        }
    }

    fn refuses(&self, request: &Request<GatewayBody>, https: bool) -> bool {
        !https
            && self.plain_login == PlainHttpLogin::Refused
            && request.method() == Method::POST
            && self.login_paths.iter().any(|p| p == request.uri().path())
    }
}

impl<S> Service<Request<GatewayBody>> for SecureTransport<S>
where
    S: Service<Request<GatewayBody>, Response = Response<SiteBody>, Error = Infallible>,
{
    type Response = Response<SiteBody>;
    type Error = Infallible;
    type Future = SecureTransportFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<GatewayBody>) -> Self::Future {
        let https = request
            .extensions()
            .get::<ClientInfo>()
            .is_some_and(ClientInfo::is_https);
        if self.refuses(&request, https) {
            // At info, like every failed login: a client can send as many as it likes.
            tracing::info!(
                target: "orgkey::gateway::tls",
                peer = ?request.extensions().get::<ClientInfo>().map(ClientInfo::peer),
                "login over plain HTTP refused (TLS_REQUIRED)"
            );
            let response = crate::response::fixed::<http_body_util::Full<Bytes>>(
                StatusCode::FORBIDDEN,
                TLS_REQUIRED,
            );
            return SecureTransportFuture {
                kind: Kind::Refused {
                    response: Some(site_response(response)),
                },
            };
        }
        SecureTransportFuture {
            kind: Kind::Inner {
                future: self.inner.call(request),
                https,
            },
        }
    }
}

pin_project! {
    /// The future of [`SecureTransport`]: the refusal, or the inner service's answer (with
    /// `Secure` session cookies over https).
    pub struct SecureTransportFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProjection]
    enum Kind<F> {
        Refused {
            response: Option<Response<SiteBody>>,
        },
        Inner {
            #[pin]
            future: F,
            https: bool,
        },
    }
}

impl<F> Future for SecureTransportFuture<F>
where
    F: Future<Output = Result<Response<SiteBody>, Infallible>>,
{
    type Output = Result<Response<SiteBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            // Taken on the first poll; a future polled after it finished stays pending.
            KindProjection::Refused { response } => response
                .take()
                .map_or(Poll::Pending, |r| Poll::Ready(Ok(r))),
            KindProjection::Inner { future, https } => {
                let Ok(mut response) = std::task::ready!(future.poll(cx));
                if *https {
                    secure_session_cookies(&mut response);
                }
                Poll::Ready(Ok(response))
            }
        }
    }
}

/// Adds `; Secure` to every `Set-Cookie: JSESSIONID=...` without it.
fn secure_session_cookies(response: &mut Response<SiteBody>) {
    let headers = response.headers_mut();
    if !headers.contains_key(SET_COOKIE) {
        return;
    }
    let cookies: Vec<HeaderValue> = headers.get_all(SET_COOKIE).iter().cloned().collect();
    headers.remove(SET_COOKIE);
    for cookie in cookies {
        let needs_secure = cookie.as_bytes().starts_with(b"JSESSIONID=")
            && !cookie
                .as_bytes()
                .split(|b| *b == b';')
                .skip(1)
                .any(|attribute| attribute.trim_ascii().eq_ignore_ascii_case(b"secure"));
        let cookie = if needs_secure {
            let mut value = cookie.as_bytes().to_vec();
            value.extend_from_slice(b"; Secure");
            HeaderValue::from_bytes(&value).unwrap_or(cookie)
        } else {
            cookie
        };
        headers.append(SET_COOKIE, cookie);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn session_cookies_get_secure_once_and_other_cookies_are_left_alone() {
        let mut response = Response::new(super::super::full(Bytes::new()));
        let headers = response.headers_mut();
        for cookie in [
            "JSESSIONID=abc; Path=/; HttpOnly; SameSite=Strict",
            "JSESSIONID=def; Path=/; HttpOnly; secure; SameSite=Strict",
            "theme=dark; Path=/",
        ] {
            headers.append(SET_COOKIE, HeaderValue::from_static(cookie));
        }
        secure_session_cookies(&mut response);
        let cookies: Vec<&str> = response
            .headers()
            .get_all(SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            cookies,
            [
                "JSESSIONID=abc; Path=/; HttpOnly; SameSite=Strict; Secure",
                "JSESSIONID=def; Path=/; HttpOnly; secure; SameSite=Strict",
                "theme=dark; Path=/",
            ]
        );
    }

    /// A fresh directory for one test's files.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("orgkey-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A self-signed certificate for `localhost` and its key, as PEM.
    fn self_signed() -> (String, String) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        (certified.cert.pem(), certified.signing_key.serialize_pem())
    }

    #[test]
    fn load_errors_name_the_file_and_never_its_content() {
        let dir = scratch("errors");
        let (cert, key) = self_signed();
        let (_, other_key) = self_signed();
        let write = |name: &str, content: &str| {
            let path = dir.join(name);
            std::fs::write(&path, content).unwrap();
            path
        };
        let cert = write("cert.pem", &cert);
        let key = write("key.pem", &key);
        let other_key = write("other-key.pem", &other_key);
        let missing = dir.join("missing.pem");
        let no_pem = write("empty.pem", "nothing here\n");
        // A key whose PEM body is broken: no message may quote it.
        let broken = write(
            "broken.pem",
            "-----BEGIN PRIVATE KEY-----\nS3CR3T!!S3CR3T\n-----END PRIVATE KEY-----\n",
        );

        assert!(Tls::load(&cert, &key).is_ok());
        let cases: Vec<(TlsError, &Path)> = vec![
            (Tls::load(&missing, &key).unwrap_err(), &missing),
            (Tls::load(&no_pem, &key).unwrap_err(), &no_pem),
            (Tls::load(&cert, &missing).unwrap_err(), &missing),
            (Tls::load(&cert, &no_pem).unwrap_err(), &no_pem),
            (Tls::load(&cert, &broken).unwrap_err(), &broken),
            (Tls::load(&cert, &cert).unwrap_err(), &cert),
            (Tls::load(&cert, &other_key).unwrap_err(), &other_key),
        ];
        let kinds: Vec<String> = cases
            .iter()
            .map(|(error, _)| {
                format!("{error:?}")
                    .split([' ', '{'])
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "Read",
                "NoCertificate",
                "Read",
                "NoPrivateKey",
                "NotPem",
                "NoPrivateKey",
                "KeyMismatch"
            ]
        );
        for (error, path) in &cases {
            let message = error.to_string();
            assert!(message.contains(&*path.to_string_lossy()), "{message}");
            assert!(!message.contains("S3CR3T"), "{message}");
            assert!(!format!("{error:?}").contains("S3CR3T"), "{error:?}");
        }
        assert!(matches!(
            cases[2].0,
            TlsError::Read {
                role: TlsFile::PrivateKey,
                ..
            }
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_reload_swaps_the_certificate_and_a_failed_one_keeps_it() {
        let dir = scratch("reload");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let (first_cert, first_key) = self_signed();
        std::fs::write(&cert, &first_cert).unwrap();
        std::fs::write(&key, &first_key).unwrap();
        let tls = Tls::load(&cert, &key).unwrap();
        let clone = tls.clone();
        let first = tls.fingerprint();
        assert_eq!(first.len(), 32 * 3 - 1);

        let (second_cert, second_key) = self_signed();
        std::fs::write(&cert, &second_cert).unwrap();
        // Half-replaced: the new certificate with the old key. Refused; the old one stays.
        assert!(matches!(tls.reload(), Err(TlsError::KeyMismatch { .. })));
        assert_eq!(tls.fingerprint(), first);
        std::fs::write(&key, &second_key).unwrap();
        tls.reload().unwrap();
        assert_ne!(tls.fingerprint(), first);
        assert_eq!(clone.fingerprint(), tls.fingerprint(), "clones share it");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
