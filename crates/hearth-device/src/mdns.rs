//! A minimal mDNS/DNS-SD responder and browser for `_hearth._tcp`
//! (issue 5, ADR 0009): RFC 6762 (Multicast DNS) and RFC 6763 (DNS-Based
//! Service Discovery), only the part Hearth needs.
//!
//! The device answers queries for `_hearth._tcp.local` (PTR), its instance
//! `<device id>._hearth._tcp.local` (SRV, TXT) and its host
//! `<device id>.local` (A). The TXT record carries `id=<device id>` and
//! nothing else: no kind, no state, no name, so the LAN learns only that a
//! Hearth device with that id is there (which its TLS certificate says
//! anyway). Discovery is only a hint: the controller then authenticates
//! the device in the TLS handshake (`lan::DevicePin`).
//!
//! Parsing is bounded: packets at most [`MAX_PACKET`] bytes, at most
//! [`MAX_RECORDS`] records per section, names at most 255 bytes with at most
//! [`MAX_POINTERS`] compression jumps (RFC 1035 section 4.1.4), and any
//! malformed packet is ignored.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use hearth_proto::ids::DeviceId;

/// The mDNS multicast group and port (RFC 6762 section 3).
pub const GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
/// The mDNS port.
pub const PORT: u16 = 5353;
/// The service type.
pub const SERVICE: &str = "_hearth._tcp.local";
/// Largest packet read or written.
pub const MAX_PACKET: usize = 1500;
/// Most records read per section.
pub const MAX_RECORDS: usize = 32;
/// Most compression pointers followed in one name.
pub const MAX_POINTERS: usize = 16;
/// Most replies the responder sends per second (see [`respond`]).
pub const MAX_REPLIES_PER_SEC: u32 = 20;
/// TTL of the records we announce, seconds (RFC 6762 section 10: 120 s for host records).
pub const TTL: u32 = 120;

const TYPE_A: u16 = 1;
const TYPE_PTR: u16 = 12;
const TYPE_TXT: u16 = 16;
const TYPE_SRV: u16 = 33;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
/// The cache-flush bit on unique records (RFC 6762 section 10.2).
const CACHE_FLUSH: u16 = 0x8000;

/// What the responder announces.
#[derive(Debug, Clone)]
pub struct Service {
    /// The device id (instance and host name).
    pub device: DeviceId,
    /// The LAN endpoint's port.
    pub port: u16,
}

/// A device found by [`browse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The id it announced (to be proven in the TLS handshake).
    pub device: DeviceId,
    /// Its LAN endpoint.
    pub addr: SocketAddr,
}

/// A question read from a query.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Question {
    name: String,
    qtype: u16,
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    for label in name.split('.').filter(|l| !l.is_empty()) {
        // Our own names only: labels are ASCII and short (a device id is 32 hex digits).
        let l = &label.as_bytes()[..label.len().min(63)];
        out.push(l.len() as u8);
        out.extend_from_slice(l);
    }
    out.push(0);
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_record(out: &mut Vec<u8>, name: &str, rtype: u16, class: u16, rdata: &[u8]) {
    put_name(out, name);
    put_u16(out, rtype);
    put_u16(out, class);
    out.extend_from_slice(&TTL.to_be_bytes());
    put_u16(out, rdata.len() as u16);
    out.extend_from_slice(rdata);
}

/// A query for every `_hearth._tcp` instance (PTR), with id `id`.
pub fn query(id: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    put_u16(&mut out, id);
    put_u16(&mut out, 0); // flags: standard query
    put_u16(&mut out, 1); // one question
    out.extend_from_slice(&[0; 6]);
    put_name(&mut out, SERVICE);
    put_u16(&mut out, TYPE_PTR);
    put_u16(&mut out, CLASS_IN);
    out
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn u16(&mut self) -> Option<u16> {
        let b = self.buf.get(self.pos..self.pos + 2)?;
        self.pos += 2;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        let b = self.buf.get(self.pos..self.pos + 4)?;
        self.pos += 4;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let b = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(b)
    }

    /// A possibly compressed name, lower-cased, without the trailing dot.
    fn name(&mut self) -> Option<String> {
        let (name, end) = read_name(self.buf, self.pos)?;
        self.pos = end;
        Some(name)
    }
}

/// Reads a name at `pos`; returns it and the position after it (after the
/// first pointer, if any).
fn read_name(buf: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut end = None;
    let mut jumps = 0;
    loop {
        let len = *buf.get(pos)? as usize;
        match len {
            0 => {
                return Some((name, end.unwrap_or(pos + 1)));
            }
            l if l & 0xC0 == 0xC0 => {
                jumps += 1;
                if jumps > MAX_POINTERS {
                    return None;
                }
                let target = ((l & 0x3F) << 8) | *buf.get(pos + 1)? as usize;
                end.get_or_insert(pos + 2);
                pos = target;
            }
            l if l <= 63 => {
                let label = buf.get(pos + 1..pos + 1 + l)?;
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(&String::from_utf8_lossy(label).to_ascii_lowercase());
                if name.len() > 255 {
                    return None;
                }
                pos += 1 + l;
            }
            _ => return None,
        }
    }
}

fn header(buf: &[u8]) -> Option<(u16, u16, [u16; 4])> {
    let mut r = Reader { buf, pos: 0 };
    let id = r.u16()?;
    let flags = r.u16()?;
    let counts = [r.u16()?, r.u16()?, r.u16()?, r.u16()?];
    Some((id, flags, counts))
}

fn questions(buf: &[u8]) -> Option<(u16, Vec<Question>)> {
    if buf.len() > MAX_PACKET {
        return None;
    }
    let (id, flags, [qd, ..]) = header(buf)?;
    if flags & 0x8000 != 0 {
        return None; // a response, not a query
    }
    let mut r = Reader { buf, pos: 12 };
    let mut out = Vec::new();
    for _ in 0..usize::from(qd).min(MAX_RECORDS) {
        let name = r.name()?;
        let qtype = r.u16()?;
        let _class = r.u16()?;
        out.push(Question { name, qtype });
    }
    Some((id, out))
}

/// The responder's answer to one query packet, or `None` when the query
/// does not ask about us (or does not parse). `ip` is the address to
/// announce; `legacy` (the query came from a port other than 5353) makes
/// it a unicast reply that repeats the query id and questions (RFC 6762
/// section 6.7).
pub fn answer(query: &[u8], service: &Service, ip: Ipv4Addr, legacy: bool) -> Option<Vec<u8>> {
    let (id, qs) = questions(query)?;
    let instance = format!("{}.{SERVICE}", service.device);
    let host = format!("{}.local", service.device);
    let wanted = |q: &Question, name: &str, t: u16| q.name == name.to_ascii_lowercase() && (q.qtype == t || q.qtype == TYPE_ANY);
    let asked = qs.iter().any(|q| {
        wanted(q, SERVICE, TYPE_PTR) || wanted(q, &instance, TYPE_SRV) || wanted(q, &instance, TYPE_TXT) || wanted(q, &host, TYPE_A)
    });
    if !asked {
        return None;
    }
    let mut out = Vec::with_capacity(512);
    put_u16(&mut out, if legacy { id } else { 0 });
    put_u16(&mut out, 0x8400); // response, authoritative
    let echoed: Vec<&Question> = if legacy { qs.iter().collect() } else { Vec::new() };
    put_u16(&mut out, echoed.len() as u16);
    put_u16(&mut out, 4); // answers: PTR, SRV, TXT, A
    put_u16(&mut out, 0);
    put_u16(&mut out, 0);
    for q in echoed {
        put_name(&mut out, &q.name);
        put_u16(&mut out, q.qtype);
        put_u16(&mut out, CLASS_IN);
    }
    // Unique records get the cache-flush bit, except in legacy unicast replies.
    let unique = if legacy { CLASS_IN } else { CLASS_IN | CACHE_FLUSH };
    let mut ptr = Vec::new();
    put_name(&mut ptr, &instance);
    put_record(&mut out, SERVICE, TYPE_PTR, CLASS_IN, &ptr);
    let mut srv = Vec::new();
    put_u16(&mut srv, 0);
    put_u16(&mut srv, 0);
    put_u16(&mut srv, service.port);
    put_name(&mut srv, &host);
    put_record(&mut out, &instance, TYPE_SRV, unique, &srv);
    // TXT: the id only (issue 5: nothing about state or occupancy).
    let txt_entry = format!("id={}", service.device);
    let mut txt = vec![txt_entry.len() as u8];
    txt.extend_from_slice(txt_entry.as_bytes());
    put_record(&mut out, &instance, TYPE_TXT, unique, &txt);
    put_record(&mut out, &host, TYPE_A, unique, &ip.octets());
    Some(out)
}

/// Reads the `_hearth._tcp` devices out of one response packet.
pub fn parse_response(buf: &[u8]) -> Vec<Found> {
    parse(buf).unwrap_or_default()
}

fn parse(buf: &[u8]) -> Option<Vec<Found>> {
    if buf.len() > MAX_PACKET {
        return None;
    }
    let (_, flags, [qd, an, ns, ar]) = header(buf)?;
    if flags & 0x8000 == 0 {
        return None;
    }
    let mut r = Reader { buf, pos: 12 };
    for _ in 0..usize::from(qd).min(MAX_RECORDS) {
        r.name()?;
        r.bytes(4)?;
    }
    // instance name -> (port, host); host -> ip; instance -> txt id
    let mut srv: Vec<(String, u16, String)> = Vec::new();
    let mut a: Vec<(String, Ipv4Addr)> = Vec::new();
    let mut txt_ids: Vec<(String, String)> = Vec::new();
    let total = (usize::from(an) + usize::from(ns) + usize::from(ar)).min(MAX_RECORDS * 3);
    for _ in 0..total {
        let name = r.name()?;
        let rtype = r.u16()?;
        let _class = r.u16()?;
        let _ttl = r.u32()?;
        let len = usize::from(r.u16()?);
        let start = r.pos;
        let data = r.bytes(len)?;
        match rtype {
            TYPE_SRV if len >= 7 => {
                let port = u16::from_be_bytes([data[4], data[5]]);
                let (target, _) = read_name(buf, start + 6)?;
                srv.push((name, port, target));
            }
            TYPE_A if len == 4 => a.push((name, Ipv4Addr::new(data[0], data[1], data[2], data[3]))),
            TYPE_TXT => {
                let mut p = 0;
                while let Some(&l) = data.get(p) {
                    let entry = data.get(p + 1..p + 1 + usize::from(l))?;
                    if let Some(id) = std::str::from_utf8(entry).ok().and_then(|e| e.strip_prefix("id=")) {
                        txt_ids.push((name.clone(), id.to_owned()));
                    }
                    p += 1 + usize::from(l);
                }
            }
            _ => {}
        }
    }
    let suffix = format!(".{SERVICE}");
    let mut found = Vec::new();
    for (instance, port, host) in srv {
        let Some(label) = instance.strip_suffix(&suffix) else { continue };
        // The TXT id must agree with the instance name when present.
        if txt_ids.iter().any(|(n, id)| n == &instance && !id.eq_ignore_ascii_case(label)) {
            continue;
        }
        let (Ok(device), Some((_, ip))) = (label.parse::<DeviceId>(), a.iter().find(|(n, _)| n == &host)) else { continue };
        found.push(Found { device, addr: SocketAddr::V4(SocketAddrV4::new(*ip, port)) });
    }
    Some(found)
}

/// The mDNS socket: port 5353 shared with any other responder on the host
/// (SO_REUSEADDR/SO_REUSEPORT), joined to the group on `iface`
/// (`0.0.0.0`: the default interface).
pub fn bind_responder(iface: Ipv4Addr, port: u16) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).into())?;
    s.join_multicast_v4(&GROUP, &iface)?;
    s.set_multicast_loop_v4(true)?;
    s.set_multicast_ttl_v4(255)?;
    Ok(s.into())
}

/// The address the host would use to reach `peer`: the A record to
/// announce when the endpoint listens on every interface. A UDP connect
/// sends nothing.
pub fn local_ip_towards(peer: SocketAddr) -> Option<Ipv4Addr> {
    let probe = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    probe.connect(peer).ok()?;
    match probe.local_addr().ok()?.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
        _ => None,
    }
}

/// Answers queries on `socket` until it fails (a blocking loop for a
/// thread of its own). `fixed_ip`: the endpoint's address when it is bound
/// to one; otherwise the address towards each asker is announced.
pub fn respond(socket: UdpSocket, service: Service, fixed_ip: Option<Ipv4Addr>) {
    let mut buf = [0u8; MAX_PACKET];
    // A reply is a few times larger than a query, and legacy-unicast
    // replies go to whatever source the query claims: at most
    // MAX_REPLIES_PER_SEC replies, so the device is no useful amplifier.
    let mut window = Instant::now();
    let mut replies = 0u32;
    loop {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("mDNS responder stopped: {e}");
                return;
            }
        };
        let Some(ip) = fixed_ip.or_else(|| local_ip_towards(from)) else { continue };
        let legacy = from.port() != PORT;
        let Some(reply) = answer(&buf[..n], &service, ip, legacy) else { continue };
        if window.elapsed() >= Duration::from_secs(1) {
            window = Instant::now();
            replies = 0;
        }
        replies += 1;
        if replies > MAX_REPLIES_PER_SEC {
            continue;
        }
        // RFC 6762 sections 6 and 6.7: legacy queriers get a unicast reply, others the group.
        let to = if legacy { from } else { SocketAddr::V4(SocketAddrV4::new(GROUP, PORT)) };
        if let Err(e) = socket.send_to(&reply, to) {
            tracing::debug!("mDNS reply to {to} failed: {e}");
        }
    }
}

/// Sends one `_hearth._tcp` query to `to` (normally the group, 5353) from
/// an ephemeral port and collects answers for `wait`.
pub fn browse(to: SocketAddr, wait: Duration) -> std::io::Result<Vec<Found>> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_multicast_ttl_v4(255)?;
    let id = rand::random::<u16>();
    socket.send_to(&query(id), to)?;
    let deadline = Instant::now() + wait;
    let mut found: Vec<Found> = Vec::new();
    let mut buf = [0u8; MAX_PACKET];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(found);
        }
        socket.set_read_timeout(Some(left))?;
        match socket.recv_from(&mut buf) {
            Ok((n, _)) => {
                // Legacy unicast replies repeat our id (RFC 6762 section 6.7).
                if header(&buf[..n]).is_some_and(|(rid, _, _)| rid == id) {
                    for f in parse_response(&buf[..n]) {
                        if !found.contains(&f) {
                            found.push(f);
                        }
                    }
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return Ok(found),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn service() -> Service {
        Service { device: DeviceId::random(), port: 8445 }
    }

    #[test]
    fn a_query_for_the_service_gets_ptr_srv_txt_and_a_with_the_id_only() {
        let s = service();
        let reply = answer(&query(7), &s, Ipv4Addr::new(192, 168, 1, 20), true).unwrap();
        assert_eq!(header(&reply).unwrap().0, 7, "legacy unicast repeats the id");
        let found = parse_response(&reply);
        assert_eq!(found, vec![Found { device: s.device.clone(), addr: "192.168.1.20:8445".parse().unwrap() }]);
        // Nothing but the id in TXT: no kind, state or name.
        let text = String::from_utf8_lossy(&reply);
        assert!(text.contains(&format!("id={}", s.device)));
        for word in ["plug", "motion", "relay", "on", "kind"] {
            assert!(!text.contains(&format!("{word}=")), "{word} leaked");
        }
    }

    #[test]
    fn other_queries_and_responses_are_ignored() {
        let s = service();
        let mut other = query(1);
        // Replace the service name's first label with another service.
        let pos = 12 + 1;
        other[pos..pos + 7].copy_from_slice(b"_other_");
        assert!(answer(&other, &s, Ipv4Addr::LOCALHOST, true).is_none());
        let reply = answer(&query(1), &s, Ipv4Addr::LOCALHOST, false).unwrap();
        assert!(answer(&reply, &s, Ipv4Addr::LOCALHOST, false).is_none(), "a response is not a query");
    }

    #[test]
    fn malformed_packets_are_rejected_not_followed() {
        let s = service();
        // A compression pointer to itself.
        let mut looped = query(1);
        looped.truncate(12);
        looped.extend_from_slice(&[0xC0, 12, 0, 12, 0, 1]);
        assert!(answer(&looped, &s, Ipv4Addr::LOCALHOST, true).is_none());
        assert!(parse_response(&looped).is_empty());
        // Truncated at every length: never a panic, never an answer of garbage.
        let reply = answer(&query(3), &s, Ipv4Addr::LOCALHOST, true).unwrap();
        for n in 0..reply.len() {
            let _ = parse_response(&reply[..n]);
            let _ = answer(&reply[..n], &s, Ipv4Addr::LOCALHOST, true);
        }
        assert!(parse_response(&vec![0xFF; MAX_PACKET + 1]).is_empty());
    }

    #[test]
    fn a_txt_id_that_disagrees_with_the_instance_is_dropped() {
        let s = service();
        let mut reply = answer(&query(1), &s, Ipv4Addr::LOCALHOST, true).unwrap();
        let needle = format!("id={}", s.device);
        let at = reply.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap();
        let other = DeviceId::random();
        reply[at + 3..at + needle.len()].copy_from_slice(other.as_str().as_bytes());
        assert!(parse_response(&reply).is_empty());
    }

    #[test]
    fn responder_and_browser_talk_over_real_sockets() {
        // Loopback unicast to the responder's port: the socket path, not multicast routing.
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = socket.local_addr().unwrap();
        let s = service();
        let device = s.device.clone();
        std::thread::spawn(move || respond(socket, s, Some(Ipv4Addr::LOCALHOST)));
        let found = browse(addr, Duration::from_millis(500)).unwrap();
        assert_eq!(found, vec![Found { device, addr: "127.0.0.1:8445".parse().unwrap() }]);
    }
}
