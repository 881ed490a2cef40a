//! The gateway's whole service (`orgkey::gateway::Site` on the composition root), served in
//! this test process on loopback: what `cargo run --example gateway` serves, built through
//! the library rather than by copying its wiring.

use std::net::SocketAddr;
use std::time::Duration;

use orgkey::gateway::serve::{serve, Limits};
use orgkey::gateway::Site;
use orgkey::store::Store;
use orgkey::{Actor, ApiKey, OrgId, OrgKey, Password, Scopes, Username};

/// A gateway serving `acme` (key `key`) and its admin `admin` (password `password`, both
/// scopes), on its own port.
pub struct Served {
    pub addr: SocketAddr,
    pub orgkey: OrgKey,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub async fn serve_gateway(store: impl Store, key: &str, admin: &str, password: &str) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let orgkey = OrgKey::builder(&format!("http://{addr}/api/v1"))
        .unwrap()
        .open(store)
        .await
        .unwrap();
    let acme = OrgId::new("acme").unwrap();
    let ops = Actor::new("provisioning").unwrap();
    orgkey.keys().create_org(&acme).await.unwrap();
    orgkey.keys().subscribe(&acme, &ops).await.unwrap();
    orgkey
        .keys()
        .edit(&acme, ApiKey::parse(key).unwrap(), &ops)
        .await
        .unwrap();
    orgkey
        .admins()
        .create(
            &Username::new(admin).unwrap(),
            &acme,
            &Password::new(password),
            Scopes::ALL,
        )
        .await
        .unwrap();
    let site = Site::new(&orgkey, None);
    let limits = Limits {
        header_read_timeout: Duration::from_secs(10),
        body_read_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(60),
        max_connections: 256,
    };
    let server = tokio::spawn(serve(listener, site, limits, std::future::pending()));
    Served {
        addr,
        orgkey,
        server,
    }
}
