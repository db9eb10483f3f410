-- sealgate-hq schema 1: enrolled sites with their verified heads, and every site's records,
-- checkpoints and central alerts. Everything but a site's head is append-only; a head only
-- moves forward. Applied by `sealgate-hq migrate`, in one transaction.

CREATE TABLE sites (
    site            text PRIMARY KEY,
    audit_key_id    text NOT NULL,
    audit_key_spki  bytea NOT NULL,
    enrolled_at     timestamptz NOT NULL DEFAULT now(),
    -- HQ's verified head: every record up to head_seq is here, linked, and covered by the
    -- checkpoint at checkpoint_seq.
    head_seq        bigint NOT NULL DEFAULT 0 CHECK (head_seq >= 0),
    head_hash       bytea NOT NULL DEFAULT decode(repeat('00', 32), 'hex'),
    checkpoint_seq  bigint NOT NULL DEFAULT 0,
    -- The checkpoint the one at checkpoint_seq names as the one before it.
    checkpoint_prev_seq bigint NOT NULL DEFAULT 0,
    head_at         timestamptz,
    last_seen       timestamptz,
    -- The newest checkpoint the site said its log has, at its last hello: what HQ lags by.
    reported_seq    bigint NOT NULL DEFAULT 0,
    reported_at_ms  bigint
);

CREATE TABLE records (
    site            text NOT NULL REFERENCES sites (site),
    seq             bigint NOT NULL,
    at_ms           bigint NOT NULL,
    kind            text NOT NULL,
    seal            text NOT NULL,
    device          text NOT NULL,
    device_profile  text NOT NULL,
    device_serial   text NOT NULL,
    caller          text NOT NULL,
    applicant       text NOT NULL,
    approvers       text NOT NULL,
    jti             text NOT NULL,
    doc_sha256      text NOT NULL,
    doc_type        text NOT NULL,
    currency        text NOT NULL,
    dept            text NOT NULL,
    purpose         text NOT NULL,
    reason          text NOT NULL,
    detail          text NOT NULL,
    evidence        text NOT NULL,
    amount          bigint,
    ref_seq         bigint,
    prev_hash       bytea NOT NULL,
    hash            bytea NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site, seq)
);
CREATE INDEX records_site_time ON records (site, at_ms);
CREATE INDEX records_kind_time ON records (kind, at_ms);

CREATE TABLE checkpoints (
    site            text NOT NULL REFERENCES sites (site),
    seq             bigint NOT NULL,
    prev_seq        bigint NOT NULL,
    head            bytea NOT NULL,
    at_ms           bigint NOT NULL,
    key_id          text NOT NULL,
    algorithm       text NOT NULL,
    signature       bytea NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site, seq)
);

-- HQ's witness cosignatures of the checkpoints it verified (docs/headquarters.md).
CREATE TABLE cosignatures (
    site            text NOT NULL REFERENCES sites (site),
    seq             bigint NOT NULL,
    head            bytea NOT NULL,
    checkpoint_at_ms bigint NOT NULL,
    cosigned_at_ms  bigint NOT NULL,
    key_id          text NOT NULL,
    algorithm       text NOT NULL,
    signature       bytea NOT NULL,
    PRIMARY KEY (site, seq)
);

CREATE TABLE alerts (
    id              bigserial PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    -- The enrolled site, or the certificate fingerprint of a stranger.
    site            text NOT NULL,
    kind            text NOT NULL,
    seq             bigint,
    detail          text NOT NULL
);
CREATE INDEX alerts_site_time ON alerts (site, at);

-- `sealctl hq alerts --follow` listens here: each new alert's id.
CREATE FUNCTION sealgate_alert_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sealgate_alerts', NEW.id::text);
    RETURN NEW;
END
$$;
CREATE TRIGGER alerts_notify AFTER INSERT ON alerts
    FOR EACH ROW EXECUTE FUNCTION sealgate_alert_notify();

CREATE FUNCTION sealgate_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'sealgate: % on % refused: the table is append-only', TG_OP, TG_TABLE_NAME;
END
$$;

CREATE TRIGGER records_append_only BEFORE UPDATE OR DELETE ON records
    FOR EACH ROW EXECUTE FUNCTION sealgate_append_only();
CREATE TRIGGER records_no_truncate BEFORE TRUNCATE ON records
    FOR EACH STATEMENT EXECUTE FUNCTION sealgate_append_only();
CREATE TRIGGER checkpoints_append_only BEFORE UPDATE OR DELETE ON checkpoints
    FOR EACH ROW EXECUTE FUNCTION sealgate_append_only();
CREATE TRIGGER checkpoints_no_truncate BEFORE TRUNCATE ON checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION sealgate_append_only();
CREATE TRIGGER cosignatures_append_only BEFORE UPDATE OR DELETE ON cosignatures
    FOR EACH ROW EXECUTE FUNCTION sealgate_append_only();
CREATE TRIGGER cosignatures_no_truncate BEFORE TRUNCATE ON cosignatures
    FOR EACH STATEMENT EXECUTE FUNCTION sealgate_append_only();
CREATE TRIGGER alerts_append_only BEFORE UPDATE OR DELETE ON alerts
    FOR EACH ROW EXECUTE FUNCTION sealgate_append_only();
CREATE TRIGGER alerts_no_truncate BEFORE TRUNCATE ON alerts
    FOR EACH STATEMENT EXECUTE FUNCTION sealgate_append_only();

-- A site is never deleted, its enrolled key never silently replaced, and its head never goes
-- back.
CREATE FUNCTION sealgate_head_forward() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'sealgate: deleting site % refused', OLD.site;
    END IF;
    IF NEW.site <> OLD.site OR NEW.audit_key_spki <> OLD.audit_key_spki
       OR NEW.audit_key_id <> OLD.audit_key_id THEN
        RAISE EXCEPTION 'sealgate: site % keeps its id and enrolled key', OLD.site;
    END IF;
    IF NEW.head_seq < OLD.head_seq OR NEW.checkpoint_seq < OLD.checkpoint_seq THEN
        RAISE EXCEPTION 'sealgate: the head of site % may not go back from % to %',
            OLD.site, OLD.head_seq, NEW.head_seq;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER sites_head_forward BEFORE UPDATE OR DELETE ON sites
    FOR EACH ROW EXECUTE FUNCTION sealgate_head_forward();
CREATE TRIGGER sites_no_truncate BEFORE TRUNCATE ON sites
    FOR EACH STATEMENT EXECUTE FUNCTION sealgate_append_only();
