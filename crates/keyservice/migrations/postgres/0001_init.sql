-- keygate key service, schema 1 (PostgreSQL). Times are Unix seconds (UTC); lists are JSON text.
CREATE TABLE meta (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    -- Bumped in the same transaction as every change to the key-list document.
    generation BIGINT NOT NULL,
    changed_at BIGINT NOT NULL,
    -- Bumped by every admin write: the row every writer locks first.
    writes BIGINT NOT NULL
);
INSERT INTO meta (id, generation, changed_at, writes) VALUES (1, 0, 0, 0);

CREATE TABLE owners (
    id TEXT COLLATE "C" PRIMARY KEY,
    status TEXT NOT NULL,
    rate_limits TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE plans (
    id TEXT COLLATE "C" PRIMARY KEY,
    rate_limits TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE keys (
    id TEXT COLLATE "C" PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    name TEXT,
    description TEXT,
    prefix TEXT,
    encoding TEXT,
    bytes BIGINT,
    status TEXT NOT NULL,
    scopes TEXT NOT NULL,
    sites TEXT NOT NULL,
    allowed_ips TEXT NOT NULL,
    plan TEXT,
    rate_limits TEXT,
    expires_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    last_used_at BIGINT,
    -- When the status last changed (retention of revoked and deleted keys).
    status_at BIGINT NOT NULL,
    -- 1 while the key is in the document; 0 once deleted or past retention.
    listed BIGINT NOT NULL
);
CREATE INDEX keys_owner ON keys (owner, id);
CREATE INDEX keys_plan ON keys (plan, id);
CREATE INDEX keys_listed ON keys (listed, id);

CREATE TABLE usage (
    key_id TEXT NOT NULL,
    day TEXT NOT NULL,
    class TEXT NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (key_id, day, class)
);

CREATE TABLE audit (
    seq BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    object TEXT NOT NULL,
    detail TEXT NOT NULL
);
