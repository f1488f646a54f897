//! The database: one code path for SQLite and PostgreSQL through sqlx's `Any` driver, with SQL
//! both accept (`$N` parameters, `ON CONFLICT`, `RETURNING`). Times are Unix seconds; lists are
//! JSON text. Every admin write runs in one transaction that first locks the `meta` row (so
//! writers on several replicas of one PostgreSQL are serialised), and bumps `meta.generation` in
//! that same transaction when the key-list document changes.

use crate::error::ApiError;
use crate::model::{self, CreateKey, KeyRow, Owner, PatchKey, RateLimit, Rotate, Settings};
use crate::util;
use serde_json::{json, Value};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Executor, Row, Transaction};
use std::sync::Arc;
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};

/// Which database is behind the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// The database and what serialises writers in this process.
pub struct Store {
    pub pool: AnyPool,
    pub kind: Kind,
    lock: Arc<Mutex<()>>,
    /// Woken after each commit that changed the document (the builder rebuilds at once).
    pub changed: Notify,
}

/// An open write transaction (the meta row locked).
pub struct Tx {
    tx: Transaction<'static, Any>,
    _guard: OwnedMutexGuard<()>,
    /// The transaction's clock (Unix seconds).
    pub now: i64,
    /// Set when the document changes: `commit` bumps the generation.
    pub doc_changed: bool,
}

/// Who did it: a token's identity (never the token).
pub type Actor<'a> = &'a str;

const KEY_COLUMNS: &str = "id, hash, owner, name, description, prefix, encoding, bytes, status, \
     scopes, sites, allowed_ips, plan, rate_limits, expires_at, created_at, updated_at, last_used_at";

fn key_row(r: &AnyRow) -> Result<KeyRow, sqlx::Error> {
    let scopes: String = r.try_get("scopes")?;
    let sites: String = r.try_get("sites")?;
    let ips: String = r.try_get("allowed_ips")?;
    let limits: Option<String> = r.try_get("rate_limits")?;
    Ok(KeyRow {
        id: r.try_get("id")?,
        hash: r.try_get("hash")?,
        owner: r.try_get("owner")?,
        prefix: r.try_get("prefix")?,
        encoding: r.try_get("encoding")?,
        bytes: r.try_get("bytes")?,
        status: r.try_get("status")?,
        settings: Settings {
            name: r.try_get("name")?,
            description: r.try_get("description")?,
            scopes: model::list_from_text(&scopes),
            sites: model::list_from_text(&sites),
            allowed_ips: model::list_from_text(&ips),
            plan: r.try_get("plan")?,
            rate_limits: model::limits_from_text(limits.as_deref()),
        },
        expires_at: r.try_get("expires_at")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        last_used_at: r.try_get("last_used_at")?,
    })
}

/// List filters of `GET /v1/admin/keys`.
#[derive(Debug, Default)]
pub struct KeyFilter {
    pub owner: Option<String>,
    pub status: Option<String>,
    pub plan: Option<String>,
    /// Keys with ids after this one.
    pub after: Option<String>,
    pub limit: i64,
}

/// An owner or a plan as stored.
#[derive(Debug, Clone)]
pub struct Named {
    pub id: String,
    pub status: Option<String>,
    pub rate_limits: Option<Vec<RateLimit>>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Named {
    /// The §2 object plus `id` and times.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"id": self.id, "rate_limits": self.rate_limits,
            "created_at": util::rfc3339(self.created_at), "updated_at": util::rfc3339(self.updated_at)});
        if let (Some(s), Some(o)) = (&self.status, v.as_object_mut()) {
            o.insert("status".into(), json!(s));
        }
        v
    }
}

/// One key's usage in a report.
#[derive(Debug, Clone)]
pub struct UsageReport {
    pub id: String,
    pub allowed: u64,
    pub refused: Vec<(String, u64)>,
    pub last_used_at: Option<i64>,
}

/// Generations of tombstones (ids of deleted key rows, read by incremental document builds)
/// the retention purge keeps.
const TOMBSTONE_GENERATIONS: i64 = 100_000;

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Store {
    /// Opens (creating a SQLite file when needed) and migrates `database`:
    /// `sqlite:PATH` or `postgres://…` / `postgresql://…`.
    pub async fn open(database: &str) -> Result<Store, String> {
        sqlx::any::install_default_drivers();
        let (kind, url) = if let Some(rest) = database.strip_prefix("sqlite:") {
            let url = if rest.contains('?') {
                database.to_string()
            } else {
                format!("sqlite:{rest}?mode=rwc")
            };
            (Kind::Sqlite, url)
        } else if database.starts_with("postgres://") || database.starts_with("postgresql://") {
            (Kind::Postgres, database.to_string())
        } else {
            return Err(format!(
                "--database {database:?}: expected sqlite:PATH or postgres://…"
            ));
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if kind == Kind::Sqlite { 8 } else { 10 })
            .acquire_timeout(std::time::Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if kind == Kind::Sqlite {
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|e| format!("opening the database: {e}"))?;
        let migrated = match kind {
            Kind::Sqlite => sqlx::migrate!("migrations/sqlite").run(&pool).await,
            Kind::Postgres => sqlx::migrate!("migrations/postgres").run(&pool).await,
        };
        migrated.map_err(|e| format!("migrating the database: {e}"))?;
        Ok(Store {
            pool,
            kind,
            lock: Arc::new(Mutex::new(())),
            changed: Notify::new(),
        })
    }

    /// `SELECT 1`.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// The document generation (bumped by each change to the document).
    pub async fn generation(&self) -> Result<i64, sqlx::Error> {
        sqlx::query("SELECT generation FROM meta WHERE id = 1")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)
    }

    /// Starts a write: this process's writers queue here, then the meta row is locked.
    pub async fn begin(&self) -> Result<Tx, ApiError> {
        let guard = self.lock.clone().lock_owned().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE meta SET writes = writes + 1 WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        Ok(Tx {
            tx,
            _guard: guard,
            now: util::now(),
            doc_changed: false,
        })
    }

    /// Commits, bumping the generation first when the document changed.
    pub async fn commit(&self, mut t: Tx) -> Result<(), ApiError> {
        if t.doc_changed {
            sqlx::query(
                "UPDATE meta SET generation = generation + 1, changed_at = $1 WHERE id = 1",
            )
            .bind(t.now)
            .execute(&mut *t.tx)
            .await?;
        }
        let changed = t.doc_changed;
        t.tx.commit().await?;
        if changed {
            self.changed.notify_one();
        }
        Ok(())
    }

    async fn audit(
        t: &mut Tx,
        actor: Actor<'_>,
        action: &str,
        object: &str,
        detail: Value,
    ) -> Result<(), ApiError> {
        sqlx::query(
            "INSERT INTO audit (at, actor, action, object, detail) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(t.now)
        .bind(actor)
        .bind(action)
        .bind(object)
        .bind(detail.to_string())
        .execute(&mut *t.tx)
        .await?;
        Ok(())
    }

    async fn key_in(t: &mut Tx, id: &str) -> Result<Option<KeyRow>, ApiError> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE id = $1 AND status <> 'deleted'"
        ))
        .bind(id)
        .fetch_optional(&mut *t.tx)
        .await?;
        Ok(row.as_ref().map(key_row).transpose()?)
    }

    async fn plan_exists(t: &mut Tx, plan: &str) -> Result<bool, ApiError> {
        Ok(sqlx::query("SELECT id FROM plans WHERE id = $1")
            .bind(plan)
            .fetch_optional(&mut *t.tx)
            .await?
            .is_some())
    }

    async fn ensure_owner(t: &mut Tx, owner: &str, status: &str) -> Result<bool, ApiError> {
        let r = sqlx::query(
            "INSERT INTO owners (id, status, rate_limits, created_at, updated_at) \
             VALUES ($1, $2, NULL, $3, $3) ON CONFLICT (id) DO NOTHING",
        )
        .bind(owner)
        .bind(status)
        .bind(t.now)
        .execute(&mut *t.tx)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn insert_key(t: &mut Tx, k: &KeyRow, listed: bool) -> Result<(), ApiError> {
        let s = &k.settings;
        sqlx::query(
            "INSERT INTO keys (id, hash, owner, name, description, prefix, encoding, bytes, status, \
             scopes, sites, allowed_ips, plan, rate_limits, expires_at, created_at, updated_at, \
             last_used_at, status_at, listed) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
             $12, $13, $14, $15, $16, $17, $18, $19, $20)",
        )
        .bind(&k.id)
        .bind(&k.hash)
        .bind(&k.owner)
        .bind(&s.name)
        .bind(&s.description)
        .bind(&k.prefix)
        .bind(&k.encoding)
        .bind(k.bytes)
        .bind(&k.status)
        .bind(model::list_to_text(&s.scopes))
        .bind(model::list_to_text(&s.sites))
        .bind(model::list_to_text(&s.allowed_ips))
        .bind(&s.plan)
        .bind(model::limits_to_text(&s.rate_limits))
        .bind(k.expires_at)
        .bind(k.created_at)
        .bind(k.updated_at)
        .bind(k.last_used_at)
        .bind(t.now)
        .bind(i64::from(listed))
        .execute(&mut *t.tx)
        .await?;
        Ok(())
    }

    async fn id_taken(t: &mut Tx, id: &str) -> Result<bool, ApiError> {
        Ok(sqlx::query("SELECT id FROM keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *t.tx)
            .await?
            .is_some())
    }

    /// A new key row with a fresh key; returns the row and the key.
    #[allow(clippy::too_many_arguments)]
    fn new_key(
        id: String,
        owner: String,
        prefix: &str,
        encoding: model::Encoding,
        bytes: u64,
        settings: Settings,
        expires_at: Option<i64>,
        now: i64,
    ) -> Result<(KeyRow, String), ApiError> {
        let n = usize::try_from(bytes).unwrap_or(usize::MAX);
        let key = util::generate_key(prefix, n, encoding == model::Encoding::Hex)
            .map_err(ApiError::Internal)?;
        let row = KeyRow {
            id,
            hash: util::sha256_hex(key.as_bytes()),
            owner,
            prefix: Some(prefix.to_string()),
            encoding: Some(encoding.as_str().to_string()),
            bytes: Some(to_i64(bytes)),
            status: "active".into(),
            settings,
            expires_at,
            created_at: now,
            updated_at: now,
            last_used_at: None,
        };
        Ok((row, key))
    }

    /// `POST /v1/admin/keys`: the new record and the key (shown once).
    pub async fn create_key(
        &self,
        actor: Actor<'_>,
        c: CreateKey,
    ) -> Result<(KeyRow, String), ApiError> {
        let mut t = self.begin().await?;
        if let Some(p) = &c.settings.plan {
            if !Self::plan_exists(&mut t, p).await? {
                return Err(ApiError::bad("plan", format!("unknown plan {p:?}")));
            }
        }
        let id = match c.id {
            Some(id) => {
                if Self::id_taken(&mut t, &id).await? {
                    return Err(ApiError::Conflict(format!("a key with id {id:?} exists")));
                }
                id
            }
            None => util::generate_id().map_err(ApiError::Internal)?,
        };
        let owner_created = Self::ensure_owner(&mut t, &c.owner, "active").await?;
        let (row, key) = Self::new_key(
            id,
            c.owner,
            &c.prefix,
            c.encoding,
            c.bytes,
            c.settings,
            c.expires_at,
            t.now,
        )?;
        Self::insert_key(&mut t, &row, true).await?;
        if owner_created {
            Self::audit(
                &mut t,
                actor,
                "owner.create",
                &format!("owner:{}", row.owner),
                json!({"status": "active"}),
            )
            .await?;
        }
        Self::audit(
            &mut t,
            actor,
            "key.create",
            &format!("key:{}", row.id),
            settings_detail(&row),
        )
        .await?;
        t.doc_changed = true;
        self.commit(t).await?;
        Ok((row, key))
    }

    /// A key that is not deleted.
    pub async fn get_key(&self, id: &str) -> Result<Option<KeyRow>, ApiError> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE id = $1 AND status <> 'deleted'"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(key_row).transpose()?)
    }

    /// The key whose hash is `hash` (lowercase hex), unless deleted.
    pub async fn lookup(&self, hash: &str) -> Result<Option<KeyRow>, ApiError> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE hash = $1 AND status <> 'deleted'"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(key_row).transpose()?)
    }

    /// Up to `f.limit` keys in id order.
    pub async fn list_keys(&self, f: &KeyFilter) -> Result<Vec<KeyRow>, ApiError> {
        let mut sql = format!("SELECT {KEY_COLUMNS} FROM keys WHERE status <> 'deleted'");
        let mut args: Vec<&str> = Vec::new();
        for (col, v) in [
            ("owner", &f.owner),
            ("status", &f.status),
            ("plan", &f.plan),
        ] {
            if let Some(v) = v {
                args.push(v);
                sql.push_str(&format!(" AND {col} = ${}", args.len()));
            }
        }
        if let Some(a) = &f.after {
            args.push(a);
            sql.push_str(&format!(" AND id > ${}", args.len()));
        }
        sql.push_str(&format!(" ORDER BY id LIMIT ${}", args.len() + 1));
        let mut q = sqlx::query(&sql);
        for a in args {
            q = q.bind(a);
        }
        let rows = q.bind(f.limit).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(key_row).collect::<Result<_, _>>()?)
    }

    /// `PATCH /v1/admin/keys/{id}`.
    pub async fn patch_key(
        &self,
        actor: Actor<'_>,
        id: &str,
        p: PatchKey,
    ) -> Result<KeyRow, ApiError> {
        let mut t = self.begin().await?;
        let Some(mut k) = Self::key_in(&mut t, id).await? else {
            return Err(ApiError::NotFound(format!("no key {id:?}")));
        };
        if let Some(s) = &p.status {
            if k.status == "revoked" && s != "revoked" {
                return Err(ApiError::Conflict(format!(
                    "key {id:?} is revoked; revocation is final"
                )));
            }
        }
        if let Some(Some(plan)) = &p.plan {
            if !Self::plan_exists(&mut t, plan).await? {
                return Err(ApiError::bad("plan", format!("unknown plan {plan:?}")));
            }
        }
        let before = k.clone();
        let s = &mut k.settings;
        if let Some(v) = p.name {
            s.name = v;
        }
        if let Some(v) = p.description {
            s.description = v;
        }
        if let Some(v) = p.scopes {
            s.scopes = v;
        }
        if let Some(v) = p.sites {
            s.sites = v;
        }
        if let Some(v) = p.allowed_ips {
            s.allowed_ips = v;
        }
        if let Some(v) = p.plan {
            s.plan = v;
        }
        if let Some(v) = p.rate_limits {
            s.rate_limits = v;
        }
        let status_changed = p.status.as_ref().is_some_and(|s| *s != k.status);
        if let Some(v) = p.status {
            k.status = v;
        }
        let (a, b) = (&before.settings, &k.settings);
        let doc_changed = status_changed
            || a.scopes != b.scopes
            || a.sites != b.sites
            || a.allowed_ips != b.allowed_ips
            || a.plan != b.plan
            || a.rate_limits != b.rate_limits;
        let changed = doc_changed || a.name != b.name || a.description != b.description;
        if !changed {
            return Ok(before);
        }
        k.updated_at = t.now;
        let s = &k.settings;
        sqlx::query(
            "UPDATE keys SET name = $1, description = $2, scopes = $3, sites = $4, allowed_ips = $5, \
             plan = $6, rate_limits = $7, status = $8, updated_at = $9, \
             status_at = CASE WHEN status = $8 THEN status_at ELSE $9 END WHERE id = $10",
        )
        .bind(&s.name)
        .bind(&s.description)
        .bind(model::list_to_text(&s.scopes))
        .bind(model::list_to_text(&s.sites))
        .bind(model::list_to_text(&s.allowed_ips))
        .bind(&s.plan)
        .bind(model::limits_to_text(&s.rate_limits))
        .bind(&k.status)
        .bind(t.now)
        .bind(id)
        .execute(&mut *t.tx)
        .await?;
        let action = if status_changed {
            match k.status.as_str() {
                "active" => "key.enable",
                "disabled" => "key.disable",
                _ => "key.revoke",
            }
        } else {
            "key.update"
        };
        Self::audit(
            &mut t,
            actor,
            action,
            &format!("key:{id}"),
            diff(&before, &k),
        )
        .await?;
        t.doc_changed = doc_changed;
        self.commit(t).await?;
        Ok(k)
    }

    /// `POST /v1/admin/keys/{id}/rotate`: the new record and key.
    pub async fn rotate(
        &self,
        actor: Actor<'_>,
        id: &str,
        r: Rotate,
    ) -> Result<(KeyRow, String), ApiError> {
        let mut t = self.begin().await?;
        let Some(old) = Self::key_in(&mut t, id).await? else {
            return Err(ApiError::NotFound(format!("no key {id:?}")));
        };
        if old.status == "revoked" {
            return Err(ApiError::Conflict(format!("key {id:?} is revoked")));
        }
        let prefix = old
            .prefix
            .clone()
            .unwrap_or_else(|| model::DEFAULT_PREFIX.into());
        let encoding = old
            .encoding
            .as_deref()
            .and_then(model::Encoding::parse)
            .unwrap_or(model::Encoding::Base62);
        let bytes = old
            .bytes
            .and_then(|b| u64::try_from(b).ok())
            .unwrap_or(model::DEFAULT_BYTES);
        let new_id = util::generate_id().map_err(ApiError::Internal)?;
        let (row, key) = Self::new_key(
            new_id,
            old.owner.clone(),
            &prefix,
            encoding,
            bytes,
            old.settings.clone(),
            r.expires_at,
            t.now,
        )?;
        Self::insert_key(&mut t, &row, true).await?;
        let until = t.now.saturating_add(r.overlap_s);
        let old_expiry = Some(old.expires_at.map_or(until, |e| e.min(until)));
        sqlx::query("UPDATE keys SET expires_at = $1, updated_at = $2 WHERE id = $3")
            .bind(old_expiry)
            .bind(t.now)
            .bind(id)
            .execute(&mut *t.tx)
            .await?;
        Self::audit(
            &mut t,
            actor,
            "key.rotate",
            &format!("key:{id}"),
            json!({"new_id": row.id, "old_expires_at": old_expiry.map(util::rfc3339),
                   "expires_at": r.expires_at.map(util::rfc3339)}),
        )
        .await?;
        t.doc_changed = true;
        self.commit(t).await?;
        Ok((row, key))
    }

    /// `DELETE /v1/admin/keys/{id}`: the key leaves the document at once; its row stays (as
    /// `deleted`, invisible to the admin API) for the retention period, then is purged.
    pub async fn delete_key(&self, actor: Actor<'_>, id: &str) -> Result<(), ApiError> {
        let mut t = self.begin().await?;
        if Self::key_in(&mut t, id).await?.is_none() {
            return Err(ApiError::NotFound(format!("no key {id:?}")));
        }
        sqlx::query("UPDATE keys SET status = 'deleted', listed = 0, status_at = $1, updated_at = $1 WHERE id = $2")
            .bind(t.now)
            .bind(id)
            .execute(&mut *t.tx)
            .await?;
        Self::audit(&mut t, actor, "key.delete", &format!("key:{id}"), json!({})).await?;
        t.doc_changed = true;
        self.commit(t).await
    }

    fn named(r: &AnyRow, with_status: bool) -> Result<Named, sqlx::Error> {
        let limits: Option<String> = r.try_get("rate_limits")?;
        Ok(Named {
            id: r.try_get("id")?,
            status: if with_status {
                Some(r.try_get("status")?)
            } else {
                None
            },
            rate_limits: model::limits_from_text(limits.as_deref()),
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
        })
    }

    /// An owner.
    pub async fn get_owner(&self, id: &str) -> Result<Option<Named>, ApiError> {
        let r = sqlx::query(
            "SELECT id, status, rate_limits, created_at, updated_at FROM owners WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(r.as_ref().map(|r| Self::named(r, true)).transpose()?)
    }

    /// Every owner, in id order.
    pub async fn list_owners(&self) -> Result<Vec<Named>, ApiError> {
        let rows = sqlx::query(
            "SELECT id, status, rate_limits, created_at, updated_at FROM owners ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| Self::named(r, true))
            .collect::<Result<_, _>>()?)
    }

    /// A plan.
    pub async fn get_plan(&self, id: &str) -> Result<Option<Named>, ApiError> {
        let r =
            sqlx::query("SELECT id, rate_limits, created_at, updated_at FROM plans WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(r.as_ref().map(|r| Self::named(r, false)).transpose()?)
    }

    /// Every plan, in id order.
    pub async fn list_plans(&self) -> Result<Vec<Named>, ApiError> {
        let rows =
            sqlx::query("SELECT id, rate_limits, created_at, updated_at FROM plans ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .map(|r| Self::named(r, false))
            .collect::<Result<_, _>>()?)
    }

    /// `PUT /v1/admin/owners/{id}`: whether it was created, and the stored owner.
    pub async fn put_owner(
        &self,
        actor: Actor<'_>,
        id: &str,
        o: Owner,
    ) -> Result<(bool, Named), ApiError> {
        let mut t = self.begin().await?;
        let existing = sqlx::query(
            "SELECT id, status, rate_limits, created_at, updated_at FROM owners WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *t.tx)
        .await?;
        let existing = existing
            .as_ref()
            .map(|r| Self::named(r, true))
            .transpose()?;
        let limits = model::limits_to_text(&o.rate_limits);
        let created = existing.is_none();
        let same = existing.as_ref().is_some_and(|e| {
            e.status.as_deref() == Some(o.status.as_str()) && e.rate_limits == o.rate_limits
        });
        let created_at = existing.as_ref().map_or(t.now, |e| e.created_at);
        let updated_at = if same {
            existing.as_ref().map_or(t.now, |e| e.updated_at)
        } else {
            t.now
        };
        if !same {
            sqlx::query(
                "INSERT INTO owners (id, status, rate_limits, created_at, updated_at) VALUES ($1, $2, $3, $4, $4) \
                 ON CONFLICT (id) DO UPDATE SET status = $2, rate_limits = $3, updated_at = $4",
            )
            .bind(id)
            .bind(&o.status)
            .bind(&limits)
            .bind(t.now)
            .execute(&mut *t.tx)
            .await?;
            let action = if created {
                "owner.create"
            } else {
                "owner.update"
            };
            Self::audit(
                &mut t,
                actor,
                action,
                &format!("owner:{id}"),
                json!({"status": o.status, "rate_limits": o.rate_limits}),
            )
            .await?;
            t.doc_changed = true;
        }
        self.commit(t).await?;
        Ok((
            created,
            Named {
                id: id.to_string(),
                status: Some(o.status),
                rate_limits: o.rate_limits,
                created_at,
                updated_at,
            },
        ))
    }

    /// `PUT /v1/admin/plans/{id}`.
    pub async fn put_plan(
        &self,
        actor: Actor<'_>,
        id: &str,
        limits: Option<Vec<RateLimit>>,
    ) -> Result<(bool, Named), ApiError> {
        let mut t = self.begin().await?;
        let existing =
            sqlx::query("SELECT id, rate_limits, created_at, updated_at FROM plans WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *t.tx)
                .await?;
        let existing = existing
            .as_ref()
            .map(|r| Self::named(r, false))
            .transpose()?;
        let created = existing.is_none();
        let same = existing.as_ref().is_some_and(|e| e.rate_limits == limits);
        let created_at = existing.as_ref().map_or(t.now, |e| e.created_at);
        let updated_at = if same {
            existing.as_ref().map_or(t.now, |e| e.updated_at)
        } else {
            t.now
        };
        if !same {
            sqlx::query(
                "INSERT INTO plans (id, rate_limits, created_at, updated_at) VALUES ($1, $2, $3, $3) \
                 ON CONFLICT (id) DO UPDATE SET rate_limits = $2, updated_at = $3",
            )
            .bind(id)
            .bind(model::limits_to_text(&limits))
            .bind(t.now)
            .execute(&mut *t.tx)
            .await?;
            let action = if created {
                "plan.create"
            } else {
                "plan.update"
            };
            Self::audit(
                &mut t,
                actor,
                action,
                &format!("plan:{id}"),
                json!({"rate_limits": limits}),
            )
            .await?;
            t.doc_changed = true;
        }
        self.commit(t).await?;
        Ok((
            created,
            Named {
                id: id.to_string(),
                status: None,
                rate_limits: limits,
                created_at,
                updated_at,
            },
        ))
    }

    /// `DELETE /v1/admin/owners/{id}` or `/plans/{id}`: 404 when missing, 409 while a key that
    /// is not deleted refers to it.
    pub async fn delete_named(
        &self,
        actor: Actor<'_>,
        what: Named2,
        id: &str,
    ) -> Result<(), ApiError> {
        let (table, col, noun) = match what {
            Named2::Owner => ("owners", "owner", "owner"),
            Named2::Plan => ("plans", "plan", "plan"),
        };
        let mut t = self.begin().await?;
        let found = sqlx::query(&format!("SELECT id FROM {table} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&mut *t.tx)
            .await?;
        if found.is_none() {
            return Err(ApiError::NotFound(format!("no {noun} {id:?}")));
        }
        let using = sqlx::query(&format!(
            "SELECT id FROM keys WHERE {col} = $1 AND status <> 'deleted' ORDER BY id LIMIT 1"
        ))
        .bind(id)
        .fetch_optional(&mut *t.tx)
        .await?;
        if let Some(r) = using {
            let key: String = r.try_get(0)?;
            return Err(ApiError::Conflict(format!(
                "{noun} {id:?} is still used by key {key:?}"
            )));
        }
        sqlx::query(&format!("DELETE FROM {table} WHERE id = $1"))
            .bind(id)
            .execute(&mut *t.tx)
            .await?;
        Self::audit(
            &mut t,
            actor,
            &format!("{noun}.delete"),
            &format!("{noun}:{id}"),
            json!({}),
        )
        .await?;
        t.doc_changed = true;
        self.commit(t).await
    }

    /// Applies a usage report: per-day counts on `day` and `last_used_at` (the later one wins).
    /// Returns (reports applied, reports naming no known key). Never touches the document.
    pub async fn apply_usage(
        &self,
        day: &str,
        reports: &[UsageReport],
    ) -> Result<(usize, usize), ApiError> {
        let _guard = self.lock.clone().lock_owned().await;
        let mut tx = self.pool.begin().await?;
        let (mut applied, mut unknown) = (0, 0);
        for r in reports {
            let known = sqlx::query("SELECT id FROM keys WHERE id = $1 AND status <> 'deleted'")
                .bind(&r.id)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            if !known {
                unknown += 1;
                continue;
            }
            applied += 1;
            let counts = std::iter::once(("allowed", r.allowed))
                .chain(r.refused.iter().map(|(c, n)| (c.as_str(), *n)));
            for (class, n) in counts.filter(|(_, n)| *n > 0) {
                sqlx::query(
                    "INSERT INTO usage (key_id, day, class, count) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (key_id, day, class) DO UPDATE SET count = usage.count + $4",
                )
                .bind(&r.id)
                .bind(day)
                .bind(class)
                .bind(to_i64(n))
                .execute(&mut *tx)
                .await?;
            }
            if let Some(at) = r.last_used_at {
                sqlx::query(
                    "UPDATE keys SET last_used_at = $1 WHERE id = $2 AND (last_used_at IS NULL OR last_used_at < $1)",
                )
                .bind(at)
                .bind(&r.id)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok((applied, unknown))
    }

    /// Per-day usage of a key, oldest first, from `since` (`YYYY-MM-DD`):
    /// `[{"day", "allowed", "refused": {class: n}}]`.
    pub async fn key_usage(&self, id: &str, since: &str) -> Result<Vec<Value>, ApiError> {
        let rows = sqlx::query("SELECT day, class, count FROM usage WHERE key_id = $1 AND day >= $2 ORDER BY day, class")
            .bind(id)
            .bind(since)
            .fetch_all(&self.pool)
            .await?;
        let mut out: Vec<Value> = Vec::new();
        for r in rows {
            let day: String = r.try_get(0)?;
            let class: String = r.try_get(1)?;
            let n: i64 = r.try_get(2)?;
            if out
                .last()
                .and_then(|l| l.get("day"))
                .and_then(Value::as_str)
                != Some(day.as_str())
            {
                out.push(json!({"day": day, "allowed": 0, "refused": {}}));
            }
            let Some(entry) = out.last_mut().and_then(Value::as_object_mut) else {
                continue;
            };
            if class == "allowed" {
                entry.insert("allowed".into(), json!(n));
            } else if let Some(refused) = entry.get_mut("refused").and_then(Value::as_object_mut) {
                refused.insert(class, json!(n));
            }
        }
        Ok(out)
    }

    /// Audit entries after `after` (a sequence number), oldest first.
    pub async fn audit_log(&self, after: i64, limit: i64) -> Result<Vec<Value>, ApiError> {
        let rows = sqlx::query("SELECT seq, at, actor, action, object, detail FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2")
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let detail: String = r.try_get(5)?;
            out.push(json!({
                "seq": r.try_get::<i64, _>(0)?,
                "at": util::rfc3339(r.try_get(1)?),
                "actor": r.try_get::<String, _>(2)?,
                "action": r.try_get::<String, _>(3)?,
                "object": r.try_get::<String, _>(4)?,
                "detail": serde_json::from_str::<Value>(&detail).unwrap_or(Value::Null),
            }));
        }
        Ok(out)
    }

    /// Takes keys revoked or expired for longer than `retention_s` out of the document, and
    /// drops rows deleted for longer than that (with their usage). Returns keys unlisted.
    pub async fn purge(&self, retention_s: i64) -> Result<u64, ApiError> {
        let mut t = self.begin().await?;
        let cutoff = t.now.saturating_sub(retention_s);
        let unlisted = sqlx::query(
            "UPDATE keys SET listed = 0 WHERE listed = 1 AND ((status = 'revoked' AND status_at <= $1) \
             OR (expires_at IS NOT NULL AND expires_at <= $1))",
        )
        .bind(cutoff)
        .execute(&mut *t.tx)
        .await?
        .rows_affected();
        sqlx::query("DELETE FROM usage WHERE key_id IN (SELECT id FROM keys WHERE status = 'deleted' AND status_at <= $1)")
            .bind(cutoff)
            .execute(&mut *t.tx)
            .await?;
        sqlx::query("DELETE FROM keys WHERE status = 'deleted' AND status_at <= $1")
            .bind(cutoff)
            .execute(&mut *t.tx)
            .await?;
        // Tombstones far behind the current generation: a builder that far behind builds whole.
        let generation: i64 = sqlx::query("SELECT generation FROM meta WHERE id = 1")
            .fetch_one(&mut *t.tx)
            .await?
            .try_get(0)?;
        let keep_from = generation.saturating_sub(TOMBSTONE_GENERATIONS);
        let dropped = sqlx::query("DELETE FROM key_tombstones WHERE generation < $1")
            .bind(keep_from)
            .execute(&mut *t.tx)
            .await?
            .rows_affected();
        if dropped > 0 {
            sqlx::query(
                "UPDATE meta SET tombstones_from = $1 WHERE id = 1 AND tombstones_from < $1",
            )
            .bind(keep_from)
            .execute(&mut *t.tx)
            .await?;
        }
        if unlisted > 0 {
            Self::audit(
                &mut t,
                "keyservice",
                "key.unlist",
                "keys",
                json!({"count": unlisted, "retention_s": retention_s}),
            )
            .await?;
            t.doc_changed = true;
        }
        self.commit(t).await?;
        Ok(unlisted)
    }

    /// Brings a validated §2 document into the database (see `import::Import`).
    pub async fn import(
        &self,
        actor: Actor<'_>,
        doc: crate::model::Import,
    ) -> Result<Value, ApiError> {
        let mut t = self.begin().await?;
        let (mut created, mut updated) = (0u64, 0u64);
        for (id, o) in &doc.owners {
            sqlx::query(
                "INSERT INTO owners (id, status, rate_limits, created_at, updated_at) VALUES ($1, $2, $3, $4, $4) \
                 ON CONFLICT (id) DO UPDATE SET status = $2, rate_limits = $3, updated_at = $4",
            )
            .bind(id)
            .bind(&o.status)
            .bind(model::limits_to_text(&o.rate_limits))
            .bind(t.now)
            .execute(&mut *t.tx)
            .await?;
        }
        for (id, l) in &doc.plans {
            sqlx::query(
                "INSERT INTO plans (id, rate_limits, created_at, updated_at) VALUES ($1, $2, $3, $3) \
                 ON CONFLICT (id) DO UPDATE SET rate_limits = $2, updated_at = $3",
            )
            .bind(id)
            .bind(model::limits_to_text(l))
            .bind(t.now)
            .execute(&mut *t.tx)
            .await?;
        }
        for (i, k) in doc.keys.iter().enumerate() {
            // Owners a §2 list names nowhere (only possible without `owners`) are created
            // active; with `owners`, a key whose owner is missing was invalid: its owner comes
            // in disabled, so the key stays refused.
            let status = if doc.has_owners { "disabled" } else { "active" };
            Self::ensure_owner(&mut t, &k.owner, status).await?;
            let by_id = sqlx::query("SELECT hash, status FROM keys WHERE id = $1")
                .bind(&k.id)
                .fetch_optional(&mut *t.tx)
                .await?;
            match by_id {
                Some(r) => {
                    let hash: String = r.try_get(0)?;
                    let status: String = r.try_get(1)?;
                    if hash != k.hash || status == "deleted" {
                        return Err(ApiError::Conflict(format!(
                            "keys[{i}]: key id {:?} exists with another key (or was deleted)",
                            k.id
                        )));
                    }
                    if status == "revoked" && k.status != "revoked" {
                        return Err(ApiError::Conflict(format!(
                            "keys[{i}]: key {:?} is revoked; revocation is final",
                            k.id
                        )));
                    }
                    let s = &k.settings;
                    sqlx::query(
                        "UPDATE keys SET owner = $1, name = COALESCE($2, name), description = COALESCE($3, description), \
                         scopes = $4, sites = $5, allowed_ips = $6, plan = $7, rate_limits = $8, status = $9, \
                         expires_at = $10, updated_at = $11, listed = 1, \
                         status_at = CASE WHEN status = $9 THEN status_at ELSE $11 END WHERE id = $12",
                    )
                    .bind(&k.owner)
                    .bind(&s.name)
                    .bind(&s.description)
                    .bind(model::list_to_text(&s.scopes))
                    .bind(model::list_to_text(&s.sites))
                    .bind(model::list_to_text(&s.allowed_ips))
                    .bind(&s.plan)
                    .bind(model::limits_to_text(&s.rate_limits))
                    .bind(&k.status)
                    .bind(k.expires_at)
                    .bind(t.now)
                    .bind(&k.id)
                    .execute(&mut *t.tx)
                    .await?;
                    updated += 1;
                }
                None => {
                    let other = sqlx::query("SELECT id FROM keys WHERE hash = $1")
                        .bind(&k.hash)
                        .fetch_optional(&mut *t.tx)
                        .await?;
                    if let Some(r) = other {
                        let other: String = r.try_get(0)?;
                        return Err(ApiError::Conflict(format!(
                            "keys[{i}]: the hash of key {:?} belongs to key {other:?}",
                            k.id
                        )));
                    }
                    let row = KeyRow {
                        id: k.id.clone(),
                        hash: k.hash.clone(),
                        owner: k.owner.clone(),
                        prefix: None,
                        encoding: None,
                        bytes: None,
                        status: k.status.clone(),
                        settings: k.settings.clone(),
                        expires_at: k.expires_at,
                        created_at: k.created_at.unwrap_or(t.now),
                        updated_at: k.updated_at.unwrap_or(t.now),
                        last_used_at: k.last_used_at,
                    };
                    Self::insert_key(&mut t, &row, true).await?;
                    created += 1;
                }
            }
        }
        let summary = json!({"owners": doc.owners.len(), "plans": doc.plans.len(),
            "keys": {"created": created, "updated": updated, "skipped": doc.skipped}});
        Self::audit(&mut t, actor, "import", "keys", summary.clone()).await?;
        t.doc_changed = true;
        self.commit(t).await?;
        Ok(summary)
    }
}

/// Owner or plan (for the shared delete).
#[derive(Clone, Copy, Debug)]
pub enum Named2 {
    Owner,
    Plan,
}

fn settings_detail(k: &KeyRow) -> Value {
    let s = &k.settings;
    json!({"owner": k.owner, "prefix": k.prefix, "encoding": k.encoding, "bytes": k.bytes,
        "name": s.name, "scopes": s.scopes, "sites": s.sites, "allowed_ips": s.allowed_ips,
        "plan": s.plan, "rate_limits": s.rate_limits, "expires_at": k.expires_at.map(util::rfc3339)})
}

/// The members that changed, as `{"member": {"from": …, "to": …}}`.
fn diff(a: &KeyRow, b: &KeyRow) -> Value {
    let (ra, rb) = (a.record(), b.record());
    let mut out = serde_json::Map::new();
    for m in [
        "name",
        "description",
        "scopes",
        "sites",
        "allowed_ips",
        "plan",
        "rate_limits",
        "status",
    ] {
        if ra.get(m) != rb.get(m) {
            out.insert(m.into(), json!({"from": ra.get(m), "to": rb.get(m)}));
        }
    }
    Value::Object(out)
}
