-- sealgate-hq schema 2: the configuration fragments HQ publishes for sites, signed with HQ's
-- policy key, and which one each site proves it has in force (the newest `config.applied` or
-- `daemon.started` record HQ verified from it).

CREATE TABLE policy_fragments (
    site            text NOT NULL REFERENCES sites (site),
    version         bigint NOT NULL CHECK (version > 0),
    issued_at_ms    bigint NOT NULL,
    body            text NOT NULL,
    key_id          text NOT NULL,
    algorithm       text NOT NULL,
    signature       bytea NOT NULL,
    published_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site, version)
);
CREATE TRIGGER policy_fragments_append_only BEFORE UPDATE OR DELETE ON policy_fragments
    FOR EACH ROW EXECUTE FUNCTION sealgate_append_only();
CREATE TRIGGER policy_fragments_no_truncate BEFORE TRUNCATE ON policy_fragments
    FOR EACH STATEMENT EXECUTE FUNCTION sealgate_append_only();

-- The fragment version in force at the site (0: none), its digest, and the seq of the
-- record that says so.
ALTER TABLE sites
    ADD COLUMN policy_version bigint NOT NULL DEFAULT 0,
    ADD COLUMN policy_sha256  text,
    ADD COLUMN policy_seq     bigint;
