//! The daemon's durable state: one SQLite database in `state_dir` (WAL, synchronous=FULL), with
//! a versioned schema: the replay ledger, TOTP state, and the audit log (written by
//! [`crate::audit::log`], in the same database so a use and its record commit together).
//!
//! Owns: opening the database with the settings that make a commit durable, migrations, and
//! serialising access. Never: retries a failed write as if it had succeeded.

use rusqlite::Connection;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {path}: {detail}")]
    Open { path: PathBuf, detail: String },
    #[error("the state database cannot be written: {0}")]
    Write(String),
    #[error("the state database cannot be read: {0}")]
    Read(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Write(e.to_string())
    }
}

/// Schema migrations; entry i brings `user_version` from i to i + 1.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE approvals (
    jti TEXT PRIMARY KEY,
    payload_sha256 BLOB NOT NULL,
    seal TEXT NOT NULL,
    applicant TEXT NOT NULL,
    uses_allowed INTEGER NOT NULL,
    uses_consumed INTEGER NOT NULL,
    exp INTEGER NOT NULL,
    first_used INTEGER NOT NULL
);
CREATE INDEX approvals_exp ON approvals(exp);
CREATE TABLE stamp_uses (
    id INTEGER PRIMARY KEY,
    applicant TEXT NOT NULL,
    seal TEXT NOT NULL,
    at INTEGER NOT NULL,
    jti TEXT NOT NULL
);
CREATE INDEX stamp_uses_applicant ON stamp_uses(applicant, seal, at);
CREATE TABLE mfa_users (
    user TEXT PRIMARY KEY,
    wrapped_secret BLOB NOT NULL,
    last_step INTEGER NOT NULL DEFAULT -1,
    failures INTEGER NOT NULL DEFAULT 0,
    locked INTEGER NOT NULL DEFAULT 0,
    enrolled_at INTEGER NOT NULL
);
"#,
    r#"
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    seal TEXT NOT NULL,
    device TEXT NOT NULL,
    device_profile TEXT NOT NULL,
    device_serial TEXT NOT NULL,
    caller TEXT NOT NULL,
    applicant TEXT NOT NULL,
    approvers TEXT NOT NULL,
    jti TEXT NOT NULL,
    doc_sha256 TEXT NOT NULL,
    doc_type TEXT NOT NULL,
    currency TEXT NOT NULL,
    dept TEXT NOT NULL,
    purpose TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    evidence TEXT NOT NULL,
    amount INTEGER,
    ref_seq INTEGER,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE INDEX audit_ref ON audit(ref_seq) WHERE ref_seq IS NOT NULL;
CREATE INDEX audit_doc ON audit(doc_sha256, seal) WHERE kind = 'stamp.completed';
CREATE INDEX audit_at ON audit(at_ms);
CREATE INDEX audit_dangling ON audit(kind) WHERE kind = 'stamp.authorized';
CREATE TABLE checkpoints (
    seq INTEGER PRIMARY KEY,
    prev_seq INTEGER NOT NULL,
    head BLOB NOT NULL,
    at_ms INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    signature BLOB NOT NULL
);
CREATE TABLE audit_keys (
    key_id TEXT PRIMARY KEY,
    algorithm TEXT NOT NULL,
    spki BLOB NOT NULL,
    first_used_ms INTEGER NOT NULL
);
"#,
    // The restamp rule looks for an earlier stamp of a document under another approval; with
    // the approval in the index that is two seeks, however often one approval stamped it.
    r#"
DROP INDEX audit_doc;
CREATE INDEX audit_doc ON audit(doc_sha256, seal, jti) WHERE kind = 'stamp.completed';
"#,
    // A terminal's last impression counter, found at start-up without a scan.
    r#"
CREATE INDEX audit_terminal ON audit(device, seq) WHERE kind LIKE 'terminal.%';
"#,
    // The uses of an approval, counted from the log as well as the ledger, so a ledger row
    // deleted behind the daemon's back re-opens nothing.
    r#"
CREATE INDEX audit_jti ON audit(jti, kind) WHERE jti <> '';
"#,
    // The seals' public keys (and certificates), so that an auditor can check each
    // `stamp.completed` signature from the log or its bundle alone. A stamp's evidence names its
    // key by `key_id` (the first 8 bytes of the SHA-256 of the SPKI, in hex) and `algorithm`;
    // one RSA key may serve two seals with two paddings.
    r#"
CREATE TABLE seal_keys (
    key_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    seal TEXT NOT NULL,
    spki BLOB NOT NULL,
    certificate BLOB,
    first_seen_ms INTEGER NOT NULL,
    PRIMARY KEY (key_id, algorithm)
);
"#,
    // Each passkey's approvals (when it approved, by its own signed header, and its signature
    // counter then), so a counter that does not move forward with time (a copied
    // authenticator) is refused.
    r#"
CREATE TABLE passkey_uses (
    id INTEGER PRIMARY KEY,
    credential_id TEXT NOT NULL,
    approved_at INTEGER NOT NULL,
    sign_count INTEGER NOT NULL,
    jti TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX passkey_uses_credential ON passkey_uses(credential_id, approved_at);
"#,
    // Every record of a document (its authorisations, outcomes, refusals), found without a
    // scan: what an auditor asks first (`sealctl audit query --doc`, the console's search).
    r#"
CREATE INDEX audit_doc_any ON audit(doc_sha256) WHERE doc_sha256 <> '';
"#,
    // Applications waiting for their approvers: their records, found at start-up without a
    // scan, and the PDFs submitted with them (shown to approvers, never parsed here).
    r#"
CREATE INDEX audit_application ON audit(seq) WHERE kind LIKE 'application.%';
CREATE TABLE application_documents (
    jti TEXT PRIMARY KEY,
    pdf BLOB NOT NULL,
    at INTEGER NOT NULL
);
"#,
];

pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
}

/// The database file inside a state directory.
pub fn db_path(dir: &Path) -> PathBuf {
    dir.join("sealgate.db")
}

/// Opens a connection with the settings every writer needs: WAL, synchronous=FULL, a busy
/// timeout. The schema must already be current.
pub fn connect(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl Store {
    /// Opens (creating if needed) `DIR/sealgate.db`; the directory is made mode 0700.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = db_path(dir);
        let fail = |detail: String| StoreError::Open {
            path: path.clone(),
            detail,
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| fail(e.to_string()))?;
        let mut conn = connect(&path).map_err(|e| fail(e.to_string()))?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| fail(e.to_string()))?;
        if version as usize > MIGRATIONS.len() {
            return Err(fail(format!(
                "schema version {version} is newer than this daemon knows ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction().map_err(|e| fail(e.to_string()))?;
            tx.execute_batch(m)
                .and_then(|_| tx.pragma_update(None, "user_version", (i + 1) as i64))
                .and_then(|_| tx.commit())
                .map_err(|e| fail(format!("migration {}: {e}", i + 1)))?;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| fail(e.to_string()))?;
        Ok(Store {
            conn: Mutex::new(conn),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection. Blocks: call from a blocking context.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&mut conn)?)
    }

    /// Runs a query that only reads; its failure is reported as a read. Blocks.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(|e| StoreError::Read(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_migrates_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("state")).unwrap();
        let v: i64 = s
            .with(|c| c.pragma_query_value(None, "user_version", |r| r.get(0)))
            .unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
        drop(s);
        Store::open(&dir.path().join("state")).unwrap();
        let mode = std::fs::metadata(dir.path().join("state/sealgate.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
