//! A minimal HTTP/1.1 server for the end-to-end measurement in `benches/e2e.sh` (DESIGN.md's
//! performance budget: server CPU per request with the layer at most 1.03x without, and at
//! least 97% of the requests per second). One thread (a current-thread tokio runtime), so
//! that pinning it to one core measures one core's work.
//!
//! ```text
//! cargo run --release --example e2e_server -- --listen 127.0.0.1:8090 --auth
//! cargo run --release --example e2e_server -- --listen 127.0.0.1:8091        # no layer
//! ```
//!
//! The inner service answers every request `200 ok`. With `--auth` it sits behind
//! `OrgKeyLayer` over a table of 1,000 orgs (`--orgs N`); org `acme` has key `AbCdEf123456`,
//! the others random keys. Send `X-Org-Id: acme` and `X-API-Key: AbCdEf123456` in both modes,
//! so that both servers parse the same requests.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use orgkey::{Actor, ApiKey, KeyAdmin, OrgId, OrgKeyLayer, OrgTable};
use tower::{ServiceBuilder, ServiceExt};

const KEY: &str = "AbCdEf123456";

fn main() -> Result<(), String> {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 8090).into();
    let mut auth = false;
    let mut orgs = 1000usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--auth" => auth = true,
            "--listen" => {
                listen = args
                    .next()
                    .ok_or("--listen needs ADDR")?
                    .parse()
                    .map_err(|e| format!("--listen: {e}"))?;
            }
            "--orgs" => {
                orgs = args
                    .next()
                    .ok_or("--orgs needs N")?
                    .parse()
                    .map_err(|e| format!("--orgs: {e}"))?;
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(serve(listen, auth, orgs))
}

async fn serve(listen: SocketAddr, auth: bool, orgs: usize) -> Result<(), String> {
    let keys = KeyAdmin::new(OrgTable::default());
    let ops = Actor::new("bench").map_err(|e| e.to_string())?;
    for i in 0..orgs {
        let org = OrgId::new(&format!("org-{i}")).map_err(|e| e.to_string())?;
        keys.create_org(&org).await.map_err(|e| e.to_string())?;
        keys.subscribe(&org, &ops)
            .await
            .map_err(|e| e.to_string())?;
    }
    let acme = OrgId::new("acme").map_err(|e| e.to_string())?;
    keys.create_org(&acme).await.map_err(|e| e.to_string())?;
    keys.subscribe(&acme, &ops)
        .await
        .map_err(|e| e.to_string())?;
    keys.edit(&acme, ApiKey::parse(KEY).map_err(|e| e.to_string())?, &ops)
        .await
        .map_err(|e| e.to_string())?;

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("listen {listen}: {e}"))?;
    println!(
        "listening on {listen}, layer {}",
        if auth { "on" } else { "off" }
    );
    let inner = tower::service_fn(|_: http::Request<hyper::body::Incoming>| async {
        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    let layered = ServiceBuilder::new()
        .layer(OrgKeyLayer::new(keys.table().clone()))
        .service(inner);
    loop {
        let (stream, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let io = TokioIo::new(stream);
        if auth {
            let service = layered.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| service.clone().oneshot(request));
                let _ = http1::Builder::new().serve_connection(io, service).await;
            });
        } else {
            // The same per-request clone as the layered side pays (an `Arc` increment and
            // decrement), so that the comparison charges the layer only for its own work.
            let shared = std::sync::Arc::new(inner);
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let inner = std::sync::Arc::clone(&shared);
                    (*inner).oneshot(request)
                });
                let _ = http1::Builder::new().serve_connection(io, service).await;
            });
        }
    }
}
