//! Network namespaces: entering one on the current thread, and creating and removing the named
//! ones (`/run/netns/<name>`, the way `ip netns` does) that serve as container sandboxes.

use std::{
    fs::File,
    io,
    marker::PhantomData,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
};

/// Where named namespaces live (as with `ip netns`).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The namespace of the current thread.
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// Puts the current thread into a network namespace until dropped, then back where it was.
///
/// Only the calling thread moves, so the guard is neither Send nor Sync: dropping it on another
/// thread would restore the wrong one.
pub struct NetnsGuard {
    original: File,
    _not_send: PhantomData<*const ()>,
}

impl NetnsGuard {
    pub fn enter(target: &File) -> io::Result<Self> {
        let original = File::open(THREAD_NETNS)?;
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        Ok(Self { original, _not_send: PhantomData })
    }

    pub fn enter_path(path: &Path) -> io::Result<Self> {
        let target = open(path)?;
        Self::enter(&target)
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // Never panic in drop. If the way back fails the thread is left in the wrong
        // namespace, which would misdirect everything it does next: abort instead.
        if let Err(e) = setns(self.original.as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!("fatal: cannot return to the original network namespace: {e}");
            std::process::abort();
        }
    }
}

pub fn open(path: &Path) -> io::Result<File> {
    File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The path of the named namespace `name`.
pub fn named(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Whether `path` is a namespace bind mount (not just a leftover file).
pub fn exists(path: &Path) -> bool {
    File::open(path)
        .ok()
        .and_then(|f| nix::sys::statfs::fstatfs(&f).ok())
        .is_some_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// Creates the named namespace `name` (idempotent: an existing one is kept).
///
/// The new namespace is made on a short-lived thread so nothing else of the agent ever runs in
/// it, and is kept alive by a bind mount, exactly as `ip netns add` does.
pub fn create(name: &str) -> io::Result<PathBuf> {
    let path = named(name);
    if exists(&path) {
        return Ok(path);
    }
    prepare_run_dir()?;
    let target = path.clone();
    std::thread::spawn(move || -> io::Result<()> {
        // The placeholder file the namespace is bound onto.
        File::create(&target)?;
        let made = unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from).and_then(|()| {
            mount(Some(THREAD_NETNS), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map_err(io::Error::from)
        });
        if made.is_err() {
            let _ = std::fs::remove_file(&target);
        }
        // The thread ends here and its namespace reference with it; the bind mount stays.
        made
    })
    .join()
    .map_err(|_| io::Error::other("namespace thread panicked"))??;
    Ok(path)
}

/// Removes the named namespace `name` (idempotent). Its interfaces go with it once the last
/// process in it is gone.
pub fn delete(name: &str) -> io::Result<()> {
    let path = named(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(io::Error::other(format!("unmounting {}: {e}", path.display()))),
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes /run/netns a shared mount point of its own, as `ip netns` does, so that namespace
/// mounts made here are seen by processes in other mount namespaces (e.g. `ip netns exec`).
fn prepare_run_dir() -> io::Result<()> {
    let dir = Path::new(NETNS_RUN_DIR);
    std::fs::create_dir_all(dir)?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    if mount(None::<&str>, dir, None::<&str>, shared, None::<&str>).is_err() {
        // Not a mount point yet: bind it onto itself first.
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
            .map_err(io::Error::from)?;
        mount(None::<&str>, dir, None::<&str>, shared, None::<&str>).map_err(io::Error::from)?;
    }
    Ok(())
}

/// Writes a sysctl of the current thread's network namespace; `key` is its path under
/// /proc/sys, e.g. `net/ipv6/conf/eth0/disable_ipv6`.
pub fn sysctl(key: &str, value: &str) -> io::Result<()> {
    let path = Path::new("/proc/sys").join(key);
    std::fs::write(&path, value).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}
