//! A pass-through FUSE file system over a lower folder, for storage fault tests (needs root and
//! /dev/fuse). On command its writes or its fsyncs fail with EIO, or it turns read-only
//! (EROFS); and a power cut throws away every write that no fsync has made durable, in the
//! spirit of LazyFS: each write not yet synced keeps the bytes it replaced, and the cut puts
//! them back, newest first, and cuts each file back to its last synced length. Names (create,
//! rename, unlink) are durable at once, as on a journalling file system; only contents wait
//! for fsync.

use fuse_mt::{
    CallbackResult, CreatedEntry, DirectoryEntry, FileAttr, FileType, FilesystemMT, FuseMT,
    RequestInfo, ResultCreate, ResultEmpty, ResultEntry, ResultOpen, ResultReaddir, ResultSlice,
    ResultStatfs, ResultWrite, Statfs,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the file system does to writes and fsyncs from now on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    #[default]
    None,
    /// Every write fails with EIO.
    Writes,
    /// Every fsync fails with EIO (the data written stays unsynced).
    Fsyncs,
    /// Writes, creates and truncations fail with EROFS, as after a read-only remount.
    ReadOnly,
    /// The power is off: writes and fsyncs are taken and thrown away.
    Off,
}

/// Bytes a file had before the writes not yet synced.
#[derive(Default)]
struct Unsynced {
    /// The file's length at its last fsync.
    len: u64,
    /// (offset, the bytes there before) of each write since, oldest first.
    replaced: Vec<(u64, Vec<u8>)>,
}

#[derive(Default)]
struct Shared {
    fault: Mutex<Fault>,
    unsynced: Mutex<HashMap<PathBuf, Unsynced>>,
    files: Mutex<HashMap<u64, Arc<File>>>,
    next_fh: AtomicU64,
    /// Figures for the test: faults returned, and what power cuts threw away.
    failed: AtomicU64,
    writes_lost: AtomicU64,
    bytes_lost: AtomicU64,
}

struct Layer {
    lower: PathBuf,
    shared: Arc<Shared>,
}

/// The mounted file system.
pub struct FaultFs {
    mountpoint: PathBuf,
    lower: PathBuf,
    shared: Arc<Shared>,
    session: Option<fuser::BackgroundSession>,
    /// The kernel's number for the mounted connection (the mount's device minor).
    connection: u32,
}

/// Whether this machine can mount one (root, /dev/fuse); the reason if not.
pub fn unavailable() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        Some("mounting a FUSE file system for the state directory needs root")
    } else if !Path::new("/dev/fuse").exists() {
        Some("this kernel has no /dev/fuse")
    } else {
        None
    }
}

impl FaultFs {
    /// Mounts a new layer over `lower` (created if missing) at `mountpoint` (created too).
    pub fn mount(lower: &Path, mountpoint: &Path) -> FaultFs {
        std::fs::create_dir_all(lower).unwrap();
        std::fs::create_dir_all(mountpoint).unwrap();
        let shared = Arc::new(Shared {
            next_fh: AtomicU64::new(1),
            ..Default::default()
        });
        let mut fs = FaultFs {
            mountpoint: mountpoint.to_owned(),
            lower: lower.to_owned(),
            shared,
            session: None,
            connection: 0,
        };
        fs.attach();
        fs
    }

    fn attach(&mut self) {
        let layer = Layer {
            lower: self.lower.clone(),
            shared: self.shared.clone(),
        };
        let opts = [fuser::MountOption::FSName("sealgate-faultfs".into())];
        let session = fuser::spawn_mount2(FuseMT::new(layer, 4), &self.mountpoint, &opts)
            .unwrap_or_else(|e| panic!("mounting the fault layer: {e}"));
        self.session = Some(session);
        // The mount is there once the kernel answers for it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
        while dev(&self.mountpoint) == dev(self.mountpoint.parent().unwrap()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the fault layer never mounted"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.connection = nix::sys::stat::minor(dev(&self.mountpoint).unwrap()) as u32;
    }

    /// The folder under the layer. The test reads its files there, not through the mount: a
    /// process that serves a FUSE file system and maps one of its files itself can wait on
    /// its own writeback for ever.
    pub fn lower(&self) -> &Path {
        &self.lower
    }

    pub fn set(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap() = fault;
    }

    /// Faults returned so far (EIO or EROFS).
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Writes and bytes that power cuts have thrown away so far.
    pub fn lost(&self) -> (u64, u64) {
        (
            self.shared.writes_lost.load(Ordering::Relaxed),
            self.shared.bytes_lost.load(Ordering::Relaxed),
        )
    }

    /// The power goes off and comes back: every unsynced write is undone, the layer is
    /// unmounted (so no page the kernel cached survives) and mounted again. Call it once the
    /// processes using the files are gone. Returns the writes thrown away.
    pub fn power_cut(&mut self) -> u64 {
        self.set(Fault::Off);
        let undone = {
            let mut all = self.shared.unsynced.lock().unwrap();
            let mut undone = 0;
            for (path, u) in all.drain() {
                undone += u.replaced.len() as u64;
                let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) else {
                    continue; // unlinked since: its name's removal was durable
                };
                for (off, old) in u.replaced.iter().rev() {
                    self.shared
                        .bytes_lost
                        .fetch_add(old.len() as u64, Ordering::Relaxed);
                    f.write_all_at(old, *off).unwrap();
                }
                f.set_len(u.len).unwrap();
                f.sync_all().unwrap();
            }
            undone
        };
        self.shared.writes_lost.fetch_add(undone, Ordering::Relaxed);
        self.detach();
        self.shared.unsynced.lock().unwrap().clear();
        self.shared.files.lock().unwrap().clear();
        self.set(Fault::None);
        self.attach();
        undone
    }

    /// Unmounts lazily, so that a file still open cannot make it fail; the session ends
    /// once the last file is closed.
    fn unmount(&self) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(self.mountpoint.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string; umount2 only reads it.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }

    /// Unmounts and waits for the session to end (no process may hold a file open).
    fn detach(&mut self) {
        self.unmount();
        if let Some(s) = self.session.take() {
            s.join();
        }
    }
}

impl Drop for FaultFs {
    /// Does not wait: a failing test may still have a daemon with files open. The connection
    /// is aborted first, so that nothing waiting on it (a daemon, a writeback) hangs once the
    /// serving threads are gone.
    fn drop(&mut self) {
        let control = Path::new("/sys/fs/fuse/connections");
        if std::fs::read_dir(control).map_or(true, |mut d| d.next().is_none()) {
            let _ = std::process::Command::new("mount")
                .args(["-t", "fusectl", "none"])
                .arg(control)
                .status();
        }
        let _ = std::fs::write(control.join(format!("{}/abort", self.connection)), "1");
        self.unmount();
        drop(self.session.take());
    }
}

const TTL: Duration = Duration::ZERO;

fn errno(e: std::io::Error) -> libc::c_int {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn attr(m: &std::fs::Metadata) -> FileAttr {
    let t = |s: i64, ns: i64| UNIX_EPOCH + Duration::new(s.max(0) as u64, ns as u32);
    let kind = if m.is_dir() {
        FileType::Directory
    } else if m.file_type().is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    };
    FileAttr {
        size: m.size(),
        blocks: m.blocks(),
        atime: t(m.atime(), m.atime_nsec()),
        mtime: t(m.mtime(), m.mtime_nsec()),
        ctime: t(m.ctime(), m.ctime_nsec()),
        crtime: SystemTime::UNIX_EPOCH,
        kind,
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        flags: 0,
    }
}

impl Layer {
    fn real(&self, path: &Path) -> PathBuf {
        self.lower.join(path.strip_prefix("/").unwrap_or(path))
    }

    fn fault(&self) -> Fault {
        *self.shared.fault.lock().unwrap()
    }

    /// The error a write-like call gets under the current fault, if any.
    fn refuse_write(&self) -> Option<libc::c_int> {
        let e = match self.fault() {
            Fault::Writes => libc::EIO,
            Fault::ReadOnly => libc::EROFS,
            _ => return None,
        };
        self.shared.failed.fetch_add(1, Ordering::Relaxed);
        Some(e)
    }

    fn file(&self, fh: u64) -> Result<Arc<File>, libc::c_int> {
        self.shared
            .files
            .lock()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or(libc::EBADF)
    }

    fn keep(&self, f: File) -> u64 {
        let fh = self.shared.next_fh.fetch_add(1, Ordering::Relaxed);
        self.shared.files.lock().unwrap().insert(fh, Arc::new(f));
        fh
    }

    /// Remembers what `len` bytes at `off` hold now (and the synced length), before they
    /// change.
    fn remember(&self, real: &Path, f: &File, off: u64, len: u64) -> Result<(), libc::c_int> {
        let size = f.metadata().map_err(errno)?.len();
        let mut all = self.shared.unsynced.lock().unwrap();
        let u = all.entry(real.to_owned()).or_insert_with(|| Unsynced {
            len: size,
            replaced: Vec::new(),
        });
        let end = (off + len).min(size);
        if off < end {
            let mut old = vec![0u8; (end - off) as usize];
            f.read_exact_at(&mut old, off).map_err(errno)?;
            u.replaced.push((off, old));
        }
        Ok(())
    }
}

impl FilesystemMT for Layer {
    fn getattr(&self, _req: RequestInfo, path: &Path, fh: Option<u64>) -> ResultEntry {
        let m = match fh.map(|fh| self.file(fh)) {
            Some(Ok(f)) => f.metadata(),
            _ => std::fs::symlink_metadata(self.real(path)),
        }
        .map_err(errno)?;
        Ok((TTL, attr(&m)))
    }

    fn chmod(&self, _req: RequestInfo, path: &Path, _fh: Option<u64>, mode: u32) -> ResultEmpty {
        if let Some(e) = self.refuse_write() {
            return Err(e);
        }
        std::fs::set_permissions(self.real(path), std::fs::Permissions::from_mode(mode))
            .map_err(errno)
    }

    fn truncate(&self, _req: RequestInfo, path: &Path, fh: Option<u64>, size: u64) -> ResultEmpty {
        if let Some(e) = self.refuse_write() {
            return Err(e);
        }
        let real = self.real(path);
        let f = match fh.map(|fh| self.file(fh)) {
            Some(Ok(f)) => f,
            _ => Arc::new(
                std::fs::OpenOptions::new()
                    .write(true)
                    .read(true)
                    .open(&real)
                    .map_err(errno)?,
            ),
        };
        if self.fault() == Fault::Off {
            return Ok(());
        }
        self.remember(&real, &f, size, u64::MAX - size)?;
        f.set_len(size).map_err(errno)
    }

    fn utimens(
        &self,
        _req: RequestInfo,
        _path: &Path,
        _fh: Option<u64>,
        _atime: Option<SystemTime>,
        _mtime: Option<SystemTime>,
    ) -> ResultEmpty {
        Ok(())
    }

    fn mkdir(&self, _req: RequestInfo, parent: &Path, name: &OsStr, mode: u32) -> ResultEntry {
        if let Some(e) = self.refuse_write() {
            return Err(e);
        }
        let real = self.real(&parent.join(name));
        std::fs::create_dir(&real).map_err(errno)?;
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(mode)).map_err(errno)?;
        Ok((TTL, attr(&std::fs::metadata(&real).map_err(errno)?)))
    }

    fn unlink(&self, _req: RequestInfo, parent: &Path, name: &OsStr) -> ResultEmpty {
        if let Some(e) = self.refuse_write() {
            return Err(e);
        }
        let real = self.real(&parent.join(name));
        std::fs::remove_file(&real).map_err(errno)?;
        self.shared.unsynced.lock().unwrap().remove(&real);
        Ok(())
    }

    fn rmdir(&self, _req: RequestInfo, parent: &Path, name: &OsStr) -> ResultEmpty {
        if let Some(e) = self.refuse_write() {
            return Err(e);
        }
        std::fs::remove_dir(self.real(&parent.join(name))).map_err(errno)
    }

    fn rename(
        &self,
        _req: RequestInfo,
        parent: &Path,
        name: &OsStr,
        newparent: &Path,
        newname: &OsStr,
    ) -> ResultEmpty {
        if let Some(e) = self.refuse_write() {
            return Err(e);
        }
        let (from, to) = (
            self.real(&parent.join(name)),
            self.real(&newparent.join(newname)),
        );
        std::fs::rename(&from, &to).map_err(errno)?;
        let mut all = self.shared.unsynced.lock().unwrap();
        all.remove(&to);
        if let Some(u) = all.remove(&from) {
            all.insert(to, u);
        }
        Ok(())
    }

    fn open(&self, _req: RequestInfo, path: &Path, flags: u32) -> ResultOpen {
        let flags = flags as i32;
        let writing = flags & libc::O_ACCMODE != libc::O_RDONLY;
        if writing && self.fault() == Fault::ReadOnly {
            self.shared.failed.fetch_add(1, Ordering::Relaxed);
            return Err(libc::EROFS);
        }
        let real = self.real(path);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(writing)
            .open(&real)
            .map_err(errno)?;
        if flags & libc::O_TRUNC != 0 {
            self.remember(&real, &f, 0, u64::MAX)?;
            f.set_len(0).map_err(errno)?;
        }
        Ok((self.keep(f), 0))
    }

    fn create(
        &self,
        _req: RequestInfo,
        parent: &Path,
        name: &OsStr,
        mode: u32,
        flags: u32,
    ) -> ResultCreate {
        if let Some(e) = self.refuse_write() {
            return Err(e);
        }
        let real = self.real(&parent.join(name));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(flags as i32 & libc::O_TRUNC != 0)
            .mode(mode)
            .open(&real)
            .map_err(errno)?;
        let a = attr(&f.metadata().map_err(errno)?);
        Ok(CreatedEntry {
            ttl: TTL,
            attr: a,
            fh: self.keep(f),
            flags: 0,
        })
    }

    fn read(
        &self,
        _req: RequestInfo,
        _path: &Path,
        fh: u64,
        offset: u64,
        size: u32,
        callback: impl FnOnce(ResultSlice<'_>) -> CallbackResult,
    ) -> CallbackResult {
        let f = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return callback(Err(e)),
        };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => return callback(Err(errno(e))),
            }
        }
        callback(Ok(&buf[..got]))
    }

    fn write(
        &self,
        _req: RequestInfo,
        path: &Path,
        fh: u64,
        offset: u64,
        data: Vec<u8>,
        _flags: u32,
    ) -> ResultWrite {
        if let Some(e) = self.refuse_write() {
            return Err(e);
        }
        let f = self.file(fh)?;
        if self.fault() == Fault::Off {
            return Ok(data.len() as u32);
        }
        self.remember(&self.real(path), &f, offset, data.len() as u64)?;
        f.write_all_at(&data, offset).map_err(errno)?;
        Ok(data.len() as u32)
    }

    fn flush(&self, _req: RequestInfo, _path: &Path, _fh: u64, _lock_owner: u64) -> ResultEmpty {
        Ok(())
    }

    fn release(
        &self,
        _req: RequestInfo,
        _path: &Path,
        fh: u64,
        _flags: u32,
        _lock_owner: u64,
        _flush: bool,
    ) -> ResultEmpty {
        self.shared.files.lock().unwrap().remove(&fh);
        Ok(())
    }

    fn fsync(&self, _req: RequestInfo, path: &Path, fh: u64, _datasync: bool) -> ResultEmpty {
        match self.fault() {
            Fault::Fsyncs | Fault::Writes => {
                self.shared.failed.fetch_add(1, Ordering::Relaxed);
                return Err(libc::EIO);
            }
            Fault::Off => return Ok(()),
            Fault::None | Fault::ReadOnly => {}
        }
        let f = self.file(fh)?;
        f.sync_all().map_err(errno)?;
        self.shared
            .unsynced
            .lock()
            .unwrap()
            .remove(&self.real(path));
        Ok(())
    }

    fn opendir(&self, _req: RequestInfo, _path: &Path, _flags: u32) -> ResultOpen {
        Ok((0, 0))
    }

    fn readdir(&self, _req: RequestInfo, path: &Path, _fh: u64) -> ResultReaddir {
        let mut out = vec![
            DirectoryEntry {
                name: ".".into(),
                kind: FileType::Directory,
            },
            DirectoryEntry {
                name: "..".into(),
                kind: FileType::Directory,
            },
        ];
        for e in std::fs::read_dir(self.real(path)).map_err(errno)? {
            let e = e.map_err(errno)?;
            let kind = match e.file_type().map_err(errno)? {
                t if t.is_dir() => FileType::Directory,
                t if t.is_symlink() => FileType::Symlink,
                _ => FileType::RegularFile,
            };
            out.push(DirectoryEntry {
                name: e.file_name(),
                kind,
            });
        }
        Ok(out)
    }

    fn releasedir(&self, _req: RequestInfo, _path: &Path, _fh: u64, _flags: u32) -> ResultEmpty {
        Ok(())
    }

    fn fsyncdir(&self, _req: RequestInfo, _path: &Path, _fh: u64, _datasync: bool) -> ResultEmpty {
        Ok(())
    }

    fn statfs(&self, _req: RequestInfo, _path: &Path) -> ResultStatfs {
        let s = nix::sys::statvfs::statvfs(&self.lower).map_err(|e| e as libc::c_int)?;
        Ok(Statfs {
            blocks: s.blocks() as u64,
            bfree: s.blocks_free() as u64,
            bavail: s.blocks_available() as u64,
            files: s.files() as u64,
            ffree: s.files_free() as u64,
            bsize: s.block_size() as u32,
            namelen: s.name_max() as u32,
            frsize: s.fragment_size() as u32,
        })
    }

    fn access(&self, _req: RequestInfo, path: &Path, _mask: u32) -> ResultEmpty {
        std::fs::symlink_metadata(self.real(path))
            .map(|_| ())
            .map_err(errno)
    }
}
