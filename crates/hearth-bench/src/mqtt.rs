//! The few MQTT 3.1.1 packets the Mosquitto baseline needs (OASIS MQTT
//! 3.1.1, section 3): CONNECT/CONNACK, SUBSCRIBE/SUBACK, PUBLISH at QoS 1
//! with PUBACK, and PINGREQ/PINGRESP. Encoding is plain functions; decoding
//! is [`Decoder`], which takes bytes as they arrive (so reading stays
//! cancel-safe inside `select!`) and yields whole packets, with the
//! remaining length bounded by [`MAX_PACKET`].

use anyhow::{bail, Context};

/// Largest packet accepted: a 64 KiB payload (Hearth's frame limit) plus
/// room for the topic.
pub const MAX_PACKET: usize = 64 * 1024 + 1024;

/// A decoded packet, reduced to what the benchmark uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNACK with its return code (0 = accepted), section 3.2.
    ConnAck { code: u8 },
    /// SUBACK: packet id and one granted QoS (or 0x80 = failure) per filter, section 3.9.
    SubAck { id: u16, granted: Vec<u8> },
    /// PUBLISH, section 3.3.
    Publish { topic: String, id: Option<u16>, payload: Vec<u8> },
    /// PUBACK, section 3.4.
    PubAck { id: u16 },
    /// PINGRESP, section 3.13.
    PingResp,
    /// Anything else (type nibble), ignored by the benchmark.
    Other(u8),
}

fn put_remaining_len(out: &mut Vec<u8>, mut len: usize) {
    // Section 2.2.3: seven bits per byte, high bit = more bytes follow.
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Section 1.5.3: u16 length prefix; topics here are far below 64 KiB.
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    put_remaining_len(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// CONNECT with a clean session and no credentials: with mutual TLS and
/// `use_identity_as_username`, Mosquitto takes the user name from the
/// certificate's CN (section 3.1).
pub fn connect(client_id: &str, keep_alive_secs: u16) -> Vec<u8> {
    let mut body = Vec::with_capacity(16 + client_id.len());
    put_str(&mut body, "MQTT");
    body.push(4); // protocol level 3.1.1
    body.push(0x02); // clean session
    body.extend_from_slice(&keep_alive_secs.to_be_bytes());
    put_str(&mut body, client_id);
    packet(0x10, &body)
}

/// SUBSCRIBE to `filters`, all at QoS 1 (section 3.8).
pub fn subscribe(id: u16, filters: &[String]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&id.to_be_bytes());
    for f in filters {
        put_str(&mut body, f);
        body.push(1);
    }
    packet(0x82, &body)
}

/// PUBLISH at QoS 1 (section 3.3).
pub fn publish_qos1(topic: &str, id: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(topic.len() + 4 + payload.len());
    put_str(&mut body, topic);
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(payload);
    packet(0x32, &body)
}

/// PUBACK (section 3.4).
pub fn puback(id: u16) -> Vec<u8> {
    packet(0x40, &id.to_be_bytes())
}

/// PINGREQ (section 3.12).
pub fn pingreq() -> Vec<u8> {
    vec![0xc0, 0]
}

/// Accumulates bytes and splits them into packets.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// Appends bytes read from the connection.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Releases the buffer's capacity when it is empty (idle connections
    /// should not keep a burst's worth of memory).
    pub fn shrink(&mut self) {
        if self.buf.is_empty() {
            self.buf = Vec::new();
        }
    }

    /// The next whole packet, if one has arrived.
    pub fn next_packet(&mut self) -> anyhow::Result<Option<Packet>> {
        let Some(&first) = self.buf.first() else { return Ok(None) };
        let mut len = 0usize;
        let mut i = 1;
        loop {
            let Some(&b) = self.buf.get(i) else { return Ok(None) };
            len += usize::from(b & 0x7f) << (7 * (i - 1));
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            if i > 4 {
                bail!("malformed remaining length");
            }
        }
        if len > MAX_PACKET {
            bail!("packet of {len} bytes exceeds the {MAX_PACKET}-byte limit");
        }
        if self.buf.len() < i + len {
            return Ok(None);
        }
        let body: Vec<u8> = self.buf[i..i + len].to_vec();
        self.buf.drain(..i + len);
        Ok(Some(parse(first, &body)?))
    }
}

fn u16_at(b: &[u8], at: usize) -> anyhow::Result<u16> {
    let s = b.get(at..at + 2).context("truncated packet")?;
    Ok(u16::from_be_bytes([s[0], s[1]]))
}

fn parse(first: u8, body: &[u8]) -> anyhow::Result<Packet> {
    Ok(match first >> 4 {
        2 => Packet::ConnAck { code: *body.get(1).context("short CONNACK")? },
        3 => {
            let qos = (first >> 1) & 3;
            let tlen = usize::from(u16_at(body, 0)?);
            let topic = body.get(2..2 + tlen).context("truncated topic")?;
            let topic = String::from_utf8(topic.to_vec()).context("topic is not UTF-8")?;
            let mut at = 2 + tlen;
            let id = if qos > 0 {
                let id = u16_at(body, at)?;
                at += 2;
                Some(id)
            } else {
                None
            };
            Packet::Publish { topic, id, payload: body[at..].to_vec() }
        }
        4 => Packet::PubAck { id: u16_at(body, 0)? },
        9 => Packet::SubAck { id: u16_at(body, 0)?, granted: body.get(2..).unwrap_or_default().to_vec() },
        13 => Packet::PingResp,
        t => Packet::Other(t),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_length_round_trips_across_byte_boundaries() {
        for len in [0usize, 1, 127, 128, 16_383, 16_384, 60_000] {
            let payload = vec![7u8; len];
            let bytes = publish_qos1("a/b", 9, &payload);
            let mut d = Decoder::default();
            // Byte by byte: no packet until the last byte arrived.
            for (i, b) in bytes.iter().enumerate() {
                d.extend(&[*b]);
                let got = d.next_packet().unwrap();
                if i + 1 < bytes.len() {
                    assert_eq!(got, None);
                } else {
                    assert_eq!(got, Some(Packet::Publish { topic: "a/b".into(), id: Some(9), payload: payload.clone() }));
                }
            }
        }
    }

    #[test]
    fn oversized_packets_are_refused_before_buffering_them() {
        let mut d = Decoder::default();
        d.extend(&[0x30, 0xff, 0xff, 0x7f]); // 2 MiB announced
        assert!(d.next_packet().is_err());
    }

    #[test]
    fn acks_decode() {
        let mut d = Decoder::default();
        d.extend(&[0x20, 2, 0, 0, 0x90, 3, 0, 5, 1, 0x40, 2, 0, 9, 0xd0, 0]);
        assert_eq!(d.next_packet().unwrap(), Some(Packet::ConnAck { code: 0 }));
        assert_eq!(d.next_packet().unwrap(), Some(Packet::SubAck { id: 5, granted: vec![1] }));
        assert_eq!(d.next_packet().unwrap(), Some(Packet::PubAck { id: 9 }));
        assert_eq!(d.next_packet().unwrap(), Some(Packet::PingResp));
        assert_eq!(d.next_packet().unwrap(), None);
    }
}
