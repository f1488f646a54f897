//! The key service on a real PostgreSQL server started on 127.0.0.1 in a temporary directory
//! (as the `postgres` user when run as root). Without PostgreSQL these tests fail, unless
//! `KEYGATE_SKIP_PG=1`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

#[test]
fn pg_lifecycle_auth_rotate_listing() {
    let Some(pg) = Pg::start() else { return };
    scenarios::lifecycle(&pg.database("lifecycle"));
    scenarios::auth(&pg.database("auth"));
    scenarios::rotate(&pg.database("rotate"));
    scenarios::listing(&pg.database("listing"));
}

#[test]
fn pg_bad_input_owners_usage_import() {
    let Some(pg) = Pg::start() else { return };
    scenarios::bad_input(&pg.database("bad"));
    scenarios::owners_plans(&pg.database("owners"));
    scenarios::usage(&pg.database("usage"));
    scenarios::import_export(&pg.database("import"));
}

/// Once intermittent under heavy load: the test waited only for the revoked and rotated-out
/// keys to be absent, which a document served before they were created also satisfies; it now
/// waits for the document with every change first.
#[test]
fn pg_retention() {
    let Some(pg) = Pg::start() else { return };
    scenarios::retention(&pg.database("retention"));
}

/// The same with the builder held back (a lock on `plans`, which every build reads and these
/// writes do not) while the keys are created and changed: the test must not take a document
/// served before the changes for one served after the purge.
#[test]
fn pg_retention_with_the_builder_behind() {
    let Some(pg) = Pg::start() else { return };
    let db = pg.database("retention_behind");
    let hold = hold_builds(&db, Duration::from_secs(2));
    scenarios::retention_with(&db, || hold.wait_until_held());
}

/// Holds an exclusive lock on `plans` for `d` from when `wait_until_held` is called.
struct Hold(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>);

impl Hold {
    fn wait_until_held(&self) {
        self.0.send(()).unwrap();
        self.1.recv().unwrap();
    }
}

fn hold_builds(db: &str, d: Duration) -> Hold {
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let db = db.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&db).await.unwrap();
            if go_rx.recv().is_err() {
                return;
            }
            let mut tx = c.begin().await.unwrap();
            sqlx::query("LOCK TABLE plans IN ACCESS EXCLUSIVE MODE")
                .execute(&mut *tx)
                .await
                .unwrap();
            held_tx.send(()).unwrap();
            tokio::time::sleep(d).await;
            tx.commit().await.unwrap();
        });
    });
    Hold(go_tx, held_rx)
}

#[test]
fn pg_two_replicas_serve_the_same_document_within_1s() {
    let Some(pg) = Pg::start() else { return };
    let db = pg.database("replicas");
    let a = Server::start(&db);
    let b = Server::start(&db);
    assert_eq!(a.document().0, b.document().0);
    for round in 0..5 {
        let (rec, _) = a.create(json!({"owner": format!("o{round}")}));
        let id = rec["id"].as_str().unwrap().to_string();
        let t = Instant::now();
        let (eb, _) = b.wait_document(Duration::from_secs(1), |d| {
            d["keys"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["id"] == id.as_str())
        });
        eprintln!("replica b served the new key after {:?}", t.elapsed());
        let (ea, _) = a.wait_document(Duration::from_secs(1), |d| {
            d["keys"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["id"] == id.as_str())
        });
        assert_eq!(ea, eb, "replicas disagree");
        // A change through b shows in a.
        b.send(
            "PATCH",
            &format!("/v1/admin/keys/{id}"),
            &json!({"status": "disabled"}),
        );
        a.wait_document(Duration::from_secs(1), |d| {
            d["keys"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["id"] == id.as_str() && k["status"] == "disabled")
        });
    }
    let (ea, ba) = a.document();
    let (eb, bb) = b.document();
    assert_eq!(ea, eb);
    assert_eq!(ba, bb);
    scenarios::check_document(&ea, &ba);
    // Both built change by change since they started; a third replica builds whole at start:
    // the same bytes and ETag.
    let c = Server::start(&db);
    let (ec, bc) = c.document();
    assert_eq!(ec, ea);
    assert!(bc == ba, "a full build differs from the incremental ones");
    c.stop();
    a.stop();
    b.stop();
}

#[test]
fn pg_concurrent_creates_and_updates_on_two_replicas_lose_nothing() {
    let Some(pg) = Pg::start() else { return };
    let db = pg.database("concurrent");
    let a = Server::start(&db);
    let b = Server::start(&db);
    scenarios::concurrent(&db, &[&a, &b]);
    assert_eq!(a.document().0, b.document().0);
    a.stop();
    b.stop();
}

#[test]
fn pg_healthz_is_honest_when_the_database_stops() {
    let Some(pg) = Pg::start() else { return };
    let db = pg.database("health");
    let s = Server::start(&db);
    assert_eq!(s.get("/healthz").status, 200);
    drop(pg);
    let t = Instant::now();
    loop {
        let r = s.get("/healthz");
        if r.status == 503 {
            r.error(503, "unavailable");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "healthz still {} after the database stopped",
            r.status
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The last good document is still served.
    assert_eq!(s.raw("GET", "/v1/keys", None, None, &[]).status, 200);
    s.stop();
}

#[test]
fn pg_incremental_builds_match_a_full_build() {
    let Some(pg) = Pg::start() else { return };
    scenarios::incremental_matches_full(&pg.database("incremental"));
}
