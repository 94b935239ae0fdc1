//! Protocol layer: git's pkt-line framing, sans I/O. Decoding works on byte slices and
//! says how many more bytes it needs; encoding appends to a buffer.

use std::fmt;

/// Largest pkt-line, length prefix included.
pub const MAX_PKT_LEN: usize = 65520;
/// Largest payload of one pkt-line.
pub const MAX_PAYLOAD: usize = MAX_PKT_LEN - 4;

/// One decoded packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// `0000`
    Flush,
    /// `0001` (protocol v2)
    Delim,
    /// `0002` (protocol v2)
    ResponseEnd,
    /// A line with a payload.
    Data(&'a [u8]),
}

/// Outcome of decoding from the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole packet and the bytes it took.
    Complete {
        /// The packet.
        packet: Packet<'a>,
        /// Bytes consumed from the buffer.
        consumed: usize,
    },
    /// The buffer ends inside a packet; at least this many more bytes are needed.
    Incomplete {
        /// Bytes still missing.
        needed: usize,
    },
}

/// A malformed pkt-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PktError {
    /// The 4-byte length is not hex.
    BadLength([u8; 4]),
    /// Length 3 (reserved) or longer than [`MAX_PKT_LEN`].
    InvalidLength(usize),
}

impl fmt::Display for PktError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PktError::BadLength(b) => write!(
                f,
                "malformed pkt-line: length {:?} is not 4 hex digits",
                String::from_utf8_lossy(b)
            ),
            PktError::InvalidLength(n) => write!(
                f,
                "malformed pkt-line: length {n} is out of range (4..={MAX_PKT_LEN}, or 0000/0001/0002)"
            ),
        }
    }
}

impl std::error::Error for PktError {}

/// Decode one packet from the start of `buf`.
pub fn decode(buf: &[u8]) -> Result<Decoded<'_>, PktError> {
    if buf.len() < 4 {
        return Ok(Decoded::Incomplete {
            needed: 4 - buf.len(),
        });
    }
    let mut hdr = [0u8; 4];
    hdr.copy_from_slice(&buf[..4]);
    let mut len = 0usize;
    for b in hdr {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return Err(PktError::BadLength(hdr)),
        };
        len = len * 16 + usize::from(d);
    }
    let packet = match len {
        0 => Packet::Flush,
        1 => Packet::Delim,
        2 => Packet::ResponseEnd,
        3 => return Err(PktError::InvalidLength(3)),
        n if n > MAX_PKT_LEN => return Err(PktError::InvalidLength(n)),
        n if buf.len() < n => {
            return Ok(Decoded::Incomplete {
                needed: n - buf.len(),
            })
        }
        n => Packet::Data(&buf[4..n]),
    };
    let consumed = if len < 4 { 4 } else { len };
    Ok(Decoded::Complete { packet, consumed })
}

/// Append a data line. Payloads longer than [`MAX_PAYLOAD`] are split across lines.
pub fn encode_data(out: &mut Vec<u8>, payload: &[u8]) {
    for chunk in payload.chunks(MAX_PAYLOAD) {
        out.extend_from_slice(format!("{:04x}", chunk.len() + 4).as_bytes());
        out.extend_from_slice(chunk);
    }
    if payload.is_empty() {
        out.extend_from_slice(b"0004");
    }
}

/// Append a flush packet.
pub fn encode_flush(out: &mut Vec<u8>) {
    out.extend_from_slice(b"0000");
}

/// Append a delimiter packet.
pub fn encode_delim(out: &mut Vec<u8>) {
    out.extend_from_slice(b"0001");
}

/// Append a side-band frame (band 1 data, 2 progress, 3 error), splitting large data.
pub fn encode_sideband(out: &mut Vec<u8>, band: u8, data: &[u8]) {
    for chunk in data.chunks(MAX_PAYLOAD - 1) {
        out.extend_from_slice(format!("{:04x}", chunk.len() + 5).as_bytes());
        out.push(band);
        out.extend_from_slice(chunk);
    }
}

/// Decode every packet of a complete buffer (e.g. a whole request body).
pub fn decode_all(mut buf: &[u8]) -> Result<Vec<Packet<'_>>, PktError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        match decode(buf)? {
            Decoded::Complete { packet, consumed } => {
                out.push(packet);
                buf = &buf[consumed..];
            }
            Decoded::Incomplete { needed } => {
                return Err(PktError::InvalidLength(buf.len() + needed));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut out = Vec::new();
        encode_data(&mut out, b"want abc\n");
        encode_delim(&mut out);
        encode_flush(&mut out);
        assert_eq!(&out, b"000dwant abc\n00010000");
        let pkts = decode_all(&out).expect("decode");
        assert_eq!(
            pkts,
            vec![Packet::Data(b"want abc\n"), Packet::Delim, Packet::Flush]
        );
    }

    #[test]
    fn incomplete_and_malformed() {
        assert_eq!(
            decode(b"00").expect("ok"),
            Decoded::Incomplete { needed: 2 }
        );
        assert_eq!(
            decode(b"000aab").expect("ok"),
            Decoded::Incomplete { needed: 4 }
        );
        assert_eq!(
            decode(b"zzzz").expect_err("bad"),
            PktError::BadLength(*b"zzzz")
        );
        assert_eq!(
            decode(b"0003").expect_err("bad"),
            PktError::InvalidLength(3)
        );
        assert_eq!(
            decode(b"fff1").expect_err("bad"),
            PktError::InvalidLength(0xfff1)
        );
        assert!(decode_all(b"0009abc").is_err(), "truncated body");
        assert!(PktError::BadLength(*b"zz\0z")
            .to_string()
            .contains("not 4 hex digits"));
    }

    #[test]
    fn large_payloads_split() {
        let big = vec![b'x'; MAX_PAYLOAD * 2 + 10];
        let mut out = Vec::new();
        encode_data(&mut out, &big);
        let pkts = decode_all(&out).expect("decode");
        assert_eq!(pkts.len(), 3);
        let mut sb = Vec::new();
        encode_sideband(&mut sb, 1, &big);
        for p in decode_all(&sb).expect("decode") {
            match p {
                Packet::Data(d) => assert!(d[0] == 1 && d.len() <= MAX_PAYLOAD),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic fuzz: every prefix of varied inputs decodes or errors.
        let mut seed: u32 = 12345;
        for _ in 0..20_000 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let len = (seed >> 16) as usize % 24;
            let bytes: Vec<u8> = (0..len)
                .map(|i| {
                    let alphabet = b"0123456789abcdefABCDEFxz\n\0";
                    alphabet[((seed >> (i % 16)) as usize + i) % alphabet.len()]
                })
                .collect();
            let _ = decode_all(&bytes);
            if let Ok(Decoded::Complete { consumed, .. }) = decode(&bytes) {
                assert!(consumed <= bytes.len() && consumed >= 4);
            }
        }
    }
}
