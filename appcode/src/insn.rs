//! eBPF instructions (RFC 9669): the 8-byte encoding, opcode fields, and which instruction
//! set version each instruction belongs to.

use std::fmt;

/// Bytes per instruction slot (`lddw` takes two).
pub const INSN_SIZE: usize = 8;

/// Instruction classes (low 3 bits of the opcode).
pub mod class {
    pub const LD: u8 = 0x00;
    pub const LDX: u8 = 0x01;
    pub const ST: u8 = 0x02;
    pub const STX: u8 = 0x03;
    pub const ALU: u8 = 0x04;
    pub const JMP: u8 = 0x05;
    pub const JMP32: u8 = 0x06;
    pub const ALU64: u8 = 0x07;
}

/// Source operand bit of ALU and jump opcodes: immediate (K) or register (X).
pub const SRC_K: u8 = 0x00;
pub const SRC_X: u8 = 0x08;

/// ALU operation codes (high 4 bits).
pub mod alu {
    pub const ADD: u8 = 0x00;
    pub const SUB: u8 = 0x10;
    pub const MUL: u8 = 0x20;
    pub const DIV: u8 = 0x30;
    pub const OR: u8 = 0x40;
    pub const AND: u8 = 0x50;
    pub const LSH: u8 = 0x60;
    pub const RSH: u8 = 0x70;
    pub const NEG: u8 = 0x80;
    pub const MOD: u8 = 0x90;
    pub const XOR: u8 = 0xa0;
    pub const MOV: u8 = 0xb0;
    pub const ARSH: u8 = 0xc0;
    pub const END: u8 = 0xd0;
}

/// Jump operation codes (high 4 bits).
pub mod jmp {
    pub const JA: u8 = 0x00;
    pub const JEQ: u8 = 0x10;
    pub const JGT: u8 = 0x20;
    pub const JGE: u8 = 0x30;
    pub const JSET: u8 = 0x40;
    pub const JNE: u8 = 0x50;
    pub const JSGT: u8 = 0x60;
    pub const JSGE: u8 = 0x70;
    pub const CALL: u8 = 0x80;
    pub const EXIT: u8 = 0x90;
    pub const JLT: u8 = 0xa0;
    pub const JLE: u8 = 0xb0;
    pub const JSLT: u8 = 0xc0;
    pub const JSLE: u8 = 0xd0;
}

/// Load/store modes (bits 5–7) and sizes (bits 3–4).
pub mod mem {
    pub const IMM: u8 = 0x00;
    pub const ABS: u8 = 0x20;
    pub const IND: u8 = 0x40;
    pub const MEM: u8 = 0x60;
    pub const MEMSX: u8 = 0x80;
    pub const ATOMIC: u8 = 0xc0;
    pub const W: u8 = 0x00;
    pub const H: u8 = 0x08;
    pub const B: u8 = 0x10;
    pub const DW: u8 = 0x18;
}

/// `src` field of a call: helper by number, or a bpf-to-bpf call relative to the next slot.
pub const CALL_HELPER: u8 = 0;
pub const CALL_LOCAL: u8 = 1;

/// One instruction slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Insn {
    pub op: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    pub const fn new(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> Self {
        Self {
            op,
            dst,
            src,
            off,
            imm,
        }
    }

    /// The little-endian encoding: opcode, dst (low nibble) | src (high nibble), offset, imm.
    pub fn encode(&self) -> [u8; INSN_SIZE] {
        let mut b = [0u8; INSN_SIZE];
        b[0] = self.op;
        b[1] = (self.dst & 0x0f) | (self.src << 4);
        b[2..4].copy_from_slice(&self.off.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b
    }

    pub fn decode(b: [u8; INSN_SIZE]) -> Self {
        Self {
            op: b[0],
            dst: b[1] & 0x0f,
            src: b[1] >> 4,
            off: i16::from_le_bytes([b[2], b[3]]),
            imm: i32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    pub fn class(&self) -> u8 {
        self.op & 0x07
    }

    /// Whether this is the first slot of a 16-byte `lddw`.
    pub fn is_lddw(&self) -> bool {
        self.op == class::LD | mem::IMM | mem::DW
    }
}

/// Encodes a program.
pub fn encode(prog: &[Insn]) -> Vec<u8> {
    prog.iter().flat_map(Insn::encode).collect()
}

/// Decodes a program; `None` if its length is not a whole number of slots.
pub fn decode(bytes: &[u8]) -> Option<Vec<Insn>> {
    if !bytes.len().is_multiple_of(INSN_SIZE) {
        return None;
    }
    let slots = bytes.chunks_exact(INSN_SIZE);
    Some(
        slots
            .map(|c| Insn::decode(c.try_into().expect("8-byte chunk")))
            .collect(),
    )
}

/// Why an instruction is outside what nearfs runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unsupported {
    /// A valid instruction of ISA v4 (signed division, sign extension, byte swap, ...).
    V4(&'static str),
    /// Atomic operations.
    Atomic,
    /// Legacy packet access (`ABS`/`IND` loads).
    LegacyPacket,
    /// Not an eBPF instruction at all.
    Invalid,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unsupported::V4(what) => {
                write!(f, "{what} is an ISA v4 instruction; nearfs runs v1–v3")
            }
            Unsupported::Atomic => write!(f, "atomic instructions are not supported"),
            Unsupported::LegacyPacket => {
                write!(f, "legacy packet loads (ABS/IND) are not supported")
            }
            Unsupported::Invalid => write!(f, "not a valid eBPF instruction"),
        }
    }
}

/// Checks that `insn` belongs to ISA v1–v3 (what `clang -mcpu=v1|v2|v3` emits) and is
/// well formed. Register numbers and jump targets are the verifier's business.
pub fn check_isa(insn: &Insn) -> Result<(), Unsupported> {
    let op = insn.op;
    let code = op & 0xf0;
    match insn.class() {
        class::ALU | class::ALU64 => {
            let alu64 = insn.class() == class::ALU64;
            match code {
                alu::DIV | alu::MOD if insn.off == 1 => Err(Unsupported::V4("signed division")),
                alu::MOV if insn.off != 0 => Err(Unsupported::V4("sign-extending move")),
                alu::END if alu64 => Err(Unsupported::V4("unconditional byte swap")),
                alu::END if !matches!(insn.imm, 16 | 32 | 64) => Err(Unsupported::Invalid),
                alu::NEG if op & SRC_X != 0 => Err(Unsupported::Invalid),
                _ if insn.off != 0 && code != alu::END => Err(Unsupported::Invalid),
                0xe0 | 0xf0 => Err(Unsupported::Invalid),
                _ => Ok(()),
            }
        }
        class::JMP | class::JMP32 => match code {
            jmp::JA if insn.class() == class::JMP32 => Err(Unsupported::V4("32-bit-offset jump (ja32)")),
            jmp::CALL | jmp::EXIT if insn.class() == class::JMP32 => Err(Unsupported::Invalid),
            jmp::CALL if op & SRC_X != 0 => Err(Unsupported::Invalid),
            jmp::CALL if insn.src > CALL_LOCAL => Err(Unsupported::Invalid),
            0xe0 | 0xf0 => Err(Unsupported::Invalid),
            _ => Ok(()),
        },
        class::LD => match op {
            o if o == class::LD | mem::IMM | mem::DW => match insn.src {
                0 => Ok(()),
                _ => Err(Unsupported::Invalid),
            },
            o if o & 0xe0 == mem::ABS || o & 0xe0 == mem::IND => Err(Unsupported::LegacyPacket),
            _ => Err(Unsupported::Invalid),
        },
        class::LDX => match op & 0xe0 {
            mem::MEM => Ok(()),
            mem::MEMSX => Err(Unsupported::V4("sign-extending load")),
            _ => Err(Unsupported::Invalid),
        },
        class::ST => match op & 0xe0 {
            mem::MEM => Ok(()),
            _ => Err(Unsupported::Invalid),
        },
        _ /* STX */ => match op & 0xe0 {
            mem::MEM => Ok(()),
            mem::ATOMIC => Err(Unsupported::Atomic),
            _ => Err(Unsupported::Invalid),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_in_little_endian() {
        let i = Insn::new(0x79, 1, 10, -8, 0x1234_5678);
        let b = i.encode();
        assert_eq!(b, [0x79, 0xa1, 0xf8, 0xff, 0x78, 0x56, 0x34, 0x12]);
        assert_eq!(Insn::decode(b), i);
        assert!(decode(&[0; 12]).is_none());
    }

    #[test]
    fn v4_atomic_and_malformed_instructions_are_classified() {
        let sdiv = Insn::new(class::ALU64 | alu::DIV | SRC_X, 0, 1, 1, 0);
        assert!(matches!(check_isa(&sdiv), Err(Unsupported::V4(_))));
        let movsx = Insn::new(class::ALU64 | alu::MOV | SRC_X, 0, 1, 8, 0);
        assert!(matches!(check_isa(&movsx), Err(Unsupported::V4(_))));
        let atomic = Insn::new(class::STX | mem::ATOMIC | mem::DW, 10, 1, -8, 0);
        assert_eq!(check_isa(&atomic), Err(Unsupported::Atomic));
        let bad_end = Insn::new(class::ALU | alu::END, 0, 0, 0, 8);
        assert_eq!(check_isa(&bad_end), Err(Unsupported::Invalid));
        let le16 = Insn::new(class::ALU | alu::END, 0, 0, 0, 16);
        assert_eq!(check_isa(&le16), Ok(()));
        let ldxdw = Insn::new(class::LDX | mem::MEM | mem::DW, 0, 1, 4, 0);
        assert_eq!(check_isa(&ldxdw), Ok(()));
        assert_eq!(
            check_isa(&Insn::new(0xff, 0, 0, 0, 0)),
            Err(Unsupported::Invalid)
        );
    }
}
