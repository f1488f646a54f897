-- keygate key service, schema 1 (SQLite). Times are Unix seconds (UTC); lists are JSON text.
CREATE TABLE meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    -- Bumped in the same transaction as every change to the key-list document.
    generation INTEGER NOT NULL,
    changed_at INTEGER NOT NULL,
    -- Bumped by every admin write: the row every writer locks first.
    writes INTEGER NOT NULL
);
INSERT INTO meta (id, generation, changed_at, writes) VALUES (1, 0, 0, 0);

CREATE TABLE owners (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    rate_limits TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE plans (
    id TEXT PRIMARY KEY,
    rate_limits TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    name TEXT,
    description TEXT,
    prefix TEXT,
    encoding TEXT,
    bytes INTEGER,
    status TEXT NOT NULL,
    scopes TEXT NOT NULL,
    sites TEXT NOT NULL,
    allowed_ips TEXT NOT NULL,
    plan TEXT,
    rate_limits TEXT,
    expires_at INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_used_at INTEGER,
    -- When the status last changed (retention of revoked and deleted keys).
    status_at INTEGER NOT NULL,
    -- 1 while the key is in the document; 0 once deleted or past retention.
    listed INTEGER NOT NULL
);
CREATE INDEX keys_owner ON keys (owner, id);
CREATE INDEX keys_plan ON keys (plan, id);
CREATE INDEX keys_listed ON keys (listed, id);

CREATE TABLE usage (
    key_id TEXT NOT NULL,
    day TEXT NOT NULL,
    class TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (key_id, day, class)
);

CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    object TEXT NOT NULL,
    detail TEXT NOT NULL
);
