//! The kernel side as the agent drives it: loading the eBPF object, pinning its maps,
//! attaching its programs, and writing the maps.

pub mod attach;
pub mod counters;
pub mod held;
pub mod maps;
pub mod pins;

use std::{io, net::Ipv4Addr, path::Path, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapError,
    programs::{ProgramError, SchedClassifier, Xdp},
};
use overlay_common::{
    dns::{MAP_NAMES, NameAddrs, NameKey},
    maps::{CONFIG_DEBUG_DROPS, Config, Endpoint, EndpointKey, Iface, Network, PINNED_MAPS, Peer, PeerKey},
};
use tracing::info;

use self::held::Held;
pub use self::{attach::XdpPreference, maps::Maps, pins::PinDir};

/// The eBPF object `overlay-ebpf`, built by build.rs from the crate of that name.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay-ebpf"));

pub const PROG_FROM_CONTAINER: &str = "from_container";
pub const PROG_UPLINK_XDP: &str = "uplink_xdp";
pub const PROG_UPLINK_TC: &str = "uplink_tc";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {0}: {1}")]
    Program(String, #[source] ProgramError),
    #[error("map {0}: {1}")]
    Map(&'static str, #[source] MapError),
    #[error("attachment {0}: {1}")]
    Link(String, #[source] aya::programs::links::LinkError),
    #[error("pin {0}: {1}")]
    Pin(String, #[source] io::Error),
    #[error(
        "pinned map {map} at {path} has key/value sizes {found:?}, this build expects {expected:?}; \
         it was made by an incompatible version (remove the pin directory to start over, which \
         interrupts traffic)"
    )]
    Layout { map: &'static str, path: String, found: (u32, u32), expected: (u32, u32) },
}

/// The uplink as the datapath needs to know it.
#[derive(Clone, Debug)]
pub struct Uplink {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// The link kind netlink reports ("veth", ...), None for a physical NIC.
    pub kind: Option<String>,
}

/// The eBPF object loaded with this host's pinned maps (reused if they exist), programs loaded
/// into the kernel but not attached. Tests run the programs from here with BPF_PROG_TEST_RUN.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub maps: Maps,
}

impl Loaded {
    pub fn load(pins: &PinDir) -> Result<Self, Error> {
        pins.create().map_err(|e| Error::Pin(pins.root().display().to_string(), e))?;
        maps::check_pinned(pins)?;
        let mut loader = EbpfLoader::new();
        let paths: Vec<_> = PINNED_MAPS.iter().map(|name| (*name, pins.map(name))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT)?;
        for name in [PROG_FROM_CONTAINER, PROG_UPLINK_TC] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            verified(name, || prog.load())?;
        }
        let xdp: &mut Xdp = program(&mut ebpf, PROG_UPLINK_XDP)?;
        verified(PROG_UPLINK_XDP, || xdp.load())?;
        let maps = Maps::take(&mut ebpf)?;
        Ok(Self { ebpf, maps })
    }
}

/// Loads a program, again if the verifier gave up with EAGAIN: it does when a signal is pending
/// for the loading thread (any signal of the process, a child's exit included), and the larger
/// the program the longer that window. libbpf retries the same way.
fn verified(name: &str, mut load: impl FnMut() -> Result<(), ProgramError>) -> Result<(), Error> {
    const TRIES: usize = 5;
    let mut tries = 1;
    loop {
        match load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && tries < TRIES =>
            {
                tries += 1;
            }
            other => return other.map_err(|e| Error::Program(name.into(), e)),
        }
    }
}

/// A program of the object, by name and type.
pub fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or_else(|| Error::Program(name.into(), ProgramError::NotLoaded))?;
    prog.try_into().map_err(|e| Error::Program(name.into(), e))
}

/// What the agent needs to set up a host's datapath.
#[derive(Clone, Debug)]
pub struct Options {
    pub pins: PinDir,
    pub uplink: Uplink,
    pub vtep: Ipv4Addr,
    pub xdp: XdpPreference,
    pub debug_drops: bool,
}

/// A host's datapath: loaded, configured, attached to the uplink.
pub struct Datapath {
    pub ebpf: Ebpf,
    pub maps: Maps,
    pub pins: PinDir,
    pub uplink: Uplink,
    /// Whether an XDP program is attached to the uplink.
    pub xdp: bool,
    /// How the operator wants XDP, for attaching it again.
    xdp_preference: XdpPreference,
    /// Every pinned object, held open, so that a pin removed by hand can be made again.
    held: Held,
}

impl Datapath {
    /// Loads the programs, reuses or creates the pinned maps, writes the host configuration and
    /// attaches to the uplink. Safe to run over a datapath a previous agent left: attachments
    /// are updated in place, maps keep their contents.
    pub fn open(opts: &Options) -> Result<Self, Error> {
        let Loaded { mut ebpf, mut maps } = Loaded::load(&opts.pins)?;
        let config = Config {
            vtep: opts.vtep.octets(),
            uplink_ifindex: opts.uplink.ifindex,
            uplink_mac: opts.uplink.mac,
            _pad: [0; 2],
            flags: if opts.debug_drops { CONFIG_DEBUG_DROPS } else { 0 },
            uplink_mtu: opts.uplink.mtu,
        };
        maps.config.set(0, config, 0).map_err(|e| Error::Map("CONFIG", e))?;

        // TC first: once XDP hands over decapsulated frames, TC must be there to deliver them.
        let tc: &mut SchedClassifier = program(&mut ebpf, PROG_UPLINK_TC)?;
        attach::tc_ingress(tc, &opts.uplink.name, &opts.pins.uplink_tc())?;
        let xdp: &mut Xdp = program(&mut ebpf, PROG_UPLINK_XDP)?;
        let xdp = attach::uplink_xdp(
            xdp,
            &opts.uplink.name,
            opts.uplink.kind.as_deref(),
            &opts.pins.uplink_xdp(),
            opts.xdp,
        )?;
        info!(
            uplink = %opts.uplink.name,
            vtep = %opts.vtep,
            pins = %opts.pins.root().display(),
            xdp,
            "datapath attached"
        );
        let held = Held::default();
        for pin in PINNED_MAPS.iter().map(|name| opts.pins.map(name)) {
            hold(&held, &pin)?;
        }
        hold_link(&held, &opts.pins.uplink_tc())?;
        if xdp {
            hold_link(&held, &opts.pins.uplink_xdp())?;
        }
        Ok(Self {
            ebpf,
            maps,
            pins: opts.pins.clone(),
            uplink: opts.uplink.clone(),
            xdp,
            xdp_preference: opts.xdp,
            held,
        })
    }

    /// Pins again whatever pin was removed by hand (the agent still holds every object).
    pub fn repin(&self) {
        self.held.repin();
    }

    /// Checks the pins and attachments every `every` from a task of its own, between passes
    /// too, giving each result to `found`.
    pub fn keep_pins(&self, every: Duration, found: impl Fn(held::Check) + Send + 'static) {
        self.held.keep(every, found);
    }

    /// Attaches the from-container program to an endpoint's host-side veth.
    pub fn attach_endpoint(&mut self, ifname: &str, ifindex: u32) -> Result<(), Error> {
        let prog: &mut SchedClassifier = program(&mut self.ebpf, PROG_FROM_CONTAINER)?;
        let pin = self.pins.endpoint_link(ifindex);
        attach::tc_ingress(prog, ifname, &pin)?;
        hold_link(&self.held, &pin)
    }

    /// Attaches anew what the attachment pinned at `pin` attached (the uplink's TC or XDP
    /// program, or an endpoint's), after someone detached it by hand: the detached link keeps
    /// its pin but can be neither updated nor attached again, so it is let go of first.
    /// Returns false, doing nothing, when that attachment is not detached (any more): attaching
    /// again for a second report of it would tear down the mended one (`Held::remake_detached`).
    pub fn reattach(&mut self, pin: &Path) -> Result<bool, Error> {
        let failed = |e: io::Error| Error::Pin(pin.display().to_string(), e);
        let (pins, uplink, ebpf, xdp, preference) =
            (&self.pins, &self.uplink, &mut self.ebpf, &mut self.xdp, self.xdp_preference);
        self.held.remake_detached(pin, || {
            if pin == pins.uplink_tc() {
                let prog: &mut SchedClassifier = program(ebpf, PROG_UPLINK_TC)?;
                attach::tc_ingress(prog, &uplink.name, pin)?;
                Ok(true)
            } else if pin == pins.uplink_xdp() {
                let prog: &mut Xdp = program(ebpf, PROG_UPLINK_XDP)?;
                *xdp = attach::uplink_xdp(prog, &uplink.name, uplink.kind.as_deref(), pin, preference)?;
                Ok(*xdp)
            } else if let Some(ifindex) = pins.endpoint_ifindex(pin) {
                let name = nix::net::if_::if_indextoname(ifindex)
                    .map_err(|e| failed(io::Error::from(e)))?
                    .to_string_lossy()
                    .into_owned();
                let prog: &mut SchedClassifier = program(ebpf, PROG_FROM_CONTAINER)?;
                attach::tc_ingress(prog, &name, pin)?;
                Ok(true)
            } else {
                Err(failed(io::Error::other("not an attachment of this datapath")))
            }
        })
    }

    /// Drops the attachment of a veth that is going away (the agent's hold on it, and its pin).
    pub fn detach_endpoint(&mut self, ifindex: u32) -> Result<(), Error> {
        let pin = self.pins.endpoint_link(ifindex);
        self.held.unpin(&pin).map_err(|e| Error::Pin(pin.display().to_string(), e))
    }
}

fn hold(held: &Held, pin: &Path) -> Result<(), Error> {
    held.hold(pin).map_err(|e| Error::Pin(pin.display().to_string(), e))
}

fn hold_link(held: &Held, pin: &Path) -> Result<(), Error> {
    held.hold_link(pin).map_err(|e| Error::Pin(pin.display().to_string(), e))
}

/// Writing the maps the agent fills, one entry at a time. Removing an entry that is not there
/// succeeds. The reconciler writes through this trait alone, so its unit tests can put an
/// in-memory writer in the kernel's place.
pub trait MapWriter {
    fn put_endpoint(&mut self, key: EndpointKey, value: Endpoint) -> Result<(), Error>;
    fn remove_endpoint(&mut self, key: &EndpointKey) -> Result<(), Error>;
    fn put_iface(&mut self, ifindex: u32, value: Iface) -> Result<(), Error>;
    fn remove_iface(&mut self, ifindex: u32) -> Result<(), Error>;
    fn put_peer(&mut self, vtep: Ipv4Addr) -> Result<(), Error>;
    fn remove_peer(&mut self, vtep: Ipv4Addr) -> Result<(), Error>;
    fn put_network(&mut self, vni: u32, value: Network) -> Result<(), Error>;
    fn remove_network(&mut self, vni: u32) -> Result<(), Error>;
    fn put_name(&mut self, key: NameKey, value: NameAddrs) -> Result<(), Error>;
    fn remove_name(&mut self, key: &NameKey) -> Result<(), Error>;
    fn put_subnet(&mut self, subnet: ipnet::Ipv4Net, vni: u32) -> Result<(), Error>;
    fn remove_subnet(&mut self, subnet: ipnet::Ipv4Net) -> Result<(), Error>;
}

impl MapWriter for Datapath {
    fn put_endpoint(&mut self, key: EndpointKey, value: Endpoint) -> Result<(), Error> {
        self.maps.endpoints.insert(key, value, 0).map_err(|e| Error::Map("ENDPOINTS", e))
    }

    fn remove_endpoint(&mut self, key: &EndpointKey) -> Result<(), Error> {
        ignore_missing(self.maps.endpoints.remove(key)).map_err(|e| Error::Map("ENDPOINTS", e))
    }

    fn put_iface(&mut self, ifindex: u32, value: Iface) -> Result<(), Error> {
        self.maps.ifaces.insert(ifindex, value, 0).map_err(|e| Error::Map("IFACES", e))
    }

    fn remove_iface(&mut self, ifindex: u32) -> Result<(), Error> {
        ignore_missing(self.maps.ifaces.remove(&ifindex)).map_err(|e| Error::Map("IFACES", e))
    }

    fn put_peer(&mut self, vtep: Ipv4Addr) -> Result<(), Error> {
        let key = PeerKey { vtep: vtep.octets() };
        self.maps.peers.insert(key, Peer::default(), 0).map_err(|e| Error::Map("PEERS", e))
    }

    fn remove_peer(&mut self, vtep: Ipv4Addr) -> Result<(), Error> {
        let key = PeerKey { vtep: vtep.octets() };
        ignore_missing(self.maps.peers.remove(&key)).map_err(|e| Error::Map("PEERS", e))
    }

    fn put_network(&mut self, vni: u32, value: Network) -> Result<(), Error> {
        self.maps.networks.insert(vni, value, 0).map_err(|e| Error::Map("NETWORKS", e))
    }

    fn remove_network(&mut self, vni: u32) -> Result<(), Error> {
        ignore_missing(self.maps.networks.remove(&vni)).map_err(|e| Error::Map("NETWORKS", e))
    }

    fn put_name(&mut self, key: NameKey, value: NameAddrs) -> Result<(), Error> {
        self.maps.names.insert(key, value, 0).map_err(|e| Error::Map(MAP_NAMES, e))
    }

    fn remove_name(&mut self, key: &NameKey) -> Result<(), Error> {
        ignore_missing(self.maps.names.remove(key)).map_err(|e| Error::Map(MAP_NAMES, e))
    }

    fn put_subnet(&mut self, subnet: ipnet::Ipv4Net, vni: u32) -> Result<(), Error> {
        let key = aya::maps::lpm_trie::Key::new(u32::from(subnet.prefix_len()), subnet.network().octets());
        self.maps.subnets.insert(&key, vni, 0).map_err(|e| Error::Map("SUBNETS", e))
    }

    fn remove_subnet(&mut self, subnet: ipnet::Ipv4Net) -> Result<(), Error> {
        let key = aya::maps::lpm_trie::Key::new(u32::from(subnet.prefix_len()), subnet.network().octets());
        ignore_missing(self.maps.subnets.remove(&key)).map_err(|e| Error::Map("SUBNETS", e))
    }
}

/// Removing an entry that is not there is what we wanted anyway.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}
