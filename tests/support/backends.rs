//! Where a store test's store lives, on either backend, and `on_both!`, which runs each test
//! body once per backend. Shared by `tests/hub_store.rs` and `tests/hub_retention.rs`, each
//! naming its own Postgres database (`DATABASE` in the including file).

use shapeblock_hub::store::{Location, Store};
use shapeblock_testenv::postgres::Postgres;

/// A store's place: a SQLite file in a temporary directory, or a database on the test
/// process's shared Postgres.
pub struct Place {
    pub location: Location,
    _dir: Option<tempfile::TempDir>,
}

impl Place {
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            location: Location::Sqlite(dir.path().join("hub.sqlite")),
            _dir: Some(dir),
        }
    }

    /// A fresh database whose name starts with `prefix`.
    pub async fn postgres(prefix: &'static str) -> Self {
        let url = tokio::task::spawn_blocking(move || Postgres::shared().unwrap().database(prefix).unwrap())
            .await
            .unwrap();
        Self {
            location: Location::Postgres { url, pool_size: 4 },
            _dir: None,
        }
    }

    pub async fn open(&self) -> Store {
        Store::open(&self.location).await.unwrap()
    }
}

/// Each body as two tests, one per backend.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::Place::sqlite()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(super::Place::postgres(super::DATABASE).await).await;
            }
        }
    )*};
}
pub(crate) use on_both;
