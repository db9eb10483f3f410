-- sealgate-hq schema 3: a site's enrolments. A site whose audit key changed (its device was
-- replaced, its log started again from seq 1) is enrolled again, explicitly
-- (`sealgate-hq enrol --site ID --reason ...`), never by a silent reset: what HQ holds of it so
-- far stays as one epoch, and its new log is the next. Records, checkpoints and cosignatures
-- are each an epoch's.

CREATE TABLE enrolments (
    site            text NOT NULL REFERENCES sites (site),
    epoch           integer NOT NULL CHECK (epoch > 0),
    audit_key_id    text NOT NULL,
    audit_key_spki  bytea NOT NULL,
    enrolled_at     timestamptz NOT NULL DEFAULT now(),
    reason          text NOT NULL,
    -- HQ's verified head of the epoch before, where it ends (0 for a first enrolment).
    previous_head_seq  bigint NOT NULL DEFAULT 0,
    previous_head_hash bytea,
    PRIMARY KEY (site, epoch)
);
CREATE TRIGGER enrolments_append_only BEFORE UPDATE OR DELETE ON enrolments
    FOR EACH ROW EXECUTE FUNCTION sealgate_append_only();
CREATE TRIGGER enrolments_no_truncate BEFORE TRUNCATE ON enrolments
    FOR EACH STATEMENT EXECUTE FUNCTION sealgate_append_only();
INSERT INTO enrolments (site, epoch, audit_key_id, audit_key_spki, enrolled_at, reason)
    SELECT site, 1, audit_key_id, audit_key_spki, enrolled_at, 'enrolled' FROM sites;

ALTER TABLE sites ADD COLUMN epoch integer NOT NULL DEFAULT 1;

ALTER TABLE records ADD COLUMN epoch integer NOT NULL DEFAULT 1;
ALTER TABLE records ALTER COLUMN epoch DROP DEFAULT;
ALTER TABLE records DROP CONSTRAINT records_pkey;
ALTER TABLE records ADD PRIMARY KEY (site, epoch, seq);

ALTER TABLE checkpoints ADD COLUMN epoch integer NOT NULL DEFAULT 1;
ALTER TABLE checkpoints ALTER COLUMN epoch DROP DEFAULT;
ALTER TABLE checkpoints DROP CONSTRAINT checkpoints_pkey;
ALTER TABLE checkpoints ADD PRIMARY KEY (site, epoch, seq);

ALTER TABLE cosignatures ADD COLUMN epoch integer NOT NULL DEFAULT 1;
ALTER TABLE cosignatures ALTER COLUMN epoch DROP DEFAULT;
ALTER TABLE cosignatures DROP CONSTRAINT cosignatures_pkey;
ALTER TABLE cosignatures ADD PRIMARY KEY (site, epoch, seq);

-- A site is never deleted; its head never goes back, and its enrolled key never changes,
-- except that a new epoch (one more than the last, enrolled in `enrolments` with that key)
-- starts with the new key from an empty head.
CREATE OR REPLACE FUNCTION sealgate_head_forward() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'sealgate: deleting site % refused', OLD.site;
    END IF;
    IF NEW.site <> OLD.site THEN
        RAISE EXCEPTION 'sealgate: site % keeps its id', OLD.site;
    END IF;
    IF NEW.epoch <> OLD.epoch THEN
        IF NEW.epoch <> OLD.epoch + 1 OR NEW.head_seq <> 0 OR NEW.checkpoint_seq <> 0 THEN
            RAISE EXCEPTION 'sealgate: site % may only go on to epoch % with an empty head',
                OLD.site, OLD.epoch + 1;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM enrolments e WHERE e.site = NEW.site AND e.epoch = NEW.epoch
                       AND e.audit_key_spki = NEW.audit_key_spki
                       AND e.audit_key_id = NEW.audit_key_id) THEN
            RAISE EXCEPTION 'sealgate: epoch % of site % is not enrolled with that key',
                NEW.epoch, OLD.site;
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.audit_key_spki <> OLD.audit_key_spki OR NEW.audit_key_id <> OLD.audit_key_id THEN
        RAISE EXCEPTION 'sealgate: site % keeps its enrolled key within an epoch', OLD.site;
    END IF;
    IF NEW.head_seq < OLD.head_seq OR NEW.checkpoint_seq < OLD.checkpoint_seq THEN
        RAISE EXCEPTION 'sealgate: the head of site % may not go back from % to %',
            OLD.site, OLD.head_seq, NEW.head_seq;
    END IF;
    RETURN NEW;
END
$$;
