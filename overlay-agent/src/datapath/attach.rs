//! Attaching the programs so that they outlive the agent.
//!
//! Every attachment is a bpf_link pinned under the host's pin directory: the kernel keeps it
//! (and the program and maps it references) after the agent exits, so traffic keeps flowing
//! through a restart or a crash. A restarted agent does not detach anything: it points each
//! pinned link at the program it just loaded with one atomic link update, so no packet ever
//! sees an interface without a program. While it runs, the agent also holds each link open
//! (`held.rs`), so that a pin removed by hand detaches nothing and can be made again.

use std::{io, path::Path};

use aya::programs::{
    ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    links::{FdLink, LinkError, PinnedLink},
    tc::{SchedClassifierLink, SchedClassifierLinkId},
    xdp::{XdpLink, XdpLinkId},
};
use tracing::{info, warn};

use super::Error;

/// How the operator wants XDP on the uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpPreference {
    /// Native (driver) mode, falling back to generic mode where the driver has no XDP support;
    /// none on a veth uplink, where TC alone is faster (GSO is kept).
    // Why a veth is left to TC: `auto_skips`.
    Auto,
    /// Native mode, or fail to start.
    Native,
    /// Generic (skb) mode, on any device.
    Generic,
    /// No XDP: the uplink's TC program validates and decapsulates on its own.
    Off,
}

/// Whether `auto` leaves XDP off on an uplink of this kind, and why.
///
/// XDP cannot do the job at full speed on a veth: native XDP on a veth makes the kernel take
/// GSO away from its peer (veth_fix_features), so every 64 KiB super-packet a local sender
/// pushes into it is first cut into MTU-sized frames, and generic XDP linearises every
/// super-packet instead. Measured by the benchmark harness on a veth underlay (one TCP stream
/// between containers on two hosts): TC alone 17.8 Gbit/s, generic XDP 14.4, native XDP 5.9
/// (see README, "Uplink: XDP or TC"). A physical NIC receives
/// MTU-sized frames off the wire anyway, which is where XDP is the cheapest place to drop and
/// decapsulate. On a veth the uplink TC program does both, with the same rules.
pub fn auto_skips(kind: Option<&str>) -> Option<&'static str> {
    (kind == Some("veth")).then_some(
        "native XDP on a veth strips GSO from its peer and generic XDP linearises super-packets; \
         the uplink TC program validates and decapsulates instead",
    )
}

/// Opens a pinned link, or None if nothing is pinned at `path`.
fn pinned(path: &Path) -> Result<Option<FdLink>, Error> {
    match PinnedLink::from_pin(path) {
        Ok(link) => Ok(Some(FdLink::from(link))),
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Link(path.display().to_string(), e)),
    }
}

/// Removes a pin; the link it held detaches when nothing else references it.
pub fn unpin(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::Pin(path.display().to_string(), e)),
        _ => Ok(()),
    }
}

/// The programs whose pinned links the agent re-points: aya gives each the same two methods
/// for it, but no trait that names them.
trait Relink {
    type Link: TryFrom<FdLink, Error = LinkError>;
    type Id;
    fn attach_to_link(&mut self, link: Self::Link) -> Result<Self::Id, ProgramError>;
    fn take_link(&mut self, id: Self::Id) -> Result<Self::Link, ProgramError>;
}

impl Relink for SchedClassifier {
    type Link = SchedClassifierLink;
    type Id = SchedClassifierLinkId;
    fn attach_to_link(&mut self, link: Self::Link) -> Result<Self::Id, ProgramError> {
        SchedClassifier::attach_to_link(self, link)
    }
    fn take_link(&mut self, id: Self::Id) -> Result<Self::Link, ProgramError> {
        SchedClassifier::take_link(self, id)
    }
}

impl Relink for Xdp {
    type Link = XdpLink;
    type Id = XdpLinkId;
    fn attach_to_link(&mut self, link: Self::Link) -> Result<Self::Id, ProgramError> {
        Xdp::attach_to_link(self, link)
    }
    fn take_link(&mut self, id: Self::Id) -> Result<Self::Link, ProgramError> {
        Xdp::take_link(self, id)
    }
}

/// Points the link pinned at `pin` at `prog` with one atomic update. Returns false when there is
/// no link to re-point: nothing pinned, or a stale link (its device is gone, or it is not the
/// kind of link `prog` takes), which is unpinned so that the caller attaches anew.
fn repoint<P: Relink>(prog: &mut P, pin: &Path, what: &str) -> Result<bool, Error>
where
    FdLink: TryFrom<P::Link, Error = LinkError>,
{
    let Some(old) = pinned(pin)? else { return Ok(false) };
    let replaced = P::Link::try_from(old)
        .map_err(|e| Error::Link(what.to_owned(), e))
        .and_then(|link| prog.attach_to_link(link).map_err(|e| Error::Program(what.to_owned(), e)));
    match replaced {
        Ok(id) => {
            // The pin holds the link; our handle on it can go.
            let link = prog.take_link(id).map_err(|e| Error::Program(what.to_owned(), e))?;
            drop(FdLink::try_from(link));
            Ok(true)
        }
        Err(e) => {
            warn!(error = %e, "replacing stale attachment {}", pin.display());
            unpin(pin)?;
            Ok(false)
        }
    }
}

/// Pins a fresh attachment, so that it outlives the agent.
fn pin_new<P: Relink>(prog: &mut P, id: P::Id, pin: &Path, what: &str) -> Result<(), Error>
where
    FdLink: TryFrom<P::Link, Error = LinkError>,
{
    let link = prog.take_link(id).map_err(|e| Error::Program(what.to_owned(), e))?;
    let link = FdLink::try_from(link).map_err(|e| Error::Link(what.to_owned(), e))?;
    link.pin(pin).map_err(|e| Error::Pin(what.to_owned(), io::Error::other(e)))?;
    Ok(())
}

/// Attaches `prog` at TC ingress of `ifname`, or re-points the link already pinned at `pin`.
pub fn tc_ingress(prog: &mut SchedClassifier, ifname: &str, pin: &Path) -> Result<(), Error> {
    let what = format!("{} on {ifname}", pin.display());
    if repoint(prog, pin, &what)? {
        return Ok(());
    }
    let id = prog.attach(ifname, TcAttachType::Ingress).map_err(|e| Error::Program(what.clone(), e))?;
    pin_new(prog, id, pin, &what)
}

/// Attaches the uplink XDP program as the operator prefers, or re-points the pinned link.
/// Returns false if XDP is off (and removes an attachment a previous run left).
pub fn uplink_xdp(
    prog: &mut Xdp,
    ifname: &str,
    kind: Option<&str>,
    pin: &Path,
    preference: XdpPreference,
) -> Result<bool, Error> {
    let what = || format!("{} on {ifname}", pin.display());
    let skip = match preference {
        XdpPreference::Off => Some("XDP switched off (--xdp-mode off)"),
        XdpPreference::Auto => auto_skips(kind),
        _ => None,
    };
    if let Some(why) = skip {
        info!(uplink = ifname, kind, "no XDP on the uplink: {why}");
        unpin(pin)?;
        return Ok(false);
    }
    if repoint(prog, pin, &what())? {
        return Ok(true);
    }
    let id = match preference {
        XdpPreference::Native => prog.attach(ifname, XdpMode::Driver),
        XdpPreference::Generic => prog.attach(ifname, XdpMode::Skb),
        XdpPreference::Auto => match prog.attach(ifname, XdpMode::Driver) {
            Ok(id) => Ok(id),
            Err(e) => {
                info!(
                    uplink = ifname,
                    error = format!("{:#}", anyhow::Error::new(e)),
                    "native XDP is not available on the uplink; falling back to generic (skb) mode"
                );
                prog.attach(ifname, XdpMode::Skb)
            }
        },
        XdpPreference::Off => unreachable!(),
    }
    .map_err(|e| Error::Program(what(), e))?;
    pin_new(prog, id, pin, &what())?;
    Ok(true)
}
