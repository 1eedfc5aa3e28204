//! The nearfs appcode extension's messages (`docs/nbd.md`, "The appcode extension"): what
//! a RUN asks of the target and what it answers. Encoded and decoded here, by the client
//! and the target alike; a decoder never trusts a length it was sent.

use std::io;
use std::ops::Range;
use std::time::Duration;

use appcode::{Costs, Extent, Limits, Outcome, RunError, abi};

use crate::wire::{Put, Reader, invalid};

/// The extension's version, sent in the option that negotiates it.
pub const VERSION: u32 = 1;
/// Bytes of one extent in a RUN.
const EXTENT_SIZE: usize = 28;
/// Bytes of a RUN before its extents.
const RUN_FIXED: usize = 8 + 4 + 4 + 8 + 8 + 8 + 6 * 8 + 4;
/// Flags of a RUN.
pub const RUN_WRITE: u32 = 1;
const EXTENT_UNWRITTEN: u32 = 1;

/// A RUN as the target decodes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRequest {
    /// The id the target gave the program on this connection.
    pub program: u64,
    pub write: bool,
    pub file_size: u64,
    pub range: Range<u64>,
    pub limits: Limits,
    pub extents: Vec<Extent>,
    pub arg: Vec<u8>,
}

impl RunRequest {
    /// Bytes of the encoded request.
    pub fn encoded_len(&self) -> usize {
        RUN_FIXED + self.extents.len() * EXTENT_SIZE + self.arg.len()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.encoded_len());
        b.put_u64(self.program);
        b.put_u32(if self.write { RUN_WRITE } else { 0 });
        b.put_u32(self.arg.len() as u32);
        b.put_u64(self.file_size);
        b.put_u64(self.range.start);
        b.put_u64(self.range.end);
        let l = &self.limits;
        for v in [
            l.insns,
            l.hops,
            l.device_bytes,
            l.output_bytes,
            l.write_bytes,
            l.wall.as_micros().min(u64::MAX as u128) as u64,
        ] {
            b.put_u64(v);
        }
        b.put_u32(self.extents.len() as u32);
        for e in &self.extents {
            b.put_u64(e.file_off);
            b.put_u64(e.dev_off);
            b.put_u64(e.len);
            b.put_u32(if e.unwritten { EXTENT_UNWRITTEN } else { 0 });
        }
        b.extend_from_slice(&self.arg);
        b
    }

    /// Decodes a RUN and checks that it describes something a run can be given: extents
    /// sorted, apart, non-empty and inside a device of `device_len` bytes, the range in
    /// order, the argument within `ARG_SIZE`, nothing left over.
    pub fn decode(b: &[u8], device_len: u64) -> io::Result<RunRequest> {
        let mut r = Reader::new(b);
        let program = r.u64()?;
        let flags = r.u32()?;
        if flags & !RUN_WRITE != 0 {
            return Err(invalid(format!("unknown RUN flags {flags:#x}")));
        }
        let arg_len = r.u32()? as usize;
        if arg_len > abi::ARG_SIZE {
            return Err(invalid(format!(
                "argument of {arg_len} bytes; the limit is {}",
                abi::ARG_SIZE
            )));
        }
        let file_size = r.u64()?;
        let range = r.u64()?..r.u64()?;
        if range.start > range.end {
            return Err(invalid("the range ends before it starts"));
        }
        let limits = Limits {
            insns: r.u64()?,
            hops: r.u64()?,
            device_bytes: r.u64()?,
            output_bytes: r.u64()?,
            write_bytes: r.u64()?,
            wall: Duration::from_micros(r.u64()?),
        };
        let count = r.u32()? as usize;
        // The count is checked against the bytes that are there before anything is
        // allocated for it.
        if count.checked_mul(EXTENT_SIZE).is_none_or(|n| n > b.len()) {
            return Err(invalid(format!("{count} extents do not fit the message")));
        }
        let mut extents = Vec::with_capacity(count);
        let mut end_of_last = 0;
        for i in 0..count {
            let e = Extent {
                file_off: r.u64()?,
                dev_off: r.u64()?,
                len: r.u64()?,
                unwritten: match r.u32()? {
                    0 => false,
                    EXTENT_UNWRITTEN => true,
                    f => return Err(invalid(format!("extent {i}: unknown flags {f:#x}"))),
                },
            };
            let file_end = e.file_off.checked_add(e.len);
            let dev_end = e.dev_off.checked_add(e.len);
            if e.len == 0
                || e.file_off < end_of_last
                || file_end.is_none()
                || dev_end.is_none_or(|end| end > device_len)
            {
                return Err(invalid(format!(
                    "extent {i} (file {}, device {}, {} bytes) is empty, out of order, or \
                     outside the export of {device_len} bytes",
                    e.file_off, e.dev_off, e.len
                )));
            }
            end_of_last = file_end.expect("checked");
            extents.push(e);
        }
        let arg = r.bytes(arg_len)?.to_vec();
        if !r.is_empty() {
            return Err(invalid("bytes after the argument"));
        }
        Ok(RunRequest {
            program,
            write: flags & RUN_WRITE != 0,
            file_size,
            range,
            limits,
            extents,
            arg,
        })
    }
}

/// A LOAD's payload: the program's name in the object (empty: its only program), then the
/// ELF object.
pub fn encode_load(name: &str, object: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + name.len() + object.len());
    b.put_u16(name.len() as u16);
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(object);
    b
}

pub fn decode_load(b: &[u8]) -> io::Result<(String, &[u8])> {
    let mut r = Reader::new(b);
    let n = r.u16()? as usize;
    let name = std::str::from_utf8(r.bytes(n)?)
        .map_err(|_| invalid("the program name is not UTF-8"))?
        .to_string();
    Ok((name, r.rest()))
}

/// Tags of the run errors in a RESULT chunk.
mod tag {
    pub const OK: u32 = 0;
    pub const INSN_LIMIT: u32 = 1;
    pub const HOP_LIMIT: u32 = 2;
    pub const DEVICE_BYTES_LIMIT: u32 = 3;
    pub const OUTPUT_LIMIT: u32 = 4;
    pub const WRITE_LIMIT: u32 = 5;
    pub const TIMEOUT: u32 = 6;
    pub const OUT_OF_RANGE: u32 = 7;
    pub const ARG_TOO_LARGE: u32 = 8;
    pub const IO: u32 = 9;
    pub const ACCESS: u32 = 10;
    pub const UNVERIFIED: u32 = 11;
    pub const FAULT: u32 = 12;
}

/// A RESULT chunk: the run's outcome without its output (which came before it in
/// OUTPUT chunks), or why it failed.
pub fn encode_result(r: &Result<Outcome, RunError>) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    match r {
        Ok(o) => {
            b.put_u32(tag::OK);
            b.put_u64(o.result);
            for v in [
                o.costs.insns,
                o.costs.hops,
                o.costs.device_bytes,
                o.costs.output_bytes,
            ] {
                b.put_u64(v);
            }
            b.put_u64(o.output.len() as u64);
            // What the run wrote, as one range covering it all (start == end: nothing).
            let (first, last) = (o.written.first(), o.written.last());
            let w = first.zip(last).map_or(0..0, |(f, l)| f.start..l.end);
            b.put_u64(w.start);
            b.put_u64(w.end);
        }
        Err(e) => {
            let (t, flags, a, c, d, msg): (u32, u32, u64, u64, u64, String) = match e {
                RunError::InsnLimit { limit } => (tag::INSN_LIMIT, 0, *limit, 0, 0, String::new()),
                RunError::HopLimit { limit } => (tag::HOP_LIMIT, 0, *limit, 0, 0, String::new()),
                RunError::DeviceBytesLimit { limit } => {
                    (tag::DEVICE_BYTES_LIMIT, 0, *limit, 0, 0, String::new())
                }
                RunError::OutputLimit { limit } => {
                    (tag::OUTPUT_LIMIT, 0, *limit, 0, 0, String::new())
                }
                RunError::WriteLimit { limit } => {
                    (tag::WRITE_LIMIT, 0, *limit, 0, 0, String::new())
                }
                RunError::Timeout { limit } => (
                    tag::TIMEOUT,
                    0,
                    limit.as_micros().min(u64::MAX as u128) as u64,
                    0,
                    0,
                    String::new(),
                ),
                RunError::OutOfRange { off } => (tag::OUT_OF_RANGE, 0, *off, 0, 0, String::new()),
                RunError::ArgTooLarge { len } => {
                    (tag::ARG_TOO_LARGE, 0, *len as u64, 0, 0, String::new())
                }
                RunError::Io(m) => (tag::IO, 0, 0, 0, 0, m.clone()),
                RunError::Access {
                    insn,
                    addr,
                    len,
                    write,
                } => (
                    tag::ACCESS,
                    u32::from(*write),
                    insn.map_or(u64::MAX, |i| i as u64),
                    *addr,
                    *len,
                    String::new(),
                ),
                RunError::Unverified { insn } => {
                    (tag::UNVERIFIED, 0, *insn as u64, 0, 0, String::new())
                }
                RunError::Fault(m) => (tag::FAULT, 0, 0, 0, 0, m.clone()),
                other => (tag::FAULT, 0, 0, 0, 0, other.to_string()),
            };
            b.put_u32(t);
            b.put_u32(flags);
            b.put_u64(a);
            b.put_u64(c);
            b.put_u64(d);
            let msg = truncated(&msg, crate::wire::MAX_MESSAGE);
            b.put_u16(msg.len() as u16);
            b.extend_from_slice(msg.as_bytes());
        }
    }
    b
}

/// Decodes a RESULT chunk; `output` is what the OUTPUT chunks brought, and must be all of
/// it.
pub fn decode_result(b: &[u8], output: Vec<u8>) -> io::Result<Result<Outcome, RunError>> {
    let mut r = Reader::new(b);
    let t = r.u32()?;
    if t == tag::OK {
        let result = r.u64()?;
        let costs = Costs {
            insns: r.u64()?,
            hops: r.u64()?,
            device_bytes: r.u64()?,
            output_bytes: r.u64()?,
        };
        if r.u64()? != output.len() as u64 {
            return Err(invalid("the output pieces do not add up to the output"));
        }
        let written = r.u64()?..r.u64()?;
        return Ok(Ok(Outcome {
            result,
            output,
            costs,
            written: if written.is_empty() {
                Vec::new()
            } else {
                vec![written]
            },
        }));
    }
    let flags = r.u32()?;
    let (a, c, d) = (r.u64()?, r.u64()?, r.u64()?);
    let n = r.u16()? as usize;
    let msg = String::from_utf8_lossy(r.bytes(n)?).into_owned();
    Ok(Err(match t {
        tag::INSN_LIMIT => RunError::InsnLimit { limit: a },
        tag::HOP_LIMIT => RunError::HopLimit { limit: a },
        tag::DEVICE_BYTES_LIMIT => RunError::DeviceBytesLimit { limit: a },
        tag::OUTPUT_LIMIT => RunError::OutputLimit { limit: a },
        tag::WRITE_LIMIT => RunError::WriteLimit { limit: a },
        tag::TIMEOUT => RunError::Timeout {
            limit: Duration::from_micros(a),
        },
        tag::OUT_OF_RANGE => RunError::OutOfRange { off: a },
        tag::ARG_TOO_LARGE => RunError::ArgTooLarge { len: a as usize },
        tag::IO => RunError::Io(format!("at the target: {msg}")),
        tag::ACCESS => RunError::Access {
            insn: (a != u64::MAX).then_some(a as usize),
            addr: c,
            len: d,
            write: flags & 1 != 0,
        },
        tag::UNVERIFIED => RunError::Unverified { insn: a as usize },
        tag::FAULT => RunError::Fault(format!("at the target: {msg}")),
        t => return Err(invalid(format!("unknown run error tag {t}"))),
    }))
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RunRequest {
        RunRequest {
            program: 7,
            write: true,
            file_size: 10_000,
            range: 100..9000,
            limits: Limits::default(),
            extents: vec![
                Extent {
                    file_off: 0,
                    dev_off: 1 << 20,
                    len: 8192,
                    unwritten: false,
                },
                Extent {
                    file_off: 8192,
                    dev_off: 4096,
                    len: 4096,
                    unwritten: true,
                },
            ],
            arg: b"key".to_vec(),
        }
    }

    #[test]
    fn runs_round_trip() {
        let r = request();
        assert_eq!(RunRequest::decode(&r.encode(), 2 << 20).unwrap(), r);
    }

    #[test]
    fn runs_that_reach_past_the_export_or_overlap_are_refused() {
        let r = request();
        // The first extent ends at 1 MiB + 8 KiB.
        assert!(RunRequest::decode(&r.encode(), (1 << 20) + 4096).is_err());
        let mut overlapping = r.clone();
        overlapping.extents[1].file_off = 4096;
        assert!(RunRequest::decode(&overlapping.encode(), 2 << 20).is_err());
        let mut wrapping = r.clone();
        wrapping.extents[0].dev_off = u64::MAX - 10;
        assert!(RunRequest::decode(&wrapping.encode(), u64::MAX).is_err());
        let mut backwards = r.clone();
        backwards.range = std::ops::Range {
            start: 9000,
            end: 100,
        };
        assert!(RunRequest::decode(&backwards.encode(), 2 << 20).is_err());
        let mut trailing = r.encode();
        trailing.push(0);
        assert!(RunRequest::decode(&trailing, 2 << 20).is_err());
    }

    #[test]
    fn every_prefix_of_a_run_is_refused_without_panicking() {
        let b = request().encode();
        for n in 0..b.len() {
            assert!(
                RunRequest::decode(&b[..n], 2 << 20).is_err(),
                "prefix of {n}"
            );
        }
    }

    #[test]
    fn results_and_errors_round_trip() {
        let ok = Outcome {
            result: 42,
            output: b"out".to_vec(),
            costs: Costs {
                insns: 1,
                hops: 2,
                device_bytes: 3,
                output_bytes: 3,
            },
            written: vec![10..20, 30..40],
        };
        let back = decode_result(&encode_result(&Ok(ok.clone())), b"out".to_vec()).unwrap();
        assert_eq!(
            back,
            Ok(Outcome {
                written: std::iter::once(10..40).collect(),
                ..ok
            })
        );
        for e in [
            RunError::InsnLimit { limit: 5 },
            RunError::Timeout {
                limit: Duration::from_millis(1500),
            },
            RunError::Access {
                insn: Some(3),
                addr: 0x4000_0000,
                len: 8,
                write: true,
            },
            RunError::Access {
                insn: None,
                addr: 1,
                len: 2,
                write: false,
            },
            RunError::Unverified { insn: 9 },
            RunError::OutOfRange { off: 77 },
        ] {
            assert_eq!(
                decode_result(&encode_result(&Err(e.clone())), Vec::new()).unwrap(),
                Err(e)
            );
        }
    }
}
