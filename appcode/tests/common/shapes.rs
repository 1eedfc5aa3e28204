//! Programs of the shapes that cost the compiler most, sized by the caller: the hostile
//! tests build them past the translator's bounds, `examples/compile_cost.rs` at them.

use appcode::asm::assemble;
use appcode::insn::Insn;

const EXIT: Insn = Insn::new(0x95, 0, 0, 0, 0);

/// `n` slots, each of `heads` loop heads a never-taken `jne r9, 0, -1`, with an add on
/// a live register between them; the rest adds.
pub fn loop_heads(n: usize, heads: usize) -> Vec<Insn> {
    // r0, r3–r8 from the window, so that every register is live throughout.
    let mut p = vec![Insn::new(0x79, 2, 1, 0, 0)];
    for r in [0u8, 3, 4, 5, 6, 7, 8] {
        p.push(Insn::new(0x79, r, 2, 8 * i16::from(r), 0));
    }
    p.extend([Insn::new(0xb7, 9, 0, 0, 0), Insn::new(0xb7, 1, 0, 0, 0)]);
    let live = [0u8, 1, 3, 4, 5, 6, 7, 8];
    let mut made = 0;
    while p.len() < n - 1 {
        let k = p.len();
        if made < heads && p.len() % 2 == 0 {
            p.push(Insn::new(0x55, 9, 0, -1, 0));
            made += 1;
        } else {
            p.push(Insn::new(0x0f, live[k % 8], live[(k + 3) % 8], 0, 0));
        }
    }
    p.push(EXIT);
    p
}

/// `n` slots of which `jumps` jump back into slot 1 (never taken); the rest adds.
pub fn jumps_into_one(n: usize, jumps: usize) -> Vec<Insn> {
    let mut p = vec![Insn::new(0xb7, 9, 0, 0, 0), Insn::new(0xb7, 0, 0, 0, 0)];
    while p.len() < n - 1 {
        let back = -(p.len() as i64);
        match i16::try_from(back) {
            Ok(off) if p.len() - 1 <= jumps => p.push(Insn::new(0x55, 9, 0, off, 0)),
            _ => p.push(Insn::new(0x07, 0, 0, 0, 1)),
        }
    }
    p.push(EXIT);
    p
}

/// `n` slots of byte loads through a pointer that is the stack or scratch, as the file
/// decides: the verifier names two areas, so each is resolved by a call.
pub fn resolved_loads(n: usize) -> Vec<Insn> {
    let mut p = assemble(
        "stdw [%r10-8], 0
         ldxdw %r2, [%r1]
         ldxb %r3, [%r2]
         ldxdw %r6, [%r1+16]
         jeq %r3, 0, l
         mov %r6, %r10
         add %r6, -8
         l:
         mov %r0, 0",
    )
    .expect("assembles");
    p.resize(n - 1, Insn::new(0x71, 0, 6, 0, 0));
    p.push(EXIT);
    p
}

/// `n` slots of scratch loads, adds, forward branches and scratch stores in turn: what an
/// ordinary long program compiles to, every access checked.
pub fn checked_accesses(n: usize) -> Vec<Insn> {
    let mut p = vec![
        Insn::new(0xb7, 0, 0, 0, 0),
        Insn::new(0x79, 6, 1, 16, 0),
        Insn::new(0xb7, 2, 0, 0, 0),
    ];
    while p.len() < n - 1 {
        let k = p.len();
        p.push(match k % 4 {
            0 => Insn::new(0x79, 2, 6, ((k * 8) % 4088) as i16, 0),
            1 => Insn::new(0x0f, 0, 2, 0, 0),
            2 => Insn::new(0x25, 0, 0, 0, 1000),
            _ => Insn::new(0x7b, 6, 0, ((k * 8) % 4088) as i16, 0),
        });
    }
    p.push(EXIT);
    p
}
