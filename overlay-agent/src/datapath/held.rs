//! Every object the agent pins (maps, attachments), also held open by the agent, and pinned
//! again where it was if its pin is removed by hand.
//!
//! A pin is what keeps an object alive once the agent is gone; while the agent runs, its own
//! file descriptor does. So removing a pin by hand (`rm /sys/fs/bpf/overlay/<host>/links/...`)
//! takes nothing away from the running datapath: a bpf_link the agent holds stays attached,
//! a map stays in use. But the next agent, and `overlay-agent stats`, find objects by their
//! pins: each one missing is pinned again from the descriptor held here, by the periodic full
//! pass and by a check of its own every second or so.

use std::{
    collections::BTreeMap,
    ffi::CString,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tracing::{info, warn};

/// A held object: its descriptor, and whether it is an attachment (a bpf_link).
struct Object {
    fd: OwnedFd,
    link: bool,
}

impl Object {
    /// An attachment that no longer holds an interface. An error reading the link's
    /// information says nothing about its interface.
    fn detached(&self) -> bool {
        self.link && link_ifindex(self.fd.as_fd()).is_ok_and(|ifindex| ifindex == 0)
    }
}

/// Open descriptors of the pinned objects, by pin path; shared with the task that re-pins.
#[derive(Clone, Default)]
pub struct Held {
    by_pin: Arc<Mutex<BTreeMap<PathBuf, Object>>>,
}

/// What one look at the held objects found wrong (nothing: the datapath is whole).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Check {
    /// Pins that are gone and could not be made again.
    pub missing: Vec<PathBuf>,
    /// Attachments that no longer hold their interface: detached by hand (`bpftool link
    /// detach`), which leaves the link, and its pin, in place with no interface.
    pub detached: Vec<PathBuf>,
}

impl Held {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<PathBuf, Object>> {
        self.by_pin.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens the object pinned at `pin` and keeps it open.
    pub fn hold(&self, pin: &Path) -> io::Result<()> {
        let fd = obj_get(pin)?;
        self.lock().insert(pin.to_owned(), Object { fd, link: false });
        Ok(())
    }

    /// Opens the attachment pinned at `pin` and keeps it open; `check` says whether it still
    /// holds its interface.
    pub fn hold_link(&self, pin: &Path) -> io::Result<()> {
        hold_link_in(&mut self.lock(), pin)
    }

    /// Re-pins what is missing, then says what is still wrong: pins that could not be made,
    /// attachments detached from their interface.
    pub fn check(&self) -> Check {
        self.repin();
        let held = self.lock();
        let mut out = Check::default();
        for (pin, object) in held.iter() {
            if !pin.exists() {
                out.missing.push(pin.clone());
            }
            if object.detached() {
                out.detached.push(pin.clone());
            }
        }
        out
    }

    /// Replaces the attachment held for `pin` if it is detached from its interface: lets go
    /// of it and removes its pin, then `make` attaches anew and pins there (returning whether
    /// it pinned anything), and holds what it pinned. Returns whether it replaced anything:
    /// not for an attachment mended already (the check reports a detached one every second
    /// until then, and reports can queue up behind a busy pass) or let go of. All under the
    /// lock, so a check meanwhile waits, rather than find no attachment held at `pin` and the
    /// datapath whole while nothing is attached there.
    pub fn remake_detached(
        &self,
        pin: &Path,
        make: impl FnOnce() -> Result<bool, super::Error>,
    ) -> Result<bool, super::Error> {
        let failed = |e: io::Error| super::Error::Pin(pin.display().to_string(), e);
        let mut held = self.lock();
        if !held.get(pin).is_some_and(Object::detached) {
            return Ok(false);
        }
        unpin_in(&mut held, pin).map_err(failed)?;
        if make()? {
            hold_link_in(&mut held, pin).map_err(failed)?;
        }
        Ok(true)
    }

    /// Lets go of the object pinned at `pin` and removes the pin: the object goes away with its
    /// last reference (for an attachment, it detaches). Both under the lock, so the re-pinning
    /// task cannot put back a pin being removed.
    pub fn unpin(&self, pin: &Path) -> io::Result<()> {
        unpin_in(&mut self.lock(), pin)
    }

    /// Pins again every held object whose pin is gone; returns the pins it made.
    pub fn repin(&self) -> Vec<PathBuf> {
        let held = self.lock();
        let mut made = Vec::new();
        for (pin, Object { fd, .. }) in held.iter() {
            // `exists` follows the path: an operator's `mv` elsewhere leaves nothing here.
            if pin.exists() {
                continue;
            }
            // The whole directory may be gone (`rm -r`): make it again first.
            if let Some(dir) = pin.parent()
                && let Err(e) = std::fs::create_dir_all(dir)
            {
                warn!(pin = %pin.display(), error = %e, "cannot re-create the pin directory");
                continue;
            }
            match obj_pin(fd.as_fd(), pin) {
                Ok(()) => {
                    warn!(pin = %pin.display(), "pin removed behind the agent's back; pinned again");
                    made.push(pin.clone());
                }
                // Another pin appeared meanwhile: whatever it is, it is not ours to replace.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => warn!(pin = %pin.display(), error = %e, "cannot pin again"),
            }
        }
        made
    }

    /// Re-pins what is missing and checks the attachments every `every`, for as long as the
    /// runtime runs, giving each check's result to `found`.
    pub fn keep(&self, every: Duration, found: impl Fn(Check) + Send + 'static) {
        let held = self.clone();
        info!(every_ms = every.as_millis() as u64, "checking the pins and attachments");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // A handful of stat and bpf calls (and a pin only when one is missing): cheap
                // enough to run on the runtime's thread.
                found(held.check());
            }
        });
    }
}

/// `Held::unpin` on the locked objects.
fn unpin_in(held: &mut BTreeMap<PathBuf, Object>, pin: &Path) -> io::Result<()> {
    held.remove(pin);
    match std::fs::remove_file(pin) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `Held::hold_link` on the locked objects.
fn hold_link_in(held: &mut BTreeMap<PathBuf, Object>, pin: &Path) -> io::Result<()> {
    let fd = obj_get(pin)?;
    held.insert(pin.to_owned(), Object { fd, link: true });
    Ok(())
}

// The two bpf(2) commands on pins. aya pins and opens objects through its own types, but has
// no call that pins a descriptor it did not make (a link it handed over is pinned once, by
// value), which is what re-pinning needs.
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The part of `union bpf_attr` the pin commands read (the kernel zeroes the rest).
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn bpf_obj(cmd: libc::c_long, path: &Path, fd: u32) -> io::Result<libc::c_long> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let attr = ObjAttr { pathname: path.as_ptr() as u64, bpf_fd: fd, file_flags: 0 };
    // SAFETY: `attr` and the string it points to live across the call; the kernel reads
    // size_of::<ObjAttr>() bytes of it and writes nothing back.
    let ret = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, &raw const attr, std::mem::size_of::<ObjAttr>() as libc::c_ulong)
    };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// Opens the object pinned at `path`.
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let fd = bpf_obj(BPF_OBJ_GET, path, 0)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor (close-on-exec) that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the object of `fd` at `path`.
fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    bpf_obj(BPF_OBJ_PIN, path, fd.as_raw_fd() as u32).map(drop)
}

/// The part of `union bpf_attr` BPF_OBJ_GET_INFO_BY_FD reads.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info` up to the interface of an XDP or TCX link (both keep it
/// first in their part of the union, which starts 8-aligned after type, id and prog_id).
#[repr(C)]
#[derive(Default)]
struct LinkInfoHead {
    kind: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    ifindex: u32,
    attach_type: u32,
}

/// The interface an XDP or TCX link is attached to; 0 once it was detached (the kernel clears
/// its device then, and keeps the link).
fn link_ifindex(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = LinkInfoHead::default();
    let attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfoHead>() as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: `attr` and `info` live across the call; the kernel writes at most `info_len`
    // bytes into `info` and reads size_of::<InfoAttr>() bytes of `attr`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw const attr,
            std::mem::size_of::<InfoAttr>() as libc::c_ulong,
        )
    };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(info.ifindex) }
}
