//! A private PostgreSQL cluster for the HQ tests: Debian's `initdb` and `pg_ctl` in a temporary
//! directory, on a free loopback port, run as the `postgres` user when the tests run as root
//! (PostgreSQL refuses to run as root). Stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The cluster's superuser, which owns the HQ database.
pub const OWNER: &str = "sealgate";
/// The role `sealgate-hq serve` connects as: INSERT and SELECT, and moving heads.
pub const HQ_ROLE: &str = "sealgate_hq";
pub const DATABASE: &str = "sealgate";

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    run_as: Option<String>,
    ssl: bool,
}

/// The newest installed PostgreSQL's binaries (Debian keeps them out of PATH).
fn bindir() -> PathBuf {
    let mut found: Vec<PathBuf> = glob::glob("/usr/lib/postgresql/*/bin/initdb")
        .unwrap()
        .filter_map(Result::ok)
        .collect();
    found.sort_by_key(|p| {
        p.components()
            .nth(4)
            .and_then(|c| c.as_os_str().to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    match found.pop() {
        Some(p) => p.parent().unwrap().to_owned(),
        None => PathBuf::from("/usr/bin"),
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Postgres {
    pub fn start() -> Postgres {
        Postgres::start_with(None)
    }

    /// A cluster that also speaks TLS with this certificate chain and key (PEM).
    pub fn start_with_tls(cert: &Path, key: &Path) -> Postgres {
        Postgres::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&Path, &Path)>) -> Postgres {
        let root = nix::unistd::geteuid().is_root();
        let dir = tempfile::Builder::new()
            .prefix("sealgate-pg-")
            .tempdir_in("/tmp")
            .unwrap();
        let run_as = root.then(|| "postgres".to_string());
        if let Some(user) = &run_as {
            let u = nix::unistd::User::from_name(user)
                .unwrap()
                .expect("the postgres user (Debian's postgresql package makes it)");
            nix::unistd::chown(dir.path(), Some(u.uid), Some(u.gid)).unwrap();
        }
        let mut pg = Postgres {
            bin: bindir(),
            port: free_port(),
            run_as,
            dir,
            ssl: false,
        };
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                OWNER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        if let Some((cert, key)) = tls {
            // server.crt and server.key in the data directory, the server's own, key 0600.
            use std::os::unix::fs::PermissionsExt;
            let data = Path::new(&data);
            for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
                let to = data.join(to);
                std::fs::copy(from, &to).unwrap();
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
                if pg.run_as.is_some() {
                    let u = nix::unistd::User::from_name("postgres").unwrap().unwrap();
                    nix::unistd::chown(&to, Some(u.uid), Some(u.gid)).unwrap();
                }
            }
            pg.ssl = true;
        }
        pg.pg_ctl_start();
        pg.psql_as("postgres", &format!("CREATE ROLE {HQ_ROLE} LOGIN"));
        pg.psql_as(
            "postgres",
            &format!("CREATE DATABASE {DATABASE} OWNER {OWNER}"),
        );
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .command(program)
            .args(args)
            .current_dir("/tmp")
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn pg_ctl_start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1{}",
            self.port,
            self.dir.path().display(),
            if self.ssl { " -c ssl=on" } else { "" }
        );
        let log = self.dir.path().join("postgres.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "-o",
                &options,
                "start",
            ],
        );
    }

    /// A connection string for `user` to the HQ database, over loopback TCP (by the name in
    /// the server's certificate, when it speaks TLS).
    pub fn url(&self, user: &str) -> String {
        format!(
            "host={} port={} user={user} dbname={DATABASE}",
            if self.ssl { "localhost" } else { "127.0.0.1" },
            self.port
        )
    }

    /// Runs SQL as the owner in the HQ database; what it printed (unaligned, tuples only).
    pub fn psql(&self, sql: &str) -> String {
        self.psql_as(DATABASE, sql)
    }

    /// Runs SQL as `user` in the HQ database; Err with the message when it fails.
    pub fn try_psql_as_role(&self, user: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", user])
            .args(["-d", DATABASE, "-v", "ON_ERROR_STOP=1", "-Atc", sql])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn psql_as(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", OWNER])
            .args(["-d", db, "-v", "ON_ERROR_STOP=1", "-Atc", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A number the SQL selects.
    pub fn number(&self, sql: &str) -> i64 {
        let v = self.psql(sql);
        v.parse()
            .unwrap_or_else(|_| panic!("{sql} gave {v:?}, not a number"))
    }

    /// Waits until the SQL gives `want` (up to `limit`); the last value it gave.
    pub fn wait_for(&self, sql: &str, want: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.psql(sql);
            if v == want || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .current_dir("/tmp")
            .output();
    }
}
