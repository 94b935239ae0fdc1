//! FUSE adapter: translates fuser requests into calls on the filesystem core and its
//! answers into replies. No filesystem logic lives here.

use crate::error::FsError;
use crate::fs::{Attr, Fs, Invalidator, Kind};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::time::{Duration, SystemTime};
use tracing::{instrument, Instrument};

pub(crate) struct FuseFs {
    fs: Fs,
    rt: tokio::runtime::Handle,
    ttl: Duration,
}

impl FuseFs {
    pub(crate) fn new(fs: Fs, rt: tokio::runtime::Handle) -> Self {
        let ttl = fs.config().metadata_ttl.max(Duration::from_millis(10));
        FuseFs { fs, rt, ttl }
    }

    fn run<T>(&self, fut: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(fut.in_current_span())
    }
}

fn to_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: match a.kind {
            Kind::Dir => FileType::Directory,
            Kind::File => FileType::RegularFile,
        },
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn errno(op: &str, e: &FsError) -> Errno {
    if e.is_expected() {
        tracing::debug!(op, error = %e, "answered with an error");
    } else {
        tracing::warn!(op, error = %e, errno = e.errno(), "operation failed");
    }
    Errno::from_i32(e.errno())
}

fn name_str(name: &OsStr) -> Result<&str, FsError> {
    name.to_str()
        .ok_or_else(|| FsError::Invalid("file names must be UTF-8".into()))
}

fn opened_flags(keep_cache: bool, direct_io: bool) -> FopenFlags {
    let mut f = FopenFlags::empty();
    if keep_cache {
        f |= FopenFlags::FOPEN_KEEP_CACHE;
    }
    if direct_io {
        f |= FopenFlags::FOPEN_DIRECT_IO;
    }
    f
}

fn systime(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl Filesystem for FuseFs {
    #[instrument(level = "debug", skip_all, fields(req = %req.unique().0, ino = parent.0, name = ?name))]
    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let res = name_str(name).and_then(|n| self.run(self.fs.lookup(parent.0, n)));
        match res {
            Ok(a) => reply.entry(&self.ttl, &to_attr(&a), Generation(0)),
            Err(FsError::NotFound) => {
                // A negative entry (inode 0): the kernel remembers the miss for the TTL,
                // so git's many probes for absent files do not each cost a request.
                let mut neg = to_attr(&Attr {
                    ino: 0,
                    kind: Kind::File,
                    size: 0,
                    mtime: SystemTime::UNIX_EPOCH,
                    ctime: SystemTime::UNIX_EPOCH,
                    perm: 0,
                    nlink: 0,
                    uid: 0,
                    gid: 0,
                });
                neg.ino = INodeNo(0);
                reply.entry(&self.ttl, &neg, Generation(0));
            }
            Err(e) => reply.error(errno("lookup", &e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    #[instrument(level = "debug", skip_all, fields(req = %req.unique().0, ino = ino.0))]
    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.run(self.fs.getattr(ino.0)) {
            Ok(a) => reply.attr(&self.ttl, &to_attr(&a)),
            Err(e) => reply.error(errno("getattr", &e)),
        }
    }

    #[instrument(level = "debug", skip_all, fields(req = %req.unique().0, ino = ino.0, size = ?size))]
    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.run(self.fs.setattr(ino.0, mode, size, mtime.map(systime))) {
            Ok(a) => reply.attr(&self.ttl, &to_attr(&a)),
            Err(e) => reply.error(errno("setattr", &e)),
        }
    }

    #[instrument(level = "debug", skip_all, fields(req = %req.unique().0, ino = parent.0, name = ?name))]
    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let res = name_str(name).and_then(|n| self.run(self.fs.mkdir(parent.0, n, mode & !umask)));
        match res {
            Ok(a) => reply.entry(&self.ttl, &to_attr(&a), Generation(0)),
            Err(e) => reply.error(errno("mkdir", &e)),
        }
    }

    #[instrument(level = "debug", skip_all, fields(req = %req.unique().0, ino = parent.0, name = ?name))]
    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = name_str(name).and_then(|n| self.run(self.fs.unlink(parent.0, n)));
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("unlink", &e)),
        }
    }

    #[instrument(level = "debug", skip_all, fields(req = %req.unique().0, ino = parent.0, name = ?name))]
    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = name_str(name).and_then(|n| self.run(self.fs.rmdir(parent.0, n)));
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("rmdir", &e)),
        }
    }

    #[instrument(level = "debug", skip_all, fields(req = %req.unique().0, ino = parent.0, name = ?name, newname = ?newname))]
    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            reply.error(Errno::EINVAL);
            return;
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let res = name_str(name).and_then(|n| {
            let nn = name_str(newname)?;
            self.run(self.fs.rename(parent.0, n, newparent.0, nn, noreplace))
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("rename", &e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.fs.link() {
            Ok(a) => reply.entry(&self.ttl, &to_attr(&a), Generation(0)),
            Err(e) => reply.error(errno("link", &e)),
        }
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let e = if self.fs.config().read_only {
            FsError::ReadOnly
        } else {
            FsError::NotSupported("symlink")
        };
        reply.error(errno("symlink", &e));
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let e = if self.fs.config().read_only {
            FsError::ReadOnly
        } else {
            FsError::NotSupported("mknod")
        };
        reply.error(errno("mknod", &e));
    }

    #[instrument(level = "debug", skip_all, fields(req = %req.unique().0, ino = ino.0))]
    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.run(self.fs.open(ino.0, flags.0)) {
            Ok(o) => reply.opened(FileHandle(o.fh), opened_flags(o.keep_cache, o.direct_io)),
            Err(e) => reply.error(errno("open", &e)),
        }
    }

    #[instrument(level = "trace", skip_all, fields(ino = ino.0, offset, size))]
    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.run(self.fs.read(fh.0, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno("read", &e)),
        }
    }

    #[instrument(level = "trace", skip_all, fields(ino = ino.0, offset, len = data.len()))]
    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.run(self.fs.write(fh.0, offset, data)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno("write", &e)),
        }
    }

    #[instrument(level = "debug", skip_all, fields(req = %req.unique().0, ino = ino.0))]
    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.run(self.fs.flush(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("flush", &e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    #[instrument(level = "debug", skip_all, fields(req = %req.unique().0, ino = ino.0))]
    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.run(self.fs.fsync(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fsync", &e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno("opendir", &e)),
        }
    }

    #[instrument(level = "debug", skip_all, fields(req = %req.unique().0, ino = ino.0, offset))]
    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.run(self.fs.readdir(fh.0, ino.0, offset)) {
            Ok(entries) => {
                for e in entries {
                    let kind = match e.kind {
                        Kind::Dir => FileType::Directory,
                        Kind::File => FileType::RegularFile,
                    };
                    if reply.add(INodeNo(e.ino), e.offset, kind, &e.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno("readdir", &e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Object storage has no fixed capacity; report a large, stable figure.
        let blocks = 1u64 << 40;
        reply.statfs(blocks, blocks, blocks, 1 << 30, 1 << 30, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        if self.fs.config().read_only && mask.contains(fuser::AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }

    #[instrument(level = "debug", skip_all, fields(req = %req.unique().0, ino = parent.0, name = ?name))]
    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let res = name_str(name)
            .and_then(|n| self.run(self.fs.create(parent.0, n, mode & !umask, flags)));
        match res {
            Ok((a, o)) => reply.created(
                &self.ttl,
                &to_attr(&a),
                Generation(0),
                FileHandle(o.fh),
                opened_flags(o.keep_cache, o.direct_io),
            ),
            Err(e) => reply.error(errno("create", &e)),
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::from_i32(libc::ENODATA));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        match self.run(self.fs.fallocate(fh.0, offset, length)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fallocate", &e)),
        }
    }
}

enum Inval {
    Entry(u64, String),
    Inode(u64),
}

/// Sends kernel invalidations from a thread of its own: a notification must never be
/// sent from inside a request on the same directory, or the kernel deadlocks.
pub(crate) struct KernelInvalidator {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<Inval>>,
}

impl KernelInvalidator {
    pub(crate) fn start(notifier: fuser::Notifier) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Inval>();
        std::thread::Builder::new()
            .name("repofs-inval".into())
            .spawn(move || {
                for msg in rx {
                    let res = match &msg {
                        Inval::Entry(parent, name) => {
                            notifier.inval_entry(INodeNo(*parent), OsStr::new(name))
                        }
                        Inval::Inode(ino) => notifier.inval_inode(INodeNo(*ino), 0, 0),
                    };
                    if let Err(e) = res {
                        // ENOENT: the kernel had nothing cached. Anything else is worth a note.
                        if e.raw_os_error() != Some(libc::ENOENT) {
                            tracing::debug!(error = %e, "kernel invalidation failed");
                        }
                    }
                }
            })
            .expect("spawn invalidation thread");
        KernelInvalidator {
            tx: std::sync::Mutex::new(tx),
        }
    }
}

impl Invalidator for KernelInvalidator {
    fn inval_entry(&self, parent: u64, name: &str) {
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(Inval::Entry(parent, name.to_string()));
        }
    }
    fn inval_inode(&self, ino: u64) {
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(Inval::Inode(ino));
        }
    }
}
