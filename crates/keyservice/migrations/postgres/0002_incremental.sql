-- keygate key service, schema 2 (PostgreSQL): what incremental document builds read.
-- Each key row carries the generation current when a served column last changed (the
-- transaction bumps the generation after its writes, so the rows of every change not yet in a
-- document built at generation G have doc_gen >= G); deleted rows leave a tombstone.
ALTER TABLE keys ADD COLUMN doc_gen BIGINT NOT NULL DEFAULT 0;
CREATE INDEX keys_doc_gen ON keys (doc_gen);

CREATE TABLE key_tombstones (
    id TEXT COLLATE "C" NOT NULL,
    generation BIGINT NOT NULL
);
CREATE INDEX key_tombstones_generation ON key_tombstones (generation);

-- Tombstones of generations below this one have been dropped: a builder that served an
-- older generation builds whole.
ALTER TABLE meta ADD COLUMN tombstones_from BIGINT NOT NULL DEFAULT 0;

CREATE FUNCTION keygate_keys_doc_gen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.doc_gen := (SELECT generation FROM meta WHERE id = 1);
    RETURN NEW;
END
$$;

CREATE TRIGGER keys_doc_gen_insert BEFORE INSERT ON keys
    FOR EACH ROW EXECUTE FUNCTION keygate_keys_doc_gen();
CREATE TRIGGER keys_doc_gen_update BEFORE UPDATE OF id, hash, owner, status, expires_at,
    allowed_ips, sites, scopes, plan, rate_limits, listed ON keys
    FOR EACH ROW EXECUTE FUNCTION keygate_keys_doc_gen();

CREATE FUNCTION keygate_keys_tombstone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO key_tombstones (id, generation) VALUES (OLD.id, (SELECT generation FROM meta WHERE id = 1));
    RETURN NULL;
END
$$;

CREATE TRIGGER keys_tombstone_delete AFTER DELETE ON keys
    FOR EACH ROW EXECUTE FUNCTION keygate_keys_tombstone();
CREATE TRIGGER keys_tombstone_rename AFTER UPDATE OF id ON keys
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id) EXECUTE FUNCTION keygate_keys_tombstone();
