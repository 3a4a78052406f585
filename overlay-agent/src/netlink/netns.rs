//! Network namespaces: entering one on the current thread, and creating and removing the named
//! ones (`/run/netns/<name>`, the way `ip netns` does) that serve as container sandboxes.

use std::{
    fs::File,
    io,
    marker::PhantomData,
    os::{
        fd::{AsFd, AsRawFd as _},
        unix::fs::MetadataExt as _,
    },
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

/// The initial network namespace (init's): the machine's own.
pub const INITIAL_NETNS: &str = "/proc/1/ns/net";

/// The inode number of the initial network namespace on kernels that give the initial
/// namespaces fixed ones (`PROC_NET_INIT_INO`, include/linux/proc_ns.h). Dynamic ones start at
/// 0xF0000000, so on older kernels no namespace has it.
const INITIAL_NETNS_INO: u64 = 0xEFFF_FFF9;

/// `NS_GET_NSTYPE` (linux/nsfs.h): which kind of namespace an nsfs file is.
const NS_GET_NSTYPE: libc::Ioctl = 0xb703;

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

/// The identity of the network namespace at `path` (a bind mount such as /run/netns/x, or a
/// /proc/<pid>/ns/net link): `<dev>:<inode>` of its nsfs file, which is the same for every path
/// to one namespace, as `ip netns identify` compares them. Fails, saying why, for a path that
/// is missing or is not a network namespace (a plain file, another kind of namespace).
pub fn identity(path: &Path) -> io::Result<String> {
    let file = open(path)?;
    let fs = nix::sys::statfs::fstatfs(&file).map_err(io::Error::from)?;
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        let what = if file.metadata()?.is_dir() { "a directory" } else { "a plain file" };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is {what}, not a network namespace", path.display()),
        ));
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the open nsfs file.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    if kind < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{}: which namespace: {e}", path.display())));
    }
    if kind != libc::CLONE_NEWNET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is {}, not a network namespace", path.display(), kind_name(kind)),
        ));
    }
    let meta = file.metadata()?;
    Ok(format!("{}:{}", meta.dev(), meta.ino()))
}

/// The identity of the current thread's network namespace (see [`identity`]).
pub fn current_identity() -> io::Result<String> {
    identity(Path::new(THREAD_NETNS))
}

/// The identities the initial network namespace may have: init's, where /proc/1 can be read
/// (it takes root, and some sandboxes deny it even then), and the fixed one newer kernels give
/// it, which needs no access to init at all.
pub fn initial_identities() -> Vec<String> {
    let mut ids = Vec::new();
    if let Some((dev, _)) = current_identity().ok().as_deref().and_then(|id| id.split_once(':')) {
        // Every namespace file lives on the one nsfs: the same device.
        ids.push(format!("{dev}:{INITIAL_NETNS_INO}"));
    }
    if let Ok(id) = identity(Path::new(INITIAL_NETNS))
        && !ids.contains(&id)
    {
        ids.push(id);
    }
    ids
}

fn kind_name(clone_flag: libc::c_int) -> &'static str {
    match clone_flag {
        libc::CLONE_NEWNS => "a mount namespace",
        libc::CLONE_NEWUTS => "a UTS namespace",
        libc::CLONE_NEWIPC => "an IPC namespace",
        libc::CLONE_NEWUSER => "a user namespace",
        libc::CLONE_NEWPID => "a PID namespace",
        libc::CLONE_NEWCGROUP => "a cgroup namespace",
        libc::CLONE_NEWTIME => "a time namespace",
        _ => "another kind of namespace",
    }
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

#[cfg(test)]
mod tests {
    use std::{io::ErrorKind, path::Path};

    use super::{current_identity, identity};

    #[test]
    fn every_path_to_one_namespace_has_its_identity() {
        let here = current_identity().expect("the thread's namespace");
        assert_eq!(identity(Path::new("/proc/self/ns/net")).expect("the process's namespace"), here);
        let (dev, ino) = here.split_once(':').expect("<dev>:<ino>");
        assert!(dev.parse::<u64>().is_ok() && ino.parse::<u64>().is_ok(), "{here}");
    }

    #[test]
    fn what_is_not_a_network_namespace_is_refused_with_a_reason() {
        let file = std::env::temp_dir().join(format!("overlay-netns-test-{}", std::process::id()));
        std::fs::write(&file, b"").expect("a plain file");
        let plain = identity(&file).expect_err("a plain file");
        std::fs::remove_file(&file).expect("removing it");
        assert_eq!(plain.kind(), ErrorKind::InvalidInput);
        assert!(plain.to_string().ends_with("is a plain file, not a network namespace"), "{plain}");

        let mnt = identity(Path::new("/proc/self/ns/mnt")).expect_err("a mount namespace");
        assert!(mnt.to_string().ends_with("is a mount namespace, not a network namespace"), "{mnt}");

        let missing = identity(Path::new("/nonexistent/netns")).expect_err("a missing path");
        assert_eq!(missing.kind(), ErrorKind::NotFound);
        assert!(missing.to_string().starts_with("/nonexistent/netns: "), "{missing}");
    }
}
