//! A fresh PostgreSQL schema per test, dropped (`CASCADE`) when the test ends, also when it
//! panicked (as `tests/store_contract.rs` makes them).

use orgkey::store::{FleetConfig, PostgresStore};
use orgkey::KeyFormat;

pub struct TempSchema {
    pub url: String,
    pub name: String,
    /// The schema's master key (P4): every store on it opens with a copy.
    pub master: orgkey::MasterKeys,
}

impl TempSchema {
    /// `None` (after saying so on stderr, once, in the name of `file`) if no PostgreSQL is
    /// configured or answers at the default URL; panics if `ORGKEY_TEST_POSTGRES_URL` is set
    /// and does not answer (see `skip::postgres_url`).
    pub fn new(file: &str, what: &str) -> Option<Self> {
        let url = super::skip::postgres_url(file, what)?;
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Some(Self {
            url,
            master: orgkey::MasterKeys::load_or_create(master_file(&format!("orgkey_test_{hex}")))
                .unwrap(),
            name: format!("orgkey_test_{hex}"),
        })
    }

    /// A new store (its own connection) on this schema.
    pub async fn connect(&self) -> PostgresStore {
        self.connect_with(KeyFormat::default()).await
    }

    /// A new store for keys of `format` on this schema.
    /// Its connections are named after the schema (`orgkey:<schema>`,
    /// `orgkey-follow:<schema>`), so a test finds them in `pg_stat_activity`.
    pub async fn connect_with(&self, format: KeyFormat) -> PostgresStore {
        self.replica(&self.name, format, FleetConfig::default())
            .await
    }

    /// A new store on this schema for the fleet replica `name`, with `fleet` settings.
    pub async fn replica(
        &self,
        name: &str,
        format: KeyFormat,
        fleet: FleetConfig,
    ) -> PostgresStore {
        let fleet = FleetConfig {
            name: name.to_owned(),
            ..fleet
        };
        PostgresStore::connect_with(&self.url, &self.name, format, fleet, self.master.clone())
            .await
            .unwrap()
    }

    /// The schema's master key file (for gateways: `--master-key-file`).
    pub fn master_file(&self) -> String {
        master_file(&self.name).to_str().unwrap().to_owned()
    }

    /// A plain driver connection to the test database, for what the store does not offer.
    pub async fn raw(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }
}

/// The master key file of the schema `name` (P4), in the temporary folder: every replica and
/// operator command of a test's fleet uses it (created by whoever needs it first).
pub fn master_file(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("orgkey-{name}.master-key"))
}

impl Drop for TempSchema {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(master_file(&self.name));
        // Drop runs outside async (and maybe while unwinding): use a runtime of its own on a
        // thread of its own.
        let url = self.url.clone();
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name);
        let dropped = std::thread::spawn(move || -> Result<(), String> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("SET lock_timeout = '10s'; {sql}"))
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: could not drop test schema {}: {e}", self.name),
            Err(_) => eprintln!("warning: dropping test schema {} panicked", self.name),
        }
    }
}
