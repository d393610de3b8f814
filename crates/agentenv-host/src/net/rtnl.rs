//! A synchronous rtnetlink socket with the few link, address and route
//! requests agentenv needs.
//!
//! A netlink socket belongs to the network namespace of the thread that
//! creates it, so [`Rtnl::open`] is called on the namespace's worker thread
//! ([`super::NetnsThread`]) and every request then acts in that namespace.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// How long one reply may take before the request is abandoned.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer: large enough for any one datagram of a dump.
const RECV_BUF: usize = 1 << 18;
/// `NLM_F_CAPPED`: the error message echoes only the request's header.
const NLM_F_CAPPED: u16 = 0x100;
/// `NLM_F_ACK_TLVS`: extended-ack attributes follow the echoed request.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLMSGERR_ATTR_MSG`: the kernel's error string.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// The main routing table.
const RT_TABLE_MAIN: u32 = 254;

/// A netlink request that failed.
#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    /// The socket itself failed (open, send, receive, timeout).
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The kernel refused the request.
    #[error("{}", kernel_message(*.errno, .ext.as_deref()))]
    Kernel {
        /// The positive errno.
        errno: i32,
        /// The kernel's extended-ack message, when it gave one.
        ext: Option<String>,
    },
    /// A reply could not be decoded.
    #[error("cannot decode netlink reply: {0}")]
    Decode(String),
}

impl RtnlError {
    /// The errno the kernel answered with, if it was the kernel that refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RtnlError::Kernel { errno, .. } => Some(*errno),
            RtnlError::Socket(_) | RtnlError::Decode(_) => None,
        }
    }
}

fn kernel_message(errno: i32, ext: Option<&str>) -> String {
    let base = std::io::Error::from_raw_os_error(errno).to_string();
    match ext {
        Some(ext) if !ext.is_empty() => format!("{base}: {ext}"),
        _ => base,
    }
}

/// A link as a dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Its alias (`IFLA_IFALIAS`), when it has one.
    pub alias: Option<String>,
}

/// One rtnetlink socket. Requests are sequential; not shared between threads.
pub struct Rtnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Rtnl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rtnl").field("seq", &self.seq).finish()
    }
}

impl Rtnl {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Rtnl, RtnlError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(RtnlError::Socket)?;
        sock.bind_auto().map_err(RtnlError::Socket)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(RtnlError::Socket)?;
        // Best effort: older kernels lack these; errors then carry only errno.
        let _ = sock.set_ext_ack(true);
        let _ = sock.set_cap_ack(true);
        set_recv_timeout(&sock, REPLY_TIMEOUT).map_err(RtnlError::Socket)?;
        Ok(Rtnl {
            sock,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    /// The index of the link called `name`, or `None` when there is none.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>, RtnlError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(replies) => Ok(replies.into_iter().find_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                _ => None,
            })),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The name of the link with index `index`, or `None` when there is none.
    pub fn link_name(&mut self, index: u32) -> Result<Option<String>, RtnlError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        match self.request(RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(replies) => Ok(replies.into_iter().find_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) => link_name(&l),
                _ => None,
            })),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// All links of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, RtnlError> {
        let replies = self.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) => Some(Link {
                    index: l.header.index,
                    name: link_name(&l)?,
                    alias: l.attributes.iter().find_map(|a| match a {
                        LinkAttribute::IfAlias(s) if !s.is_empty() => Some(s.clone()),
                        _ => None,
                    }),
                }),
                _ => None,
            })
            .collect())
    }

    /// Adds `ip/prefix_len` to the link (fails if it is already there).
    pub fn add_ipv4(&mut self, index: u32, ip: Ipv4Addr, prefix_len: u8) -> Result<(), RtnlError> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix_len;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(ip.into()));
        msg.attributes.push(AddressAttribute::Address(ip.into()));
        if prefix_len < 31 {
            let host_mask = u32::MAX >> prefix_len;
            let brd = Ipv4Addr::from(u32::from(ip) | host_mask);
            msg.attributes.push(AddressAttribute::Broadcast(brd));
        }
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Sets the link's alias (`IFLA_IFALIAS`, at most 255 bytes), e.g. the
    /// mark that says who made it.
    pub fn set_alias(&mut self, index: u32, alias: &str) -> Result<(), RtnlError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes
            .push(LinkAttribute::IfAlias(alias.to_string()));
        self.request(RouteNetlinkMessage::SetLink(msg), 0).map(drop)
    }

    /// Sets the link administratively up.
    pub fn set_up(&mut self, index: u32) -> Result<(), RtnlError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(msg), 0).map(drop)
    }

    /// Deletes the link called `name` (with its addresses and routes).
    /// Returns `false` when there was no such link.
    pub fn delete_link(&mut self, name: &str) -> Result<bool, RtnlError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::DelLink(msg), 0) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The output interfaces of the IPv4 default routes of the main table,
    /// best (lowest metric) first.
    pub fn default_route_interfaces(&mut self) -> Result<Vec<u32>, RtnlError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        let replies = self.dump(RouteNetlinkMessage::GetRoute(msg))?;
        let mut found: Vec<(u32, u32)> = Vec::new();
        for r in replies {
            let RouteNetlinkMessage::NewRoute(r) = r else {
                continue;
            };
            if r.header.address_family != AddressFamily::Inet
                || r.header.destination_prefix_length != 0
                || r.header.kind != RouteType::Unicast
            {
                continue;
            }
            let mut table = u32::from(r.header.table);
            let mut metric = 0;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Priority(p) => metric = *p,
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::MultiPath(hops) => {
                        oif = oif.or(hops.first().map(|h| h.interface_index))
                    }
                    _ => {}
                }
            }
            if let (RT_TABLE_MAIN, Some(oif)) = (table, oif) {
                found.push((metric, oif));
            }
        }
        found.sort_unstable();
        Ok(found.into_iter().map(|(_, oif)| oif).collect())
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<u32, RtnlError> {
        let seq = self.next_seq();
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.sock.send(&out, 0).map_err(RtnlError::Socket)?;
        Ok(seq)
    }

    /// Sends a request with `NLM_F_ACK` and collects its replies up to the ack.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, RtnlError> {
        let seq = self.send(msg, NLM_F_ACK | flags)?;
        self.collect(seq)
    }

    /// Sends a dump request and collects its replies up to `NLMSG_DONE`.
    fn dump(&mut self, msg: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, RtnlError> {
        let seq = self.send(msg, NLM_F_DUMP)?;
        self.collect(seq)
    }

    fn collect(&mut self, seq: u32) -> Result<Vec<RouteNetlinkMessage>, RtnlError> {
        let mut replies = Vec::new();
        loop {
            let n = self
                .sock
                .recv(&mut &mut self.buf[..], 0)
                .map_err(RtnlError::Socket)?;
            if n == 0 {
                return Err(RtnlError::Decode("empty datagram".into()));
            }
            let n = n.min(self.buf.len());
            let mut off = 0;
            while off < n {
                let bytes = &self.buf[off..n];
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                    .map_err(|e| RtnlError::Decode(e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue; // a stale reply of an abandoned request
                }
                match msg.payload {
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) => {
                        let Some(code) = e.code else {
                            return Ok(replies); // the ack
                        };
                        return Err(RtnlError::Kernel {
                            errno: code.get().abs(),
                            ext: extack_message(msg.header.flags, &e.header),
                        });
                    }
                    NetlinkPayload::Noop | NetlinkPayload::Overrun(_) => {}
                    _ => {}
                }
            }
        }
    }
}

fn link_name(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// The kernel's message from an `NLMSG_ERROR` payload (after the error code):
/// the echoed request (only its header when capped), then attributes.
fn extack_message(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 || payload.len() < 16 {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        16
    } else {
        u32::from_ne_bytes(payload[0..4].try_into().ok()?) as usize
    };
    let mut tlvs = payload.get((echoed + 3) & !3..)?;
    while tlvs.len() >= 4 {
        let len = u16::from_ne_bytes([tlvs[0], tlvs[1]]) as usize;
        let kind = u16::from_ne_bytes([tlvs[2], tlvs[3]]) & 0x3fff;
        if len < 4 || len > tlvs.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let value = &tlvs[4..len];
            let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
            return Some(String::from_utf8_lossy(&value[..end]).into_owned());
        }
        tlvs = tlvs.get((len + 3) & !3..).unwrap_or(&[]);
    }
    None
}

fn set_recv_timeout(sock: &Socket, timeout: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the fd is the socket's own and open for the call; `tv` is a
    // valid `timeval` that outlives the call, and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(value);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn extack_message_is_read_after_the_capped_header() {
        let mut payload = vec![0u8; 16];
        payload.extend(nla(4, &[1, 2, 3, 4])); // NLMSGERR_ATTR_OFFS
        payload.extend(nla(NLMSGERR_ATTR_MSG, b"Unknown device type\0"));
        let flags = NLM_F_CAPPED | NLM_F_ACK_TLVS;
        assert_eq!(
            extack_message(flags, &payload).as_deref(),
            Some("Unknown device type")
        );
        assert_eq!(extack_message(NLM_F_CAPPED, &payload), None);
    }

    #[test]
    fn extack_message_skips_an_uncapped_request() {
        let mut payload = vec![0u8; 24];
        payload[0..4].copy_from_slice(&24u32.to_ne_bytes());
        payload.extend(nla(NLMSGERR_ATTR_MSG, b"bad\0"));
        assert_eq!(
            extack_message(NLM_F_ACK_TLVS, &payload).as_deref(),
            Some("bad")
        );
        // Truncated or garbage attributes give no message rather than a panic.
        assert_eq!(extack_message(NLM_F_ACK_TLVS, &payload[..26]), None);
    }

    #[test]
    fn kernel_errors_read_like_the_kernel() {
        let e = RtnlError::Kernel {
            errno: libc::EEXIST,
            ext: None,
        };
        assert_eq!(e.to_string(), "File exists (os error 17)");
        assert_eq!(e.errno(), Some(libc::EEXIST));
        let e = RtnlError::Kernel {
            errno: libc::EINVAL,
            ext: Some("Invalid prefix".into()),
        };
        assert!(e.to_string().ends_with(": Invalid prefix"), "{e}");
    }
}
