-- sealgate-hq schema 4: what auditors do at headquarters' console (sealgate-console with
-- [hq_database]): logins, refused logins, log-outs, searches, exports, and acknowledgements of
-- a site's alerts. Append-only like the records; the database itself names the role that
-- wrote each row, so a console cannot write in another's name.

CREATE TABLE console_events (
    id              bigserial PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    at_ms           bigint NOT NULL DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::bigint,
    console         text NOT NULL DEFAULT current_user,
    auditor         text NOT NULL CHECK (length(auditor) BETWEEN 1 AND 64),
    kind            text NOT NULL CHECK (kind IN ('console.login', 'console.login_failed',
                        'console.logout', 'console.search', 'console.export',
                        'alert.acknowledged')),
    reason          text NOT NULL CHECK (length(reason) <= 64),
    detail          text NOT NULL CHECK (length(detail) <= 2000),
    -- The alert acknowledged: a record of this site's enrolled epoch in force.
    site            text REFERENCES sites (site),
    epoch           integer,
    ref_seq         bigint,
    CHECK ((kind = 'alert.acknowledged') = (ref_seq IS NOT NULL))
);
CREATE INDEX console_events_ref ON console_events (site, epoch, ref_seq) WHERE ref_seq IS NOT NULL;
CREATE TRIGGER console_events_append_only BEFORE UPDATE OR DELETE ON console_events
    FOR EACH ROW EXECUTE FUNCTION sealgate_append_only();
CREATE TRIGGER console_events_no_truncate BEFORE TRUNCATE ON console_events
    FOR EACH STATEMENT EXECUTE FUNCTION sealgate_append_only();
