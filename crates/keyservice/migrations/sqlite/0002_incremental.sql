-- keygate key service, schema 2 (SQLite): what incremental document builds read.
-- Each key row carries the generation current when a served column last changed (the
-- transaction bumps the generation after its writes, so the rows of every change not yet in a
-- document built at generation G have doc_gen >= G); deleted rows leave a tombstone.
ALTER TABLE keys ADD COLUMN doc_gen INTEGER NOT NULL DEFAULT 0;
CREATE INDEX keys_doc_gen ON keys (doc_gen);

CREATE TABLE key_tombstones (
    id TEXT NOT NULL,
    generation INTEGER NOT NULL
);
CREATE INDEX key_tombstones_generation ON key_tombstones (generation);

-- Tombstones of generations below this one have been dropped: a builder that served an
-- older generation builds whole.
ALTER TABLE meta ADD COLUMN tombstones_from INTEGER NOT NULL DEFAULT 0;

CREATE TRIGGER keys_doc_gen_insert AFTER INSERT ON keys BEGIN
    UPDATE keys SET doc_gen = (SELECT generation FROM meta WHERE id = 1) WHERE id = NEW.id;
END;

CREATE TRIGGER keys_doc_gen_update AFTER UPDATE OF id, hash, owner, status, expires_at, allowed_ips,
    sites, scopes, plan, rate_limits, listed ON keys BEGIN
    UPDATE keys SET doc_gen = (SELECT generation FROM meta WHERE id = 1) WHERE id = NEW.id;
END;

CREATE TRIGGER keys_tombstone_delete AFTER DELETE ON keys BEGIN
    INSERT INTO key_tombstones (id, generation) VALUES (OLD.id, (SELECT generation FROM meta WHERE id = 1));
END;

CREATE TRIGGER keys_tombstone_rename AFTER UPDATE OF id ON keys WHEN OLD.id <> NEW.id BEGIN
    INSERT INTO key_tombstones (id, generation) VALUES (OLD.id, (SELECT generation FROM meta WHERE id = 1));
END;
